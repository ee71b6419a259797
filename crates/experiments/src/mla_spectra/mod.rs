//! Seed 000 end to end: pre-train MHA, MLA-PreRoPE and MLA-Decoupled under identical
//! conditions (same data order, same seed) with the probe attached, then draw the paper's
//! figures from the run's own metrics and write a report beside the paper's claims.
//!
//! A run directory holds `config.json` (the resolved [`RunConfig`]), `tokenizer.json`, one
//! sub-directory per variant (`metrics.csv`, `metrics.jsonl`, `checkpoints/`, the final
//! `model/` as HF/DeepSeek safetensors), `figures/` (SVG and PNG) and `report.md` +
//! `report.html`.

pub mod analysis;
pub mod claims;
pub mod figures;
pub mod summary;

use crate::data::{Corpus, Split, embedded_documents, write_c4_shard};
use crate::tokens::{Packed, pack};
use crate::train::{Progress, RunSpec, RunSummary, TrainConfig, train};
use crate::{ExperimentError, io_err, tokens};
use attn_models::{AttentionVariant, LlamaConfig};
use burn::tensor::backend::AutodiffBackend;
use probe::{ProbeConfig, Schedule};
use rmt_core::diagnostics::{DiagnosticsConfig, NullModel, VarianceEstimator};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// The embedded corpus ([`embedded_documents`]), written as one C4-format shard.
    Embedded,
    /// Local shards: a `.json.gz`/`.jsonl`/`.txt` file or a directory of them.
    Path(PathBuf),
}

/// The resolved configuration of a run, written to `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Run name (a column of every metric row).
    pub name: String,
    /// Preset name (`tiny`, `paper`).
    pub preset: String,
    /// Variants trained, in order.
    pub variants: Vec<AttentionVariant>,
    /// Text source.
    pub data: DataSource,
    /// A `tokenizer.json` to use; `None`: train a byte-level BPE of `vocab_size`.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary of the trained BPE (ignored with a given tokenizer).
    pub vocab_size: usize,
    /// The model of the first variant; the others differ only in `attention.variant`. Its
    /// `vocab_size` is the tokenizer's.
    pub model: LlamaConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Probe schedule.
    pub schedule: Schedule,
    /// σ² estimators and null laws of the weight-space metrics.
    pub diagnostics: DiagnosticsConfig,
}

/// The optimisation of a preset (DESIGN.md, "Paper presets").
///
/// `paper`: 20 000 updates of 512 sequences (64 × 8 accumulated), AdamW lr 1e-3, β = (0.9,
/// 0.999), ε 1e-8, no weight decay, 2 000 warm-up updates, cosine to 0.1·lr, no clipping.
/// `tiny`: 300 updates of 16 sequences at lr 2e-3, 30 warm-up updates, the rest alike.
/// The loss and gradient norm are read from the device every 10 updates with `paper` (a GPU
/// keeps computing while the host queues the next updates) and every update with `tiny` (the
/// CPU backends compute as they go: nothing to overlap).
///
/// # Errors
/// An unknown preset name.
pub fn preset_train(preset: &str) -> Result<TrainConfig, ExperimentError> {
    let base = TrainConfig {
        steps: 300,
        batch: 16,
        accumulation: 1,
        lr: 2e-3,
        warmup: 30,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        clip_norm: None,
        eval_every: 50,
        eval_batches: 4,
        checkpoint_every: 100,
        probe_batch: 2,
        seed: 0,
        read_every: 1,
    };
    match preset {
        "tiny" => Ok(base),
        "paper" => Ok(TrainConfig {
            steps: 20_000,
            batch: 64,
            accumulation: 8,
            lr: 1e-3,
            warmup: 2_000,
            eval_every: 1_000,
            eval_batches: 8,
            checkpoint_every: 1_000,
            probe_batch: 4,
            read_every: 10,
            ..base
        }),
        other => Err(ExperimentError::Invalid(format!(
            "unknown preset `{other}` (tiny, paper)"
        ))),
    }
}

/// The probe schedule of a preset: the paper's (every 100 updates, 10 log-spaced points per
/// decade before 1 000) for `paper`; every 25 updates and 5 per decade before 100 for `tiny`.
pub fn preset_schedule(preset: &str) -> Schedule {
    if preset == "paper" {
        Schedule::paper()
    } else {
        Schedule {
            every: 25,
            log_until: 100,
            per_decade: 5,
            include_zero: true,
            last: None,
        }
    }
}

/// Command-line choices, before resolution into a [`RunConfig`].
#[derive(Debug, Clone)]
pub struct Options {
    /// `tiny` or `paper`.
    pub preset: String,
    /// Variants to train.
    pub variants: Vec<AttentionVariant>,
    /// Override of the number of updates (the warm-up becomes 10 % of it).
    pub steps: Option<u64>,
    /// Text source.
    pub data: DataSource,
    /// A `tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    /// Override of the micro-batch and of the accumulation.
    pub batch: Option<usize>,
    /// Override of the accumulation steps.
    pub accumulation: Option<usize>,
    /// Seed.
    pub seed: u64,
}

impl Options {
    /// The default run: tiny preset, all three variants, embedded corpus.
    pub fn tiny() -> Self {
        Self {
            preset: "tiny".into(),
            variants: AttentionVariant::ALL.to_vec(),
            steps: None,
            data: DataSource::Embedded,
            tokenizer: None,
            batch: None,
            accumulation: None,
            seed: 0,
        }
    }

    /// Resolves the preset and the overrides. The model's vocabulary is set later, from the
    /// tokenizer.
    ///
    /// # Errors
    /// Unknown presets, no variants, contradictory overrides.
    pub fn resolve(&self) -> Result<RunConfig, ExperimentError> {
        let first = *self
            .variants
            .first()
            .ok_or_else(|| ExperimentError::Invalid("no variant to train".into()))?;
        let mut model = LlamaConfig::preset(&self.preset, first).ok_or_else(|| {
            ExperimentError::Invalid(format!("unknown preset `{}` (tiny, paper)", self.preset))
        })?;
        let mut train = preset_train(&self.preset)?;
        train.seed = self.seed;
        if let Some(s) = self.steps {
            train.steps = s;
            train.warmup = s / 10;
            train.checkpoint_every = train.checkpoint_every.min(s.max(1));
            train.eval_every = train.eval_every.min(s.div_ceil(4).max(1));
        }
        if let Some(b) = self.batch {
            train.batch = b;
        }
        if let Some(a) = self.accumulation {
            train.accumulation = a;
        }
        train.validate()?;
        let vocab_size = model.vocab_size;
        model.vocab_size = 0; // set from the tokenizer
        Ok(RunConfig {
            name: format!("mla-spectra-{}", self.preset),
            preset: self.preset.clone(),
            variants: self.variants.clone(),
            data: self.data.clone(),
            tokenizer: self.tokenizer.clone(),
            vocab_size: if self.preset == "paper" {
                32_000
            } else {
                vocab_size
            },
            model,
            train,
            schedule: preset_schedule(&self.preset),
            diagnostics: DiagnosticsConfig {
                estimators: vec![VarianceEstimator::Empirical, VarianceEstimator::Trimmed],
                nulls: vec![NullModel::Mp, NullModel::Product],
                ..DiagnosticsConfig::default()
            },
        })
    }
}

/// The packed training and validation data of a run, and the tokenizer's vocabulary size.
pub struct RunData {
    /// Training windows.
    pub train: Packed,
    /// Validation windows.
    pub validation: Packed,
    /// Tokenizer vocabulary (the model's `vocab_size`).
    pub vocab_size: usize,
    /// Training documents.
    pub train_documents: usize,
}

/// Reads the corpus, loads or trains the tokenizer (saving it as `dir/tokenizer.json`; a
/// resumed run reuses that file), and packs both splits.
///
/// # Errors
/// Data and tokenizer errors.
pub fn prepare_data(config: &RunConfig, dir: &Path) -> Result<RunData, ExperimentError> {
    let corpus_path = match &config.data {
        DataSource::Embedded => {
            let shard = dir.join("data").join("embedded-00000-of-00001.json.gz");
            if !shard.is_file() {
                write_c4_shard(&shard, &embedded_documents())?;
            }
            shard
        }
        DataSource::Path(p) => p.clone(),
    };
    let corpus = Corpus::open(&corpus_path, config.train.seed)?;
    let train_docs = corpus.documents(Split::Train)?;
    let validation_docs = corpus.documents(Split::Validation)?;
    if train_docs.is_empty() || validation_docs.is_empty() {
        return Err(ExperimentError::Invalid(format!(
            "{}: {} training and {} validation documents; both must be non-empty",
            corpus_path.display(),
            train_docs.len(),
            validation_docs.len()
        )));
    }
    let saved = dir.join("tokenizer.json");
    let tokenizer = if saved.is_file() {
        tokens::load(&saved)?
    } else {
        let t = match &config.tokenizer {
            Some(p) => tokens::load(p)?,
            None => tokens::train_bpe(&train_docs, config.vocab_size)?,
        };
        tokens::save(&t, &saved)?;
        t
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    let context = config.model.context;
    Ok(RunData {
        train: pack(&tokenizer, &train_docs, context, vocab_size)?,
        validation: pack(&tokenizer, &validation_docs, context, vocab_size)?,
        vocab_size,
        train_documents: train_docs.len(),
    })
}

/// Opens `dir` for `config`: a new directory gets `config.json`; an existing one must hold the
/// same configuration (then the run resumes).
///
/// # Errors
/// A directory holding a different run, or file system errors.
pub fn open_run_dir(config: &RunConfig, dir: &Path) -> Result<bool, ExperimentError> {
    let path = dir.join("config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let existing: RunConfig = serde_json::from_str(&text).map_err(|e| {
            ExperimentError::Invalid(format!("{}: not a run configuration: {e}", path.display()))
        })?;
        if &existing != config {
            return Err(ExperimentError::Invalid(format!(
                "{} holds a different run; resume it with `--resume {}` or choose another `--out`",
                dir.display(),
                dir.display()
            )));
        }
        return Ok(true);
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let text = serde_json::to_string_pretty(config).expect("serialisable");
    std::fs::write(&path, text).map_err(io_err(&path))?;
    Ok(false)
}

/// Reads the configuration of an existing run directory (for `--resume DIR`).
///
/// # Errors
/// A missing or malformed `config.json`.
pub fn read_run_config(dir: &Path) -> Result<RunConfig, ExperimentError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ExperimentError::Invalid(format!(
            "{}: {e}: `--resume` needs a run directory written by this command",
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| {
        ExperimentError::Invalid(format!("{}: not a run configuration: {e}", path.display()))
    })
}

/// The model of `variant` in a run.
pub fn model_config(config: &RunConfig, variant: AttentionVariant) -> LlamaConfig {
    let mut m = config.model.clone();
    m.attention.variant = variant;
    m
}

/// The probe configuration of `variant` in a run.
pub fn probe_config(config: &RunConfig, variant: AttentionVariant) -> ProbeConfig {
    let mut p = ProbeConfig::new(&config.name, variant.name(), config.schedule.clone());
    p.diagnostics = config.diagnostics.clone();
    p
}

/// Trains every variant of `config` in `dir` (resuming each from its newest checkpoint),
/// then draws the figures and writes the report. `progress(variant, progress)` is called
/// after every update.
///
/// # Errors
/// Data, training, figure and report errors.
pub fn run<B: AutodiffBackend>(
    config: &RunConfig,
    dir: &Path,
    device: &B::Device,
    backend: &str,
    mut progress: impl FnMut(AttentionVariant, &TrainConfig, Progress),
) -> Result<Vec<(AttentionVariant, RunSummary)>, ExperimentError> {
    let data = prepare_data(config, dir)?;
    let mut config = config.clone();
    config.model.vocab_size = data.vocab_size;
    let mut summaries = Vec::new();
    for &variant in &config.variants {
        let model = model_config(&config, variant);
        let vdir = dir.join(variant.name());
        let spec = RunSpec {
            model: &model,
            train: &config.train,
            probe: probe_config(&config, variant),
            train_data: &data.train,
            validation_data: &data.validation,
            dir: &vdir,
            initial: None,
            phase_timing: false,
        };
        let summary = train::<B>(&spec, device, |p| progress(variant, &config.train, p))?;
        summaries.push((variant, summary));
    }
    let summary_path = dir.join("summary.json");
    let mut all: Vec<serde_json::Value> = std::fs::read_to_string(&summary_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for (v, s) in &summaries {
        if s.steps_run > 0 {
            all.push(serde_json::json!({"variant": v.name(), "backend": backend, "summary": s}));
        }
    }
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&all).expect("serialisable"),
    )
    .map_err(io_err(&summary_path))?;
    let runs = analysis::load_run(dir, &config)?;
    figures::write_all(&runs, &dir.join("figures"))?;
    summary::write_report(&runs, &config, &data, backend, dir)?;
    Ok(summaries)
}

/// Redraws the figures of a run directory from its metrics alone (no data, no checkpoints):
/// after a change to the figures, or for metrics brought back from another machine.
///
/// # Errors
/// A missing `config.json` or metrics file, or drawing failures.
pub fn redraw(dir: &Path) -> Result<(), ExperimentError> {
    let config = read_run_config(dir)?;
    let runs = analysis::load_run(dir, &config)?;
    figures::write_all(&runs, &dir.join("figures"))
}
