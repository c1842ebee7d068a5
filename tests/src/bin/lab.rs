//! The network lab (issue 20 items 4 and 6): real nodes in network namespaces with shaped
//! links and CPU quotas, churn and a partition that heals, and the figures made with it.
//!
//!   lab run --nodes 8 --duration-secs 300 --churn-every-secs 30 --partition-at-secs 120
//!   lab scale --counts 1,2,4,8,16 --window-secs 60 --out target/lab-scale
//!   lab plot docs/lab-throughput.png target/lab-scale/scale.csv="full replicas"
//!
//! Needs root, `ip`, `tc`, `nft` and the built binaries (`cargo build --workspace --bins`);
//! tears everything down on exit, on an error and on ^C. Everything it writes goes to --out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use neuroshard_tests::lab::{self, Bootstrap, Lab, LabOptions, Link, Row};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "NeuroShard network lab: nodes in namespaces, netem, CPU quotas, churn")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs N nodes for a while with churn and a partition; writes the timeline.
    Run(RunArgs),
    /// Network training throughput for growing node counts; writes scale.csv and the plot.
    Scale(ScaleArgs),
    /// Plots scale.csv files (`FILE` or `FILE=LABEL`) into one PNG (python3, matplotlib).
    Plot {
        png: PathBuf,
        #[arg(required = true)]
        csv: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// CPU cores per node (daemon + engine), a CFS quota.
    #[arg(long, default_value_t = 0.25)]
    cpus_per_node: f64,
    /// CPU cores for the whole lab (0: no cap beyond the nodes').
    #[arg(long, default_value_t = 1.0)]
    total_cpus: f64,
    /// One-way delay of each access link, ms (needs a kernel with sch_netem).
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// Bandwidth of each access link, Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// Packet loss of each access link, percent.
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    #[arg(long, value_enum, default_value_t = Bootstrap::Tracker)]
    bootstrap: Bootstrap,
    /// resources.max_layers of every node (0: as many as fit: full replicas of `tiny`).
    #[arg(long, default_value_t = 0)]
    max_layers: u32,
    /// Nodes do not train (to measure idle memory).
    #[arg(long)]
    no_training: bool,
    /// Seed of churn's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds a node may take to come up.
    #[arg(long, default_value_t = 180)]
    start_timeout_secs: u64,
    /// Output folder.
    #[arg(long, default_value = "target/lab")]
    out: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// Seconds between churn events (0: none).
    #[arg(long, default_value_t = 0)]
    churn_every_secs: u64,
    /// Churn never leaves fewer running nodes than this.
    #[arg(long, default_value_t = 2)]
    min_running: usize,
    /// When the partition starts, and how long it lasts (0: none).
    #[arg(long, default_value_t = 0)]
    partition_at_secs: u64,
    #[arg(long, default_value_t = 30)]
    partition_for_secs: u64,
    /// When to kill the sole holder of some layer (0: never): the summary says how long
    /// until another node holds its layers and the network trains again.
    #[arg(long, default_value_t = 0)]
    kill_sole_holder_at_secs: u64,
}

#[derive(Args)]
struct ScaleArgs {
    #[command(flatten)]
    common: Common,
    /// Node counts to measure, one fresh lab each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    counts: Vec<usize>,
    /// Seconds of training measured at each count (after the first step).
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the lab down");
    }
    Ok(())
}

/// Sleeps `d`, waking early on ^C.
fn nap(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        interrupted()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(200)));
    }
    interrupted()
}

fn options(c: &Common) -> LabOptions {
    let (mut node_config, tokens_per_step) = lab::tiny_training(c.max_layers);
    if c.no_training {
        node_config = node_config.replace("enabled = true", "enabled = false");
    }
    LabOptions {
        link: Link {
            delay_ms: c.delay_ms,
            rate_mbit: c.rate_mbit,
            loss_pct: c.loss_pct,
        },
        cpus_per_node: c.cpus_per_node,
        total_cpus: c.total_cpus,
        bootstrap: c.bootstrap,
        node_config,
        tokens_per_step,
        seed: c.seed,
        start_timeout: Duration::from_secs(c.start_timeout_secs),
    }
}

#[derive(Serialize)]
struct RunSummary {
    nodes_started: usize,
    duration_s: f64,
    /// Memory per node once all were up, before churn (MiB, daemon + engine).
    pss_per_node_mib_at_start: f64,
    rss_per_node_mib_at_start: f64,
    pss_per_node_mib_max: f64,
    /// Seconds from each kill until every answering node saw every layer held again.
    coverage_returns_s: Vec<f64>,
    /// The sole holder killed, its layers, and the seconds until a running node held them
    /// and the network's step count moved again (None: not within the run).
    sole_holder_killed: Option<(usize, Vec<u64>)>,
    sole_holder_replaced_after_s: Option<f64>,
    /// Seconds from the heal until the ledger roots agreed again (None: not within the run).
    ledger_converged_after_heal_s: Option<f64>,
    final_row: Option<Row>,
    min_stage_agreement_after_rounds: f64,
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let out = a.common.out.clone();
    std::fs::create_dir_all(&out)?;
    let mut lab = Lab::new(options(&a.common))?;
    let result = run_in(&mut lab, &a, &out);
    let _ = lab.save_logs(&out);
    if result.is_err() {
        eprintln!("{}", lab.logs(30));
    }
    result
}

fn run_in(lab: &mut Lab, a: &RunArgs, out: &Path) -> anyhow::Result<()> {
    let mut timeline = std::fs::File::create(out.join("timeline.jsonl"))?;
    let mut rows: Vec<Row> = Vec::new();
    for _ in 0..a.nodes {
        interrupted()?;
        let i = lab.add_node()?;
        lab.nodes[i].wait_up(Duration::from_secs(a.common.start_timeout_secs))?;
    }
    let (first, mut readings) = lab.sample(false);
    let start_memory = (first.pss_mean_mib, first.rss_mean_mib);
    eprintln!(
        "lab: {} nodes up; memory per node {:.1} MiB PSS, {:.1} MiB RSS",
        a.nodes, first.pss_mean_mib, first.rss_mean_mib
    );
    let t0 = Instant::now();
    let mut next_churn = a.churn_every_secs;
    let mut partitioned = false;
    let mut healed_at: Option<f64> = None;
    let mut ledger_converged_after_heal_s = None;
    let mut pending_kills: Vec<f64> = Vec::new();
    let mut coverage_returns_s = Vec::new();
    let mut min_agreement: f64 = 1.0;
    // (node, its layers, when)
    let mut sole: Option<(usize, Vec<u64>, f64)> = None;
    let mut sole_replaced = None;
    while t0.elapsed() < Duration::from_secs(a.duration_secs) {
        nap(Duration::from_secs(a.sample_secs))?;
        let t = t0.elapsed().as_secs();
        if a.partition_at_secs > 0
            && !partitioned
            && healed_at.is_none()
            && t >= a.partition_at_secs
        {
            lab.partition()?;
            partitioned = true;
        }
        if partitioned && t >= a.partition_at_secs + a.partition_for_secs {
            lab.heal()?;
            partitioned = false;
            healed_at = Some(lab.elapsed_s());
        }
        if a.churn_every_secs > 0 && t >= next_churn {
            next_churn += a.churn_every_secs;
            let kills = lab.events.len();
            lab.churn(a.min_running)?;
            if lab.events[kills..].iter().any(|e| e.what == "kill") {
                pending_kills.push(lab.elapsed_s());
            }
        }
        if a.kill_sole_holder_at_secs > 0 && sole.is_none() && t >= a.kill_sole_holder_at_secs {
            let held = |r: &lab::Reading, l: u64| r.answered && r.layers.contains(&l);
            let victim = readings.iter().find(|r: &&lab::Reading| {
                r.answered
                    && r.layers
                        .iter()
                        .any(|&l| readings.iter().filter(|o| held(o, l)).count() == 1)
            });
            match victim {
                Some(v) => {
                    let (i, layers) = (v.index, v.layers.clone());
                    lab.kill(i);
                    sole = Some((i, layers, lab.elapsed_s()));
                }
                None => eprintln!("lab: no layer has a sole holder now; nobody killed"),
            }
        }
        let (row, now) = lab.sample(partitioned);
        readings = now;
        if let Some((_, layers, at)) = &sole
            && sole_replaced.is_none()
            && readings
                .iter()
                .any(|r| r.answered && layers.iter().all(|l| r.layers.contains(l)))
            && row.tokens_per_s > 0.0
        {
            sole_replaced = Some(row.t_s - at);
        }
        if row.coverage_ok >= 1.0 {
            coverage_returns_s.extend(pending_kills.drain(..).map(|k| row.t_s - k));
        }
        if let Some(h) = healed_at
            && ledger_converged_after_heal_s.is_none()
            && row.ledger_roots == 1
        {
            ledger_converged_after_heal_s = Some(row.t_s - h);
        }
        if !partitioned && row.steps_total > 0 {
            min_agreement = min_agreement.min(row.stage_agreement_min);
        }
        eprintln!(
            "lab {:>7.1}s  up {}/{}  {:>7.1} tok/s  coverage {:.2}  stages {} agree {:.2}  ledger roots {}  peers {}..{}  pss {:.0} MiB",
            row.t_s,
            row.nodes_answering,
            row.nodes_running,
            row.tokens_per_s,
            row.coverage_ok,
            row.stages,
            row.stage_agreement_min,
            row.ledger_roots,
            row.peers_min,
            row.peers_max,
            row.pss_mean_mib
        );
        lab::write_json_line(&mut timeline, &row)?;
        rows.push(row);
    }
    lab::write_csv(&out.join("timeline.csv"), &rows)?;
    let mut events = std::fs::File::create(out.join("events.jsonl"))?;
    for e in &lab.events {
        lab::write_json_line(&mut events, e)?;
    }
    let summary = RunSummary {
        nodes_started: lab.nodes.len(),
        duration_s: t0.elapsed().as_secs_f64(),
        pss_per_node_mib_at_start: start_memory.0,
        rss_per_node_mib_at_start: start_memory.1,
        pss_per_node_mib_max: rows.iter().map(|r| r.pss_max_mib).fold(0.0, f64::max),
        coverage_returns_s,
        sole_holder_killed: sole.map(|(i, l, _)| (i, l)),
        sole_holder_replaced_after_s: sole_replaced,
        ledger_converged_after_heal_s,
        final_row: rows.last().cloned(),
        min_stage_agreement_after_rounds: min_agreement,
    };
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(out.join("summary.json"), &text)?;
    println!("{text}");
    Ok(())
}

#[derive(Serialize, Clone)]
struct ScalePoint {
    nodes: usize,
    tokens_per_s: f64,
    stages: usize,
    pss_per_node_mib: f64,
}

fn scale(a: ScaleArgs) -> anyhow::Result<()> {
    let out = a.common.out.clone();
    std::fs::create_dir_all(&out)?;
    let mut points = Vec::new();
    for &n in &a.counts {
        interrupted()?;
        let mut lab = Lab::new(options(&a.common))?;
        let point = measure(&mut lab, n, a.window_secs);
        let _ = lab.save_logs(&out);
        drop(lab);
        let point = point.with_context(|| format!("{n} nodes"))?;
        eprintln!(
            "lab scale: {n} nodes: {:.1} tokens/s, {} stages, {:.1} MiB per node",
            point.tokens_per_s, point.stages, point.pss_per_node_mib
        );
        points.push(point);
        let mut csv = String::from("nodes,tokens_per_s,stages,pss_per_node_mib\n");
        for p in &points {
            csv.push_str(&format!(
                "{},{:.2},{},{:.1}\n",
                p.nodes, p.tokens_per_s, p.stages, p.pss_per_node_mib
            ));
        }
        std::fs::write(out.join("scale.csv"), csv)?;
    }
    let csv = out.join("scale.csv").to_string_lossy().to_string();
    plot(&out.join("scale.png"), &[csv])
}

/// Starts `n` nodes, waits for the first training step, and measures the network's tokens
/// over `window_secs`.
fn measure(lab: &mut Lab, n: usize, window_secs: u64) -> anyhow::Result<ScalePoint> {
    for _ in 0..n {
        interrupted()?;
        let i = lab.add_node()?;
        lab.nodes[i].wait_up(Duration::from_secs(300))?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        nap(Duration::from_secs(2))?;
        let (row, _) = lab.sample(false);
        if row.steps_total > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no training step within 300 s:\n{}", lab.logs(20));
        }
    }
    lab.sample(false);
    nap(Duration::from_secs(window_secs))?;
    let (row, _) = lab.sample(false);
    Ok(ScalePoint {
        nodes: n,
        tokens_per_s: row.tokens_per_s,
        stages: row.stages,
        pss_per_node_mib: row.pss_mean_mib,
    })
}

/// `scripts/lab-plot.py png csv...`.
fn plot(png: &Path, csv: &[String]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab-plot.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .arg(png)
        .args(csv)
        .status()
        .context("running python3 scripts/lab-plot.py")?;
    if !status.success() {
        bail!("scripts/lab-plot.py failed ({status}): pip install matplotlib");
    }
    eprintln!("lab: wrote {}", png.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The nodes' binaries are beside this one unless the environment says otherwise.
    if std::env::var_os("NEUROSHARD_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("the lab binary's folder")?;
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("NEUROSHARD_BIN_DIR", dir) };
    }
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action)?;
        nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGTERM, &action)?;
    }
    match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Scale(a) => scale(a),
        Cmd::Plot { png, csv } => plot(&png, &csv),
    }
}
