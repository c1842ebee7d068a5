//! Machine figures for `/status`: CPU use and RAM, sampled in the background so a request
//! never waits on a measurement interval.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    pub cpu_percent: f32,
    pub ram_used: u64,
    pub ram_total: u64,
}

/// Latest sample, refreshed every `every` by a background task.
#[derive(Clone, Default)]
pub struct Sampler {
    latest: Arc<Mutex<Resources>>,
}

impl Sampler {
    pub fn start(every: Duration) -> Sampler {
        let sampler = Sampler::default();
        let latest = sampler.latest.clone();
        tokio::task::spawn_blocking(move || {
            let mut sys = sysinfo::System::new();
            loop {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let sample = Resources {
                    cpu_percent: sys.global_cpu_usage(),
                    ram_used: sys.used_memory(),
                    ram_total: sys.total_memory(),
                };
                *latest.lock() = sample;
                // The sampler ends with the process; only the last Arc holder keeps it alive.
                if Arc::strong_count(&latest) == 1 {
                    return;
                }
                std::thread::sleep(every.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
            }
        });
        sampler
    }

    pub fn latest(&self) -> Resources {
        *self.latest.lock()
    }
}

/// Free bytes on the filesystem holding `path`.
pub fn free_disk(path: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}
