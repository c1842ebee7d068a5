//! CPU quotas: one parent cgroup for the whole lab (so a run never takes more than its share
//! of the machine) and one child per node, each with a CFS quota. Works on cgroup v1 (the
//! `cpu` hierarchy: `cpu.cfs_quota_us` / `cpu.cfs_period_us`) and v2 (`cpu.max`), whichever
//! the machine mounts. A node's processes enter their cgroup before they exec (see
//! `node.rs`), so the engine the daemon spawns is in it too. Removed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

const PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

pub struct Cgroups {
    version: Version,
    parent: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroups {
    /// `name` under the cpu hierarchy, limited to `cpus` cores in all (0: no limit).
    pub fn new(name: &str, cpus: f64) -> anyhow::Result<Cgroups> {
        let (version, root) = if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
            (Version::V1, PathBuf::from("/sys/fs/cgroup/cpu"))
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (Version::V2, PathBuf::from("/sys/fs/cgroup"))
        } else {
            bail!("no cgroup cpu controller found under /sys/fs/cgroup (v1 cpu/ or v2)");
        };
        remove_stale(&root);
        let parent = root.join(name);
        std::fs::create_dir(&parent)
            .with_context(|| format!("creating cgroup {}", parent.display()))?;
        let cg = Cgroups {
            version,
            parent,
            children: Vec::new(),
        };
        if version == Version::V2 {
            // The cpu controller must be enabled for the children of the root and of ours.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            std::fs::write(cg.parent.join("cgroup.subtree_control"), "+cpu")
                .context("enabling the cpu controller in the lab's cgroup")?;
        }
        cg.set_quota(&cg.parent, cpus)?;
        Ok(cg)
    }

    fn set_quota(&self, dir: &Path, cpus: f64) -> anyhow::Result<()> {
        let quota = if cpus > 0.0 {
            Some(((cpus * PERIOD_US as f64) as u64).max(1000))
        } else {
            None
        };
        match self.version {
            Version::V1 => {
                std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
                let q = quota.map_or("-1".to_string(), |q| q.to_string());
                std::fs::write(dir.join("cpu.cfs_quota_us"), q)
                    .with_context(|| format!("setting the quota of {}", dir.display()))?;
            }
            Version::V2 => {
                let q = quota.map_or("max".to_string(), |q| q.to_string());
                std::fs::write(dir.join("cpu.max"), format!("{q} {PERIOD_US}"))
                    .with_context(|| format!("setting cpu.max of {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// A child cgroup limited to `cpus` cores; the path of its `cgroup.procs`.
    pub fn child(&mut self, name: &str, cpus: f64) -> anyhow::Result<PathBuf> {
        let dir = self.parent.join(name);
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            self.children.push(dir.clone());
        }
        self.set_quota(&dir, cpus)?;
        Ok(dir.join("cgroup.procs"))
    }
}

/// Removes a cgroup directory once its processes are gone (a few tries: a killed process
/// leaves its cgroup a moment after it is reaped).
fn remove_dir(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("lab: could not remove cgroup {}", dir.display());
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.children.iter().rev() {
            remove_dir(dir);
        }
        remove_dir(&self.parent);
    }
}

/// Removes the empty `neuroshard-lab<pid>-<k>` cgroups of lab processes that no longer run.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("neuroshard-lab")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if crate::pid_alive(pid) {
            continue;
        }
        if let Ok(kids) = std::fs::read_dir(e.path()) {
            for k in kids.flatten().filter(|k| k.path().is_dir()) {
                let _ = std::fs::remove_dir(k.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}
