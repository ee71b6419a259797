//! The squared-singular-value law of a product of rectangular Gaussian matrices.

use super::SpectralLaw;
use crate::error::{Result, RmtError, positive};
use nalgebra::Complex;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::sync::{Arc, OnceLock};

/// The free multiplicative convolution `MP(ρ₁, 1) ⊠ ⋯ ⊠ MP(ρ_s, 1)`, scaled to mean `c`:
/// the limiting eigenvalue law of `Y Yᵀ` for a product `Y = X₁X₂⋯X_s` of independent
/// Gaussian matrices `X_i ∈ ℝ^{N_{i−1}×N_i}`, with `ρ_i = N₀/N_i` (seed 002, Lemma 4;
/// Burda et al. 2010; Akemann, Ipsen & Kieburg 2013).
///
/// Its S-transform is `S(z) = 1 / (c·∏ᵢ (1 + ρᵢ z))`. Everything follows from that:
///
/// * **Moments** (Lagrange inversion): `m_k = c^k · (1/k) [z^{k−1}] (1+z)^k ∏ᵢ(1+ρᵢz)^k`.
///   With all `ρᵢ = 1` these are the Fuss–Catalan numbers `FC_s(k) = C((s+1)k, k)/(sk+1)`;
///   with `s = 1` the Narayana polynomials of Marchenko–Pastur.
/// * **Density**: `M(z) = z·G(z) − 1` solves `z·M = c(1+M)∏(1+ρᵢM)`, a polynomial of degree
///   `s+1`; `ρ(x) = −Im M(x + i0) / (πx)` on the physical branch, found by continuation from
///   large `Im z` (where `M ≈ c/z`) down to the real axis.
/// * **Upper edge**: `x₊ = min_{M>0} c(1+M)∏(1+ρᵢM)/M`, at the unique root of
///   `M/(1+M) + Σ ρᵢM/(1+ρᵢM) = 1`. Square factors: `x₊ = c·(s+1)^{s+1}/s^s` (27/4·c for
///   `s = 2`, the correct null edge of `G = QKᵀ(QKᵀ)ᵀ/d` at initialisation — DESIGN.md).
/// * **Atom** at 0 of mass `1 − min(1, 1/max ρᵢ)` (rank deficiency).
///
/// The CDF is the density integrated numerically (Gauss–Legendre panels in a variable that
/// removes the edge singularities), tabulated once per law, to about 1e-10.
///
/// # Example
/// ```
/// use rmt_core::laws::{ProductGaussianLaw, SpectralLaw};
/// let fc = ProductGaussianLaw::fuss_catalan(2, 1.0).unwrap();
/// assert!((fc.upper_edge() - 27.0 / 4.0).abs() < 1e-12);
/// assert!((fc.moment(2) - 3.0).abs() < 1e-12); // FC₂(2) = C(6,2)/5 = 3
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "ProductLawParameters", into = "ProductLawParameters")]
pub struct ProductGaussianLaw {
    ratios: Vec<f64>,
    scale: f64,
    /// Positive critical point `M*` of `x(M)` (scale-free).
    critical: f64,
    /// Edges of the continuous part at unit scale.
    unit_lower: f64,
    unit_upper: f64,
    table: Arc<OnceLock<CdfTable>>,
}

/// The serialised form of a [`ProductGaussianLaw`]: its parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductLawParameters {
    /// `ρᵢ = N₀/Nᵢ`.
    pub ratios: Vec<f64>,
    /// The mean `c`.
    pub scale: f64,
}

impl TryFrom<ProductLawParameters> for ProductGaussianLaw {
    type Error = RmtError;
    fn try_from(p: ProductLawParameters) -> Result<Self> {
        Self::new(p.ratios, p.scale)
    }
}

impl From<ProductGaussianLaw> for ProductLawParameters {
    fn from(l: ProductGaussianLaw) -> Self {
        Self {
            ratios: l.ratios,
            scale: l.scale,
        }
    }
}

impl PartialEq for ProductGaussianLaw {
    fn eq(&self, other: &Self) -> bool {
        self.ratios == other.ratios && self.scale == other.scale
    }
}

/// The unit-scale CDF and its θ-derivative at uniform nodes `θ_j = j·step` of the
/// integration variable, for cubic Hermite interpolation.
#[derive(Debug, Clone)]
struct CdfTable {
    step: f64,
    cumulative: Vec<f64>,
    derivative: Vec<f64>,
}

/// Panels of the tabulated CDF (Hermite interpolation error ≈ (π/2/N)⁴ ≈ 4e-13) and
/// Gauss–Legendre points per panel.
const CDF_NODES: usize = 2048;
const CDF_POINTS: usize = 4;

impl ProductGaussianLaw {
    /// The law with ratios `ρᵢ = N₀/Nᵢ` (one per factor) and mean `scale`.
    ///
    /// # Errors
    /// No factor, or a ratio or the scale not finite and positive.
    pub fn new(ratios: Vec<f64>, scale: f64) -> Result<Self> {
        if ratios.is_empty() {
            return Err(RmtError::Empty {
                what: "factor ratios",
            });
        }
        for &r in &ratios {
            positive("ratio ρ", r)?;
        }
        let scale = positive("scale", scale)?;
        let mut law = Self {
            ratios,
            scale,
            critical: 0.0,
            unit_lower: 0.0,
            unit_upper: 0.0,
            table: Arc::new(OnceLock::new()),
        };
        law.critical = law.critical_point();
        law.unit_upper = law.x_of_m(law.critical);
        law.unit_lower = law.compute_lower_edge();
        Ok(law)
    }

    /// The unit-scale law sharing this one's table.
    fn unit(&self) -> Self {
        Self {
            scale: 1.0,
            ratios: self.ratios.clone(),
            table: Arc::clone(&self.table),
            ..*self
        }
    }

    /// Fuss–Catalan law of order `s` (squared singular values of a product of `s` square
    /// Gaussian matrices), scaled to mean `scale`.
    pub fn fuss_catalan(s: usize, scale: f64) -> Result<Self> {
        if s == 0 {
            return Err(RmtError::invalid("s", s, "needs at least one factor"));
        }
        Self::new(vec![1.0; s], scale)
    }

    /// Lemma 4's `MP(γ₁, σ₁²) ⊠ ⋯ ⊠ MP(γ_s, σ_s²)`.
    pub fn free_product(factors: &[super::MarchenkoPastur]) -> Result<Self> {
        Self::new(
            factors.iter().map(|f| f.ratio()).collect(),
            factors.iter().map(|f| f.entry_variance()).product(),
        )
    }

    /// The null law of `G = M Mᵀ / normalization` when `M = X₁⋯X_s` is a product of
    /// independent Gaussian factors with shapes `dims = [N₀, N₁, …, N_s]`
    /// (`Xᵢ ∈ ℝ^{N_{i−1}×N_i}`), scaled so that the entries of `M` have variance `entry_variance`.
    ///
    /// Then `E[λ] = tr(G)/N₀ = entry_variance · N_s / normalization`.
    ///
    /// # Example
    /// ```
    /// use rmt_core::laws::{ProductGaussianLaw, SpectralLaw};
    /// // M = QKᵀ with Q, K ∈ ℝ^{768×768}, G = MMᵀ/768: Fuss–Catalan, edge 27/4·σ².
    /// let law = ProductGaussianLaw::for_product(&[768, 768, 768], 768.0, 2.0).unwrap();
    /// assert!((law.upper_edge() - 13.5).abs() < 1e-10);
    /// ```
    pub fn for_product(dims: &[usize], normalization: f64, entry_variance: f64) -> Result<Self> {
        if dims.len() < 2 || dims.contains(&0) {
            return Err(RmtError::invalid(
                "dims",
                format!("{dims:?}"),
                "needs ≥ 2 positive dimensions",
            ));
        }
        positive("normalization", normalization)?;
        let n0 = dims[0] as f64;
        let ratios = dims[1..].iter().map(|&n| n0 / n as f64).collect();
        let scale = entry_variance * *dims.last().unwrap() as f64 / normalization;
        Self::new(ratios, scale)
    }

    /// The ratios `ρᵢ`.
    pub fn ratios(&self) -> &[f64] {
        &self.ratios
    }

    /// The mean `c`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The same law rescaled to mean `scale`.
    pub fn with_scale(&self, scale: f64) -> Result<Self> {
        Ok(Self {
            scale: positive("scale", scale)?,
            ratios: self.ratios.clone(),
            table: Arc::clone(&self.table),
            ..*self
        })
    }

    /// `x(M)/c = (1+M)∏(1+ρᵢM)/M`.
    fn x_of_m(&self, m: f64) -> f64 {
        (1.0 + m) * self.ratios.iter().map(|r| 1.0 + r * m).product::<f64>() / m
    }

    /// The positive critical point `M*` of `x(M)`: the root of
    /// `h(M) = M/(1+M) + Σ ρᵢM/(1+ρᵢM) − 1`, strictly increasing from −1 to s on (0, ∞).
    fn critical_point(&self) -> f64 {
        let h = |m: f64| {
            m / (1.0 + m)
                + self
                    .ratios
                    .iter()
                    .map(|r| r * m / (1.0 + r * m))
                    .sum::<f64>()
                - 1.0
        };
        let (mut lo, mut hi) = (0.0, 1.0);
        while h(hi) < 0.0 {
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if h(mid) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
            if hi - lo <= 1e-16 * hi {
                break;
            }
        }
        0.5 * (lo + hi)
    }

    /// Soft-edge scaling of the largest of `n` eigenvalues drawn from this law: near `x₊`,
    /// `ρ(x) ≈ (a/π)√(x₊ − x)` with `a = √(2/x''(M*)) / x₊`, so by edge universality
    /// `λ₁ ≈ x₊ + (n·a)^{−2/3}·TW` (this reproduces Johnstone's scaling for MP exactly).
    /// Returns `(location x₊, scale (n·a)^{−2/3})`.
    pub fn soft_edge_scaling(&self, n: usize) -> (f64, f64) {
        let m = self.critical;
        let x_plus = self.scale * self.unit_upper;
        let l2 = -1.0 / (1.0 + m).powi(2)
            - self
                .ratios
                .iter()
                .map(|r| r * r / (1.0 + r * m).powi(2))
                .sum::<f64>()
            + 1.0 / (m * m);
        let x2 = x_plus * l2;
        let a = (2.0 / x2).sqrt() / x_plus;
        (x_plus, (n as f64 * a).powf(-2.0 / 3.0))
    }

    /// `P(w; z) = c·w·∏((1−ρᵢ) + ρᵢw) − z(w − 1)` and `∂P/∂w`, in the shifted variable
    /// `w = M + 1`, where `z·M = c(1+M)∏(1+ρᵢM)` becomes `P = 0`. The shift makes the square
    /// factors (`ρᵢ = 1`) exact multiples of `w`, so roots near `M = −1` (small `x`) keep
    /// their relative accuracy.
    fn shifted_polynomial(&self, w: Complex<f64>, z: Complex<f64>) -> (Complex<f64>, Complex<f64>) {
        let one = Complex::new(1.0, 0.0);
        let factors: Vec<Complex<f64>> = self
            .ratios
            .iter()
            .map(|&r| Complex::new(1.0 - r, 0.0) + w * r)
            .collect();
        let prod: Complex<f64> = factors.iter().fold(one, |acc, f| acc * f);
        // d/dw [w·∏F] = ∏F + w·Σ ρᵢ ∏_{j≠i} F_j
        let mut sum = Complex::new(0.0, 0.0);
        for (i, &r) in self.ratios.iter().enumerate() {
            let others = factors
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .fold(one, |acc, (_, f)| acc * f);
            sum += others * r;
        }
        let p = w * prod * self.scale - z * (w - one);
        let dp = (prod + w * sum) * self.scale - z;
        (p, dp)
    }

    /// `M(x + i0⁺)` on the physical branch, followed by continuation from `z = x + iY` with
    /// `Y` large (where `M ≈ c/z`) down to the real axis: `z ↦ M(z)` is analytic in the upper
    /// half plane, so Newton tracking along a geometric path in `Im z` cannot jump branches.
    fn m_transform(&self, x: f64) -> Complex<f64> {
        let scale_x = self.scale * self.unit_upper;
        let mut eta = 4.0 * (x.abs() + scale_x) + 1.0;
        let z0 = Complex::new(x, eta);
        // M ≈ c/z for large |z|.
        let mut w = Complex::new(1.0, 0.0) + Complex::new(self.scale, 0.0) / z0;
        let eta_min = 1e-3 * x.abs().min(scale_x).max(1e-300);
        let newton = |w: &mut Complex<f64>, z: Complex<f64>, iterations: usize| {
            for _ in 0..iterations {
                let (p, dp) = self.shifted_polynomial(*w, z);
                if dp.norm() == 0.0 {
                    break;
                }
                let step = p / dp;
                if !(step.re.is_finite() && step.im.is_finite()) {
                    break;
                }
                *w -= step;
                if step.norm() <= 1e-16 * w.norm() {
                    break;
                }
            }
        };
        while eta > eta_min {
            eta *= 0.8;
            newton(&mut w, Complex::new(x, eta), 4);
        }
        newton(&mut w, Complex::new(x, 0.0), 30);
        w - Complex::new(1.0, 0.0)
    }

    /// The continuous support's lower edge. The support is `{x : Im M(x + i0) < 0}`, an
    /// interval containing the conditional mean `c/(1 − atom)`; bisection on that predicate
    /// between 0 and the mean brackets the edge, which is then snapped to the exact critical
    /// value `x(M_c)` (a real negative critical point of `x(M)`) when one lies within 1e-6.
    fn compute_lower_edge(&self) -> f64 {
        let unit = Self {
            scale: 1.0,
            ratios: self.ratios.clone(),
            table: Arc::new(OnceLock::new()),
            ..*self
        };
        let inside = |x: f64| {
            let m = unit.m_transform(x);
            m.im < -1e-9 * m.norm().max(1e-300)
        };
        let atom = (1.0 - 1.0 / self.ratios.iter().cloned().fold(0.0, f64::max)).max(0.0);
        let mut hi = 1.0 / (1.0 - atom); // the conditional mean, at unit scale
        if !inside(hi) {
            // Not expected for these laws; fall back to scanning down from the edge.
            hi = 0.5 * self.unit_upper;
        }
        let mut lo = 0.0;
        if inside(1e-12 * hi) {
            return 0.0;
        }
        for _ in 0..80 {
            let mid = 0.5 * (lo + hi);
            if inside(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let estimate = hi;
        self.negative_critical_values()
            .into_iter()
            .filter(|xc| (xc - estimate).abs() <= 1e-6 * estimate.max(1e-300))
            .min_by(|a, b| (a - estimate).abs().total_cmp(&(b - estimate).abs()))
            .unwrap_or(estimate)
    }

    /// Critical values `x(M_c)` in `(0, x₊)` over real negative critical points `M_c` of
    /// `log x(M) = log(1+M) + Σ log(1+ρᵢM) − log M`, found between consecutive poles.
    fn negative_critical_values(&self) -> Vec<f64> {
        let mut poles: Vec<f64> = self.ratios.iter().map(|r| -1.0 / r).collect();
        poles.push(-1.0);
        poles.sort_by(|a, b| a.total_cmp(b));
        poles.dedup_by(|a, b| (*a - *b).abs() < 1e-14 * a.abs());
        let k = |m: f64| {
            m * (1.0 / (1.0 + m) + self.ratios.iter().map(|r| r / (1.0 + r * m)).sum::<f64>()) - 1.0
        };
        let mut bounds = poles;
        bounds.push(0.0);
        let mut values = Vec::new();
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            let width = b - a;
            if width <= 0.0 {
                continue;
            }
            let steps = 400;
            let mut prev_m = a + width * 1e-9;
            let mut prev_k = k(prev_m);
            for i in 1..=steps {
                let m = a + width * (i as f64 / steps as f64).min(1.0 - 1e-9);
                let km = k(m);
                if prev_k.is_finite() && km.is_finite() && prev_k.signum() != km.signum() {
                    let (mut lo, mut hi) = (prev_m, m);
                    for _ in 0..100 {
                        let mid = 0.5 * (lo + hi);
                        if k(mid).signum() == k(lo).signum() {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                    let xc = self.x_of_m(0.5 * (lo + hi));
                    if xc > 0.0 && xc < self.unit_upper {
                        values.push(xc);
                    }
                }
                prev_m = m;
                prev_k = km;
            }
        }
        values
    }

    /// Integration variable: `x = a + (b − a) sin²θ` if `a > 0`, else `x = b·sin^{2q}θ` with
    /// `q = s + 1` (removes the `x^{−s/(s+1)}` singularity at 0). θ ∈ [0, π/2].
    fn x_of_theta(&self, theta: f64, a: f64, b: f64) -> (f64, f64) {
        let (s, c) = theta.sin_cos();
        if a > 0.0 {
            (a + (b - a) * s * s, (b - a) * 2.0 * s * c)
        } else {
            let q = (self.ratios.len() + 1) as f64;
            let s2q = s.powf(2.0 * q);
            (
                b * s2q,
                if s > 0.0 {
                    b * 2.0 * q * s2q / s * c
                } else {
                    0.0
                },
            )
        }
    }

    fn theta_of_x(&self, x: f64, a: f64, b: f64) -> f64 {
        if a > 0.0 {
            ((x - a) / (b - a)).clamp(0.0, 1.0).sqrt().asin()
        } else {
            let q = (self.ratios.len() + 1) as f64;
            (x / b).clamp(0.0, 1.0).powf(1.0 / (2.0 * q)).asin()
        }
    }

    /// Unit-scale table (the law at mean 1; other scales are a change of variable).
    fn table(&self) -> &CdfTable {
        self.table.get_or_init(|| {
            let (a, b) = (self.unit_lower, self.unit_upper);
            let unit = self.unit();
            let h = std::f64::consts::FRAC_PI_2 / CDF_NODES as f64;
            let (gx, gw) = crate::special::gauss_legendre(CDF_POINTS, 0.0, 1.0);
            let slope = |theta: f64| {
                let (x, dx) = unit.x_of_theta(theta, a, b);
                unit.density(x) * dx
            };
            let mut cumulative = Vec::with_capacity(CDF_NODES + 1);
            let mut derivative = Vec::with_capacity(CDF_NODES + 1);
            let mut total = 0.0;
            for j in 0..=CDF_NODES {
                let left = j as f64 * h;
                cumulative.push(total);
                derivative.push(slope(left));
                if j < CDF_NODES {
                    total += gx
                        .iter()
                        .zip(&gw)
                        .map(|(xi, wi)| wi * h * slope(left + xi * h))
                        .sum::<f64>();
                }
            }
            CdfTable {
                step: h,
                cumulative,
                derivative,
            }
        })
    }
}

impl SpectralLaw for ProductGaussianLaw {
    fn lower_edge(&self) -> f64 {
        self.scale * self.unit_lower
    }

    fn upper_edge(&self) -> f64 {
        self.scale * self.unit_upper
    }

    fn atom_at_zero(&self) -> f64 {
        let max_ratio = self.ratios.iter().cloned().fold(0.0, f64::max);
        (1.0 - 1.0 / max_ratio).max(0.0)
    }

    fn density(&self, x: f64) -> f64 {
        if x <= 0.0 || x >= self.upper_edge() || x <= self.lower_edge() {
            return 0.0;
        }
        let m = self.m_transform(x);
        if m.im < 0.0 { -m.im / (PI * x) } else { 0.0 }
    }

    fn cdf(&self, x: f64) -> f64 {
        if x < 0.0 {
            return 0.0;
        }
        let atom = self.atom_at_zero();
        let u = x / self.scale; // unit-scale abscissa
        let (a, b) = (self.unit_lower, self.unit_upper);
        if u <= a {
            return atom;
        }
        if u >= b {
            return 1.0;
        }
        let table = self.table();
        let th = self.theta_of_x(u, a, b);
        let h = table.step;
        let j = ((th / h).floor() as usize).min(CDF_NODES - 1);
        let t = (th - j as f64 * h) / h;
        let (f0, f1) = (table.cumulative[j], table.cumulative[j + 1]);
        let (d0, d1) = (table.derivative[j] * h, table.derivative[j + 1] * h);
        let (t2, t3) = (t * t, t * t * t);
        let value = (2.0 * t3 - 3.0 * t2 + 1.0) * f0
            + (t3 - 2.0 * t2 + t) * d0
            + (-2.0 * t3 + 3.0 * t2) * f1
            + (t3 - t2) * d1;
        (atom + value).clamp(0.0, 1.0)
    }

    fn moment(&self, k: u32) -> f64 {
        if k == 0 {
            return 1.0;
        }
        // [z^{k−1}] of (1+z)^k ∏(1+ρᵢz)^k, by repeated multiplication truncated at degree k−1.
        let k_us = k as usize;
        let mut poly = vec![0.0; k_us];
        poly[0] = 1.0;
        let mut multiply_by_power = |r: f64| {
            for _ in 0..k {
                for d in (1..k_us).rev() {
                    poly[d] += r * poly[d - 1];
                }
            }
        };
        multiply_by_power(1.0);
        for &r in &self.ratios {
            multiply_by_power(r);
        }
        self.scale.powi(k as i32) * poly[k_us - 1] / k as f64
    }
}

/// Fuss–Catalan number `FC_s(k) = C((s+1)k, k) / (sk + 1)`: the k-th moment of the
/// squared singular values of a product of `s` square standard Gaussian matrices
/// (normalised), and of `MP(1,1)^{⊠s}` (seed 002, proof of Prop 8).
///
/// # Example
/// ```
/// assert_eq!(rmt_core::laws::fuss_catalan(1, 4), 14.0); // Catalan
/// assert_eq!(rmt_core::laws::fuss_catalan(2, 3), 12.0);
/// ```
pub fn fuss_catalan(s: u32, k: u32) -> f64 {
    super::marchenko_pastur::binomial((s + 1) * k, k) / (s * k + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::laws::{MarchenkoPastur, integrate};
    use nalgebra::DMatrix;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn single_factor_is_marchenko_pastur() {
        for gamma in [0.3, 1.0, 2.0] {
            let mp = MarchenkoPastur::new(gamma, 1.7).unwrap();
            let law = ProductGaussianLaw::free_product(&[mp]).unwrap();
            assert!((law.upper_edge() - mp.upper_edge()).abs() < 1e-12);
            assert!(
                (law.lower_edge() - mp.lower_edge()).abs() < 1e-9,
                "γ={gamma}: {} vs {}",
                law.lower_edge(),
                mp.lower_edge()
            );
            assert!((law.atom_at_zero() - mp.atom_at_zero()).abs() < 1e-15);
            for k in 1..7 {
                assert!((law.moment(k) - mp.moment(k)).abs() < 1e-10 * mp.moment(k));
            }
            for t in [0.05, 0.3, 0.6, 0.95] {
                let x = mp.lower_edge() + t * (mp.upper_edge() - mp.lower_edge());
                assert!(
                    (law.density(x) - mp.density(x)).abs() < 1e-9 * mp.density(x).max(1.0),
                    "γ={gamma} x={x}"
                );
                assert!(
                    (law.cdf(x) - mp.cdf(x)).abs() < 1e-9,
                    "γ={gamma} x={x}: {} vs {}",
                    law.cdf(x),
                    mp.cdf(x)
                );
            }
        }
    }

    #[test]
    fn fuss_catalan_moments_and_edges() {
        for s in 1..5u32 {
            let law = ProductGaussianLaw::fuss_catalan(s as usize, 1.0).unwrap();
            for k in 1..8 {
                assert!((law.moment(k) - fuss_catalan(s, k)).abs() < 1e-9 * fuss_catalan(s, k));
            }
            let sf = s as f64;
            let edge = (sf + 1.0).powf(sf + 1.0) / sf.powf(sf);
            assert!((law.upper_edge() - edge).abs() < 1e-10 * edge);
            assert_eq!(law.lower_edge(), 0.0);
            // The density integrates to one.
            assert!(
                (law.cdf(edge * (1.0 - 1e-12)) - 1.0).abs() < 1e-8,
                "s={s}: {}",
                law.cdf(edge * 0.999999)
            );
        }
    }

    #[test]
    fn lemma4_mean_and_variance() {
        let factors = [
            MarchenkoPastur::new(0.5, 2.0).unwrap(),
            MarchenkoPastur::new(1.5, 0.5).unwrap(),
            MarchenkoPastur::new(0.25, 3.0).unwrap(),
        ];
        let law = ProductGaussianLaw::free_product(&factors).unwrap();
        let mean: f64 = factors.iter().map(|f| f.entry_variance()).product();
        let var = mean * mean * factors.iter().map(|f| f.ratio()).sum::<f64>();
        assert!((law.mean() - mean).abs() < 1e-12);
        assert!((law.variance() - var).abs() < 1e-10);
    }

    #[test]
    fn moments_match_integrated_density_for_rectangular_products() {
        let owned = ProductGaussianLaw::new(vec![0.5, 1.5, 0.8], 1.3).unwrap();
        let law = &owned;
        let (a, b) = (law.lower_edge(), law.upper_edge());
        let atom = law.atom_at_zero();
        assert!((atom - (1.0 - 1.0 / 1.5)).abs() < 1e-15);
        // ∫ ρ = 1 − atom and ∫ x ρ = mean, in the edge-regularising variable.
        let f = |k: i32| {
            move |th: f64| {
                let (x, dx) = law.x_of_theta(th, a, b);
                x.powi(k) * law.density(x) * dx
            }
        };
        let mass = integrate(f(0), 0.0, std::f64::consts::FRAC_PI_2, 64, 16);
        let m1 = integrate(f(1), 0.0, std::f64::consts::FRAC_PI_2, 64, 16);
        let m2 = integrate(f(2), 0.0, std::f64::consts::FRAC_PI_2, 64, 16);
        assert!((mass - (1.0 - atom)).abs() < 1e-7, "mass {mass}");
        assert!(
            (m1 - law.moment(1)).abs() < 1e-7 * law.moment(1),
            "{m1} vs {}",
            law.moment(1)
        );
        assert!(
            (m2 - law.moment(2)).abs() < 1e-7 * law.moment(2),
            "{m2} vs {}",
            law.moment(2)
        );
    }

    /// Monte Carlo: the spectrum of G = QKᵀ(QKᵀ)ᵀ/d for i.i.d. Q, K is Fuss–Catalan (s = 2),
    /// not MP: its largest eigenvalue is ≈ 27/4·σ² (DESIGN.md, "the product null").
    #[test]
    fn product_of_two_gaussians_is_fuss_catalan() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(11);
        let (m, d) = (300, 300);
        let q = DMatrix::<f64>::from_fn(m, d, |_, _| StandardNormal.sample(&mut rng));
        let k = DMatrix::<f64>::from_fn(m, d, |_, _| StandardNormal.sample(&mut rng));
        let mm = &q * k.transpose();
        let sigma2 = mm.iter().map(|x| x * x).sum::<f64>() / (m * m) as f64;
        let g = crate::spectra::gram(&mm, 1.0 / d as f64).unwrap();
        let ev = crate::spectra::symmetric_eigenvalues(&g).unwrap();
        let law = ProductGaussianLaw::for_product(&[m, d, m], d as f64, sigma2).unwrap();
        // Edge: TW-scale fluctuation (m^{-2/3} ≈ 0.02 relative) plus O(m^{-1/2}) from σ̂².
        assert!(
            (ev[0] / law.upper_edge() - 1.0).abs() < 0.05,
            "{} vs {}",
            ev[0],
            law.upper_edge()
        );
        let ks = crate::laws::ks_test(&law, &ev).unwrap();
        assert!(ks.statistic < 0.03, "D = {}", ks.statistic);
        // The MP law with the same variance does not fit.
        let mp = MarchenkoPastur::new(1.0, sigma2).unwrap();
        assert!(crate::laws::ks_test(&mp, &ev).unwrap().statistic > 0.05);
    }

    #[test]
    fn soft_edge_scaling_reproduces_johnstone_for_mp() {
        let (m, d) = (300usize, 600usize);
        let law = ProductGaussianLaw::new(vec![m as f64 / d as f64], 1.0).unwrap();
        let (loc, scale) = law.soft_edge_scaling(m);
        let gamma: f64 = 0.5;
        assert!((loc - (1.0 + gamma.sqrt()).powi(2)).abs() < 1e-12);
        // Johnstone: σ = (√d + √m)(1/√d + 1/√m)^{1/3} / d.
        let (df, mf) = (d as f64, m as f64);
        let johnstone =
            (df.sqrt() + mf.sqrt()) * (1.0 / df.sqrt() + 1.0 / mf.sqrt()).powf(1.0 / 3.0) / df;
        assert!(
            (scale / johnstone - 1.0).abs() < 1e-9,
            "{scale} vs {johnstone}"
        );
    }
}
