//! Local text: one file, or every text file under a folder (recursively, in path order),
//! tokenized with the node's tokenizer into one stream with eos after each document.

use std::path::{Path, PathBuf};

use neuroshard_shared::tokenizer::{EOS_ID, Tokenizer};

use super::{DataError, SkippedShard, manifest::ShardProblem};

/// File extensions read from folders. A file named directly is read whatever its name.
pub const TEXT_EXTENSIONS: &[&str] = &["txt", "text", "md", "markdown", "rst", "org", "adoc"];

fn is_text_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| TEXT_EXTENSIONS.iter().any(|t| t.eq_ignore_ascii_case(e)))
}

/// Every text file under `dir`, sorted. Hidden entries (`.git`, `.cache`...) and symlinked
/// folders are not followed.
pub(crate) fn collect_text_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| DataError::Io {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DataError::Io {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type().map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            if kind.is_dir() {
                pending.push(path);
            } else if (kind.is_file() || (kind.is_symlink() && path.is_file()))
                && is_text_file(&path)
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Tokenizes documents into one stream, eos after each. Unreadable files are logged and listed
/// in the returned skips.
pub(crate) fn tokenize_files(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
) -> (Vec<u32>, Vec<SkippedShard>) {
    let mut tokens = Vec::new();
    let mut skipped = Vec::new();
    for (i, path) in files.iter().enumerate() {
        match std::fs::read(path) {
            Ok(bytes) => {
                tokens.extend(tokenizer.encode_bytes(&bytes));
                tokens.push(EOS_ID);
            }
            Err(e) => {
                let problem = ShardProblem::Unreadable(e.to_string());
                tracing::error!(path = %path.display(), %problem, "skipping text file");
                skipped.push(SkippedShard {
                    shard_id: i as u64,
                    path: path.clone(),
                    problem,
                });
            }
        }
    }
    (tokens, skipped)
}

/// Tokenizes in-memory documents into one stream, eos after each.
pub(crate) fn tokenize_texts<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    let mut tokens = Vec::new();
    for text in texts {
        tokens.extend(tokenizer.encode(text));
        tokens.push(EOS_ID);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_text_files_recursively_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        for f in [
            "z.txt",
            "a.md",
            "b/c/deep.TXT",
            "b/notes.rst",
            "image.png",
            ".git/x.txt",
            ".hidden.txt",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let files = collect_text_files(root).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.md", "b/c/deep.TXT", "b/notes.rst", "z.txt"]);
        assert!(collect_text_files(&root.join("missing")).is_err());
    }

    #[test]
    fn documents_end_with_eos_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        std::fs::write(&a, b"hi \xff").unwrap();
        let tok = Tokenizer::bytes_only();
        let (tokens, skipped) = tokenize_files(&[a, dir.path().join("gone.txt")], &tok);
        assert_eq!(
            tokens,
            [
                10 + b'h' as u32,
                10 + b'i' as u32,
                10 + b' ' as u32,
                10 + 0xff,
                EOS_ID
            ]
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            tokenize_texts(["a", "b"], &tok),
            [10 + 97, EOS_ID, 10 + 98, EOS_ID]
        );
    }
}
