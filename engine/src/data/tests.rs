//! Tests for the data loader: label shift, wrap-around, determinism, position save/restore,
//! manifests with bad shards, text folders and the built-in corpus.

use std::collections::HashSet;

use neuroshard_shared::tokenizer::EOS_ID;

use super::*;

fn cfg(batch: usize, seq: usize, node: &str, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch,
        seq,
        node_id: node.to_string(),
        seed,
    }
}

/// Rows of a batch as (inputs, labels) slices.
fn rows(b: &Batch) -> impl Iterator<Item = (&[u32], &[u32])> {
    b.input_ids.chunks(b.seq).zip(b.labels.chunks(b.seq))
}

#[test]
fn labels_are_inputs_shifted_by_one() {
    // Token i is the number i, so "next in the stream" is checkable: i + 1 modulo the length.
    let n = 1000u32;
    let mut loader = DataLoader::from_tokens((0..n).collect(), cfg(3, 16, "node", 7)).unwrap();
    for _ in 0..100 {
        let batch = loader.next_batch().unwrap();
        assert_eq!((batch.input_ids.len(), batch.labels.len()), (48, 48));
        for (inputs, labels) in rows(&batch) {
            for t in 0..16 {
                assert_eq!(labels[t], (inputs[t] + 1) % n);
                if t + 1 < 16 {
                    assert_eq!(labels[t], inputs[t + 1]);
                }
            }
        }
    }
}

#[test]
fn one_epoch_reads_each_window_once_then_reorders() {
    let n = 1001u32; // (n - 1) / 10 = 100 windows of 10 + 1 tokens.
    let mut loader = DataLoader::from_tokens((0..n).collect(), cfg(4, 10, "node", 1)).unwrap();
    let mut starts = Vec::new();
    for _ in 0..25 {
        let batch = loader.next_batch().unwrap();
        starts.extend(rows(&batch).map(|(inputs, _)| inputs[0]));
    }
    assert_eq!(loader.position().epoch, 1);
    let distinct: HashSet<u32> = starts.iter().copied().collect();
    assert_eq!(distinct.len(), 100);
    // Consecutive windows are T apart (modulo the stream).
    for w in starts.windows(2) {
        assert_eq!((w[0] + 10) % n, w[1]);
    }
    // The next epoch starts at another phase (drawn from the epoch number).
    let next = loader.next_batch().unwrap();
    assert_ne!(next.input_ids[0], starts[0]);
}

#[test]
fn short_data_wraps_and_never_reads_out_of_range() {
    for len in [2u32, 3, 7, 33] {
        let mut loader =
            DataLoader::from_tokens((100..100 + len).collect(), cfg(5, 32, "n", 0)).unwrap();
        for _ in 0..20 {
            let batch = loader.next_batch().unwrap();
            assert!(
                batch
                    .input_ids
                    .iter()
                    .chain(&batch.labels)
                    .all(|t| (100..100 + len).contains(t))
            );
            for (inputs, labels) in rows(&batch) {
                for t in 0..32 {
                    assert_eq!(labels[t], 100 + (inputs[t] - 100 + 1) % len);
                }
            }
        }
    }
    assert!(matches!(
        DataLoader::from_tokens(vec![5], cfg(1, 4, "n", 0)),
        Err(DataError::NoData { .. })
    ));
    assert!(matches!(
        DataLoader::from_tokens(vec![5, 6], cfg(0, 4, "n", 0)),
        Err(DataError::Config { .. })
    ));
    assert!(matches!(
        DataLoader::from_tokens(vec![5, 6], cfg(1, 0, "n", 0)),
        Err(DataError::Config { .. })
    ));
}

#[test]
fn deterministic_given_node_and_seed() {
    let tokens: Vec<u32> = (0..5000).collect();
    let batches = |node: &str, seed: u64| {
        let mut l = DataLoader::from_tokens(tokens.clone(), cfg(2, 32, node, seed)).unwrap();
        (0..10).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(batches("a", 1), batches("a", 1));
    assert_ne!(batches("a", 1), batches("b", 1));
    assert_ne!(batches("a", 1), batches("a", 2));
}

/// A manifest of `count` shards; shard `i` holds tokens `i * 1000 + k`, so a batch shows which
/// shard it came from.
fn make_shards(dir: &Path, count: u32, len: u32) -> Manifest {
    let tokens: Vec<u32> = (0..count)
        .flat_map(|i| (0..len).map(move |k| i * 1000 + k))
        .collect();
    write_shards(dir, &tokens, len as usize).unwrap()
}

#[test]
fn manifest_skips_corrupted_and_missing_shards() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_shards(dir.path(), 5, 300);
    // Shard 1: one byte flipped. Shard 3: deleted.
    let p1 = dir.path().join(manifest.shards[1].relative_path());
    let mut bytes = std::fs::read(&p1).unwrap();
    bytes[17] ^= 0x40;
    std::fs::write(&p1, bytes).unwrap();
    std::fs::remove_file(dir.path().join(manifest.shards[3].relative_path())).unwrap();

    let path = dir.path().join("manifest.json");
    let mut loader = DataLoader::open_manifest(&path, 10_000, cfg(4, 20, "node-x", 3)).unwrap();
    assert_eq!(loader.num_shards(), 3);
    let skipped: Vec<(u64, &ShardProblem)> = loader
        .skipped()
        .iter()
        .map(|s| (s.shard_id, &s.problem))
        .collect();
    assert_eq!(skipped.len(), 2);
    assert!(
        matches!(skipped[0], (1, ShardProblem::HashMismatch { .. })),
        "{skipped:?}"
    );
    assert!(
        matches!(skipped[1], (3, ShardProblem::Unreadable(_))),
        "{skipped:?}"
    );

    // Several epochs: only shards 0, 2 and 4 are ever read, and every one of them is.
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let batch = loader.next_batch().unwrap();
        for &t in batch.input_ids.iter().chain(&batch.labels) {
            seen.insert(t / 1000);
        }
        for (inputs, labels) in rows(&batch) {
            assert!(
                inputs
                    .iter()
                    .zip(labels)
                    .all(|(&i, &l)| l / 1000 == i / 1000)
            );
        }
    }
    assert_eq!(seen, HashSet::from([0, 2, 4]));
    assert!(loader.position().epoch >= 2);
}

#[test]
fn manifest_with_no_valid_shard_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_shards(dir.path(), 2, 50);
    let path = dir.path().join("manifest.json");
    // Tokens up to 1049 exceed a vocabulary of 1000 in shard 1; shard 0 is deleted.
    std::fs::remove_file(dir.path().join(manifest.shards[0].relative_path())).unwrap();
    let err = DataLoader::open_manifest(&path, 1000, cfg(1, 8, "n", 0))
        .err()
        .unwrap();
    assert!(matches!(err, DataError::NoData { skipped: 2, .. }), "{err}");
    std::fs::write(&path, "{\"total_shards\": 1}").unwrap();
    assert!(matches!(
        DataLoader::open_manifest(&path, 1000, cfg(1, 8, "n", 0)),
        Err(DataError::Manifest { .. })
    ));
    let err = DataLoader::open_manifest(&dir.path().join("none.json"), 1000, cfg(1, 8, "n", 0))
        .err()
        .unwrap();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
}

#[test]
fn manifest_rejects_duplicates_and_escaping_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = make_shards(dir.path(), 2, 50);
    manifest.shards.push(manifest.shards[0].clone());
    manifest.shards.push(ManifestShard {
        shard_id: 9,
        sha256: "00".into(),
        path: Some("../x.bin".into()),
    });
    let path = dir.path().join("m.json");
    std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let loader = DataLoader::open_manifest(&path, 10_000, cfg(1, 8, "n", 0)).unwrap();
    assert_eq!(loader.num_shards(), 2);
    let problems: Vec<&ShardProblem> = loader.skipped().iter().map(|s| &s.problem).collect();
    assert!(
        matches!(
            problems[..],
            [ShardProblem::DuplicateId, ShardProblem::UnsafePath(_)]
        ),
        "{problems:?}"
    );
}

#[test]
fn shard_changed_after_open_is_an_error_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_shards(dir.path(), 1, 64);
    let mut loader =
        DataLoader::open_manifest(&dir.path().join("manifest.json"), 10_000, cfg(1, 8, "n", 0))
            .unwrap();
    std::fs::write(
        dir.path().join(manifest.shards[0].relative_path()),
        [0u8; 256],
    )
    .unwrap();
    let err = loader.next_batch().unwrap_err();
    assert!(
        matches!(err, DataError::ShardChanged { shard_id: 0, .. }),
        "{err}"
    );
}

#[test]
fn shard_order_depends_on_the_node_id() {
    let dir = tempfile::tempdir().unwrap();
    make_shards(dir.path(), 8, 40);
    let path = dir.path().join("manifest.json");
    let first_epoch_order = |node: &str| {
        let mut l = DataLoader::open_manifest(&path, 10_000, cfg(1, 39, node, 0)).unwrap();
        // One window per shard (39 + 1 tokens of 40).
        (0..8)
            .map(|_| l.next_batch().unwrap().input_ids[0] / 1000)
            .collect::<Vec<u32>>()
    };
    let a = first_epoch_order("node-a");
    assert_eq!(a, first_epoch_order("node-a"));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..8).collect::<Vec<_>>(),
        "each shard once per epoch"
    );
    let orders: HashSet<Vec<u32>> = ["node-a", "node-b", "node-c", "node-d"]
        .iter()
        .map(|n| first_epoch_order(n))
        .collect();
    assert!(orders.len() > 1, "four nodes all read the same shard order");
}

#[test]
fn restored_position_gives_the_identical_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    make_shards(dir.path(), 4, 97);
    let path = dir.path().join("manifest.json");
    let open = || DataLoader::open_manifest(&path, 10_000, cfg(3, 16, "node-r", 11)).unwrap();
    let mut reference = open();
    for steps in [0usize, 1, 2, 5, 9, 23] {
        let mut a = open();
        for _ in 0..steps {
            a.next_batch().unwrap();
        }
        // Through JSON, as a checkpoint stores it.
        let saved = serde_json::to_string(&a.position()).unwrap();
        let expected: Vec<Batch> = (0..3).map(|_| a.next_batch().unwrap()).collect();
        let mut b = open();
        b.seek(&serde_json::from_str(&saved).unwrap()).unwrap();
        let got: Vec<Batch> = (0..3).map(|_| b.next_batch().unwrap()).collect();
        assert_eq!(got, expected, "after {steps} steps");
        // The same as an uninterrupted run.
        if steps == 0 {
            let straight: Vec<Batch> = (0..3).map(|_| reference.next_batch().unwrap()).collect();
            assert_eq!(straight, expected);
        }
    }
    assert!(open().position().epoch == 0);
}

#[test]
fn seek_rejects_positions_that_do_not_fit() {
    let mut loader = DataLoader::from_tokens((0..100).collect(), cfg(1, 10, "n", 0)).unwrap();
    let good = loader.position();
    for bad in [
        DataPosition {
            shard: 1,
            ..good.clone()
        },
        DataPosition {
            shard_id: 5,
            ..good.clone()
        },
        DataPosition {
            offset: 90,
            ..good.clone()
        },
    ] {
        assert!(
            matches!(loader.seek(&bad), Err(DataError::Position { .. })),
            "{bad:?}"
        );
    }
    loader
        .seek(&DataPosition {
            epoch: 40,
            offset: 80,
            ..good
        })
        .unwrap();
    loader.next_batch().unwrap();
    assert_eq!(loader.position().epoch, 41);
}

#[test]
fn text_folder_is_tokenized_with_eos_between_documents() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.txt"), "alpha beta gamma ").unwrap();
    std::fs::write(dir.path().join("sub/b.md"), "delta epsilon").unwrap();
    std::fs::write(dir.path().join("skip.bin"), "not read").unwrap();
    let tok = Tokenizer::bytes_only();
    let mut loader = DataLoader::open(
        &DataSource::Path(dir.path().into()),
        &tok,
        cfg(1, 31, "n", 0),
    )
    .unwrap();
    assert_eq!(loader.total_tokens(), 17 + 1 + 13 + 1);
    let batch = loader.next_batch().unwrap();
    let mut stream = batch.input_ids.clone();
    stream.push(*batch.labels.last().unwrap());
    // One full cycle of the 32-token stream, starting at some phase.
    let expected = "alpha beta gamma <|eos|>delta epsilon<|eos|>";
    let rotations: Vec<String> = (0..32)
        .map(|r| {
            let mut s = stream.clone();
            s.rotate_left(r);
            tok.decode(&s)
        })
        .collect();
    assert!(rotations.iter().any(|r| r == expected), "{rotations:?}");
    assert_eq!(stream.iter().filter(|&&t| t == EOS_ID).count(), 2);

    let empty = tempfile::tempdir().unwrap();
    let err = DataLoader::open(
        &DataSource::Path(empty.path().into()),
        &tok,
        cfg(1, 4, "n", 0),
    )
    .err()
    .unwrap();
    assert!(matches!(err, DataError::NoData { .. }), "{err}");
    let err = DataLoader::open(
        &DataSource::Path(dir.path().join("nope")),
        &tok,
        cfg(1, 4, "n", 0),
    )
    .err()
    .unwrap();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
}

#[test]
fn text_file_source_reads_shakespeare() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/tinyshakespeare.txt"
    ));
    let tok = builtin_tokenizer(512).unwrap();
    let mut loader = DataLoader::open(&DataSource::Path(path), &tok, cfg(4, 64, "n", 0)).unwrap();
    assert!(loader.total_tokens() > 300_000);
    let batch = loader.next_batch().unwrap();
    assert!(batch.input_ids.iter().all(|&t| t < 512));
}

#[test]
fn builtin_corpus_gives_batches_with_the_default_tokenizer() {
    let tok = builtin_tokenizer(BUILTIN_TOKENIZER_VOCAB).unwrap();
    let mut loader = DataLoader::open(
        &DataSource::from_option(None),
        &tok,
        cfg(4, 256, "node-1", 0),
    )
    .unwrap();
    assert_eq!(loader.num_shards(), 1);
    assert!(loader.skipped().is_empty());
    assert!(loader.total_tokens() > 25_000, "{}", loader.total_tokens());
    let batch = loader.next_batch().unwrap();
    assert!(batch.input_ids.iter().all(|&t| t < BUILTIN_TOKENIZER_VOCAB));
    let text = tok.decode(&batch.input_ids[..256]);
    assert!(text.split_whitespace().count() > 20, "{text:?}");
}
