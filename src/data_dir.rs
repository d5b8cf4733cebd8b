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
