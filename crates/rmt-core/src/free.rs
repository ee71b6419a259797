//! Free probability: Fuss–Catalan and Narayana numbers, moments of free multiplicative
//! convolutions of Marchenko–Pastur laws (seed 002, Lemma 4), and the bulk formulas of
//! Props 7 and 8 for the gap-removed attention-only model.
//!
//! The laws themselves (density, edges, CDF) are in [`crate::laws::ProductGaussianLaw`].

use crate::error::{Result, RmtError, positive};
use crate::laws::{MarchenkoPastur, ProductGaussianLaw, SpectralLaw};
use serde::{Deserialize, Serialize};

pub use crate::laws::fuss_catalan;
pub use crate::laws::narayana;

/// A mean and a variance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanVariance {
    /// First moment.
    pub mean: f64,
    /// Second central moment.
    pub variance: f64,
}

/// Lemma 4: for `μ = MP(γ₁, σ₁²) ⊠ ⋯ ⊠ MP(γ_s, σ_s²)`,
/// `E[μ] = ∏ σᵢ²` and `Var[μ] = (∏ σᵢ⁴)·Σ γᵢ`.
///
/// (The normalised variance `Var/mean²` is additive under ⊠: the S-transform is
/// `S(z) = (1/m₁)(1 − (κ₂/m₁²) z + O(z²))` and S-transforms multiply.)
///
/// # Example
/// ```
/// use rmt_core::free::lemma4_mean_variance;
/// use rmt_core::laws::MarchenkoPastur;
/// let mv = lemma4_mean_variance(&[MarchenkoPastur::new(0.5, 2.0).unwrap(), MarchenkoPastur::new(1.0, 3.0).unwrap()]).unwrap();
/// assert_eq!(mv.mean, 6.0);
/// assert_eq!(mv.variance, 36.0 * 1.5);
/// ```
pub fn lemma4_mean_variance(factors: &[MarchenkoPastur]) -> Result<MeanVariance> {
    if factors.is_empty() {
        return Err(RmtError::Empty {
            what: "list of MP factors",
        });
    }
    let mean: f64 = factors.iter().map(|f| f.entry_variance()).product();
    let variance = mean * mean * factors.iter().map(|f| f.ratio()).sum::<f64>();
    Ok(MeanVariance { mean, variance })
}

/// The first `k_max` moments `m₁ … m_{k_max}` of `MP(γ₁, σ₁²) ⊠ ⋯ ⊠ MP(γ_s, σ_s²)`, by
/// Lagrange inversion of the S-transform (Akemann–Ipsen–Kieburg 2013, eq. 58, in closed form).
pub fn free_product_moments(factors: &[MarchenkoPastur], k_max: u32) -> Result<Vec<f64>> {
    let law = ProductGaussianLaw::free_product(factors)?;
    Ok((1..=k_max).map(|k| law.moment(k)).collect())
}

fn check_model(gamma: f64, sigma2: f64, sigma_w2: f64, depth: u32) -> Result<()> {
    if !(gamma.is_finite() && gamma > 0.0 && gamma <= 1.0) {
        return Err(RmtError::invalid(
            "γ = n/d",
            gamma,
            "Props 7–8 need 0 < γ ≤ 1",
        ));
    }
    positive("σ²", sigma2)?;
    positive("σ_W²", sigma_w2)?;
    if depth == 0 {
        return Err(RmtError::invalid("depth ℓ", depth, "must be ≥ 1"));
    }
    Ok(())
}

/// Prop 7: mean and variance of the limiting spectrum of the covariance kernel
/// `Σ̄_ℓ = X̄_ℓX̄_ℓᵀ` of the gap-removed model at depth `ℓ` (Random Markov variance `σ²`,
/// values `N(0, σ_W²)`, `γ = n/d ≤ 1`, orthonormal input):
///
/// `E = (σ²σ_W²/γ)^ℓ`, `Var = E²·ℓ(1 + γ)`.
///
/// Its law is `MP(1, σ²/n)^{⊠ℓ} ⊠ MP(γ, dσ_W²)^{⊠ℓ}` (Lemma 3 for each `Ā`, Lemma 4 for the
/// product). Fixing the mean at 1 (`σ²σ_W² = γ`) leaves the variance growing linearly in ℓ.
///
/// # Example
/// ```
/// let mv = rmt_core::free::covariance_kernel_moments(0.5, 1.0, 0.5, 4).unwrap();
/// assert_eq!(mv.mean, 1.0);
/// assert_eq!(mv.variance, 4.0 * 1.5);
/// ```
pub fn covariance_kernel_moments(
    gamma: f64,
    sigma2: f64,
    sigma_w2: f64,
    depth: u32,
) -> Result<MeanVariance> {
    check_model(gamma, sigma2, sigma_w2, depth)?;
    let l = depth as f64;
    let mean = (sigma2 * sigma_w2 / gamma).powf(l);
    Ok(MeanVariance {
        mean,
        variance: mean * mean * l * (1.0 + gamma),
    })
}

/// Prop 8: mean and variance of the limiting squared-singular-value law of the input–output
/// Jacobian `J_ℓ = (W₁⋯W_ℓ)ᵀ ⊗ (Ā_ℓ⋯Ā₁)` (eq. 16) of the gap-removed model:
///
/// `E = (σ²σ_W²/γ)^ℓ`, `Var = E²·ℓ(ℓ + 2)`.
///
/// The moments of a Kronecker product's squared singular values are products of the
/// factors' moments; both factors are Fuss–Catalan of order ℓ (`FC_ℓ(1) = 1`,
/// `FC_ℓ(2) = ℓ + 1`), scaled by `(dσ_W²)^ℓ` and `(σ²/n)^ℓ`. Fixing the mean at 1 leaves a
/// variance growing quadratically in ℓ.
pub fn jacobian_moments(
    gamma: f64,
    sigma2: f64,
    sigma_w2: f64,
    depth: u32,
) -> Result<MeanVariance> {
    check_model(gamma, sigma2, sigma_w2, depth)?;
    let l = depth as f64;
    let mean = (sigma2 * sigma_w2 / gamma).powf(l);
    let fc2 = fuss_catalan(depth, 2);
    Ok(MeanVariance {
        mean,
        variance: mean * mean * (fc2 * fc2 - 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markov::{EntryDistribution, gap_removed, random_markov};
    use crate::spectra::{gram, symmetric_eigenvalues};
    use nalgebra::DMatrix;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn moments_from_lagrange_match_lemma4() {
        let f = [
            MarchenkoPastur::new(0.3, 1.5).unwrap(),
            MarchenkoPastur::new(0.9, 0.7).unwrap(),
        ];
        let m = free_product_moments(&f, 2).unwrap();
        let mv = lemma4_mean_variance(&f).unwrap();
        assert!((m[0] - mv.mean).abs() < 1e-14);
        assert!((m[1] - m[0] * m[0] - mv.variance).abs() < 1e-12);
        assert!(lemma4_mean_variance(&[]).is_err());
    }

    #[test]
    fn prop8_variance_is_quadratic() {
        for l in 1..6 {
            let mv = jacobian_moments(1.0, 1.0, 1.0, l).unwrap();
            assert_eq!(mv.variance, (l * (l + 2)) as f64);
        }
        assert!(jacobian_moments(2.0, 1.0, 1.0, 1).is_err());
    }

    /// Monte Carlo of Props 7 and 8 at depth 2 in the gap-removed model, n = 200, d = 400:
    /// finite-n corrections to normalised moments are O(1/n) (here < 3 %) and one draw of
    /// a 200×200 spectrum has a mean with relative spread ≈ √Var/(E·n) ≈ 1 %; tolerance 8 %.
    #[test]
    fn props_7_and_8_match_monte_carlo() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(21);
        let (n, d) = (200usize, 400usize);
        let gamma = n as f64 / d as f64;
        let dist = EntryDistribution::Exponential { rate: 1.0 };
        let sigma_w2: f64 = 0.5;
        let depth = 2u32;
        let x0 = crate::markov::tests::isometric(n, d, &mut rng);
        let mut x = x0;
        let mut a_prod = DMatrix::<f64>::identity(n, n);
        let mut w_prod = DMatrix::<f64>::identity(d, d);
        for _ in 0..depth {
            let a = gap_removed(&random_markov(n, &dist, &mut rng).unwrap()).unwrap();
            let w = DMatrix::<f64>::from_fn(d, d, |_, _| {
                let z: f64 = StandardNormal.sample(&mut rng);
                sigma_w2.sqrt() * z
            });
            x = &a * &x * &w;
            a_prod = &a * a_prod;
            w_prod *= &w;
        }
        let ev = symmetric_eigenvalues(&gram(&x, 1.0).unwrap()).unwrap();
        let mean = ev.iter().sum::<f64>() / n as f64;
        let var = ev.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64;
        let p7 = covariance_kernel_moments(gamma, 1.0, sigma_w2, depth).unwrap();
        assert!(
            (mean / p7.mean - 1.0).abs() < 0.08,
            "Prop 7 mean {mean} vs {}",
            p7.mean
        );
        assert!(
            (var / p7.variance - 1.0).abs() < 0.15,
            "Prop 7 var {var} vs {}",
            p7.variance
        );
        // Prop 8: moments of J's squared singular values are products of the factors' moments.
        let ea = symmetric_eigenvalues(&gram(&a_prod, 1.0).unwrap()).unwrap();
        let ew = symmetric_eigenvalues(&gram(&w_prod.transpose(), 1.0).unwrap()).unwrap();
        let m = |v: &[f64], k: i32| v.iter().map(|x| x.powi(k)).sum::<f64>() / v.len() as f64;
        let mean_j = m(&ea, 1) * m(&ew, 1);
        let var_j = m(&ea, 2) * m(&ew, 2) - mean_j * mean_j;
        let p8 = jacobian_moments(gamma, 1.0, sigma_w2, depth).unwrap();
        assert!(
            (mean_j / p8.mean - 1.0).abs() < 0.08,
            "Prop 8 mean {mean_j} vs {}",
            p8.mean
        );
        assert!(
            (var_j / p8.variance - 1.0).abs() < 0.15,
            "Prop 8 var {var_j} vs {}",
            p8.variance
        );
    }
}
