//! `neuroshard model export` and `GET /api/v1/model/export` on real processes:
//!
//! - a node holding every layer exports GGUF and the Hugging Face layout through the CLI;
//!   other implementations (`engine/tests/export_check.py`: transformers over the Hugging Face
//!   folder, llama.cpp over the GGUF file, and numpy over each; the `gguf` package reading every
//!   tensor and key) continue a few prompts greedily exactly as the node's engine does; the
//!   download needs a token and answers errors in the contract's format; nothing is left in
//!   the data directory;
//! - nodes holding only some layers (three stages of `default`) export the same file a node
//!   holding every layer exports (same seed, training off: the same weights), the layers they
//!   lack fetched from their holders and hash-checked; a stage whose other layers no reachable
//!   peer holds answers 503 (and the CLI fails with it), writing nothing.

use crate::pipeline_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, binary, wait_for};
use pipeline_common::{POLL, START, dump};
use serde_json::{Value, json};

/// Runs `neuroshard model export` against `node`: (success, stdout, stderr).
fn cli_export(node: &Node, format: &str, out: &Path) -> (bool, String, String) {
    let o = Command::new(binary("neuroshard"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .args(["model", "export", "--format", format, "--out"])
        .arg(out)
        .args(["--port", &node.port.to_string()])
        .output()
        .expect("running neuroshard model export");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `GET /api/v1/model/export?format=...` with `token`: status, headers, body bytes.
fn download(
    node: &Node,
    query: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let mut req = http.get(node.url(&format!("/api/v1/model/export{query}")));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap();
    let code = r.status().as_u16();
    let headers = r.headers().clone();
    (code, headers, r.bytes().unwrap().to_vec())
}

/// The contract's error body of `bytes` with HTTP `code`.
fn error_code(code: u16, bytes: &[u8]) -> (u16, String) {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    (code, v["error"]["code"].as_str().unwrap_or("").to_string())
}

fn exports_left(node: &Node) -> Vec<String> {
    std::fs::read_dir(node.data_dir().join("exports"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_full_node_exports_gguf_and_hf_that_other_implementations_continue_as_the_engine_does() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions::default()).unwrap();
    node.wait_model_loaded(START)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    let token = node.api_token().unwrap();

    // No token: 401 in the contract's format; a bad format: 400.
    let (code, _, body) = download(&node, "?format=gguf", None);
    assert_eq!(error_code(code, &body), (401, "UNAUTHORIZED".into()));
    let (code, _, body) = download(&node, "?format=onnx", Some(&token));
    assert_eq!(error_code(code, &body), (400, "INVALID_REQUEST".into()));
    let (code, _, body) = download(&node, "", Some(&token));
    assert_eq!(error_code(code, &body).0, 400);

    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = cli_export(&node, "gguf", &out.path().join("gguf"));
    assert!(ok, "{stdout}\n{stderr}\n{}", node.logs());
    assert!(stdout.contains("exported model"), "{stdout}");
    // Not a terminal: plain progress lines.
    assert!(stderr.contains("downloading"), "{stderr}");
    let gguf = out.path().join("gguf").join("neurollm.gguf");
    assert_eq!(&std::fs::read(&gguf).unwrap()[..4], b"GGUF");
    let (ok, stdout, stderr) = cli_export(&node, "hf", &out.path().join("hf"));
    assert!(ok, "{stdout}\n{stderr}\n{}", node.logs());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.path().join("hf").join(f).exists(), "{f}: {stdout}");
    }

    // The REST download is the file the CLI wrote, named by the model's hash.
    let (code, headers, body) = download(&node, "?format=gguf", Some(&token));
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(&gguf).unwrap());
    let hash = headers["x-model-hash"].to_str().unwrap();
    assert_eq!(hash.len(), 64, "{hash}");
    assert!(stdout.contains(hash), "{stdout}");
    assert_eq!(headers["x-layers-from-peers"], "0");
    assert!(exports_left(&node).is_empty(), "{:?}", exports_left(&node));

    // The engine's greedy continuations, then the independent ones.
    let mut cases = Vec::new();
    for prompt in [
        "The river",
        "Once upon a time there was",
        "Numbers: 1, 2, 3,",
    ] {
        let (code, r) = node
            .authed(
                reqwest::Method::POST,
                "/api/v1/inference",
                Some(json!({"prompt": prompt, "max_tokens": 12, "temperature": 0})),
            )
            .unwrap();
        assert_eq!(code, 200, "{r}");
        cases.push(json!({
            "prompt": prompt,
            "max_tokens": 12,
            "text": r["text"],
            "tokens_generated": r["tokens_generated"],
        }));
    }
    let cases_path = out.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&cases).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/export_check.py");
    let check = Command::new("python3")
        .arg(script)
        .arg("--gguf")
        .arg(&gguf)
        .arg("--hf")
        .arg(out.path().join("hf"))
        .arg("--cases")
        .arg(&cases_path)
        .arg("--llama-cpp")
        .arg("--transformers")
        .output()
        .expect(
            "running python3 (scripts/test.sh installs numpy, gguf, tokenizers, torch, transformers \
             and llama-cpp-python)",
        );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    println!("{report}");
    assert!(check.status.success(), "{report}\ncases: {cases:?}");
    for implementation in ["numpy/hf", "numpy/gguf", "llama.cpp", "transformers"] {
        assert!(
            report.contains(&format!("ok {implementation} ")),
            "{report}"
        );
    }
}

fn stage_options(max_layers: Option<u32>) -> NodeOptions {
    let resources = max_layers
        .map(|n| format!("[resources]\nmax_layers = {n}\n"))
        .unwrap_or_default();
    NodeOptions {
        config: format!(
            "[training]\nmodel = \"default\"\nenabled = false\npipeline_timeout_secs = 10\n\
             {resources}"
        ),
        ..NodeOptions::default()
    }
}

#[test]
fn stages_export_the_model_a_node_holding_every_layer_exports() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = pipeline_common::three_stages([
        stage_options(Some(2)),
        stage_options(Some(1)),
        stage_options(Some(1)),
    ]);
    let single = Node::start(stage_options(None)).unwrap();
    let nodes = [&a, &b, &c, &single];
    for n in nodes {
        n.wait_model_loaded(START)
            .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    }
    let (code, headers, want) =
        download(&single, "?format=gguf", Some(&single.api_token().unwrap()));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&want));
    let want_hash = headers["x-model-hash"].to_str().unwrap().to_string();
    // The first stage lacks layers 2 and 3 and the head, the middle one all but layer 2.
    for (name, n, from_peers) in [("first", &a, "2"), ("middle", &b, "3")] {
        let token = n.api_token().unwrap();
        let (headers, got) = wait_for(
            &format!("an export at the {name} stage"),
            START,
            POLL,
            || {
                let (code, headers, body) = download(n, "?format=gguf", Some(&token));
                match code {
                    200 => Some((headers, body)),
                    // The holders of the other layers not known yet.
                    503 => None,
                    other => panic!(
                        "{name}: {other} {}\n{}",
                        String::from_utf8_lossy(&body),
                        dump(&nodes)
                    ),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
        assert_eq!(
            headers["x-model-hash"].to_str().unwrap(),
            want_hash,
            "{name}"
        );
        assert_eq!(headers["x-layers-from-peers"], from_peers, "{name}");
        assert!(
            got == want,
            "{name}: the export differs from the full node's"
        );
        assert!(exports_left(n).is_empty(), "{name}: {:?}", exports_left(n));
    }
    // And through the CLI, in the Hugging Face layout, at the last stage.
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = cli_export(&c, "hf", out.path());
    assert!(ok, "{stdout}\n{stderr}\n{}", dump(&nodes));
    assert!(stdout.contains(&want_hash), "{stdout}");
    assert!(stdout.contains("3 layers fetched from peers"), "{stdout}");
}

#[test]
fn a_stage_without_the_holders_of_the_other_layers_answers_503() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(stage_options(Some(2))).unwrap();
    pipeline_common::wait_role(&node, "driver", &[0, 1]);
    node.wait_model_loaded(START)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    let (code, _, body) = download(&node, "?format=hf", Some(&node.api_token().unwrap()));
    assert_eq!(error_code(code, &body), (503, "SERVICE_UNAVAILABLE".into()));
    let message = String::from_utf8_lossy(&body).into_owned();
    assert!(
        message.contains("layers [2, 3] are held by no reachable peer"),
        "{message}"
    );
    assert!(exports_left(&node).is_empty(), "{:?}", exports_left(&node));
    // The CLI says the same and fails.
    let out = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = cli_export(&node, "gguf", out.path());
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("SERVICE_UNAVAILABLE"), "{stderr}");
    assert!(!out.path().join("neurollm.gguf").exists());
}
