//! The device registry: which devices may connect, with which key, at which
//! tunnel address. Persisted in SQLite (WAL, `synchronous=FULL`): a
//! registration is fsync'd before it is acknowledged.
//!
//! Nothing about a registered device is kept in the gateway's memory: the
//! handshake path asks SQLite (one indexed lookup, a few µs, against the
//! ~250 µs of the handshake's own cryptography) through a read connection
//! owned by each packet worker. That is what lets one gateway hold 1,000,000
//! registered devices at almost no memory and serve them the moment it starts.
//!
//! Addresses are handed out in order from the tunnel CIDR (the first host
//! address is the gateway's) and never change for a device. Addresses of
//! deleted devices are reused only once the CIDR has been walked to its end,
//! so that a stale stream is unlikely to reach a new device at an old address.

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

use crate::keys::KeyBytes;

/// Largest batch accepted by [`Registry::register_batch`].
pub const MAX_BATCH: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Schema(#[from] crate::store::schema::SchemaError),
    #[error("the data directory was set up with tunnel CIDR {stored}, not {configured}; start with --tunnel-cidr {stored} or use a new data directory")]
    CidrChanged { stored: String, configured: String },
    #[error("the tunnel CIDR {0} has no free address left")]
    CidrExhausted(String),
    #[error(
        "the tunnel CIDR {0} is too small: it needs room for the gateway and at least one device"
    )]
    CidrTooSmall(String),
    /// Cluster mode: the cluster's registry cannot be reached or refused.
    #[error("the cluster's registry: {0}")]
    Cluster(String),
    /// A key change named a key another device holds.
    #[error("this public key belongs to device {uuid:?}; every device needs its own key")]
    KeyTaken { uuid: String },
    /// A device's actions are at their limit.
    #[error("device {device} already has {limit} actions recorded; no more can be queued until some finish")]
    QueueFull { device: String, limit: usize },
    /// A blocking storage task did not finish (it panicked or the runtime
    /// is shutting down).
    #[error("a storage task failed: {0}")]
    Task(String),
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub uuid: String,
    pub public_key: KeyBytes,
    pub address: Ipv4Addr,
    pub name: Option<String>,
    /// Registration time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// Status inputs kept across restarts.
    pub status: crate::status::Stored,
    /// Default application id for actions (`purge`, `restart`, ...).
    pub app_id: Option<u32>,
    /// Whether a supervisor API key is stored (the key itself is never
    /// read into this struct, so it cannot end up in a log or an answer).
    pub has_device_api_key: bool,
    /// The device's own bandwidth limit, kbit/s each way (0: exempt from the
    /// gateway's default; `None`: the default applies).
    pub rate_limit_kbps: Option<u32>,
}

/// Changes to a device's mutable fields (`None`: leave as is).
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    pub name: Option<Option<String>>,
    /// A new WireGuard key: the session made with the old one is cut off.
    pub public_key: Option<KeyBytes>,
    /// `Some(None)` resets to the gateway's default.
    pub poll_interval_s: Option<Option<u32>>,
    pub cloudlink_enabled: Option<bool>,
    /// `Some(None)` clears it.
    pub device_api_key: Option<Option<String>>,
    pub app_id: Option<Option<u32>>,
    /// `Some(None)` resets to the gateway's default.
    pub rate_limit_kbps: Option<Option<u32>>,
}

/// A device to redial after a restart.
#[derive(Debug, Clone)]
pub struct RedialTarget {
    pub public_key: KeyBytes,
    pub endpoint: std::net::SocketAddr,
}

/// A registration request, already validated.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub uuid: String,
    pub public_key: KeyBytes,
    pub name: Option<String>,
}

/// The outcome of one registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// A new device (HTTP 201).
    Created(Device),
    /// The same uuid with the same key was already registered (HTTP 200).
    Existing(Device),
    /// The uuid is registered with another key (HTTP 409).
    UuidTaken,
    /// The key belongs to another device (HTTP 409).
    KeyTaken { uuid: String },
}

/// Checks a device uuid: 1 to 63 characters of `[0-9a-z-]`, so that it fits
/// a DNS label (proxies address devices as `<uuid>.balena`).
pub fn validate_uuid(uuid: &str) -> Result<(), &'static str> {
    if uuid.is_empty() || uuid.len() > 63 {
        return Err("a device uuid is 1 to 63 characters");
    }
    if !uuid
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
    {
        return Err("a device uuid may hold only 0-9, a-z and '-'");
    }
    Ok(())
}

/// Checks a new device's uuid: [`validate_uuid`], and it starts with a
/// letter or digit (a uuid of dashes, or one starting with `-`, reads as an
/// option where it reaches a command line). Devices registered before this
/// rule keep their uuids: lookups use [`validate_uuid`].
pub fn validate_new_uuid(uuid: &str) -> Result<(), &'static str> {
    validate_uuid(uuid)?;
    if !uuid.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("a device uuid starts with 0-9 or a-z");
    }
    Ok(())
}

/// Checks a device name: up to 128 characters, no control characters and
/// no Unicode format characters (direction overrides and isolates,
/// zero-width characters, the soft hyphen, tags): a name must look on every
/// screen like what it is. Stored names are not checked again.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.chars().count() > 128 {
        return Err("a device name is at most 128 characters");
    }
    if name.chars().any(char::is_control) {
        return Err("a device name may not hold control characters");
    }
    if name.chars().any(is_format_char) {
        return Err("a device name may not hold invisible or direction-changing characters (Unicode format characters such as U+202E or U+200B)");
    }
    Ok(())
}

/// Unicode general category Cf (format characters), as of Unicode 15.
pub fn is_format_char(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// The tunnel address plan: the gateway takes the first host address, devices
/// get the following ones up to the last address before broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPlan {
    pub net: ipnet::Ipv4Net,
}

impl AddressPlan {
    pub fn new(net: ipnet::Ipv4Net) -> Result<Self, RegistryError> {
        let net = net.trunc();
        if net.prefix_len() > 30 {
            return Err(RegistryError::CidrTooSmall(net.to_string()));
        }
        Ok(AddressPlan { net })
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network()) + 1)
    }
    fn first_device(&self) -> u32 {
        u32::from(self.net.network()) + 2
    }
    fn last_device(&self) -> u32 {
        u32::from(self.net.broadcast()) - 1
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        a >= self.first_device() && a <= self.last_device()
    }
}

/// The registry: one write connection (serialised by a mutex: SQLite allows
/// one writer anyway) and one read connection for the API. The packet path
/// never reads it: it asks the in-memory `directory`.
pub struct Registry {
    path: PathBuf,
    plan: AddressPlan,
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
    count: AtomicI64,
}

struct Writer {
    conn: Connection,
    /// Next address to try (as u32).
    next: u32,
    /// Set once the plan was walked to its end: from then on candidates are
    /// checked against the table (addresses of deleted devices get reused).
    wrapped: bool,
}

pub(crate) fn open_conn(path: &Path, read_only: bool) -> Result<Connection, RegistryError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    if !read_only {
        // Created 0600 before SQLite opens it: SQLite gives its `-wal` and
        // `-shm` files the database file's mode, so all three stay private
        // whatever the umask (device API keys are stored here).
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path);
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    // FULL: the WAL is fsync'd at every commit, so an acknowledged
    // registration survives power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn row_to_device(row: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    let key: Vec<u8> = row.get(1)?;
    let addr: i64 = row.get(2)?;
    Ok(Device {
        uuid: row.get(0)?,
        public_key: key.try_into().unwrap_or([0; 32]),
        address: Ipv4Addr::from(addr as u32),
        name: row.get(3)?,
        created_at_ms: row.get(4)?,
        status: crate::status::Stored {
            last_heartbeat_ms: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            poll_interval_s: row.get::<_, Option<i64>>(6)?.map(|v| v as u32),
            cloudlink_enabled: row.get(7)?,
            ever_linked: row.get(8)?,
        },
        app_id: row.get::<_, Option<i64>>(9)?.map(|v| v as u32),
        has_device_api_key: row.get(10)?,
        rate_limit_kbps: row.get::<_, Option<i64>>(11)?.map(|v| v as u32),
    })
}

const DEVICE_COLUMNS: &str = "uuid, public_key, address, name, created_at, last_heartbeat_ms, poll_interval_s, cloudlink_enabled, ever_linked, app_id, device_api_key IS NOT NULL, rate_limit_kbps";

impl Registry {
    /// Opens (or creates) the registry in `dir/registry.sqlite3`.
    pub fn open(dir: &Path, plan: AddressPlan) -> Result<Self, RegistryError> {
        let path = dir.join("registry.sqlite3");
        let mut conn = open_conn(&path, false)?;
        crate::store::schema::migrate(&mut conn, &path)?;
        let stored: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'tunnel_cidr'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match stored {
            Some(s) if s != plan.net.to_string() => {
                return Err(RegistryError::CidrChanged {
                    stored: s,
                    configured: plan.net.to_string(),
                })
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('tunnel_cidr', ?1)",
                    [plan.net.to_string()],
                )?;
            }
        }
        let max: Option<i64> =
            conn.query_row("SELECT max(address) FROM devices", [], |r| r.get(0))?;
        let count: i64 = conn.query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
        let (next, wrapped) = match max {
            Some(m) if (m as u32) >= plan.last_device() => (plan.first_device(), true),
            Some(m) => ((m as u32 + 1).max(plan.first_device()), false),
            None => (plan.first_device(), false),
        };
        let reader = open_conn(&path, true)?;
        Ok(Registry {
            path,
            plan,
            writer: Mutex::new(Writer {
                conn,
                next,
                wrapped,
            }),
            reader: Mutex::new(reader),
            count: AtomicI64::new(count),
        })
    }

    /// The SQLite file (other stores of the gateway keep their tables there).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn plan(&self) -> AddressPlan {
        self.plan
    }

    /// Number of registered devices.
    pub fn count(&self) -> i64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Registers one device (fsync'd before it returns).
    pub fn register(&self, dev: NewDevice) -> Result<Registered, RegistryError> {
        let mut out = self.register_batch(vec![dev])?;
        Ok(out.pop().expect("one result per device"))
    }

    /// Registers many devices in one transaction (one fsync), answering per
    /// device. Conflicts inside the batch are judged in order.
    pub fn register_batch(&self, devs: Vec<NewDevice>) -> Result<Vec<Registered>, RegistryError> {
        let now = now_ms();
        let mut w = self.writer.lock();
        let Writer {
            conn,
            next,
            wrapped,
        } = &mut *w;
        // IMMEDIATE: other connections to the file write too (actions,
        // tokens, the audit trail). A deferred transaction that read first
        // gets SQLITE_BUSY at once when it tries to write after one of
        // them did, without waiting out the busy timeout; taking the write
        // lock at BEGIN waits instead.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(devs.len());
        let mut created = 0i64;
        let saved = (*next, *wrapped);
        {
            let mut by_uuid = tx.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid = ?1"
            ))?;
            let mut by_key = tx.prepare_cached("SELECT uuid FROM devices WHERE public_key = ?1")?;
            let mut addr_used = tx.prepare_cached("SELECT 1 FROM devices WHERE address = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO devices (uuid, public_key, address, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for dev in devs {
                if let Some(existing) = by_uuid.query_row([&dev.uuid], row_to_device).optional()? {
                    if existing.public_key == dev.public_key {
                        results.push(Registered::Existing(existing));
                    } else {
                        results.push(Registered::UuidTaken);
                    }
                    continue;
                }
                if let Some(uuid) = by_key
                    .query_row([&dev.public_key[..]], |r| r.get::<_, String>(0))
                    .optional()?
                {
                    results.push(Registered::KeyTaken { uuid });
                    continue;
                }
                let address = allocate(&self.plan, next, wrapped, &mut addr_used)?;
                insert.execute(params![
                    dev.uuid,
                    &dev.public_key[..],
                    u32::from(address) as i64,
                    dev.name,
                    now
                ])?;
                created += 1;
                results.push(Registered::Created(Device {
                    status: crate::status::Stored {
                        cloudlink_enabled: true,
                        ..Default::default()
                    },
                    app_id: None,
                    has_device_api_key: false,
                    rate_limit_kbps: None,
                    uuid: dev.uuid,
                    public_key: dev.public_key,
                    address,
                    name: dev.name,
                    created_at_ms: now,
                }));
            }
        }
        if let Err(e) = tx.commit() {
            // Nothing was stored: hand the addresses back.
            (*next, *wrapped) = saved;
            return Err(e.into());
        }
        self.count.fetch_add(created, Ordering::Relaxed);
        Ok(results)
    }

    /// Applies a patch in one transaction; returns the device as stored, or
    /// `None` if it does not exist.
    /// Applies `patch` in one transaction; the device before and after, or
    /// `None` if there is no such device.
    pub fn update(
        &self,
        uuid: &str,
        patch: &DevicePatch,
    ) -> Result<Option<(Device, Device)>, RegistryError> {
        let mut w = self.writer.lock();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let dev = {
            let mut get = tx.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid = ?1"
            ))?;
            let Some(before) = get.query_row([uuid], row_to_device).optional()? else {
                return Ok(None);
            };
            if let Some(key) = &patch.public_key {
                let holder: Option<String> = tx
                    .query_row(
                        "SELECT uuid FROM devices WHERE public_key = ?1 AND uuid != ?2",
                        params![&key[..], uuid],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(holder) = holder {
                    return Err(RegistryError::KeyTaken { uuid: holder });
                }
                tx.execute(
                    "UPDATE devices SET public_key = ?2 WHERE uuid = ?1",
                    params![uuid, &key[..]],
                )?;
            }
            if let Some(name) = &patch.name {
                tx.execute(
                    "UPDATE devices SET name = ?2 WHERE uuid = ?1",
                    params![uuid, name],
                )?;
            }
            if let Some(interval) = patch.poll_interval_s {
                tx.execute(
                    "UPDATE devices SET poll_interval_s = ?2 WHERE uuid = ?1",
                    params![uuid, interval.map(|v| v as i64)],
                )?;
            }
            if let Some(enabled) = patch.cloudlink_enabled {
                tx.execute(
                    "UPDATE devices SET cloudlink_enabled = ?2 WHERE uuid = ?1",
                    params![uuid, enabled],
                )?;
            }
            if let Some(key) = &patch.device_api_key {
                tx.execute(
                    "UPDATE devices SET device_api_key = ?2 WHERE uuid = ?1",
                    params![uuid, key],
                )?;
            }
            if let Some(app) = patch.app_id {
                tx.execute(
                    "UPDATE devices SET app_id = ?2 WHERE uuid = ?1",
                    params![uuid, app.map(|v| v as i64)],
                )?;
            }
            if let Some(limit) = patch.rate_limit_kbps {
                tx.execute(
                    "UPDATE devices SET rate_limit_kbps = ?2 WHERE uuid = ?1",
                    params![uuid, limit.map(|v| v as i64)],
                )?;
            }
            (before, get.query_row([uuid], row_to_device)?)
        };
        tx.commit()?;
        Ok(Some(dev))
    }

    /// Stores status inputs of many devices in one transaction. Rows of
    /// devices deleted meanwhile are simply not found.
    pub fn save_status(
        &self,
        rows: &[(String, crate::status::Stored)],
    ) -> Result<(), RegistryError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE devices SET last_heartbeat_ms = ?2, ever_linked = ?3 WHERE uuid = ?1",
            )?;
            for (uuid, s) in rows {
                st.execute(params![
                    uuid,
                    s.last_heartbeat_ms.map(|v| v as i64),
                    s.ever_linked
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the endpoints of devices whose link went up (`Some`) or
    /// down for good (`None`), in one transaction. A gateway stopping does
    /// not clear them: they are where it redials after the restart.
    pub fn save_endpoints(&self, rows: &[(Box<str>, Option<String>)]) -> Result<(), RegistryError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st =
                tx.prepare_cached("UPDATE devices SET last_endpoint = ?2 WHERE uuid = ?1")?;
            for (uuid, e) in rows {
                st.execute(params![&**uuid, e])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Devices that were connected when the gateway last stopped, with the
    /// endpoint they were last seen at.
    pub fn redial_targets(&self) -> Result<Vec<RedialTarget>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare(
            "SELECT public_key, last_endpoint FROM devices WHERE last_endpoint IS NOT NULL",
        )?;
        let rows = st.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (key, endpoint) = r?;
            let (Ok(public_key), Ok(endpoint)) =
                (KeyBytes::try_from(key.as_slice()), endpoint.parse())
            else {
                continue;
            };
            out.push(RedialTarget {
                public_key,
                endpoint,
            });
        }
        Ok(out)
    }

    /// Every device's key and identity, for the directory (blocking).
    pub fn for_each_identity(
        &self,
        mut f: impl FnMut(KeyBytes, crate::directory::Identity),
    ) -> Result<(), RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare("SELECT uuid, public_key, address FROM devices")?;
        let mut rows = st.query([])?;
        while let Some(row) = rows.next()? {
            let key: Vec<u8> = row.get(1)?;
            let Ok(key) = KeyBytes::try_from(key) else {
                continue;
            };
            f(
                key,
                crate::directory::Identity {
                    uuid: row.get::<_, String>(0)?.into_boxed_str(),
                    address: Ipv4Addr::from(row.get::<_, i64>(2)? as u32),
                },
            );
        }
        Ok(())
    }

    /// Calls `f` with the uuid and status inputs of every device (at start).
    pub fn for_each_status(
        &self,
        mut f: impl FnMut(&str, crate::status::Stored),
    ) -> Result<(), RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare(
            "SELECT uuid, last_heartbeat_ms, poll_interval_s, cloudlink_enabled, ever_linked FROM devices",
        )?;
        let mut rows = st.query([])?;
        while let Some(row) = rows.next()? {
            f(
                row.get_ref(0)?.as_str().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
                crate::status::Stored {
                    last_heartbeat_ms: row.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                    poll_interval_s: row.get::<_, Option<i64>>(2)?.map(|v| v as u32),
                    cloudlink_enabled: row.get(3)?,
                    ever_linked: row.get(4)?,
                },
            );
        }
        Ok(())
    }
}

impl Registry {
    /// Devices with a bandwidth limit of their own (few: most follow the
    /// gateway's default).
    pub fn rate_limits(&self) -> Result<Vec<(String, u32)>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached(
            "SELECT uuid, rate_limit_kbps FROM devices WHERE rate_limit_kbps IS NOT NULL",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u32))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// A device's stored supervisor API key and default application id.
pub type ActionDefaults = (Option<String>, Option<u32>);

impl Registry {
    /// The stored supervisor API key and default application id of a
    /// device (`None` if it does not exist). Only the action path reads the
    /// key.
    pub fn action_defaults(&self, uuid: &str) -> Result<Option<ActionDefaults>, RegistryError> {
        let r = self.reader.lock();
        let mut st =
            r.prepare_cached("SELECT device_api_key, app_id FROM devices WHERE uuid = ?1")?;
        Ok(st
            .query_row([uuid], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<i64>>(1)?.map(|v| v as u32),
                ))
            })
            .optional()?)
    }

    /// Deletes a device; returns it if it existed. Committed (fsync'd) before
    /// it returns.
    pub fn delete(&self, uuid: &str) -> Result<Option<Device>, RegistryError> {
        let w = self.writer.lock();
        let dev = w
            .conn
            .query_row(
                &format!("DELETE FROM devices WHERE uuid = ?1 RETURNING {DEVICE_COLUMNS}"),
                [uuid],
                row_to_device,
            )
            .optional()?;
        drop(w);
        if dev.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(dev)
    }

    /// The uuids starting with `prefix`, in order.
    pub fn uuids_with_prefix(&self, prefix: &str) -> Result<Vec<String>, RegistryError> {
        let r = self.reader.lock();
        // A range on the unique index: no LIKE, no escaping.
        let mut st = r.prepare_cached(
            "SELECT uuid FROM devices WHERE uuid >= ?1 AND substr(uuid, 1, length(?1)) = ?1 ORDER BY uuid",
        )?;
        let rows = st
            .query_map([prefix], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes `uuids` in one transaction; the devices that were there.
    pub fn delete_many(&self, uuids: &[String]) -> Result<Vec<Device>, RegistryError> {
        let mut w = self.writer.lock();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut gone = Vec::with_capacity(uuids.len());
        {
            let mut st = tx.prepare_cached(&format!(
                "DELETE FROM devices WHERE uuid = ?1 RETURNING {DEVICE_COLUMNS}"
            ))?;
            for u in uuids {
                if let Some(d) = st.query_row([u], row_to_device).optional()? {
                    gone.push(d);
                }
            }
        }
        tx.commit()?;
        drop(w);
        self.count.fetch_sub(gone.len() as i64, Ordering::Relaxed);
        Ok(gone)
    }

    /// Cluster mode: makes the local copy of `dev` what the cluster's
    /// registry says (insert or replace, address and settings included);
    /// a local row holding its key or address under another uuid (a change
    /// not applied yet) goes first. Returns the row it replaced.
    pub fn replica_upsert(
        &self,
        dev: &Device,
        device_api_key: Option<&str>,
    ) -> Result<Option<Device>, RegistryError> {
        let mut w = self.writer.lock();
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = tx
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid = ?1"),
                [&dev.uuid],
                row_to_device,
            )
            .optional()?;
        let evicted = tx.execute(
            "DELETE FROM devices WHERE (public_key = ?1 OR address = ?2) AND uuid != ?3",
            params![&dev.public_key[..], u32::from(dev.address) as i64, dev.uuid],
        )?;
        tx.execute(
            "INSERT INTO devices (uuid, public_key, address, name, created_at, poll_interval_s, cloudlink_enabled, app_id, device_api_key, rate_limit_kbps) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT(uuid) DO UPDATE SET public_key = ?2, address = ?3, name = ?4, created_at = ?5, \
             poll_interval_s = ?6, cloudlink_enabled = ?7, app_id = ?8, device_api_key = ?9, rate_limit_kbps = ?10",
            params![
                dev.uuid,
                &dev.public_key[..],
                u32::from(dev.address) as i64,
                dev.name,
                dev.created_at_ms,
                dev.status.poll_interval_s.map(|v| v as i64),
                dev.status.cloudlink_enabled,
                dev.app_id.map(|v| v as i64),
                device_api_key,
                dev.rate_limit_kbps.map(|v| v as i64),
            ],
        )?;
        tx.commit()?;
        drop(w);
        let added = i64::from(before.is_none()) - evicted as i64;
        self.count.fetch_add(added, Ordering::Relaxed);
        Ok(before)
    }

    /// Whether a device holds `address` here.
    pub fn address_taken(&self, address: Ipv4Addr) -> Result<bool, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached("SELECT 1 FROM devices WHERE address = ?1")?;
        Ok(st.exists([u32::from(address) as i64])?)
    }

    /// The highest tunnel address held here.
    pub fn max_address(&self) -> Result<Option<Ipv4Addr>, RegistryError> {
        let r = self.reader.lock();
        let m: Option<i64> = r.query_row("SELECT max(address) FROM devices", [], |r| r.get(0))?;
        Ok(m.map(|m| Ipv4Addr::from(m as u32)))
    }

    /// Every uuid in the local registry (cluster mode's initial sync).
    pub fn uuids(&self) -> Result<Vec<String>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare("SELECT uuid FROM devices")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        let r = self.reader.lock();
        Ok(
            r.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?,
        )
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), RegistryError> {
        self.writer.lock().conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn get(&self, uuid: &str) -> Result<Option<Device>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid = ?1"
        ))?;
        Ok(st.query_row([uuid], row_to_device).optional()?)
    }

    /// Devices in uuid order, strictly after `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Device>, RegistryError> {
        self.list_matching(after, limit, None)
    }

    /// Like [`list`](Self::list), keeping devices whose uuid or name contains
    /// `q` (ASCII case-insensitive), when given.
    pub fn list_matching(
        &self,
        after: Option<&str>,
        limit: usize,
        q: Option<&str>,
    ) -> Result<Vec<Device>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid > ?1 \
             AND (?3 IS NULL OR uuid LIKE ?3 ESCAPE '\\' OR name LIKE ?3 ESCAPE '\\') \
             ORDER BY uuid LIMIT ?2"
        ))?;
        let rows = st.query_map(
            params![after.unwrap_or(""), limit as i64, q.map(like_pattern)],
            row_to_device,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Calls `f(uuid, name, created_at_ms)` for every device whose uuid
    /// or name contains `q` (all devices without `q`), in no set order. One
    /// pass over the table: what sorted listings are built from.
    pub fn for_each_listed(
        &self,
        q: Option<&str>,
        mut f: impl FnMut(&str, Option<&str>, i64),
    ) -> Result<(), RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached(
            "SELECT uuid, name, created_at FROM devices \
             WHERE ?1 IS NULL OR uuid LIKE ?1 ESCAPE '\\' OR name LIKE ?1 ESCAPE '\\'",
        )?;
        let mut rows = st.query(params![q.map(like_pattern)])?;
        while let Some(row) = rows.next()? {
            let text = |i: usize, e: rusqlite::types::FromSqlError| {
                rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
            };
            let uuid = row.get_ref(0)?.as_str().map_err(|e| text(0, e))?;
            let name = row.get_ref(1)?.as_str_or_null().map_err(|e| text(1, e))?;
            f(uuid, name, row.get(2)?);
        }
        Ok(())
    }

    /// Device records for the given uuids, in that order (unknown ones left
    /// out).
    pub fn get_many(&self, uuids: &[String]) -> Result<Vec<Device>, RegistryError> {
        let r = self.reader.lock();
        let mut st = r.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE uuid = ?1"
        ))?;
        let mut out = Vec::with_capacity(uuids.len());
        for u in uuids {
            if let Some(d) = st.query_row([u], row_to_device).optional()? {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// A LIKE pattern matching `q` anywhere, with `%`, `_` and `\` taken
/// literally.
fn like_pattern(q: &str) -> String {
    let mut p = String::with_capacity(q.len() + 2);
    p.push('%');
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn allocate(
    plan: &AddressPlan,
    next: &mut u32,
    wrapped: &mut bool,
    addr_used: &mut rusqlite::CachedStatement<'_>,
) -> Result<Ipv4Addr, RegistryError> {
    let span = plan.last_device() - plan.first_device() + 1;
    for _ in 0..=span {
        if *next > plan.last_device() {
            *next = plan.first_device();
            *wrapped = true;
        }
        let candidate = *next;
        *next += 1;
        if *wrapped && addr_used.exists([candidate as i64])? {
            continue;
        }
        return Ok(Ipv4Addr::from(candidate));
    }
    Err(RegistryError::CidrExhausted(plan.net.to_string()))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(s: &str) -> AddressPlan {
        AddressPlan::new(s.parse().unwrap()).unwrap()
    }

    fn dev(uuid: &str, k: u8) -> NewDevice {
        NewDevice {
            uuid: uuid.into(),
            public_key: [k; 32],
            name: None,
        }
    }

    #[test]
    fn register_is_idempotent_and_conflicts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path(), plan("10.240.0.0/12")).unwrap();
        let Registered::Created(a) = r.register(dev("a", 1)).unwrap() else {
            panic!()
        };
        assert_eq!(a.address, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(
            r.register(dev("a", 1)).unwrap(),
            Registered::Existing(a.clone())
        );
        assert_eq!(r.register(dev("a", 2)).unwrap(), Registered::UuidTaken);
        assert_eq!(
            r.register(dev("b", 1)).unwrap(),
            Registered::KeyTaken { uuid: "a".into() }
        );
        let Registered::Created(b) = r.register(dev("b", 2)).unwrap() else {
            panic!()
        };
        assert_eq!(b.address, Ipv4Addr::new(10, 240, 0, 3));
        assert_eq!(r.count(), 2);
        let mut keys = Vec::new();
        r.for_each_identity(|k, id| keys.push((k, id.uuid.to_string())))
            .unwrap();
        keys.sort();
        assert_eq!(keys, vec![([1; 32], "a".into()), ([2; 32], "b".into())]);
    }

    #[test]
    fn batch_judges_conflicts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path(), plan("10.0.0.0/24")).unwrap();
        let out = r
            .register_batch(vec![dev("x", 1), dev("y", 1), dev("x", 3), dev("z", 4)])
            .unwrap();
        assert!(matches!(out[0], Registered::Created(_)));
        assert_eq!(out[1], Registered::KeyTaken { uuid: "x".into() });
        assert_eq!(out[2], Registered::UuidTaken);
        assert!(matches!(out[3], Registered::Created(_)));
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn survives_an_unclean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path(), plan("10.240.0.0/12")).unwrap();
        r.register(dev("kept", 7)).unwrap();
        // No clean close: the connections are leaked as a killed process
        // would leave them (the WAL is not checkpointed).
        std::mem::forget(r);
        let r = Registry::open(dir.path(), plan("10.240.0.0/12")).unwrap();
        assert_eq!(r.count(), 1);
        let d = r.get("kept").unwrap().unwrap();
        assert_eq!(d.public_key, [7; 32]);
        // The next address continues after the existing ones.
        let Registered::Created(n) = r.register(dev("new", 8)).unwrap() else {
            panic!()
        };
        assert_eq!(n.address, Ipv4Addr::new(10, 240, 0, 3));
    }

    #[test]
    fn cidr_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Registry::open(dir.path(), plan("10.240.0.0/12")).unwrap());
        let err = Registry::open(dir.path(), plan("10.0.0.0/16"))
            .err()
            .unwrap();
        assert!(matches!(err, RegistryError::CidrChanged { .. }));
    }

    #[test]
    fn addresses_are_reused_only_after_wrapping_and_exhaustion_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // /29: network .0, gateway .1, devices .2 to .6, broadcast .7
        let r = Registry::open(dir.path(), plan("10.9.0.0/29")).unwrap();
        for i in 0..5u8 {
            r.register(dev(&format!("d{i}"), i + 1)).unwrap();
        }
        assert!(matches!(
            r.register(dev("extra", 99)),
            Err(RegistryError::CidrExhausted(_))
        ));
        r.delete("d1").unwrap().unwrap();
        let Registered::Created(n) = r.register(dev("extra", 99)).unwrap() else {
            panic!()
        };
        assert_eq!(n.address, Ipv4Addr::new(10, 9, 0, 3));
        assert!(r
            .list(None, 100)
            .unwrap()
            .windows(2)
            .all(|w| w[0].uuid < w[1].uuid));
    }

    #[test]
    fn validation() {
        assert!(validate_uuid("abc-123").is_ok());
        assert!(validate_uuid("").is_err());
        assert!(validate_uuid("ABC").is_err());
        assert!(validate_uuid(&"a".repeat(64)).is_err());
        assert!(validate_uuid(&"a".repeat(63)).is_ok());
        assert!(validate_name("kiosk 12").is_ok());
        assert!(validate_name("bad\nname").is_err());
        assert!(validate_name("kiosk\u{202E}gpj.exe").is_err());
        assert!(validate_name("zero\u{200B}width").is_err());
        assert!(validate_name("Kühlschrank 北").is_ok());
        assert!(validate_new_uuid("-abc").is_err());
        assert!(validate_new_uuid("---").is_err());
        assert!(validate_new_uuid("a--").is_ok());
        assert!(validate_uuid("-abc").is_ok());
    }
}
