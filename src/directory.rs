//! The directory: who may connect, in memory, so the handshake path never
//! waits on storage. Public key → the device's uuid, tunnel address and
//! status slot.
//!
//! It is filled from the store at start ([`Directory::load`]) and kept
//! current by the fleet reactor from `device.registered` and
//! `device.deleted` on the bus (and rebuilt from the store if the reactor
//! ever falls behind the bus). In cluster mode a store's watch fills it the
//! same way. Memory: one `DashMap` entry (key, uuid, address, slot) plus
//! the uuid's heap copy per registered device; `benches/registry_million.rs`
//! measures it with the status slots (about 0.2 KiB per device).
//!
//! Deletion race: a first handshake may look a device up just before its
//! deletion is applied and insert its session just after the reactor looked
//! for one to revoke. `generation` moves on every removal; the handshake
//! path reads it before the lookup and checks it again after inserting the
//! session (see `packet_path/handshake.rs`).

use dashmap::DashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::keys::KeyBytes;
use crate::registry::{Registry, RegistryError};

/// What the handshake path needs to know of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uuid: Box<str>,
    pub address: Ipv4Addr,
}

#[derive(Default)]
pub struct Directory {
    by_key: DashMap<KeyBytes, Identity>,
    generation: AtomicU64,
}

impl Directory {
    /// Every registered device, read from the store (blocking).
    pub fn load(registry: &Registry) -> Result<Self, RegistryError> {
        let d = Directory::default();
        d.reload(registry)?;
        Ok(d)
    }

    /// Makes the directory hold exactly what the store holds (blocking).
    pub fn reload(&self, registry: &Registry) -> Result<(), RegistryError> {
        let mut present = std::collections::HashSet::new();
        registry.for_each_identity(|key, identity| {
            present.insert(key);
            self.by_key.insert(key, identity);
        })?;
        let before = self.by_key.len();
        self.by_key.retain(|k, _| present.contains(k));
        if self.by_key.len() != before {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    pub fn lookup(&self, key: &KeyBytes) -> Option<Identity> {
        self.by_key.get(key).map(|e| e.value().clone())
    }

    pub fn insert(&self, key: KeyBytes, identity: Identity) {
        self.by_key.insert(key, identity);
    }

    /// Forgets a device; later lookups miss, and the generation moves.
    pub fn remove(&self, key: &KeyBytes) {
        self.by_key.remove(key);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Moves on every removal (see the module's deletion race).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_removals_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::registry::AddressPlan::new("10.240.0.0/24".parse().unwrap()).unwrap();
        let reg = Registry::open(dir.path(), plan).unwrap();
        for i in 0..3u8 {
            reg.register(crate::registry::NewDevice {
                uuid: format!("d{i}"),
                public_key: [i + 1; 32],
                name: None,
            })
            .unwrap();
        }
        let d = Directory::load(&reg).unwrap();
        assert_eq!(d.len(), 3);
        let id = d.lookup(&[2; 32]).unwrap();
        assert_eq!(&*id.uuid, "d1");
        let g = d.generation();
        d.remove(&[2; 32]);
        assert!(d.lookup(&[2; 32]).is_none());
        assert!(d.generation() > g);
        // The store still has it: a reload brings it back; one the store
        // lost goes.
        d.insert(
            [9; 32],
            Identity {
                uuid: "ghost".into(),
                address: Ipv4Addr::new(10, 240, 0, 99),
            },
        );
        d.reload(&reg).unwrap();
        assert_eq!(d.len(), 3);
        assert!(d.lookup(&[2; 32]).is_some());
        assert!(d.lookup(&[9; 32]).is_none());
    }
}
