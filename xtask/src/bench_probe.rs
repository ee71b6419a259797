//! `cargo xtask bench probe`: the probe's overhead on training, measured as training-loop
//! time with and without it in the same invocation (same model, data, seed and steps).
//!
//! After a short warm-up run (kernel compilation, allocator growth), four runs of the real
//! training loop ([`experiments::train::train`]): no probe, the paper's
//! cadence (every 100 updates from update 0: with `--steps 100`, exactly one event, as in
//! steady state), every update, and no probe again (its difference from the first says how
//! much of an overhead is noise). Overhead = `t_probe / t_none − 1` with `t_none` the mean of
//! the two probe-free runs. The cost of one probe event is `(t_every − t_none) / steps`; the
//! steady-state overhead at the paper's cadence is the device time of one event with idle
//! workers (the paper-cadence run's own accounting) over `100 · t_step`, when one event's
//! host work fits in those 100 updates.

use attn_models::{AttentionVariant, LlamaConfig};
use experiments::train::{RunSpec, TrainConfig, train};
use probe::{ProbeConfig, Schedule};

/// Arguments of `bench probe`.
#[derive(clap::Args)]
pub struct Args {
    /// Backend: cpu (ndarray, f32) or cuda (bf16; needs `--features cuda`).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Matrix products on the CUDA backend: cublas or cubecl (burn's kernels).
    #[arg(long, value_enum, default_value_t)]
    matmul: crate::gpu::Matmul,
    /// Model preset: tiny or paper.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Attention variant.
    #[arg(long, default_value = "mha")]
    variant: String,
    /// Updates per run.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Sequences per update.
    #[arg(long)]
    batch: Option<usize>,
    /// Probe worker threads (default: half the cores, at least two).
    #[arg(long)]
    workers: Option<usize>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let variant = AttentionVariant::from_name(&args.variant)
        .ok_or_else(|| format!("unknown variant `{}`", args.variant))?;
    let model = LlamaConfig::preset(&args.preset, variant)
        .ok_or_else(|| format!("unknown preset `{}` (tiny, paper)", args.preset))?;
    // Validation only at the end, outside the timed loop.
    let config = crate::bench_train::bench_config(&args.preset, args.steps, args.batch)?;
    match args.backend.as_str() {
        "cpu" => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            bench::<B>(&model, &config, &Default::default(), "cpu f32", args)
        }
        "cuda" => cuda(&model, &config, args),
        other => Err(format!("unknown backend `{other}` (cpu, cuda)")),
    }
}

#[cfg(feature = "cuda")]
fn cuda(model: &LlamaConfig, config: &TrainConfig, args: &Args) -> Result<(), String> {
    crate::gpu::with_cuda_backend!(args.matmul, |B| bench::<B>(
        model,
        config,
        &Default::default(),
        args.matmul.label(),
        args
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &LlamaConfig, _: &TrainConfig, _: &Args) -> Result<(), String> {
    Err(crate::bench_train::NO_CUDA.into())
}

fn bench<B: burn::tensor::backend::AutodiffBackend>(
    model: &LlamaConfig,
    config: &TrainConfig,
    device: &B::Device,
    backend: &str,
    args: &Args,
) -> Result<(), String> {
    let windows = (config.steps as usize + 1) * config.batch;
    let train_data = crate::bench_train::synthetic_windows(
        windows.min(4096),
        model.context,
        model.vocab_size,
        1,
    );
    let validation = crate::bench_train::synthetic_windows(
        config.probe_batch.max(1),
        model.context,
        model.vocab_size,
        2,
    );
    let root = std::env::temp_dir().join(format!("xtask-bench-probe-{}", std::process::id()));
    let never = Schedule::never();
    // From update 0: the event meets idle workers, as every event does in steady state.
    let steady = Schedule::every(100);
    let every = Schedule {
        include_zero: false,
        ..Schedule::every(1)
    };
    let workers = args.workers.unwrap_or_else(ProbeConfig::default_workers);
    println!(
        "# bench probe: {backend}, preset {}, {}, {} updates of {} × {} tokens, probe workers {}",
        args.preset, args.variant, config.steps, config.batch, model.context, workers
    );
    // The warm-up run (a few updates, every probe event kind once) keeps kernel compilation
    // and allocator growth out of the timed runs.
    let mut warm = config.clone();
    warm.steps = config.steps.min(4);
    warm.warmup = 1;
    let mut times = Vec::new();
    let mut every_stats = None;
    let mut paper_stats = None;
    for (i, (name, schedule)) in [
        ("warm-up", every.clone()),
        ("none", never.clone()),
        ("paper-cadence", steady),
        ("every-step", every),
        ("none-again", never),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = root.join(format!("{i}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut probe = ProbeConfig::new("bench", &args.variant, schedule);
        probe.workers = workers;
        probe.diagnostics.nulls = vec![
            rmt_core::diagnostics::NullModel::Mp,
            rmt_core::diagnostics::NullModel::Product,
        ];
        let spec = RunSpec {
            model,
            train: if name == "warm-up" { &warm } else { config },
            probe,
            train_data: &train_data,
            validation_data: &validation,
            dir: &dir,
            initial: None,
            phase_timing: false,
        };
        let s = train::<B>(&spec, device, |_| {}).map_err(|e| e.to_string())?;
        let step_ms = 1e3 * s.seconds / spec.train.steps as f64;
        println!(
            "run={name} seconds={:.3} step_ms={step_ms:.2} events={} stalls={} stall_s={:.3} device_s={:.3} (effective_qk_s={:.3} grams_s={:.3} maps_s={:.3}) host_s={:.2} rows={}",
            s.seconds,
            s.probe.events,
            s.probe.stalls,
            s.probe.stall_seconds,
            s.probe.device_seconds,
            s.probe.effective_qk_seconds,
            s.probe.grams_seconds,
            s.probe.maps_seconds,
            s.probe.host_seconds,
            s.probe.rows
        );
        match name {
            "every-step" => every_stats = Some(s.probe),
            "paper-cadence" => paper_stats = Some(s.probe),
            _ => {}
        }
        if name != "warm-up" {
            times.push(s.seconds);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let none = 0.5 * (times[0] + times[3]);
    let noise = (times[0] - times[3]).abs() / none;
    let per_event = (times[2] - none) / config.steps as f64;
    let t_step = none / config.steps as f64;
    // At the paper's cadence events are 100 updates apart. If the host work of one event
    // (spread over the workers) fits in that interval the queue never fills, and the training
    // thread pays only the device part of an event; otherwise it pays the whole measured cost.
    // The device part comes from the paper-cadence run (idle workers, as in steady state)
    // when it had an event, else from the every-step run (workers busy: an upper bound).
    let stats = every_stats.unwrap_or_default();
    let events = stats.events.max(1) as f64;
    let interval = 100.0 * t_step;
    let host_per_event = stats.host_seconds / events / workers as f64;
    let (device_per_event, source) = match paper_stats {
        Some(p) if p.events > 0 => (p.device_seconds / p.events as f64, "paper-cadence"),
        _ => (stats.device_seconds / events, "every-step"),
    };
    let steady = if host_per_event < interval {
        device_per_event
    } else {
        per_event
    };
    println!(
        "overhead paper-cadence={:+.2}% every-step={:+.2}% noise={:.2}% event_ms={:.2} device_ms_per_event={:.1} (from {source}) host_s_per_event_per_worker={:.2} steady_paper_cadence={:+.3}% upper_bound={:+.3}%",
        100.0 * (times[1] / none - 1.0),
        100.0 * (times[2] / none - 1.0),
        100.0 * noise,
        1e3 * per_event,
        1e3 * device_per_event,
        host_per_event,
        100.0 * steady / interval,
        100.0 * per_event / interval
    );
    Ok(())
}
