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
//! between them by columns with equal areas. The rest of a step (the reflector, a few
//! vector operations) is `O(n)` and stays on the calling thread.
//!
//! The split shares the protocol of the pipelined chase in `bulge`: the calling thread
//! posts the second part of each step, a second rayon worker claims it, and a part nobody
//! has claimed by the time the caller finishes its own is run by the caller, so the
//! reduction never waits on a worker that is busy elsewhere. Both schedules perform the
//! same operations on the same values (bit-identical results).

use super::Tridiagonal;
use crate::linalg::Element;
use faer::MatRef;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Below this trailing size a step runs on one core: the pass then takes about as long as
/// handing half of it to the other core.
const SPLIT_MIN: usize = 96;

/// The second worker's share of a pass: a little over half, as the calling thread also runs
/// the `O(n)` rest of each step. On the Zen 5 (n = 512 … 1024, f32 and f64), 0.55 was
/// 2–5 % faster than 0.5; 0.6 and 0.65 were no faster.
const PART_1_AREA: f64 = 0.55;

/// Column-major working copy of the matrix and the step's vectors, in one buffer whose
/// columns (`ld` apart, `ld` a multiple of 16) start on 64-byte boundaries: every operand of
/// the pass then has the same alignment, so after a short scalar head its SIMD loads and
/// stores are aligned (unaligned, the pass ran ≈ 1.5× slower).
struct Work<T> {
    buf: Vec<T>,
    /// Offset of column 0 in `buf`.
    off: usize,
    n: usize,
    ld: usize,
}

/// Vector columns after the matrix's `n`: `y`, the previous `y` (`w`), the two parts'
/// accumulators `z₀`, `z₁`, and zeros (the "previous reflector" of step 0).
const VECTORS: usize = 5;

impl<T: Element> Work<T> {
    fn new(a: MatRef<'_, T>) -> Self {
        let n = a.nrows();
        let ld = n.next_multiple_of(16);
        let cols = n + VECTORS;
        let mut buf = vec![T::ZERO; ld * cols + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        for j in 0..n {
            let col = &mut buf[off + j * ld + j..off + j * ld + n];
            let src = a.col(j).subrows(j, n - j);
            match src.try_as_col_major() {
                Some(src) => col.copy_from_slice(src.as_slice()),
                None => col.iter_mut().zip(src.iter()).for_each(|(c, s)| *c = *s),
            }
        }
        Work { buf, off, n, ld }
    }

    /// The matrix (`n` columns, `ld` apart) and the vector columns after it.
    fn split(&mut self) -> (&mut [T], &mut [T]) {
        let (n, ld) = (self.n, self.ld);
        self.buf[self.off..].split_at_mut(n * ld)
    }
}

/// Raw view of [`Work`] for the pass of one step, shared by the two threads. Part 0 writes
/// columns `[0, cut)` of the trailing block, `z[0]` and `y[0..cut)`; part 1 columns
/// `[cut, m)`, `z[1]` and `y[cut..m)`. Everything else it touches is only read.
#[derive(Clone, Copy)]
struct Pass<T> {
    /// Entry `(0, 0)` of the trailing block `A[k+2.., k+2..]`; columns `ld` apart.
    a: *mut T,
    ld: usize,
    m: usize,
    cut: usize,
    /// The previous step's reflector (`u`) and `y` (`w`), and this step's reflector (`v`),
    /// restricted to the trailing block's rows: `m` entries each.
    u: *const T,
    w: *const T,
    v: *const T,
    /// `y[k+2..]` and the two parts' accumulators (`m` entries each, aligned as the rest).
    y: *mut T,
    z: [*mut T; 2],
    /// `τ⁻¹`.
    tau_inv: T,
}

// SAFETY: the two parts of a pass write disjoint entries (see `Pass`), and the caller does
// not touch the work between posting a step and the end of its part 1.
unsafe impl<T: Send> Send for Pass<T> {}
unsafe impl<T: Sync> Sync for Pass<T> {}

impl<T: Element> Pass<T> {
    /// Runs part `p` of the pass: for each column `j` of the part,
    /// `A[j.., j] −= w_j·u[j..] + u_j·w[j..]`, `z[j..] += τ⁻¹v_j·A[j.., j]` and
    /// `y_j = τ⁻¹·Σ_{i>j} A[i, j]·v_i`. `f32` and `f64` run explicit SIMD code for the
    /// widest vectors the CPU has (pulp dispatches once per part, at run time).
    ///
    /// # Safety
    /// The pointers must be valid for the ranges above, and no other thread may touch part
    /// `p`'s outputs meanwhile.
    unsafe fn run(&self, p: usize) {
        use std::any::TypeId;
        if TypeId::of::<T>() == TypeId::of::<f64>() {
            // SAFETY: T is f64.
            let pass = unsafe { &*(self as *const Pass<T>).cast::<Pass<f64>>() };
            pulp::Arch::new().dispatch(SimdPartF64 { pass, p });
        } else if TypeId::of::<T>() == TypeId::of::<f32>() {
            // SAFETY: T is f32.
            let pass = unsafe { &*(self as *const Pass<T>).cast::<Pass<f32>>() };
            pulp::Arch::new().dispatch(SimdPartF32 { pass, p });
        } else {
            // SAFETY: the caller upholds the contract.
            unsafe { self.for_each_column(p, fused_column) }
        }
    }

    /// Runs part `p` with `column` as the kernel of one column (see [`fused_column`]).
    ///
    /// # Safety
    /// As [`Pass::run`].
    #[inline(always)]
    unsafe fn for_each_column(&self, p: usize, column: impl Fn(ColumnArgs<'_, T>) -> T) {
        let (first, last) = if p == 0 {
            (0, self.cut)
        } else {
            (self.cut, self.m)
        };
        let m = self.m;
        // SAFETY: the ranges are inside the buffers (`Pass`'s contract), and this part alone
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
        let f = self.tau_inv;
        for j in first..last {
            // SAFETY: as above.
            let a = unsafe { std::slice::from_raw_parts_mut(self.a.add(j * self.ld + j), m - j) };
            let acc = column(ColumnArgs {
                a: &mut *a,
                u: &u[j..],
                w: &w[j..],
                v: &v[j..],
                z: &mut z[j - first..],
                ru: -w[j],
                rw: -u[j],
                c: f * v[j],
            });
            // SAFETY: y[j] belongs to this part.
            unsafe { *self.y.add(j) = f * (acc - a[0] * v[j]) };
        }
    }
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
    ($name:ident, $t:ty, $as_simd:ident, $as_mut_simd:ident, $splat:ident, $fma:ident, $add:ident, $reduce:ident) => {
        /// A part of the pass, vectorised for the CPU pulp dispatches to.
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
                // SAFETY: `Pass::run`'s caller upholds its contract.
                unsafe { self.pass.for_each_column(self.p, column) }
            }
        }
    };
}

simd_part!(
    SimdPartF64,
    f64,
    as_simd_f64s,
    as_mut_simd_f64s,
    splat_f64s,
    mul_add_f64s,
    add_f64s,
    reduce_sum_f64s
);
simd_part!(
    SimdPartF32,
    f32,
    as_simd_f32s,
    as_mut_simd_f32s,
    splat_f32s,
    mul_add_f32s,
    add_f32s,
    reduce_sum_f32s
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
struct Handoff {
    /// `2(k + 1)`: step `k`'s part 1 is posted; `+ 1`: claimed; `usize::MAX`: finished.
    job: AtomicUsize,
    /// `k + 1` once step `k`'s part 1 is done.
    done: AtomicUsize,
    /// The posted pass (written before `job` is released).
    pass: std::sync::Mutex<PassBits>,
}

/// A [`Pass`] as plain integers, so it can sit in a `Mutex` shared by the threads.
#[derive(Clone, Copy, Default)]
struct PassBits {
    ptrs: [usize; 7],
    ld: usize,
    m: usize,
    cut: usize,
    tau_inv: u64,
}

const FINISHED: usize = usize::MAX;

/// Reduces the symmetric matrix whose lower triangle is `a` to tridiagonal form, splitting
/// each step's pass between the calling thread and a second rayon worker when `two_cores`.
pub(crate) fn tridiagonalize<T: Element>(a: MatRef<'_, T>, two_cores: bool) -> Tridiagonal {
    let n = a.nrows();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n.saturating_sub(1)];
    if n == 0 {
        return Tridiagonal { d, e };
    }
    let mut work = Work::new(a);
    if !two_cores || n < SPLIT_MIN + 2 {
        reduce(&mut work, &mut d, &mut e, None);
        return Tridiagonal { d, e };
    }
    let handoff = Handoff {
        job: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        pass: std::sync::Mutex::new(PassBits::default()),
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
            reduce(&mut work, &mut d, &mut e, Some(&handoff));
        },
        || helper::<T>(&handoff),
    );
    Tridiagonal { d, e }
}

/// The second worker: claims and runs posted part-1 passes until the reduction finishes.
fn helper<T: Element>(h: &Handoff) {
    loop {
        let job = h.job.load(Ordering::Acquire);
        if job == FINISHED {
            return;
        }
        if job % 2 == 0
            && job > 0
            && h.job
                .compare_exchange(job, job + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let bits = lock(&h.pass);
            // SAFETY: the caller posted this pass and leaves part 1 to whoever claimed it.
            unsafe { Pass::<T>::from_bits(bits).run(1) };
            h.done.store(job / 2, Ordering::Release);
        } else {
            std::hint::spin_loop();
        }
    }
}

fn lock<X: Copy>(m: &std::sync::Mutex<X>) -> X {
    *m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Element> Pass<T> {
    fn to_bits(self) -> PassBits {
        PassBits {
            ptrs: [
                self.a as usize,
                self.u as usize,
                self.w as usize,
                self.v as usize,
                self.y as usize,
                self.z[0] as usize,
                self.z[1] as usize,
            ],
            ld: self.ld,
            m: self.m,
            cut: self.cut,
            tau_inv: self.tau_inv.to_f64().to_bits(),
        }
    }

    fn from_bits(b: PassBits) -> Self {
        let [a, u, w, v, y, z0, z1] = b.ptrs;
        Pass {
            a: a as *mut T,
            ld: b.ld,
            m: b.m,
            cut: b.cut,
            u: u as *const T,
            w: w as *const T,
            v: v as *const T,
            y: y as *mut T,
            z: [z0 as *mut T, z1 as *mut T],
            tau_inv: T::from_f64(f64::from_bits(b.tau_inv)),
        }
    }
}

/// The reduction proper (on the calling thread); with a hand-off, each large step's part 1
/// is offered to the second worker. Compiled for the widest SIMD the CPU has (pulp), so that
/// the `O(n)` vector operations of each step vectorise too.
fn reduce<T: Element>(work: &mut Work<T>, d: &mut [f64], e: &mut [f64], handoff: Option<&Handoff>) {
    struct Reduce<'a, T> {
        work: &'a mut Work<T>,
        d: &'a mut [f64],
        e: &'a mut [f64],
        handoff: Option<&'a Handoff>,
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
    handoff: Option<&Handoff>,
) {
    let (n, ld) = (work.n, work.ld);
    let (a, vectors) = work.split();
    let mut vectors = vectors.chunks_exact_mut(ld);
    let mut column = || vectors.next().expect("five vector columns");
    let (y, w, z0, z1, zeros) = (column(), column(), column(), column(), column());
    let (y, w) = (&mut y[..n], &mut w[..n]);
    for k in 0..n {
        // The previous step's update of column k: A[k.., k] −= u·y_k + y·u_k, where
        // u = [1; A[k+1.., k−1]].
        if k > 0 {
            let y1 = y[k];
            let (left, right) = a.split_at_mut(k * ld);
            let u = &left[(k - 1) * ld + k + 1..(k - 1) * ld + n];
            let col = &mut right[k..n];
            col[0] -= y1 + y1;
            for ((c, u), yi) in col[1..].iter_mut().zip(u).zip(&y[k + 1..]) {
                *c -= y1 * *u + *yi;
            }
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
            let u1 = left[(k - 1) * ld + k + 1];
            let u2 = &left[(k - 1) * ld + k + 2..(k - 1) * ld + n];
            let y1 = y[k + 1];
            col[0] -= u1 * y1 + y1 * u1;
            for ((c, u), yi) in col[1..].iter_mut().zip(u2).zip(&y[k + 2..]) {
                *c -= *u * y1 + *yi * u1;
            }
        }
        // The pass over the trailing block A[k+2.., k+2..] (m × m). Every operand starts at
        // row k + 2 of its column, so all share one alignment.
        let m = n - k - 2;
        w[k + 2..].copy_from_slice(&y[k + 2..]);
        // Part 1 (columns cut..m) holds a share `PART_1_AREA` of the triangle: its area is
        // (m − cut)²/2. The cut does not depend on who runs the parts, so every schedule
        // performs the same operations.
        let cut = if m >= SPLIT_MIN {
            (m as f64 * (1.0 - PART_1_AREA.sqrt())) as usize
        } else {
            m
        };
        let split = handoff.is_some() && cut < m;
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
                cut,
                u: u.as_ptr(),
                w: w[k + 2..].as_ptr(),
                v: x.as_ptr(),
                y: y[k + 2..].as_mut_ptr(),
                z: [z0[k + 2..].as_mut_ptr(), z1[k + 2..].as_mut_ptr()],
                tau_inv,
            };
            match handoff {
                Some(h) if split => {
                    *h.pass.lock().unwrap_or_else(|e| e.into_inner()) = pass.to_bits();
                    let posted = 2 * (k + 1);
                    h.job.store(posted, Ordering::Release);
                    // SAFETY: part 0's outputs are this thread's alone.
                    unsafe { pass.run(0) };
                    if h.job
                        .compare_exchange(posted, posted + 1, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        // Unclaimed: run it here.
                        // SAFETY: claimed by this thread.
                        unsafe { pass.run(1) };
                    } else {
                        while h.done.load(Ordering::Acquire) < k + 1 {
                            std::hint::spin_loop();
                        }
                    }
                }
                // SAFETY: one thread runs both parts.
                _ => unsafe {
                    pass.run(0);
                    pass.run(1);
                },
            }
        }
        // y = τ⁻¹·A·v − b·v over rows k+1.., with v = [1; x]:
        let y2 = &mut y[k + 2..];
        let a21 = &col[1..];
        let (z0, z1) = (&z0[k + 2..n], &z1[k + 2..n]);
        for (i, yi) in y2.iter_mut().enumerate() {
            let zi = if i >= cut { z0[i] + z1[i] } else { z0[i] };
            *yi += zi + a21[i] * tau_inv;
        }
        let y1 = (col[0] + dot(a21, x)) * tau_inv;
        let b = (y1 + dot(x, y2)) * T::from_f64(0.5) * tau_inv;
        y[k + 1] = y1 - b;
        for (yi, x) in y[k + 2..].iter_mut().zip(x) {
            *yi -= b * *x;
        }
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
