//! Training text: C4's json.gz shards, plain-text files, and the embedded default corpus.
//!
//! C4 (`allenai/c4`, `en`) ships as gzip-compressed JSON Lines shards
//! (`c4-train.00000-of-01024.json.gz`): one document per line, an object with `text`, `url`
//! and `timestamp`. [`Corpus::open`] accepts such shards, plain `.json`/`.jsonl` files of the
//! same shape, `.txt` files (one document per blank-line-separated paragraph block), or a
//! directory of any of these. Documents are streamed shard by shard; nothing but the text is
//! kept.
//!
//! **Split.** With two or more shards, the validation set is whole shards (those whose name
//! contains `validation`, else the last shard in name order); with one file, every 20th
//! document. **Order.** Training shards are visited in an order shuffled by the seed; the
//! packed sequences are shuffled again per epoch by [`crate::tokens::SequenceOrder`].

use crate::{ExperimentError, io_err};
use flate2::read::MultiGzDecoder;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// One validation document in this many when a corpus is a single file.
pub const VALIDATION_EVERY: usize = 20;

/// A text corpus split into training and validation files.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    /// Training files, in the seeded visiting order.
    pub train: Vec<PathBuf>,
    /// Validation files (empty when the split is by document).
    pub validation: Vec<PathBuf>,
}

/// Which part of a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training documents.
    Train,
    /// The validation documents.
    Validation,
}

fn is_text_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    [
        ".json.gz",
        ".jsonl.gz",
        ".json",
        ".jsonl",
        ".txt",
        ".txt.gz",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

impl Corpus {
    /// Opens a file or a directory (searched recursively) of shards.
    ///
    /// # Errors
    /// A path that does not exist or holds no `.json.gz`/`.jsonl`/`.json`/`.txt` file.
    pub fn open(path: &Path, seed: u64) -> Result<Self, ExperimentError> {
        let mut files = Vec::new();
        if path.is_dir() {
            collect(path, &mut files)?;
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else {
            return Err(ExperimentError::Invalid(format!(
                "{}: no such file or directory",
                path.display()
            )));
        }
        files.sort();
        if files.is_empty() {
            return Err(ExperimentError::Invalid(format!(
                "{}: no .json.gz, .jsonl, .json or .txt files",
                path.display()
            )));
        }
        let (mut validation, mut train): (Vec<_>, Vec<_>) = files
            .iter()
            .cloned()
            .partition(|f| f.to_string_lossy().contains("validation"));
        if validation.is_empty() && train.len() >= 2 {
            validation.push(train.pop().expect("two or more files"));
        }
        if train.is_empty() {
            return Err(ExperimentError::Invalid(format!(
                "{}: only validation shards, no training shard",
                path.display()
            )));
        }
        train.shuffle(&mut rand_pcg::Pcg64Mcg::seed_from_u64(seed));
        Ok(Self { train, validation })
    }

    /// Every document of a split, in corpus order.
    ///
    /// # Errors
    /// Unreadable or corrupt shards (a bad gzip stream, a line that is not a JSON object with
    /// a string `text`), named with file and line.
    pub fn documents(&self, split: Split) -> Result<Vec<String>, ExperimentError> {
        let by_document = self.validation.is_empty();
        let files = match (split, by_document) {
            (Split::Validation, false) => &self.validation,
            _ => &self.train,
        };
        let mut docs = Vec::new();
        let mut index = 0usize;
        for file in files {
            for_each_document(file, |doc| {
                let held_out = index % VALIDATION_EVERY == VALIDATION_EVERY - 1;
                index += 1;
                if !by_document || held_out == (split == Split::Validation) {
                    docs.push(doc);
                }
            })?;
        }
        Ok(docs)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ExperimentError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = entry.map_err(io_err(dir))?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else if is_text_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// How a file stores documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// JSON Lines with a `text` field (else plain text, blank-line-separated blocks).
    pub json: bool,
    /// gzip-compressed.
    pub gzip: bool,
}

impl Format {
    /// The format a file name says (`.json.gz`, `.jsonl`, `.txt`, …).
    pub fn of(path: &Path) -> Self {
        let name = path.to_string_lossy();
        Self {
            json: name.contains(".json"),
            gzip: name.ends_with(".gz"),
        }
    }
}

/// Streams the documents of one file into `f`, in the format its name says ([`Format::of`]).
///
/// # Errors
/// As [`for_each_document_as`].
pub fn for_each_document(path: &Path, f: impl FnMut(String)) -> Result<(), ExperimentError> {
    for_each_document_as(path, Format::of(path), f)
}

/// Streams the documents of one file into `f`: JSON Lines by their `text`, plain text by
/// blank-line-separated blocks.
///
/// # Errors
/// I/O errors, corrupt gzip, and JSON lines without a string `text`, with file and line.
pub fn for_each_document_as(
    path: &Path,
    format: Format,
    mut f: impl FnMut(String),
) -> Result<(), ExperimentError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let reader: Box<dyn Read> = if format.gzip {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let json = format.json;
    let reader = BufReader::with_capacity(1 << 16, reader);
    let mut block = String::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| {
            ExperimentError::Invalid(format!(
                "{}: line {}: {e} (a corrupt or truncated shard?)",
                path.display(),
                i + 1
            ))
        })?;
        if json {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                ExperimentError::Invalid(format!("{}: line {}: {e}", path.display(), i + 1))
            })?;
            match value.get("text").and_then(|t| t.as_str()) {
                Some(t) => f(t.to_string()),
                None => {
                    return Err(ExperimentError::Invalid(format!(
                        "{}: line {}: no string field `text` (C4 documents have `text`, `url`, `timestamp`)",
                        path.display(),
                        i + 1
                    )));
                }
            }
        } else if line.trim().is_empty() {
            if !block.trim().is_empty() {
                f(std::mem::take(&mut block));
            }
            block.clear();
        } else {
            block.push_str(&line);
            block.push('\n');
        }
    }
    if !block.trim().is_empty() {
        f(block);
    }
    Ok(())
}

/// Writes documents as one C4-format shard (`{"text","url","timestamp"}` per line, gzip).
///
/// # Errors
/// File system errors.
pub fn write_c4_shard(path: &Path, docs: &[String]) -> Result<(), ExperimentError> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    for (i, text) in docs.iter().enumerate() {
        let line = serde_json::json!({
            "text": text,
            "url": format!("embedded://{i}"),
            "timestamp": "2026-11-23T00:00:00Z",
        });
        writeln!(gz, "{line}").map_err(io_err(path))?;
    }
    gz.finish().map_err(io_err(path))?;
    Ok(())
}

/// The embedded default corpus: this project's own documentation and source files (about
/// 0.4 MB of English prose, mathematics and Rust), one document per paragraph block, so that
/// the default run needs no download. It is small: the tiny preset overfits it within a few
/// epochs, which the report states.
pub fn embedded_documents() -> Vec<String> {
    const FILES: &[&str] = &[
        include_str!("../../../README.md"),
        include_str!("../../../docs/math.md"),
        include_str!("../../../docs/architecture.md"),
        include_str!("../../rmt-core/src/lib.rs"),
        include_str!("../../rmt-core/src/laws/marchenko_pastur.rs"),
        include_str!("../../rmt-core/src/laws/product.rs"),
        include_str!("../../rmt-core/src/laws/quarter_circle.rs"),
        include_str!("../../rmt-core/src/tracy_widom.rs"),
        include_str!("../../rmt-core/src/markov.rs"),
        include_str!("../../rmt-core/src/free.rs"),
        include_str!("../../rmt-core/src/spectra.rs"),
        include_str!("../../rmt-core/src/special.rs"),
        include_str!("../../rmt-core/src/diagnostics/mod.rs"),
        include_str!("../../rmt-core/src/diagnostics/estimators.rs"),
        include_str!("../../rmt-core/src/eigen/mod.rs"),
        include_str!("../../rmt-core/src/eigen/band.rs"),
        include_str!("../../rmt-core/src/eigen/bulge.rs"),
        include_str!("../../rmt-core/src/eigen/tridiagonal.rs"),
        include_str!("../../attn-models/src/attention.rs"),
        include_str!("../../attn-models/src/attention_only.rs"),
        include_str!("../../attn-models/src/config.rs"),
        include_str!("../../attn-models/src/transformer.rs"),
        include_str!("../../attn-models/src/export.rs"),
        include_str!("../../attn-models/src/rope.rs"),
        include_str!("../../probe/src/probe.rs"),
        include_str!("../../probe/src/weight.rs"),
        include_str!("../../probe/src/activation.rs"),
    ];
    FILES
        .iter()
        .flat_map(|text| text.split("\n\n"))
        .map(str::trim)
        .filter(|block| block.len() >= 16)
        .map(str::to_string)
        .collect()
}
