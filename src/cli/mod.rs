//! The admin CLI: `cloudlink devices|actions|tokens|events|show|connect`, a
//! client of the gateway's API (and of its proxy, for `connect`).
//!
//! Human tables by default, `--json` for scripts (the API's own JSON).
//! Exit codes tell what went wrong without parsing a message:
//! [`EXIT_REFUSED`] (the API answered with an error), [`EXIT_NOT_FOUND`]
//! (404: no such device, action or token), [`EXIT_UNREACHABLE`] (no answer:
//! the gateway is down or the URL is wrong); clap's usage errors exit 2.
//!
//! The token comes from `--token-file`, else `CLOUDLINK_TOKEN`, else the
//! local data directory's `api-token` when this user can read it (on the
//! gateway host, `cloudlink devices list` just works).

mod client;
mod commands;
mod render;

pub use commands::{run, CliArgs, CliCommand};

/// The API answered with an error other than 404.
pub const EXIT_REFUSED: i32 = 1;
/// 404: the device, action or token does not exist.
pub const EXIT_NOT_FOUND: i32 = 3;
/// No answer: the gateway is not running there, or the URL is wrong.
pub const EXIT_UNREACHABLE: i32 = 4;

/// Why a command failed, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::Api { status: 404, .. } => EXIT_NOT_FOUND,
            CliError::Api { .. } => EXIT_REFUSED,
            CliError::Usage(_) => 2,
        }
    }
}
