//! The network lab (issue 20 item 4): N real nodes on one machine, each in its own network
//! namespace on a shared bridge (the "public internet"), each access link shaped (rate, loss,
//! latency where the kernel has netem), each node under a CPU quota in its own cgroup, the
//! whole lab under one parent quota. Nodes find each other through a tracker or seed peers;
//! churn kills, restarts and adds nodes at random (seeded); a partition cuts the nodes in two
//! halves and heals. [`Lab::sample`] reads every node's API into one row of the timeline.
//!
//! Used by the `lab` binary (`tests/src/bin/lab.rs`: runs, the throughput sweep, the plot)
//! and by the `lab::` scenario. Needs root, `ip`, `tc` and `nft`.

pub mod cgroup;
pub mod nat;
pub mod net;
pub mod node;
pub mod observe;
pub mod p2p;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub use net::{Link, NatLan, Topology};
pub use node::LabNode;
pub use observe::{Reading, Row};

pub const TRACKER_PORT: u16 = 8765;

/// How nodes find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bootstrap {
    /// A `neuroshard tracker` in a namespace of its own.
    Tracker,
    /// Each node is given up to three running nodes as `seed_peers`.
    Seeds,
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Every node's access link.
    pub link: Link,
    /// CPU cores each node (daemon + engine) may use.
    pub cpus_per_node: f64,
    /// CPU cores the whole lab may use (0: no cap beyond the nodes').
    pub total_cpus: f64,
    pub bootstrap: Bootstrap,
    /// Lines of `neuroshard.toml` for every node (the lab adds host, TLS, ledger and
    /// bootstrap keys).
    pub node_config: String,
    /// Tokens in one training step (batch_size x seq_len of `node_config`).
    pub tokens_per_step: u64,
    /// Seed of churn's choices.
    pub seed: u64,
    /// How long a node may take to come up.
    pub start_timeout: Duration,
}

/// The lab's nodes' default settings: the `tiny` model trained on the CPU with one engine
/// thread, small steps, DiLoCo rounds of 20 inner steps (full replicas) or 30 s (pipeline stages).
pub fn tiny_training(max_layers: u32) -> (String, u64) {
    let (batch, seq) = (2u64, 32u64);
    let resources = if max_layers > 0 {
        format!("max_layers = {max_layers}\n")
    } else {
        String::new()
    };
    (
        format!(
            "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = {batch}\nseq_len = {seq}\n\
             micro_batches = 1\ndiloco_steps = 20\ndiloco_round_timeout_secs = 30\nstage_round_secs = 30\n\
             checkpoint_every = 1000\n[resources]\ndevice = \"cpu\"\ncpu_threads = 1\n{resources}"
        ),
        batch * seq,
    )
}

/// `<pid>-<k>`: this process's k-th lab (labs of one process may run at once, in tests).
pub fn run_name() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{k}", std::process::id())
}

/// Something the lab did, for the events log.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t_s: f64,
    pub what: String,
    pub node: Option<usize>,
}

pub struct Lab {
    // Dropped in this order: processes first, then their cgroups, then the namespaces.
    pub nodes: Vec<LabNode>,
    /// How many times each node (by index) was started.
    generations: Vec<u32>,
    tracker: Option<Child>,
    tracker_url: Option<String>,
    cgroups: cgroup::Cgroups,
    pub topology: Topology,
    dir: tempfile::TempDir,
    opts: LabOptions,
    rng: StdRng,
    started: Instant,
    pub events: Vec<Event>,
    prev: Vec<Reading>,
    prev_at: Option<Instant>,
}

impl Lab {
    /// The network, the cgroups and the tracker (when the bootstrap is one); no node yet.
    /// Namespaces and cgroups are named after this process so a killed run's are found and
    /// removed by the next one.
    pub fn new(opts: LabOptions) -> anyhow::Result<Lab> {
        let name = run_name();
        let topology = Topology::new(&format!("lab{name}"))?;
        let cgroups = cgroup::Cgroups::new(&format!("neuroshard-lab{name}"), opts.total_cpus)?;
        let dir = tempfile::Builder::new().prefix("nslab-").tempdir()?;
        let mut lab = Lab {
            nodes: Vec::new(),
            generations: Vec::new(),
            tracker: None,
            tracker_url: None,
            cgroups,
            topology,
            dir,
            rng: StdRng::seed_from_u64(opts.seed),
            opts,
            started: Instant::now(),
            events: Vec::new(),
            prev: Vec::new(),
            prev_at: None,
        };
        lab.topology.enter_public()?;
        if lab.opts.bootstrap == Bootstrap::Tracker {
            lab.start_tracker()?;
        }
        Ok(lab)
    }

    fn start_tracker(&mut self) -> anyhow::Result<()> {
        let (ns, ip) = self.topology.add_host("tracker", Link::default())?;
        let procs = self.cgroups.child("tracker", 0.0)?;
        let dir = self.dir.path().join("tracker");
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("tracker.log"))?;
        let mut cmd = Command::new(crate::binary("neuroshard"));
        cmd.arg("--data-dir")
            .arg(&dir)
            .args(["tracker", "--host", "0.0.0.0", "--insecure-http"])
            .args(["--port", &TRACKER_PORT.to_string(), "--ttl-secs", "30"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        node::enter(&mut cmd, &ns, &procs)?;
        self.tracker = Some(cmd.spawn().context("spawning the tracker")?);
        let url = format!("http://{ip}:{TRACKER_PORT}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        crate::wait_for(
            "the tracker to answer",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                http.get(format!("{url}/health"))
                    .send()
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )?;
        self.tracker_url = Some(url);
        Ok(())
    }

    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn event(&mut self, what: impl Into<String>, node: Option<usize>) {
        let e = Event {
            t_s: self.elapsed_s(),
            what: what.into(),
            node,
        };
        eprintln!(
            "lab {:>7.1}s  {}{}",
            e.t_s,
            e.what,
            node.map(|n| format!(" node {n}")).unwrap_or_default()
        );
        self.events.push(e);
    }

    /// The bootstrap lines of a new node's config.
    fn bootstrap_config(&mut self) -> String {
        if let Some(url) = &self.tracker_url {
            return format!("tracker_url = {url:?}\n");
        }
        let mut running: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.running())
            .map(LabNode::peer_addr)
            .collect();
        // Up to three, picked at random: a node joining later knows a few, as a user would.
        while running.len() > 3 {
            let i = self.rng.random_range(0..running.len());
            running.swap_remove(i);
        }
        let list: Vec<String> = running.iter().map(|p| format!("{p:?}")).collect();
        format!("seed_peers = [{}]\n", list.join(", "))
    }

    /// Adds a node (its namespace, cgroup and data directory) and starts it; does not wait.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let (ns, ip) = self
            .topology
            .add_host(&format!("n{index}"), self.opts.link)?;
        let procs = self
            .cgroups
            .child(&format!("n{index}"), self.opts.cpus_per_node)?;
        let config = format!("{}{}", self.bootstrap_config(), self.opts.node_config);
        let dir = self.dir.path().join(format!("n{index}"));
        let node = LabNode::start(index, ns, ip, dir, procs, &config)?;
        self.nodes.push(node);
        self.generations.push(0);
        self.event("join", Some(index));
        Ok(index)
    }

    /// Starts `n` nodes one after another, each once it is up (its model loaded), so the
    /// layer pool sees them join in order.
    pub fn add_nodes(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let i = self.add_node()?;
            self.nodes[i]
                .wait_up(self.opts.start_timeout)
                .with_context(|| format!("node {i}:\n{}", tail(&self.nodes[i].logs(), 40)))?;
        }
        Ok(())
    }

    /// Kills node `i` (daemon and engine, SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.event("kill", Some(i));
    }

    /// Starts node `i` again in its data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].spawn()?;
        self.generations[i] += 1;
        self.event("restart", Some(i));
        Ok(())
    }

    /// One churn event chosen at random: kill a running node, restart a killed one, or add
    /// a new one (never below `min_running` running nodes).
    pub fn churn(&mut self, min_running: usize) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .collect();
        let stopped: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].running())
            .collect();
        let choice = self.rng.random_range(0..3u32);
        match choice {
            0 if running.len() > min_running => {
                let i = running[self.rng.random_range(0..running.len())];
                self.kill(i);
            }
            1 if !stopped.is_empty() => {
                let i = stopped[self.rng.random_range(0..stopped.len())];
                self.restart(i)?;
            }
            _ => {
                self.add_node()?;
            }
        }
        Ok(())
    }

    /// Cuts the running nodes in two halves (by index) on the public bridge; the halves.
    pub fn partition(&mut self) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .collect();
        let (a, b) = running.split_at(running.len() / 2);
        let ips = |s: &[usize]| s.iter().map(|&i| self.nodes[i].ip).collect::<Vec<_>>();
        let mut cut_b = ips(b);
        // The tracker stays with the second half.
        if let Some(url) = &self.tracker_url {
            let host = url
                .trim_start_matches("http://")
                .split(':')
                .next()
                .unwrap_or("");
            cut_b.extend(host.parse::<std::net::Ipv4Addr>().ok());
        }
        self.topology.partition(&ips(a), &cut_b)?;
        self.event(format!("partition {a:?} | {b:?}"), None);
        Ok((a.to_vec(), b.to_vec()))
    }

    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.topology.heal()?;
        self.event("heal", None);
        Ok(())
    }

    /// Reads every node and makes the timeline's next row.
    pub fn sample(&mut self, partitioned: bool) -> (Row, Vec<Reading>) {
        // One thread per node: a starved node's slow answers must not delay the others'
        // (the threads start in this thread's namespace, the public one).
        let generations = &self.generations;
        let readings: Vec<Reading> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .filter(|n| n.running())
                .map(|n| s.spawn(move || Reading::of(n, generations[n.index])))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let now = Instant::now();
        let dt = self.prev_at.map_or(0.0, |p| (now - p).as_secs_f64());
        let row = observe::summarize(
            self.elapsed_s(),
            &self.prev,
            &readings,
            dt,
            self.opts.tokens_per_step,
            partitioned,
        );
        self.prev = readings.clone();
        self.prev_at = Some(now);
        (row, readings)
    }

    /// The last `lines` of every node's log (for a failure).
    pub fn logs(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "----- lab node {} ({}) -----\n{}",
                    n.index,
                    n.ip,
                    tail(&n.logs(), lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Copies every node's log into `out` (`n<i>.log`).
    pub fn save_logs(&self, out: &Path) -> anyhow::Result<()> {
        for n in &self.nodes {
            std::fs::write(out.join(format!("n{}.log", n.index)), n.logs())?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop every node at once (SIGTERM), then wait: 100 nodes one by one would take long.
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for n in &mut self.nodes {
            n.stop();
        }
        if let Some(mut t) = self.tracker.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Appends `value` as one JSON line to `file`.
pub fn write_json_line(file: &mut std::fs::File, value: &impl Serialize) -> anyhow::Result<()> {
    writeln!(file, "{}", serde_json::to_string(value)?)?;
    Ok(())
}

/// Writes `rows` as CSV (header from the first row's fields).
pub fn write_csv(path: &PathBuf, rows: &[Row]) -> anyhow::Result<()> {
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let v = serde_json::to_value(r)?;
        let obj = v.as_object().context("a row is an object")?;
        if i == 0 {
            out.push_str(&obj.keys().cloned().collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out.push_str(
            &obj.values()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}
