//! The official OpenAI Python client, unchanged, against a real node: models, completions and
//! chat completions, whole and streamed, a wrong key and an out-of-range value
//! (`tests/python/openai_client_check.py` says what it checks). `scripts/test.sh` installs the
//! client; without python3 or the `openai` package this test fails, it does not skip.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neuroshard_tests::{Node, NodeOptions};

/// The script's own requests time out after 60 s each; this bounds the whole run.
const CLIENT_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn official_openai_client_works_unchanged() -> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let node = Node::start(NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 2\nseq_len = 32\n"
            .into(),
        ..NodeOptions::default()
    })?;
    node.wait_healthy(Duration::from_secs(60))?;
    // Inference answers 503 until the model is loaded.
    node.wait_model_loaded(Duration::from_secs(60))?;
    let output = run_check(&node, &node.url("/v1"), None)?;
    assert!(output.contains("ok: neurollm-tiny"), "{output}");
    println!("{}", output.trim());
    Ok(())
}

/// Runs `tests/python/openai_client_check.py` against `node` at `base_url` (verifying its
/// certificate with `ca` when given); fails with the script's output and the node's log
/// unless it succeeds, else returns its output.
pub(crate) fn run_check(
    node: &Node,
    base_url: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_client_check.py");
    let out_path = node.data_dir().join("openai-client.out");
    let out = std::fs::File::create(&out_path)?;
    let mut child = Command::new("python3")
        .arg(script)
        .arg(base_url)
        .arg(node.api_token()?)
        .args(ca)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CLIENT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the OpenAI client did not finish in {CLIENT_DEADLINE:?}:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path)?;
    anyhow::ensure!(
        status.success(),
        "the OpenAI client check failed ({status}):\n{output}\n--- node log ---\n{}",
        node.logs()
    );
    Ok(output)
}
