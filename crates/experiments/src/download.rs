//! `--data c4`: C4 shards from the HF hub into a cache directory.
//!
//! The files are `allenai/c4`'s `en/c4-train.NNNNN-of-01024.json.gz` and
//! `en/c4-validation.NNNNN-of-00008.json.gz` (about 300 MB and 40 MB each). The transfer is
//! done by `curl` (present on nearly every machine; HTTPS without a TLS stack in this
//! project), which shows a progress bar and resumes a partial `.part` file (`-C -`). A shard
//! is accepted only after it decompresses completely and every line parses as a C4
//! document (`text` present); then the `.part` is renamed into place. Without a network the
//! download fails in one line that names `--data PATH`.

use crate::data::{Format, for_each_document_as};
use crate::{ExperimentError, io_err};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The dataset's base URL (`en` configuration).
pub const C4_BASE_URL: &str = "https://huggingface.co/datasets/allenai/c4/resolve/main/en";

/// File name of training shard `i`.
pub fn train_shard(i: usize) -> String {
    format!("c4-train.{i:05}-of-01024.json.gz")
}

/// File name of validation shard `i`.
pub fn validation_shard(i: usize) -> String {
    format!("c4-validation.{i:05}-of-00008.json.gz")
}

/// What to say when the hub cannot be reached.
pub fn offline_message(detail: &str) -> String {
    format!(
        "cannot download C4 ({detail}); this machine looks offline: pass `--data PATH` with local C4 shards (*.json.gz), text files, or a directory of them"
    )
}

/// Downloads `names` from `base_url` into `cache` (skipping shards already there and
/// resuming partial ones), verifies each, and returns the directory to read.
///
/// # Errors
/// No `curl`, an unreachable server ([`offline_message`]), or a shard that fails
/// verification (it is removed).
pub fn fetch(
    base_url: &str,
    names: &[String],
    cache: &Path,
    quiet: bool,
) -> Result<PathBuf, ExperimentError> {
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    for name in names {
        let dest = cache.join(name);
        if dest.is_file() {
            continue;
        }
        let part = cache.join(format!("{name}.part"));
        let url = format!("{}/{name}", base_url.trim_end_matches('/'));
        if !quiet {
            eprintln!("downloading {url}");
        }
        let status = Command::new("curl")
            .args(["--location", "--fail", "--continue-at", "-", "--retry", "3"])
            .arg(if quiet { "--silent" } else { "--progress-bar" })
            .arg("--output")
            .arg(&part)
            .arg(&url)
            .status()
            .map_err(|e| {
                ExperimentError::Invalid(format!(
                    "`curl` is needed to download C4 ({e}); or pass `--data PATH` with local shards"
                ))
            })?;
        if !status.success() {
            // curl exit codes 6 and 7: the host could not be resolved or reached.
            return Err(ExperimentError::Invalid(match status.code() {
                Some(6 | 7 | 28) => {
                    offline_message(&format!("curl exit {}", status.code().unwrap_or(-1)))
                }
                Some(c) => format!(
                    "downloading {url} failed (curl exit {c}); the partial file {} is kept for resumption",
                    part.display()
                ),
                None => format!("downloading {url} was interrupted"),
            }));
        }
        let mut documents = 0usize;
        let c4 = Format {
            json: true,
            gzip: true,
        };
        let verified = for_each_document_as(&part, c4, |_| documents += 1);
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&part);
            return Err(ExperimentError::Invalid(format!(
                "{url}: the downloaded shard is not valid C4 ({e}); removed it"
            )));
        }
        std::fs::rename(&part, &dest).map_err(io_err(&dest))?;
        if !quiet {
            eprintln!("verified {name}: {documents} documents");
        }
    }
    Ok(cache.to_path_buf())
}
