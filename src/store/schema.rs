//! The one owner of the SQLite schema: numbered migrations, applied in
//! order at open, each in its own transaction together with the version
//! it reaches (SQLite's `user_version`), so a crash mid-upgrade leaves the
//! previous version intact. A data directory written by a newer build is
//! refused with a clear error rather than misread.
//!
//! Version 0 is both an empty file and a data directory of cloudlink
//! 0.1.0 (which had no version number): migration 1 is written to bring
//! either to the same tables without losing a row.

use rusqlite::{Connection, Transaction};
use std::path::Path;

/// The schema version this build writes and reads.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{path}: written by a newer cloudlink (schema version {found}; this build reads up to {LATEST}): run that version or newer, or restore a backup made by this one")]
    TooNew { path: String, found: u32 },
    #[error("{path}: upgrading the schema to version {to} ({what}) failed: {source}")]
    Migration {
        path: String,
        to: u32,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

struct Migration {
    what: &'static str,
    run: fn(&Transaction<'_>) -> rusqlite::Result<()>,
}

/// Index `i` upgrades version `i` to `i + 1`. Append only: a released
/// migration is never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        what: "devices, meta and actions as of 0.1.0",
        run: v1_baseline,
    },
    Migration {
        what: "an index on actions by age, for retention",
        run: v2_actions_by_age,
    },
    Migration {
        what: "scoped API tokens",
        run: v3_tokens,
    },
    Migration {
        what: "the audit trail",
        run: v4_audit,
    },
    Migration {
        what: "per-device bandwidth limits",
        run: v5_rate_limits,
    },
];

fn v1_baseline(t: &Transaction<'_>) -> rusqlite::Result<()> {
    t.execute_batch(
        "CREATE TABLE IF NOT EXISTS devices (
            id          INTEGER PRIMARY KEY,
            uuid        TEXT    NOT NULL UNIQUE,
            public_key  BLOB    NOT NULL UNIQUE,
            address     INTEGER NOT NULL UNIQUE,
            name        TEXT,
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );",
    )?;
    // Columns 0.1.0 added over its life: a directory from any of its builds
    // may lack some of them.
    const ADDED_COLUMNS: &[(&str, &str)] = &[
        ("last_heartbeat_ms", "INTEGER"),
        ("poll_interval_s", "INTEGER"),
        ("cloudlink_enabled", "INTEGER NOT NULL DEFAULT 1"),
        ("ever_linked", "INTEGER NOT NULL DEFAULT 0"),
        ("device_api_key", "TEXT"),
        ("app_id", "INTEGER"),
        ("last_endpoint", "TEXT"),
    ];
    let existing: Vec<String> = t
        .prepare("SELECT name FROM pragma_table_info('devices')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (col, def) in ADDED_COLUMNS {
        if !existing.iter().any(|c| c == col) {
            t.execute_batch(&format!("ALTER TABLE devices ADD COLUMN {col} {def}"))?;
        }
    }
    t.execute_batch(
        "CREATE TABLE IF NOT EXISTS actions (
            id              TEXT PRIMARY KEY,
            device          TEXT    NOT NULL,
            action          TEXT    NOT NULL,
            force           INTEGER NOT NULL,
            app_id          INTEGER,
            service_name    TEXT,
            api_key         TEXT,
            state           TEXT    NOT NULL,
            created_at      INTEGER NOT NULL,
            expires_at      INTEGER NOT NULL,
            device_status   INTEGER,
            device_body     TEXT,
            idempotency_key TEXT
        );
        CREATE INDEX IF NOT EXISTS actions_queued ON actions (device, state, created_at);
        CREATE INDEX IF NOT EXISTS actions_expiry ON actions (state, expires_at);
        CREATE UNIQUE INDEX IF NOT EXISTS actions_idempotency ON actions (device, idempotency_key);",
    )
}

fn v2_actions_by_age(t: &Transaction<'_>) -> rusqlite::Result<()> {
    t.execute_batch("CREATE INDEX actions_created ON actions (created_at);")
}

fn v3_tokens(t: &Transaction<'_>) -> rusqlite::Result<()> {
    t.execute_batch(
        "CREATE TABLE tokens (
            id          TEXT    PRIMARY KEY,
            name        TEXT    NOT NULL,
            scopes      INTEGER NOT NULL,
            hash        TEXT    NOT NULL,
            created_at  INTEGER NOT NULL,
            expires_at  INTEGER
        );",
    )
}

fn v5_rate_limits(t: &Transaction<'_>) -> rusqlite::Result<()> {
    t.execute_batch("ALTER TABLE devices ADD COLUMN rate_limit_kbps INTEGER;")
}

fn v4_audit(t: &Transaction<'_>) -> rusqlite::Result<()> {
    t.execute_batch(
        "CREATE TABLE audit (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            at        INTEGER NOT NULL,
            kind      TEXT    NOT NULL,
            token_id  TEXT,
            device    TEXT,
            detail    TEXT    NOT NULL
        );
        CREATE INDEX audit_at ON audit (at);
        CREATE INDEX audit_device ON audit (device, at);",
    )
}

/// The schema version stored in `conn`'s database.
pub fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v.clamp(0, u32::MAX as i64) as u32)
}

/// The schema version of the database at `path`, read without changing it.
pub fn stored_version(path: &Path) -> Result<u32, SchemaError> {
    let p = || path.display().to_string();
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| SchemaError::Sqlite { path: p(), source })?;
    version(&c).map_err(|source| SchemaError::Sqlite { path: p(), source })
}

/// Brings the database to [`LATEST`], or refuses a newer one. Returns the
/// version it found.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<u32, SchemaError> {
    let p = || path.display().to_string();
    let found = version(conn).map_err(|source| SchemaError::Sqlite { path: p(), source })?;
    if found > LATEST {
        return Err(SchemaError::TooNew { path: p(), found });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i as u32 + 1;
        let fail = |source| SchemaError::Migration {
            path: p(),
            to,
            what: m.what,
            source,
        };
        let t = conn.transaction().map_err(fail)?;
        (m.run)(&t).map_err(fail)?;
        t.pragma_update(None, "user_version", to).map_err(fail)?;
        t.commit().map_err(fail)?;
        tracing::info!(path = %path.display(), version = to, what = m.what, "schema upgraded");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_upgraded_and_too_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut c = Connection::open(&path).unwrap();
        assert_eq!(migrate(&mut c, &path).unwrap(), 0);
        assert_eq!(version(&c).unwrap(), LATEST);
        // Again: nothing to do.
        assert_eq!(migrate(&mut c, &path).unwrap(), LATEST);
        // A newer build's file is refused, untouched.
        c.pragma_update(None, "user_version", LATEST + 1).unwrap();
        let e = migrate(&mut c, &path).unwrap_err().to_string();
        assert!(e.contains("newer cloudlink"), "{e}");
        assert!(e.contains(&format!("schema version {}", LATEST + 1)), "{e}");
        assert_eq!(version(&c).unwrap(), LATEST + 1);
    }

    #[test]
    fn a_failed_migration_leaves_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut c = Connection::open(&path).unwrap();
        // A 0.1.0-like file where v2's index name is already taken by a
        // table: v1 applies, v2 fails and is rolled back.
        c.execute_batch("CREATE TABLE actions_created (x)").unwrap();
        let e = migrate(&mut c, &path).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        assert_eq!(version(&c).unwrap(), 1);
    }
}
