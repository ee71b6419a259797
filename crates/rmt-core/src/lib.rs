//! # rmt-core
//!
//! Random-matrix theory for the spectra of attention, as a library with no deep-learning
//! dependency. It is the mathematics under two papers:
//!
//! * *A Random Matrix Perspective on the Learning Dynamics of Multi-Head Latent Attention*
//!   (seed 000): Marchenko–Pastur diagnostics of the query/key spectrum —
//!   [`diagnostics`].
//! * *Mind the Gap* (seed 002): Random Markov matrices, their spectral gap, rank collapse,
//!   exploding gradients and the gap-removed attention `A − 1ₙₙ/n` — [`markov`], [`free`].
//!
//! Underneath: the limiting laws ([`laws`]: Marchenko–Pastur, quarter circle, products of
//! Gaussian matrices), [`tracy_widom`] distributions, [`spectra`] of dense matrices, and
//! [`special`] functions.
//!
//! Matrices cross the API as nalgebra types (`DMatrix`, or a strided
//! [`linalg::MatrixView`] over any buffer); faer does the dense work. Every fallible
//! function returns [`Result`] with a typed [`RmtError`]; result types are serde types.
//!
//! ```
//! use rmt_core::laws::{MarchenkoPastur, SpectralLaw};
//! let mp = MarchenkoPastur::new(1.0, 1.0).unwrap();
//! assert_eq!(mp.upper_edge(), 4.0); // σ²(1 + √γ)²
//! ```
#![warn(missing_docs)]

pub mod diagnostics;
pub mod effective;
pub mod eigen;
pub mod error;
pub mod free;
pub mod laws;
pub mod linalg;
pub mod markov;
pub mod special;
pub mod spectra;
pub mod tracy_widom;

#[cfg(feature = "checkpoint")]
pub mod checkpoint;

pub use error::{Result, RmtError};
