//! The data directory's permissions: 0700 for the directory and 0600 for
//! every file in it (registry with its `-wal`/`-shm`, the gateway key, the
//! API token), because stored device API keys and the gateway's private key
//! live there. An existing directory made by hand or by an older build is
//! tightened at start; the gateway refuses to start, naming the path, only
//! where that is impossible (a file owned by someone else, a read-only
//! mount).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::keys::{decode_key, encode_key, generate_private_key};
use crate::Error;
use std::io::Write as _;
use x25519_dalek::StaticSecret;

/// Creates `dir` (0700) or tightens it, and every regular file directly in
/// it, to owner-only. Symbolic links are left alone (never followed).
pub fn secure(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    tighten(dir, 0o700)?;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let kind = entry.file_type().map_err(|e| Error::io(&entry.path(), e))?;
        if kind.is_file() {
            tighten(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Removes group and other bits (keeps the owner's) down to `max`.
fn tighten(path: &Path, max: u32) -> Result<(), Error> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !max == 0 {
        return Ok(());
    }
    let new = mode & max;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(new)).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("mode {mode:04o} is open to other users and could not be tightened to {new:04o}: {e}"),
            ),
        )
    })?;
    tracing::warn!(path = %path.display(), from = format!("{mode:04o}"), to = format!("{new:04o}"), "tightened permissions in the data directory");
    Ok(())
}

/// Loads the gateway's private key from `path`, creating it (mode 0600) when
/// it does not exist yet, so that a restart keeps the gateway's identity.
pub fn load_or_create_private_key(path: &Path) -> Result<StaticSecret, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = decode_key(&text).map_err(|e| Error::KeyFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            Ok(StaticSecret::from(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_private_key();
            write_secret_file(path, format!("{}\n", encode_key(&key)).as_bytes())?;
            tracing::info!(path = %path.display(), "generated the gateway's private key");
            Ok(StaticSecret::from(key))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes `contents` to a new file readable only by its owner (0600), and
/// fsyncs it: secrets must neither leak to other users nor vanish in a crash.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    file.write_all(contents).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Holds the data directory for this process: an exclusive `flock` on
/// `gateway.lock` (with our pid in it), released when the file is dropped
/// or the process dies. A second gateway on the same directory would share
/// its registry and key and answer for the same devices; it is refused at
/// start instead.
pub fn lock(dir: &Path) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    let path = dir.join("gateway.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::Config(format!(
                "the data directory {} is in use by another gateway{}; give each gateway its own --data-dir",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            )));
        }
        return Err(Error::io(&path, e));
    }
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// The process holding a UDP socket on `port` (pid, command line), from
/// `/proc/net/udp{,6}` and the processes' descriptors; `None` if it cannot
/// be told (another user's process, no /proc).
fn udp_port_holder(port: u16) -> Option<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Some(inode) = f.get(9) {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                let cmd = std::fs::read(entry.path().join("cmdline"))
                    .map(|b| {
                        b.split(|c| *c == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                return Some((pid, cmd));
            }
        }
    }
    None
}

/// Fails when another process already serves `addr` over UDP. The gateway's
/// sockets use `SO_REUSEPORT` (one per packet worker), so a second gateway
/// binding the same port would succeed and silently take about half of the
/// devices' datagrams; a probe bound *without* it is refused by the kernel
/// while anyone holds the port.
pub fn probe_udp_port(addr: std::net::SocketAddr) -> Result<(), Error> {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = udp_port_holder(addr.port())
                .map(|(pid, cmd)| format!(" (pid {pid}: {cmd})"))
                .unwrap_or_default();
            Err(Error::Config(format!(
                "UDP {addr} is already served by another process{holder}; a second gateway on the same port would take about half of the devices' datagrams. Stop it, or give this one another --listen"
            )))
        }
        Err(e) => Err(Error::Config(format!(
            "binding the WireGuard UDP socket on {addr}: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tightens_directory_and_files() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["registry.sqlite3", "registry.sqlite3-wal", "api-token"] {
            std::fs::write(dir.join(f), b"x").unwrap();
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        secure(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in ["registry.sqlite3", "registry.sqlite3-wal", "api-token"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // A new directory is made 0700.
        let fresh = t.path().join("new/data");
        secure(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
    }
}
