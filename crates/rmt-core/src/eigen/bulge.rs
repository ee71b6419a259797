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

/// Lower band storage with room for the bulge.
pub(crate) struct Band<T> {
    n: usize,
    b: usize,
    ld: usize,
    data: Vec<T>,
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

    /// Offset of element `(i, j)`, `i ≥ j`.
    #[inline]
    fn at(&self, i: usize, j: usize) -> usize {
        (i - j) + j * self.ld
    }

    /// Column `j` of the dense block `A[r..r+len, j]` (requires `r ≥ j`).
    #[inline]
    fn col_mut(&mut self, r: usize, len: usize, j: usize) -> &mut [T] {
        let o = self.at(r, j);
        &mut self.data[o..o + len]
    }

    /// `D ← H D H` for the symmetric diagonal block `D = A[r..r+len, r..r+len]` (lower
    /// triangle) and `H = I − τ v vᵀ`: `p = τDv`, `w = p − ½τ(pᵀv)v`, `D −= v wᵀ + w vᵀ`.
    fn two_sided(&mut self, r: usize, v: &[T], tau: T, p: &mut [T]) {
        let len = v.len();
        p[..len].iter_mut().for_each(|x| *x = T::ZERO);
        // p = D v from the lower triangle, one contiguous column at a time.
        for j in 0..len {
            let col = {
                let o = self.at(r + j, r + j);
                &self.data[o..o + len - j]
            };
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
            let o = self.at(r + j, r + j);
            let col = &mut self.data[o..o + len - j];
            for ((c, vi), pi) in col.iter_mut().zip(&v[j..]).zip(&p[j..]) {
                *c -= *vi * pj + *pi * vj;
            }
        }
    }

    /// Reduces to tridiagonal form; returns `(diagonal, subdiagonal)` in `f64`.
    pub(crate) fn tridiagonalize(mut self) -> (Vec<f64>, Vec<f64>) {
        let (n, b) = (self.n, self.b);
        let mut v = vec![T::ZERO; b];
        let mut v_next = vec![T::ZERO; b];
        let mut work = vec![T::ZERO; b];
        let mut bv = vec![T::ZERO; b];
        for c in 0..n.saturating_sub(2) {
            let mut len = b.min(n - 1 - c);
            if len < 2 {
                continue;
            }
            let mut r0 = c + 1;
            // First reflector: annihilate A[c+2..c+1+len, c].
            let tau = {
                let x = self.col_mut(r0, len, c);
                let (tau, beta) = householder(x);
                v[..len].copy_from_slice(x);
                x[0] = beta;
                x[1..].iter_mut().for_each(|e| *e = T::ZERO);
                tau
            };
            let mut tau = tau;
            if tau != T::ZERO {
                self.two_sided(r0, &v[..len], tau, &mut work);
            }
            loop {
                let r1 = r0 + len;
                if r1 >= n {
                    break;
                }
                let len2 = b.min(n - r1);
                // B = A[r1..r1+len2, r0..r0+len] ← B·H: B −= (Bv)(τv)ᵀ.
                if tau != T::ZERO {
                    bv[..len2].iter_mut().for_each(|e| *e = T::ZERO);
                    for (j, &vj) in v[..len].iter().enumerate() {
                        let col = self.col_mut(r1, len2, r0 + j);
                        axpy(vj, col, &mut bv[..len2]);
                    }
                    for (j, &vj) in v[..len].iter().enumerate() {
                        let col = self.col_mut(r1, len2, r0 + j);
                        axpy(-tau * vj, &bv[..len2], col);
                    }
                }
                // Annihilate the bulge's first column B[1.., 0].
                let tau2 = {
                    let x = self.col_mut(r1, len2, r0);
                    let (t2, beta) = householder(x);
                    v_next[..len2].copy_from_slice(x);
                    x[0] = beta;
                    x[1..].iter_mut().for_each(|e| *e = T::ZERO);
                    t2
                };
                if tau2 != T::ZERO {
                    let vn = &v_next[..len2];
                    for j in 1..len {
                        let col = self.col_mut(r1, len2, r0 + j);
                        let s = tau2 * dot(vn, col);
                        axpy(-s, vn, col);
                    }
                    let vn = v_next[..len2].to_vec();
                    self.two_sided(r1, &vn, tau2, &mut work);
                }
                r0 = r1;
                len = len2;
                tau = tau2;
                std::mem::swap(&mut v, &mut v_next);
            }
        }
        let diag = (0..n).map(|i| self.data[self.at(i, i)].to_f64()).collect();
        let sub = (0..n.saturating_sub(1))
            .map(|i| self.data[self.at(i + 1, i)].to_f64())
            .collect();
        (diag, sub)
    }
}
