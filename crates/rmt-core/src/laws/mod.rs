//! Limiting spectral laws: Marchenko–Pastur, the quarter circle, and the law of the squared
//! singular values of a product of rectangular Gaussian matrices (free multiplicative
//! convolution of Marchenko–Pastur laws).
//!
//! Every law implements [`SpectralLaw`]: support, an optional atom at zero, density, CDF,
//! quantiles and moments. The Kolmogorov–Smirnov test in [`ks_test`] works with any of them.

mod marchenko_pastur;
mod product;
mod quarter_circle;

pub use marchenko_pastur::{MarchenkoPastur, narayana};
pub use product::{ProductGaussianLaw, ProductLawParameters, fuss_catalan};
pub use quarter_circle::QuarterCircle;

use crate::error::{Result, RmtError, open_probability};
use serde::{Deserialize, Serialize};

/// A probability law on `[0, ∞)` made of an absolutely continuous part on
/// `[lower_edge, upper_edge]` and, possibly, an atom at 0.
pub trait SpectralLaw {
    /// Left end of the continuous part's support.
    fn lower_edge(&self) -> f64;
    /// Right end of the continuous part's support (the "bulk edge", λ₊ for MP).
    fn upper_edge(&self) -> f64;
    /// Mass of the atom at zero (0 when there is none).
    fn atom_at_zero(&self) -> f64 {
        0.0
    }
    /// Density of the continuous part at `x` (it integrates to `1 − atom_at_zero()`).
    fn density(&self, x: f64) -> f64;
    /// `P(X ≤ x)`, the atom included.
    fn cdf(&self, x: f64) -> f64;
    /// `E[X^k]`.
    fn moment(&self, k: u32) -> f64;
    /// `E[X]`.
    fn mean(&self) -> f64 {
        self.moment(1)
    }
    /// `Var[X]`.
    fn variance(&self) -> f64 {
        let m1 = self.moment(1);
        self.moment(2) - m1 * m1
    }
    /// The smallest `x` with `P(X ≤ x) ≥ p`, for `p ∈ (0, 1)`. Found by safeguarded Newton
    /// iteration on the CDF (bisection whenever Newton leaves the bracket), to 1e-13
    /// relative accuracy.
    fn quantile(&self, p: f64) -> Result<f64> {
        open_probability("p", p)?;
        if p <= self.atom_at_zero() {
            return Ok(0.0);
        }
        let (mut lo, mut hi) = (self.lower_edge(), self.upper_edge());
        let mut x = 0.5 * (lo + hi);
        for _ in 0..300 {
            let f = self.cdf(x) - p;
            if f.abs() <= 1e-15 {
                return Ok(x);
            }
            if f > 0.0 {
                hi = x;
            } else {
                lo = x;
            }
            let d = self.density(x);
            let newton = if d > 0.0 { x - f / d } else { f64::NAN };
            let next = if newton > lo && newton < hi {
                newton
            } else {
                0.5 * (lo + hi)
            };
            if (next - x).abs() <= 1e-15 * x.abs().max(1e-300) || hi - lo <= 1e-15 * hi.abs() {
                return Ok(next);
            }
            x = next;
        }
        Ok(x)
    }
}

/// Result of a one-sample Kolmogorov–Smirnov test of a spectrum against a law.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KsTest {
    /// `D = sup_x |F_n(x) − F(x)|` over the continuous part.
    pub statistic: f64,
    /// Two-sided asymptotic p-value (Kolmogorov distribution of `√n·D`).
    pub p_value: f64,
    /// Number of eigenvalues tested (those attributed to the atom at 0 are set aside).
    pub n: usize,
}

/// Kolmogorov–Smirnov test of an empirical spectrum against `law`.
///
/// If the law has an atom at zero of mass `a`, the `round(a·n)` smallest eigenvalues are
/// attributed to it and the rest are tested against the continuous part, renormalised.
///
/// *Calibration caveat.* The p-value is that of i.i.d. samples (statrs' asymptotic
/// Kolmogorov distribution). Eigenvalues repel each other, so the empirical CDF of a
/// spectrum is much closer to its limit than an i.i.d. sample's (its KS distance is
/// `O(log n / n)`, not `O(1/√n)`): the p-value is conservative. Use `statistic` to compare
/// fits, and the p-value only as an upper bound.
///
/// # Errors
/// Fewer than two eigenvalues left to test, or a non-finite eigenvalue.
///
/// # Example
/// ```
/// use rmt_core::laws::{ks_test, MarchenkoPastur, SpectralLaw};
/// let mp = MarchenkoPastur::new(0.5, 1.0).unwrap();
/// // The law's own quantiles fit it perfectly (up to the grid).
/// let spectrum: Vec<f64> = (1..200).map(|i| mp.quantile(i as f64 / 200.0).unwrap()).collect();
/// let ks = ks_test(&mp, &spectrum).unwrap();
/// assert!(ks.statistic < 0.01);
/// ```
pub fn ks_test(law: &dyn SpectralLaw, eigenvalues: &[f64]) -> Result<KsTest> {
    crate::error::all_finite("eigenvalues", eigenvalues.iter().copied())?;
    let mut sorted = eigenvalues.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let atom = law.atom_at_zero();
    let skip = (atom * sorted.len() as f64).round() as usize;
    let data = sorted[skip.min(sorted.len())..].to_vec();
    if data.len() < 2 {
        return Err(RmtError::Empty {
            what: "spectrum left after removing the atom at zero",
        });
    }
    let conditional = Conditional { law, atom };
    let (statistic, p_value) = statrs::stats_tests::ks_test::ks_onesample(
        data.clone(),
        &conditional,
        statrs::stats_tests::ks_test::KSOneSampleAlternativeMethod::TwoSidedAsymptotic,
        statrs::stats_tests::NaNPolicy::Error,
    )
    .map_err(|e| RmtError::Degenerate(format!("KS test: {e}")))?;
    Ok(KsTest {
        statistic,
        p_value: p_value.clamp(0.0, 1.0),
        n: data.len(),
    })
}

/// The continuous part of a law, renormalised, as a statrs distribution.
struct Conditional<'a> {
    law: &'a dyn SpectralLaw,
    atom: f64,
}

impl statrs::statistics::Min<f64> for Conditional<'_> {
    fn min(&self) -> f64 {
        self.law.lower_edge()
    }
}

impl statrs::statistics::Max<f64> for Conditional<'_> {
    fn max(&self) -> f64 {
        self.law.upper_edge()
    }
}

impl statrs::distribution::ContinuousCDF<f64, f64> for Conditional<'_> {
    fn cdf(&self, x: f64) -> f64 {
        if x < self.law.lower_edge() {
            return 0.0;
        }
        ((self.law.cdf(x) - self.atom) / (1.0 - self.atom)).clamp(0.0, 1.0)
    }

    fn inverse_cdf(&self, p: f64) -> f64 {
        self.law
            .quantile(self.atom + p * (1.0 - self.atom))
            .unwrap_or(f64::NAN)
    }
}

/// Integrates `f` over `[a, b]` with `m`-point Gauss–Legendre on `panels` equal panels.
#[cfg(test)]
pub(crate) fn integrate(f: impl Fn(f64) -> f64, a: f64, b: f64, panels: usize, m: usize) -> f64 {
    let (x, w) = crate::special::gauss_legendre(m, 0.0, 1.0);
    let h = (b - a) / panels as f64;
    let mut total = 0.0;
    for p in 0..panels {
        let left = a + p as f64 * h;
        for (xi, wi) in x.iter().zip(&w) {
            total += wi * h * f(left + xi * h);
        }
    }
    total
}
