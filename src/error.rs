//! The library's typed errors. The binary turns them into `anyhow` at its edge.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a WireGuard private key: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("device registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}
