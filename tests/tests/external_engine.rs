//! `--engine external`: a service manager runs the engine; the daemon connects to it, keeps
//! answering while it is gone, and re-attaches when it is back.

use std::time::Duration;

use neuroshard_tests::{EngineProcess, Node, NodeOptions, wait_for};

#[test]
fn the_daemon_follows_an_externally_managed_engine() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let log = dir.path().join("engine.log");
    let engine = EngineProcess::start(&socket, &log).unwrap();

    let opts = NodeOptions {
        extra_args: vec![
            "--engine".into(),
            "external".into(),
            "--engine-socket".into(),
            socket.display().to_string(),
        ],
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    // The daemon spawned nothing itself.
    assert_eq!(node.engine_pid(), None);

    drop(engine);
    wait_for(
        "gpu check not ok",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let (code, body) = node.get("/api/v1/health")?;
            assert_eq!(code, 200);
            (body["checks"]["gpu"] == "restarting").then_some(())
        },
    )
    .unwrap();

    // The service manager brings it back; the daemon re-attaches.
    let _engine = EngineProcess::start(&socket, &log).unwrap();
    node.wait_healthy(Duration::from_secs(15)).unwrap();
}
