//! The pre-training loop: AdamW, linear warm-up then cosine decay, optional global-norm
//! clipping, gradient accumulation, validation, checkpoints with exact resumption, and the
//! probe attached.
//!
//! One step (nanoGPT's "iter") at `step` = number of optimizer updates so far:
//!
//! 1. if scheduled, probe the model (weight and activation space) and measure the
//!    validation loss — both at `step`;
//! 2. `accumulation` micro-batches of `batch` sequences: forward, cross-entropy, backward,
//!    gradients summed (each loss divided by `accumulation`, so the sum is the mean);
//! 3. clip to a global norm, if asked (the norm and the factor stay on the device); AdamW
//!    update with the learning rate of `step` ([`crate::optim::FusedAdamW`]: burn's AdamW, one
//!    fused kernel per parameter where the backend registered one);
//!    record `loss`, `grad_norm`, `lr` at `step` — read from the device with those of the
//!    updates before it every [`TrainConfig::read_every`] updates and before any probe,
//!    evaluation or checkpoint, so the host never waits for the device in between;
//! 4. after every `checkpoint_every` updates, checkpoint: the model, the optimizer, and the
//!    metrics files' lengths.
//!
//! The batch of every step is a pure function of `(seed, step)` ([`SequenceOrder`]), the model
//! is initialised from the seed, and metric rows go through one ordered writer: two runs with
//! the same seed write the same metrics, and a run resumed from a checkpoint continues
//! exactly where it was, neither losing nor repeating a row.

use crate::optim::FusedAdamWConfig;
use crate::tokens::{Packed, SequenceOrder};
use crate::{ExperimentError, io_err};
use attn_models::{Llama, LlamaConfig};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::Transaction;
use burn::tensor::backend::AutodiffBackend;
use probe::{MetricRow, Probe, ProbeConfig, WriterState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Optimisation and bookkeeping of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer updates.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per update (global batch = `batch · accumulation`).
    pub accumulation: usize,
    /// Peak learning rate `η`.
    pub lr: f64,
    /// Linear warm-up updates, from `η/warmup` to `η`.
    pub warmup: u64,
    /// Cosine decay ends at `min_lr_ratio · η`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW `β₁`.
    pub beta1: f64,
    /// AdamW `β₂`.
    pub beta2: f64,
    /// AdamW `ε`.
    pub epsilon: f64,
    /// Clip the gradient to this global L2 norm (`None`: no clipping, the paper's default).
    pub clip_norm: Option<f64>,
    /// Validation loss every this many updates (and at the end).
    pub eval_every: u64,
    /// Micro-batches of validation data per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many updates (and at the end).
    pub checkpoint_every: u64,
    /// Sequences of the fixed activation-space probe batch.
    pub probe_batch: usize,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Read the updates' loss and gradient norm from the device every this many updates (and
    /// before every probe, evaluation and checkpoint), all of them in one transfer. Each read
    /// waits for the device to finish everything queued; between reads the host queues the
    /// next updates while the device still runs the last, and the loss check, metric rows and
    /// progress of an update come at the read after it. `1` reads every update. The metric
    /// files are the same whatever the value.
    #[serde(default = "one")]
    pub read_every: u64,
}

fn one() -> u64 {
    1
}

impl TrainConfig {
    /// The learning rate at `step`: linear warm-up to `η` over `warmup` updates, then cosine
    /// decay to `min_lr_ratio · η` at `steps`:
    /// `η_t = η·(t+1)/W` for `t < W`, else
    /// `η·(r + (1−r)·½(1 + cos(π (t−W)/(T−W))))`.
    ///
    /// # Example
    /// ```
    /// let mut c = experiments::mla_spectra::preset_train("tiny").unwrap();
    /// c.steps = 100; c.warmup = 10; c.lr = 1e-3; c.min_lr_ratio = 0.1;
    /// assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
    /// assert!((c.lr_at(100) - 1e-4).abs() < 1e-12);
    /// ```
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let r = self.min_lr_ratio;
        self.lr * (r + (1.0 - r) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }

    /// Checks the configuration for contradictions.
    ///
    /// # Errors
    /// Zero sizes, a warm-up longer than the run, rates outside their ranges.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        let bad = |m: String| Err(ExperimentError::Invalid(m));
        if self.steps == 0 || self.batch == 0 || self.accumulation == 0 {
            return bad(format!(
                "steps {}, batch {}, accumulation {} must all be ≥ 1",
                self.steps, self.batch, self.accumulation
            ));
        }
        if self.warmup > self.steps {
            return bad(format!(
                "warm-up of {} updates is longer than the run ({} steps)",
                self.warmup, self.steps
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return bad(format!(
                "learning rate {} must be positive and min_lr_ratio {} in [0, 1]",
                self.lr, self.min_lr_ratio
            ));
        }
        if self.eval_every == 0
            || self.checkpoint_every == 0
            || self.eval_batches == 0
            || self.read_every == 0
        {
            return bad(
                "eval_every, eval_batches, checkpoint_every and read_every must be ≥ 1".into(),
            );
        }
        if let Some(c) = self.clip_norm
            && !(c > 0.0 && c.is_finite())
        {
            return bad(format!("clip_norm {c} must be positive"));
        }
        Ok(())
    }
}

/// What a checkpoint records besides the model and optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates done; the resumed run starts its loop at this step.
    pub step: u64,
    /// Lengths of the metrics files at this checkpoint.
    pub metrics: WriterState,
    /// Whether the run is complete (final probe and evaluation written).
    pub finished: bool,
}

const STATE_FILE: &str = "state.json";
const MODEL_FILE: &str = "model";
const OPTIM_FILE: &str = "optimizer";

/// The newest complete checkpoint under `dir/checkpoints`, if any.
///
/// # Errors
/// An unreadable or corrupt `state.json`.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<(PathBuf, TrainState)>, ExperimentError> {
    let root = dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(PathBuf, TrainState)> = None;
    for p in complete_checkpoints(&root)? {
        let state_path = p.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
        let state: TrainState = serde_json::from_str(&text).map_err(|e| {
            ExperimentError::Invalid(format!(
                "{}: corrupt checkpoint state: {e}",
                state_path.display()
            ))
        })?;
        if best
            .as_ref()
            .is_none_or(|(_, b)| (state.step, state.finished) > (b.step, b.finished))
        {
            best = Some((p, state));
        }
    }
    Ok(best)
}

/// The checkpoint directories under `root` that hold a `state.json` (written last, so an
/// interrupted checkpoint has none), in name order, i.e. by step.
fn complete_checkpoints(root: &Path) -> Result<Vec<PathBuf>, ExperimentError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let p = entry.map_err(io_err(root))?.path();
        if p.join(STATE_FILE).is_file() {
            dirs.push(p);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Global L2 norm of the gradients of `module`'s parameters, `‖g‖ = √(Σ_p ‖g_p‖²)`, `[1]` in
/// f32 on the device (one fused reduction over all of them where the backend has one; not
/// read back here); `None` when no parameter has a gradient.
fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Tensor<B::InnerBackend, 1>> {
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        flat: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.flat.push(g.reshape([-1]));
            }
        }
    }
    let mut v = Collect::<B> {
        grads,
        flat: Vec::new(),
    };
    module.visit(&mut v);
    attn_models::fused::sum_of_squares_all(v.flat).map(Tensor::sqrt)
}

/// The clipping factor `min(1, c/‖g‖)` of a gradient norm `‖g‖` (`[1]`), on the device (no
/// read): exactly 1 at or below the clip norm `c`, and 1 for a zero gradient.
fn clip_factor<B: Backend>(norm: Tensor<B, 1>, c: f64) -> Tensor<B, 1> {
    norm.recip().mul_scalar(c).clamp_max(1.0)
}

/// Multiplies every gradient by `factor` (`[1]`, on the device).
fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: Tensor<B::InnerBackend, 1>,
) {
    struct Scale<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        factor: Tensor<B::InnerBackend, 1>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                let factor = self.factor.clone().cast(g.dtype()).reshape([1; D]);
                self.grads.register(param.id, g.mul(factor));
            }
        }
    }
    module.visit(&mut Scale::<B> { grads, factor });
}

/// An update whose loss and gradient norm are still on the device.
struct Unread<B: Backend> {
    step: u64,
    lr: f64,
    /// The update's loss (the micro-batches' mean), `[1]`.
    loss: Tensor<B, 1>,
    /// The gradient norm before clipping, `[1]`.
    grad_norm: Option<Tensor<B, 1>>,
    phases: Option<PhaseTimes>,
}

/// The updates of one read window, in step order, and when the window began.
struct ReadWindow<B: Backend> {
    updates: Vec<Unread<B>>,
    since: Instant,
}

impl<B: Backend> ReadWindow<B> {
    fn new() -> Self {
        Self {
            updates: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Reads every update of the window in one transaction (one wait for the device), stops at
    /// the first non-finite loss, and records each update's `loss`, `grad_norm` and `lr` rows
    /// and progress in step order; the window's wall time is shared equally among its updates.
    fn read(
        &mut self,
        spec: &RunSpec<'_>,
        tokens_per_step: f64,
        probe: &mut Probe,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), ExperimentError> {
        if self.updates.is_empty() {
            return Ok(());
        }
        let updates = std::mem::take(&mut self.updates);
        let mut transaction = Transaction::<B>::default();
        for u in &updates {
            transaction = transaction.register(u.loss.clone());
            if let Some(n) = &u.grad_norm {
                transaction = transaction.register(n.clone());
            }
        }
        let mut values = transaction
            .try_execute()
            .map_err(|e| ExperimentError::Invalid(format!("device error while training: {e}")))?
            .into_iter()
            .map(|d| d.iter::<f64>().next().unwrap_or(f64::NAN));
        let seconds = self.since.elapsed().as_secs_f64() / updates.len() as f64;
        self.since = Instant::now();
        for u in updates {
            let loss = values.next().unwrap_or(f64::NAN);
            let norm = match u.grad_norm {
                Some(_) => values.next().unwrap_or(f64::NAN),
                None => 0.0,
            };
            if !loss.is_finite() {
                return Err(ExperimentError::Invalid(format!(
                    "training loss is {loss} at step {}: the run diverged (lower the learning rate or set a clip norm)",
                    u.step
                )));
            }
            probe.record(vec![
                row(spec, u.step, "train", "loss", loss),
                row(spec, u.step, "train", "grad_norm", norm),
                row(spec, u.step, "train", "lr", u.lr),
            ])?;
            progress(Progress {
                step: u.step + 1,
                loss,
                seconds,
                tokens_per_second: tokens_per_step / seconds,
                phases: u.phases,
            });
        }
        Ok(())
    }
}

/// The value of a one-element tensor in f64, read in the tensor's own dtype (a loss computed
/// in f32 by a bf16 model is not rounded to bf16 on the way out, as `into_scalar` would).
fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// Inputs `[b, s]` and next-token targets `[b·s]` of the windows `indices`.
fn batch_tensors<B: Backend>(
    data: &Packed,
    indices: &[usize],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let s = data.window - 1;
    let mut inputs = Vec::with_capacity(indices.len() * s);
    let mut targets = Vec::with_capacity(indices.len() * s);
    for &i in indices {
        let w = data.sequence(i);
        inputs.extend(w[..s].iter().map(|&t| t as i64));
        targets.extend(w[1..].iter().map(|&t| t as i64));
    }
    let b = indices.len();
    (
        Tensor::from_data(TensorData::new(inputs, [b, s]), device),
        Tensor::from_data(TensorData::new(targets, [b * s]), device),
    )
}

/// Mean next-token cross-entropy (nats) of `model` on windows `indices`:
/// `−(1/bs) Σ log softmax(z)[target]` in f32 ([`attn_models::fused::cross_entropy`]).
fn loss_of<B: Backend>(
    model: &Llama<B>,
    data: &Packed,
    indices: &[usize],
    device: &B::Device,
) -> Tensor<B, 1> {
    let (inputs, targets) = batch_tensors::<B>(data, indices, device);
    let logits = model.forward(inputs);
    let [b, s, v] = logits.dims();
    attn_models::fused::cross_entropy(logits.reshape([b * s, v]), targets)
}

/// Validation loss: the first `eval_batches · batch` windows of the validation data (or all
/// of them if fewer), in micro-batches.
fn validation_loss<B: Backend>(
    model: &Llama<B>,
    data: &Packed,
    config: &TrainConfig,
    device: &B::Device,
) -> f64 {
    let n = data.len().min(config.eval_batches * config.batch);
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(config.batch) {
        let l = scalar(loss_of(model, data, chunk, device));
        total += l * chunk.len() as f64;
        count += chunk.len();
    }
    total / count.max(1) as f64
}

/// Progress of a run, reported once per update.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Updates done.
    pub step: u64,
    /// Training loss of this update.
    pub loss: f64,
    /// Wall time of this update (probe included): the time between two reads of the device's
    /// scalars, shared equally among the updates they read ([`TrainConfig::read_every`]).
    pub seconds: f64,
    /// Tokens per second over this update.
    pub tokens_per_second: f64,
    /// Where this update's time went, with [`RunSpec::phase_timing`].
    pub phases: Option<PhaseTimes>,
}

/// Where one update's time went, timed on the host with [`RunSpec::phase_timing`] (seconds).
/// On a device that runs asynchronously (CUDA) the first four are the host's time to build
/// and launch each phase, and `device_wait` how long the device then took to finish the
/// update: a wait near 0 means the host bounds the update, a long one the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// The micro-batches' forward passes and losses.
    pub forward: f64,
    /// Their `backward()` and the accumulation of their gradients.
    pub backward: f64,
    /// The global gradient norm and clipping.
    pub norm: f64,
    /// The optimizer's update.
    pub optimizer: f64,
    /// The wait, once all of it was launched, until the device had finished the update.
    pub device_wait: f64,
}

impl PhaseTimes {
    /// The host's time for the update: `forward + backward + norm + optimizer`.
    pub fn host(&self) -> f64 {
        self.forward + self.backward + self.norm + self.optimizer
    }

    /// The whole update: [`PhaseTimes::host`] `+ device_wait`.
    pub fn update(&self) -> f64 {
        self.host() + self.device_wait
    }
}

/// Seconds between successive calls of [`Lap::lap`].
struct Lap(Instant);

impl Lap {
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let seconds = (now - self.0).as_secs_f64();
        self.0 = now;
        seconds
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    /// Updates done in this invocation.
    pub steps_run: u64,
    /// Seconds of this invocation's training loop.
    pub seconds: f64,
    /// Mean training tokens per second in this invocation.
    pub tokens_per_second: f64,
    /// The probe's statistics in this invocation.
    pub probe: probe::ProbeStats,
}

/// Everything one training run needs.
pub struct RunSpec<'a> {
    /// The model.
    pub model: &'a LlamaConfig,
    /// Optimisation.
    pub train: &'a TrainConfig,
    /// The probe (its schedule, estimators, run and variant names).
    pub probe: ProbeConfig,
    /// Training windows.
    pub train_data: &'a Packed,
    /// Validation windows.
    pub validation_data: &'a Packed,
    /// The run directory of this model: metrics and `checkpoints/`.
    pub dir: &'a Path,
    /// Start from these weights (a directory written by [`attn_models::export::save`]:
    /// `config.json` + `model.safetensors`, whose configuration must equal `model`) instead
    /// of a seeded random initialisation. Used to train two implementations from identical
    /// weights.
    pub initial: Option<&'a Path>,
    /// Time each update's phases ([`Progress::phases`]), waiting for the device after every
    /// update: the device then drains its queue once an update, so the run's throughput is
    /// not the loop's usual one. Off in every experiment; `bench train --phases` sets it.
    pub phase_timing: bool,
}

fn row(spec: &RunSpec, step: u64, space: &str, metric: &str, value: f64) -> MetricRow {
    MetricRow {
        run: spec.probe.run.clone(),
        variant: spec.probe.variant.clone(),
        step,
        layer: 0,
        head: "all".into(),
        space: space.into(),
        estimator: "-".into(),
        metric: metric.into(),
        value,
    }
}

/// Trains one model, resuming from its newest checkpoint under `spec.dir` if there is one
/// (and doing nothing if that run is finished). `progress` is called after every update.
///
/// Training scalars are written beside the probe's rows, with `space` = `train`
/// (`loss`, `grad_norm`, `lr`) or `validation` (`loss`), layer 0 and head `all`.
///
/// # Errors
/// An invalid configuration, data too small for one batch, a non-finite loss, corrupt
/// checkpoints, and file system errors.
pub fn train<B: AutodiffBackend>(
    spec: &RunSpec,
    device: &B::Device,
    mut progress: impl FnMut(Progress),
) -> Result<RunSummary, ExperimentError> {
    let config = spec.train;
    config.validate()?;
    spec.model.validate()?;
    if spec.train_data.window != spec.model.context + 1 {
        return Err(ExperimentError::Invalid(format!(
            "data windows of {} tokens do not match the model's context {}",
            spec.train_data.window, spec.model.context
        )));
    }
    if spec.train_data.len() < config.batch || spec.validation_data.is_empty() {
        return Err(ExperimentError::Invalid(format!(
            "{} training windows of {} tokens (need at least one batch of {}) and {} validation windows: the corpus is too small",
            spec.train_data.len(),
            spec.train_data.window,
            config.batch,
            spec.validation_data.len()
        )));
    }
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let adamw = FusedAdamWConfig::new()
        .with_beta_1(config.beta1 as f32)
        .with_beta_2(config.beta2 as f32)
        .with_epsilon(config.epsilon as f32)
        .with_weight_decay(config.weight_decay as f32);
    let mut optim = adamw.init::<B, Llama<B>>();
    B::seed(device, config.seed);
    let mut model: Llama<B> = match spec.initial {
        None => spec.model.init(device)?,
        Some(dir) => {
            let (config, model) = attn_models::export::load::<B>(dir, device)?;
            if config != *spec.model {
                return Err(ExperimentError::Invalid(format!(
                    "{}: the initial weights are of a different model than the run's",
                    dir.display()
                )));
            }
            model
        }
    };
    // The final state is always probed.
    let mut probe_config = spec.probe.clone();
    probe_config.schedule = probe_config.schedule.with_last(config.steps);
    let (start, mut probe) = match latest_checkpoint(spec.dir)? {
        Some((_, state)) if state.finished => {
            return Ok(RunSummary {
                steps_run: 0,
                seconds: 0.0,
                tokens_per_second: 0.0,
                probe: probe::ProbeStats::default(),
            });
        }
        Some((path, state)) => {
            let corrupt = |what: &str, e: burn::record::RecorderError| {
                ExperimentError::Invalid(format!(
                    "{}: corrupt checkpoint ({what}): {e}",
                    path.display()
                ))
            };
            let record = recorder
                .load(path.join(MODEL_FILE), device)
                .map_err(|e| corrupt("model", e))?;
            model = model.load_record(record);
            let record = recorder
                .load(path.join(OPTIM_FILE), device)
                .map_err(|e| corrupt("optimizer", e))?;
            optim = optim.load_record(record);
            (
                state.step,
                Probe::resume(probe_config, spec.dir, state.metrics)?,
            )
        }
        None => (0, Probe::start(probe_config, spec.dir)?),
    };

    let mut order = SequenceOrder::new(spec.train_data.len(), config.seed);
    let probe_indices: Vec<usize> =
        (0..config.probe_batch.min(spec.validation_data.len())).collect();
    let tokens_per_step = (config.batch * config.accumulation * spec.model.context) as f64;
    let t0 = Instant::now();
    let observed = |step: u64, probe: &Probe| {
        probe.is_due(step) || step.is_multiple_of(config.eval_every) || step == config.steps
    };
    // Probe and validation at an observed step (callers check `observed`).
    let observe = |step: u64, model: &Llama<B>, probe: &mut Probe| -> Result<(), ExperimentError> {
        let valid = model.valid();
        if probe.is_due(step) {
            // Let the last update finish first: the probe's device time is then its own.
            <B::InnerBackend as Backend>::sync(device).map_err(|e| {
                ExperimentError::Invalid(format!("device error at step {step}: {e}"))
            })?;
            let maps = if probe.config().activation_space {
                let (inputs, _) =
                    batch_tensors::<B::InnerBackend>(spec.validation_data, &probe_indices, device);
                Some(valid.forward_with_maps(inputs).1)
            } else {
                None
            };
            probe.observe::<B::InnerBackend, _>(step, &valid, maps)?;
        }
        if step.is_multiple_of(config.eval_every) || step == config.steps {
            let v = validation_loss(&valid, spec.validation_data, config, device);
            probe.record(vec![row(spec, step, "validation", "loss", v)])?;
        }
        Ok(())
    };
    let mut window = ReadWindow::<B::InnerBackend>::new();
    for step in start..config.steps {
        if observed(step, &probe) {
            // The rows of earlier updates go first.
            window.read(spec, tokens_per_step, &mut probe, &mut progress)?;
            observe(step, &model, &mut probe)?;
        }
        let mut clock = Lap(Instant::now());
        let mut phases = PhaseTimes::default();
        let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        for micro in 0..config.accumulation {
            let indices = order.batch(
                step * config.accumulation as u64 + micro as u64,
                config.batch,
            );
            let loss = loss_of(&model, spec.train_data, &indices, device);
            let loss = loss.div_scalar(config.accumulation as f64);
            let value = loss.clone().inner();
            loss_sum = Some(match loss_sum {
                Some(acc) => acc + value,
                None => value,
            });
            phases.forward += clock.lap();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            phases.backward += clock.lap();
        }
        let Some(loss) = loss_sum else {
            return Err(ExperimentError::Invalid("accumulation must be ≥ 1".into()));
        };
        let mut grads = accumulator.grads();
        let norm = grad_norm::<B, _>(&model, &grads);
        if let (Some(c), Some(norm)) = (config.clip_norm, &norm) {
            scale_grads::<B, _>(&model, &mut grads, clip_factor(norm.clone(), c));
        }
        phases.norm = clock.lap();
        let lr = config.lr_at(step);
        model = optim.step(lr, model, grads);
        phases.optimizer = clock.lap();
        if spec.phase_timing {
            <B::InnerBackend as Backend>::sync(device).map_err(|e| {
                ExperimentError::Invalid(format!("device error at step {step}: {e}"))
            })?;
            phases.device_wait = clock.lap();
        }
        window.updates.push(Unread {
            step,
            lr,
            loss,
            grad_norm: norm,
            phases: spec.phase_timing.then_some(phases),
        });
        let done = step + 1;
        let checkpoint = done % config.checkpoint_every == 0 || done == config.steps;
        if checkpoint || window.updates.len() as u64 >= config.read_every {
            window.read(spec, tokens_per_step, &mut probe, &mut progress)?;
        }
        if checkpoint {
            let metrics = probe.checkpoint()?;
            save_checkpoint(
                spec.dir,
                &model,
                &optim,
                TrainState {
                    step: done,
                    metrics,
                    finished: false,
                },
                &recorder,
            )?;
        }
    }
    // The loop's time: the final probe, evaluation and checkpoint are not part of it.
    let seconds = t0.elapsed().as_secs_f64();
    observe(config.steps, &model, &mut probe)?;
    let metrics = probe.checkpoint()?;
    save_checkpoint(
        spec.dir,
        &model,
        &optim,
        TrainState {
            step: config.steps,
            metrics,
            finished: true,
        },
        &recorder,
    )?;
    attn_models::export::save(&model.valid(), spec.model, &spec.dir.join("model"))?;
    let stats = probe.finish()?;
    let steps_run = config.steps - start;
    Ok(RunSummary {
        steps_run,
        seconds,
        tokens_per_second: steps_run as f64 * tokens_per_step / seconds.max(1e-9),
        probe: stats,
    })
}

/// Writes `checkpoints/step-N` atomically (a `.tmp` directory renamed into place) and removes
/// older checkpoints, keeping the newest two.
fn save_checkpoint<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    dir: &Path,
    model: &Llama<B>,
    optim: &O,
    state: TrainState,
    recorder: &BinFileRecorder<FullPrecisionSettings>,
) -> Result<(), ExperimentError> {
    let root = dir.join("checkpoints");
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!("{name}.tmp"));
    let fin = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let rec_err = |e: burn::record::RecorderError| {
        ExperimentError::Invalid(format!("{}: writing a checkpoint: {e}", tmp.display()))
    };
    Recorder::<B>::record(recorder, model.clone().into_record(), tmp.join(MODEL_FILE))
        .map_err(rec_err)?;
    Recorder::<B>::record(recorder, optim.to_record(), tmp.join(OPTIM_FILE)).map_err(rec_err)?;
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(&state).expect("serialisable"),
    )
    .map_err(io_err(&state_path))?;
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
    for p in complete_checkpoints(&root)?.iter().rev().skip(2) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    // f64, as the crate's other CPU tests (burn 0.21 shares the default float dtype among
    // every `NdArray<E, I>` of the process: the first test to create a tensor sets it), and
    // an integer type of its own, so that no kernel registered by another test applies.
    type Inner = NdArray<f64, i64>;
    type B = Autodiff<Inner>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
    }

    fn host(t: Tensor<Inner, 1>) -> Vec<f64> {
        t.into_data().iter::<f64>().collect()
    }

    /// The global norm is `√(Σ_p ‖g_p‖²)` over every parameter's gradient; scaling by the clip
    /// factor leaves a gradient whose norm is the clip norm, or the gradient itself.
    #[test]
    fn gradient_norm_and_clipping() {
        let device = Default::default();
        let model = Two::<B> {
            a: LinearConfig::new(3, 4).init(&device),
            b: LinearConfig::new(4, 2).init(&device),
        };
        let grads_of = || {
            let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 0.5], [0.3, 0.0, 2.0]], &device);
            let loss = model.b.forward(model.a.forward(x)).powi_scalar(2).sum();
            GradientsParams::from_grads(loss.backward(), &model)
        };
        let grads = grads_of();
        let mut by_hand = 0.0f64;
        for id in [model.a.weight.id, model.b.weight.id] {
            let g = grads.get::<Inner, 2>(id).unwrap().reshape([-1]);
            by_hand += host(g).iter().map(|v| v * v).sum::<f64>();
        }
        for bias in [&model.a.bias, &model.b.bias] {
            let g = grads.get::<Inner, 1>(bias.as_ref().unwrap().id).unwrap();
            by_hand += host(g).iter().map(|v| v * v).sum::<f64>();
        }
        let norm = grad_norm::<B, _>(&model, &grads).unwrap();
        let got = host(norm.clone())[0];
        // f32 squares and sums of 34 terms: relative error ≤ 34·u.
        assert!(
            (got - by_hand.sqrt()).abs() <= 1e-5 * by_hand.sqrt(),
            "{got} vs {by_hand}"
        );
        for c in [0.5 * got, 2.0 * got] {
            let mut scaled = grads_of();
            scale_grads::<B, _>(&model, &mut scaled, clip_factor(norm.clone(), c));
            let after = host(grad_norm::<B, _>(&model, &scaled).unwrap())[0];
            let want = c.min(got);
            assert!(
                (after - want).abs() <= 1e-5 * want,
                "clip {c}: {after} vs {want}"
            );
        }
        let zero = Tensor::<Inner, 1>::zeros([1], &device);
        assert_eq!(host(clip_factor(zero, 1.0)), vec![1.0]);
    }
}
