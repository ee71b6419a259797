//! One-stage Householder tridiagonalisation whose matrix–vector products run on two cores.
//!
//! The column-by-column reduction of LAPACK's `dsytd2`, in the fused form of faer 0.24's
//! `tridiag_in_place`: step `k` chooses the reflector `H = I − τ⁻¹vvᵀ` that zeroes column
//! `k` below its subdiagonal and needs `y = τ⁻¹Av − ½τ⁻²(vᵀAv)v`, after which
//! `A ← A − vyᵀ − yvᵀ`. One pass over the trailing triangle both applies the *previous*
//! step's rank-2 update and accumulates `Av` (two FMAs and two more per entry), so the
//! triangle is read and written once per step. That pass is all of the `4n³/3` flops and it
//! is bound by the bandwidth of the cache that holds the triangle; two cores have twice the
//! bandwidth (and, between their L2 caches, twice the capacity), so the pass is split
//! between them. The rest of a step (the reflector, a few vector operations) is `O(n)` and
//! stays on the calling thread.
//!
//! The pass is cut by columns into [`CHUNKS`] chunks of equal area, each with its own
//! accumulator. The calling thread claims chunks from the first, a second rayon worker from
//! the last, until none is left; so the faster thread does more, a chunk nobody else claims
//! is run by the caller, and the reduction never waits on a worker busy elsewhere. The
//! chunks and the order in which their accumulators are summed depend on the size alone:
//! every schedule performs the same operations on the same values (bit-identical results).
//!
//! Within a chunk the columns go [`BLOCK`] at a time: every row shared by the block's
//! columns loads `u`, `w`, `v` and `z` once for all of them and stores `z` once, where one
//! column at a time spends five loads and two stores on each of the matrix's vectors; that
//! cut the pass by a quarter to a third (docs/performance.md). On AVX-512 the block's kernel
//! is written with std's intrinsics (masked heads and tails), elsewhere with pulp's vectors
//! for whatever the CPU has (scalar heads and tails); [`ColumnKernel`] picks one.

use super::Tridiagonal;
use crate::linalg::{Element, release_scratch};
use faer::Mat;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Below this trailing size a step's pass is one chunk: it then takes about as long as
/// handing part of it to the other core.
const SPLIT_MIN: usize = 96;

/// Chunks of a pass. More balance the two threads better when one is delayed; each costs a
/// claim (an atomic read-modify-write on a line both cores use) and an `m`-vector sum.
const CHUNKS: usize = 4;

/// Column bounds of the chunks of a pass over `m` columns: chunk `c` is columns
/// `b_c..b_{c+1}`, with `(m − b_c)² = (1 − c/C)·m²` (equal areas of the triangle).
fn chunk_bounds(m: usize) -> [usize; CHUNKS + 1] {
    let mut b = [m; CHUNKS + 1];
    b[0] = 0;
    if m >= SPLIT_MIN {
        for (c, b) in b.iter_mut().enumerate().take(CHUNKS).skip(1) {
            *b = (m as f64 * (1.0 - (1.0 - c as f64 / CHUNKS as f64).sqrt())) as usize;
        }
    }
    b
}

/// The matrix being reduced and the step's vectors, both faer allocations: columns `ld`
/// apart (the column stride), each starting on a 64-byte boundary with `ld·size_of::<T>()` a
/// multiple of 64 bytes, as faer allocates. Every operand of the pass then has the same
/// alignment, so after a short scalar head its SIMD loads and stores are aligned
/// (unaligned, the pass ran ≈ 1.5× slower). Only speed depends on that: the kernel splits
/// every operand where it splits the column.
struct Work<T> {
    /// The matrix; its lower triangle is read and reduced in place.
    a: Mat<T>,
    /// The column kernel of the pass.
    kernel: ColumnKernel,
    /// `n × VECTORS`: see [`VECTORS`].
    vectors: Mat<T>,
}

/// Vector columns: `y`, the previous `y` (`w`), zeros (the "previous reflector" of step 0),
/// and the chunks' accumulators `z_c`.
const VECTORS: usize = 3 + CHUNKS;

impl<T: Element> Work<T> {
    fn new(mut a: Mat<T>, kernel: ColumnKernel) -> Self {
        let n = a.nrows();
        assert!(
            a.row_stride() == 1 && a.col_stride().unsigned_abs() >= n,
            "faer allocates column-major"
        );
        // The rows between n and ld (faer's padding) are allocated but not initialised:
        // zero them, so that the whole storage can be borrowed as one slice.
        let ld = a.col_stride().unsigned_abs();
        let ptr = a.as_ptr_mut();
        for j in 0..n {
            for i in n..ld {
                // SAFETY: faer allocates ld (its row capacity) rows for each of the n columns.
                unsafe { ptr.add(j * ld + i).write(T::ZERO) };
            }
        }
        Work {
            a,
            kernel,
            vectors: Mat::zeros(n, VECTORS),
        }
    }

    fn n(&self) -> usize {
        self.a.nrows()
    }

    /// The matrix's column stride.
    fn ld(&self) -> usize {
        self.a.col_stride().unsigned_abs()
    }

    /// The matrix (`n` columns, `ld` apart) and the vector columns (`n` entries each).
    fn split(&mut self) -> (&mut [T], [&mut [T]; VECTORS]) {
        let len = self.n() * self.ld();
        // SAFETY: faer's allocation holds ld·(column capacity ≥ n) elements, rows below n
        // initialised by faer and the rest by `new`; the slice borrows `a` mutably.
        let a = unsafe { std::slice::from_raw_parts_mut(self.a.as_ptr_mut(), len) };
        let mut columns = self.vectors.col_iter_mut().map(|c| {
            c.try_as_col_major_mut()
                .expect("faer's columns are contiguous")
                .as_slice_mut()
        });
        let vectors = std::array::from_fn(|_| columns.next().expect("VECTORS columns"));
        (a, vectors)
    }
}

/// Raw view of [`Work`] for the pass of one step, shared by the two threads. Chunk `c`
/// writes columns `b_c..b_{c+1}` of the trailing block, `z[c][b_c..]` and `y[b_c..b_{c+1}]`;
/// everything else it touches is only read.
#[derive(Clone, Copy)]
struct Pass<T> {
    /// Entry `(0, 0)` of the trailing block `A[k+2.., k+2..]`; columns `ld` apart.
    a: *mut T,
    ld: usize,
    m: usize,
    /// [`chunk_bounds`]`(m)`.
    bounds: [usize; CHUNKS + 1],
    /// The previous step's reflector (`u`) and `y` (`w`), and this step's reflector (`v`),
    /// restricted to the trailing block's rows: `m` entries each.
    u: *const T,
    w: *const T,
    v: *const T,
    /// `y[k+2..]` and the chunks' accumulators (`m` entries each, aligned as the rest).
    y: *mut T,
    z: [*mut T; CHUNKS],
    /// `τ⁻¹`.
    tau_inv: T,
    /// [`Work::kernel`].
    kernel: ColumnKernel,
}

// SAFETY: chunks write disjoint entries (see `Pass`), each chunk is run by the one thread
// that claimed it, and the caller touches the work again only once every chunk is done.
unsafe impl<T: Send> Send for Pass<T> {}
unsafe impl<T: Sync> Sync for Pass<T> {}

impl<T: Element> Pass<T> {
    /// Runs chunk `p` of the pass: for each column `j` of the chunk,
    /// `A[j.., j] −= w_j·u[j..] + u_j·w[j..]`, `z[j..] += τ⁻¹v_j·A[j.., j]` and
    /// `y_j = τ⁻¹·Σ_{i>j} A[i, j]·v_i`. `f32` and `f64` run explicit SIMD code: the AVX-512
    /// kernel, or pulp's for the widest vectors the CPU has (dispatched once per chunk, at
    /// run time), as [`Work::kernel`] says.
    ///
    /// # Safety
    /// The pointers must be valid for the ranges above, and no other thread may touch chunk
    /// `p`'s outputs meanwhile.
    unsafe fn run(&self, p: usize) {
        let (wide, narrow) = (self.cast::<f64>(), self.cast::<f32>());
        #[cfg(target_arch = "x86_64")]
        if self.kernel == ColumnKernel::Fastest && super::has_avx512f() {
            // SAFETY (both): the CPU has AVX-512F (checked); the caller upholds the contract.
            if let Some(pass) = wide {
                return unsafe { chunk_avx512_f64(pass, p) };
            } else if let Some(pass) = narrow {
                return unsafe { chunk_avx512_f32(pass, p) };
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.kernel == ColumnKernel::Avx2
            && let Some(v3) = pulp::x86::V3::try_new()
        {
            if let Some(pass) = wide {
                return <pulp::x86::V3 as pulp::Simd>::vectorize(v3, SimdPartF64 { pass, p });
            } else if let Some(pass) = narrow {
                return <pulp::x86::V3 as pulp::Simd>::vectorize(v3, SimdPartF32 { pass, p });
            }
        }
        if let Some(pass) = wide {
            pulp::Arch::new().dispatch(SimdPartF64 { pass, p });
        } else if let Some(pass) = narrow {
            pulp::Arch::new().dispatch(SimdPartF32 { pass, p });
        } else {
            // SAFETY: the caller upholds the contract.
            let no_block: Option<fn(BlockArgs<'_, T>) -> [T; BLOCK]> = None;
            unsafe { self.for_each_block(p, fused_column, no_block) }
        }
    }

    /// This pass as a `Pass<F>`, when `T` is `F`.
    fn cast<F: 'static>(&self) -> Option<&Pass<F>> {
        use std::any::TypeId;
        // SAFETY: `T` and `F` are the same type.
        (TypeId::of::<T>() == TypeId::of::<F>())
            .then(|| unsafe { &*(self as *const Pass<T>).cast::<Pass<F>>() })
    }

    /// The vectors of chunk `p` (`u`, `w`, `v` whole, `m` entries; `z[p]` from the chunk's
    /// first column, zeroed), its column range, and column `j` of the trailing block from
    /// its diagonal.
    ///
    /// # Safety
    /// As [`Pass::run`]; the slices live as long as the chunk runs.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    unsafe fn chunk<'a>(
        &self,
        p: usize,
    ) -> (
        std::ops::Range<usize>,
        (&'a [T], &'a [T], &'a [T], &'a mut [T]),
        impl Fn(usize) -> &'a mut [T],
    ) {
        let (first, last) = (self.bounds[p], self.bounds[p + 1]);
        let (m, a, ld) = (self.m, self.a, self.ld);
        // SAFETY: the ranges are inside the buffers (`Pass`'s contract), and this chunk alone
        // writes `z[p][first..m]`, `y[first..last]` and columns `first..last`.
        let (u, w, v, z) = unsafe {
            (
                std::slice::from_raw_parts(self.u, m),
                std::slice::from_raw_parts(self.w, m),
                std::slice::from_raw_parts(self.v, m),
                std::slice::from_raw_parts_mut(self.z[p].add(first), m - first),
            )
        };
        z.fill(T::ZERO);
        // SAFETY: as above; the caller takes each column once.
        let column =
            move |j: usize| unsafe { std::slice::from_raw_parts_mut(a.add(j * ld + j), m - j) };
        (first..last, (u, w, v, z), column)
    }

    /// Runs chunk `p`: its columns [`BLOCK`] at a time with `block` (see [`BlockArgs`]), if
    /// there is one, and the rest one at a time with `column` (see [`fused_column`]).
    ///
    /// # Safety
    /// As [`Pass::run`].
    #[inline(always)]
    unsafe fn for_each_block(
        &self,
        p: usize,
        column: impl Fn(ColumnArgs<'_, T>) -> T,
        block: Option<impl Fn(BlockArgs<'_, T>) -> [T; BLOCK]>,
    ) {
        // SAFETY: the caller upholds the contract.
        let (range, (u, w, v, z), col) = unsafe { self.chunk(p) };
        let (first, last, f) = (range.start, range.end, self.tau_inv);
        let coefficients = |j: usize| (-w[j], -u[j], f * v[j]);
        let mut j = first;
        while let Some(block) = &block
            && j + BLOCK <= last
        {
            let sums = block(BlockArgs {
                columns: std::array::from_fn(|c| col(j + c)),
                u: &u[j..],
                w: &w[j..],
                v: &v[j..],
                z: &mut z[j - first..],
                coefficients: std::array::from_fn(|c| coefficients(j + c)),
            });
            for (c, acc) in sums.into_iter().enumerate() {
                let k = j + c;
                // SAFETY: y[k] belongs to this chunk; column k's diagonal is read after the
                // block has updated it.
                unsafe { *self.y.add(k) = f * (acc - *self.a.add(k * self.ld + k) * v[k]) };
            }
            j += BLOCK;
        }
        for j in j..last {
            let a = col(j);
            let (ru, rw, c) = coefficients(j);
            let acc = column(ColumnArgs {
                a: &mut *a,
                u: &u[j..],
                w: &w[j..],
                v: &v[j..],
                z: &mut z[j - first..],
                ru,
                rw,
                c,
            });
            // SAFETY: y[j] belongs to this chunk.
            unsafe { *self.y.add(j) = f * (acc - a[0] * v[j]) };
        }
    }
}

/// Columns the block kernels (AVX-512 and pulp) update together (see [`BlockArgs`]).
const BLOCK: usize = 4;

/// The operands of the [`BLOCK`] neighbouring columns `j, j + 1, …` of the pass: column
/// `j + c` from its diagonal (`L − c` entries), the vectors from row `j` (`L` entries), and
/// each column's `(ru, rw, c)` of [`ColumnArgs`]. A block kernel gives the results of the
/// columns run one after the other (`z` takes column `j`'s term first), but reads the
/// vectors and `z` once for all of them: the pass is bound by its loads and stores, and one
/// column at a time spends five loads and two stores on each vector of the matrix's.
struct BlockArgs<'a, T> {
    columns: [&'a mut [T]; BLOCK],
    u: &'a [T],
    w: &'a [T],
    v: &'a [T],
    z: &'a mut [T],
    coefficients: [(T, T, T); BLOCK],
}

/// The operands of one column of the pass (all slices of the column's length).
struct ColumnArgs<'a, T> {
    a: &'a mut [T],
    u: &'a [T],
    w: &'a [T],
    v: &'a [T],
    z: &'a mut [T],
    ru: T,
    rw: T,
    c: T,
}

macro_rules! simd_part {
    (
        $name:ident,
        $t:ty,
        $as_simd:ident,
        $as_mut_simd:ident,
        $splat:ident,
        $fma:ident,
        $add:ident,
        $reduce:ident,
        $lanes:ident
    ) => {
        /// A chunk of the pass, vectorised for the CPU pulp dispatches to.
        struct $name<'a> {
            pass: &'a Pass<$t>,
            p: usize,
        }

        impl pulp::WithSimd for $name<'_> {
            type Output = ();

            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                let column = |c: ColumnArgs<'_, $t>| -> $t {
                    // A scalar head up to the 64-byte boundary (all operands share the
                    // column's alignment; see `Work`), then aligned vectors.
                    let len = c.a.len();
                    let h = c.a.as_ptr().align_offset(64).min(len);
                    let (a_head, a) = c.a.split_at_mut(h);
                    let (z_head, z) = c.z[..len].split_at_mut(h);
                    let (u_head, u) = c.u[..len].split_at(h);
                    let (w_head, w) = c.w[..len].split_at(h);
                    let (v_head, v) = c.v[..len].split_at(h);
                    let mut head = 0.0;
                    for i in 0..h {
                        let x = c.rw.mul_add(w_head[i], c.ru.mul_add(u_head[i], a_head[i]));
                        a_head[i] = x;
                        z_head[i] = x.mul_add(c.c, z_head[i]);
                        head = x.mul_add(v_head[i], head);
                    }
                    let (a, a_tail) = S::$as_mut_simd(a);
                    let (z, z_tail) = S::$as_mut_simd(z);
                    let (u, u_tail) = S::$as_simd(u);
                    let (w, w_tail) = S::$as_simd(w);
                    let (v, v_tail) = S::$as_simd(v);
                    let k = a.len();
                    let (z, u, w, v) = (&mut z[..k], &u[..k], &w[..k], &v[..k]);
                    let (ru, rw, cc) = (simd.$splat(c.ru), simd.$splat(c.rw), simd.$splat(c.c));
                    let mut acc = [simd.$splat(0.0); 4];
                    let mut i = 0;
                    while i + 4 <= k {
                        for l in 0..4 {
                            let x = simd.$fma(rw, w[i + l], simd.$fma(ru, u[i + l], a[i + l]));
                            a[i + l] = x;
                            z[i + l] = simd.$fma(x, cc, z[i + l]);
                            acc[l] = simd.$fma(x, v[i + l], acc[l]);
                        }
                        i += 4;
                    }
                    while i < k {
                        let x = simd.$fma(rw, w[i], simd.$fma(ru, u[i], a[i]));
                        a[i] = x;
                        z[i] = simd.$fma(x, cc, z[i]);
                        acc[0] = simd.$fma(x, v[i], acc[0]);
                        i += 1;
                    }
                    let acc = simd.$add(simd.$add(acc[0], acc[1]), simd.$add(acc[2], acc[3]));
                    let mut sum = simd.$reduce(acc) + head;
                    for i in 0..a_tail.len() {
                        let x = c.rw.mul_add(w_tail[i], c.ru.mul_add(u_tail[i], a_tail[i]));
                        a_tail[i] = x;
                        z_tail[i] = x.mul_add(c.c, z_tail[i]);
                        sum = x.mul_add(v_tail[i], sum);
                    }
                    sum
                };
                let block = |c: BlockArgs<'_, $t>| -> [$t; BLOCK] {
                    let BlockArgs {
                        mut columns,
                        u,
                        w,
                        v,
                        z,
                        coefficients,
                    } = c;
                    let mut sums = [0.0; BLOCK];
                    block_triangle(&mut columns, u, w, v, z, &coefficients, &mut sums);
                    let (mut cols, u, w, v, z) = shared_rows(columns, u, w, v, z);
                    // Scalar rows up to the 64-byte boundary, aligned vectors (one per
                    // column a step: each column's sum then waits on one FMA per step, which
                    // the step's loads and stores outlast), scalar rows after them.
                    let n = z.len();
                    let h = z.as_ptr().align_offset(64).min(n);
                    block_rows(&mut cols, u, w, v, z, &coefficients, 0..h, &mut sums);
                    let (zv, _) = S::$as_mut_simd(&mut z[h..]);
                    let k = zv.len();
                    let (uv, _) = S::$as_simd(&u[h..]);
                    let (wv, _) = S::$as_simd(&w[h..]);
                    let (vv, _) = S::$as_simd(&v[h..]);
                    let av = cols.each_mut().map(|a| S::$as_mut_simd(&mut a[h..]).0);
                    let coef = coefficients
                        .map(|(ru, rw, cc)| (simd.$splat(ru), simd.$splat(rw), simd.$splat(cc)));
                    let mut acc = [simd.$splat(0.0); BLOCK];
                    for i in 0..k {
                        let (u, w, v) = (uv[i], wv[i], vv[i]);
                        let mut zi = zv[i];
                        for c in 0..BLOCK {
                            let (ru, rw, cc) = coef[c];
                            let x = simd.$fma(rw, w, simd.$fma(ru, u, av[c][i]));
                            av[c][i] = x;
                            zi = simd.$fma(x, cc, zi);
                            acc[c] = simd.$fma(x, v, acc[c]);
                        }
                        zv[i] = zi;
                    }
                    let rest = h + k * S::$lanes;
                    block_rows(&mut cols, u, w, v, z, &coefficients, rest..n, &mut sums);
                    std::array::from_fn(|c| simd.$reduce(acc[c]) + sums[c])
                };
                // SAFETY: `Pass::run`'s caller upholds its contract.
                unsafe { self.pass.for_each_block(self.p, column, Some(block)) }
            }
        }
    };
}

/// Rows `0..BLOCK − 1` of a block (see [`BlockArgs`]): those above the last column's
/// diagonal, where fewer than [`BLOCK`] columns have entries; column by column within a row,
/// each column's dot product into `sums`.
#[inline(always)]
fn block_triangle<T: Element>(
    columns: &mut [&mut [T]; BLOCK],
    u: &[T],
    w: &[T],
    v: &[T],
    z: &mut [T],
    coefficients: &[(T, T, T); BLOCK],
    sums: &mut [T; BLOCK],
) {
    for r in 0..BLOCK - 1 {
        for (c, column) in columns.iter_mut().enumerate().take(r + 1) {
            let (ru, rw, cc) = coefficients[c];
            let a = &mut column[r - c];
            let x = rw.fused_mul_add(w[r], ru.fused_mul_add(u[r], *a));
            *a = x;
            z[r] = x.fused_mul_add(cc, z[r]);
            sums[c] = x.fused_mul_add(v[r], sums[c]);
        }
    }
}

/// A block's operands from the first row all its columns share (row `BLOCK − 1`), every
/// one of the same length: `(columns, u, w, v, z)`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn shared_rows<'a, T>(
    columns: [&'a mut [T]; BLOCK],
    u: &'a [T],
    w: &'a [T],
    v: &'a [T],
    z: &'a mut [T],
) -> ([&'a mut [T]; BLOCK], &'a [T], &'a [T], &'a [T], &'a mut [T]) {
    let first = BLOCK - 1;
    let n = columns[0].len() - first;
    let mut c = 0;
    let columns = columns.map(|column| {
        let rows = &mut column[first - c..][..n];
        c += 1;
        rows
    });
    let z = &mut z[first..first + n];
    (
        columns,
        &u[first..first + n],
        &w[first..first + n],
        &v[first..first + n],
        z,
    )
}

/// Rows `rows` of a block's shared part (operands from [`shared_rows`]) in scalar code: per
/// row, `x_c = a_c + ru_c·u + rw_c·w` for each column `c` in turn, `z += c_c·x_c`,
/// `sums[c] += x_c·v`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_rows<T: Element>(
    columns: &mut [&mut [T]; BLOCK],
    u: &[T],
    w: &[T],
    v: &[T],
    z: &mut [T],
    coefficients: &[(T, T, T); BLOCK],
    rows: std::ops::Range<usize>,
    sums: &mut [T; BLOCK],
) {
    for i in rows {
        let mut zi = z[i];
        for (c, column) in columns.iter_mut().enumerate() {
            let (ru, rw, cc) = coefficients[c];
            let x = rw.fused_mul_add(w[i], ru.fused_mul_add(u[i], column[i]));
            column[i] = x;
            zi = x.fused_mul_add(cc, zi);
            sums[c] = x.fused_mul_add(v[i], sums[c]);
        }
        z[i] = zi;
    }
}

simd_part!(
    SimdPartF64,
    f64,
    as_simd_f64s,
    as_mut_simd_f64s,
    splat_f64s,
    mul_add_f64s,
    add_f64s,
    reduce_sum_f64s,
    F64_LANES
);
simd_part!(
    SimdPartF32,
    f32,
    as_simd_f32s,
    as_mut_simd_f32s,
    splat_f32s,
    mul_add_f32s,
    add_f32s,
    reduce_sum_f32s,
    F32_LANES
);

/// A chunk of the pass and its kernels for AVX-512, in `f32` or `f64`: as the pulp kernels
/// above, but the unaligned head of a block's (or a column's) rows, up to the first 64-byte
/// boundary, and its tail are one masked vector each, not a scalar loop, and the block's
/// rows go two vectors a step into two sets of sums. At 768² `f32` on one core this kernel
/// took 8.1–8.2 ms against the pulp block kernel's 10.0–10.2 on the same AVX-512 vectors.
macro_rules! avx512_part {
    (
        $chunk:ident,
        $column:ident,
        $step:ident,
        $block:ident,
        $block_step:ident,
        $t:ty,
        $v:ty,
        $lanes:expr,
        $mask:ty,
        $zero:ident,
        $set1:ident,
        $maskz_loadu:ident,
        $mask_storeu:ident,
        $fmadd:ident,
        $add:ident,
        $reduce:ident
    ) => {
        /// Runs chunk `p` of `pass` with its AVX-512 column kernel.
        ///
        /// # Safety
        /// As [`Pass::run`], and the CPU must have AVX-512F.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $chunk(pass: &Pass<$t>, p: usize) {
            // SAFETY: the caller upholds the contract and has checked AVX-512F.
            unsafe {
                pass.for_each_block(p, |c| $column(c), Some(|b: BlockArgs<'_, $t>| $block(b)))
            }
        }

        /// One column of the pass (see [`fused_column`]) on AVX-512: a masked head up to
        /// the 64-byte boundary, vectors four at a time, a masked tail. Needs AVX-512F.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $column(c: ColumnArgs<'_, $t>) -> $t {
            const LANES: usize = $lanes;
            const FULL: $mask = !0;
            let len = c.a.len();
            assert!(
                c.u.len() >= len && c.w.len() >= len && c.v.len() >= len && c.z.len() >= len,
                "the operands hold the column's length"
            );
            let ptrs = (
                c.a.as_mut_ptr(),
                c.z.as_mut_ptr(),
                c.u.as_ptr(),
                c.w.as_ptr(),
                c.v.as_ptr(),
            );
            let coef = ($set1(c.ru), $set1(c.rw), $set1(c.c));
            let mut acc = [$zero(); 4];
            // `align_offset` may answer `usize::MAX`; the head must stay one masked vector.
            let h = ptrs.0.align_offset(64).min(LANES - 1).min(len);
            let end = h + (len - h) / LANES * LANES;
            // SAFETY (every call below): the entries touched lie below `len`, which every
            // operand holds (asserted), and the CPU has AVX-512F (this function's feature).
            if h > 0 {
                let m = ((1u32 << h) - 1) as $mask;
                acc[2] = unsafe { $step(ptrs, coef, 0, m, acc[2]) };
            }
            let mut i = h;
            while i + 4 * LANES <= end {
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc = unsafe { $step(ptrs, coef, i + l * LANES, FULL, *acc) };
                }
                i += 4 * LANES;
            }
            while i < end {
                acc[0] = unsafe { $step(ptrs, coef, i, FULL, acc[0]) };
                i += LANES;
            }
            if end < len {
                let m = ((1u32 << (len - end)) - 1) as $mask;
                acc[3] = unsafe { $step(ptrs, coef, end, m, acc[3]) };
            }
            $reduce($add($add(acc[0], acc[1]), $add(acc[2], acc[3])))
        }

        /// [`BLOCK`] neighbouring columns of the pass (see [`BlockArgs`]) on AVX-512: the
        /// triangle of rows `j..j + BLOCK − 1` in scalar code, then the rows all of them
        /// share together (a masked head, vectors two at a time, a masked tail), so that `u`,
        /// `w`, `v` and `z` are loaded, and `z` stored, once for the block. Needs AVX-512F.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $block(c: BlockArgs<'_, $t>) -> [$t; BLOCK] {
            const LANES: usize = $lanes;
            const FULL: $mask = !0;
            let BlockArgs {
                mut columns,
                u,
                w,
                v,
                z,
                coefficients,
            } = c;
            let len = columns[0].len();
            assert!(
                len >= BLOCK
                    && (0..BLOCK).all(|c| columns[c].len() == len - c)
                    && u.len() >= len
                    && w.len() >= len
                    && v.len() >= len
                    && z.len() >= len,
                "the operands hold the block's length"
            );
            let mut sums = [0.0; BLOCK];
            block_triangle(&mut columns, u, w, v, z, &coefficients, &mut sums);
            let shared = BLOCK - 1;
            let n = len - shared;
            let ptrs = (
                std::array::from_fn(|c| columns[c][shared - c..].as_mut_ptr()),
                z[shared..].as_mut_ptr(),
                u[shared..].as_ptr(),
                w[shared..].as_ptr(),
                v[shared..].as_ptr(),
            );
            let coef: [($v, $v, $v); BLOCK] = std::array::from_fn(|c| {
                let (ru, rw, cc) = coefficients[c];
                ($set1(ru), $set1(rw), $set1(cc))
            });
            let mut acc = [[$zero(); BLOCK]; 2];
            // `align_offset` may answer `usize::MAX`; the head must stay one masked vector.
            let h = ptrs.1.align_offset(64).min(LANES - 1).min(n);
            let end = h + (n - h) / LANES * LANES;
            // SAFETY (every call below): the rows touched lie below `n`, which every operand
            // holds from the pointers above (asserted), and the CPU has AVX-512F.
            if h > 0 {
                let m = ((1u32 << h) - 1) as $mask;
                unsafe { $block_step(&ptrs, &coef, 0, m, &mut acc[1]) };
            }
            let mut i = h;
            while i + 2 * LANES <= end {
                for (l, acc) in acc.iter_mut().enumerate() {
                    unsafe { $block_step(&ptrs, &coef, i + l * LANES, FULL, acc) };
                }
                i += 2 * LANES;
            }
            if i < end {
                unsafe { $block_step(&ptrs, &coef, i, FULL, &mut acc[0]) };
            }
            if end < n {
                let m = ((1u32 << (n - end)) - 1) as $mask;
                unsafe { $block_step(&ptrs, &coef, end, m, &mut acc[1]) };
            }
            std::array::from_fn(|c| $reduce($add(acc[0][c], acc[1][c])) + sums[c])
        }

        /// Rows `i..i + LANES` of a block under the mask `m` (pointers `(columns, z, u, w,
        /// v)` from the block's first shared row): `x_c = a_c + ru_c·u + rw_c·w` stored to
        /// each column, `z += c_c·x_c` in column order, `acc_c += x_c·v`. Lanes masked off are
        /// neither read nor written, and add zero to the sums; with every lane on (`FULL`)
        /// LLVM emits plain loads and stores.
        ///
        /// # Safety
        /// The operands must hold the lanes of `m` from `i`; the CPU must have AVX-512F.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn $block_step(
            (pa, pz, pu, pw, pv): &([*mut $t; BLOCK], *mut $t, *const $t, *const $t, *const $t),
            coef: &[($v, $v, $v); BLOCK],
            i: usize,
            m: $mask,
            acc: &mut [$v; BLOCK],
        ) {
            // SAFETY: the caller upholds the contract.
            unsafe {
                let (u, w, v) = (
                    $maskz_loadu(m, pu.add(i)),
                    $maskz_loadu(m, pw.add(i)),
                    $maskz_loadu(m, pv.add(i)),
                );
                let mut z = $maskz_loadu(m, pz.add(i));
                for c in 0..BLOCK {
                    let (ru, rw, cc) = coef[c];
                    let x = $fmadd(rw, w, $fmadd(ru, u, $maskz_loadu(m, pa[c].add(i))));
                    $mask_storeu(pa[c].add(i), m, x);
                    z = $fmadd(x, cc, z);
                    acc[c] = $fmadd(x, v, acc[c]);
                }
                $mask_storeu(pz.add(i), m, z);
            }
        }

        /// Entries `i..i + LANES` of a column under the mask `m`: `x = a + ru·u + rw·w` is
        /// stored to `a`, `z += c·x`, and `acc + x·v` returned. Lanes masked off are neither
        /// read nor written, and add zero to `acc`; with every lane on (`FULL`) LLVM emits
        /// plain loads and stores.
        ///
        /// # Safety
        /// The operands must hold the lanes of `m` from `i`; the CPU must have AVX-512F.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn $step(
            (pa, pz, pu, pw, pv): (*mut $t, *mut $t, *const $t, *const $t, *const $t),
            (ru, rw, cc): ($v, $v, $v),
            i: usize,
            m: $mask,
            acc: $v,
        ) -> $v {
            // SAFETY: the caller upholds the contract.
            unsafe {
                let x = $fmadd(
                    rw,
                    $maskz_loadu(m, pw.add(i)),
                    $fmadd(ru, $maskz_loadu(m, pu.add(i)), $maskz_loadu(m, pa.add(i))),
                );
                $mask_storeu(pa.add(i), m, x);
                $mask_storeu(pz.add(i), m, $fmadd(x, cc, $maskz_loadu(m, pz.add(i))));
                $fmadd(x, $maskz_loadu(m, pv.add(i)), acc)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m512, __m512d, _mm512_add_pd, _mm512_add_ps, _mm512_fmadd_pd, _mm512_fmadd_ps,
    _mm512_mask_storeu_pd, _mm512_mask_storeu_ps, _mm512_maskz_loadu_pd, _mm512_maskz_loadu_ps,
    _mm512_reduce_add_pd, _mm512_reduce_add_ps, _mm512_set1_pd, _mm512_set1_ps, _mm512_setzero_pd,
    _mm512_setzero_ps,
};

avx512_part!(
    chunk_avx512_f32,
    column_avx512_f32,
    step_avx512_f32,
    block_avx512_f32,
    block_step_avx512_f32,
    f32,
    __m512,
    16,
    u16,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_maskz_loadu_ps,
    _mm512_mask_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_reduce_add_ps
);
avx512_part!(
    chunk_avx512_f64,
    column_avx512_f64,
    step_avx512_f64,
    block_avx512_f64,
    block_step_avx512_f64,
    f64,
    __m512d,
    8,
    u8,
    _mm512_setzero_pd,
    _mm512_set1_pd,
    _mm512_maskz_loadu_pd,
    _mm512_mask_storeu_pd,
    _mm512_fmadd_pd,
    _mm512_add_pd,
    _mm512_reduce_add_pd
);

/// One column of the pass in plain Rust (types other than `f32` and `f64`):
/// `a −= w₀·u + u₀·w` (coefficients passed negated as `ru`, `rw`), `z += c·a`; returns
/// `Σ aᵢvᵢ` over the updated column, diagonal included.
fn fused_column<T: Element>(c: ColumnArgs<'_, T>) -> T {
    let mut sum = T::ZERO;
    for i in 0..c.a.len() {
        let x =
            c.rw.fused_mul_add(c.w[i], c.ru.fused_mul_add(c.u[i], c.a[i]));
        c.a[i] = x;
        c.z[i] = x.fused_mul_add(c.c, c.z[i]);
        sum = x.fused_mul_add(c.v[i], sum);
    }
    sum
}

/// Hand-off between the calling thread and the second worker, one step at a time.
struct Handoff<T> {
    /// `k + 1` once step `k` is posted; [`FINISHED`] at the end.
    job: AtomicUsize,
    /// `(k + 1) << 8 | m`: the chunks of step `k` claimed so far (bit `c` of `m`).
    claims: AtomicU64,
    /// `(k + 1) << 8 | count`: chunks of step `k` finished by the second worker.
    finished: AtomicU64,
    /// The posted pass (written before `job` is released).
    pass: Mutex<Option<Pass<T>>>,
}

const FINISHED: usize = usize::MAX;

impl<T> Handoff<T> {
    /// Claims the first (`front`) or last chunk of step `step` not claimed yet.
    fn claim(&self, step: u64, front: bool) -> Option<usize> {
        let mut cur = self.claims.load(Ordering::Acquire);
        loop {
            let free = !cur & ((1 << CHUNKS) - 1);
            if cur >> 8 != step || free == 0 {
                return None;
            }
            let c = if front {
                free.trailing_zeros()
            } else {
                63 - free.leading_zeros()
            } as usize;
            match self.claims.compare_exchange_weak(
                cur,
                cur | 1 << c,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(c),
                Err(now) => cur = now,
            }
        }
    }
}

/// Reduces the symmetric matrix whose lower triangle is `a` (a faer allocation) to
/// tridiagonal form in place, sharing each step's pass between the calling thread and a
/// second rayon worker when `two_cores`; then gives `a` back to the thread's scratch.
pub(crate) fn tridiagonalize<T: Element>(a: Mat<T>, two_cores: bool) -> Tridiagonal {
    tridiagonalize_with(a, two_cores, ColumnKernel::Fastest)
}

/// The column kernels of the pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // the library runs `Fastest`; the tests every kernel
pub(crate) enum ColumnKernel {
    /// AVX-512 where the CPU has it (masked heads and tails), else the portable one.
    Fastest,
    /// pulp's widest vectors with scalar heads and tails, on every CPU (blocks of columns
    /// as the AVX-512 kernel, one vector of rows a step: on AVX2's sixteen registers two
    /// sets of sums spilled).
    Portable,
    /// The portable kernel on AVX2 + FMA (pulp's `V3`), where the CPU has them, even if it
    /// has wider vectors; else the portable one. For the tests: CPUs without AVX-512 run it.
    Avx2,
}

/// [`tridiagonalize`] with a choice of column kernel (the tests compare them).
pub(crate) fn tridiagonalize_with<T: Element>(
    a: Mat<T>,
    two_cores: bool,
    kernel: ColumnKernel,
) -> Tridiagonal {
    let mut work = Work::new(a, kernel);
    let tri = reduce_all(&mut work, two_cores);
    release_scratch(work.a);
    tri
}

fn reduce_all<T: Element>(work: &mut Work<T>, two_cores: bool) -> Tridiagonal {
    let n = work.n();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n.saturating_sub(1)];
    if n == 0 {
        return Tridiagonal { d, e };
    }
    if !two_cores || n < SPLIT_MIN + 2 {
        reduce(work, &mut d, &mut e, None);
        return Tridiagonal { d, e };
    }
    let handoff = Handoff {
        job: AtomicUsize::new(0),
        claims: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        pass: Mutex::new(None),
    };
    rayon::join(
        || {
            // Releases the helper however `reduce` ends (a panic included: rayon's join
            // waits for both sides before it propagates one).
            struct Finish<'a>(&'a AtomicUsize);
            impl Drop for Finish<'_> {
                fn drop(&mut self) {
                    self.0.store(FINISHED, Ordering::Release);
                }
            }
            let _finish = Finish(&handoff.job);
            reduce(work, &mut d, &mut e, Some(&handoff));
        },
        || helper(&handoff),
    );
    Tridiagonal { d, e }
}

/// The second worker: runs chunks of each posted pass, from the last, until the reduction
/// finishes.
fn helper<T: Element>(h: &Handoff<T>) {
    let mut seen = 0;
    loop {
        let job = h.job.load(Ordering::Acquire);
        if job == FINISHED {
            return;
        }
        if job == seen {
            std::hint::spin_loop();
            continue;
        }
        seen = job;
        // The pass read here may already be a later step's; then every claim for `job`
        // fails (the caller retags the claims before it posts a new pass).
        let Some(pass) = *h.pass.lock().unwrap_or_else(|e| e.into_inner()) else {
            continue;
        };
        while let Some(c) = h.claim(job as u64, false) {
            // SAFETY: chunk c of the posted pass is this thread's alone (claimed), and the
            // caller waits for it before touching the work.
            unsafe { pass.run(c) };
            h.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The reduction proper (on the calling thread); with a hand-off, each large step's chunks
/// are offered to the second worker too. Compiled for the widest SIMD the CPU has (pulp),
/// so that the `O(n)` vector operations of each step vectorise too.
fn reduce<T: Element>(
    work: &mut Work<T>,
    d: &mut [f64],
    e: &mut [f64],
    handoff: Option<&Handoff<T>>,
) {
    struct Reduce<'a, T> {
        work: &'a mut Work<T>,
        d: &'a mut [f64],
        e: &'a mut [f64],
        handoff: Option<&'a Handoff<T>>,
    }
    impl<T: Element> pulp::WithSimd for Reduce<'_, T> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            reduce_body(self.work, self.d, self.e, self.handoff);
        }
    }
    pulp::Arch::new().dispatch(Reduce {
        work,
        d,
        e,
        handoff,
    });
}

#[inline(always)]
fn reduce_body<T: Element>(
    work: &mut Work<T>,
    d: &mut [f64],
    e: &mut [f64],
    handoff: Option<&Handoff<T>>,
) {
    let (n, ld) = (work.n(), work.ld());
    let kernel = work.kernel;
    let (a, [y, w, zeros, z @ ..]) = work.split();
    for k in 0..n {
        // The previous step's update of column k (its reflector u = [1; A[k+1.., k−1]]).
        if k > 0 {
            let (left, right) = a.split_at_mut(k * ld);
            let u = &left[(k - 1) * ld + k + 1..(k - 1) * ld + n];
            update_column(&mut right[k..n], T::ONE, u, y[k], &y[k + 1..]);
        }
        d[k] = a[k * ld + k].to_f64();
        if k + 1 == n {
            break;
        }
        // The reflector of column k: [A[k+1, k]; x] ↦ [β; 0], v = [1; x/(α − β)].
        let (beta, tau_inv) = reflector(&mut a[k * ld + k + 1..k * ld + n]);
        e[k] = beta.to_f64();
        // Column k + 1 gets the previous step's update explicitly (the pass covers k + 2..).
        let (left, right) = a.split_at_mut((k + 1) * ld);
        let x = &left[k * ld + k + 2..k * ld + n];
        let (col, trailing) = right.split_at_mut(ld);
        let col = &mut col[k + 1..n];
        if k > 0 {
            let u = &left[(k - 1) * ld + k + 1..(k - 1) * ld + n];
            update_column(col, u[0], &u[1..], y[k + 1], &y[k + 2..]);
        }
        // The pass over the trailing block A[k+2.., k+2..] (m × m). Every operand starts at
        // row k + 2 of its column, so all share one alignment.
        let m = n - k - 2;
        w[k + 2..].copy_from_slice(&y[k + 2..]);
        let bounds = chunk_bounds(m);
        if m > 0 {
            let u = if k > 0 {
                &left[(k - 1) * ld + k + 2..]
            } else {
                &zeros[k + 2..]
            };
            let pass = Pass {
                a: trailing[k + 2..].as_mut_ptr(),
                ld,
                m,
                bounds,
                u: u.as_ptr(),
                w: w[k + 2..].as_ptr(),
                v: x.as_ptr(),
                y: y[k + 2..].as_mut_ptr(),
                z: std::array::from_fn(|c| z[c][k + 2..].as_mut_ptr()),
                tau_inv,
                kernel,
            };
            match handoff {
                Some(h) if bounds[1] < m => {
                    let step = (k + 1) as u64;
                    let empty = (0..CHUNKS)
                        .filter(|&c| bounds[c] == bounds[c + 1])
                        .fold(0u64, |mask, c| mask | 1 << c);
                    let wanted = CHUNKS as u64 - u64::from(empty.count_ones());
                    h.claims.store(step << 8 | empty, Ordering::Relaxed);
                    h.finished.store(step << 8, Ordering::Relaxed);
                    *h.pass.lock().unwrap_or_else(|e| e.into_inner()) = Some(pass);
                    h.job.store(k + 1, Ordering::Release);
                    while let Some(c) = h.claim(step, true) {
                        // SAFETY: chunk c is this thread's alone (claimed).
                        unsafe { pass.run(c) };
                        h.finished.fetch_add(1, Ordering::Relaxed);
                    }
                    while h.finished.load(Ordering::Acquire) & 0xff < wanted {
                        std::hint::spin_loop();
                    }
                }
                _ => {
                    for c in 0..CHUNKS {
                        // SAFETY: one thread runs every chunk.
                        unsafe { pass.run(c) };
                    }
                }
            }
        }
        // y = τ⁻¹·A·v − b·v over rows k+1.., with v = [1; x]; the chunks' accumulators are
        // added in chunk order whoever ran them.
        let y2 = &mut y[k + 2..];
        let a21 = &col[1..];
        for (yi, a) in y2.iter_mut().zip(a21) {
            *yi += *a * tau_inv;
        }
        for c in 0..CHUNKS {
            if bounds[c] < bounds[c + 1] {
                let first = bounds[c];
                for (yi, z) in y2[first..].iter_mut().zip(&z[c][k + 2 + first..n]) {
                    *yi += *z;
                }
            }
        }
        let y1 = (col[0] + dot(a21, x)) * tau_inv;
        let b = (y1 + dot(x, y2)) * T::from_f64(0.5) * tau_inv;
        y[k + 1] = y1 - b;
        for (yi, x) in y[k + 2..].iter_mut().zip(x) {
            *yi -= b * *x;
        }
    }
}

/// The previous step's rank-2 update `A ← A − uyᵀ − yuᵀ` of one column from its diagonal
/// down, `col = A[j.., j]`: `col −= u_j·y[j..] + y_j·u[j..]`, with `u[j..] = [u₀; u]` and
/// `y[j..] = [y₀; y]`.
#[inline(always)]
fn update_column<T: Element>(col: &mut [T], u0: T, u: &[T], y0: T, y: &[T]) {
    let (head, rest) = col.split_first_mut().expect("a column from its diagonal");
    *head -= u0 * y0 + y0 * u0;
    for ((c, u), y) in rest.iter_mut().zip(u).zip(y) {
        *c -= *u * y0 + *y * u0;
    }
}

/// `Σ xᵢyᵢ` with eight partial sums (which vectorise).
#[inline(always)]
fn dot<T: Element>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] = x[l].fused_mul_add(y[l], acc[l]);
        }
    }
    let mut sum = T::ZERO;
    for (x, y) in xr.iter().zip(yr) {
        sum = x.fused_mul_add(*y, sum);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + sum
}

/// LAPACK's `dlarfg` on `c = [α; x]`: overwrites `α` with `β = −sign(α)‖c‖` and `x` with the
/// reflector's tail `x/(α − β)`, and returns `(β, τ⁻¹)` with `τ⁻¹ = (β − α)/β`, so that
/// `(I − τ⁻¹vvᵀ)c = βe₁` for `v = [1; x/(α − β)]`. A zero `x` gives the identity (`τ⁻¹ = 0`).
///
/// The norm is formed in `f64`: for `f32` input no square can overflow or underflow there;
/// for `f64`, a sum of squares outside `[2⁻⁹⁶⁰, 2⁹⁶⁰]` is recomputed scaled by `max|cᵢ|`.
#[inline(always)]
fn reflector<T: Element>(c: &mut [T]) -> (T, T) {
    let (alpha, x) = c.split_first_mut().expect("a column below the diagonal");
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let mut ss = chunks
        .remainder()
        .iter()
        .map(|v| v.to_f64() * v.to_f64())
        .sum::<f64>();
    for v in chunks {
        for l in 0..8 {
            let v = v[l].to_f64();
            acc[l] = v.mul_add(v, acc[l]);
        }
    }
    ss += acc.iter().sum::<f64>();
    let a = alpha.to_f64();
    let norm = if (2f64.powi(-960)..=2f64.powi(960)).contains(&ss) {
        a.hypot(ss.sqrt())
    } else {
        let scale = x.iter().fold(0.0f64, |s, v| s.max(v.to_f64().abs()));
        if scale == 0.0 {
            return (*alpha, T::ZERO);
        }
        let scale = scale.max(a.abs());
        let ss = x.iter().map(|v| (v.to_f64() / scale).powi(2)).sum::<f64>();
        scale * ((a / scale).powi(2) + ss).sqrt()
    };
    let beta = if a >= 0.0 { -norm } else { norm };
    let r = T::from_f64(1.0 / (a - beta));
    for v in x.iter_mut() {
        *v *= r;
    }
    let beta = T::from_f64(beta);
    let tau_inv = (beta - *alpha) / beta;
    *alpha = beta;
    (beta, tau_inv)
}
