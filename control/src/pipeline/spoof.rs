//! The `spoofed_stage_log` cheat of an adversary build (issue #19, tests of checked work): the
//! forgery a stage that sends garbage would serve when a verifier draws it, a checkpoint of
//! zero weights (and zero AdamW moments), with which a stage reproduces what the cheat sends:
//! a middle stage passes its input through unchanged (so a log whose inputs equal its
//! outputs replays exactly) and its output gradient back, the last stage answers every
//! micro-batch with the loss ln(vocabulary) and a zero input gradient whatever its input.
//! What catches it is not the replay but the bindings of `trainer/stagecheck.rs` and
//! `work.rs`: the checkpoint against the stage round's agreed weights, and the logged inputs
//! against the receipts the stage signed when they arrived.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

/// Why a checkpoint could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum SpoofError {
    #[error("checkpoint {path}: {message}")]
    File { path: String, message: String },
}

/// Rewrites the engine checkpoint at `path` with every tensor zero (weights and optimizer
/// moments), keeping its metadata and recomputing its content hash the way the engine checks
/// it (`engine/src/checkpoint.rs`), so the engine loads it.
pub fn zero_checkpoint(path: &Path) -> Result<(), SpoofError> {
    let err = |message: String| SpoofError::File {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let mut zeros: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                v.dtype(),
                v.shape().to_vec(),
                vec![0u8; v.data().len()],
            )
        })
        .collect();
    zeros.sort_by(|a, b| a.0.cmp(&b.0));
    // The engine's content hash: sha256 over (name length, name, byte length, bytes) in
    // name order.
    let mut h = Sha256::new();
    for (name, _, _, data) in &zeros {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let mut info: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    info.insert("content_sha256".into(), hex::encode(h.finalize()));
    let views = zeros
        .iter()
        .map(|(n, dt, s, d)| TensorView::new(*dt, s.clone(), d).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    let out = safetensors::serialize(views, Some(info)).map_err(|e| err(e.to_string()))?;
    neuroshard_shared::fsx::write_atomic(path, &out, None).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zeroed_checkpoint_keeps_its_metadata_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        let data: Vec<u8> = [1.5f32, -2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(safetensors::Dtype::F32, vec![3], &data).unwrap();
        let meta = HashMap::from([("format".to_string(), "x".to_string())]);
        std::fs::write(
            &path,
            safetensors::serialize(vec![("w".to_string(), view)], Some(meta)).unwrap(),
        )
        .unwrap();
        zero_checkpoint(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        let m = m.metadata().clone().unwrap();
        assert_eq!(m["format"], "x");
        assert_eq!(m["content_sha256"].len(), 64);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("w").unwrap();
        assert_eq!((w.shape(), w.data()), (&[3usize][..], &[0u8; 12][..]));
        assert!(zero_checkpoint(&dir.path().join("missing")).is_err());
    }
}
