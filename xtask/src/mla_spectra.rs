//! `cargo xtask reproduce mla-spectra`: pre-train MHA, MLA-PreRoPE and MLA-Decoupled with the
//! probe attached, then figures and a report (seed 000).

use attn_models::AttentionVariant;
use experiments::mla_spectra::{self, DataSource, Options, RunConfig};
use experiments::train::{Progress, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `reproduce mla-spectra`.
#[derive(clap::Args)]
pub struct Args {
    /// Model and optimisation preset: `tiny` (two CPU cores, minutes) or `paper` (LLaMA-130M).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Backend: `cpu` (ndarray, f32) or `cuda` (bf16; needs `--features cuda`).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Matrix products on the CUDA backend: cublas or cubecl (burn's kernels).
    #[arg(long, value_enum, default_value_t)]
    matmul: crate::gpu::Matmul,
    /// Variants to train, comma-separated.
    #[arg(
        long,
        default_value = "mha,mla-prerope,mla-decoupled",
        value_delimiter = ','
    )]
    variants: Vec<String>,
    /// Optimizer updates (overrides the preset; the warm-up becomes 10 % of it).
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch (overrides the preset).
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches accumulated per update (overrides the preset).
    #[arg(long)]
    accumulation: Option<usize>,
    /// Text: a C4-format `.json.gz` shard, a `.txt`/`.jsonl` file or a directory of them, or
    /// `c4` to download shards from the HF hub. Default: the embedded corpus.
    #[arg(long)]
    data: Option<String>,
    /// A `tokenizer.json` (e.g. T5's); default: train a byte-level BPE on the training data.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "runs/mla-spectra")]
    out: PathBuf,
    /// Resume the run in this directory from its newest checkpoints (its `config.json` rules).
    #[arg(long, conflicts_with_all = ["preset", "variants", "steps", "batch", "accumulation", "data", "tokenizer", "seed", "out"])]
    resume: Option<PathBuf>,
    /// Only redraw the figures of the run in this directory from its metrics.
    #[arg(long, conflicts_with = "resume")]
    redraw: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    if let Some(dir) = &args.redraw {
        mla_spectra::redraw(dir).map_err(|e| e.to_string())?;
        eprintln!("redrew {}/figures", dir.display());
        return Ok(());
    }
    let (config, dir) = match &args.resume {
        Some(dir) => (
            mla_spectra::read_run_config(dir).map_err(|e| e.to_string())?,
            dir.clone(),
        ),
        None => (resolve(&args)?, args.out.clone()),
    };
    let resumed = mla_spectra::open_run_dir(&config, &dir).map_err(|e| e.to_string())?;
    eprintln!(
        "{} {} ({} preset, {} backend, {} steps × {} sequences of {} tokens) in {}",
        if resumed { "resuming" } else { "training" },
        config
            .variants
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", "),
        config.preset,
        args.backend,
        config.train.steps,
        config.train.batch * config.train.accumulation,
        config.model.context,
        dir.display()
    );
    match args.backend.as_str() {
        "cpu" => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            train_on::<B>(
                &config,
                &dir,
                &Default::default(),
                "cpu (ndarray f32)",
                args.quiet,
            )
        }
        "cuda" => cuda(&config, &dir, args.matmul, args.quiet),
        other => Err(format!("unknown backend `{other}` (cpu, cuda)")),
    }?;
    eprintln!(
        "wrote {}/report.md, report.html, figures/, metrics per variant",
        dir.display()
    );
    Ok(())
}

fn resolve(args: &Args) -> Result<RunConfig, String> {
    let variants = args
        .variants
        .iter()
        .map(|v| {
            AttentionVariant::from_name(v.trim())
                .ok_or_else(|| format!("unknown variant `{v}` (mha, mla-prerope, mla-decoupled)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = match args.data.as_deref() {
        None => DataSource::Embedded,
        Some("c4") => DataSource::Path(download_c4(args.quiet)?),
        Some(p) => DataSource::Path(PathBuf::from(p)),
    };
    Options {
        preset: args.preset.clone(),
        variants,
        steps: args.steps,
        data,
        tokenizer: args.tokenizer.clone(),
        batch: args.batch,
        accumulation: args.accumulation,
        seed: args.seed,
    }
    .resolve()
    .map_err(|e| e.to_string())
}

/// `--data c4`: the first training and validation shards of `allenai/c4` `en`, cached under
/// `$XDG_CACHE_HOME/attention-spectra/c4` (or `~/.cache/…`); `C4_BASE_URL` overrides the hub.
fn download_c4(quiet: bool) -> Result<PathBuf, String> {
    use experiments::download::{C4_BASE_URL, fetch, train_shard, validation_shard};
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("attention-spectra")
        .join("c4");
    let base = std::env::var("C4_BASE_URL").unwrap_or_else(|_| C4_BASE_URL.to_string());
    fetch(&base, &[train_shard(0), validation_shard(0)], &cache, quiet).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
fn cuda(
    config: &RunConfig,
    dir: &std::path::Path,
    matmul: crate::gpu::Matmul,
    quiet: bool,
) -> Result<(), String> {
    crate::gpu::with_cuda_backend!(matmul, |B| train_on::<B>(
        config,
        dir,
        &Default::default(),
        matmul.label(),
        quiet
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &RunConfig, _: &std::path::Path, _: crate::gpu::Matmul, _: bool) -> Result<(), String> {
    Err(crate::bench_train::NO_CUDA.into())
}

fn train_on<B: burn::tensor::backend::AutodiffBackend>(
    config: &RunConfig,
    dir: &std::path::Path,
    device: &B::Device,
    backend: &str,
    quiet: bool,
) -> Result<(), String> {
    let mut bars: HashMap<AttentionVariant, ProgressBar> = HashMap::new();
    let style = ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
        .expect("valid template")
        .progress_chars("=> ");
    let progress = |variant: AttentionVariant, train: &TrainConfig, p: Progress| {
        if quiet {
            return;
        }
        let bar = bars.entry(variant).or_insert_with(|| {
            let b = ProgressBar::new(train.steps).with_style(style.clone());
            b.set_prefix(variant.name());
            b
        });
        bar.set_position(p.step);
        bar.set_message(format!(
            "loss {:.3} {:.0} tok/s",
            p.loss, p.tokens_per_second
        ));
        if p.step == train.steps {
            bar.finish();
        }
    };
    let summaries =
        mla_spectra::run::<B>(config, dir, device, backend, progress).map_err(|e| e.to_string())?;
    for (v, s) in summaries {
        if s.steps_run > 0 {
            eprintln!(
                "{:>14}: {} steps in {:.1} s, {:.0} tokens/s; probe: {} events, {} stalls ({:.2} s waiting), {:.2} s device, {:.2} s host",
                v.name(),
                s.steps_run,
                s.seconds,
                s.tokens_per_second,
                s.probe.events,
                s.probe.stalls,
                s.probe.stall_seconds,
                s.probe.device_seconds,
                s.probe.host_seconds
            );
        }
    }
    Ok(())
}
