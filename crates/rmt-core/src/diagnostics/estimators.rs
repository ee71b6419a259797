//! Estimators of the bulk variance σ².

use super::NullLaw;
use crate::error::{Result, RmtError};
use serde::{Deserialize, Serialize};

/// How σ² — the scale of the null law — is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceEstimator {
    /// The paper's "empirical variance correction": `σ² = Var(M_ij)` over all entries of `M`.
    /// Spikes inflate it, which pulls `λ₊` up towards them.
    Empirical,
    /// Match the median of the spectrum (atom at zero set aside) to the null's median:
    /// `σ² = median(λ) / median(null at σ² = 1)`. Robust to up to half the spectrum being
    /// outliers.
    Median,
    /// Bulk-trimmed iteration: start from the median estimate; repeatedly set σ² so that the
    /// mean of the eigenvalues at or below `λ₊(σ²)` — a fraction `f` of the spectrum — equals
    /// the null's mean below its own `f`-quantile, until the set of outliers stops changing
    /// (at most 100 rounds). If the bulk shrinks below half the spectrum the null does not
    /// describe it, and the estimator reports an error instead of running away.
    Trimmed,
    /// Fit of the null's CDF: the σ² minimising the Kolmogorov–Smirnov distance between the
    /// spectrum and the null (coarse log-grid over [¼, 4]× the median estimate, then golden
    /// section).
    CdfFit,
}

impl VarianceEstimator {
    /// Every estimator.
    pub const ALL: [VarianceEstimator; 4] = [
        VarianceEstimator::Empirical,
        VarianceEstimator::Median,
        VarianceEstimator::Trimmed,
        VarianceEstimator::CdfFit,
    ];

    /// Name used in reports and CSV.
    pub fn name(&self) -> &'static str {
        match self {
            VarianceEstimator::Empirical => "empirical",
            VarianceEstimator::Median => "median",
            VarianceEstimator::Trimmed => "trimmed",
            VarianceEstimator::CdfFit => "cdf_fit",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                RmtError::invalid(
                    "estimator",
                    s,
                    "expected empirical, median, trimmed or cdf_fit",
                )
            })
    }

    /// σ² from a descending spectrum, the unit-scale null, and `Var(M_ij)`.
    pub(crate) fn estimate(
        &self,
        spectrum: &[f64],
        unit: &NullLaw,
        entry_variance: f64,
    ) -> Result<f64> {
        match self {
            VarianceEstimator::Empirical => Ok(entry_variance),
            VarianceEstimator::Median => median_matching(spectrum, unit),
            VarianceEstimator::Trimmed => trimmed(spectrum, unit),
            VarianceEstimator::CdfFit => cdf_fit(spectrum, unit),
        }
    }
}

/// The spectrum in ascending order without the eigenvalues attributed to the null's atom.
fn continuous_part(spectrum: &[f64], unit: &NullLaw) -> Vec<f64> {
    let mut asc: Vec<f64> = spectrum.to_vec();
    asc.sort_by(|a, b| a.total_cmp(b));
    let skip = (unit.law().atom_at_zero() * asc.len() as f64).round() as usize;
    asc.split_off(skip.min(asc.len()))
}

fn median_matching(spectrum: &[f64], unit: &NullLaw) -> Result<f64> {
    let cont = continuous_part(spectrum, unit);
    if cont.is_empty() {
        return Err(RmtError::Degenerate(
            "no eigenvalue outside the null's atom".into(),
        ));
    }
    let n = cont.len();
    let median = if n % 2 == 1 {
        cont[n / 2]
    } else {
        0.5 * (cont[n / 2 - 1] + cont[n / 2])
    };
    let atom = unit.law().atom_at_zero();
    let null_median = unit.law().quantile(atom + 0.5 * (1.0 - atom))?;
    if median <= 0.0 {
        return Err(RmtError::Degenerate(
            "median eigenvalue is 0: σ² cannot be matched".into(),
        ));
    }
    Ok(median / null_median)
}

fn trimmed(spectrum: &[f64], unit: &NullLaw) -> Result<f64> {
    let cont = continuous_part(spectrum, unit);
    let law = unit.law();
    let atom = law.atom_at_zero();
    let unit_edge = law.upper_edge();
    let mut sigma2 = median_matching(spectrum, unit)?;
    let mut previous = usize::MAX;
    for _ in 0..100 {
        let edge = sigma2 * unit_edge;
        let bulk: Vec<f64> = cont.iter().copied().filter(|&l| l <= edge).collect();
        if 2 * bulk.len() < cont.len() {
            return Err(RmtError::Degenerate(format!(
                "trimmed σ² estimator diverged: fewer than half the eigenvalues lie below λ₊ = {edge:e} \
                 (the null law does not describe this bulk)"
            )));
        }
        // Match the bulk's mean to the null's mean *conditional on the same quantile*, so
        // that trimming a fraction f of a spectrum that follows the null leaves σ² unbiased.
        let fraction = bulk.len() as f64 / cont.len() as f64;
        let target = if fraction >= 1.0 {
            law.mean() / (1.0 - atom)
        } else {
            let q = law.quantile(atom + fraction * (1.0 - atom))?;
            truncated_mean(law, q)
        };
        sigma2 = bulk.iter().sum::<f64>() / bulk.len() as f64 / target;
        let outliers = cont.len() - bulk.len();
        if outliers == previous {
            return Ok(sigma2);
        }
        previous = outliers;
    }
    Ok(sigma2)
}

/// `E[X | 0 < X ≤ q]` for the continuous part of `law`, by Gauss–Legendre in `x = a + (q−a)t³`
/// (smooths the square-root and `x^{−s/(s+1)}` edge behaviours at the lower edge `a`).
fn truncated_mean(law: &dyn crate::laws::SpectralLaw, q: f64) -> f64 {
    let a = law.lower_edge();
    let (t, w) = crate::special::gauss_legendre(12, 0.0, 1.0);
    let panels = 24;
    let (mut mass, mut first) = (0.0, 0.0);
    for p in 0..panels {
        for (ti, wi) in t.iter().zip(&w) {
            let u = (p as f64 + ti) / panels as f64;
            let x = a + (q - a) * u * u * u;
            let dx = 3.0 * (q - a) * u * u / panels as f64;
            let f = law.density(x) * dx * wi;
            mass += f;
            first += x * f;
        }
    }
    if mass > 0.0 { first / mass } else { q }
}

/// KS distance between the ascending sample `cont` and the continuous part of `law`.
fn ks_distance(cont: &[f64], unit: &NullLaw, sigma2: f64) -> f64 {
    let law = match unit.at(sigma2) {
        Ok(l) => l,
        Err(_) => return f64::INFINITY,
    };
    let law = law.law();
    let atom = law.atom_at_zero();
    let n = cont.len() as f64;
    let mut d = 0.0f64;
    for (i, &x) in cont.iter().enumerate() {
        let f = ((law.cdf(x) - atom) / (1.0 - atom)).clamp(0.0, 1.0);
        d = d
            .max((f - i as f64 / n).abs())
            .max(((i + 1) as f64 / n - f).abs());
    }
    d
}

fn cdf_fit(spectrum: &[f64], unit: &NullLaw) -> Result<f64> {
    let cont = continuous_part(spectrum, unit);
    if cont.len() < 2 {
        return Err(RmtError::Degenerate(
            "CDF fit needs at least two eigenvalues".into(),
        ));
    }
    let start = median_matching(spectrum, unit)?;
    // Coarse grid in log σ², then golden section around the best grid point.
    let (lo, hi) = ((0.25f64).ln(), 4f64.ln());
    let grid = 48;
    let at = |t: f64| start * t.exp();
    let mut best = (f64::INFINITY, 0.0);
    for i in 0..=grid {
        let t = lo + (hi - lo) * i as f64 / grid as f64;
        let d = ks_distance(&cont, unit, at(t));
        if d < best.0 {
            best = (d, t);
        }
    }
    let step = (hi - lo) / grid as f64;
    let (mut a, mut b) = (best.1 - step, best.1 + step);
    let phi = 0.5 * (5f64.sqrt() - 1.0);
    let mut c = b - phi * (b - a);
    let mut e = a + phi * (b - a);
    let (mut fc, mut fe) = (
        ks_distance(&cont, unit, at(c)),
        ks_distance(&cont, unit, at(e)),
    );
    for _ in 0..60 {
        if fc <= fe {
            b = e;
            e = c;
            fe = fc;
            c = b - phi * (b - a);
            fc = ks_distance(&cont, unit, at(c));
        } else {
            a = c;
            c = e;
            fc = fe;
            e = a + phi * (b - a);
            fe = ks_distance(&cont, unit, at(e));
        }
        if b - a < 1e-10 {
            break;
        }
    }
    Ok(at(0.5 * (a + b)))
}
