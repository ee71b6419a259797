//! The probe: device work on the training thread, host work on a worker pool.

use crate::ProbeError;
use crate::activation::{LayerMaps, head_metrics, host_maps};
use crate::rows::{MetricRow, MetricsWriter, WriterState};
use crate::schedule::Schedule;
use crate::weight::{LayerGrams, device_grams, diagnose};
use attn_models::{AttentionMaps, EffectiveQk};
use burn::prelude::*;
use rayon::prelude::*;
use rmt_core::diagnostics::DiagnosticsConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Probe events that may wait for the workers before the training thread blocks.
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
    /// Seconds the training thread spent on device work and copies (not waiting).
    pub device_seconds: f64,
    /// Seconds the workers spent on host work.
    pub host_seconds: f64,
    /// Metric rows written.
    pub rows: u64,
}

enum Job {
    Weights { step: u64, grams: Vec<LayerGrams> },
    Activations { step: u64, maps: Vec<LayerMaps> },
    Rows(Vec<MetricRow>),
}

struct Shared {
    writer: Mutex<MetricsWriter>,
    stats: Mutex<ProbeStats>,
    /// Jobs submitted but not yet written, and the first error a worker hit.
    pending: Mutex<(u64, Option<String>)>,
    done: Condvar,
}

/// Collects metrics while a model trains. Construct with [`Probe::start`] or
/// [`Probe::resume`]; call [`Probe::observe`] every step (it returns at once when the step is
/// not scheduled), [`Probe::checkpoint`] with every model checkpoint, [`Probe::finish`] at
/// the end.
pub struct Probe {
    config: ProbeConfig,
    sender: Option<SyncSender<Job>>,
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
            pending: Mutex::new((0, None)),
            done: Condvar::new(),
        });
        let (sender, receiver) = sync_channel::<Job>(config.queue);
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
    /// effective `Q, K` (products on `device`), activation space from `maps` (compute them
    /// only when [`Probe::is_due`]; pass `None` to skip). The host work is queued; this
    /// blocks only when the queue is full, which [`ProbeStats::stalls`] counts.
    ///
    /// # Errors
    /// A failure of an earlier host job, or weights whose shapes contradict their heads.
    pub fn observe<B: Backend, M: EffectiveQk>(
        &mut self,
        step: u64,
        model: &M,
        maps: Option<Vec<AttentionMaps<B>>>,
        device: &B::Device,
    ) -> Result<(), ProbeError> {
        if !self.is_due(step) {
            return Ok(());
        }
        self.check_worker_error()?;
        let t = Instant::now();
        let mut jobs = Vec::new();
        if self.config.weight_space {
            let layers = model.effective_qk()?;
            jobs.push(Job::Weights {
                step,
                grams: device_grams::<B>(&layers, self.config.per_head, device),
            });
        }
        if self.config.activation_space
            && let Some(maps) = maps
        {
            jobs.push(Job::Activations {
                step,
                maps: host_maps(maps),
            });
        }
        let device_time = t.elapsed();
        for job in jobs {
            self.submit(job)?;
        }
        let mut stats = self.shared.stats.lock().expect("stats lock");
        stats.events += 1;
        stats.device_seconds += device_time.as_secs_f64();
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
        let sender = self.sender.as_ref().expect("the probe is running");
        self.shared.pending.lock().expect("pending lock").0 += 1;
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => {
                let t = Instant::now();
                sender
                    .send(job)
                    .map_err(|_| ProbeError::Format("the probe worker stopped".into()))?;
                let mut stats = self.shared.stats.lock().expect("stats lock");
                stats.stalls += 1;
                stats.stall_seconds += t.elapsed().as_secs_f64();
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => {
                Err(ProbeError::Format("the probe worker stopped".into()))
            }
        }
    }

    fn check_worker_error(&self) -> Result<(), ProbeError> {
        match &self.shared.pending.lock().expect("pending lock").1 {
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
        let mut pending = self.shared.pending.lock().expect("pending lock");
        while pending.0 > 0 && pending.1.is_none() {
            pending = self
                .shared
                .done
                .wait_timeout(pending, Duration::from_millis(200))
                .expect("pending lock")
                .0;
        }
        if let Some(e) = &pending.1 {
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
        let t = Instant::now();
        let rows = pool.install(|| rows_of(&job, &config));
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
        pending.0 -= 1;
        if let Err(e) = outcome
            && pending.1.is_none()
        {
            pending.1 = Some(e.to_string());
        }
        shared.done.notify_all();
    }
}

/// The rows of one job; layers in parallel, in a deterministic order.
fn rows_of(job: &Job, config: &ProbeConfig) -> Result<Vec<MetricRow>, ProbeError> {
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
    let per_layer: Vec<Result<Vec<MetricRow>, ProbeError>> = match job {
        Job::Rows(rows) => vec![Ok(rows.clone())],
        Job::Weights { step, grams } => grams
            .par_iter()
            .map(|g| {
                let mut rows = Vec::new();
                for spectrum in diagnose(g, &config.diagnostics)? {
                    let head = spectrum
                        .head
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "all".into());
                    rows.push(row(
                        *step,
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
                            *step,
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
                                *step,
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
            .collect(),
        Job::Activations { step, maps } => maps
            .par_iter()
            .map(|m| {
                let mut rows = Vec::new();
                for h in 0..m.heads {
                    for (metric, value) in head_metrics(m, h)? {
                        rows.push(row(
                            *step,
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
            .collect(),
    };
    let mut out = Vec::new();
    for r in per_layer {
        out.extend(r?);
    }
    Ok(out)
}
