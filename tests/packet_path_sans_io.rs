//! The packet path without sockets: datagrams in, datagrams and events out,
//! on simulated time for the link state.

use boringtun::noise::{Tunn, TunnResult};
use cloudlink::bus::{EventBus, Read, RingBus};
use cloudlink::directory::Directory;
use cloudlink::egress::Egress;
use cloudlink::keys::{generate_private_key, public_key};
use cloudlink::metrics::{DropReason, Metrics};
use cloudlink::packet_path::{PacketPath, PacketPathConfig, TunnelSink, BUF_SIZE};
use cloudlink::registry::{AddressPlan, NewDevice, Registry};
use cloudlink::session_table::Session;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::StaticSecret;

struct Rig {
    path: Arc<PacketPath>,
    events: Arc<dyn EventBus>,
    metrics: Arc<Metrics>,
    out: Vec<u8>,
    _dir: tempfile::TempDir,
}

const TIMEOUT: Duration = Duration::from_secs(90);

/// The store and the directory the packet path reads, kept in step as the
/// fleet reactor keeps them in the gateway.
struct Reg {
    registry: Arc<Registry>,
    directory: Arc<Directory>,
}

impl Reg {
    fn register(
        &self,
        d: NewDevice,
    ) -> Result<cloudlink::registry::Registered, cloudlink::registry::RegistryError> {
        let r = self.registry.register(d)?;
        self.directory.reload(&self.registry)?;
        Ok(r)
    }
}

fn rig() -> (Rig, Reg) {
    rig_with_ring(1000)
}

/// A rig whose event ring keeps `event_ring` events.
fn rig_with_ring(event_ring: usize) -> (Rig, Reg) {
    let dir = tempfile::tempdir().unwrap();
    let plan = AddressPlan::new("10.240.0.0/12".parse().unwrap()).unwrap();
    let registry = Arc::new(Registry::open(dir.path(), plan).unwrap());
    let directory = Arc::new(Directory::default());
    let events: Arc<dyn EventBus> = Arc::new(RingBus::new("sim".into(), "gw".into(), event_ring));
    let metrics = Arc::new(Metrics::new());
    let path = Arc::new(PacketPath::new(
        StaticSecret::from(generate_private_key()),
        plan.gateway(),
        directory.clone(),
        events.clone(),
        metrics.clone(),
        PacketPathConfig {
            link_timeout: TIMEOUT,
            handshake_rate_limit: 0,
            handshake_queue: 64,
            name_boringtun_warnings: false,
        },
    ));
    (
        Rig {
            path,
            events,
            metrics,
            out: vec![0; BUF_SIZE],
            _dir: dir,
        },
        Reg {
            registry,
            directory,
        },
    )
}

impl Rig {
    fn feed(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut tx = Vec::new();
        self.path
            .handle_datagram(now, from, datagram, &mut self.out, &mut tx);
        // Initiations wait in the handshake queue until a worker runs them.
        self.path
            .process_handshakes(now, usize::MAX, &mut self.out, &mut tx);
        tx
    }
    fn event_types(&self) -> Vec<String> {
        match self.events.read_after(0, 1000) {
            Read::Events(v) => v
                .iter()
                .map(|e| {
                    let j: serde_json::Value = serde_json::from_str(&e.json).unwrap();
                    j["type"].as_str().unwrap().to_owned()
                })
                .collect(),
            _ => panic!(),
        }
    }
}

/// `dev`'s handshake initiation (`force`: even while one is in flight).
fn initiation(dev: &mut Tunn, force: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    match dev.format_handshake_initiation(&mut buf, force) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

fn client(gw: &PacketPath, private: [u8; 32]) -> Tunn {
    Tunn::new(
        StaticSecret::from(private),
        gw.public_key(),
        None,
        None,
        42,
        None,
    )
}

/// Runs a full handshake; returns the device's first transport packet
/// (boringtun's keepalive) already fed to the gateway.
fn connect(rig: &mut Rig, dev: &mut Tunn, from: SocketAddr, now: Instant) {
    let mut buf = vec![0u8; 2048];
    let init = initiation(dev, false);
    let answers = rig.feed(now, from, &init);
    assert_eq!(answers.len(), 1, "one handshake response");
    assert_eq!(answers[0].0, from, "answered to the initiation's source");
    let keepalive = match dev.decapsulate(None, &answers[0].1, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("{other:?}"),
    };
    assert!(rig.feed(now, from, &keepalive).is_empty());
}

#[test]
fn link_goes_up_and_times_out_on_simulated_time() {
    let (mut rig, registry) = rig();
    let key = generate_private_key();
    registry
        .register(NewDevice {
            uuid: "sim-1".into(),
            public_key: public_key(&key),
            name: None,
        })
        .unwrap();
    let mut dev = client(&rig.path, key);
    let from: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    let t0 = Instant::now();
    connect(&mut rig, &mut dev, from, t0);
    assert_eq!(rig.event_types(), ["link.up"]);
    assert_eq!(rig.metrics.sessions.get(), 1);

    // Time passes without a packet: one tick just before the timeout, one at it.
    let mut scratch = Vec::new();
    let mut out = vec![0u8; BUF_SIZE];
    let mut tx = Vec::new();
    rig.path.tick(
        t0 + TIMEOUT - Duration::from_secs(1),
        &mut out,
        &mut scratch,
        &mut tx,
    );
    assert_eq!(rig.event_types(), ["link.up"]);
    rig.path.tick(t0 + TIMEOUT, &mut out, &mut scratch, &mut tx);
    assert_eq!(rig.event_types(), ["link.up", "link.down"]);
    assert_eq!(rig.metrics.sessions.get(), 0);
    // The session stays for a silent device; it comes back without a handshake.
    let mut buf = vec![0u8; 2048];
    let keepalive = match dev.encapsulate(&[], &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!(),
    };
    rig.feed(t0 + TIMEOUT * 2, from, &keepalive);
    assert_eq!(rig.event_types(), ["link.up", "link.down", "link.up"]);
}

/// Keeps what it is given and answers each packet with a copy whose
/// addresses are swapped.
#[derive(Default)]
struct Collect(Mutex<Vec<(String, Vec<u8>)>>);

impl TunnelSink for Collect {
    fn deliver(&self, session: &Arc<Session>, packet: &[u8], answer: &dyn Egress) {
        self.0
            .lock()
            .push((session.uuid.to_string(), packet.to_vec()));
        let mut reply = packet.to_vec();
        let (src, dst) = reply[12..20].split_at_mut(4);
        src.swap_with_slice(dst);
        answer.send(&reply);
    }
}

#[test]
fn packets_for_the_gateway_reach_the_sink_and_replies_go_back() {
    let (mut rig, registry) = rig();
    let sink = Arc::new(Collect::default());
    rig.path.set_sink(sink.clone()).ok().unwrap();
    let key = generate_private_key();
    let device = match registry
        .register(NewDevice {
            uuid: "sink-1".into(),
            public_key: public_key(&key),
            name: None,
        })
        .unwrap()
    {
        cloudlink::registry::Registered::Created(d) => d,
        _ => panic!(),
    };
    let mut dev = client(&rig.path, key);
    let from: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    let now = Instant::now();
    connect(&mut rig, &mut dev, from, now);

    let gw_ip = rig.path.gateway_address();
    let packet = ip_packet(device.address, gw_ip, b"ping");
    let mut buf = vec![0u8; 2048];
    let datagram = match dev.encapsulate(&packet, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!(),
    };
    let answered = rig.feed(now, from, &datagram);
    let got = sink.0.lock().clone();
    assert_eq!(got, vec![("sink-1".to_owned(), packet.clone())]);

    // The sink's answer left with the received datagram's batch, encrypted
    // in the same session, to the device's endpoint.
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0].0, from);
    let mut echo = packet.clone();
    echo[12..16].copy_from_slice(&gw_ip.octets());
    echo[16..20].copy_from_slice(&device.address.octets());
    match dev.decapsulate(None, &answered[0].1, &mut buf) {
        TunnResult::WriteToTunnelV4(p, src) => {
            assert_eq!(src, gw_ip);
            assert_eq!(p, &echo[..]);
        }
        other => panic!("{other:?}"),
    }

    // Output made elsewhere goes through the same session too.
    let session = rig.path.sessions.by_uuid("sink-1").unwrap();
    let reply = ip_packet(gw_ip, device.address, b"pong");
    let mut tx = Vec::new();
    rig.path.send_ip_with(&session, &reply, &mut tx).unwrap();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].0, from);
    match dev.decapsulate(None, &tx[0].1, &mut buf) {
        TunnResult::WriteToTunnelV4(p, src) => {
            assert_eq!(src, gw_ip);
            assert_eq!(p, &reply[..]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.metrics.dropped_count(DropReason::SpoofedSource), 0);
}

#[test]
fn forged_datagrams_naming_a_session_move_no_counter_and_no_endpoint() {
    let (mut rig, registry) = rig();
    let key = generate_private_key();
    registry
        .register(NewDevice {
            uuid: "count-1".into(),
            public_key: public_key(&key),
            name: None,
        })
        .unwrap();
    let mut dev = client(&rig.path, key);
    let from: SocketAddr = "192.0.2.20:4000".parse().unwrap();
    let now = Instant::now();
    connect(&mut rig, &mut dev, from, now);
    let session = rig.path.sessions.by_uuid("count-1").unwrap();
    let before = session.snapshot();
    assert_eq!(before.rx_packets, 2, "the initiation and the keepalive");

    // A real data packet with its ciphertext flipped, from another source:
    // it names the session's index but does not decrypt.
    let mut buf = vec![0u8; 2048];
    let mut forged = match dev.encapsulate(&[0x45; 40], &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!(),
    };
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let attacker: SocketAddr = "203.0.113.9:9".parse().unwrap();
    for _ in 0..10 {
        assert!(rig.feed(now, attacker, &forged).is_empty());
    }
    let after = session.snapshot();
    assert_eq!(after.rx_packets, before.rx_packets);
    assert_eq!(after.rx_bytes, before.rx_bytes);
    assert_eq!(after.endpoint, from);
    assert_eq!(rig.metrics.dropped_count(DropReason::DecryptFailed), 10);
}

#[test]
fn an_unregistered_key_gets_no_answer_and_no_session() {
    let (mut rig, _registry) = rig();
    let mut dev = client(&rig.path, generate_private_key());
    let init = initiation(&mut dev, false);
    assert!(rig
        .feed(Instant::now(), "192.0.2.1:1".parse().unwrap(), &init)
        .is_empty());
    assert!(rig.path.sessions.is_empty());
    assert_eq!(rig.metrics.dropped_count(DropReason::UnknownKey), 1);
}

fn ip_packet(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 253; // experimental protocol number: nobody parses it
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

/// The handshake queue under a storm: initiations only queue; from 1/8 full
/// the gateway answers cookie replies, an initiation carrying the cookie's
/// mac2 is admitted, a full queue drops and counts, and a connected device's
/// transport packets are handled at once whatever the queue holds.
#[test]
fn a_storm_queues_initiations_answers_cookies_and_never_starves_transport() {
    let (mut rig, registry) = rig();
    let now = Instant::now();
    let mut buf = vec![0u8; 2048];
    // A connected device first.
    let key = generate_private_key();
    registry
        .register(NewDevice {
            uuid: "steady".into(),
            public_key: public_key(&key),
            name: None,
        })
        .unwrap();
    let mut steady = client(&rig.path, key);
    let from: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    connect(&mut rig, &mut steady, from, now);

    // A storm: initiations from unregistered keys (the cost is the same
    // until the registry lookup). They queue without an answer.
    let cap = rig.path.handshakes.capacity();
    assert_eq!(cap, 64);
    let mut tx = Vec::new();
    let mut storm = Vec::new();
    for i in 0..cap / 8 {
        let mut dev = Tunn::new(
            StaticSecret::from(generate_private_key()),
            rig.path.public_key(),
            None,
            None,
            1000 + i as u32,
            None,
        );
        let init = initiation(&mut dev, false);
        let src: SocketAddr = format!("198.51.100.{}:5000", i + 1).parse().unwrap();
        rig.path
            .handle_datagram(now, src, &init, &mut rig.out, &mut tx);
        storm.push(dev);
    }
    assert!(tx.is_empty(), "nothing is answered on the receive path");
    assert_eq!(rig.path.handshakes.len(), cap / 8);
    assert!(rig.path.under_load());

    // Under load: a new initiation without a cookie gets a cookie reply.
    let src: SocketAddr = "203.0.113.7:6000".parse().unwrap();
    let mut late = Tunn::new(
        StaticSecret::from(generate_private_key()),
        rig.path.public_key(),
        None,
        None,
        7,
        None,
    );
    let init = initiation(&mut late, false);
    rig.path
        .handle_datagram(now, src, &init, &mut rig.out, &mut tx);
    assert_eq!(tx.len(), 1);
    let (to, cookie) = tx.pop().unwrap();
    assert_eq!(
        (to, cookie.len(), cookie[0]),
        (src, 64, 3),
        "a cookie reply"
    );
    assert_eq!(rig.path.handshakes.len(), cap / 8, "not queued");
    // The device takes the cookie; its retry carries mac2 and is admitted.
    assert!(matches!(
        late.decapsulate(None, &cookie, &mut buf),
        TunnResult::Done
    ));
    let retry = initiation(&mut late, true);
    rig.path
        .handle_datagram(now, src, &retry, &mut rig.out, &mut tx);
    assert!(tx.is_empty());
    assert_eq!(rig.path.handshakes.len(), cap / 8 + 1, "admitted with mac2");
    // The same retry from another address: its mac2 does not match.
    let other: SocketAddr = "203.0.113.8:6000".parse().unwrap();
    rig.path
        .handle_datagram(now, other, &retry, &mut rig.out, &mut tx);
    assert_eq!(tx.len(), 1, "a cookie for the other address instead");
    tx.clear();

    // Fill the queue to the brim with cookie-carrying retries, each from
    // its own address (one address has a budget of a few); beyond it
    // initiations are dropped and counted.
    let mut k = 0u32;
    let mut src = src;
    let mut retry = retry;
    while rig.path.handshakes.len() < cap {
        k += 1;
        src = format!("203.0.{}.{}:6000", 10 + k / 250, k % 250 + 1)
            .parse()
            .unwrap();
        let init = initiation(&mut late, true);
        rig.path
            .handle_datagram(now, src, &init, &mut rig.out, &mut tx);
        let (_, cookie) = tx.pop().expect("a cookie reply");
        late.decapsulate(None, &cookie, &mut buf);
        retry = initiation(&mut late, true);
        rig.path
            .handle_datagram(now, src, &retry, &mut rig.out, &mut tx);
    }
    let full_before = rig
        .metrics
        .dropped_count(cloudlink::metrics::DropReason::HandshakeQueueFull);
    rig.path
        .handle_datagram(now, src, &retry, &mut rig.out, &mut tx);
    assert_eq!(rig.path.handshakes.len(), cap);
    assert_eq!(
        rig.metrics
            .dropped_count(cloudlink::metrics::DropReason::HandshakeQueueFull),
        full_before + 1
    );

    // Meanwhile the connected device's packets are handled at once.
    let session = rig.path.sessions.by_uuid("steady").unwrap();
    let rx_before = session.snapshot().rx_packets;
    let ping = ip_packet(
        std::net::Ipv4Addr::new(10, 240, 0, 2),
        rig.path.gateway_address(),
        b"x",
    );
    let data = match steady.encapsulate(&ping, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!(),
    };
    rig.path
        .handle_datagram(now, from, &data, &mut rig.out, &mut tx);
    assert_eq!(session.snapshot().rx_packets, rx_before + 1);
    assert!(session.snapshot().connected);
    assert_eq!(
        rig.metrics
            .dropped_count(cloudlink::metrics::DropReason::DecryptFailed),
        0
    );

    // Workers drain the queue a few at a time; the load lifts a second
    // after the queue fell below 1/8 (as the kernel's), not at once.
    let mut done = 0;
    while !rig.path.handshakes.is_empty() {
        done += rig.path.process_handshakes(now, 4, &mut rig.out, &mut tx);
    }
    assert_eq!(done, cap);
    assert!(rig.path.under_load_at(now + Duration::from_millis(900)));
    assert!(!rig.path.under_load_at(now + Duration::from_millis(1001)));
}

/// Rekeys take the hint (no DH to learn the key) when the device initiates
/// from where it did last with the same index prefix; two devices sharing
/// an endpoint are told apart, each gets its answer, and nothing counts as
/// a failure.
#[test]
fn rekeys_from_a_shared_endpoint_are_answered_for_every_device() {
    let (mut rig, registry) = rig();
    let nat: SocketAddr = "203.0.113.50:40000".parse().unwrap();
    let now = Instant::now();
    let mut devices = Vec::new();
    for uuid in ["nat-a", "nat-b"] {
        let key = generate_private_key();
        registry
            .register(NewDevice {
                uuid: uuid.into(),
                public_key: public_key(&key),
                name: None,
            })
            .unwrap();
        let mut dev = client(&rig.path, key);
        connect(&mut rig, &mut dev, nat, now);
        devices.push(dev);
    }
    let mut buf = vec![0u8; 2048];
    for round in 0..3 {
        for dev in devices.iter_mut() {
            let init = initiation(dev, true);
            let answers = rig.feed(now, nat, &init);
            assert_eq!(answers.len(), 1, "round {round}: one response");
            assert!(matches!(
                dev.decapsulate(None, &answers[0].1, &mut buf),
                TunnResult::WriteToNetwork(_)
            ));
        }
    }
    assert_eq!(
        rig.metrics
            .handshake_count(cloudlink::metrics::HandshakeResult::Completed),
        8
    );
    assert_eq!(
        rig.metrics
            .handshake_count(cloudlink::metrics::HandshakeResult::Invalid),
        0
    );
    // A replayed initiation is still refused and counted once.
    let init = initiation(&mut devices[0], true);
    assert_eq!(rig.feed(now, nat, &init).len(), 1);
    assert!(
        rig.feed(now, nat, &init).is_empty(),
        "a replay gets no answer"
    );
    assert_eq!(
        rig.metrics
            .handshake_count(cloudlink::metrics::HandshakeResult::Invalid),
        1
    );
}

/// Kernel and wireguard-go peers draw a random sender index for every
/// handshake, so the index hint misses their rekeys: the endpoint's only
/// session takes them instead, with no Diffie-Hellman spent learning the
/// key. A different device arriving at an endpoint (a NAT mapping reused)
/// costs one wrong guess and is still answered.
#[test]
fn rekeys_with_a_random_index_go_to_the_endpoints_session() {
    use cloudlink::metrics::KeyLookup;
    let (mut rig, registry) = rig();
    let now = Instant::now();
    let mut keys = Vec::new();
    for i in 0..3 {
        let key = generate_private_key();
        registry
            .register(NewDevice {
                uuid: format!("random-index-{i}"),
                public_key: public_key(&key),
                name: None,
            })
            .unwrap();
        keys.push(key);
    }
    let endpoint =
        |i: usize| -> SocketAddr { format!("203.0.113.{}:51820", 60 + i).parse().unwrap() };
    let gw_public = rig.path.public_key();
    let fresh = |key: [u8; 32], index: u32| {
        Tunn::new(StaticSecret::from(key), gw_public, None, None, index, None)
    };
    let mut buf = vec![0u8; 2048];
    let mut index = 1000;
    for (i, key) in keys.iter().enumerate() {
        let mut dev = fresh(*key, index);
        index += 1;
        connect(&mut rig, &mut dev, endpoint(i), now);
    }
    assert_eq!(
        rig.metrics.key_lookup_count(KeyLookup::Key),
        3,
        "first contacts learn the key"
    );
    for round in 0..4 {
        for (i, key) in keys.iter().enumerate() {
            // A new tunnel each time: a new index, as a kernel peer's.
            let mut dev = fresh(*key, index);
            index += 1;
            let init = initiation(&mut dev, false);
            let answers = rig.feed(now, endpoint(i), &init);
            assert_eq!(answers.len(), 1, "round {round}, device {i}: one response");
            assert!(matches!(
                dev.decapsulate(None, &answers[0].1, &mut buf),
                TunnResult::WriteToNetwork(_)
            ));
        }
    }
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Endpoint), 12);
    assert_eq!(
        rig.metrics.key_lookup_count(KeyLookup::Key),
        3,
        "no rekey learned the key"
    );
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Missed), 0);

    // Device 0 comes from device 1's endpoint: the guess names device 1,
    // whose tunnel refuses; the key is learned and device 0 answered.
    let mut dev = fresh(keys[0], index);
    let init = initiation(&mut dev, false);
    let answers = rig.feed(now, endpoint(1), &init);
    assert_eq!(answers.len(), 1, "answered after a wrong guess");
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Missed), 1);
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Key), 4);
    assert_eq!(
        rig.metrics
            .handshake_count(cloudlink::metrics::HandshakeResult::Invalid),
        0,
        "a wrong guess is not a failed handshake"
    );
    // Two devices at one endpoint now: neither is guessed.
    let mut dev = fresh(keys[1], index + 1);
    let init = initiation(&mut dev, false);
    assert_eq!(rig.feed(now, endpoint(1), &init).len(), 1);
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Missed), 1);
    assert_eq!(rig.metrics.key_lookup_count(KeyLookup::Key), 5);
}

/// The fleet reactor applies device events from the bus; one that fell
/// behind (the ring dropped events it had not read) rebuilds the directory
/// and the status tracker from the store instead of missing a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_reactor_that_fell_behind_the_bus_reconciles_with_the_store() {
    use cloudlink::fleet::{Fleet, Reactor};
    use cloudlink::status::service::DeviceStatus;
    // A ring of two: three registrations push the first one out.
    let (rig, reg) = rig_with_ring(2);
    let (path, bus, metrics) = (rig.path.clone(), rig.events.clone(), rig.metrics.clone());
    let (registry, directory) = (reg.registry.clone(), reg.directory.clone());
    let status = Arc::new(
        DeviceStatus::load(
            registry.clone(),
            bus.clone(),
            Arc::downgrade(&path),
            Duration::from_secs(900),
            Duration::from_secs(15),
        )
        .unwrap(),
    );
    let fleet = Arc::new(Fleet::new(registry.clone(), bus.clone()));
    for i in 0..3u8 {
        let c = fleet
            .register(NewDevice {
                uuid: format!("late-{i}"),
                public_key: [i + 1; 32],
                name: None,
            })
            .unwrap();
        match c.value {
            cloudlink::registry::Registered::Created(_) => {}
            _ => panic!(),
        }
    }
    assert!(matches!(bus.read_after(0, 10), Read::Gap));
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(
        Reactor {
            fleet: fleet.clone(),
            path: path.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            actions: None,
        }
        .run(stop_rx),
    );
    fleet
        .settled(Some(bus.last_id()), Duration::from_secs(10))
        .await;
    assert_eq!(directory.len(), 3);
    for i in 0..3u8 {
        assert_eq!(
            &*directory.lookup(&[i + 1; 32]).unwrap().uuid,
            format!("late-{i}")
        );
        assert!(
            status.view(&format!("late-{i}")).is_some(),
            "status of late-{i}"
        );
    }
    assert_eq!(metrics.devices_registered.get(), 3);
}

/// Fair admission under load (issue "Hold up under abuse"): one address
/// that answers cookie replies gets only its budget into the queue, the
/// rest is dropped as `source_budget`; a connected device re-handshaking
/// from its endpoint needs no cookie, is not budgeted, and is answered
/// before everything the flood queued.
#[test]
fn under_load_one_source_gets_its_budget_and_known_endpoints_go_first() {
    use cloudlink::metrics::DropReason;
    let (mut rig, registry) = rig();
    let now = Instant::now();
    let mut buf = vec![0u8; 2048];
    let key = generate_private_key();
    registry
        .register(NewDevice {
            uuid: "known".into(),
            public_key: public_key(&key),
            name: None,
        })
        .unwrap();
    let mut known = client(&rig.path, key);
    let home: SocketAddr = "192.0.2.50:4500".parse().unwrap();
    connect(&mut rig, &mut known, home, now);

    // Load: initiations from unregistered keys, each from its own address.
    let cap = rig.path.handshakes.capacity();
    let mut tx = Vec::new();
    for i in 0..cap / 8 {
        let mut dev = client(&rig.path, generate_private_key());
        let init = initiation(&mut dev, false);
        let src: SocketAddr = format!("198.51.100.{}:5000", i + 1).parse().unwrap();
        rig.path
            .handle_datagram(now, src, &init, &mut rig.out, &mut tx);
    }
    assert!(rig.path.under_load());
    let queued = rig.path.handshakes.len();

    // The flood: one address, answering its cookie, sending 100 more.
    let flood: SocketAddr = "203.0.113.66:7777".parse().unwrap();
    let mut attacker = client(&rig.path, generate_private_key());
    let init = initiation(&mut attacker, false);
    rig.path
        .handle_datagram(now, flood, &init, &mut rig.out, &mut tx);
    let (_, cookie) = tx.pop().expect("a cookie reply");
    attacker.decapsulate(None, &cookie, &mut buf);
    for _ in 0..100 {
        let retry = initiation(&mut attacker, true);
        rig.path
            .handle_datagram(now, flood, &retry, &mut rig.out, &mut tx);
    }
    assert!(tx.is_empty());
    // The budget is asked before the MACs: the initiation that got the
    // cookie reply took one of the burst of 5.
    let admitted = rig.path.handshakes.len() - queued;
    assert_eq!(admitted, 4, "the burst, no more");
    assert_eq!(rig.metrics.dropped_count(DropReason::SourceBudget), 96);

    // The known device re-handshakes from its endpoint: no cookie reply,
    // and it is answered first.
    let again = initiation(&mut known, false);
    rig.path
        .handle_datagram(now, home, &again, &mut rig.out, &mut tx);
    assert!(tx.is_empty(), "no cookie demanded of a known endpoint");
    rig.path.process_handshakes(now, 1, &mut rig.out, &mut tx);
    assert_eq!(tx.len(), 1);
    let (to, response) = tx.pop().unwrap();
    assert_eq!(
        (to, response[0], response.len()),
        (home, 2, 92),
        "its handshake response"
    );
    // A second later the flood's address has a new share of its budget.
    let retry = initiation(&mut attacker, true);
    let before = rig.path.handshakes.len();
    rig.path.handle_datagram(
        now + Duration::from_secs(1),
        flood,
        &retry,
        &mut rig.out,
        &mut tx,
    );
    assert_eq!(rig.path.handshakes.len(), before + 1);
}
