//! Dense kernels shared by the crate: precision trait, nalgebra ↔ faer views, products,
//! Gram matrices, inertia.
//!
//! nalgebra is the public type (`DMatrix`, strided [`MatrixView`]); faer does the work
//! (its GEMM is multithreaded through rayon and dispatches on the CPU's SIMD width at run
//! time). Views are converted without copying.

use crate::error::{Result, RmtError};
use faer::reborrow::{IntoConst, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use nalgebra::{DMatrix, Dyn};

/// A borrowed dense matrix with arbitrary row and column strides.
///
/// Build one from a [`DMatrix`] with [`view`], or from a row-major buffer (PyTorch's
/// `Linear.weight`, a safetensors tensor) with [`row_major_view`], without copying.
pub type MatrixView<'a, T> = nalgebra::MatrixView<'a, T, Dyn, Dyn, Dyn, Dyn>;

/// Floating-point element types the crate computes with: `f32` and `f64`.
///
/// Products (`M = QKᵀ`, `G = MMᵀ/d`) are formed in the input's precision; every spectral
/// computation after that (eigenvalues, sums, statistics) is carried out in `f64`.
pub trait Element:
    faer::traits::RealField
    + nalgebra::Scalar
    + Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Widens (or keeps) the value as `f64`.
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type.
    fn from_f64(x: f64) -> Self;
    /// `|x|`.
    fn abs_value(self) -> Self;
    /// `√x`.
    fn square_root(self) -> Self;
    /// `self·a + b`. `f32` and `f64` round once (a fused multiply–add, which Rust never
    /// forms from `a·b + c` by itself); the default rounds twice.
    #[inline(always)]
    fn fused_mul_add(self, a: Self, b: Self) -> Self {
        self * a + b
    }
}

macro_rules! element {
    ($t:ty) => {
        impl Element for $t {
            const NAME: &'static str = stringify!($t);
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn abs_value(self) -> Self {
                self.abs()
            }
            #[inline]
            fn square_root(self) -> Self {
                self.sqrt()
            }
            #[inline(always)]
            fn fused_mul_add(self, a: Self, b: Self) -> Self {
                self.mul_add(a, b)
            }
        }
    };
}

element!(f32);
element!(f64);

/// A strided view of a whole [`DMatrix`].
pub fn view<T: nalgebra::Scalar>(m: &DMatrix<T>) -> MatrixView<'_, T> {
    let (rows, cols) = m.shape();
    if rows == 0 || cols == 0 {
        // nalgebra's constructor checks the buffer against the last element's offset, which
        // an empty matrix does not have: view a 0×0 slice with its shape.
        return empty_view(rows, cols);
    }
    // Column-major: element (i, j) at i + j·rows.
    nalgebra::MatrixView::from_slice_with_strides_generic(
        m.as_slice(),
        Dyn(rows),
        Dyn(cols),
        Dyn(1),
        Dyn(rows),
    )
}

/// A strided view of a row-major `rows × cols` buffer (element `(i, j)` at `i·cols + j`).
///
/// # Errors
/// [`RmtError::ShapeMismatch`] if `data.len() != rows·cols`.
///
/// # Example
/// ```
/// let w = [1.0_f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2×3, row-major
/// let v = rmt_core::linalg::row_major_view(&w, 2, 3).unwrap();
/// assert_eq!(v[(1, 0)], 4.0);
/// ```
pub fn row_major_view<T: nalgebra::Scalar>(
    data: &[T],
    rows: usize,
    cols: usize,
) -> Result<MatrixView<'_, T>> {
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(RmtError::ShapeMismatch {
            context: "row_major_view",
            detail: format!("{} values cannot form a {rows}×{cols} matrix", data.len()),
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(empty_view(rows, cols));
    }
    Ok(nalgebra::MatrixView::from_slice_with_strides_generic(
        data,
        Dyn(rows),
        Dyn(cols),
        Dyn(cols),
        Dyn(1),
    ))
}

/// A view with a zero dimension. Strides chosen to satisfy nalgebra's bound check
/// `len + rs + cs ≥ rows·rs + cols·cs + 1` with `len = 0`.
fn empty_view<'a, T: nalgebra::Scalar>(rows: usize, cols: usize) -> MatrixView<'a, T> {
    let (rs, cs) = if rows == 0 { (1, 0) } else { (0, 1) };
    nalgebra::MatrixView::from_slice_with_strides_generic(
        &[],
        Dyn(rows),
        Dyn(cols),
        Dyn(rs),
        Dyn(cs),
    )
}

/// The faer view of a nalgebra view (no copy).
pub(crate) fn as_faer<'a, T: Element>(m: &MatrixView<'a, T>) -> MatRef<'a, T> {
    let (rows, cols) = m.shape();
    let (rs, cs) = m.strides();
    // SAFETY: nalgebra guarantees that every (i, j) < (rows, cols) addresses
    // ptr + i·rs + j·cs inside the borrowed slice, for the lifetime 'a.
    unsafe { MatRef::from_raw_parts(m.as_ptr(), rows, cols, rs as isize, cs as isize) }
}

/// The faer view of a `DMatrix` (no copy).
pub(crate) fn dmatrix_as_faer<T: Element>(m: &DMatrix<T>) -> MatRef<'_, T> {
    as_faer(&view(m))
}

/// Copies a faer matrix into a nalgebra `DMatrix`.
pub(crate) fn to_dmatrix<T: Element>(m: MatRef<'_, T>) -> DMatrix<T> {
    DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)])
}

/// The parallelism used for dense kernels: rayon's global pool.
pub(crate) fn par() -> Par {
    Par::rayon(0)
}

/// [`RmtError::Empty`] for a matrix without rows or columns: the shape half of
/// [`check_matrix`], for callers that check the entries another way.
pub(crate) fn check_non_empty<T>(what: &'static str, m: MatRef<'_, T>) -> Result<()> {
    if m.nrows() == 0 || m.ncols() == 0 {
        return Err(RmtError::Empty { what });
    }
    Ok(())
}

/// Checks that the matrix has entries and that they are all finite.
pub(crate) fn check_matrix<T: Element>(what: &'static str, m: MatRef<'_, T>) -> Result<()> {
    check_non_empty(what, m)?;
    let non_finite = |i: usize, j: usize| RmtError::NonFinite {
        what,
        index: i + j * m.nrows(),
        value: m[(i, j)].to_f64(),
    };
    // 0·x is ±0 for a finite x and NaN otherwise: one branch-free (vectorised) sum per line,
    // and the search for the culprit only where that sum is not 0.
    let first_bad = |line: &[T]| {
        let mut acc = [T::ZERO; 8];
        let mut chunks = line.chunks_exact(8);
        for chunk in &mut chunks {
            for l in 0..8 {
                acc[l] += chunk[l] * T::ZERO;
            }
        }
        let tail = chunks
            .remainder()
            .iter()
            .fold(T::ZERO, |a, &x| a + x * T::ZERO);
        if acc.iter().fold(tail, |a, &x| a + x) == T::ZERO {
            None
        } else {
            line.iter().position(|x| !x.to_f64().is_finite())
        }
    };
    // Contiguous columns (or rows, for PyTorch's row-major weights) are scanned as slices;
    // indexing element by element cost ≈ 1.4 ns per entry (11 ms for two 2048² matrices).
    if let Some(cols) = m.try_as_col_major() {
        for j in 0..m.ncols() {
            if let Some(i) = first_bad(cols.col(j).as_slice()) {
                return Err(non_finite(i, j));
            }
        }
    } else if let Some(rows) = m.transpose().try_as_col_major() {
        for i in 0..m.nrows() {
            if let Some(j) = first_bad(rows.col(i).as_slice()) {
                return Err(non_finite(i, j));
            }
        }
    } else {
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                if !m[(i, j)].to_f64().is_finite() {
                    return Err(non_finite(i, j));
                }
            }
        }
    }
    Ok(())
}

// Layouts: on the 2-core AVX2 machine (2026-11-23) faer's GEMM ran fastest as "TN" (left
// operand a transposed column-major matrix): f64 2048³ TN 59 GF/s vs NT 32. On the AVX-512
// machine (2026-12-01) NN and TN are equal (2048³ f64: 148 vs 151 ms) and NT is slower
// (250 ms). So the product reads `A` as it is and `Bᵀ` column-major (NN), copying `B`'s
// transpose in cache-sized tiles when it is not already a view; the Gram stays TN.

mod scratch {
    //! Matrices the crate's kernels are done with, kept per thread for the next call that asks
    //! for the same type and shape: a 768-wide `f64` layer otherwise allocates three 4.7 MB
    //! matrices per call, which the OS maps, faults in and zeroes page by page each time
    //! (≈ 3 400 page faults per layer; docs/performance.md). At most [`SCRATCH_SLOTS`] matrices of
    //! at most [`SCRATCH_MAX_BYTES`] each are kept per thread;
    //! [`free_kept_matrices`](super::free_kept_matrices) gives them back.

    use super::Element;
    use faer::Mat;
    use std::any::Any;
    use std::cell::RefCell;

    /// Matrices kept per thread (a layer's copy of `Qᵀ`, `Mᵀ` and `G`, and one more).
    const SCRATCH_SLOTS: usize = 4;
    /// The largest matrix kept (larger ones go back to the allocator): 32 MiB, an `f64`
    /// layer of width 2048, whose three matrices otherwise cost ≈ 40 ms of page faults and
    /// zeroing per call (docs/performance.md).
    const SCRATCH_MAX_BYTES: usize = 32 << 20;

    thread_local! {
        static KEPT: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
    }

    /// A `nrows × ncols` matrix: one this thread released, with its old contents, or a new
    /// zeroed one. Callers overwrite what they read.
    pub(crate) fn take<T: Element>(nrows: usize, ncols: usize) -> Mat<T> {
        let kept = KEPT
            .try_with(|kept| {
                let mut kept = kept.try_borrow_mut().ok()?;
                let i = kept.iter().position(|m| {
                    m.downcast_ref::<Mat<T>>()
                        .is_some_and(|m| m.nrows() == nrows && m.ncols() == ncols)
                })?;
                kept.remove(i).downcast::<Mat<T>>().ok().map(|m| *m)
            })
            .ok()
            .flatten();
        kept.unwrap_or_else(|| Mat::zeros(nrows, ncols))
    }

    /// How many matrices this thread keeps.
    #[cfg(test)]
    pub(crate) fn kept() -> usize {
        KEPT.with(|kept| kept.borrow().len())
    }

    /// Drops every matrix kept by this thread.
    pub(crate) fn clear() {
        let _ = KEPT.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut() {
                kept.clear();
            }
        });
    }

    /// Gives `m` back for [`take`] on this thread (the oldest kept matrix makes room).
    pub(crate) fn release<T: Element>(m: Mat<T>) {
        let bytes = m.nrows() * m.ncols() * std::mem::size_of::<T>();
        if bytes == 0 || bytes > SCRATCH_MAX_BYTES {
            return;
        }
        let _ = KEPT.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut() {
                if kept.len() == SCRATCH_SLOTS {
                    kept.remove(0);
                }
                kept.push(Box::new(m));
            }
        });
    }
}
pub(crate) use scratch::{release as release_scratch, take as take_scratch};

/// Frees the work matrices that rmt-core keeps for reuse on the calling thread and on the
/// threads of rayon's global pool. A diagnosis keeps its layer's copy of `Qᵀ`,
/// `Mᵀ = KQᵀ` and `G` (up to four matrices of up to 32 MiB per thread) so that the next
/// layer of the same shape does not map and zero fresh memory; call this once the last
/// layer is done to give that memory back at once. Later calls work as before (the first of
/// them allocates anew).
///
/// ```
/// use rmt_core::diagnostics::{DiagnosticsConfig, diagnose_layer};
/// use rmt_core::linalg::{free_kept_matrices, view};
/// let q = nalgebra::DMatrix::<f64>::from_fn(64, 32, |i, j| ((i * 7 + j * 3) % 11) as f64);
/// let k = nalgebra::DMatrix::<f64>::from_fn(64, 32, |i, j| ((i * 5 + j) % 13) as f64);
/// let d = diagnose_layer(view(&q), view(&k), 4, &DiagnosticsConfig::default(), None)?;
/// free_kept_matrices();
/// assert!(d.layer.partial_spectrum);
/// # Ok::<(), rmt_core::error::RmtError>(())
/// ```
pub fn free_kept_matrices() {
    scratch::clear();
    rayon::broadcast(|_| scratch::clear());
}

/// `A·Bᵀ` for `A ∈ ℝ^{m×k}`, `B ∈ ℝ^{n×k}` (the attention bilinear form `M = QKᵀ`): one GEMM
/// with `Bᵀ` column-major.
pub(crate) fn product_abt<T: Element>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Mat<T> {
    let bt = ColMajorTranspose::new(b);
    let mut out = take_scratch::<T>(a.nrows(), b.nrows());
    matmul_by_rows(out.as_mut(), Accum::Replace, a, bt.get(), T::from_f64(1.0));
    if let ColMajorTranspose::Owned(copy) = bt {
        release_scratch(copy);
    }
    out
}

/// Rows of the smallest block [`matmul_by_rows`] gives a thread.
const ROWS_PER_THREAD_MIN: usize = 256;

/// `C ← α·A·B` (`Accum::Replace`) or `C ← C + α·A·B` (`Accum::Add`) on every thread of
/// rayon's pool: `C`'s rows cut into one block per thread, each block a sequential faer GEMM
/// (rayon's join, so a busy pool never waits). faer's own parallel GEMM ran slower on two
/// cores of the Zen 5 (square `f64`, minima / medians of 7, alternating in one process):
/// n = 1024 11.5 / 12.0 against 10.9 / 11.0 ms, 2048 93–96 / 100–102 against 89–94 /
/// 96–97, 3072 331 / 349 against 305 / 320, 4096 820–832 / 885–974 against 709–766 /
/// 742–808. Every entry is summed in the same order however the rows are cut.
pub(crate) fn matmul_by_rows<T: Element>(
    c: MatMut<'_, T>,
    accum: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
) {
    let blocks = rayon::current_num_threads().min(c.nrows() / ROWS_PER_THREAD_MIN);
    if blocks < 2 {
        faer::linalg::matmul::matmul(c, accum, a, b, alpha, par());
        return;
    }
    fn split<T: Element>(
        c: MatMut<'_, T>,
        accum: Accum,
        a: MatRef<'_, T>,
        b: MatRef<'_, T>,
        alpha: T,
        blocks: usize,
    ) {
        if blocks == 1 {
            faer::linalg::matmul::matmul(c, accum, a, b, alpha, Par::Seq);
            return;
        }
        let half = blocks / 2;
        let rows = c.nrows() * half / blocks;
        let (c1, c2) = c.split_at_row_mut(rows);
        let (a1, a2) = a.split_at_row(rows);
        rayon::join(
            || split(c1, accum, a1, b, alpha, half),
            || split(c2, accum, a2, b, alpha, blocks - half),
        );
    }
    split(c, accum, a, b, alpha, blocks);
}

/// `scale·AᵀA` for column-major `At = A` given as `Aᵀ`'s storage: with `at = Aᵀ ∈ ℝ^{k×m}`,
/// returns `scale·(Aᵀ)ᵀ(Aᵀ) = scale·A·Aᵀ ∈ ℝ^{m×m}`. Only the lower triangle is computed
/// (half the flops of a GEMM), then mirrored, so the result is exactly symmetric.
pub(crate) fn gram_of_transpose<T: Element>(at: MatRef<'_, T>, scale: f64) -> Mat<T> {
    let mut out = gram_lower_of_transpose(at, scale);
    mirror_lower(out.as_mut());
    out
}

/// [`gram_of_transpose`]'s lower triangle (diagonal included); the strictly upper triangle
/// is unspecified. For consumers that read only the lower triangle, as the eigensolvers do.
pub(crate) fn gram_lower_of_transpose<T: Element>(at: MatRef<'_, T>, scale: f64) -> Mat<T> {
    let n = at.ncols();
    let mut out = take_scratch::<T>(n, n);
    let (l, alpha) = (at.transpose(), T::from_f64(scale));
    let one_thread = !crate::eigen::second_core_free();
    if n >= GRAM_HALVING_MIN || (one_thread && n >= GRAM_HALVING_ONE_THREAD_MIN) {
        lower_gram(out.as_mut(), l, alpha);
    } else {
        lower_product(out.as_mut(), Accum::Replace, l, l, alpha);
    }
    out
}

/// From this size on, [`gram_lower_of_transpose`] halves ([`lower_gram`]) rather than
/// splitting in two sequential sides ([`lower_product`]); both give the same bits. Measured
/// (Zen 5, 2 cores, `n × n` by its transpose, medians of 9, alternating): `f64` n = 768
/// 3.3–3.5 ms either way (`f32` 1.7–1.8 against 1.9), n = 1024 8.6 → 7.9, n = 2048 68–72 →
/// 55–57, n = 4096 623 → 490 (`f32` 2048 36–38 → 27–28).
const GRAM_HALVING_MIN: usize = 1024;

/// The same from this size on when the call has one core (inside a rayon worker, as each of
/// a model's layers runs, or with one thread in the pool): measured on one thread of the
/// Xeon (2026-12-04, medians of 21), 768 `f64` 9.3 → 8.8 ms, `f32` 4.3 → 3.9, 1024 `f64`
/// 22.8 → 20.4; on two cores the two sides stay faster below 1024 there (768 `f64` 5.1
/// against 5.5 ms, `f32` 2.3 against 3.4). At 512 the two were equal.
const GRAM_HALVING_ONE_THREAD_MIN: usize = 640;

/// Rows of the diagonal blocks that [`lower_gram`] computes whole.
const GRAM_BASE: usize = 256;

/// `C ← α·L·Lᵀ` on the lower triangle of the square `C` (`L ∈ ℝ^{n×k}`), by halves: the
/// block below the diagonal, `α·L₂L₁ᵀ`, is one GEMM on every core; the two diagonal blocks
/// recurse, and those of at most [`GRAM_BASE`] rows are whole GEMMs (their strictly upper
/// part written too). Every product runs near the machine's parallel GEMM rate, where
/// [`lower_product`]'s sequential column blocks run near the single-core rate of a thin
/// GEMM (`2048 × 128 × 2048` `f64`: 67 GF/s on one core of the Zen 5, against 89 at
/// `2048 × 512 × 2048`).
fn lower_gram<T: Element>(mut c: MatMut<'_, T>, l: MatRef<'_, T>, alpha: T) {
    let n = c.nrows();
    if n <= GRAM_BASE {
        matmul_by_rows(c, Accum::Replace, l, l.transpose(), alpha);
        return;
    }
    let h = n / 2;
    let (l1, l2) = l.split_at_row(h);
    let below = c.rb_mut().submatrix_mut(h, 0, n - h, h);
    matmul_by_rows(below, Accum::Replace, l2, l1.transpose(), alpha);
    lower_gram(c.rb_mut().submatrix_mut(0, 0, h, h), l1, alpha);
    lower_gram(c.submatrix_mut(h, h, n - h, n - h), l2, alpha);
}

/// Width of the column blocks of the blocked products ([`lower_product`], the band
/// reduction's symmetric product): large enough for faer's sequential GEMM to run near its
/// peak, small enough that the diagonal blocks' wasted half stays small.
pub(crate) const GEMM_BLOCK: usize = 128;

/// `C ← α·L Rᵀ` (`Accum::Replace`) or `C ← C + α·L Rᵀ` (`Accum::Add`) on the lower
/// triangle of the square `C` (`L, R ∈ ℝ^{n×m}`), as sequential GEMMs over column blocks
/// `C[j₀.., J] (+)= α·L[j₀.., :] R[J, :]ᵀ`, the columns cut where the two sides' work
/// (∝ rows × columns) balances, at `n(1 − 1/√2)`, and the sides run on two rayon workers.
/// Half the flops of a GEMM; the diagonal blocks are computed whole (their strictly upper
/// part gets the same formula), the rest of the upper triangle is untouched. faer's
/// parallel triangular product splits into many small GEMMs and ran at 35 GF/s at n = 768
/// (f64), this at 45–90.
pub(crate) fn lower_product<T: Element>(
    c: MatMut<'_, T>,
    accum: Accum,
    l: MatRef<'_, T>,
    r: MatRef<'_, T>,
    alpha: T,
) {
    let n = c.nrows();
    let m = l.ncols();
    let cut = lower_product_cut(n);
    let (left, right) = c.split_at_col_mut(cut);
    let side = |mut part: MatMut<'_, T>, offset: usize| {
        let cols = part.ncols();
        for c0 in (0..cols).step_by(GEMM_BLOCK) {
            let w = GEMM_BLOCK.min(cols - c0);
            let j0 = offset + c0;
            faer::linalg::matmul::matmul(
                part.rb_mut().submatrix_mut(j0, c0, n - j0, w),
                accum,
                l.submatrix(j0, 0, n - j0, m),
                r.submatrix(j0, 0, w, m).transpose(),
                alpha,
                Par::Seq,
            );
        }
    };
    rayon::join(|| side(left, 0), || side(right, cut));
}

/// Column where [`lower_product`] splits its two workers (and the band reduction's `VᵀA₂₂`,
/// rounded to a block): the left columns `[0, c)` and the right ones hold equal areas of the
/// lower triangle when `(n − c)² = n²/2`, `c = n(1 − 1/√2)`.
pub(crate) fn lower_product_cut(n: usize) -> usize {
    ((n as f64) * (1.0 - std::f64::consts::FRAC_1_SQRT_2)) as usize
}

/// The factor `R ∈ ℝ^{n×n}` (upper triangular) of a thin QR decomposition `A = UR` of
/// `A ∈ ℝ^{m×n}`, `m ≥ n`, `UᵀU = I` (blocked Householder, faer's `qr_in_place`, on every
/// core). `RᵀR = AᵀA`, so `R` stands in for `A` in any product `A·Bᵀ` whose singular values
/// or Frobenius norm are wanted.
pub(crate) fn thin_qr_r<T: Element>(a: MatRef<'_, T>) -> Mat<T> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::qr::no_pivoting::factor;
    let (m, n) = a.shape();
    debug_assert!(m >= n);
    let mut qr = a.to_owned();
    let block = factor::recommended_block_size::<T>(m, n);
    let mut coeffs = Mat::<T>::zeros(block, n);
    let scratch = factor::qr_in_place_scratch::<T>(m, n, block, par(), Default::default());
    factor::qr_in_place(
        qr.as_mut(),
        coeffs.as_mut(),
        par(),
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    );
    Mat::from_fn(n, n, |i, j| if i <= j { qr[(i, j)] } else { T::zero() })
}

/// `scale·A·Aᵀ` (exactly symmetric).
pub(crate) fn gram_aat<T: Element>(a: MatRef<'_, T>, scale: f64) -> Mat<T> {
    let at = ColMajorTranspose::new(a);
    gram_of_transpose(at.get(), scale)
}

/// Visits the pairs `(i, j)` of a `rows × cols` matrix — all of them, or only those strictly
/// below the diagonal (`i > j`) — in 32 × 32 tiles, so that code touching both `(i, j)` and
/// `(j, i)` keeps both in cache (a column-by-column scan misses on every transposed access:
/// ≈ 20 ms for a 2048² matrix).
pub(crate) fn for_each_tiled(
    rows: usize,
    cols: usize,
    strictly_lower: bool,
    mut f: impl FnMut(usize, usize),
) {
    for jb in (0..cols).step_by(TILE) {
        let first_row_tile = if strictly_lower { jb } else { 0 };
        for ib in (first_row_tile..rows).step_by(TILE) {
            for j in jb..(jb + TILE).min(cols) {
                let first = if strictly_lower { ib.max(j + 1) } else { ib };
                for i in first..(ib + TILE).min(rows) {
                    f(i, j);
                }
            }
        }
    }
}

/// Edge of the square tiles in which transposed accesses are made.
pub(crate) const TILE: usize = 32;

/// Column `j` of a matrix with unit row stride, as a slice.
#[inline]
pub(crate) fn column<T>(m: MatRef<'_, T>, j: usize) -> Option<&[T]> {
    m.col(j).try_as_col_major().map(|c| c.as_slice())
}

/// Column `j` of a matrix with unit row stride, as a mutable slice.
#[inline]
pub(crate) fn column_mut<T>(m: MatMut<'_, T>, j: usize) -> Option<&mut [T]> {
    m.col_mut(j)
        .try_as_col_major_mut()
        .map(|c| c.as_slice_mut())
}

/// Writes the transpose of the tile whose columns are `src` (each `iw` long) into `dst`:
/// `dst[row0 + jj, col0 + ii] = src[jj][ii]`, one destination column slice at a time.
fn write_tile_transposed<T: Copy>(src: &[&[T]], mut dst: MatMut<'_, T>, row0: usize, col0: usize) {
    let (jw, iw) = (src.len(), src.first().map_or(0, |c| c.len()));
    for ii in 0..iw {
        let out =
            &mut column_mut(dst.rb_mut(), col0 + ii).expect("unit row stride")[row0..row0 + jw];
        for (d, s) in out.iter_mut().zip(src) {
            *d = s[ii];
        }
    }
}

/// `Aᵀ` as a new column-major matrix, copied in 32 × 32 tiles between column slices (faer's
/// `to_owned` of a transposed view reads across columns: 45 ms at 2048²; the same tiles
/// through `(i, j)` indexing, with its bounds checks and stride arithmetic per element, took
/// 1.4 ms at 768² f32 on a quiet machine; old against new in one harness on a loaded one,
/// 3.8–6.9 against 1.3–1.9 ms, docs/performance.md).
fn transpose_tiled<T: Element>(a: MatRef<'_, T>) -> Mat<T> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let mut out = take_scratch::<T>(cols, rows);
    if a.row_stride() != 1 {
        for_each_tiled(rows, cols, false, |i, j| out[(j, i)] = a[(i, j)]);
        return out;
    }
    // Columns of `a` (rows of `out`) from `first` on, into `out` (their rows from 0).
    let copy = |first: usize, mut out: MatMut<'_, T>| {
        let mut src: Vec<&[T]> = Vec::with_capacity(TILE);
        for jb in (0..out.nrows()).step_by(TILE) {
            let jw = TILE.min(out.nrows() - jb);
            for ib in (0..rows).step_by(TILE) {
                let iw = TILE.min(rows - ib);
                src.clear();
                src.extend(
                    (jb..jb + jw)
                        .map(|j| &column(a, first + j).expect("unit row stride")[ib..ib + iw]),
                );
                write_tile_transposed(&src, out.rb_mut(), jb, ib);
            }
        }
    };
    if rows * cols >= TRANSPOSE_SPLIT_MIN {
        // Two halves on two workers (the copy is bound by one core's loads and stores).
        let half = (cols / 2).next_multiple_of(TILE).min(cols);
        let (top, bottom) = out.as_mut().split_at_row_mut(half);
        rayon::join(|| copy(0, top), || copy(half, bottom));
    } else {
        copy(0, out.as_mut());
    }
    out
}

/// Entries from which [`transpose_tiled`] copies in two halves on two rayon workers.
const TRANSPOSE_SPLIT_MIN: usize = 512 * 512;

/// Copies the strictly lower triangle of the square column-major `a` onto its upper
/// triangle, in tiles between column slices (see [`transpose_tiled`]).
pub(crate) fn mirror_lower<T: Element>(mut a: MatMut<'_, T>) {
    let n = a.nrows();
    if a.row_stride() != 1 {
        for_each_tiled(n, n, true, |i, j| a[(j, i)] = a[(i, j)]);
        return;
    }
    for ib in (0..n).step_by(TILE) {
        let iw = TILE.min(n - ib);
        // Diagonal tile: element by element.
        for j in ib..ib + iw {
            for i in j + 1..ib + iw {
                a[(j, i)] = a[(i, j)];
            }
        }
        // Tiles (ib, jb) left of the diagonal: columns jb.. (read) lie before column ib
        // (written), so the two sides are disjoint borrows.
        let (left, mut right) = a.rb_mut().split_at_col_mut(ib);
        let left = left.into_const();
        let mut src: Vec<&[T]> = Vec::with_capacity(TILE);
        for jb in (0..ib).step_by(TILE) {
            let jw = TILE.min(ib - jb);
            src.clear();
            src.extend(
                (jb..jb + jw).map(|j| &column(left, j).expect("unit row stride")[ib..ib + iw]),
            );
            write_tile_transposed(&src, right.rb_mut(), jb, 0);
        }
    }
}

/// `Aᵀ` in column-major storage, borrowed when possible.
pub(crate) enum ColMajorTranspose<'a, T> {
    /// `A` was row-major: `Aᵀ` is a column-major view.
    View(MatRef<'a, T>),
    /// A column-major copy of `Aᵀ`.
    Owned(Mat<T>),
}

impl<'a, T: Element> ColMajorTranspose<'a, T> {
    pub(crate) fn new(a: MatRef<'a, T>) -> Self {
        let t = a.transpose();
        if t.row_stride() == 1 && t.col_stride() >= t.nrows() as isize {
            ColMajorTranspose::View(t)
        } else {
            ColMajorTranspose::Owned(transpose_tiled(a))
        }
    }

    pub(crate) fn get(&self) -> MatRef<'_, T> {
        match self {
            ColMajorTranspose::View(v) => *v,
            ColMajorTranspose::Owned(m) => m.as_ref(),
        }
    }
}

/// Converts to `f64` (a copy; `f64 → f64` is a plain copy).
pub(crate) fn to_f64_mat<T: Element>(a: MatRef<'_, T>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)].to_f64())
}

/// Sylvester inertia of a symmetric matrix: how many eigenvalues are positive, negative
/// and zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inertia {
    /// Number of eigenvalues > 0.
    pub positive: usize,
    /// Number of eigenvalues < 0.
    pub negative: usize,
    /// Number of eigenvalues that are exactly 0 in the factorisation.
    pub zero: usize,
}

/// Inertia of `A − shift·I` for symmetric `A` (lower triangle read), from one Bunch–Kaufman
/// `LBLᵀ` factorisation (`n³/3` flops): by Sylvester's law, the inertia of the block
/// diagonal `B` is that of `A − shift·I`. So the number of eigenvalues of `A` above
/// `shift` is `inertia(A, shift).positive`, without computing any eigenvalue.
pub fn inertia(a: &DMatrix<f64>, shift: f64) -> Result<Inertia> {
    let (r, c) = a.shape();
    if r != c {
        return Err(RmtError::NotSquare {
            what: "inertia input",
            rows: r,
            cols: c,
        });
    }
    check_matrix("inertia input", dmatrix_as_faer(a))?;
    if !shift.is_finite() {
        return Err(RmtError::invalid("shift", shift, "must be finite"));
    }
    Ok(shifted_inertia(dmatrix_as_faer(a), shift))
}

/// Inertia of `A − shift·I` (no input checks; lower triangle of `a` read).
pub(crate) fn shifted_inertia(a: MatRef<'_, f64>, shift: f64) -> Inertia {
    let n = a.nrows();
    let mut shifted = a.to_owned();
    for i in 0..n {
        shifted[(i, i)] -= shift;
    }
    let f = shifted.lblt(faer::Side::Lower);
    let d = f.B_diag();
    let e = f.B_subdiag();
    let mut inertia = Inertia {
        positive: 0,
        negative: 0,
        zero: 0,
    };
    let mut i = 0;
    while i < n {
        if i + 1 < n && e[i] != 0.0 {
            // 2×2 pivot [[a, b], [b, c]]: eigenvalue signs from det and trace.
            let (p, q, b) = (d[i], d[i + 1], e[i]);
            let det = p * q - b * b;
            if det < 0.0 {
                inertia.positive += 1;
                inertia.negative += 1;
            } else if det > 0.0 {
                if p + q > 0.0 {
                    inertia.positive += 2;
                } else {
                    inertia.negative += 2;
                }
            } else {
                inertia.zero += 1;
                if p + q > 0.0 {
                    inertia.positive += 1;
                } else {
                    inertia.negative += 1;
                }
            }
            i += 2;
        } else {
            match d[i].partial_cmp(&0.0) {
                Some(std::cmp::Ordering::Greater) => inertia.positive += 1,
                Some(std::cmp::Ordering::Less) => inertia.negative += 1,
                _ => inertia.zero += 1,
            }
            i += 1;
        }
    }
    inertia
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Released matrices come back for the same type and shape, and what they held does not
    /// leak into the products that reuse them (filled with NaN before release here).
    #[test]
    fn scratch_matrices_are_reused_and_overwritten() {
        let a = Mat::<f64>::from_fn(70, 50, |i, j| ((i * 7 + j * 3) % 11) as f64 - 5.0);
        let b = Mat::<f64>::from_fn(60, 50, |i, j| ((i * 5 + j) % 13) as f64 - 6.0);
        let m = product_abt(a.as_ref(), b.as_ref());
        let g = gram_lower_of_transpose(a.transpose(), 0.5);
        let nan = Mat::<f64>::from_fn(70, 60, |_, _| f64::NAN);
        let ptr = nan.as_ptr();
        release_scratch(nan);
        let other = take_scratch::<f32>(70, 60);
        assert_ne!(
            other.as_ptr() as usize,
            ptr as usize,
            "not for another type"
        );
        assert_ne!(
            take_scratch::<f64>(60, 70).as_ptr(),
            ptr,
            "nor another shape"
        );
        let again = take_scratch::<f64>(70, 60);
        assert_eq!(again.as_ptr(), ptr, "the same allocation comes back");
        release_scratch(again);
        assert_eq!(product_abt(a.as_ref(), b.as_ref()), m);
        release_scratch(Mat::<f64>::from_fn(70, 70, |_, _| f64::NAN));
        let g2 = gram_lower_of_transpose(a.transpose(), 0.5);
        for j in 0..70 {
            for i in j..70 {
                assert_eq!(g2[(i, j)], g[(i, j)]);
            }
        }
    }

    /// The row blocks give every entry the bits of one sequential GEMM (odd sizes, blocks of
    /// unequal height, both accumulation modes, a pool of three threads).
    #[test]
    fn matmul_by_rows_equals_one_sequential_gemm() {
        let a = Mat::<f64>::from_fn(1031, 517, |i, j| ((i * 7 + j * 3) % 11) as f64 / 7.0 - 0.6);
        let b = Mat::<f64>::from_fn(517, 263, |i, j| ((i * 5 + j) % 13) as f64 / 9.0 - 0.7);
        let c0 = Mat::<f64>::from_fn(1031, 263, |i, j| ((i + 2 * j) % 5) as f64 / 3.0);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for accum in [Accum::Replace, Accum::Add] {
            let mut seq = c0.clone();
            faer::linalg::matmul::matmul(
                seq.as_mut(),
                accum,
                a.as_ref(),
                b.as_ref(),
                0.5,
                Par::Seq,
            );
            let mut rows = c0.clone();
            pool.install(|| matmul_by_rows(rows.as_mut(), accum, a.as_ref(), b.as_ref(), 0.5));
            assert!(seq == rows, "{accum:?}");
        }
    }

    /// A matrix of 32 MiB (an `f64` layer of width 2048) is kept, a larger one is not, and
    /// `free_kept_matrices` empties the thread's scratch.
    #[test]
    fn scratch_keeps_up_to_32_mib_until_freed() {
        free_kept_matrices();
        assert_eq!(scratch::kept(), 0);
        release_scratch(Mat::<f64>::zeros(2048, 2048));
        assert_eq!(scratch::kept(), 1);
        release_scratch(Mat::<f64>::zeros(2049, 2048));
        assert_eq!(scratch::kept(), 1);
        free_kept_matrices();
        assert_eq!(scratch::kept(), 0);
    }

    /// The tiled copies between column slices equal the definitions at sizes around the
    /// tile edge, and the strided fallback (a row-major view) gives the same; the last two
    /// sizes are copied in two halves (`TRANSPOSE_SPLIT_MIN`), one with an odd column count.
    #[test]
    fn tiled_transpose_and_mirror_match_the_definition() {
        for (r, c) in [
            (1, 1),
            (5, 70),
            (32, 32),
            (33, 31),
            (70, 65),
            (100, 3),
            (513, 517),
            (300, 900),
        ] {
            let a = Mat::<f32>::from_fn(r, c, |i, j| (i * 1000 + j) as f32);
            for view in [a.as_ref(), a.transpose().to_owned().as_ref().transpose()] {
                let t = transpose_tiled(view);
                assert_eq!((t.nrows(), t.ncols()), (c, r));
                for i in 0..r {
                    for j in 0..c {
                        assert_eq!(t[(j, i)], a[(i, j)], "{r}×{c} at ({i}, {j})");
                    }
                }
            }
            let n = r.max(c);
            let lower =
                Mat::<f64>::from_fn(
                    n,
                    n,
                    |i, j| if i >= j { (i * 1000 + j) as f64 } else { -1.0 },
                );
            let mut col_major = lower.clone();
            mirror_lower(col_major.as_mut());
            let mut row_major = lower.transpose().to_owned();
            mirror_lower(row_major.as_mut().transpose_mut());
            for i in 0..n {
                for j in 0..n {
                    let want = lower[(i.max(j), i.min(j))];
                    assert_eq!(col_major[(i, j)], want, "n={n} at ({i}, {j})");
                    assert_eq!(row_major[(j, i)], want, "n={n} at ({i}, {j}), strided");
                }
            }
        }
    }

    /// A non-finite entry is found, and named by its column-major index, whether the matrix
    /// is column-major, row-major (PyTorch weights) or strided.
    #[test]
    fn check_matrix_finds_non_finite_entries_in_any_layout() {
        let mut a = Mat::<f64>::from_fn(5, 7, |i, j| (i + 10 * j) as f64);
        assert!(check_matrix("A", a.as_ref()).is_ok());
        assert!(check_matrix("A", a.as_ref().transpose()).is_ok());
        a[(3, 4)] = f64::NAN;
        let index = |e: Result<()>| match e {
            Err(RmtError::NonFinite { index, .. }) => index,
            other => panic!("expected NonFinite, got {other:?}"),
        };
        assert_eq!(index(check_matrix("A", a.as_ref())), 3 + 4 * 5);
        // The transpose is row-major: entry (4, 3) of a 7 × 5 matrix.
        assert_eq!(index(check_matrix("A", a.as_ref().transpose())), 4 + 3 * 7);
        // Rows reversed (row stride −1): neither layout is contiguous. (3, 4) is now (1, 4).
        let strided = a.as_ref().reverse_rows();
        assert_eq!(index(check_matrix("A", strided)), 1 + 4 * 5);
        let mut b = Mat::<f32>::zeros(4, 4);
        b[(1, 2)] = f32::INFINITY;
        assert_eq!(index(check_matrix("B", b.as_ref())), 1 + 2 * 4);
        // Columns longer than the eight-wide sums: in a chunk and in the tail, ±∞ and NaN,
        // and huge finite values (whose sum would overflow) are fine.
        let mut c = Mat::<f32>::from_fn(21, 3, |_, _| f32::MAX);
        assert!(check_matrix("C", c.as_ref()).is_ok());
        for (row, bad) in [(5, f32::NEG_INFINITY), (19, f32::NAN), (16, f32::INFINITY)] {
            c[(row, 1)] = bad;
            assert_eq!(index(check_matrix("C", c.as_ref())), row + 21);
            c[(row, 1)] = 0.0;
        }
    }

    /// The blocked lower-triangular product equals a plain GEMM on the lower triangle (to
    /// rounding: only the summation order differs), for `Replace` and `Add`, sizes below,
    /// at and across the 128-column blocks and the balancing cut, and leaves the strictly
    /// upper triangle outside the diagonal blocks untouched.
    #[test]
    fn lower_product_matches_a_gemm_on_the_lower_triangle() {
        for (n, m) in [(1, 3), (5, 2), (128, 7), (300, 64), (517, 33)] {
            let f = |i: usize, j: usize, s: usize| (((i * 31 + j * 17 + s) % 23) as f64) - 11.0;
            let l = Mat::<f64>::from_fn(n, m, |i, j| f(i, j, 1));
            let r = Mat::<f64>::from_fn(n, m, |i, j| f(i, j, 2));
            let start = Mat::<f64>::from_fn(n, n, |i, j| f(i, j, 3));
            let full = &l * r.transpose();
            for accum in [Accum::Replace, Accum::Add] {
                let mut c = start.clone();
                lower_product(c.as_mut(), accum, l.as_ref(), r.as_ref(), -0.5);
                for j in 0..n {
                    for i in j..n {
                        let base = if accum == Accum::Add {
                            start[(i, j)]
                        } else {
                            0.0
                        };
                        let want = base - 0.5 * full[(i, j)];
                        assert!(
                            (c[(i, j)] - want).abs() <= 1e-9 * (1.0 + want.abs()),
                            "n={n}"
                        );
                    }
                    // Left of the cut the blocks start at column 0: block = column / GEMM_BLOCK.
                    let cut = lower_product_cut(n);
                    for i in 0..j {
                        if j < cut && i / GEMM_BLOCK != j / GEMM_BLOCK {
                            assert_eq!(c[(i, j)], start[(i, j)], "upper touched, n={n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_major_view_reads_pytorch_layout() {
        let w: Vec<f64> = (0..6).map(|x| x as f64).collect();
        let v = row_major_view(&w, 2, 3).unwrap();
        assert_eq!(v[(0, 2)], 2.0);
        assert_eq!(v[(1, 1)], 4.0);
        let f = as_faer(&v);
        assert_eq!(f[(1, 2)], 5.0);
        assert!(row_major_view(&w, 4, 2).is_err());
    }

    /// The halving Gram and the two-sided one compute every entry of the lower triangle with
    /// the same bits (each entry is one dot product over `k` in faer's order), so which one
    /// runs may depend on the threads.
    #[test]
    fn halving_and_two_sided_grams_agree() {
        for (n, k) in [(300, 40), (513, 7), (300, 700)] {
            let at = Mat::<f64>::from_fn(k, n, |i, j| ((i * 31 + j * 17) as f64 * 0.37).sin());
            let l = at.as_ref().transpose();
            let (mut halves, mut sides) = (Mat::<f64>::zeros(n, n), Mat::<f64>::zeros(n, n));
            lower_gram(halves.as_mut(), l, 0.25);
            lower_product(sides.as_mut(), Accum::Replace, l, l, 0.25);
            for j in 0..n {
                for i in j..n {
                    assert_eq!(halves[(i, j)], sides[(i, j)], "n={n} ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn gram_is_exactly_symmetric_and_correct() {
        // One tile, and several (the mirror and the transpose copy work in 32 × 32 tiles).
        // Tolerance 1e-12 absolute on the small case, relative to max |G| on the large one.
        for (m, k, relative) in [(5, 3, false), (70, 9, true)] {
            let a = DMatrix::<f64>::from_fn(m, k, |i, j| (i as f64 + 1.0) * (j as f64 - 1.0) + 0.5);
            let g = gram_aat(dmatrix_as_faer(&a), 0.5);
            let reference = &a * a.transpose() * 0.5;
            let scale = if relative { reference.amax() } else { 1.0 };
            for i in 0..m {
                for j in 0..m {
                    assert_eq!(g[(i, j)], g[(j, i)]);
                    assert!((g[(i, j)] - reference[(i, j)]).abs() < 1e-12 * scale);
                }
            }
        }
    }

    #[test]
    fn inertia_counts_eigenvalues_above_a_shift() {
        let d = DMatrix::<f64>::from_diagonal(&nalgebra::DVector::from_vec(vec![
            5.0, -1.0, 3.0, 0.5, 2.0,
        ]));
        // Rotate so the factorisation has real work to do.
        let q = DMatrix::<f64>::from_fn(5, 5, |i, j| ((i * 5 + j) as f64 * 0.7).sin())
            .qr()
            .q();
        let a = &q * d * q.transpose();
        let a = (&a + a.transpose()) * 0.5;
        let i = inertia(&a, 1.0).unwrap();
        assert_eq!((i.positive, i.negative), (3, 2));
        let i = inertia(&a, 10.0).unwrap();
        assert_eq!(i.positive, 0);
    }

    #[test]
    fn inertia_rejects_bad_input() {
        let a = DMatrix::<f64>::from_element(2, 3, 1.0);
        assert!(matches!(inertia(&a, 0.0), Err(RmtError::NotSquare { .. })));
        let mut a = DMatrix::<f64>::identity(3, 3);
        a[(1, 2)] = f64::NAN;
        assert!(matches!(inertia(&a, 0.0), Err(RmtError::NonFinite { .. })));
    }
}
