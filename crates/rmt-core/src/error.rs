//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong in `rmt-core`. Every public function that can fail returns
/// [`Result<T>`](Result) with this error; none of them panics on bad input.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum RmtError {
    /// A parameter is outside its domain (a negative variance, a ratio of zero, a probability
    /// outside `[0, 1]`, …).
    #[error("invalid parameter `{name}` = {value}: {reason}")]
    InvalidParameter {
        /// The parameter's name as the documentation spells it.
        name: &'static str,
        /// The offending value, printed.
        value: String,
        /// What the domain is.
        reason: &'static str,
    },
    /// A matrix or vector has no entries.
    #[error("{what} is empty")]
    Empty {
        /// What was empty.
        what: &'static str,
    },
    /// Two shapes that must agree do not.
    #[error("shape mismatch in {context}: {detail}")]
    ShapeMismatch {
        /// Where the mismatch was found.
        context: &'static str,
        /// The shapes involved.
        detail: String,
    },
    /// A matrix that must be square is not.
    #[error("{what} must be square, got {rows}×{cols}")]
    NotSquare {
        /// Which matrix.
        what: &'static str,
        /// Its number of rows.
        rows: usize,
        /// Its number of columns.
        cols: usize,
    },
    /// A matrix or vector holds a NaN or an infinity.
    #[error("{what} contains a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// The flat (column-major) index of the first offending entry.
        index: usize,
        /// The value found there.
        value: f64,
    },
    /// A matrix that must be symmetric is not (relative asymmetry above the tolerance).
    #[error(
        "{what} is not symmetric: max |a_ij − a_ji| = {asymmetry:e} exceeds {tolerance:e}·max|a|"
    )]
    NotSymmetric {
        /// Which matrix.
        what: &'static str,
        /// The largest absolute asymmetry found.
        asymmetry: f64,
        /// The relative tolerance used.
        tolerance: f64,
    },
    /// An iterative method did not reach its tolerance.
    #[error("{method} did not converge: {detail}")]
    NoConvergence {
        /// The method.
        method: &'static str,
        /// What was reached.
        detail: String,
    },
    /// A spectrum is degenerate for the requested statistic (all zero, …).
    #[error("degenerate input: {0}")]
    Degenerate(String),
    /// A checkpoint could not be read or does not contain what is needed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// Shorthand for `std::result::Result<T, RmtError>`.
pub type Result<T> = std::result::Result<T, RmtError>;

impl RmtError {
    pub(crate) fn invalid(
        name: &'static str,
        value: impl std::fmt::Display,
        reason: &'static str,
    ) -> Self {
        RmtError::InvalidParameter {
            name,
            value: value.to_string(),
            reason,
        }
    }
}

/// Checks that `x` is finite and strictly positive.
pub(crate) fn positive(name: &'static str, x: f64) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(RmtError::invalid(name, x, "must be finite and > 0"))
    }
}

/// Checks that `p` is a probability in the open interval (0, 1).
pub(crate) fn open_probability(name: &'static str, p: f64) -> Result<f64> {
    if p > 0.0 && p < 1.0 {
        Ok(p)
    } else {
        Err(RmtError::invalid(
            name,
            p,
            "must lie in the open interval (0, 1)",
        ))
    }
}

/// Checks that every value of `xs` is finite; names the first that is not.
pub(crate) fn all_finite(what: &'static str, xs: impl IntoIterator<Item = f64>) -> Result<()> {
    for (index, value) in xs.into_iter().enumerate() {
        if !value.is_finite() {
            return Err(RmtError::NonFinite { what, index, value });
        }
    }
    Ok(())
}
