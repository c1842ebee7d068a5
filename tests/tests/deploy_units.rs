//! The deployment files are valid: the systemd units pass `systemd-analyze verify` (with the
//! binaries pointed at this build), and the example config is the daemon's defaults.

use std::process::Command;

fn deploy(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let bins = neuroshard_tests::bin_dir();
    neuroshard_tests::binary("neuroshard");
    neuroshard_tests::binary("neuroshard-engine");
    let mut units = Vec::new();
    for unit in ["neuroshard.service", "neuroshard-engine.service"] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        let path = dir.path().join(unit);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/", &format!("{}/", bins.display())),
        )
        .unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze must be installed (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify exits 0 on some warnings; treat any line about our units as a failure.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("neuroshard"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");

    // The engine unit restarts on its own; the daemon unit connects to it.
    let engine = std::fs::read_to_string(&units[1]).unwrap();
    assert!(engine.contains("Restart=always"));
    let daemon = std::fs::read_to_string(&units[0]).unwrap();
    assert!(daemon.contains("--engine external"));
}

#[test]
fn the_example_config_is_the_defaults() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let cfg = neuroshard::config::Config::load(&deploy("neuroshard.toml")).unwrap();
    assert_eq!(cfg, neuroshard::config::Config::default());
}

#[test]
fn the_supervisord_config_names_both_programs() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let text = std::fs::read_to_string(deploy("supervisord/neuroshard.conf")).unwrap();
    assert!(text.contains("[program:neuroshard-engine]"));
    assert!(text.contains("[program:neuroshard]"));
    assert!(text.contains("--engine external"));
}
