//! `GET /v1/devices`: the device listing, filtered, searched and sorted on
//! the server, in pages with a cursor (the dashboard never loads a fleet
//! at once).
//!
//! - `status=` / `status_detail=`: derived status filters.
//! - `q=`: uuid or name contains this text (ASCII case-insensitive).
//! - `sort=`: a column, `-` in front for descending. `uuid` (the default)
//!   pages through the registry's index; every other column is computed
//!   per request in one pass over the devices matching `q`, keeping only
//!   the page (a bounded heap), so a request costs O(devices) time and
//!   O(page) memory.
//! - `limit=` (1..1000, default 100) and `after=`: the `next` of the
//!   previous page. Under the default sort it is the last uuid; under other
//!   sorts an opaque cursor that names its sort.
//!
//! Live columns (status, bytes, endpoint) move between requests, so a
//! device can show up on two pages or none while it changes: the usual
//! trade of cursor paging over live data, which the dashboard offsets by
//! updating rows from the event stream.

use axum::extract::{Query, State};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::devices::{cloudlink_json, registration_json, status_fields};
use super::{blocking, ApiError, SharedState};
use crate::registry::Device;
use crate::status::Status;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Rows a status-filtered listing in uuid order looks at per request.
const SCAN_BUDGET: usize = 20_000;
/// Longest search text.
const MAX_Q: usize = 128;

/// Columns the listing sorts by.
pub const SORTS: [&str; 10] = [
    "uuid",
    "name",
    "status",
    "heartbeat",
    "cloudlink",
    "endpoint",
    "connected_since",
    "rx_bytes",
    "tx_bytes",
    "created_at",
];

/// A sort key; `Null` (no value: never connected, no name...) sorts first
/// ascending.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Key {
    Null,
    Int(i64),
    Str(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cursor {
    /// The sort this cursor belongs to (with its `-`).
    s: String,
    k: Key,
    u: String,
}

/// Problems first: ascending status puts the devices that need a look at
/// the top.
fn status_rank(s: Status) -> i64 {
    match s {
        Status::Disconnected => 0,
        Status::HeartbeatOnly => 1,
        Status::CloudlinkOnly => 2,
        Status::HeartbeatTimeout => 3,
        Status::Configuring => 4,
        Status::Operational => 5,
    }
}

struct Filter {
    status: Option<String>,
    detail: Option<String>,
}

impl Filter {
    fn active(&self) -> bool {
        self.status.is_some() || self.detail.is_some()
    }
    fn keeps(&self, s: Status) -> bool {
        self.status.as_deref().is_none_or(|st| s.name() == st)
            && self
                .detail
                .as_deref()
                .is_none_or(|dt| s.detail() == Some(dt))
    }
}

fn parse_query(
    q: &HashMap<String, String>,
) -> Result<(usize, Filter, Option<String>, String, bool), ApiError> {
    for k in q.keys() {
        if !matches!(
            k.as_str(),
            "limit" | "after" | "status" | "status_detail" | "q" | "sort"
        ) {
            return Err(ApiError::bad_field(
                k.clone(),
                format!("unknown query parameter {k:?}; the listing takes limit, after, status, status_detail, q and sort"),
            ));
        }
    }
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_field(
                    "limit",
                    format!("limit must be a whole number from 1 to {MAX_PAGE}"),
                ))
            }
        },
    };
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(v) if Status::NAMES.contains(&v) => Some(v.to_string()),
        Some(_) => {
            return Err(ApiError::bad_field(
                "status",
                format!("status is one of {}", Status::NAMES.join(", ")),
            ))
        }
    };
    let details: Vec<&str> = Status::ALL.iter().filter_map(|s| s.detail()).collect();
    let detail = match q.get("status_detail").map(String::as_str) {
        None | Some("") => None,
        Some(v) if details.contains(&v) => Some(v.to_string()),
        Some(_) => {
            return Err(ApiError::bad_field(
                "status_detail",
                format!("status_detail is one of {}", details.join(", ")),
            ))
        }
    };
    let text = match q.get("q").map(|v| v.trim()) {
        None | Some("") => None,
        Some(v) if v.len() <= MAX_Q && !v.chars().any(char::is_control) => Some(v.to_string()),
        Some(_) => {
            return Err(ApiError::bad_field(
                "q",
                format!("q is a search text of at most {MAX_Q} bytes, without control characters"),
            ))
        }
    };
    let sort = q.get("sort").map(String::as_str).unwrap_or("uuid");
    let (column, desc) = match sort.strip_prefix('-') {
        Some(c) => (c, true),
        None => (sort, false),
    };
    if !SORTS.contains(&column) {
        return Err(ApiError::bad_field(
            "sort",
            format!(
                "sort is one of {} (a leading - sorts descending)",
                SORTS.join(", ")
            ),
        ));
    }
    Ok((
        limit,
        Filter { status, detail },
        text,
        column.to_string(),
        desc,
    ))
}

/// `GET /v1/devices?limit=&after=&status=&status_detail=&q=&sort=`
pub async fn list(
    State(s): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, filter, text, column, desc) = parse_query(&q)?;
    let after = q.get("after").filter(|a| !a.is_empty()).cloned();
    // Read as_of before the state: every event up to it is reflected below
    // (events are published after the change they announce).
    let as_of = s.events.as_of();
    let (page, next) = if column == "uuid" && !desc {
        by_uuid(&s, limit, &filter, text, after).await?
    } else {
        sorted(&s, limit, &filter, text, &column, desc, after).await?
    };
    let devices: Vec<Value> = page
        .iter()
        .map(|d| {
            let mut m = registration_json(d);
            status_fields(&s, d, &mut m);
            m.insert("cloudlink".into(), cloudlink_json(&s, &d.uuid));
            Value::Object(m)
        })
        .collect();
    Ok(Json(
        json!({"devices": devices, "next": next, "as_of": as_of}),
    ))
}

/// uuid order from the registry's index. A status filter scans in that
/// order and keeps what matches, at most SCAN_BUDGET rows per request: when
/// the budget runs out first the page is short (maybe empty) and `next`
/// says where to go on, so no request costs more than that however rare
/// the matches.
async fn by_uuid(
    s: &SharedState,
    limit: usize,
    filter: &Filter,
    text: Option<String>,
    mut after: Option<String>,
) -> Result<(Vec<Device>, Option<String>), ApiError> {
    let mut page = Vec::with_capacity(limit);
    let mut scanned = 0usize;
    let mut exhausted = false;
    while page.len() < limit && scanned < SCAN_BUDGET {
        let chunk = if filter.active() {
            MAX_PAGE
        } else {
            limit - page.len()
        };
        let registry = s.registry.clone();
        let from = after.clone();
        let text = text.clone();
        let rows =
            blocking(move || registry.list_matching(from.as_deref(), chunk, text.as_deref()))
                .await?;
        let short = rows.len() < chunk;
        for d in rows {
            if page.len() == limit {
                break;
            }
            scanned += 1;
            after = Some(d.uuid.clone());
            let keep = !filter.active()
                || s.status
                    .view(&d.uuid)
                    .is_some_and(|v| filter.keeps(v.status));
            if keep {
                page.push(d);
            }
        }
        if short && page.len() < limit {
            exhausted = true;
            break;
        }
    }
    Ok((page, if exhausted { None } else { after }))
}

/// One entry of the page being built: ordered by (key, uuid), reversed for
/// descending sorts.
struct Entry {
    key: Key,
    uuid: String,
    desc: bool,
}

impl Entry {
    fn cmp_plain(&self, other: &Entry) -> Ordering {
        self.key
            .cmp(&other.key)
            .then_with(|| self.uuid.cmp(&other.uuid))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        let o = self.cmp_plain(other);
        if self.desc {
            o.reverse()
        } else {
            o
        }
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}

fn millis(t: Option<std::time::SystemTime>) -> Key {
    match t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        Some(d) => Key::Int(d.as_millis() as i64),
        None => Key::Null,
    }
}

async fn sorted(
    s: &SharedState,
    limit: usize,
    filter: &Filter,
    text: Option<String>,
    column: &str,
    desc: bool,
    after: Option<String>,
) -> Result<(Vec<Device>, Option<String>), ApiError> {
    let sort_name = if desc {
        format!("-{column}")
    } else {
        column.to_string()
    };
    let start = match after {
        None => None,
        Some(a) => {
            let bad = || {
                ApiError::bad_field(
                    "after",
                    format!("after must be the `next` of a previous page sorted by {sort_name}"),
                )
            };
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(a.as_bytes())
                .map_err(|_| bad())?;
            let c: Cursor = serde_json::from_slice(&raw).map_err(|_| bad())?;
            if c.s != sort_name {
                return Err(bad());
            }
            Some(Entry {
                key: c.k,
                uuid: c.u,
                desc,
            })
        }
    };
    let s2 = s.clone();
    let column = column.to_string();
    let status_filter = Filter {
        status: filter.status.clone(),
        detail: filter.detail.clone(),
    };
    // One pass on a blocking thread: the registry read, the status and
    // session lookups, and a heap of at most `limit + 1` entries.
    let (entries, more) = blocking(move || {
        let mut heap: BinaryHeap<Entry> = BinaryHeap::with_capacity(limit + 1);
        let mut more = false;
        s2.registry
            .for_each_listed(text.as_deref(), |uuid, name, created| {
                let view = s2.status.view(uuid);
                if status_filter.active() && !view.is_some_and(|v| status_filter.keeps(v.status)) {
                    return;
                }
                // A session here, unless the device is held elsewhere
                // (cluster mode): then what its owner shared.
                let owner = s2
                    .cluster
                    .as_ref()
                    .and_then(|c| c.ownership.owner(uuid))
                    .filter(|o| o.record.gateway != s2.gateway_id);
                let session = || {
                    s2.path
                        .sessions
                        .by_uuid(uuid)
                        .map(|x| x.snapshot())
                        .filter(|_| owner.is_none())
                };
                let remote = || {
                    let o = owner.as_ref()?;
                    s2.cluster.as_ref()?.counters.get(uuid, &o.record.gateway)
                };
                let key = match column.as_str() {
                    "name" => name.map_or(Key::Null, |n| Key::Str(n.to_lowercase())),
                    "status" => view.map_or(Key::Null, |v| Key::Int(status_rank(v.status))),
                    "heartbeat" => view
                        .and_then(|v| v.last_heartbeat_ms)
                        .map_or(Key::Null, |ms| Key::Int(ms as i64)),
                    "cloudlink" => Key::Int(view.is_some_and(|v| v.link_up) as i64),
                    "endpoint" => match &owner {
                        Some(o) => Key::Str(o.record.endpoint.clone()),
                        None => session()
                            .filter(|x| x.connected)
                            .map_or(Key::Null, |x| Key::Str(x.endpoint.to_string())),
                    },
                    "connected_since" => match &owner {
                        Some(o) => humantime::parse_rfc3339(&o.record.since)
                            .ok()
                            .map_or(Key::Null, |t| millis(Some(t))),
                        None => millis(session().filter(|x| x.connected).and_then(|x| x.since)),
                    },
                    "rx_bytes" => Key::Int(match &owner {
                        Some(_) => remote().map_or(0, |c| c.rx_bytes),
                        None => session().map_or(0, |x| x.rx_bytes),
                    } as i64),
                    "tx_bytes" => Key::Int(match &owner {
                        Some(_) => remote().map_or(0, |c| c.tx_bytes),
                        None => session().map_or(0, |x| x.tx_bytes),
                    } as i64),
                    _ => Key::Int(created),
                };
                let e = Entry {
                    key,
                    uuid: uuid.to_string(),
                    desc,
                };
                if start.as_ref().is_some_and(|st| e <= *st) {
                    return;
                }
                // Keep the `limit` first entries; one more tells whether a next
                // page exists.
                if heap.len() <= limit {
                    heap.push(e);
                } else if e < *heap.peek().expect("non-empty") {
                    heap.pop();
                    heap.push(e);
                    more = true;
                } else {
                    more = true;
                }
            })?;
        let mut v = heap.into_sorted_vec();
        if v.len() > limit {
            v.truncate(limit);
            more = true;
        }
        Ok::<_, crate::registry::RegistryError>((v, more))
    })
    .await?;
    let next = match (more, entries.last()) {
        (true, Some(last)) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
                serde_json::to_vec(&Cursor {
                    s: sort_name,
                    k: last.key.clone(),
                    u: last.uuid.clone(),
                })
                .expect("a cursor serialises"),
            ),
        ),
        _ => None,
    };
    let uuids: Vec<String> = entries.into_iter().map(|e| e.uuid).collect();
    let registry = s.registry.clone();
    let page = blocking(move || registry.get_many(&uuids)).await?;
    Ok((page, next))
}
