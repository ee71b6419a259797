//! Special functions the laws need: the Airy function and Gauss–Legendre quadrature.

use std::sync::OnceLock;

/// `Ai(0)` and `Ai'(0)` (DLMF 9.2.3, 9.2.4), as published (the extra digits round to the
/// nearest `f64`).
#[allow(clippy::excessive_precision)]
const AI0: f64 = 0.355_028_053_887_817_239_260;
#[allow(clippy::excessive_precision)]
const AIP0: f64 = -0.258_819_403_792_806_798_405;

/// The grid on which (Ai, Ai′) are tabulated: `x_k = GRID_MIN + k·GRID_STEP`.
const GRID_MIN: f64 = -30.0;
const GRID_MAX: f64 = 12.0;
const GRID_STEP: f64 = 0.5;

/// The Airy function and its derivative, `(Ai(x), Ai'(x))`, to about 1e-15 relative
/// accuracy (absolute where `Ai` has a zero).
///
/// Method: for `x ≥ 12` and `x ≤ −30` the asymptotic expansions DLMF 9.7.5–9.7.10 (their
/// error there is below 1e-17); in between, a table on a grid of step ½ built by
/// integrating `y'' = x·y` with high-order Taylor steps in each direction's *stable*
/// direction (backwards from 12, where `Ai` is recessive, and from 0 towards −30, where it
/// oscillates), then one Taylor step from the nearest grid point.
///
/// # Example
/// ```
/// let (ai, aip) = rmt_core::special::airy(0.0);
/// assert!((ai - 0.355_028_053_887_817).abs() < 1e-15);
/// assert!((aip + 0.258_819_403_792_807).abs() < 1e-15);
/// ```
pub fn airy(x: f64) -> (f64, f64) {
    if x.is_nan() {
        return (f64::NAN, f64::NAN);
    }
    if x >= GRID_MAX {
        return airy_asymptotic_positive(x);
    }
    if x <= GRID_MIN {
        return airy_asymptotic_negative(-x);
    }
    let table = airy_table();
    let k = ((x - GRID_MIN) / GRID_STEP).round() as usize;
    let k = k.min(table.len() - 1);
    let x0 = GRID_MIN + k as f64 * GRID_STEP;
    let (y0, yp0) = table[k];
    taylor_step(x0, y0, yp0, x - x0)
}

/// One Taylor step of `y'' = x y` from `(x0, y(x0), y'(x0))` by `h`:
/// `y(x0+t) = Σ a_k t^k`, `a_{k+2} = (x0·a_k + a_{k−1}) / ((k+2)(k+1))`.
fn taylor_step(x0: f64, y0: f64, yp0: f64, h: f64) -> (f64, f64) {
    let mut a_prev2 = 0.0; // a_{k-1}
    let mut a_prev = y0; // a_k (k = 0)
    let mut a_cur = yp0; // a_{k+1}
    let mut y = y0 + yp0 * h;
    let mut yp = yp0;
    let mut hk = h; // h^{k+1}
    // A fixed number of terms: |h|·√|x₀| ≤ 0.5·√30 ≈ 2.7, so the terms fall below
    // 2.7⁶⁰/60! ≈ 1e-56 of the leading ones (early exits on one small term are unsafe: the
    // coefficients are not monotone).
    for k in 0..60usize {
        // a_{k+2}
        let a_next = (x0 * a_prev + a_prev2) / (((k + 2) * (k + 1)) as f64);
        let term_d = (k + 2) as f64 * a_next * hk; // contributes to y'
        hk *= h;
        let term = a_next * hk;
        y += term;
        yp += term_d;
        a_prev2 = a_prev;
        a_prev = a_cur;
        a_cur = a_next;
    }
    (y, yp)
}

fn airy_table() -> &'static [(f64, f64)] {
    static TABLE: OnceLock<Vec<(f64, f64)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = ((GRID_MAX - GRID_MIN) / GRID_STEP).round() as usize + 1;
        let zero = ((0.0 - GRID_MIN) / GRID_STEP).round() as usize;
        let mut t = vec![(0.0, 0.0); n];
        // Positive side: backwards from GRID_MAX (stable for the recessive solution).
        t[n - 1] = airy_asymptotic_positive(GRID_MAX);
        for k in (zero..n - 1).rev() {
            let x1 = GRID_MIN + (k + 1) as f64 * GRID_STEP;
            let (y, yp) = t[k + 1];
            t[k] = taylor_step(x1, y, yp, -GRID_STEP);
        }
        // At 0 use the exact values; the negative side is oscillatory (neutrally stable).
        t[zero] = (AI0, AIP0);
        for k in (0..zero).rev() {
            let x1 = GRID_MIN + (k + 1) as f64 * GRID_STEP;
            let (y, yp) = t[k + 1];
            t[k] = taylor_step(x1, y, yp, -GRID_STEP);
        }
        t
    })
}

/// Coefficients `u_k` of DLMF 9.7.2 (`u_0 = 1`).
fn u_coefficients(n: usize) -> Vec<f64> {
    let mut u = vec![1.0; n];
    for k in 1..n {
        let kf = k as f64;
        u[k] = u[k - 1] * (6.0 * kf - 5.0) * (6.0 * kf - 3.0) * (6.0 * kf - 1.0)
            / ((2.0 * kf - 1.0) * 216.0 * kf);
    }
    u
}

/// DLMF 9.7.5, 9.7.6 for `x ≥ 12` (ζ = ⅔x^{3/2} ≥ 27.7: 30 terms reach 1e-17).
fn airy_asymptotic_positive(x: f64) -> (f64, f64) {
    let zeta = 2.0 / 3.0 * x * x.sqrt();
    let u = u_coefficients(30);
    let (mut s_ai, mut s_aip) = (0.0, 0.0);
    let mut zk = 1.0;
    let mut sign = 1.0;
    for (k, uk) in u.iter().enumerate() {
        let vk = if k == 0 {
            1.0
        } else {
            -(6.0 * k as f64 + 1.0) / (6.0 * k as f64 - 1.0) * uk
        };
        s_ai += sign * uk / zk;
        s_aip += sign * vk / zk;
        zk *= zeta;
        sign = -sign;
    }
    let e = (-zeta).exp() / (2.0 * std::f64::consts::PI.sqrt());
    let x14 = x.powf(0.25);
    (e / x14 * s_ai, -e * x14 * s_aip)
}

/// DLMF 9.7.9, 9.7.10 for `Ai(−x)`, `x ≥ 30` (ζ ≥ 109: error below 1e-17).
fn airy_asymptotic_negative(x: f64) -> (f64, f64) {
    let zeta = 2.0 / 3.0 * x * x.sqrt();
    let u = u_coefficients(24);
    let v: Vec<f64> = u
        .iter()
        .enumerate()
        .map(|(k, uk)| {
            if k == 0 {
                1.0
            } else {
                -(6.0 * k as f64 + 1.0) / (6.0 * k as f64 - 1.0) * uk
            }
        })
        .collect();
    // Even/odd parts: Σ(−1)^k u_{2k} ζ^{−2k} and Σ(−1)^k u_{2k+1} ζ^{−2k−1}.
    let series = |c: &[f64]| {
        let (mut even, mut odd) = (0.0, 0.0);
        let mut zk = 1.0;
        for (k, ck) in c.iter().enumerate() {
            let term = ck / zk;
            match k % 4 {
                0 => even += term,
                1 => odd += term,
                2 => even -= term,
                _ => odd -= term,
            }
            zk *= zeta;
        }
        (even, odd)
    };
    let (ue, uo) = series(&u);
    let (ve, vo) = series(&v);
    let phase = zeta - std::f64::consts::FRAC_PI_4;
    let (s, c) = phase.sin_cos();
    let pi_sqrt = std::f64::consts::PI.sqrt();
    let x14 = x.powf(0.25);
    let ai = (c * ue + s * uo) / (pi_sqrt * x14);
    let aip = x14 * (s * ve - c * vo) / pi_sqrt;
    (ai, aip)
}

/// Gauss–Legendre nodes and weights on `[a, b]` with `m` points (exact for polynomials of
/// degree `2m − 1`). Nodes by Newton's method on `P_m` from Tricomi's initial guesses.
///
/// # Example
/// ```
/// let (x, w) = rmt_core::special::gauss_legendre(10, 0.0, 2.0);
/// let integral: f64 = x.iter().zip(&w).map(|(x, w)| w * x.powi(5)).sum();
/// assert!((integral - 64.0 / 6.0).abs() < 1e-12);
/// ```
pub fn gauss_legendre(m: usize, a: f64, b: f64) -> (Vec<f64>, Vec<f64>) {
    let mut nodes = vec![0.0; m];
    let mut weights = vec![0.0; m];
    let half = (b - a) / 2.0;
    let mid = (a + b) / 2.0;
    for i in 0..m.div_ceil(2) {
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (m as f64 + 0.5)).cos();
        let mut dp = 1.0;
        for _ in 0..100 {
            // Legendre recurrence for P_m(z) and its derivative.
            let (mut p0, mut p1) = (1.0, z);
            for k in 2..=m {
                let kf = k as f64;
                let p2 = ((2.0 * kf - 1.0) * z * p1 - (kf - 1.0) * p0) / kf;
                p0 = p1;
                p1 = p2;
            }
            let pm = if m == 0 {
                1.0
            } else if m == 1 {
                z
            } else {
                p1
            };
            let pm1 = if m == 1 { 1.0 } else { p0 };
            dp = m as f64 * (z * pm - pm1) / (z * z - 1.0);
            let dz = pm / dp;
            z -= dz;
            if dz.abs() < 1e-16 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - z * z) * dp * dp);
        nodes[i] = mid - half * z;
        nodes[m - 1 - i] = mid + half * z;
        weights[i] = half * w;
        weights[m - 1 - i] = half * w;
    }
    (nodes, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (x, Ai(x), Ai'(x)) from mpmath 1.3 `airyai` at 30 significant digits.
    #[allow(clippy::excessive_precision)]
    const REFERENCE: [(f64, f64, f64); 20] = [
        (-30.0, -0.087968188456842162833, 1.2286206026374851347),
        (-20.0, -0.17640612707798468959, 0.8928628567364712384),
        (-12.5, -0.27627456138116024823, -0.41933133041950516441),
        (-10.0, 0.040241238486443190689, 0.9962650441327900559),
        (-7.3, 0.33577037051514727697, -0.18009580448329365985),
        (-5.0, 0.35076100902411431979, 0.32719281855444313679),
        (-2.0, 0.22740742820168557599, 0.61825902074169104141),
        (-1.0, 0.5355608832923521188, -0.010160567116645209395),
        (-0.5, 0.4757280916105395888, -0.20408167033954738614),
        (0.0, 0.35502805388781723926, -0.25881940379280679841),
        (0.5, 0.23169360648083348977, -0.22491053266468389314),
        (1.0, 0.13529241631288141552, -0.15914744129679321279),
        (2.0, 0.034924130423274379135, -0.053090384433653631704),
        (3.7, 0.0017455720006099785209, -0.0034669407490276270702),
        (5.0, 0.00010834442813607441735, -0.000247413890868462476),
        (8.0, 4.6922076160992316256e-8, -1.3414392979067865743e-7),
        (10.0, 1.1047532552898685934e-10, -3.5206336767389236366e-10),
        (12.0, 1.393184688875360839e-13, -4.854736554985308463e-13),
        (15.0, 2.164962520737992299e-18, -8.4205679540177727661e-18),
        (25.0, 8.1160268246913866838e-38, -4.0660893372432810053e-37),
    ];

    #[test]
    fn airy_matches_mpmath() {
        for (x, ai, aip) in REFERENCE {
            let (a, ap) = airy(x);
            // Relative accuracy where the function is tiny, absolute in the oscillatory region.
            // For large x, exp(−ζ) amplifies rounding of ζ = ⅔x^{3/2} by ζ: allow 1e-16·ζ.
            let rel = 1e-14_f64.max(4e-16 * (2.0 / 3.0) * x.max(0.0).powf(1.5));
            let tol_a = rel * ai.abs().max(if x < 0.0 { 1.0 } else { 0.0 });
            let tol_ap = rel * aip.abs().max(if x < 0.0 { 1.0 } else { 0.0 });
            assert!(
                (a - ai).abs() <= tol_a.max(1e-300),
                "Ai({x}) = {a}, expected {ai}"
            );
            assert!(
                (ap - aip).abs() <= tol_ap.max(1e-300),
                "Ai'({x}) = {ap}, expected {aip}"
            );
        }
    }

    #[test]
    fn airy_is_continuous_across_method_boundaries() {
        for x in [GRID_MAX, GRID_MIN] {
            let delta = 1e-9;
            let below = airy(x - delta);
            let above = airy(x + delta);
            // The jump beyond the slope's contribution 2δ·Ai'(x) is the methods' disagreement.
            let jump = (above.0 - below.0 - 2.0 * delta * airy(x).1).abs();
            let scale = if x < 0.0 { 1.0 } else { below.0.abs() };
            assert!(jump < 1e-13 * scale, "x = {x}: jump {jump:e}");
        }
    }

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        for m in [1, 2, 5, 16, 61] {
            let (x, w) = gauss_legendre(m, -1.0, 3.0);
            let total: f64 = w.iter().sum();
            assert!((total - 4.0).abs() < 1e-13, "m={m}");
            let deg = 2 * m - 1;
            let exact = (3f64.powi(deg as i32 + 1) - 1.0) / (deg as f64 + 1.0);
            let approx: f64 = x.iter().zip(&w).map(|(x, w)| w * x.powi(deg as i32)).sum();
            assert!(
                (approx - exact).abs() < 1e-11 * exact.abs(),
                "m={m}: {approx} vs {exact}"
            );
        }
    }
}
