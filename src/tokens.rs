//! Scoped API tokens (issue "Hold up under abuse"): a token per internal
//! service and a read-only one for dashboards and scrapers, instead of one
//! shared secret that is the API, the proxy and the dashboard.
//!
//! - Scopes: `read` (listing, devices, events, summary, the dashboard's
//!   view), `actions` (immediate and queued actions), `relay` (the CONNECT
//!   proxy), `admin` (everything: registrations, changes, deletions, tokens).
//!   The bootstrap token (`--token` / `--token-file`) is `admin`.
//! - A token is `clt_<id>_<secret>`; the gateway keeps its id, name, scopes,
//!   times and a hash of the secret (BLAKE2s: the secret is 192 random bits,
//!   so a fast hash is enough). The secret is shown once, at creation.
//! - Revocation takes effect at once: every check reads the in-memory table,
//!   which a deletion changes before it answers (and, in cluster mode, every
//!   gateway's watch of the KV bucket `cloudlink_tokens` within
//!   milliseconds).
//!
//! Alone the table persists in SQLite (`tokens`); in cluster mode in NATS.

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// What a grant allows, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Read = 1,
    Actions = 2,
    Relay = 4,
    Admin = 8,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Actions, Scope::Relay, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Actions => "actions",
            Scope::Relay => "relay",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Who a request is: the token's id (`None` for the bootstrap token) and
/// its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token_id: Option<String>,
    pub scopes: u8,
}

impl Grant {
    /// The bootstrap token's grant.
    pub fn admin() -> Grant {
        Grant {
            token_id: None,
            scopes: Scope::Admin as u8,
        }
    }

    /// Whether it may do what `need` covers (`admin` may do everything).
    pub fn allows(&self, need: Scope) -> bool {
        self.scopes & (need as u8 | Scope::Admin as u8) != 0
    }

    pub fn scope_names(&self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.scopes & *s as u8 != 0)
            .map(Scope::as_str)
            .collect()
    }
}

/// A stored token (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub scopes: u8,
    /// BLAKE2s of the secret, hex.
    pub hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

impl TokenRecord {
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: i64| {
            crate::bus::event::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
        };
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "scopes": Grant { token_id: None, scopes: self.scopes }.scope_names(),
            "created_at": t(self.created_at_ms),
            "expires_at": self.expires_at_ms.map(t),
        })
    }

    /// Parses a record another gateway wrote; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<TokenRecord> {
        let r: TokenRecord = serde_json::from_slice(bytes).ok()?;
        (is_id(&r.id) && r.hash.len() == 64 && r.scopes & 0xF0 == 0).then_some(r)
    }
}

/// Splits `clt_<id>_<secret>`. Total: any input gets an answer.
pub fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("clt_")?;
    let (id, secret) = rest.split_once('_')?;
    (is_id(id) && secret.len() == 48 && secret.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((id, secret))
}

fn is_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hash(secret: &str) -> String {
    use blake2::Digest;
    blake2::Blake2s256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the table lives: SQLite alone, a NATS KV bucket in cluster mode.
#[derive(Clone)]
pub enum TokenStore {
    Sqlite(Arc<SqliteTokens>),
    Nats(Box<async_nats::jetstream::kv::Store>),
}

impl TokenStore {
    async fn put(&self, r: &TokenRecord) -> Result<(), String> {
        match self {
            TokenStore::Sqlite(s) => {
                let (s, r) = (s.clone(), r.clone());
                tokio::task::spawn_blocking(move || s.put(&r))
                    .await
                    .map_err(|e| e.to_string())?
            }
            TokenStore::Nats(kv) => kv
                .put(
                    format!("t.{}", r.id),
                    serde_json::to_vec(r).unwrap_or_default().into(),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), String> {
        match self {
            TokenStore::Sqlite(s) => {
                let (s, id) = (s.clone(), id.to_owned());
                tokio::task::spawn_blocking(move || s.delete(&id))
                    .await
                    .map_err(|e| e.to_string())?
            }
            TokenStore::Nats(kv) => kv
                .delete(format!("t.{id}"))
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// The token table: the bootstrap token and the issued ones.
pub struct Tokens {
    bootstrap: String,
    table: RwLock<HashMap<String, TokenRecord>>,
    store: RwLock<Option<TokenStore>>,
}

/// At most this many tokens (a token is for a service or a person, not a
/// device).
pub const MAX_TOKENS: usize = 1000;

impl Tokens {
    pub fn new(bootstrap: String, records: Vec<TokenRecord>) -> Tokens {
        Tokens {
            bootstrap,
            table: RwLock::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            store: RwLock::new(None),
        }
    }

    /// Where created and deleted tokens are written (SQLite alone, NATS in
    /// cluster mode).
    pub fn set_store(&self, store: TokenStore) {
        *self.store.write() = Some(store);
    }

    /// The grant of `presented`, if it is a valid token now.
    pub fn check(&self, presented: &str, now_ms: i64) -> Option<Grant> {
        let presented = presented.trim();
        if crate::auth::token_matches(presented, &self.bootstrap) {
            return Some(Grant::admin());
        }
        let (id, secret) = split(presented)?;
        let t = self.table.read();
        let r = t.get(id)?;
        let ok = crate::auth::token_matches(&hash(secret), &r.hash)
            && r.expires_at_ms.is_none_or(|e| e > now_ms);
        ok.then(|| Grant {
            token_id: Some(r.id.clone()),
            scopes: r.scopes,
        })
    }

    /// Whether the token behind a grant (a dashboard session's) still
    /// stands: not revoked, not expired.
    pub fn still_valid(&self, grant: &Grant, now_ms: i64) -> bool {
        match &grant.token_id {
            None => true,
            Some(id) => self
                .table
                .read()
                .get(id)
                .is_some_and(|r| r.expires_at_ms.is_none_or(|e| e > now_ms)),
        }
    }

    /// Issues a token; (its record, the secret token, shown once).
    pub async fn create(
        &self,
        name: &str,
        scopes: u8,
        expires_in_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(TokenRecord, String), TokenError> {
        if self.table.read().len() >= MAX_TOKENS {
            return Err(TokenError::TooMany);
        }
        let id = random_hex(8);
        let secret = random_hex(24);
        let r = TokenRecord {
            id: id.clone(),
            name: name.to_owned(),
            scopes,
            hash: hash(&secret),
            created_at_ms: now_ms,
            expires_at_ms: expires_in_ms.map(|d| now_ms + d),
        };
        let store = self.store.read().clone();
        if let Some(s) = store {
            s.put(&r).await.map_err(TokenError::Store)?;
        }
        self.table.write().insert(id.clone(), r.clone());
        Ok((r, format!("clt_{id}_{secret}")))
    }

    /// Revokes a token: from the next request on it is refused.
    pub async fn delete(&self, id: &str) -> Result<bool, TokenError> {
        if !self.table.read().contains_key(id) {
            return Ok(false);
        }
        let store = self.store.read().clone();
        if let Some(s) = store {
            s.delete(id).await.map_err(TokenError::Store)?;
        }
        // (In cluster mode this gateway's own watch may have removed it
        // already.)
        self.table.write().remove(id);
        Ok(true)
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        let mut v: Vec<_> = self.table.read().values().cloned().collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// Another gateway's change (cluster mode's watch).
    pub fn apply(&self, id: &str, record: Option<TokenRecord>) {
        let mut t = self.table.write();
        match record {
            Some(r) => {
                t.insert(id.to_owned(), r);
            }
            None => {
                t.remove(id);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("at most {MAX_TOKENS} tokens; delete some first")]
    TooMany,
    #[error("the token could not be stored: {0}")]
    Store(String),
}

/// The SQLite table (alone).
pub struct SqliteTokens {
    conn: parking_lot::Mutex<rusqlite::Connection>,
}

impl SqliteTokens {
    /// Opens the table and reads it.
    pub fn open(
        registry: &crate::registry::Registry,
    ) -> Result<(SqliteTokens, Vec<TokenRecord>), crate::registry::RegistryError> {
        let conn = crate::registry::open_conn(registry.path(), false)?;
        let records = {
            let mut st = conn.prepare(
                "SELECT id, name, scopes, hash, created_at, expires_at FROM tokens ORDER BY created_at",
            )?;
            let rows = st.query_map([], |r| {
                Ok(TokenRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    scopes: r.get::<_, i64>(2)? as u8,
                    hash: r.get(3)?,
                    created_at_ms: r.get(4)?,
                    expires_at_ms: r.get(5)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        Ok((
            SqliteTokens {
                conn: parking_lot::Mutex::new(conn),
            },
            records,
        ))
    }
}

impl SqliteTokens {
    fn put(&self, r: &TokenRecord) -> Result<(), String> {
        self.conn
            .lock()
            .execute(
                "INSERT OR REPLACE INTO tokens (id, name, scopes, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![r.id, r.name, r.scopes as i64, r.hash, r.created_at_ms, r.expires_at_ms],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn delete(&self, id: &str) -> Result<(), String> {
        self.conn
            .lock()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_check_scope_expire_and_revoke() {
        let t = Tokens::new("bootstrap-token-0123456789".into(), vec![]);
        assert_eq!(
            t.check("bootstrap-token-0123456789", 0),
            Some(Grant::admin())
        );
        let (r, secret) = t
            .create("scraper", Scope::Read as u8, Some(1000), 0)
            .await
            .unwrap();
        let g = t.check(&secret, 10).unwrap();
        assert_eq!(g.token_id.as_deref(), Some(r.id.as_str()));
        assert!(g.allows(Scope::Read) && !g.allows(Scope::Actions) && !g.allows(Scope::Admin));
        assert!(Grant::admin().allows(Scope::Relay));
        // Expired, then revoked.
        assert_eq!(t.check(&secret, 1000), None);
        let (r2, s2) = t
            .create("ops", Scope::Actions as u8 | Scope::Relay as u8, None, 0)
            .await
            .unwrap();
        assert!(t.check(&s2, 5).is_some());
        assert!(t.delete(&r2.id).await.unwrap());
        assert_eq!(t.check(&s2, 5), None);
        assert!(!t.delete(&r2.id).await.unwrap());
        // A wrong secret for a valid id, and shapes that are not tokens.
        let (id, _) = split(&secret).unwrap();
        assert_eq!(t.check(&format!("clt_{id}_{}", "0".repeat(48)), 10), None);
        for bad in ["", "clt_", "clt_x_y", "clt__", &"a".repeat(4096)] {
            assert_eq!(t.check(bad, 0), None);
        }
    }

    #[test]
    fn records_from_other_gateways_parse_only_their_shape() {
        let r = TokenRecord {
            id: "0123456789abcdef".into(),
            name: "n".into(),
            scopes: 1,
            hash: "a".repeat(64),
            created_at_ms: 1,
            expires_at_ms: None,
        };
        assert_eq!(
            TokenRecord::parse(&serde_json::to_vec(&r).unwrap()),
            Some(r)
        );
        assert_eq!(TokenRecord::parse(b"{}"), None);
        assert_eq!(TokenRecord::parse(b"\xff"), None);
    }
}
