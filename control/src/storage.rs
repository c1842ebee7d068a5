//! The bound on what the node keeps on disk (`resources.max_storage_mb`, `start
//! --max-storage MB`): after each checkpoint, the checkpoints folder is brought under the
//! bound by removing its oldest files first (a takeover's own state, weights fetched from
//! peers, snapshots a crashed run left). The latest checkpoint, the one a restart resumes
//! from, is never removed, even when it alone is over the bound; nor are the snapshots this
//! process is serving to a peer right now.

use std::path::{Path, PathBuf};

/// Removes the oldest files of `data_dir`'s checkpoints folder until it takes at most
/// `max_mb` MB (0: no bound). Returns the files removed.
pub fn prune_checkpoints(data_dir: &Path, max_mb: u64) -> std::io::Result<Vec<PathBuf>> {
    if max_mb == 0 {
        return Ok(Vec::new());
    }
    let dir = crate::engine::checkpoints_dir(data_dir);
    let latest = crate::engine::checkpoint_path(data_dir);
    let serving = format!("serve-{}-", std::process::id());
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    let mut total = 0u64;
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        total += meta.len();
        let path = entry.path();
        let keep = path == latest
            || entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&serving));
        if !keep {
            files.push((meta.modified()?, path, meta.len()));
        }
    }
    // Oldest first; the name breaks ties so the order does not depend on the listing.
    files.sort();
    let bound = max_mb.saturating_mul(1024 * 1024);
    let mut removed = Vec::new();
    for (_, path, len) in files {
        if total <= bound {
            break;
        }
        std::fs::remove_file(&path)?;
        total -= len;
        removed.push(path);
    }
    Ok(removed)
}

/// [`prune_checkpoints`], logging what it removed or why it could not.
pub fn prune_and_log(data_dir: &Path, max_mb: u64) {
    match prune_checkpoints(data_dir, max_mb) {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(max_storage_mb = max_mb, removed = ?removed, "old checkpoints removed")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not prune the checkpoints folder"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// Writes `mb` MB to `name` in the checkpoints folder, last modified `age_s` seconds ago.
    fn file(data_dir: &Path, name: &str, mb: usize, age_s: u64) -> PathBuf {
        let dir = crate::engine::checkpoints_dir(data_dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; mb << 20]).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        path
    }

    #[test]
    fn the_oldest_go_first_and_the_latest_checkpoint_never() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The latest checkpoint is the oldest file here: it still stays.
        let latest = file(d, "latest.ckpt", 2, 500);
        let a = file(d, "from-0xaa.ckpt", 1, 400);
        let b = file(d, "takeover.ckpt", 1, 300);
        let c = file(d, "from-0xbb.ckpt", 1, 200);
        let serving = file(d, &format!("serve-{}-0.ckpt", std::process::id()), 1, 600);

        // No bound: nothing goes.
        assert!(prune_checkpoints(d, 0).unwrap().is_empty());
        // 6 MB held, bound 4: the two oldest removable files go, oldest first.
        assert_eq!(prune_checkpoints(d, 4).unwrap(), [a.clone(), b.clone()]);
        assert!(latest.exists() && c.exists() && serving.exists());
        // A bound below the latest checkpoint alone: everything else goes, it stays.
        assert_eq!(prune_checkpoints(d, 1).unwrap(), [c]);
        assert!(latest.exists() && serving.exists());
        assert!(prune_checkpoints(d, 1).unwrap().is_empty());
    }

    #[test]
    fn no_checkpoints_folder_is_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert!(prune_checkpoints(dir.path(), 1).unwrap().is_empty());
    }
}
