//! `cargo xtask diagnose`.

use rmt_core::checkpoint::{AttentionKind, Checkpoint, HeadsFrom, LayerFactors};
use rmt_core::diagnostics::{
    DiagnosticsConfig, Factorization, NullModel, SpectralMetrics, SpectrumDiagnostics,
    VarianceEstimator,
};
use rmt_core::effective::KeyBasis;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A safetensors checkpoint (HF LLaMA/Qwen/Gemma/OLMo, fused Phi-3/GPT-NeoX/BLOOM/GPT-2,
    /// DeepSeek-V2/V3 MLA, or this project's export): a
    /// `.safetensors` file, a sharded model's `model.safetensors.index.json`, or a directory
    /// holding either. F32, F16, BF16, F64 and FP8 weights (DeepSeek-V3's block scales
    /// applied) are read.
    /// Without one, a freshly initialised LLaMA-130M attention stack is diagnosed (12 layers,
    /// d = 768, 12 heads, weights N(0, 0.02²), seed 0) — the paper's starting point.
    checkpoint: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Also diagnose every head.
    #[arg(long)]
    per_head: bool,
    /// Number of attention heads (default: `num_attention_heads` of a config.json beside the file).
    #[arg(long)]
    heads: Option<usize>,
    /// σ² estimators, comma-separated: empirical (the paper's), median, trimmed, cdf_fit.
    #[arg(long, value_delimiter = ',', default_value = "empirical")]
    estimators: Vec<String>,
    /// Null laws, comma-separated: mp (the paper's), product.
    #[arg(long, value_delimiter = ',', default_value = "mp")]
    nulls: Vec<String>,
    /// Only these layers (comma-separated indices).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Which stack of layers, by its name before `.N.` (e.g. `model.language_model.layers`),
    /// when the checkpoint holds several (a vision-language or encoder–decoder model).
    #[arg(long)]
    stack: Option<String>,
    /// Precision of `M = QKᵀ`, `G` and the reduction. `f64` takes twice the time; in `f32` an
    /// eigenvalue within about √m·6e-8·λ₁ of λ₊ can land on either side of it.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Precision {
    F32,
    F64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Serialize)]
struct LayerReport {
    layer: usize,
    /// The stack read (`model.layers`); `null` for the initialised stack.
    stack: Option<String>,
    /// `f32` or `f64`: the precision of `M`, `G` and the reduction.
    precision: &'static str,
    /// Where the head count came from: `--heads`, or a config.json key
    /// (`text_config.num_attention_heads`); `null` for the initialised stack.
    heads_from: Option<String>,
    attention: rmt_core::checkpoint::AttentionKind,
    rows: usize,
    width: usize,
    diagnostics: rmt_core::diagnostics::LayerDiagnostics,
}

pub fn run(args: Args) -> Result<(), String> {
    let estimators = args
        .estimators
        .iter()
        .map(|s| VarianceEstimator::from_name(s.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let nulls = args
        .nulls
        .iter()
        .map(|s| NullModel::from_name(s.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let config = DiagnosticsConfig {
        estimators,
        nulls,
        per_head: args.per_head,
        ..Default::default()
    };
    let source = match &args.checkpoint {
        Some(path) => {
            let checkpoint = Checkpoint::open_stack(path, args.heads, args.stack.as_deref())
                .map_err(|e| e.to_string())?;
            // A head count taken from a section of config.json that describes this stack
            // (a vision-language or encoder–decoder model's) is said, as it was chosen.
            if let (Some(heads), Some(HeadsFrom::Section(from))) =
                (checkpoint.heads(), checkpoint.heads_from())
            {
                eprintln!(
                    "{}.N: {heads} heads, config.json's {from} (its section gives this stack's layer count and width)",
                    checkpoint.stack()
                );
            }
            Source::Checkpoint(Box::new(checkpoint))
        }
        None if args.stack.is_some() => {
            return Err("--stack chooses among a checkpoint's stacks: give the checkpoint".into());
        }
        None => {
            eprintln!(
                "no checkpoint given: diagnosing a freshly initialised LLaMA-130M attention stack \
                 (12 layers, d = 768, 12 heads, W ~ N(0, 0.02²), seed 0); pass a .safetensors path to diagnose a model"
            );
            Source::Initialised {
                layers: 12,
                width: 768,
                heads: args.heads.unwrap_or(12),
                seed: 0,
            }
        }
    };
    let mut indices = source.layer_indices();
    if let Some(only) = &args.layers {
        for l in only {
            if !indices.contains(l) {
                return Err(format!(
                    "layer {l} has no attention weights (layers: {indices:?})"
                ));
            }
        }
        indices.retain(|i| only.contains(i));
    }
    // Every layer's shapes are checked before anything is computed or printed, so that a
    // malformed layer 31 is not found after 30 layers of output.
    for &index in &indices {
        source.layout(index)?;
    }
    match write_report(&args, &config, &source, &indices) {
        // The reader went away (`… | head`): what it wanted was printed.
        Err(Failure::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(Failure::Io(e)) => Err(e.to_string()),
        Err(Failure::Other(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}

/// Why [`write_report`] stopped.
enum Failure {
    Io(std::io::Error),
    Other(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Other(e)
    }
}

/// Diagnoses the layers `indices` of `source` and prints them in `args.format`.
fn write_report(
    args: &Args,
    config: &DiagnosticsConfig,
    source: &Source,
    indices: &[usize],
) -> Result<(), Failure> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut reports = Vec::new();
    match args.format {
        Format::Csv => writeln!(out, "layer,head,estimator,null,metric,value")?,
        Format::Table => writeln!(
            out,
            "{:>5} {:>4} {:>9} {:>7} {:>12} {:>12} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "layer",
            "head",
            "estimator",
            "null",
            "lambda_max",
            "lambda_plus",
            "mp_gap",
            "outliers",
            "energy",
            "soft_rk",
            "stable_rk",
            "tw_p"
        )?,
        Format::Json => {}
    }
    // Progress on stderr, drawn only when it is a terminal (a 61-layer DeepSeek-V3 takes
    // minutes); cleared while rows are printed.
    let bar = indicatif::ProgressBar::new(indices.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "diagnosing [{bar:30}] {pos}/{len} layers, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    // As many layers in memory at a time as there are cores, diagnosed in parallel (one
    // layer per core), printed in order as each batch finishes.
    for batch in indices.chunks(rayon::current_num_threads().max(1)) {
        let layers = batch
            .iter()
            .map(|&index| source.layer(index))
            .collect::<Result<Vec<_>, _>>()?;
        let diagnoses = match args.precision {
            Precision::F32 => LayerFactors::diagnose_all::<f32>(&layers, config),
            Precision::F64 => LayerFactors::diagnose_all::<f64>(&layers, config),
        };
        for (layer, diag) in layers.into_iter().zip(diagnoses) {
            let index = layer.index;
            let diag = diag.map_err(|e| format!("layer {index}: {e}"))?;
            match args.format {
                Format::Json => reports.push(LayerReport {
                    layer: index,
                    stack: match source {
                        Source::Checkpoint(c) => Some(c.stack().to_string()),
                        Source::Initialised { .. } => None,
                    },
                    precision: match args.precision {
                        Precision::F32 => "f32",
                        Precision::F64 => "f64",
                    },
                    heads_from: match source {
                        Source::Checkpoint(c) => c.heads_from().map(|h| h.key().to_string()),
                        Source::Initialised { .. } => None,
                    },
                    attention: layer.kind,
                    rows: layer.rows,
                    width: layer.width,
                    diagnostics: diag,
                }),
                Format::Csv | Format::Table => bar.suspend(|| {
                    std::iter::once(&diag.layer)
                        .chain(diag.per_head.iter())
                        .try_for_each(|spectrum| write_rows(&mut out, args.format, index, spectrum))
                })?,
            }
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    if let Format::Json = args.format {
        serde_json::to_writer_pretty(&mut out, &reports).map_err(std::io::Error::from)?;
        writeln!(out)?;
    }
    Ok(())
}

fn write_rows(
    out: &mut impl Write,
    format: Format,
    layer: usize,
    s: &SpectrumDiagnostics,
) -> std::io::Result<()> {
    let head = s
        .head
        .map(|h| h.to_string())
        .unwrap_or_else(|| "all".to_string());
    for d in &s.diagnoses {
        let (e, n) = (d.estimator.name(), d.null.name());
        match format {
            Format::Csv => {
                for (metric, value) in d.metrics.named_values() {
                    writeln!(out, "{layer},{head},{e},{n},{metric},{value}")?;
                }
            }
            Format::Table => {
                let m: &SpectralMetrics = &d.metrics;
                writeln!(
                    out,
                    "{layer:>5} {head:>4} {e:>9} {n:>7} {:>12.5e} {:>12.5e} {:>11.3e} {:>8} {:>8.4} {:>8.4} {:>9.3} {:>9.2e}",
                    m.lambda_max,
                    m.lambda_plus,
                    m.mp_gap,
                    m.outlier_count,
                    m.outlier_energy,
                    m.mp_soft_rank,
                    m.stable_rank,
                    m.tw_p_value
                )?;
            }
            Format::Json => {}
        }
    }
    Ok(())
}

/// Where the layers come from.
enum Source {
    Checkpoint(Box<Checkpoint>),
    /// LLaMA-style initialisation: `Q, K ∈ ℝ^{d×d}` with i.i.d. `N(0, 0.02²)` entries.
    Initialised {
        layers: usize,
        width: usize,
        heads: usize,
        seed: u64,
    },
}

impl Source {
    fn layer_indices(&self) -> Vec<usize> {
        match self {
            Source::Checkpoint(c) => c.layer_indices(),
            Source::Initialised { layers, .. } => (0..*layers).collect(),
        }
    }

    /// The checks of [`Source::layer`] that need no tensor read.
    fn layout(&self, index: usize) -> Result<(), String> {
        match self {
            Source::Checkpoint(c) => c.layout(index).map(|_| ()).map_err(|e| e.to_string()),
            Source::Initialised { width, heads, .. } => {
                if *heads == 0 || width % heads != 0 {
                    return Err(format!("--heads {heads} does not divide the width {width}"));
                }
                Ok(())
            }
        }
    }

    fn layer(&self, index: usize) -> Result<LayerFactors, String> {
        match self {
            Source::Checkpoint(c) => c.layer_factors(index).map_err(|e| e.to_string()),
            Source::Initialised {
                width, heads, seed, ..
            } => {
                use rand::SeedableRng;
                use rand_distr::{Distribution, Normal};
                self.layout(index)?;
                let d = *width;
                let mut rng = rand_pcg::Pcg64::seed_from_u64(seed.wrapping_add(index as u64));
                let normal = Normal::new(0.0f32, 0.02).map_err(|e| e.to_string())?;
                let mut draw = || {
                    (0..d * d)
                        .map(|_| normal.sample(&mut rng))
                        .collect::<Vec<f32>>()
                };
                let (q, k) = (draw(), draw());
                Ok(LayerFactors {
                    index,
                    kind: AttentionKind::Mha {
                        heads: *heads,
                        kv_heads: *heads,
                        head_dim: d / heads,
                    },
                    rows: d,
                    width: d,
                    factorization: Factorization::dense(d),
                    factors: KeyBasis { dim: d, q, k },
                })
            }
        }
    }
}
