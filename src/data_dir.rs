//! The data directory's permissions: 0700 for the directory and 0600 for
//! every file in it (registry with its `-wal`/`-shm`, the gateway key, the
//! API token), because stored device API keys and the gateway's private key
//! live there. An existing directory made by hand or by an older build is
//! tightened at start; the gateway refuses to start, naming the path, only
//! where that is impossible (a file owned by someone else, a read-only
//! mount).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::Error;

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
