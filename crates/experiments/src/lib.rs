//! # experiments
//!
//! The reproductions of the two papers, from data to report:
//!
//! * [`rank_collapse`] — seed 002 (*Mind the Gap*): Random Markov spectra, rank collapse in
//!   width and depth, exploding gradients, free-probability bulks, with theory overlaid;
//! * [`mla_spectra`] — seed 000: pre-training MHA, MLA-PreRoPE and MLA-Decoupled with the
//!   probe attached, figures and a report beside the paper's claims;
//! * [`data`], [`download`], [`tokens`], [`train`] — C4-format corpora, tokenizers and
//!   packing, the pre-training loop with checkpoints and the probe;
//! * [`plot`] and [`report`] — the figures (SVG and PNG) and the Markdown/HTML reports both use.
#![warn(missing_docs)]

pub mod cublas;
pub mod data;
pub mod download;
pub mod mla_spectra;
pub mod optim;
pub mod plot;
pub mod rank_collapse;
pub mod report;
pub mod tokens;
pub mod train;

/// Errors of the reproductions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExperimentError {
    /// File system errors.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Bad data, configuration or arguments.
    #[error("{0}")]
    Invalid(String),
    /// Figures.
    #[error("plot {path}: {message}")]
    Plot {
        /// The figure file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rmt-core errors.
    #[error(transparent)]
    Rmt(#[from] rmt_core::RmtError),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] attn_models::ModelError),
    /// Probe errors.
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
}

/// Wraps an I/O error with the path it concerns.
pub(crate) fn io_err(
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ExperimentError + '_ {
    move |source| ExperimentError::Io {
        path: path.display().to_string(),
        source,
    }
}
