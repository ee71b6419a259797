//! Metric rows and their append-only CSV and JSONL files.
//!
//! Columns: `run, variant, step, layer, head, space, estimator, metric, value` (`head` is
//! `all` for a whole layer; `space` is `weight` or `activation` — or `train`/`validation`
//! for training scalars a loop records through [`crate::Probe::record`]; `estimator` is
//! `estimator/null` for the MP metrics, `-` where it does not apply). An (estimator, null)
//! pair that is undefined on a spectrum (see rmt-core's `UndefinedDiagnosis`) gets one row
//! with metric `undefined` and value 1 instead of its metrics.
//!
//! Resumption: [`MetricsWriter::checkpoint`] flushes both files and returns their byte
//! lengths; a run resumed from that checkpoint reopens them with [`MetricsWriter::resume`],
//! which truncates them to those lengths — dropping every row written after the checkpoint,
//! including a torn last line — so that no row is lost or duplicated.

use crate::ProbeError;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// Run name.
    pub run: String,
    /// Attention variant (or model name).
    pub variant: String,
    /// Training step.
    pub step: u64,
    /// Layer index.
    pub layer: u32,
    /// Head index, or `all`.
    pub head: String,
    /// `weight` or `activation`.
    pub space: String,
    /// `estimator/null` (weight-space MP metrics), or `-`.
    pub estimator: String,
    /// Metric name.
    pub metric: String,
    /// Value.
    pub value: f64,
}

/// The CSV header line.
pub const CSV_HEADER: &str = "run,variant,step,layer,head,space,estimator,metric,value";

/// File names inside a run directory.
pub const CSV_FILE: &str = "metrics.csv";
/// File names inside a run directory.
pub const JSONL_FILE: &str = "metrics.jsonl";

/// Byte lengths of the two files at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WriterState {
    /// `metrics.csv` length.
    pub csv_bytes: u64,
    /// `metrics.jsonl` length.
    pub jsonl_bytes: u64,
}

/// Appends rows to `metrics.csv` and `metrics.jsonl` in a directory.
pub struct MetricsWriter {
    csv: BufWriter<File>,
    jsonl: BufWriter<File>,
    csv_path: PathBuf,
    jsonl_path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProbeError + '_ {
    move |source| ProbeError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl MetricsWriter {
    /// Creates fresh files (the CSV with its header) in `dir`.
    ///
    /// # Errors
    /// File system errors.
    pub fn create(dir: &Path) -> Result<Self, ProbeError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let csv_path = dir.join(CSV_FILE);
        let jsonl_path = dir.join(JSONL_FILE);
        let mut csv = BufWriter::new(File::create(&csv_path).map_err(io(&csv_path))?);
        writeln!(csv, "{CSV_HEADER}").map_err(io(&csv_path))?;
        let jsonl = BufWriter::new(File::create(&jsonl_path).map_err(io(&jsonl_path))?);
        Ok(Self {
            csv,
            jsonl,
            csv_path,
            jsonl_path,
        })
    }

    /// Reopens the files of `dir` for appending after truncating them to `state`.
    ///
    /// # Errors
    /// Missing files, or files shorter than the checkpoint says (they were not written by
    /// this run, or were damaged).
    pub fn resume(dir: &Path, state: WriterState) -> Result<Self, ProbeError> {
        let csv_path = dir.join(CSV_FILE);
        let jsonl_path = dir.join(JSONL_FILE);
        for (path, len) in [
            (&csv_path, state.csv_bytes),
            (&jsonl_path, state.jsonl_bytes),
        ] {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            let actual = file.metadata().map_err(io(path))?.len();
            if actual < len {
                return Err(ProbeError::Format(format!(
                    "{}: {actual} bytes, but the checkpoint recorded {len}: the metrics file does not belong to this checkpoint",
                    path.display()
                )));
            }
            file.set_len(len).map_err(io(path))?;
        }
        let open = |p: &Path| {
            OpenOptions::new()
                .append(true)
                .open(p)
                .map(BufWriter::new)
                .map_err(io(p))
        };
        Ok(Self {
            csv: open(&csv_path)?,
            jsonl: open(&jsonl_path)?,
            csv_path,
            jsonl_path,
        })
    }

    /// Appends rows (buffered).
    ///
    /// # Errors
    /// File system errors.
    pub fn write(&mut self, rows: &[MetricRow]) -> Result<(), ProbeError> {
        for r in rows {
            writeln!(
                self.csv,
                "{},{},{},{},{},{},{},{},{}",
                r.run, r.variant, r.step, r.layer, r.head, r.space, r.estimator, r.metric, r.value
            )
            .map_err(io(&self.csv_path))?;
            serde_json::to_writer(&mut self.jsonl, r)
                .map_err(|e| ProbeError::Format(e.to_string()))?;
            writeln!(self.jsonl).map_err(io(&self.jsonl_path))?;
        }
        Ok(())
    }

    /// Flushes both files to the OS and returns their lengths.
    ///
    /// # Errors
    /// File system errors.
    pub fn checkpoint(&mut self) -> Result<WriterState, ProbeError> {
        self.csv.flush().map_err(io(&self.csv_path))?;
        self.jsonl.flush().map_err(io(&self.jsonl_path))?;
        self.csv.get_ref().sync_data().map_err(io(&self.csv_path))?;
        self.jsonl
            .get_ref()
            .sync_data()
            .map_err(io(&self.jsonl_path))?;
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(io(p));
        Ok(WriterState {
            csv_bytes: len(&self.csv_path)?,
            jsonl_bytes: len(&self.jsonl_path)?,
        })
    }
}

/// Reads `metrics.csv` back.
///
/// # Errors
/// A missing or malformed file.
pub fn read_csv(path: &Path) -> Result<Vec<MetricRow>, ProbeError> {
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| ProbeError::Format(format!("{}: {e}", path.display())))?;
    reader
        .deserialize()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|e| ProbeError::Format(format!("{}: row {}: {e}", path.display(), i + 2)))
        })
        .collect()
}

/// Reads `metrics.jsonl` back.
///
/// # Errors
/// A missing or malformed file.
pub fn read_jsonl(path: &Path) -> Result<Vec<MetricRow>, ProbeError> {
    let file = File::open(path).map_err(io(path))?;
    BufReader::new(file)
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let line = line.map_err(io(path))?;
            serde_json::from_str(&line)
                .map_err(|e| ProbeError::Format(format!("{}: line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}
