//! The independent gradient check: `neuroshard-engine grad-dump` writes a tiny model, a batch
//! and every gradient; `grad_check.py` recomputes loss and gradients in float64 numpy and
//! requires relative error <= 1e-4. Needs `python3` with numpy (CI installs it); a missing
//! numpy fails the test with a message saying so.

use std::process::Command;

#[test]
fn grad_dump_matches_an_independent_numpy_implementation() {
    let dir = tempfile::tempdir().unwrap();
    for seed in [1u64, 2] {
        let out = dir.path().join(format!("seed{seed}"));
        let dump = Command::new(env!("CARGO_BIN_EXE_neuroshard-engine"))
            .args([
                "grad-dump",
                "--model",
                "tiny",
                "--seed",
                &seed.to_string(),
                "--batch",
                "2",
                "--seq",
                "12",
                "--out",
            ])
            .arg(&out)
            .output()
            .expect("running neuroshard-engine grad-dump");
        assert!(
            dump.status.success(),
            "grad-dump failed: {}",
            String::from_utf8_lossy(&dump.stderr)
        );
        for f in [
            "model/config.json",
            "model/model.safetensors",
            "model/tokenizer.json",
            "batch.safetensors",
            "grads.safetensors",
            "loss.json",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grad_check.py");
        let check = Command::new("python3")
            .arg(script)
            .arg(&out)
            .output()
            .expect("running python3 (install python3 with numpy)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(
            check.status.success(),
            "grad_check.py failed for seed {seed}:\n{text}"
        );
        assert!(text.contains("OK"), "{text}");
    }
}
