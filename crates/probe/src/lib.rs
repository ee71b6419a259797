//! # probe
//!
//! What seed 000 logs, collected while a model trains, without slowing the training down:
//!
//! * **weight space** — every layer's effective `Q, K` (attn-models' [`attn_models::EffectiveQkTensors`],
//!   so any burn model implementing it works) → `M = QKᵀ` and `G = MMᵀ/d` on the training
//!   device → rmt-core's MP diagnostics on the host, whole layer and per head, for every σ²
//!   estimator and null law asked for, with the Tracy–Widom outlier test;
//! * **activation space** — on a fixed probe batch, per layer and head: the MP diagnostics of
//!   the scaled scores `S = QKᵀ/√d_k`, the attention matrix's `σ₁`, `σ₂`, their gap and
//!   stable rank, and its entropy in bits;
//! * a [`Schedule`] (every `k` steps plus log-spaced early steps);
//! * the host work on a rayon pool behind a queue bounded in probe events: the training
//!   thread waits only when that many events are pending, and [`ProbeStats`] says how often;
//! * append-only CSV and JSONL ([`rows`]) with exact resumption.
#![warn(missing_docs)]

pub mod activation;
pub mod probe;
mod readback;
pub mod rows;
pub mod schedule;
pub mod weight;

pub use probe::{Probe, ProbeConfig, ProbeStats};
pub use rows::{MetricRow, MetricsWriter, WriterState, read_csv, read_jsonl};
pub use schedule::Schedule;

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// File system errors.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Malformed files or a stopped worker.
    #[error("{0}")]
    Format(String),
    /// rmt-core errors.
    #[error(transparent)]
    Rmt(#[from] rmt_core::RmtError),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] attn_models::ModelError),
}
