//! What other gateways write to NATS, as this one reads it: registry
//! records, ownership records, leases, shared heartbeats and counters,
//! hand-overs, each device's shared actions and scoped token records. A
//! gateway of another version (or anything with access to the NATS account)
//! can write any bytes there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cloudlink::cluster::registry::DeviceRecord::parse(data);
    let _ = cloudlink::cluster::ownership::OwnerRecord::parse(data);
    let _ = cloudlink::cluster::lease::LeaseValue::parse(data);
    let _ = cloudlink::cluster::heartbeats::Heard::parse(data);
    let _ = cloudlink::cluster::counters::RemoteCounters::default().apply("gw-a", data);
    let _ = cloudlink::cluster::handover::Handover::parse(data);
    let _ = cloudlink::tokens::TokenRecord::parse(data);
    if let Some(d) = cloudlink::cluster::actions::DeviceActions::parse(data) {
        for a in &d.actions {
            let _ = a.stored("later").to_json();
        }
    }
});
