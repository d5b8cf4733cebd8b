//! Stage 2b, handshake: an initiation that admission (stage 2a, its MACs
//! and the load decision) let into the queue, taken by a worker.
//!
//! 1. (admission already checked mac1, and mac2 when under load.)
//! 2. A rekey goes straight to its device's session when the initiation's
//!    source tells which one it is: the endpoint and sender-index prefix of
//!    the device's last initiation (boringtun initiators keep the prefix),
//!    else the only device at that endpoint (kernel and wireguard-go draw a
//!    random index each time). The session's tunnel checks the key itself,
//!    with the three variable-base DH a responder cannot avoid; only when
//!    it refuses does the next step run.
//! 3. `parse_handshake_anon` learns the initiator's static key (one more
//!    DH). The device's session, if it has one, takes the initiation (a
//!    reconnect from elsewhere). Otherwise the in-memory directory is asked
//!    (never the store); unknown keys are dropped silently and counted,
//!    known ones get a new `Tunn` and session.
//! 4. The session's `Tunn` answers with a handshake response, which goes back
//!    to the initiation's source; that source becomes the endpoint (a valid
//!    initiation proves possession of the device's key and is replay
//!    protected by its timestamp, as in the kernel's WireGuard).
//!
//! A deletion may be applied while a first handshake is in flight: the
//! directory's generation is read before the lookup and after the session
//! is inserted; if it moved, the lookup is repeated.

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use x25519_dalek::PublicKey;

use super::{PacketPath, Transmit};
use crate::keys::KeyBytes;
use crate::link_state::LinkState;
use crate::metrics::{DropReason, HandshakeResult, KeyLookup};
use crate::session_table::{HintKey, Session, SessionState};

impl PacketPath {
    pub(crate) fn handle_initiation(
        &self,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(datagram) else {
            self.metrics.dropped(DropReason::Malformed);
            return;
        };
        // A rekey from the same endpoint and sender-index prefix as the
        // device's last initiation (see `SessionTable::by_hint`): its tunnel
        // checks the initiator's key itself (and refuses another's before
        // touching its state), so no DH is spent learning the key.
        let hint = HintKey {
            endpoint: src,
            // Bytes 4..8 of an initiation: the sender's index.
            index_prefix: u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]])
                >> 8,
        };
        let hinted = self.sessions.by_hint(hint);
        if let Some(session) = &hinted {
            if self.answer_initiation(now, src, hint, session, false, datagram, out, tx) {
                self.metrics.key_lookup(KeyLookup::IndexHint);
                return;
            }
            self.metrics.key_lookup(KeyLookup::Missed);
        }
        if let Some(session) = self.sessions.sole_at(&src) {
            let tried = hinted.is_some_and(|h| Arc::ptr_eq(&h, &session));
            if !tried && session.state.lock().link.endpoint() == src {
                if self.answer_initiation(now, src, hint, &session, false, datagram, out, tx) {
                    self.metrics.key_lookup(KeyLookup::Endpoint);
                    return;
                }
                self.metrics.key_lookup(KeyLookup::Missed);
            }
        }
        self.metrics.key_lookup(KeyLookup::Key);
        let half = match parse_handshake_anon(&self.secret, &self.public, &init) {
            Ok(h) => h,
            Err(_) => {
                self.metrics.handshake(HandshakeResult::Invalid);
                self.metrics.dropped(DropReason::HandshakeFailed);
                return;
            }
        };
        let key = half.peer_static_public;
        let (session, fresh) = match self.sessions.by_key(&key) {
            Some(s) => (s, false),
            None => match self.create_session(key, src) {
                Some(s) => (s, true),
                None => return,
            },
        };
        if !self.answer_initiation(now, src, hint, &session, true, datagram, out, tx) && fresh {
            let st = session.state.lock();
            let never = st.last_handshake_at.is_none();
            drop(st);
            if never {
                self.sessions.remove(&session);
            }
        }
    }

    /// Hands an initiation to `session`'s tunnel. On success answers it,
    /// updates the link and the endpoint hint, and returns true. On failure
    /// counts it only if `last_try` (a wrong hint is not a failure).
    #[allow(clippy::too_many_arguments)]
    fn answer_initiation(
        &self,
        now: Instant,
        src: SocketAddr,
        hint: HintKey,
        session: &Arc<Session>,
        last_try: bool,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) -> bool {
        let _span = tracing::trace_span!("handshake", device = %session.uuid).entered();
        let mut st = session.state.lock();
        match st.tunn.decapsulate(Some(src.ip()), datagram, out) {
            TunnResult::WriteToNetwork(response) => {
                st.traffic.rx(datagram.len());
                self.transmit(tx, Some(&mut st.traffic), src, response);
                self.metrics.handshake(HandshakeResult::Completed);
                let at = self.wall(now);
                st.last_handshake_at = Some(at);
                let before = st.link.endpoint();
                let transition = st.link.on_authenticated(now, src, false);
                self.sessions.endpoint_moved(session.index, before, src);
                if let Some(t) = transition {
                    self.announce(session, t, at);
                }
                tracing::debug!(device = %session.uuid, %src, "handshake completed");
                self.drain_queued(&mut st, src, out, tx);
                let previous = st.hinted.replace(hint);
                drop(st);
                self.sessions.hint(session, hint, previous);
                true
            }
            other => {
                if last_try {
                    tracing::debug!(device = %session.uuid, result = ?other, "handshake initiation refused by the tunnel");
                    self.metrics.handshake(HandshakeResult::Invalid);
                    self.metrics.dropped(DropReason::HandshakeFailed);
                }
                false
            }
        }
    }

    /// Creates the session of a registered device on its first handshake.
    pub(crate) fn create_session(&self, key: KeyBytes, src: SocketAddr) -> Option<Arc<Session>> {
        let generation = self.directory.generation();
        let Some(identity) = self.directory.lookup(&key) else {
            tracing::trace!(%src, "handshake from an unregistered key");
            self.metrics.handshake(HandshakeResult::UnknownKey);
            self.metrics.dropped(DropReason::UnknownKey);
            return None;
        };
        let index = self.sessions.allocate_index();
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            None,
            index,
            Some(self.tunn_limiter.clone()),
        );
        let session = Arc::new(Session {
            index,
            uuid: identity.uuid,
            public_key: key,
            address: identity.address,
            state: Mutex::new(SessionState {
                tunn,
                link: LinkState::new(self.config.link_timeout, src),
                last_handshake_at: None,
                connected_since: None,
                hinted: None,
                traffic: Default::default(),
            }),
        });
        if let Err(existing) = self.sessions.insert_if_absent(session.clone()) {
            return Some(existing);
        }
        if self.directory.generation() != generation && self.directory.lookup(&key).is_none() {
            self.sessions.remove(&session);
            self.metrics.handshake(HandshakeResult::UnknownKey);
            self.metrics.dropped(DropReason::UnknownKey);
            return None;
        }
        Some(session)
    }
}
