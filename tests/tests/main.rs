//! The scenarios: one test binary, so the heavy dependencies (control, engine, tonic, sqlx)
//! are linked once instead of once per file. Each file of this folder is a module; the
//! `*_common` folders are what several of them share.
//!
//! Every test starts with `let _scenario = neuroshard_tests::scenario(module_path!());`: the
//! tests of one module run in parallel (libtest's `--test-threads`), those of different modules
//! never at once, as when each file was a binary of its own (`tests/src/scenario.rs`).
//!
//! Pick tests by module: `cargo test -p neuroshard-tests --test node -- ledger_crash::
//! network_ledger::`.

mod diloco_common;
mod fraud_common;
mod network_common;
mod pipeline_common;

mod api;
mod architecture;
mod checked_work;
mod cli;
mod concurrent_inference;
mod dashboard;
mod deploy_units;
mod dht;
mod diloco;
mod diloco_attack;
mod diloco_restart;
mod engine_data_path;
mod external_engine;
mod faults;
mod hostile;
mod hostile_sockets;
mod inference_check;
mod lab;
mod ledger_crash;
mod model_export;
mod nat;
mod network_ledger;
mod network_peer_auth;
mod network_stall;
mod node_lifecycle;
mod openai_client;
mod peer_flood;
mod pipeline;
mod pipeline_inference;
mod pipeline_takeover;
mod replay;
mod reward_window;
mod stage_check;
mod stages;
mod storage;
mod tls;
mod tracker;
mod training;
mod uptime;

/// `Cargo.toml` sets `autotests = false` (the files here are modules, not binaries), so a file
/// added here without its `mod` line would never be compiled, and a test without its
/// `scenario` line would run at once with other modules' nodes: both fail here instead.
#[test]
fn every_file_here_is_a_module_and_every_test_takes_its_scenario_place() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
    let declared = |name: &str| main.lines().any(|l| l == format!("mod {name};"));
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let (module, source) = if path.is_dir() {
            (name.clone(), path.join("mod.rs"))
        } else if let Some(stem) = name.strip_suffix(".rs") {
            (stem.to_string(), path.clone())
        } else {
            continue;
        };
        if module == "main" {
            continue;
        }
        if !declared(&module) {
            problems.push(format!(
                "tests/tests/{name} is not declared: add `mod {module};` to tests/tests/main.rs"
            ));
        }
        let Ok(text) = std::fs::read_to_string(&source) else {
            problems.push(format!("tests/tests/{name}: no {}", source.display()));
            continue;
        };
        problems.extend(tests_without_scenario(&text).into_iter().map(|f| {
            format!("tests/tests/{name}: `{f}` does not start with `let _scenario = neuroshard_tests::scenario(module_path!());`")
        }));
    }
    problems.extend(
        tests_without_scenario(&main)
            .into_iter()
            .map(|f| format!("tests/tests/main.rs: `{f}` takes no scenario place")),
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The signatures of the `#[test]`s in `text` whose body does not start with their
/// `scenario` call.
fn tests_without_scenario(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut missing = Vec::new();
    for (i, _) in lines.iter().enumerate().filter(|(_, l)| **l == "#[test]") {
        // The signature ends at the first line ending with `{`; the body starts after it.
        let Some(end) = (i + 1..lines.len()).find(|&j| lines[j].ends_with('{')) else {
            missing.push(lines.get(i + 1).unwrap_or(&"").to_string());
            continue;
        };
        if lines.get(end + 1)
            != Some(&"let _scenario = neuroshard_tests::scenario(module_path!());")
        {
            missing.push(lines[i + 1].to_string());
        }
    }
    missing
}
