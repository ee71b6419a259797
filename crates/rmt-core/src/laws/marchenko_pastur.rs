//! The Marchenko–Pastur law.

use super::SpectralLaw;
use crate::error::{Result, RmtError, positive};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// The Marchenko–Pastur law `MP(γ, σ²)`: the limiting distribution of the eigenvalues of
/// `G = X Xᵀ / d` for `X ∈ ℝ^{m×d}` with i.i.d. entries of variance `σ²`, as
/// `m, d → ∞` with `m/d → γ` (seed 000, eq. for `λ±`; Marchenko & Pastur 1967).
///
/// * Edges `λ± = σ²(1 ± √γ)²`.
/// * Density `ρ(x) = √((λ₊ − x)(x − λ₋)) / (2π σ² γ x)` on `[λ₋, λ₊]`.
/// * For `γ > 1`, `G` has rank `d < m`: an atom of mass `1 − 1/γ` at 0.
/// * Moments `E[λᵏ] = σ^{2k} Σ_{j=0}^{k−1} N(k, j+1) γʲ` (Narayana numbers), so the mean is
///   `σ²` and the variance `γσ⁴`.
///
/// # Example
/// ```
/// use rmt_core::laws::{MarchenkoPastur, SpectralLaw};
/// let mp = MarchenkoPastur::new(0.25, 2.0).unwrap();
/// assert!((mp.upper_edge() - 2.0 * 1.5f64.powi(2)).abs() < 1e-15);
/// assert!((mp.cdf(mp.quantile(0.3).unwrap()) - 0.3).abs() < 1e-12);
/// assert!((mp.variance() - 0.25 * 4.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MarchenkoPastur {
    ratio: f64,
    variance: f64,
}

impl MarchenkoPastur {
    /// `MP(γ = ratio, σ² = variance)`.
    ///
    /// # Errors
    /// Either parameter not finite and positive.
    pub fn new(ratio: f64, variance: f64) -> Result<Self> {
        Ok(Self {
            ratio: positive("ratio γ", ratio)?,
            variance: positive("variance σ²", variance)?,
        })
    }

    /// The aspect ratio `γ = m/d`.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The entry variance `σ²`.
    pub fn entry_variance(&self) -> f64 {
        self.variance
    }

    /// The same law with another `σ²`.
    pub fn with_variance(&self, variance: f64) -> Result<Self> {
        Self::new(self.ratio, variance)
    }

    /// `σ²(1 + √γ)²`, the paper's `λ₊`.
    pub fn upper_edge(&self) -> f64 {
        self.variance * (1.0 + self.ratio.sqrt()).powi(2)
    }

    /// `σ²(1 − √γ)²`, the paper's `λ₋`.
    pub fn lower_edge(&self) -> f64 {
        self.variance * (1.0 - self.ratio.sqrt()).powi(2)
    }

    /// Samples the spectrum of `X Xᵀ / d` for `X ∈ ℝ^{m×d}` with i.i.d. `N(0, σ²)` entries,
    /// `m = round(γ·d)`: a finite-size Wishart spectrum of this law, in descending order.
    ///
    /// # Errors
    /// `d == 0` or `m` rounds to 0.
    pub fn sample_wishart_spectrum<R: Rng + ?Sized>(
        &self,
        d: usize,
        rng: &mut R,
    ) -> Result<Vec<f64>> {
        let m = (self.ratio * d as f64).round() as usize;
        if d == 0 || m == 0 {
            return Err(RmtError::invalid("d", d, "needs d ≥ 1 and round(γ·d) ≥ 1"));
        }
        let sd = self.variance.sqrt();
        let x = nalgebra::DMatrix::<f64>::from_fn(m, d, |_, _| {
            let z: f64 = StandardNormal.sample(rng);
            sd * z
        });
        let g = crate::spectra::gram(&x, 1.0 / d as f64)?;
        crate::spectra::symmetric_eigenvalues(&g)
    }
}

/// Narayana number `N(k, j) = C(k, j)·C(k, j−1)/k`, as `f64` (exact below 2⁵³).
pub fn narayana(k: u32, j: u32) -> f64 {
    if j == 0 || j > k {
        return 0.0;
    }
    binomial(k, j) * binomial(k, j - 1) / k as f64
}

/// Binomial coefficient as `f64` (exact below 2⁵³), by the multiplicative formula.
pub(crate) fn binomial(n: u32, k: u32) -> f64 {
    if k > n {
        return 0.0;
    }
    let k = k.min(n - k);
    let mut c = 1.0;
    for i in 0..k {
        c = c * (n - i) as f64 / (i + 1) as f64;
    }
    c.round()
}

impl SpectralLaw for MarchenkoPastur {
    fn lower_edge(&self) -> f64 {
        MarchenkoPastur::lower_edge(self)
    }

    fn upper_edge(&self) -> f64 {
        MarchenkoPastur::upper_edge(self)
    }

    fn atom_at_zero(&self) -> f64 {
        if self.ratio > 1.0 {
            1.0 - 1.0 / self.ratio
        } else {
            0.0
        }
    }

    fn density(&self, x: f64) -> f64 {
        let (a, b) = (self.lower_edge(), self.upper_edge());
        if x <= a || x >= b || x <= 0.0 {
            return 0.0;
        }
        ((b - x) * (x - a)).sqrt() / (2.0 * PI * self.variance * self.ratio * x)
    }

    /// Closed form: with `R(x) = √((λ₊−x)(x−λ₋))`,
    /// `∫_{λ₋}^x R(t)/t dt = R(x) + (λ₊+λ₋)/2·(arcsin u + π/2) − √(λ₊λ₋)·(arcsin v + π/2)`,
    /// `u = (2x − λ₊ − λ₋)/(λ₊ − λ₋)`, `v = ((λ₊+λ₋)x − 2λ₊λ₋)/(x(λ₊ − λ₋))`,
    /// divided by `2πσ²γ`, plus the atom.
    fn cdf(&self, x: f64) -> f64 {
        let atom = self.atom_at_zero();
        if x < 0.0 {
            return 0.0;
        }
        let (a, b) = (self.lower_edge(), self.upper_edge());
        if x <= a {
            return atom;
        }
        if x >= b {
            return 1.0;
        }
        let r = ((b - x) * (x - a)).max(0.0).sqrt();
        let u = ((2.0 * x - a - b) / (b - a)).clamp(-1.0, 1.0);
        let sqrt_ab = (a * b).sqrt();
        let v_term = if sqrt_ab > 0.0 {
            let v = (((a + b) * x - 2.0 * a * b) / (x * (b - a))).clamp(-1.0, 1.0);
            sqrt_ab * (v.asin() + PI / 2.0)
        } else {
            0.0
        };
        let integral = r + 0.5 * (a + b) * (u.asin() + PI / 2.0) - v_term;
        (atom + integral / (2.0 * PI * self.variance * self.ratio)).clamp(0.0, 1.0)
    }

    fn moment(&self, k: u32) -> f64 {
        if k == 0 {
            return 1.0;
        }
        let poly: f64 = (0..k)
            .map(|j| narayana(k, j + 1) * self.ratio.powi(j as i32))
            .sum();
        self.variance.powi(k as i32) * poly
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::laws::{integrate, ks_test};
    use rand::SeedableRng;

    #[test]
    fn rejects_bad_parameters() {
        assert!(MarchenkoPastur::new(0.0, 1.0).is_err());
        assert!(MarchenkoPastur::new(1.0, -1.0).is_err());
        assert!(MarchenkoPastur::new(f64::NAN, 1.0).is_err());
        assert!(MarchenkoPastur::new(1.0, f64::INFINITY).is_err());
    }

    #[test]
    fn closed_form_cdf_matches_integrated_density() {
        for (gamma, s2) in [(0.1, 1.0), (0.5, 2.0), (1.0, 1.0), (1.5, 0.7), (4.0, 1.0)] {
            let mp = MarchenkoPastur::new(gamma, s2).unwrap();
            let (a, b) = (mp.lower_edge(), mp.upper_edge());
            for t in [0.1, 0.37, 0.5, 0.81, 0.99] {
                let x = a + t * (b - a);
                // The density has square-root endpoints (and 1/√x at 0 when γ = 1):
                // integrate in the variable x = a + (b−a)·sin²θ, which removes them.
                let f = |th: f64| {
                    let y = a + (b - a) * th.sin().powi(2);
                    mp.density(y) * (b - a) * (2.0 * th).sin()
                };
                let th_max = t.sqrt().asin();
                let numeric = mp.atom_at_zero() + integrate(f, 0.0, th_max, 8, 20);
                assert!(
                    (numeric - mp.cdf(x)).abs() < 1e-10,
                    "γ={gamma} x={x}: {numeric} vs {}",
                    mp.cdf(x)
                );
            }
            assert!((mp.cdf(b) - 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn moments_match_narayana_and_numerical_integration() {
        for gamma in [0.3, 1.0, 2.5] {
            let mp = MarchenkoPastur::new(gamma, 1.3).unwrap();
            assert!((mp.mean() - 1.3).abs() < 1e-14);
            assert!((mp.variance() - gamma * 1.3 * 1.3).abs() < 1e-12);
            let (a, b) = (mp.lower_edge(), mp.upper_edge());
            for k in 1..6 {
                let f = |th: f64| {
                    let y = a + (b - a) * th.sin().powi(2);
                    y.powi(k) * mp.density(y) * (b - a) * (2.0 * th).sin()
                };
                let numeric = integrate(f, 0.0, std::f64::consts::FRAC_PI_2, 16, 20);
                let exact = mp.moment(k as u32);
                assert!(
                    (numeric - exact).abs() < 1e-9 * exact,
                    "γ={gamma} k={k}: {numeric} vs {exact}"
                );
            }
        }
        // Catalan numbers at γ = 1, σ² = 1.
        let mp = MarchenkoPastur::new(1.0, 1.0).unwrap();
        let catalan = [1.0, 2.0, 5.0, 14.0, 42.0, 132.0];
        for (k, c) in catalan.iter().enumerate() {
            assert_eq!(mp.moment(k as u32 + 1), *c);
        }
    }

    #[test]
    fn quantile_inverts_cdf_including_the_atom() {
        let mp = MarchenkoPastur::new(2.0, 1.0).unwrap();
        assert_eq!(mp.quantile(0.3).unwrap(), 0.0); // inside the atom of mass ½
        for p in [0.51, 0.6, 0.9, 0.999] {
            let x = mp.quantile(p).unwrap();
            assert!((mp.cdf(x) - p).abs() < 1e-12);
        }
        assert!(mp.quantile(1.0).is_err());
    }

    /// Monte Carlo: a 400×800 Wishart spectrum fits MP(½, σ²). The KS distance of a spectrum
    /// to its limit is O(log n / n) (eigenvalue rigidity), plus an O(n^{-2/3}) edge effect:
    /// 0.02 is generous at m = 400, and an MP law of another variance must fail it.
    #[test]
    fn wishart_spectrum_fits_the_law() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
        let mp = MarchenkoPastur::new(0.5, 2.0).unwrap();
        let spectrum = mp.sample_wishart_spectrum(800, &mut rng).unwrap();
        assert_eq!(spectrum.len(), 400);
        let ks = ks_test(&mp, &spectrum).unwrap();
        assert!(ks.statistic < 0.02, "D = {}", ks.statistic);
        let wrong = MarchenkoPastur::new(0.5, 2.2).unwrap();
        assert!(ks_test(&wrong, &spectrum).unwrap().statistic > 0.03);
        // The largest eigenvalue sits at the edge within TW-scale fluctuations (≈ m^{-2/3}).
        assert!((spectrum[0] / mp.upper_edge() - 1.0).abs() < 0.05);
    }

    #[test]
    fn rank_deficient_wishart_fits_with_its_atom() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(8);
        let mp = MarchenkoPastur::new(2.0, 1.0).unwrap();
        let spectrum = mp.sample_wishart_spectrum(200, &mut rng).unwrap();
        let zeros = spectrum.iter().filter(|x| x.abs() < 1e-8).count();
        assert_eq!(zeros, 200);
        assert!(ks_test(&mp, &spectrum).unwrap().statistic < 0.03);
    }
}
