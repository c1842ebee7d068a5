//! The peer-to-peer stacks on the NAT lab (issue 21 item 1, "chosen by measuring both"):
//! for iroh and rust-libp2p, a relay on the public bridge and servers and clients on public
//! hosts and behind endpoint-independent and symmetric NATs; for each pair, whether the
//! connection ends direct or relayed, the set-up time, a 64 MiB download's throughput and
//! both processes' CPU seconds per GB, hole punching allowed and relay only; and plain
//! HTTP/2 over TCP between two public hosts (what our gRPC uses today).
//!
//!   p2p-bench --reps 3 --out target/p2p-bench.jsonl
//!
//!   p2p-bench --daemon-transport --reps 3 --out target/transport-bench.jsonl
//!
//! `--daemon-transport` measures the daemon's own peer transport against plain gRPC on
//! loopback instead (`neuroshard_tests::transport_bench`; no root). The lab needs root,
//! `ip`, `nft`, and the bench binaries (`cargo build --release --manifest-path
//! bench/p2p/Cargo.toml`). Prints a Markdown table (BENCHMARKS.md) and writes every report
//! as a JSON line to --out.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use neuroshard_tests::lab::nat::{Host, NatKind, NatLab, Placement};
use neuroshard_tests::lab::p2p::{self, ClientOptions, P2pRun, Stack};
use neuroshard_tests::transport_bench;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "iroh against rust-libp2p (and HTTP/2 over TCP) on the NAT lab")]
struct Cli {
    #[arg(long, value_delimiter = ',', default_value = "iroh,libp2p")]
    stacks: Vec<Stack>,
    /// Runs of each pair.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 64 << 20)]
    bytes: u64,
    /// How long a client waits for a direct path before it measures.
    #[arg(long, default_value_t = 10.0)]
    wait_direct_s: f64,
    #[arg(long, default_value = "target/p2p-bench.jsonl")]
    out: PathBuf,
    /// Instead of the lab: the daemon's own peer transport (its swarm, TCP and QUIC) against
    /// plain tonic over TCP on loopback, CPU seconds per GB (no root needed).
    #[arg(long)]
    daemon_transport: bool,
    /// --daemon-transport: MiB of one call (one activation tensor).
    #[arg(long, default_value_t = 4)]
    chunk_mib: usize,
    /// --daemon-transport: MiB pushed in each run.
    #[arg(long, default_value_t = 1024)]
    total_mib: u64,
}

const EIM: Placement = Placement::Behind(NatKind::EndpointIndependent);
const SYM: Placement = Placement::Behind(NatKind::Symmetric);

/// (server, client) placements.
const PAIRS: [(Placement, Placement); 6] = [
    (Placement::Public, Placement::Public),
    (Placement::Public, EIM),
    (EIM, Placement::Public),
    (EIM, EIM),
    (EIM, SYM),
    (SYM, SYM),
];

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// One table row from a pair's reports.
fn row(stack: &str, pair: &str, mode: &str, reports: &[Value], runs: usize) -> String {
    let f = |path: &[&str]| -> Vec<f64> {
        reports
            .iter()
            .filter_map(|r| {
                let mut v = r;
                for p in path {
                    v = v.get(p)?;
                }
                v.as_f64()
            })
            .collect()
    };
    let direct = reports.iter().filter(|r| r["path"] == "direct").count();
    let relay_per_gb: Vec<f64> = reports
        .iter()
        .filter_map(|r| {
            let gb = r["transfer"]["bytes"].as_f64()? / 1e9;
            Some(r["relay_cpu_s"].as_f64()? / gb)
        })
        .collect();
    format!(
        "| {stack} | {pair} | {mode} | {direct}/{runs} | {} | {} | {} | {} | {} | {} |",
        fmt(median(f(&["first_rtt_ms"])), 0),
        fmt(median(f(&["direct_ms"])), 0),
        fmt(median(f(&["transfer", "mbit_s"])), 0),
        fmt(median(f(&["transfer", "cpu_s_per_gb"])), 2),
        fmt(median(relay_per_gb), 2),
        runs - reports.len(),
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(d) = cli.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut out = std::fs::File::create(&cli.out).context("creating --out")?;
    if cli.daemon_transport {
        let options = transport_bench::Options {
            chunk: cli.chunk_mib << 20,
            total: cli.total_mib << 20,
            reps: cli.reps,
        };
        let rt = tokio::runtime::Runtime::new()?;
        let reports = rt.block_on(transport_bench::run(options))?;
        for r in &reports {
            eprintln!("{r}");
            writeln!(out, "{r}")?;
        }
        println!("{}", transport_bench::table(&reports));
        return Ok(());
    }
    let mut lab = NatLab::new()?;
    let mut hosts: Vec<(Placement, Host, Host)> = Vec::new();
    for (i, p) in [Placement::Public, EIM, SYM].into_iter().enumerate() {
        let a = lab.add_host(&format!("h{i}a"), p)?;
        let b = lab.add_host(&format!("h{i}b"), p)?;
        hosts.push((p, a, b));
    }
    let host = |p: Placement, second: bool| {
        let (_, a, b) = hosts.iter().find(|(q, _, _)| *q == p).expect("placed");
        if second { b.clone() } else { a.clone() }
    };
    let mut table = vec![
        "| stack | server <- client | mode | direct | first answer ms | direct after ms | Mbit/s | CPU s/GB (ends) | relay CPU s/GB | failed |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for &stack in &cli.stacks {
        let mut run = P2pRun::start(&mut lab, stack)?;
        for (_, a, b) in hosts.clone() {
            run.start_server(&mut lab, &a, &a.ns)?;
            run.start_server(&mut lab, &b, &b.ns)?;
        }
        for (sp, cp) in PAIRS {
            let server = host(sp, false);
            // The client is the pair's other host when both sit alike.
            let client = host(cp, sp == cp);
            let modes: &[bool] = if sp == cp || sp == Placement::Public {
                &[false, true]
            } else {
                &[false]
            };
            for &relay_only in modes {
                let mut reports = Vec::new();
                for rep in 0..cli.reps {
                    let opts = ClientOptions {
                        bytes: cli.bytes,
                        // Relay only never turns direct: no wait.
                        wait_direct_s: if relay_only { 0.0 } else { cli.wait_direct_s },
                        relay_only,
                        ..ClientOptions::default()
                    };
                    let result = run.client(
                        &mut lab,
                        &client,
                        &server.ns,
                        &opts,
                        Duration::from_secs(180),
                    );
                    let pair = format!("{} <- {}", sp.label(), cp.label());
                    let mut line = json!({"stack": format!("{stack:?}"), "pair": pair, "rep": rep});
                    match result {
                        Ok(r) => {
                            eprintln!("{stack:?} {pair} relay_only={relay_only}: {r}");
                            line["report"] = r.clone();
                            reports.push(r);
                        }
                        Err(e) => {
                            eprintln!("{stack:?} {pair} relay_only={relay_only}: FAILED {e:#}");
                            line["error"] = json!(format!("{e:#}"));
                        }
                    }
                    writeln!(out, "{line}")?;
                }
                let mode = if relay_only {
                    "relay only"
                } else {
                    "hole punching"
                };
                let pair = format!("{} <- {}", sp.label(), cp.label());
                table.push(row(&format!("{stack:?}"), &pair, mode, &reports, cli.reps));
            }
        }
        run.stop_relay(&mut lab);
    }
    // The baseline: HTTP/2 over plain TCP, public to public.
    let iroh = p2p::binary(Stack::Iroh)?;
    let (server, client) = (
        host(Placement::Public, false),
        host(Placement::Public, true),
    );
    let listen = format!("{}:7000", server.ip);
    let dir = tempfile::tempdir()?;
    lab.spawn(
        &server,
        &iroh,
        &["h2-server".into(), "--listen".into(), listen.clone()],
        &dir.path().join("h2.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut reports = Vec::new();
    for rep in 0..cli.reps {
        let c = lab.spawn(
            &client,
            &iroh,
            &[
                "h2-client".into(),
                "--connect".into(),
                listen.clone(),
                "--bytes".into(),
                cli.bytes.to_string(),
            ],
            &dir.path().join("h2-client.log"),
        )?;
        let child = lab.child(c);
        let status = child.wait()?;
        let mut text = String::new();
        if let Some(mut s) = child.stdout.take() {
            use std::io::Read;
            s.read_to_string(&mut text)?;
        }
        let line = text.lines().last().unwrap_or_default();
        eprintln!("h2 public <- public ({status}): {line}");
        let r: Value = serde_json::from_str(line).unwrap_or(json!({"error": text}));
        writeln!(
            out,
            "{}",
            json!({"stack": "h2-tcp", "pair": "public <- public", "rep": rep, "report": r})
        )?;
        if r.get("error").is_none() {
            reports.push(r);
        }
    }
    table.push(row(
        "HTTP/2 over TCP",
        "public <- public",
        "direct",
        &reports,
        cli.reps,
    ));
    println!("{}", table.join("\n"));
    Ok(())
}
