//! The probe: device work on the training thread, host work on a worker pool.

use crate::ProbeError;
use crate::activation::{RawLayerMaps, head_metrics, read_maps};
use crate::rows::{MetricRow, MetricsWriter, WriterState};
use crate::schedule::Schedule;
use crate::weight::{LayerGrams, device_grams, diagnose};
use attn_models::{AttentionMaps, EffectiveQkTensors};
use burn::prelude::*;
use rayon::prelude::*;
use rmt_core::diagnostics::DiagnosticsConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to collect and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Run name (a column of every row).
    pub run: String,
    /// Variant name (a column of every row).
    pub variant: String,
    /// When to probe.
    pub schedule: Schedule,
    /// Weight-space MP diagnostics of `QKᵀ`.
    pub weight_space: bool,
    /// Activation-space spectra on the probe batch.
    pub activation_space: bool,
    /// Per-head metrics (weight space; activation space is always per head).
    pub per_head: bool,
    /// σ² estimators and null laws for the weight-space metrics.
    pub diagnostics: DiagnosticsConfig,
    /// Host worker threads.
    pub workers: usize,
    /// Probe events that may be in the workers' hands (queued or in progress) before the
    /// training thread blocks. Rows from [`Probe::record`] never block.
    pub queue: usize,
}

impl ProbeConfig {
    /// Half the machine's cores, at least two: the training thread and the backend keep the
    /// other half.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| (n.get() / 2).max(2))
    }

    /// Weight and activation space, per head, the paper's estimator and the product null
    /// beside it, the given schedule, a queue of four events, [`Self::default_workers`].
    pub fn new(run: &str, variant: &str, schedule: Schedule) -> Self {
        Self {
            run: run.to_string(),
            variant: variant.to_string(),
            schedule,
            weight_space: true,
            activation_space: true,
            per_head: true,
            diagnostics: DiagnosticsConfig {
                nulls: vec![
                    rmt_core::diagnostics::NullModel::Mp,
                    rmt_core::diagnostics::NullModel::Product,
                ],
                ..DiagnosticsConfig::default()
            },
            workers: std::thread::available_parallelism().map_or(2, |n| (n.get() / 2).max(2)),
            queue: 4,
        }
    }
}

/// How the probe behaved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// Probe events submitted.
    pub events: u64,
    /// Times the training thread found the queue full and waited.
    pub stalls: u64,
    /// Seconds the training thread spent waiting for a full queue.
    pub stall_seconds: f64,
    /// Seconds the training thread spent on device work and copies (not waiting), the sum
    /// of the three parts below.
    pub device_seconds: f64,
    /// Of `device_seconds`: forming the effective `Q, K`
    /// ([`EffectiveQkTensors::effective_qk_tensors`]; launches only, the device runs them
    /// during the next part).
    #[serde(default)]
    pub effective_qk_seconds: f64,
    /// Of `device_seconds`: `M`, `G` on the device and their copy to the host.
    #[serde(default)]
    pub grams_seconds: f64,
    /// Of `device_seconds`: the probe batch's attention maps to the host (with whatever of
    /// their forward pass was still running on the device).
    #[serde(default)]
    pub maps_seconds: f64,
    /// Seconds the workers spent on host work.
    pub host_seconds: f64,
    /// Metric rows written.
    pub rows: u64,
}

/// Work for the workers, in order: a probe event's device data, or rows computed elsewhere.
enum Job {
    Event {
        step: u64,
        grams: Vec<LayerGrams>,
        maps: Vec<RawLayerMaps>,
    },
    Rows(Vec<MetricRow>),
}

/// Jobs handed to the workers and not yet written, and the first error a worker hit.
#[derive(Default)]
struct Pending {
    jobs: u64,
    /// Of `jobs`, probe events: the training thread blocks while `queue` of them are pending.
    events: u64,
    error: Option<String>,
}

struct Shared {
    writer: Mutex<MetricsWriter>,
    stats: Mutex<ProbeStats>,
    pending: Mutex<Pending>,
    done: Condvar,
}

/// Collects metrics while a model trains. Construct with [`Probe::start`] or
/// [`Probe::resume`]; call [`Probe::observe`] every step (it returns at once when the step is
/// not scheduled), [`Probe::checkpoint`] with every model checkpoint, [`Probe::finish`] at
/// the end.
pub struct Probe {
    config: ProbeConfig,
    sender: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Probe {
    /// Starts a probe writing fresh `metrics.csv` and `metrics.jsonl` into `dir`.
    ///
    /// # Errors
    /// File system errors, or an invalid configuration.
    pub fn start(config: ProbeConfig, dir: &Path) -> Result<Self, ProbeError> {
        let writer = MetricsWriter::create(dir)?;
        Self::with_writer(config, writer)
    }

    /// Resumes a probe from a checkpoint's [`WriterState`], dropping every row written after
    /// it.
    ///
    /// # Errors
    /// Missing or too-short metrics files.
    pub fn resume(config: ProbeConfig, dir: &Path, state: WriterState) -> Result<Self, ProbeError> {
        let writer = MetricsWriter::resume(dir, state)?;
        Self::with_writer(config, writer)
    }

    fn with_writer(config: ProbeConfig, writer: MetricsWriter) -> Result<Self, ProbeError> {
        if config.workers == 0 || config.queue == 0 {
            return Err(ProbeError::Format(
                "the probe needs at least one worker and a queue of at least one".into(),
            ));
        }
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            stats: Mutex::new(ProbeStats::default()),
            pending: Mutex::new(Pending::default()),
            done: Condvar::new(),
        });
        let (sender, receiver) = channel::<Job>();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("probe-{i}"))
            .build()
            .map_err(|e| ProbeError::Format(e.to_string()))?;
        let worker_shared = Arc::clone(&shared);
        let worker_config = config.clone();
        let worker = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || run_worker(receiver, pool, worker_shared, worker_config))
            .map_err(|e| ProbeError::Format(e.to_string()))?;
        Ok(Self {
            config,
            sender: Some(sender),
            worker: Some(worker),
            shared,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Whether `step` is scheduled.
    pub fn is_due(&self, step: u64) -> bool {
        self.config.schedule.is_due(step)
    }

    /// Probes `model` at `step` if the schedule says so: weight space from the model's
    /// effective `Q, K` (formed and multiplied on the model's device), activation space from `maps` (compute them
    /// only when [`Probe::is_due`]; pass `None` to skip). The host work is queued; this
    /// blocks only when the queue is full, which [`ProbeStats::stalls`] counts.
    ///
    /// The device time in [`ProbeStats`] is the wall time of this call before queuing; work
    /// still queued on the device when it starts (the last optimiser update) is billed to the
    /// probe too. Synchronise the device (`B::sync`) before computing `maps` to bill only
    /// the probe's own work, as the training loop does.
    ///
    /// # Errors
    /// A failure of an earlier host job, weights whose shapes contradict their heads, or a
    /// device error while reading.
    pub fn observe<B: Backend, M: EffectiveQkTensors<B>>(
        &mut self,
        step: u64,
        model: &M,
        maps: Option<Vec<AttentionMaps<B>>>,
    ) -> Result<(), ProbeError> {
        if !self.is_due(step) {
            return Ok(());
        }
        self.check_worker_error()?;
        let (mut effective_qk, mut grams_time, mut maps_time) = (0.0, 0.0, 0.0);
        let mut grams = Vec::new();
        if self.config.weight_space {
            let t = Instant::now();
            let layers = model.effective_qk_tensors()?;
            effective_qk = t.elapsed().as_secs_f64();
            let t = Instant::now();
            grams = device_grams(layers, self.config.per_head)?;
            grams_time = t.elapsed().as_secs_f64();
        }
        let mut host_maps = Vec::new();
        if self.config.activation_space
            && let Some(maps) = maps
        {
            let t = Instant::now();
            host_maps = read_maps(maps)?;
            maps_time = t.elapsed().as_secs_f64();
        }
        self.submit(Job::Event {
            step,
            grams,
            maps: host_maps,
        })?;
        let mut stats = self.shared.stats.lock().expect("stats lock");
        stats.events += 1;
        stats.effective_qk_seconds += effective_qk;
        stats.grams_seconds += grams_time;
        stats.maps_seconds += maps_time;
        stats.device_seconds += effective_qk + grams_time + maps_time;
        Ok(())
    }

    /// Queues rows computed elsewhere (training loss, validation loss, learning rate…) for
    /// the same files, in order with the probe's own rows, so that they share its exact
    /// resumption.
    ///
    /// # Errors
    /// A failure of an earlier host job.
    pub fn record(&mut self, rows: Vec<MetricRow>) -> Result<(), ProbeError> {
        self.check_worker_error()?;
        self.submit(Job::Rows(rows))
    }

    fn submit(&mut self, job: Job) -> Result<(), ProbeError> {
        let is_event = matches!(job, Job::Event { .. });
        let mut pending = self.shared.pending.lock().expect("pending lock");
        let queue = self.config.queue as u64;
        if is_event && pending.events >= queue {
            let t = Instant::now();
            pending = self.wait_while(pending, |p| p.events >= queue)?;
            let mut stats = self.shared.stats.lock().expect("stats lock");
            stats.stalls += 1;
            stats.stall_seconds += t.elapsed().as_secs_f64();
        }
        pending.jobs += 1;
        pending.events += u64::from(is_event);
        drop(pending);
        self.sender
            .as_ref()
            .expect("the probe is running")
            .send(job)
            .map_err(|_| ProbeError::Format("the probe worker stopped".into()))
    }

    /// Waits for the workers while `busy` holds and none of them has failed.
    ///
    /// # Errors
    /// The worker thread is gone.
    fn wait_while<'a>(
        &self,
        mut pending: MutexGuard<'a, Pending>,
        busy: impl Fn(&Pending) -> bool,
    ) -> Result<MutexGuard<'a, Pending>, ProbeError> {
        while busy(&pending) && pending.error.is_none() {
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                return Err(ProbeError::Format("the probe worker stopped".into()));
            }
            pending = self
                .shared
                .done
                .wait_timeout(pending, Duration::from_millis(200))
                .expect("pending lock")
                .0;
        }
        Ok(pending)
    }

    fn check_worker_error(&self) -> Result<(), ProbeError> {
        match &self.shared.pending.lock().expect("pending lock").error {
            Some(e) => Err(ProbeError::Format(format!("probe worker: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits for every queued job, flushes the files, and returns their lengths: store them
    /// with the model checkpoint and pass them to [`Probe::resume`].
    ///
    /// # Errors
    /// A failed host job, or file system errors.
    pub fn checkpoint(&mut self) -> Result<WriterState, ProbeError> {
        let pending = self.shared.pending.lock().expect("pending lock");
        let pending = self.wait_while(pending, |p| p.jobs > 0)?;
        if let Some(e) = &pending.error {
            return Err(ProbeError::Format(format!("probe worker: {e}")));
        }
        drop(pending);
        self.shared.writer.lock().expect("writer lock").checkpoint()
    }

    /// Finishes: drains the queue, flushes, stops the workers, returns the statistics.
    ///
    /// # Errors
    /// As [`Probe::checkpoint`].
    pub fn finish(mut self) -> Result<ProbeStats, ProbeError> {
        self.checkpoint()?;
        self.sender.take();
        if let Some(w) = self.worker.take() {
            w.join()
                .map_err(|_| ProbeError::Format("the probe worker panicked".into()))?;
        }
        Ok(*self.shared.stats.lock().expect("stats lock"))
    }

    /// Statistics so far.
    pub fn stats(&self) -> ProbeStats {
        *self.shared.stats.lock().expect("stats lock")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn run_worker(
    receiver: Receiver<Job>,
    pool: rayon::ThreadPool,
    shared: Arc<Shared>,
    config: ProbeConfig,
) {
    while let Ok(job) = receiver.recv() {
        let is_event = matches!(job, Job::Event { .. });
        let t = Instant::now();
        let rows = pool.install(|| rows_of(job, &config));
        let host = t.elapsed().as_secs_f64();
        let outcome = rows.and_then(|rows| {
            let mut writer = shared.writer.lock().expect("writer lock");
            writer.write(&rows)?;
            Ok(rows.len() as u64)
        });
        {
            let mut stats = shared.stats.lock().expect("stats lock");
            stats.host_seconds += host;
            if let Ok(n) = outcome {
                stats.rows += n;
            }
        }
        let mut pending = shared.pending.lock().expect("pending lock");
        pending.jobs -= 1;
        pending.events -= u64::from(is_event);
        if let Err(e) = outcome
            && pending.error.is_none()
        {
            pending.error = Some(e.to_string());
        }
        shared.done.notify_all();
    }
}

type LayerRows = Result<Vec<MetricRow>, ProbeError>;

/// The rows of one job; layers in parallel, in a deterministic order.
fn rows_of(job: Job, config: &ProbeConfig) -> Result<Vec<MetricRow>, ProbeError> {
    let row = |step: u64,
               layer: usize,
               head: String,
               space: &str,
               estimator: String,
               metric: &str,
               value: f64| MetricRow {
        run: config.run.clone(),
        variant: config.variant.clone(),
        step,
        layer: layer as u32,
        head,
        space: space.to_string(),
        estimator,
        metric: metric.to_string(),
        value,
    };
    let (step, grams, maps) = match job {
        Job::Rows(rows) => return Ok(rows),
        Job::Event { step, grams, maps } => (step, grams, maps),
    };
    // Weight and activation space of every layer in parallel, collected in a fixed order.
    let (weight, activation): (Vec<LayerRows>, Vec<LayerRows>) = rayon::join(
        || {
            grams
                .par_iter()
                .map(|g| {
                    let mut rows = Vec::new();
                    for spectrum in diagnose(g, &config.diagnostics)? {
                        let head = spectrum
                            .head
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| "all".into());
                        rows.push(row(
                            step,
                            g.layer,
                            head.clone(),
                            "weight",
                            "-".into(),
                            "trace",
                            spectrum.trace,
                        ));
                        for u in &spectrum.undefined {
                            // Visible, not silent: the pair has no metrics on this spectrum.
                            rows.push(row(
                                step,
                                g.layer,
                                head.clone(),
                                "weight",
                                format!("{}/{}", u.estimator.name(), u.null.name()),
                                "undefined",
                                1.0,
                            ));
                        }
                        for d in &spectrum.diagnoses {
                            let estimator = format!("{}/{}", d.estimator.name(), d.null.name());
                            for (metric, value) in d.metrics.named_values() {
                                rows.push(row(
                                    step,
                                    g.layer,
                                    head.clone(),
                                    "weight",
                                    estimator.clone(),
                                    metric,
                                    value,
                                ));
                            }
                        }
                    }
                    Ok(rows)
                })
                .collect()
        },
        || {
            maps.into_par_iter()
                .map(|raw| {
                    let m = &raw.widen()?;
                    let mut rows = Vec::new();
                    for h in 0..m.heads {
                        for (metric, value) in head_metrics(m, h)? {
                            rows.push(row(
                                step,
                                m.layer,
                                h.to_string(),
                                "activation",
                                "-".into(),
                                metric,
                                value,
                            ));
                        }
                    }
                    Ok(rows)
                })
                .collect()
        },
    );
    let per_layer = weight.into_iter().chain(activation);
    let mut out = Vec::new();
    for r in per_layer {
        out.extend(r?);
    }
    Ok(out)
}
