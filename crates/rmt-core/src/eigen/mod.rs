//! Symmetric eigenvalue solvers (eigenvalues only).
//!
//! [`EigenSolver::TwoStage`], the default, works in the input's precision (`f32` or `f64`)
//! and reduces the matrix to tridiagonal form in one of two ways. Up to
//! `ONE_STAGE_MAX_BYTES` (24 MiB: `f64` n ≤ 1773, `f32` n ≤ 2508): the one-stage Householder
//! reduction of LAPACK's `dsytd2` (`householder`), whose fused pass over the trailing
//! triangle is bound by cache bandwidth and is split between two cores. Above: two stages,
//! reducing the matrix to a band of half-bandwidth `b = 32` with matrix–matrix products
//! only (`band`), then chasing the band down to tridiagonal form (`bulge`: each sweep split
//! between two cores, pipelined), which moves the bandwidth-bound half of the flops into
//! GEMM and keeps the `O(n²b)` chase in cache. The tridiagonal eigenvalues are found in
//! `f64` with the Pal–Walker–Kahan QL/QR iteration, or only those above a threshold by Sturm
//! bisection (`tridiagonal`). [`EigenSolver::Faer`] is faer 0.24's solver, kept as a
//! reference. `cargo xtask bench eigen` measures both against LAPACK
//! (docs/performance.md).

mod band;
mod bulge;
mod householder;
mod tridiagonal;

use crate::error::{Result, RmtError};
use crate::linalg::{Element, release_scratch, take_scratch};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

/// Which algorithm computes a full symmetric spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EigenSolver {
    /// The project's solver: Householder reduction to tridiagonal form in the input's
    /// precision (one-stage on up to two cores while the matrix takes at most 24 MiB: `f64`
    /// n ≤ 1773, `f32` n ≤ 2508; two-stage, dense → band → tridiagonal, above), then the
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

/// Whether the CPU has AVX-512F (cached by `is_x86_feature_detected!`): the one-stage
/// reduction's pass then runs its AVX-512 column kernel, with masked heads and tails.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Whether a second core is free for this call: outside rayon's workers (inside them, as in
/// the probe's pool or `diagnose`'s layers, every core already runs a job) and with at least
/// two threads in rayon's pool (so `RAYON_NUM_THREADS=1` means one here too).
pub(crate) fn second_core_free() -> bool {
    rayon::current_thread_index().is_none() && rayon::current_num_threads() >= 2
}

/// Reduces the symmetric matrix whose lower triangle is `a` to an orthogonally similar
/// tridiagonal matrix, in `T`'s precision: one-stage ([`householder`], on two cores when a
/// second one is free) up to [`ONE_STAGE_MAX_BYTES`], two-stage above. The choice depends
/// on the size alone, so a layer gets the same bits whether it is diagnosed alone or beside
/// others.
pub(crate) fn tridiagonalize<T: Element>(a: MatRef<'_, T>) -> Tridiagonal {
    let n = a.nrows();
    let mut copy = take_scratch::<T>(n, n);
    copy.as_mut().copy_from_triangular_lower(a);
    tridiagonalize_owned(copy)
}

/// [`tridiagonalize`] of a matrix the caller gives up (lower triangle read): reduced in
/// place, without the copy.
pub(crate) fn tridiagonalize_owned<T: Element>(a: Mat<T>) -> Tridiagonal {
    if one_stage::<T>(a.nrows()) {
        householder::tridiagonalize(a, second_core_free())
    } else {
        two_stage(a)
    }
}

/// Whether an `n × n` matrix of `T` is reduced in one stage ([`ONE_STAGE_MAX_BYTES`]).
fn one_stage<T>(n: usize) -> bool {
    n * n * std::mem::size_of::<T>() <= ONE_STAGE_MAX_BYTES
}

/// Dense → band → tridiagonal, in place in `work`.
fn two_stage<T: Element>(mut work: Mat<T>) -> Tridiagonal {
    let b = bandwidth(work.nrows());
    band::reduce_to_band(work.as_mut(), b);
    let band = bulge::Band::from_lower(work.as_ref(), b);
    release_scratch(work);
    let (d, e) = band.tridiagonalize();
    Tridiagonal { d, e }
}

/// The largest matrix reduced in one stage, 24 MiB (`f64` n ≤ 1773, `f32` n ≤ 2508): each
/// step's pass streams the trailing triangle, fast while the matrix stays in the last-level
/// cache (32 MiB on the Zen 5) and memory-bound beyond it. A throwaway harness timing the
/// tridiagonalisation alone, one-stage on two cores vs two-stage (2026-12-03, medians of 21
/// up to n = 1536, of 7 above): f64 n = 1024 18.7 vs 32.6 ms, 1536 69 vs 85, 1792 115 vs 111,
/// 2048 197–202 vs 171–185, 2560 1054 vs 360; f32 1536 40 vs 47, 2048 78–93 vs 82–101, 2560
/// 188 vs 205, 3072 377 vs 319.
const ONE_STAGE_MAX_BYTES: usize = 24 << 20;

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
    use householder::ColumnKernel;
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

    fn one_stage<T: Element>(a: faer::MatRef<'_, T>, two_cores: bool) -> Vec<f64> {
        one_stage_with(a, two_cores, ColumnKernel::Fastest)
    }

    fn one_stage_with<T: Element>(
        a: faer::MatRef<'_, T>,
        two_cores: bool,
        kernel: ColumnKernel,
    ) -> Vec<f64> {
        householder::tridiagonalize_with(a.to_owned(), two_cores, kernel)
            .eigenvalues_descending()
            .unwrap()
    }

    /// Every column kernel: AVX-512 with masked heads and tails where the CPU has it, the
    /// portable one on pulp's widest vectors, and the portable one on AVX2.
    const KERNELS: [ColumnKernel; 3] = [
        ColumnKernel::Fastest,
        ColumnKernel::Portable,
        ColumnKernel::Avx2,
    ];

    /// The project's one-stage reduction agrees with faer's solver to a few ulps of ‖A‖,
    /// on one core and on two, with either column kernel, across sizes around the split
    /// threshold and odd sizes (so columns start at every offset from a vector boundary).
    #[test]
    fn one_stage_matches_faer() {
        for n in [1, 2, 3, 5, 17, 97, 98, 99, 100, 130, 257, 300] {
            let a = random_symmetric(n, 100 + n as u64);
            let reference = eigenvalues_descending(a.as_ref(), EigenSolver::Faer).unwrap();
            let scale = reference[0].abs().max(reference[n - 1].abs());
            for two_cores in [false, true] {
                for kernel in KERNELS {
                    let got = one_stage_with(a.as_ref(), two_cores, kernel);
                    for (g, r) in got.iter().zip(&reference) {
                        // Backward stable: |Δλ| ≤ c·n·ε·‖A‖ (Wilkinson); c·n ≤ √n·10 here.
                        assert!(
                            (g - r).abs() <= 1e-14 * scale * (n as f64).sqrt() * 10.0,
                            "n={n} two_cores={two_cores} {kernel:?}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    /// A matrix given up is reduced in place with the bits of a copy's reduction, and only
    /// its lower triangle is read (NaN above the diagonal), on both paths.
    #[test]
    fn owned_reduction_reads_the_lower_triangle_in_place() {
        fn check<T: Element>(a: Mat<T>) {
            let n = a.nrows();
            let mut junk = a.clone();
            for j in 0..n {
                for i in 0..j {
                    junk[(i, j)] = T::from_f64(f64::NAN);
                }
            }
            let copy = tridiagonalize(a.as_ref());
            let owned = tridiagonalize_owned(junk.clone());
            assert_eq!((copy.d, copy.e), (owned.d, owned.e), "n = {n}");
            let two = super::two_stage(junk);
            assert!(two.d.iter().chain(&two.e).all(|x| x.is_finite()));
        }
        for n in [5, 100, 300] {
            let a = random_symmetric(n, 11);
            check(Mat::<f32>::from_fn(n, n, |i, j| a[(i, j)] as f32));
            check(a);
        }
    }

    /// Splitting the pass between two cores performs the same operations on the same values:
    /// bit-identical tridiagonal matrices, in both precisions.
    #[test]
    fn one_stage_schedules_are_bit_identical() {
        let a = random_symmetric(300, 5);
        let a32 = Mat::<f32>::from_fn(300, 300, |i, j| a[(i, j)] as f32);
        for kernel in KERNELS {
            let one = householder::tridiagonalize_with(a.clone(), false, kernel);
            let two = householder::tridiagonalize_with(a.clone(), true, kernel);
            assert_eq!((one.d, one.e), (two.d, two.e), "{kernel:?}");
            let one = householder::tridiagonalize_with(a32.clone(), false, kernel);
            let two = householder::tridiagonalize_with(a32.clone(), true, kernel);
            assert_eq!((one.d, one.e), (two.d, two.e), "{kernel:?}");
        }
    }

    #[test]
    fn one_stage_f32_is_accurate_to_single_precision() {
        let a = random_symmetric(300, 3);
        let a32 = Mat::<f32>::from_fn(300, 300, |i, j| a[(i, j)] as f32);
        let reference = eigenvalues_descending(a.as_ref(), EigenSolver::Faer).unwrap();
        // Backward stable in f32: errors ≈ √n·ε₃₂·‖A‖ ≈ 1e-6‖A‖.
        for kernel in KERNELS {
            for (g, r) in one_stage_with(a32.as_ref(), true, kernel)
                .iter()
                .zip(&reference)
            {
                assert!(
                    (g - r).abs() < 2e-5 * reference[0].abs(),
                    "{kernel:?}: {g} vs {r}"
                );
            }
        }
    }

    /// Columns that are already reduced (identity reflectors), rank one, zero, and entries
    /// whose squares overflow or underflow `f64` (the reflector's norm is scaled).
    #[test]
    fn one_stage_structured_and_extreme_matrices() {
        let n = 150;
        let diag = Mat::<f64>::from_fn(n, n, |i, j| if i == j { i as f64 } else { 0.0 });
        let mut ev = one_stage(diag.as_ref(), true);
        ev.reverse();
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(*e, i as f64);
        }
        let ones = Mat::<f64>::from_fn(n, n, |_, _| 1.0);
        let ev = one_stage(ones.as_ref(), true);
        // Backward error ≈ n·ε·‖A‖ = 150 · 2.2e-16 · 150 ≈ 5e-12.
        assert!((ev[0] - n as f64).abs() < 1e-10);
        assert!(ev[1..].iter().all(|e| e.abs() < 1e-10));
        let zero = Mat::<f64>::zeros(n, n);
        assert!(one_stage(zero.as_ref(), true).iter().all(|e| *e == 0.0));
        let a = random_symmetric(n, 9);
        let reference = one_stage(a.as_ref(), false);
        for scale in [1e200, 1e-200] {
            let scaled = Mat::<f64>::from_fn(n, n, |i, j| a[(i, j)] * scale);
            for (g, r) in one_stage(scaled.as_ref(), true).iter().zip(&reference) {
                assert!(
                    (g / scale - r).abs() < 1e-12 * reference[0],
                    "{scale}: {g} vs {r}"
                );
            }
        }
    }
}
