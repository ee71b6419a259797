//! The quarter-circle law of singular values.

use super::SpectralLaw;
use crate::error::{Result, positive};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// The quarter-circle law `Q_σ` on `[0, 2σ]`, density `ρ(s) = √(4σ² − s²) / (πσ²)`: the
/// limiting distribution of the singular values of `X/√n` for a square `n×n` matrix with
/// i.i.d. entries of variance `σ²` (its squares follow `MP(1, σ²)`).
///
/// Seed 002, Lemma 3: for a Random Markov matrix `A` whose entries have coefficient of
/// variation `σ` (variance `σ²` at mean 1), the singular values of `√n·(A − 1ₙₙ/n)` follow
/// `Q_σ` with no outlier.
///
/// * CDF `F(s) = [ (s/2)√(4σ² − s²) + 2σ² arcsin(s/2σ) ] / (πσ²)`.
/// * Even moments `E[s^{2j}] = σ^{2j}·Catalan(j)`; odd ones by the Beta function.
///
/// # Example
/// ```
/// use rmt_core::laws::{QuarterCircle, SpectralLaw};
/// let q = QuarterCircle::new(1.0).unwrap();
/// assert_eq!(q.upper_edge(), 2.0);
/// assert!((q.moment(2) - 1.0).abs() < 1e-15); // E[s²] = σ²
/// assert!((q.cdf(2.0) - 1.0).abs() < 1e-15);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuarterCircle {
    sigma: f64,
}

impl QuarterCircle {
    /// `Q_σ` with `σ = sigma > 0` (the standard deviation of the entries).
    pub fn new(sigma: f64) -> Result<Self> {
        Ok(Self {
            sigma: positive("sigma σ", sigma)?,
        })
    }

    /// `σ`.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }
}

impl SpectralLaw for QuarterCircle {
    fn lower_edge(&self) -> f64 {
        0.0
    }

    fn upper_edge(&self) -> f64 {
        2.0 * self.sigma
    }

    fn density(&self, s: f64) -> f64 {
        let s2 = self.sigma * self.sigma;
        if s < 0.0 || s >= 2.0 * self.sigma {
            return 0.0;
        }
        (4.0 * s2 - s * s).sqrt() / (PI * s2)
    }

    fn cdf(&self, s: f64) -> f64 {
        let sg = self.sigma;
        if s <= 0.0 {
            return 0.0;
        }
        if s >= 2.0 * sg {
            return 1.0;
        }
        let s2 = sg * sg;
        ((0.5 * s * (4.0 * s2 - s * s).sqrt() + 2.0 * s2 * (s / (2.0 * sg)).asin()) / (PI * s2))
            .clamp(0.0, 1.0)
    }

    /// `E[s^k] = (2σ)^k · (4/π) · ∫₀^{π/2} sin^k θ cos²θ dθ = (2σ)^k (2/π) B((k+1)/2, 3/2)`.
    fn moment(&self, k: u32) -> f64 {
        let kf = k as f64;
        let beta = statrs::function::beta::beta((kf + 1.0) / 2.0, 1.5);
        (2.0 * self.sigma).powi(k as i32) * 2.0 / PI * beta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::laws::integrate;

    #[test]
    fn cdf_and_moments_match_quadrature() {
        let q = QuarterCircle::new(0.8).unwrap();
        for s in [0.1, 0.5, 1.2, 1.59] {
            let f = |th: f64| {
                let x = 1.6 * th.sin();
                q.density(x) * 1.6 * th.cos()
            };
            let numeric = integrate(f, 0.0, (s / 1.6f64).asin(), 8, 20);
            assert!((numeric - q.cdf(s)).abs() < 1e-12);
        }
        // Even moments are σ^{2j} Catalan(j).
        let catalan = [1.0, 1.0, 2.0, 5.0, 14.0];
        for (j, c) in catalan.iter().enumerate() {
            let m = q.moment(2 * j as u32);
            assert!((m - 0.8f64.powi(2 * j as i32) * c).abs() < 1e-12, "j={j}");
        }
        // The mean, 8σ/(3π).
        assert!((q.mean() - 8.0 * 0.8 / (3.0 * PI)).abs() < 1e-14);
        assert!((q.cdf(q.quantile(0.42).unwrap()) - 0.42).abs() < 1e-12);
    }
}
