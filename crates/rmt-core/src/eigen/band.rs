//! Stage 1 of the two-stage reduction: dense symmetric → symmetric band of half-bandwidth
//! `b`, by blocked Householder QR of each panel and a two-sided update of the trailing
//! matrix made entirely of matrix–matrix products (LAPACK's `dsytrd_sy2sb`).
//!
//! For the panel `P = A[j+b.., j..j+b] = Q R` with `Q = I − V T Vᵀ` (compact WY), the trailing
//! matrix becomes `QᵀA₂₂Q = A₂₂ − V Wᵀ − W Vᵀ` with `X = A₂₂ V T` and
//! `W = X − ½ V (Tᵀ Vᵀ X)`. Only the lower triangle of `A₂₂` is read: `(A₂₂V)ᵀ = VᵀA₂₂` is GEMMs and
//! triangular products over column blocks, the update one triangular rank-2b product. With look-ahead: the next
//! panel's columns are updated first, and its QR runs on one rayon worker while the other
//! updates the rest (measured on the Zen 5, 2 threads, f32 n = 768: 5.2–6.3 ms against
//! 6.0–6.7 ms without; f64 n = 2048 113–135 against 118–136 ms).

use crate::linalg::{Element, GEMM_BLOCK, column, column_mut, lower_product, lower_product_cut};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{BlockStructure, matmul as tri_matmul};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Householder reflector `H = I − τ v vᵀ` (`v₀ = 1`) with `H x = β e₁` (LAPACK `dlarfg`).
/// Returns `(τ, β)` and overwrites `x[1..]` with `v[1..]`.
#[inline(always)]
pub(crate) fn householder<T: Element>(x: &mut [T]) -> (T, T) {
    let alpha = x[0];
    let tail = dot(&x[1..], &x[1..]);
    if tail == T::ZERO {
        return (T::ZERO, alpha);
    }
    let norm = (alpha * alpha + tail).square_root();
    let beta = if alpha >= T::ZERO { -norm } else { norm };
    let tau = (beta - alpha) / beta;
    let scale = T::ONE / (alpha - beta);
    for v in &mut x[1..] {
        *v *= scale;
    }
    x[0] = T::ONE;
    (tau, beta)
}

/// Reduces the symmetric matrix whose lower triangle is `a` (overwritten) to lower band form
/// with half-bandwidth `b`: afterwards `a[i, j]` for `0 ≤ i − j ≤ b` holds the band of a
/// matrix orthogonally similar to the input. Entries below the band, and above the
/// diagonal, are garbage. `a` is column-major (unit row stride, as every owned `Mat`): the
/// panels are copied in and out as column slices. Compiled for AVX2 + FMA where the CPU has
/// them ([`super::has_avx2_fma`]).
pub(crate) fn reduce_to_band<T: Element>(a: MatMut<'_, T>, b: usize) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has the features (checked).
        return unsafe { reduce_to_band_avx2(a, b) };
    }
    reduce_to_band_body(a, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn reduce_to_band_avx2<T: Element>(a: MatMut<'_, T>, b: usize) {
    reduce_to_band_body(a, b);
}

#[inline(always)]
fn reduce_to_band_body<T: Element>(mut a: MatMut<'_, T>, b: usize) {
    let n = a.nrows();
    if n < b + 2 {
        return; // already a band
    }
    // Look-ahead: the next panel's columns are updated first and factored on one worker
    // while the other updates the rest of the trailing matrix, so the panel QR (level-2
    // work, ≈ 20 % of the stage) leaves the critical path.
    let mut factored = factor_panel(a.rb_mut().submatrix_mut(b, 0, n - b, b));
    let mut j = 0;
    loop {
        let Panel { v, t } = factored;
        let k = n - j - b;
        let nb = v.ncols();
        let mut a22 = a.rb_mut().submatrix_mut(j + b, j + b, k, k);
        // Yᵀ = (A₂₂ V)ᵀ with A₂₂ = L + L_strictᵀ (lower storage).
        let yt = symmetric_times_transposed(a22.rb(), v.as_ref());
        // X = A₂₂ V T, then W = X − ½ V (Tᵀ Vᵀ X) in place: small products, sequential
        // (rayon's hand-offs cost more than they save at these sizes).
        let seq = Par::Seq;
        let mut w = Mat::<T>::zeros(k, nb);
        matmul(
            w.as_mut(),
            Accum::Replace,
            yt.transpose(),
            t.as_ref(),
            T::ONE,
            seq,
        );
        let mut s = Mat::<T>::zeros(nb, nb);
        matmul(
            s.as_mut(),
            Accum::Replace,
            v.transpose(),
            w.as_ref(),
            T::ONE,
            seq,
        );
        let mut u = Mat::<T>::zeros(nb, nb);
        matmul(
            u.as_mut(),
            Accum::Replace,
            t.transpose(),
            s.as_ref(),
            T::ONE,
            seq,
        );
        matmul(
            w.as_mut(),
            Accum::Add,
            v.as_ref(),
            u.as_ref(),
            T::from_f64(-0.5),
            seq,
        );
        // A₂₂ ← A₂₂ − [V W]·[W V]ᵀ on the lower triangle: one rank-2nb product.
        let mut lhs = Mat::<T>::zeros(k, 2 * nb);
        lhs.as_mut().subcols_mut(0, nb).copy_from(&v);
        lhs.as_mut().subcols_mut(nb, nb).copy_from(&w);
        let mut rhs = Mat::<T>::zeros(k, 2 * nb);
        rhs.as_mut().subcols_mut(0, nb).copy_from(&w);
        rhs.as_mut().subcols_mut(nb, nb).copy_from(&v);
        if k < b + 2 {
            // The last panel: nothing to look ahead to.
            lower_product(
                a22.rb_mut(),
                Accum::Add,
                lhs.as_ref(),
                rhs.as_ref(),
                -T::ONE,
            );
            return;
        }
        // The next panel's b columns (all k rows: above the diagonal they are garbage,
        // never read), then its QR beside the rest of the update.
        let (mut next, rest) = a22.split_at_col_mut(b);
        matmul(
            next.rb_mut(),
            Accum::Add,
            lhs.as_ref(),
            rhs.subrows(0, b).transpose(),
            -T::ONE,
            seq,
        );
        let rows = k - b;
        let (panel, ()) = rayon::join(
            || factor_panel(next.subrows_mut(b, rows)),
            || {
                lower_product(
                    rest.subrows_mut(b, rows),
                    Accum::Add,
                    lhs.subrows(b, rows),
                    rhs.subrows(b, rows),
                    -T::ONE,
                )
            },
        );
        factored = panel;
        j += b;
    }
}

/// The compact-WY form `Q = I − V T Vᵀ` of a panel's QR.
struct Panel<T> {
    /// `k × nb`, unit lower trapezoidal.
    v: Mat<T>,
    /// `nb × nb`, upper triangular.
    t: Mat<T>,
}

/// QR of the `k × b` panel `P` (column-major): overwrites `P` with `R` (upper trapezoid,
/// zeros below; `R`'s diagonal is the band's last subdiagonal) and returns `Q = I − V T Vᵀ`.
/// Unblocked Householder on a contiguous copy, then `T` by `dlarft`. Compiled for AVX2 +
/// FMA where the CPU has them (it runs on a worker of its own, outside the stage's copy).
fn factor_panel<T: Element>(p: MatMut<'_, T>) -> Panel<T> {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has the features (checked).
        return unsafe { factor_panel_avx2(p) };
    }
    factor_panel_body(p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn factor_panel_avx2<T: Element>(p: MatMut<'_, T>) -> Panel<T> {
    factor_panel_body(p)
}

#[inline(always)]
fn factor_panel_body<T: Element>(mut p: MatMut<'_, T>) -> Panel<T> {
    let (k, b) = (p.nrows(), p.ncols());
    let nb = b.min(k);
    let mut panel = vec![T::ZERO; k * b];
    for (c, dst) in panel.chunks_exact_mut(k).enumerate() {
        dst.copy_from_slice(column(p.rb(), c).expect("column-major"));
    }
    let mut taus = vec![T::ZERO; nb];
    for c in 0..nb {
        let (head, rest) = panel.split_at_mut((c + 1) * k);
        let x = &mut head[c * k + c..];
        let (tau, beta) = householder(x);
        taus[c] = tau;
        if tau != T::ZERO {
            // Apply H = I − τ v vᵀ to the remaining columns (rows c..k).
            for col in rest.chunks_exact_mut(k) {
                let y = &mut col[c..];
                let s = tau * dot(x, y);
                axpy(-s, x, y);
            }
        }
        x[0] = beta; // R's diagonal; v₀ = 1 is implicit from here on
    }
    // V (k × nb, unit lower trapezoidal) and T (nb × nb upper triangular, dlarft).
    let mut v = Mat::<T>::zeros(k, nb);
    for c in 0..nb {
        let dst = column_mut(v.as_mut(), c).expect("owned");
        dst[c] = T::ONE;
        dst[c + 1..].copy_from_slice(&panel[c * k + c + 1..(c + 1) * k]);
    }
    // dlarft: T[0..c, c] = −τ_c · T[0..c, 0..c] · (V[:, 0..c]ᵀ v_c), with all the inner
    // products VᵀV from one GEMM.
    let mut vtv = Mat::<T>::zeros(nb, nb);
    matmul(
        vtv.as_mut(),
        Accum::Replace,
        v.transpose(),
        v.as_ref(),
        T::ONE,
        Par::Seq,
    );
    let mut t = Mat::<T>::zeros(nb, nb);
    for c in 0..nb {
        t[(c, c)] = taus[c];
        if c > 0 && taus[c] != T::ZERO {
            for r in 0..c {
                let mut s = T::ZERO;
                for q in r..c {
                    s += t[(r, q)] * vtv[(q, c)];
                }
                t[(r, c)] = -taus[c] * s;
            }
        }
    }
    // Write R back (upper trapezoid of the panel); below it the band is zero.
    for (c, src) in panel.chunks_exact(k).enumerate() {
        let dst = column_mut(p.rb_mut(), c).expect("column-major");
        let r = (c + 1).min(k);
        dst[..r].copy_from_slice(&src[..r]);
        dst[r..].fill(T::ZERO);
    }
    Panel { v, t }
}

/// `Yᵀ = (A V)ᵀ = VᵀA` (`nb × k`) for the symmetric `A` (`k × k`) whose lower triangle is
/// stored, `A = L + L̊ᵀ` (the upper triangle is not read). Each column block `J` of `L` is
/// read by one rayon worker, which adds both of its contributions while the block is in
/// cache: `Yᵀ[:, J] += Vᵀ[:, J..]·L[J.., J]` and `Yᵀ[:, after J] += Vᵀ[:, J]·L[after J, J]ᵀ`
/// (with the diagonal block's strict part), as sequential GEMMs; the blocks are cut into two
/// runs of equal area where [`lower_product`] cuts its columns, one per worker, and the
/// workers' sums added. (Splitting by contribution instead, each worker reading the whole
/// triangle, took stage 1 of a 2048² `f64` reduction 195–211 ms against 158–180 ms this way
/// on an Intel Xeon, 2 cores; at 4096 1 220–1 269 against 1 154–1 189 ms.) Written as `VᵀA` the products have `A`'s blocks on
/// the wide side, where faer's kernels run well; as `AV` (output `nb = 32` columns wide) the
/// same blocks ran 1.3–1.6× slower (Zen 5, 2 cores, `k = 2048` `f64`: 2.3–2.9 ms against
/// 3.5–4.6; `k = 1024` 0.58–1.04 against 0.75–1.21).
fn symmetric_times_transposed<T: Element>(a: MatRef<'_, T>, v: MatRef<'_, T>) -> Mat<T> {
    let (k, nb) = (v.nrows(), v.ncols());
    let vt = v.transpose();
    // The first worker takes the (taller) leading blocks, up to the column that halves the
    // triangle's area, rounded up to a whole block.
    let cut = (lower_product_cut(k).div_ceil(GEMM_BLOCK) * GEMM_BLOCK).min(k);
    let seq = Par::Seq;
    let run = |columns: std::ops::Range<usize>| -> Mat<T> {
        let mut yt = Mat::<T>::zeros(nb, k);
        for j0 in columns.step_by(GEMM_BLOCK) {
            let j1 = (j0 + GEMM_BLOCK).min(k);
            let w = j1 - j0;
            // Yᵀ[:, J] += Vᵀ[:, J]·(tril(A[J, J]) + strict_tril(A[J, J])ᵀ)
            let diagonal = a.submatrix(j0, j0, w, w);
            for (block, structure) in [
                (diagonal, BlockStructure::TriangularLower),
                (diagonal.transpose(), BlockStructure::StrictTriangularUpper),
            ] {
                tri_matmul(
                    yt.as_mut().subcols_mut(j0, w),
                    BlockStructure::Rectangular,
                    Accum::Add,
                    vt.subcols(j0, w),
                    BlockStructure::Rectangular,
                    block,
                    structure,
                    T::ONE,
                    seq,
                );
            }
            if j1 < k {
                // Yᵀ[:, J] += Vᵀ[:, j₁..]·A[j₁.., J], Yᵀ[:, j₁..] += Vᵀ[:, J]·A[j₁.., J]ᵀ
                let below = a.submatrix(j1, j0, k - j1, w);
                matmul(
                    yt.as_mut().subcols_mut(j0, w),
                    Accum::Add,
                    vt.subcols(j1, k - j1),
                    below,
                    T::ONE,
                    seq,
                );
                matmul(
                    yt.as_mut().subcols_mut(j1, k - j1),
                    Accum::Add,
                    vt.subcols(j0, w),
                    below.transpose(),
                    T::ONE,
                    seq,
                );
            }
        }
        yt
    };
    let (first, second) = rayon::join(|| run(0..cut), || run(cut..k));
    first + second
}

/// `Σ xᵢyᵢ` with eight accumulators (lets LLVM vectorise the reduction).
#[inline(always)]
pub(crate) fn dot<T: Element>(x: &[T], y: &[T]) -> T {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [T::ZERO; 8];
    let mut xc = x.chunks_exact(8);
    let mut yc = y.chunks_exact(8);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut tail = T::ZERO;
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        tail += *a * *b;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}

/// `y += α x`.
#[inline(always)]
pub(crate) fn axpy<T: Element>(alpha: T, x: &[T], y: &mut [T]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * *xi;
    }
}
