//! The dashboard in a real headless browser (Debian's `chromium`, installed by
//! scripts/test.sh) against a real node: live figures appear and change, wallet data shows
//! with a token, and a screenshot is saved as a CI artifact (target/artifacts/dashboard.png).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, wait_for};

fn chromium() -> &'static str {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is installed (scripts/test.sh installs Debian's chromium)")
}

fn browser(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=6000", "--window-size=1400,1500"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text of the element with this id in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let open = start + dom[start..].find('>').unwrap() + 1;
    let close = open + dom[open..].find('<').unwrap();
    dom[open..close].trim().to_string()
}

/// The markup of the chart with this id in a dumped DOM.
fn chart_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let end = start + dom[start..].find("</svg>").unwrap();
    &dom[start..end]
}

#[test]
fn dashboard_shows_live_figures_in_a_real_browser() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n"
            .into(),
        ..NodeOptions::default()
    };
    let node = Node::start(opts.clone()).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    // A second node holding the same layers: the coverage view counts both.
    let _replica = Node::start(opts.with_seed_peers(&[node.peer_addr()])).unwrap();
    wait_for(
        "the replica to connect and load its layers",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let (_, n) = node.get("/api/v1/network")?;
            (n["coverage"]["min_replicas"].as_u64()? == 2).then_some(())
        },
    )
    .unwrap();
    wait_for(
        "training steps",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let (_, s) = node.get("/api/v1/status")?;
            (s["training"]["step"].as_u64()? > 5).then_some(())
        },
    )
    .unwrap();
    let cookie = node.api_token().unwrap();
    let url = format!("{}#token={}", node.url("/"), cookie.trim());

    let first = browser(&["--dump-dom"], &url);
    let (_, status) = node.get("/api/v1/status").unwrap();
    assert_eq!(
        text_of(&first, "node-id"),
        status["node_id"].as_str().unwrap()
    );
    assert_eq!(text_of(&first, "healthy"), "healthy");
    let step1: u64 = text_of(&first, "step").parse().expect("a step number");
    assert!(step1 > 5, "{step1}");
    assert!(text_of(&first, "loss").parse::<f64>().is_ok());
    assert!(
        chart_of(&first, "loss-chart").contains("<polyline"),
        "no loss curve drawn"
    );
    assert_eq!(
        text_of(&first, "address"),
        status["wallet_address"].as_str().unwrap()
    );
    assert!(text_of(&first, "available").ends_with("NEURO"));
    // Network coverage: both tiny layers, each held by this node and the replica.
    assert_eq!(
        text_of(&first, "coverage"),
        "every layer held, at least 2× (2 nodes)"
    );
    assert_eq!(
        first.matches("<b>×2</b>").count(),
        2,
        "one ×2 cell per layer"
    );

    let second = browser(&["--dump-dom"], &url);
    let step2: u64 = text_of(&second, "step").parse().unwrap();
    assert!(
        step2 > step1,
        "figures did not change: step {step1} then {step2}"
    );

    // Throughput and peer samples (one every 2 s): a few, with the replica counted.
    wait_for(
        "throughput and peer samples",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let (_, h) = node.get("/api/v1/training/history")?;
            let tps = h["tokens_per_second"].as_array()?;
            let peers = h["peers"].as_array()?;
            let trained = tps.iter().any(|p| p[1].as_f64().is_some_and(|v| v > 0.0));
            (tps.len() >= 3 && trained && peers.last()?[1] == 1).then_some(())
        },
    )
    .unwrap();
    let plots = browser(&["--dump-dom"], &url);
    // Tokens per second and peers over time, next to the loss.
    for chart in ["tps-chart", "peers-chart"] {
        let svg = chart_of(&plots, chart);
        assert!(svg.contains("<polyline"), "no {chart} drawn: {svg}");
        assert!(
            svg.matches(',').count() >= 3,
            "{chart} has fewer than 3 points: {svg}"
        );
    }
    assert_eq!(text_of(&plots, "peer-now"), "1");
    assert!(text_of(&plots, "tps").parse::<f64>().is_ok());
    // Pending funds and when they are released: nothing pending on a fresh node.
    assert_eq!(text_of(&plots, "pending-release"), "nothing pending");

    // Without a token the page shows the public figures and asks for one.
    let public = browser(&["--dump-dom"], &node.url("/"));
    assert!(text_of(&public, "step").parse::<u64>().is_ok());
    assert!(public.contains("Enter an API token"));

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browser(&[&format!("--screenshot={}", shot.display())], &url);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", shot.display());
}
