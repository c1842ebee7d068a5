//! A node as a user runs it: start, health, engine crash, daemon crash, clean stop.

use std::time::{Duration, Instant};

use neuroshard_shared::shm::segment_name_for;
use neuroshard_tests::{Node, NodeOptions, pid_alive, shm_entries, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const START: Duration = Duration::from_secs(30);

fn shm_name(node: &Node) -> String {
    segment_name_for(node.data_dir())
        .trim_start_matches('/')
        .to_string()
}

#[test]
fn a_started_node_is_healthy_and_reports_its_status() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions::default()).unwrap();
    let health = node.wait_healthy(START).unwrap();
    assert_eq!(health["checks"]["network"], "ok");
    assert_eq!(health["checks"]["storage"], "ok");
    assert_eq!(health["checks"]["peers"], "ok");

    let (code, status) = node.get("/api/v1/status").unwrap();
    assert_eq!(code, 200);
    assert_eq!(status["status"], "running");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["node_id"].as_str().unwrap().starts_with("node_"));
    assert!(status["uptime_seconds"].as_u64().is_some());
    assert!(status["resources"]["ram_used"].as_u64().unwrap() > 0);
    assert!(status["resources"]["cpu_percent"].as_f64().is_some());
    assert_eq!(status["training"]["enabled"], false);

    // The shm segment exists while the node runs, under the node's own name.
    assert_eq!(shm_entries(&shm_name(&node)).len(), 1);

    // Errors use the contract's body.
    let (code, body) = node.get("/api/v1/nope").unwrap();
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "NOT_FOUND");
}

#[test]
fn health_keeps_answering_while_a_killed_engine_is_restarted() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let first = node.engine_pid().expect("one engine child");
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();

    let killed_at = Instant::now();
    let mut saw_not_ok = false;
    loop {
        let (code, body) = node
            .get("/api/v1/health")
            .expect("health must answer on every poll");
        assert_eq!(code, 200, "health during an engine restart: {body}");
        let gpu = body["checks"]["gpu"].as_str().unwrap().to_string();
        if gpu != "ok" {
            saw_not_ok = true;
            assert_eq!(gpu, "restarting");
        } else if saw_not_ok || node.engine_pid().is_some_and(|p| p != first) {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "engine not back within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = node.engine_pid().expect("a new engine");
    assert_ne!(first, second);
    assert!(node.logs().contains("engine lost; restarting"));
}

#[test]
fn a_killed_daemon_takes_its_engine_down_and_the_next_start_reclaims_the_segment() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let mut node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let engine = node.engine_pid().unwrap();
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(5)).unwrap();

    wait_for(
        "engine exit",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (!pid_alive(engine)).then_some(()),
    )
    .unwrap();
    // The crash left the segment behind...
    assert_eq!(shm_entries(&shm_name(&node)).len(), 1);

    // ...and the next start reclaims it and runs normally.
    node.spawn().unwrap();
    node.wait_healthy(START).unwrap();
    assert!(node.logs().contains("reclaimed a shared-memory segment"));
    assert_eq!(shm_entries(&shm_name(&node)).len(), 1);
}

#[test]
fn a_clean_stop_leaves_no_segment_socket_or_pid_file() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let mut node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let engine = node.engine_pid().unwrap();
    let socket = node.data_dir().join("engine.sock");
    assert!(socket.exists());

    let out = std::process::Command::new(neuroshard_tests::binary("neuroshard"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .arg("stop")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.wait_exit(Duration::from_secs(30)).unwrap(), Some(0));
    assert!(!pid_alive(engine));
    assert!(shm_entries(&shm_name(&node)).is_empty());
    assert!(!socket.exists());
    assert!(!node.data_dir().join("neuroshard.pid").exists());
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions::default()).unwrap();
    node.wait_healthy(START).unwrap();
    let out = std::process::Command::new(neuroshard_tests::binary("neuroshard"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .arg("start")
        .arg("--port")
        .arg(neuroshard_tests::free_port_pair().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The running node is untouched.
    node.wait_healthy(START).unwrap();
}
