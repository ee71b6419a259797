//! Stage 2 of the two-stage reduction: symmetric band (half-bandwidth `b`) → tridiagonal, by
//! Householder bulge chasing (Lang 1993; LAPACK `dsytrd_sb2st` without vectors).
//!
//! Sweep `c` annihilates column `c` below its subdiagonal with one reflector `H` of length
//! ≤ `b`, applied on both sides of the next diagonal block. Applied from the right to the
//! block below, `H` fills it (the bulge); a second reflector annihilates only the bulge's
//! first column, is applied from the left to the rest of that block and on both sides of the
//! next diagonal block, and so on to the end of the matrix. The remaining fill is removed by
//! the following sweeps, so the storage never needs more than `2b` subdiagonals.
//!
//! Storage: lower band, `ab[(i − j) + j·ld]` for `0 ≤ i − j ≤ 2b`, `ld = 2b + 1`. A dense
//! block `A[r.., c..]` is then column-major with leading dimension `ld − 1`: every column of
//! a block is contiguous.

use super::band::{axpy, dot, householder};
use crate::linalg::Element;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Lower band storage with room for the bulge.
pub(crate) struct Band<T> {
    n: usize,
    b: usize,
    ld: usize,
    data: Vec<T>,
}

/// How the sweeps of the chase are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// One sweep after another on the calling thread.
    Sequential,
    /// Two rayon workers, each sweep cut in half: one runs the heads, the other the tails; a
    /// step of sweep `c + 1` starts once sweep `c` has finished every step whose rows it
    /// touches.
    Pipelined,
}

impl Schedule {
    /// Pipelined when a second core is free ([`super::second_core_free`]) and the band is
    /// long enough.
    pub(crate) fn for_size(n: usize) -> Self {
        if n >= 256 && super::second_core_free() {
            Schedule::Pipelined
        } else {
            Schedule::Sequential
        }
    }
}

/// Shared view of the band's storage, handed to the two threads of the pipelined chase.
///
/// Step `t ≥ 1` of sweep `c` reads and writes only entries whose row and column both lie in
/// `[c + 1 + (t − 1)b, c + 1 + (t + 1)b)`; step 0 only `[c, c + 1 + b)`. Step `t` of sweep
/// `c + 1` therefore overlaps steps `t − 1 ..= t + 2` of sweep `c` and no later one: once
/// those are done, the two threads touch disjoint entries. `Pipelined` enforces exactly that
/// order, so the chase performs the same operations on the same values as `Sequential`
/// (bit-identical results).
struct BandView<T> {
    ptr: *mut T,
    len: usize,
    n: usize,
    b: usize,
    ld: usize,
}

// SAFETY: the view is shared by at most two threads, which (by the schedule above) never
// touch the same entry concurrently.
unsafe impl<T: Send> Send for BandView<T> {}
unsafe impl<T: Send> Sync for BandView<T> {}

/// Per-thread work vectors of one sweep.
struct Scratch<T> {
    v: Vec<T>,
    v_next: Vec<T>,
    p: Vec<T>,
    bv: Vec<T>,
}

impl<T: Element> Scratch<T> {
    fn new(b: usize) -> Self {
        Self {
            v: vec![T::ZERO; b],
            v_next: vec![T::ZERO; b],
            p: vec![T::ZERO; b],
            bv: vec![T::ZERO; b],
        }
    }
}

impl<T: Element> BandView<T> {
    /// Offset of element `(i, j)`, `i ≥ j`.
    #[inline]
    fn at(&self, i: usize, j: usize) -> usize {
        (i - j) + j * self.ld
    }

    /// Column `j` of the dense block `A[r..r+len, j]` (requires `r ≥ j`).
    ///
    /// # Safety
    /// No other live reference may cover these entries (see the type's invariant).
    #[inline]
    #[allow(clippy::mut_from_ref)]
    unsafe fn col(&self, r: usize, len: usize, j: usize) -> &mut [T] {
        let o = self.at(r, j);
        assert!(o + len <= self.len, "band access out of bounds");
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(o), len) }
    }

    /// `D ← H D H` for the symmetric diagonal block `D = A[r..r+len, r..r+len]` (lower
    /// triangle) and `H = I − τ v vᵀ`: `p = τDv`, `w = p − ½τ(pᵀv)v`, `D −= v wᵀ + w vᵀ`.
    ///
    /// # Safety
    /// The caller owns the block's entries.
    #[inline(always)]
    unsafe fn two_sided(&self, r: usize, v: &[T], tau: T, p: &mut [T]) {
        let len = v.len();
        p[..len].iter_mut().for_each(|x| *x = T::ZERO);
        // p = D v from the lower triangle, one contiguous column at a time.
        for j in 0..len {
            // SAFETY: the caller owns D.
            let col = unsafe { self.col(r + j, len - j, r + j) };
            // Column j of D below (and at) the diagonal: rows j..len.
            p[j] += col[0] * v[j] + dot(&col[1..], &v[j + 1..]);
            axpy(v[j], &col[1..], &mut p[j + 1..len]);
        }
        let p = &mut p[..len];
        p.iter_mut().for_each(|x| *x *= tau);
        let alpha = T::from_f64(-0.5) * tau * dot(p, v);
        axpy(alpha, v, p);
        for j in 0..len {
            let (vj, pj) = (v[j], p[j]);
            // SAFETY: as above.
            let col = unsafe { self.col(r + j, len - j, r + j) };
            for ((c, vi), pi) in col.iter_mut().zip(&v[j..]).zip(&p[j..]) {
                *c -= *vi * pj + *pi * vj;
            }
        }
    }

    /// The reflector `H = I − τvvᵀ` with `H·A[r..r+len, j] = β e₁`: writes `v` to `v[..len]`
    /// and `(β, 0, …, 0)` into the column, returns `τ`.
    ///
    /// # Safety
    /// The caller owns the column's entries.
    #[inline(always)]
    unsafe fn annihilate(&self, r: usize, len: usize, j: usize, v: &mut [T]) -> T {
        // SAFETY: by the caller's contract.
        let x = unsafe { self.col(r, len, j) };
        let (tau, beta) = householder(x);
        v[..len].copy_from_slice(x);
        x[0] = beta;
        x[1..].iter_mut().for_each(|e| *e = T::ZERO);
        tau
    }

    /// Step 0 of sweep `c`: the reflector annihilating `A[c+2..c+1+len, c]`, then
    /// `D₀ ← H D₀ H`. Returns the cursor the next step continues from (`None` when the
    /// sweep has nothing to annihilate); the reflector is left in `s.v`.
    ///
    /// # Safety
    /// The step's entries (rows and columns `c..c+1+b`) are owned by this thread.
    #[inline(always)]
    unsafe fn first_step_body(&self, c: usize, s: &mut Scratch<T>) -> Option<Cursor<T>> {
        let len = self.b.min(self.n - 1 - c);
        if len < 2 {
            return None;
        }
        let r0 = c + 1;
        // SAFETY: step 0 owns column c's rows c+1..c+1+len.
        let tau = unsafe { self.annihilate(r0, len, c, &mut s.v) };
        if tau != T::ZERO {
            // SAFETY: step 0 owns D₀.
            unsafe { self.two_sided(r0, &s.v[..len], tau, &mut s.p) };
        }
        Some(Cursor { r0, len, tau })
    }

    /// The next step of a sweep: applies the previous reflector (`s.v`, from the right) to
    /// the block below, annihilates the bulge's first column with a new reflector (left in
    /// `s.v`), and applies it to the rest of the block and on both sides of the next
    /// diagonal block. Returns `false` (doing nothing) at the end of the band.
    ///
    /// # Safety
    /// The step's entries (rows and columns `cur.r0..cur.r0+2b`) are owned by this thread.
    #[inline(always)]
    unsafe fn next_step_body(&self, cur: &mut Cursor<T>, s: &mut Scratch<T>) -> bool {
        let Cursor { r0, len, tau } = *cur;
        let r1 = r0 + len;
        if r1 >= self.n {
            return false;
        }
        let len2 = self.b.min(self.n - r1);
        // B = A[r1..r1+len2, r0..r0+len] ← B·H: B −= (Bv)(τv)ᵀ.
        if tau != T::ZERO {
            s.bv[..len2].iter_mut().for_each(|e| *e = T::ZERO);
            for (j, &vj) in s.v[..len].iter().enumerate() {
                // SAFETY: this step owns rows and columns r0..r1+len2.
                let col = unsafe { self.col(r1, len2, r0 + j) };
                axpy(vj, col, &mut s.bv[..len2]);
            }
            for (j, &vj) in s.v[..len].iter().enumerate() {
                // SAFETY: as above.
                let col = unsafe { self.col(r1, len2, r0 + j) };
                axpy(-tau * vj, &s.bv[..len2], col);
            }
        }
        // Annihilate the bulge's first column B[1.., 0].
        // SAFETY: as above.
        let tau2 = unsafe { self.annihilate(r1, len2, r0, &mut s.v_next) };
        if tau2 != T::ZERO {
            let vn = &s.v_next[..len2];
            for j in 1..len {
                // SAFETY: as above.
                let col = unsafe { self.col(r1, len2, r0 + j) };
                let d = tau2 * dot(vn, col);
                axpy(-d, vn, col);
            }
            // SAFETY: as above (D of rows r1..r1+len2).
            unsafe { self.two_sided(r1, vn, tau2, &mut s.p) };
        }
        std::mem::swap(&mut s.v, &mut s.v_next);
        *cur = Cursor {
            r0: r1,
            len: len2,
            tau: tau2,
        };
        true
    }

    /// Step 0 of sweep `c` ([`Self::first_step_body`]), compiled for AVX2 + FMA where the
    /// CPU has them. The chase's short loops (`dot`, `axpy` over `b`-long columns) are the
    /// whole step; in baseline x86-64 code they ran ≈ 3× slower on a Zen 5 (21 ms against
    /// 6.5 ms for the chase of n = 768 built for the native CPU; docs/performance.md). No
    /// contraction into FMAs happens (Rust never licenses it), so the results are bit for bit
    /// those of the baseline code.
    ///
    /// # Safety
    /// As [`Self::first_step_body`].
    unsafe fn first_step(&self, c: usize, s: &mut Scratch<T>) -> Option<Cursor<T>> {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has the features (checked); the caller's contract passes on.
            return unsafe { self.first_step_avx2(c, s) };
        }
        // SAFETY: the caller's contract passes on.
        unsafe { self.first_step_body(c, s) }
    }

    /// The next step of a sweep ([`Self::next_step_body`]), compiled for AVX2 + FMA where the
    /// CPU has them (see [`Self::first_step`]).
    ///
    /// # Safety
    /// As [`Self::next_step_body`].
    unsafe fn next_step(&self, cur: &mut Cursor<T>, s: &mut Scratch<T>) -> bool {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has the features (checked); the caller's contract passes on.
            return unsafe { self.next_step_avx2(cur, s) };
        }
        // SAFETY: the caller's contract passes on.
        unsafe { self.next_step_body(cur, s) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn first_step_avx2(&self, c: usize, s: &mut Scratch<T>) -> Option<Cursor<T>> {
        // SAFETY: the caller's contract passes on.
        unsafe { self.first_step_body(c, s) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn next_step_avx2(&self, cur: &mut Cursor<T>, s: &mut Scratch<T>) -> bool {
        // SAFETY: the caller's contract passes on.
        unsafe { self.next_step_body(cur, s) }
    }

    /// Number of steps of sweep `c` (0 when there is nothing to annihilate).
    fn steps(&self, c: usize) -> usize {
        let rows = self.n - 1 - c;
        if self.b.min(rows) < 2 {
            0
        } else {
            rows.div_ceil(self.b)
        }
    }
}

/// Where a sweep stands between two steps: the rows `r0..r0+len` the last reflector acted
/// on and its `τ` (the reflector itself is in the thread's `Scratch::v`).
#[derive(Clone, Copy)]
struct Cursor<T> {
    r0: usize,
    len: usize,
    tau: T,
}

/// A sweep handed from the head thread to the tail thread half-way down the band.
struct Handoff<T> {
    cursor: Cursor<T>,
    v: Vec<T>,
}

impl<T: Element> Band<T> {
    /// Copies the band `0 ≤ i − j ≤ b` of a column-major lower-stored matrix.
    pub(crate) fn from_lower(a: faer::MatRef<'_, T>, b: usize) -> Self {
        let n = a.nrows();
        let ld = 2 * b + 1;
        let mut data = vec![T::ZERO; ld * n + ld];
        for j in 0..n {
            for i in j..(j + b + 1).min(n) {
                data[(i - j) + j * ld] = a[(i, j)];
            }
        }
        Self { n, b, ld, data }
    }

    fn view(&mut self) -> BandView<T> {
        BandView {
            ptr: self.data.as_mut_ptr(),
            len: self.data.len(),
            n: self.n,
            b: self.b,
            ld: self.ld,
        }
    }

    /// Reduces to tridiagonal form; returns `(diagonal, subdiagonal)` in `f64`.
    pub(crate) fn tridiagonalize(self) -> (Vec<f64>, Vec<f64>) {
        let schedule = Schedule::for_size(self.n);
        self.tridiagonalize_with(schedule)
    }

    /// [`Band::tridiagonalize`] with an explicit schedule (both give identical results).
    pub(crate) fn tridiagonalize_with(mut self, schedule: Schedule) -> (Vec<f64>, Vec<f64>) {
        let (n, b) = (self.n, self.b);
        let sweeps = n.saturating_sub(2);
        let view = self.view();
        match schedule {
            Schedule::Sequential => {
                let mut s = Scratch::new(b);
                for c in 0..sweeps {
                    // SAFETY: one thread owns the whole band.
                    if let Some(mut cur) = unsafe { view.first_step(c, &mut s) } {
                        while unsafe { view.next_step(&mut cur, &mut s) } {}
                    }
                }
            }
            Schedule::Pipelined => {
                // Each sweep is cut in two: the head runs its first ⌈S/2⌉ steps and
                // publishes the cursor; the tail runs the rest, on a second rayon worker
                // (rayon's workers, still awake after stage 1's GEMMs, take it at once; an
                // extra OS thread would compete with them for the two cores). Each thread thus keeps working on its own half of the band
                // (its cache) while the split point drifts down by half a row per sweep.
                // A published tail is claimed by whichever thread gets to it first, and the
                // head never waits on a tail nobody runs: the chase finishes (sequentially)
                // even when no second worker picks the tail job up.
                let split = |c: usize| view.steps(c).div_ceil(2);
                // done[c]: steps of sweep c finished, in order.
                let done: Vec<AtomicUsize> = (0..sweeps).map(|_| AtomicUsize::new(0)).collect();
                let tails: Vec<Mutex<Option<Handoff<T>>>> =
                    (0..sweeps).map(|_| Mutex::new(None)).collect();
                let tail_started = AtomicBool::new(false);
                // Runs the published tail of sweep c, if nobody has claimed it yet.
                let run_tail = |c: usize, s: &mut Scratch<T>| {
                    let Some(Handoff { mut cursor, v }) = lock(&tails[c]).take() else {
                        return;
                    };
                    s.v[..v.len()].copy_from_slice(&v);
                    // Sweep c − 1's tail may still be running on the other thread (the head
                    // needed only its first steps); it depends on nothing, so this ends.
                    if c > 0 {
                        wait_until(&done[c - 1], view.steps(c - 1));
                    }
                    for t in split(c)..view.steps(c) {
                        // SAFETY: sweep c − 1 is finished (above), and the head's sweep
                        // c + 1 waits for each step here before touching its rows.
                        unsafe { view.next_step(&mut cursor, s) };
                        done[c].store(t + 1, Ordering::Release);
                    }
                };
                let head = || {
                    let mut s = Scratch::new(b);
                    // Tails the head claims run on their own work vectors (s holds the head's
                    // reflector between steps).
                    let mut ts = Scratch::new(b);
                    for c in 0..sweeps {
                        // Step t of sweep c overlaps steps ..= t + 2 of sweep c − 1.
                        let wait = |t: usize, s: &mut Scratch<T>| {
                            if c > 0 {
                                let target = (t + 3).min(view.steps(c - 1));
                                if done[c - 1].load(Ordering::Acquire) < target {
                                    // Before the tail worker runs, or when it has fallen
                                    // behind by a whole tail, the head takes the tail.
                                    if !tail_started.load(Ordering::Acquire) {
                                        run_tail(c - 1, s);
                                    }
                                    let since = std::time::Instant::now();
                                    while done[c - 1].load(Ordering::Acquire) < target {
                                        if since.elapsed() > PATIENCE {
                                            run_tail(c - 1, s);
                                        }
                                        std::hint::spin_loop();
                                    }
                                }
                            }
                        };
                        wait(0, &mut ts);
                        // SAFETY: the waits order this step after every overlapping step
                        // of sweep c − 1; the tail works only on later rows.
                        let Some(mut cur) = (unsafe { view.first_step(c, &mut s) }) else {
                            continue;
                        };
                        let split = split(c);
                        let handing_off = split < view.steps(c);
                        // The count reaches `split` only once the tail is published.
                        let publish = |finished: usize| {
                            if !(handing_off && finished == split) {
                                done[c].store(finished, Ordering::Release);
                            }
                        };
                        publish(1);
                        for t in 1..split {
                            wait(t, &mut ts);
                            // SAFETY: as above.
                            unsafe { view.next_step(&mut cur, &mut s) };
                            publish(t + 1);
                        }
                        if handing_off {
                            *lock(&tails[c]) = Some(Handoff {
                                cursor: cur,
                                v: s.v[..cur.len].to_vec(),
                            });
                            done[c].store(split, Ordering::Release);
                        }
                    }
                };
                let tail = || {
                    tail_started.store(true, Ordering::Release);
                    let mut s = Scratch::new(b);
                    for (c, finished) in done.iter().enumerate() {
                        if split(c) < view.steps(c) {
                            wait_until(finished, split(c));
                            run_tail(c, &mut s);
                        }
                    }
                };
                rayon::join(head, tail);
            }
        }
        let diag = (0..n).map(|i| self.data[self.ld * i].to_f64()).collect();
        let sub = (0..n.saturating_sub(1))
            .map(|i| self.data[1 + self.ld * i].to_f64())
            .collect();
        (diag, sub)
    }
}

/// How long the head waits on an unclaimed tail before running it itself: a few steps' worth
/// (a step is ≈ 5 µs at `b = 32`), far less than a tail (tens of steps).
const PATIENCE: std::time::Duration = std::time::Duration::from_micros(50);

/// Locks a mutex, ignoring poisoning (a panicking sweep already fails the whole chase).
fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spins (then yields) until `counter ≥ target`.
fn wait_until(counter: &AtomicUsize, target: usize) {
    let mut spins = 0u32;
    while counter.load(Ordering::Acquire) < target {
        if spins < 1 << 10 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// The pipelined chase performs the sequential chase's operations in a
    /// dependency-respecting order, so its output is bit-identical; sizes cover a last block
    /// shorter than `b`, `b` not dividing `n`, and a tiny band.
    #[test]
    fn pipelined_chase_is_bit_identical_to_sequential() {
        for (n, b) in [(300, 32), (257, 17), (64, 2), (40, 39), (5, 3)] {
            let mut rng = rand_pcg::Pcg64::seed_from_u64(n as u64);
            let x = Mat::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
            let a = Mat::from_fn(n, n, |i, j| x[(i, j)] + x[(j, i)]);
            let seq = Band::from_lower(a.as_ref(), b).tridiagonalize_with(Schedule::Sequential);
            let pip = Band::from_lower(a.as_ref(), b).tridiagonalize_with(Schedule::Pipelined);
            assert_eq!(seq, pip, "n={n} b={b}");
        }
    }
}
