//! The session table: every device that completed a handshake since it was
//! last forgotten, with its boringtun `Tunn`, link state and counters.
//!
//! Indexed four ways, each a `DashMap` (sharded locks, no global lock):
//! - by **key index** (24 bits): a transport packet's `receiver_idx >> 8`
//!   names its session in O(1) — the hot path;
//! - by **public key**: a handshake initiation finds the device's session;
//! - by **uuid** and by **tunnel address**: other modules (API, relay,
//!   actions) reach a device.
//!
//! A session is created on a device's first valid handshake, not at
//! registration, and removed when the device is deleted, when boringtun
//! declares the connection expired (no new keys for 9 minutes), or at
//! shutdown. A link that timed out keeps its session until then, so a device
//! that was only silent comes back up with its next packet, without a new
//! handshake.
//!
//! Lock order: a map shard, then a session's `state`, then the event hub.
//! Nothing takes a shard lock while it holds a session's `state`.

use boringtun::noise::Tunn;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::keys::KeyBytes;
use crate::link_state::LinkState;

/// 24-bit session index space of boringtun (`index << 8 | session`).
const INDEX_SPACE: u32 = 1 << 24;

/// One device's tunnel.
pub struct Session {
    /// The 24-bit index given to boringtun; `receiver_idx >> 8` on the wire.
    pub index: u32,
    pub uuid: Box<str>,
    pub public_key: KeyBytes,
    pub address: Ipv4Addr,
    /// Per-session lock: boringtun's `Tunn` needs `&mut` for every packet.
    /// Held only for one packet's crypto and bookkeeping, never across
    /// `.await`, and it serialises one device only.
    pub state: Mutex<SessionState>,
}

pub struct SessionState {
    pub tunn: Tunn,
    pub link: LinkState,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake_at: Option<SystemTime>,
    /// Wall-clock time the link last came up.
    pub connected_since: Option<SystemTime>,
    /// The hint entered for the device's last initiation (see
    /// [`SessionTable::hint`]).
    pub hinted: Option<HintKey>,
    /// Kept under the lock the packet path holds anyway: no atomic per
    /// packet, and only authenticated datagrams count.
    pub traffic: Traffic,
}

/// Where a handshake initiation came from, and its sender's index prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HintKey {
    pub endpoint: std::net::SocketAddr,
    pub index_prefix: u32,
}

/// Counters of WireGuard datagrams to and from the device (bytes on the
/// wire). Received datagrams count once they authenticated: junk naming a
/// session's index moves nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl Traffic {
    #[inline]
    pub(crate) fn rx(&mut self, bytes: usize) {
        self.rx_bytes += bytes as u64;
        self.rx_packets += 1;
    }
    #[inline]
    pub(crate) fn tx(&mut self, bytes: usize) {
        self.tx_bytes += bytes as u64;
        self.tx_packets += 1;
    }
}

/// A consistent copy of what the API shows of a session.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub connected: bool,
    pub since: Option<SystemTime>,
    pub endpoint: SocketAddr,
    pub last_handshake_at: Option<SystemTime>,
    pub last_packet_at: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl Session {
    pub fn snapshot(&self) -> SessionSnapshot {
        let st = self.state.lock();
        SessionSnapshot {
            connected: st.link.is_up(),
            since: st.connected_since,
            endpoint: st.link.endpoint(),
            last_handshake_at: st.last_handshake_at,
            last_packet_at: st.link.last_authenticated().map(instant_to_wall),
            rx_bytes: st.traffic.rx_bytes,
            tx_bytes: st.traffic.tx_bytes,
            rx_packets: st.traffic.rx_packets,
            tx_packets: st.traffic.tx_packets,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.lock().link.is_up()
    }
}

/// Converts a monotonic instant of the past to wall-clock time.
pub fn instant_to_wall(t: Instant) -> SystemTime {
    SystemTime::now() - Instant::now().saturating_duration_since(t)
}

/// Fibonacci hashing of a 24-bit session index: one multiplication.
#[derive(Default, Clone, Copy)]
pub struct IndexHash;

impl std::hash::BuildHasher for IndexHash {
    type Hasher = IndexHasher;
    fn build_hasher(&self) -> IndexHasher {
        IndexHasher(0)
    }
}

pub struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = (i as u64 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Sessions at one endpoint: how many, and the one that came last.
#[derive(Debug, Clone, Copy)]
struct EndpointUse {
    count: u32,
    last: u32,
}

impl SessionTable {
    fn endpoint_arrived(&self, endpoint: std::net::SocketAddr, index: u32) {
        let mut e = self.by_endpoint.entry(endpoint).or_insert(EndpointUse {
            count: 0,
            last: index,
        });
        e.count += 1;
        e.last = index;
    }
}

#[derive(Default)]
pub struct SessionTable {
    /// Keyed by indices the gateway hands out itself (sequential from a
    /// random start), so an unkeyed multiplicative hash is safe here and
    /// spares the transport path a SipHash per packet; a peer only looks
    /// indices up.
    by_index: DashMap<u32, Arc<Session>, IndexHash>,
    by_key: DashMap<KeyBytes, Arc<Session>>,
    by_uuid: DashMap<Box<str>, Arc<Session>>,
    by_address: DashMap<Ipv4Addr, Arc<Session>>,
    /// (endpoint, sender index >> 8) of a device's last initiation → its
    /// session index. Initiators built on boringtun (our agent among them)
    /// keep the upper 24 bits of their sender index for the life of the
    /// tunnel, and a rekey comes from the same endpoint: trying that
    /// session's tunnel first spares `parse_handshake_anon`'s
    /// Diffie-Hellman. Kernel and wireguard-go peers draw a random index per
    /// handshake, never match, and take the usual path at no extra cost;
    /// devices sharing an endpoint (one NAT, one socket) are told apart by
    /// the index, so a hint almost never names the wrong device (which
    /// would cost one DH before the usual path).
    by_hint: DashMap<HintKey, u32>,
    /// Each session's current endpoint, counted (devices behind one NAT
    /// may share one), with the session that came there last: initiations
    /// from a known endpoint go ahead of unknown sources under load
    /// (`packet_path::admission`), and a rekey whose index misses the hint
    /// (kernel and wireguard-go peers draw a random sender index per
    /// handshake) goes to the endpoint's only session (see [`Self::sole_at`]).
    by_endpoint: DashMap<std::net::SocketAddr, EndpointUse>,
    next_index: AtomicU32,
}

impl SessionTable {
    pub fn new() -> Self {
        let mut seed = [0u8; 4];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        SessionTable {
            next_index: AtomicU32::new(u32::from_le_bytes(seed) % INDEX_SPACE),
            ..Default::default()
        }
    }

    /// A free 24-bit index. Starting from a random point makes indices of a
    /// restarted gateway unlikely to match the ones devices still hold.
    pub fn allocate_index(&self) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) % INDEX_SPACE;
            if i != 0 && !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Inserts `session` unless its device already has one, which is then
    /// returned instead (two workers may race on a device's first handshake).
    pub fn insert_if_absent(&self, session: Arc<Session>) -> Result<(), Arc<Session>> {
        match self.by_key.entry(session.public_key) {
            Entry::Occupied(e) => Err(e.get().clone()),
            Entry::Vacant(v) => {
                self.by_index.insert(session.index, session.clone());
                if let Some(old) = self.by_uuid.insert(session.uuid.clone(), session.clone()) {
                    // The device was re-registered with a new key: the old
                    // session must not linger under its index.
                    self.by_index
                        .remove_if(&old.index, |_, s| Arc::ptr_eq(s, &old));
                    if self
                        .by_key
                        .remove_if(&old.public_key, |_, s| Arc::ptr_eq(s, &old))
                        .is_some()
                    {
                        let endpoint = old.state.lock().link.endpoint();
                        self.forget_endpoint(endpoint);
                    }
                }
                self.by_address.insert(session.address, session.clone());
                let endpoint = session.state.lock().link.endpoint();
                let index = session.index;
                v.insert(session);
                self.endpoint_arrived(endpoint, index);
                Ok(())
            }
        }
    }

    /// Removes exactly this session from every index.
    /// The session a rekey initiation most likely belongs to, if any.
    pub fn by_hint(&self, key: HintKey) -> Option<Arc<Session>> {
        let index = *self.by_hint.get(&key)?;
        self.by_index(index)
    }

    /// Records `session`'s last initiation under `key`; `previous` is the
    /// key hinted before (from its state). Call with the session's lock
    /// released (lock order: map shard → session state).
    pub fn hint(&self, session: &Session, key: HintKey, previous: Option<HintKey>) {
        if previous == Some(key) {
            return;
        }
        if let Some(p) = previous {
            self.by_hint.remove_if(&p, |_, i| *i == session.index);
        }
        self.by_hint.insert(key, session.index);
    }

    /// Whether a session's device is at `endpoint` now.
    pub fn is_known_endpoint(&self, endpoint: &std::net::SocketAddr) -> bool {
        self.by_endpoint.contains_key(endpoint)
    }

    /// The session of the only device at `endpoint`, if exactly one is
    /// there. A device's own NAT mapping (or its own socket) is its endpoint
    /// for the life of a tunnel, so a rekey from there is almost always
    /// that device's: trying its tunnel first spares the Diffie-Hellman that
    /// learns the key. Devices sharing an endpoint are not guessed between
    /// (a wrong guess costs that DH twice).
    pub fn sole_at(&self, endpoint: &std::net::SocketAddr) -> Option<Arc<Session>> {
        let e = *self.by_endpoint.get(endpoint)?;
        if e.count != 1 {
            return None;
        }
        self.by_index(e.last)
    }

    /// Session `index`'s endpoint changed (roaming, a handshake from
    /// elsewhere).
    pub fn endpoint_moved(&self, index: u32, from: std::net::SocketAddr, to: std::net::SocketAddr) {
        if from == to {
            return;
        }
        self.forget_endpoint(from);
        self.endpoint_arrived(to, index);
    }

    fn forget_endpoint(&self, endpoint: std::net::SocketAddr) {
        if let Entry::Occupied(mut e) = self.by_endpoint.entry(endpoint) {
            e.get_mut().count -= 1;
            if e.get().count == 0 {
                e.remove();
            }
        }
    }

    pub fn remove(&self, session: &Arc<Session>) {
        let (hinted, endpoint) = {
            let st = session.state.lock();
            (st.hinted, st.link.endpoint())
        };
        if let Some(e) = hinted {
            self.by_hint.remove_if(&e, |_, i| *i == session.index);
        }
        // Once per session: only the call that takes it out of the table
        // gives its endpoint back. (Lock order is map shard → session
        // state, so the endpoint is read first: a roam in between leaves a
        // count behind, which only exempts that address from the budget.)
        if self
            .by_key
            .remove_if(&session.public_key, |_, s| Arc::ptr_eq(s, session))
            .is_some()
        {
            self.forget_endpoint(endpoint);
        }
        self.by_index
            .remove_if(&session.index, |_, s| Arc::ptr_eq(s, session));
        self.by_uuid
            .remove_if(&session.uuid, |_, s| Arc::ptr_eq(s, session));
        self.by_address
            .remove_if(&session.address, |_, s| Arc::ptr_eq(s, session));
    }

    #[inline]
    pub fn by_index(&self, index: u32) -> Option<Arc<Session>> {
        self.by_index.get(&index).map(|s| s.clone())
    }
    pub fn by_key(&self, key: &KeyBytes) -> Option<Arc<Session>> {
        self.by_key.get(key).map(|s| s.clone())
    }
    pub fn by_uuid(&self, uuid: &str) -> Option<Arc<Session>> {
        self.by_uuid.get(uuid).map(|s| s.clone())
    }
    pub fn by_address(&self, addr: Ipv4Addr) -> Option<Arc<Session>> {
        self.by_address.get(&addr).map(|s| s.clone())
    }

    /// Number of sessions (connected or not).
    pub fn len(&self) -> usize {
        self.by_index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }

    /// Appends every session to `out` (a buffer the caller reuses).
    pub fn collect_into(&self, out: &mut Vec<Arc<Session>>) {
        out.extend(self.by_index.iter().map(|e| e.value().clone()));
    }

    /// Sessions whose index passes `keep` (only those are cloned).
    pub fn collect_into_where(&self, out: &mut Vec<Arc<Session>>, keep: impl Fn(u32) -> bool) {
        out.extend(
            self.by_index
                .iter()
                .filter(|e| keep(*e.key()))
                .map(|e| e.value().clone()),
        );
    }
}
