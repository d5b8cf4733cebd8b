//! cloudlink: a WireGuard tunnel gateway for device fleets.
//!
//! Start with `ARCHITECTURE.md` for the bird's-eye view. In short:
//! [`packet_path`] terminates WireGuard (one file per stage),
//! [`session_table`] holds connected devices, [`link_state`] decides when a
//! link is up or down, [`events`] publishes that, [`registry`] persists who
//! may connect, [`api`] exposes it all over HTTP, [`gateway`] wires it up.

pub mod action_queue;
pub mod actions;
pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod data_dir;
pub mod directory;
pub mod egress;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod http1;
pub mod keys;
pub mod link_state;
pub mod loadgen;
pub mod memory;
pub mod metrics;
pub mod packet_path;
pub mod redial;
pub mod registry;
pub mod relay;
pub mod session_table;
pub mod status;
pub mod store;
pub mod tokens;
pub mod udp_socket;
pub mod wg_config;

pub use config::GatewayConfig;
pub use error::Error;
pub use gateway::{run, Gateway};
