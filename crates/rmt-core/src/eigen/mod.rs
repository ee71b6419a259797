//! Symmetric eigenvalue solvers (eigenvalues only).
//!
//! [`EigenSolver::TwoStage`], the default, works in the input's precision (`f32` or `f64`):
//! it reduces the matrix to a band of half-bandwidth `b = 32` with matrix–matrix products
//! only (`band`), chases the band down to tridiagonal form (`bulge`: each sweep split
//! between two cores, pipelined), and finds the
//! tridiagonal eigenvalues in `f64` with the Pal–Walker–Kahan QL/QR iteration, or only those
//! above a threshold by Sturm bisection (`tridiagonal`). The one-stage Householder
//! tridiagonalisation of LAPACK's `dsyevd` spends half its flops in matrix–vector products,
//! bound by memory bandwidth; the two-stage path moves them into GEMM and keeps the `O(n²b)`
//! chase in cache. [`EigenSolver::Faer`] is faer 0.24's one-stage solver, kept as a
//! reference. `cargo xtask bench eigen` measures both against LAPACK (docs/performance.md).

mod band;
mod bulge;
mod tridiagonal;

use crate::error::{Result, RmtError};
use crate::linalg::Element;
use faer::MatRef;
use serde::{Deserialize, Serialize};

/// Which algorithm computes a full symmetric spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EigenSolver {
    /// Two-stage reduction (dense → band → tridiagonal) in the input's precision, then the
    /// Pal–Walker–Kahan QL/QR iteration in `f64`.
    #[default]
    TwoStage,
    /// faer 0.24's one-stage solver (in `f64`), kept as a reference.
    Faer,
}

/// Half-bandwidth of the intermediate band: wide enough for efficient GEMM in stage 1, narrow
/// enough that the `6bn²` flops of the chase stay small.
fn bandwidth(n: usize) -> usize {
    32.min(n.saturating_sub(1)).max(1)
}

/// A symmetric tridiagonal matrix: diagonal `d`, subdiagonal `e`.
pub(crate) struct Tridiagonal {
    pub d: Vec<f64>,
    pub e: Vec<f64>,
}

impl Tridiagonal {
    /// All eigenvalues, descending.
    pub(crate) fn eigenvalues_descending(&self) -> Result<Vec<f64>> {
        let mut ev = tridiagonal::all_eigenvalues(&self.d, &self.e).ok_or_else(|| {
            RmtError::NoConvergence {
                method: "tridiagonal QL/QR (dsterf)",
                detail: format!("no convergence in {} sweeps", 30 * self.d.len()),
            }
        })?;
        ev.reverse();
        Ok(ev)
    }

    /// The eigenvalues above `threshold`, descending, and λ₁ — by Sturm bisection.
    pub(crate) fn eigenvalues_above(&self, threshold: f64) -> (Vec<f64>, f64) {
        tridiagonal::eigenvalues_above(&self.d, &self.e, threshold)
    }
}

/// Whether the CPU has AVX2 and FMA (`is_x86_feature_detected!` caches the answer). The
/// eigenvalue stages dispatch to copies of themselves compiled for them: their own short
/// loops ran ≈ 3× slower in baseline x86-64 code on a Zen 5 (docs/performance.md). Rust
/// never contracts `a·b + c` into an FMA, so both copies give bit-identical results.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Reduces the symmetric matrix whose lower triangle is `a` to an orthogonally similar
/// tridiagonal matrix (two-stage, in `T`'s precision).
pub(crate) fn tridiagonalize<T: Element>(a: MatRef<'_, T>) -> Tridiagonal {
    let n = a.nrows();
    if n < TWO_STAGE_MIN {
        return tridiagonalize_one_stage(a);
    }
    let b = bandwidth(n);
    let mut work = a.to_owned();
    band::reduce_to_band(work.as_mut(), b);
    let band = bulge::Band::from_lower(work.as_ref(), b);
    drop(work);
    let (d, e) = band.tridiagonalize();
    Tridiagonal { d, e }
}

/// Below this size faer's one-stage Householder tridiagonalisation (sequential) is as fast
/// or faster, and leaves the other cores free. `bench eigen`, f64, on the Zen 5 (2026-12-02,
/// fourth session, two runs each, one-stage sequential vs two-stage): n = 512 12.8–13.5 vs
/// 17.6–17.9 ms, 640 22.3 vs 25.1–28.7, 768 35.0–36.5 vs 33.9–38.0, 896 55.8–56.1 vs
/// 54.8–61.8, 1024 73.2–77.7 vs 76.5–80.6, 1536 257–280 vs 203–218 ms. `bench diagnose`,
/// f32, 768: one layer 25.5–27.9 vs 25.3–26.4 ms, twelve layers in parallel 174–177 vs
/// 186–191 ms. (On the 2026-12-01 Xeon, with faer's parallel one-stage, the crossing was
/// at 512.)
const TWO_STAGE_MIN: usize = 1024;

/// faer's one-stage (blocked Householder) tridiagonalisation, on the calling thread: on two
/// cores faer's parallel version was slower below n = 512 (n = 384: 7.3–10.0 ms against
/// 5.3–6.2 sequential, Zen 5) and no faster above.
fn tridiagonalize_one_stage<T: Element>(a: MatRef<'_, T>) -> Tridiagonal {
    use faer::linalg::evd::tridiag;
    let n = a.nrows();
    if n == 0 {
        return Tridiagonal {
            d: vec![],
            e: vec![],
        };
    }
    let mut t = a.to_owned();
    let par = faer::Par::Seq;
    let params = Default::default();
    let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<T>(n, n);
    let mut householder = faer::Mat::<T>::zeros(bs, n.saturating_sub(1));
    let mut mem =
        faer::dyn_stack::MemBuffer::new(tridiag::tridiag_in_place_scratch::<T>(n, par, params));
    tridiag::tridiag_in_place(
        t.as_mut(),
        householder.as_mut(),
        par,
        faer::dyn_stack::MemStack::new(&mut mem),
        params,
    );
    Tridiagonal {
        d: (0..n).map(|i| t[(i, i)].to_f64()).collect(),
        e: (0..n - 1).map(|i| t[(i + 1, i)].to_f64()).collect(),
    }
}

/// Eigenvalues of the symmetric matrix whose lower triangle is `a`, in descending order.
/// No input checks (callers validate).
pub(crate) fn eigenvalues_descending<T: Element>(
    a: MatRef<'_, T>,
    solver: EigenSolver,
) -> Result<Vec<f64>> {
    match solver {
        EigenSolver::TwoStage => tridiagonalize(a).eigenvalues_descending(),
        EigenSolver::Faer => {
            let a64 = crate::linalg::to_f64_mat(a);
            let mut ev = a64
                .self_adjoint_eigenvalues(faer::Side::Lower)
                .map_err(|e| RmtError::NoConvergence {
                    method: "faer self_adjoint_eigenvalues",
                    detail: format!("{e:?}"),
                })?;
            ev.sort_by(|x, y| y.total_cmp(x));
            Ok(ev)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn random_symmetric(n: usize, seed: u64) -> Mat<f64> {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        let x = Mat::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
        Mat::from_fn(n, n, |i, j| x[(i, j)] + x[(j, i)])
    }

    /// The two-stage solver agrees with faer's one-stage solver to a few ulps of ‖A‖ across
    /// sizes around the bandwidth, odd sizes, and bandwidths that do and do not divide n.
    #[test]
    fn two_stage_matches_one_stage() {
        for (n, b) in [
            (3, 2),
            (10, 4),
            (33, 8),
            (64, 16),
            (100, 32),
            (257, 32),
            (300, 48),
            (411, 17),
        ] {
            let a = random_symmetric(n, n as u64);
            let mut reference = a.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
            reference.sort_by(|x, y| y.total_cmp(x));
            let mut got = two_stage(a.as_ref(), b);
            got.sort_by(|x, y| y.total_cmp(x));
            let scale = reference[0].abs().max(reference[n - 1].abs());
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    (g - r).abs() <= 1e-12 * scale * (n as f64).sqrt(),
                    "n={n} b={b}: {g} vs {r}"
                );
            }
        }
    }

    fn two_stage<T: Element>(a: faer::MatRef<'_, T>, b: usize) -> Vec<f64> {
        let mut work = a.to_owned();
        band::reduce_to_band(work.as_mut(), b);
        let (d, e) = bulge::Band::from_lower(work.as_ref(), b).tridiagonalize();
        Tridiagonal { d, e }.eigenvalues_descending().unwrap()
    }

    #[test]
    fn f32_reduction_is_accurate_to_single_precision() {
        let a = random_symmetric(300, 3);
        let a32 = Mat::<f32>::from_fn(300, 300, |i, j| a[(i, j)] as f32);
        let reference = eigenvalues_descending(a.as_ref(), EigenSolver::Faer).unwrap();
        // The two-stage path explicitly (at n = 300 the default dispatch picks one-stage).
        let got = two_stage(a32.as_ref(), 32);
        // Backward stable in f32: errors ≈ √n·ε₃₂·‖A‖ ≈ 1e-6‖A‖.
        for (g, r) in got.iter().zip(&reference) {
            assert!((g - r).abs() < 2e-5 * reference[0].abs(), "{g} vs {r}");
        }
    }

    #[test]
    fn structured_matrices() {
        // Diagonal, already tridiagonal, rank one, zero.
        let n = 200;
        let diag = Mat::<f64>::from_fn(n, n, |i, j| if i == j { i as f64 } else { 0.0 });
        let mut ev = two_stage(diag.as_ref(), 32);
        ev.sort_by(|x, y| x.total_cmp(y));
        for (i, e) in ev.iter().enumerate() {
            assert!((e - i as f64).abs() < 1e-12);
        }
        let ones = Mat::<f64>::from_fn(n, n, |_, _| 1.0);
        let ev = two_stage(ones.as_ref(), 32);
        let top = ev.iter().cloned().fold(f64::MIN, f64::max);
        assert!((top - n as f64).abs() < 1e-10);
        assert!(ev.iter().filter(|e| e.abs() > 1e-10).count() == 1);
        let zero = Mat::<f64>::zeros(n, n);
        assert!(two_stage(zero.as_ref(), 32).iter().all(|e| *e == 0.0));
        // Tiny sizes.
        for n in 1..6 {
            let a = random_symmetric(n, 40 + n as u64);
            let got = eigenvalues_descending(a.as_ref(), EigenSolver::TwoStage).unwrap();
            let reference = eigenvalues_descending(a.as_ref(), EigenSolver::Faer).unwrap();
            for (g, r) in got.iter().zip(&reference) {
                assert!((g - r).abs() < 1e-12 * (1.0 + r.abs()), "n={n}");
            }
        }
    }
}
