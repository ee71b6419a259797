//! Pure layout planning for the cuBLAS products: which operands cuBLAS can read in place and
//! how batch axes map onto strided-batched calls. No CUDA here, so the tests run everywhere.

/// How one operand's matrices (its last two axes) are laid out for cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MatrixLayout {
    /// Stored row-major (`false`) or column-major (`true`).
    pub column_major: bool,
    /// Leading dimension: the stride between rows (row-major) or columns (column-major).
    pub leading: usize,
}

/// The cuBLAS layout of a `rows × cols` matrix with element strides `(row_stride,
/// col_stride)`, or `None` when neither axis is unit-stride (it must be copied first).
/// A matrix with one row or one column takes whichever reading is valid.
pub(super) fn matrix_layout(
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Option<MatrixLayout> {
    // Column-major storage of a matrix is row-major storage of its transpose.
    let row_major = |leading| MatrixLayout {
        column_major: false,
        leading,
    };
    let column_major = |leading| MatrixLayout {
        column_major: true,
        leading,
    };
    row_major_leading(rows, cols, row_stride, col_stride)
        .map(row_major)
        .or_else(|| row_major_leading(cols, rows, col_stride, row_stride).map(column_major))
}

/// The leading dimension of a row-major reading of a `rows × cols` matrix with these strides:
/// unit stride along a row (or one column) and rows that do not overlap (or one row).
pub(super) fn row_major_leading(
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Option<usize> {
    if col_stride != 1 && cols != 1 {
        return None;
    }
    if rows == 1 {
        Some(cols.max(1))
    } else {
        (row_stride >= cols.max(1)).then_some(row_stride)
    }
}

/// The batch axes of a product, in elements: axes that share one stride per operand are
/// merged into one strided-batched call (`inner`), the rest are looped over on the host
/// (`outer`, each `(size, lhs stride, rhs stride, out stride)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BatchPlan {
    pub outer: Vec<[usize; 4]>,
    /// `(count, lhs stride, rhs stride, out stride)` of the strided batch.
    pub inner: [usize; 4],
}

/// The batch shape of a product whose operands' batch axes are `lhs` and `rhs` (equal rank),
/// broadcast as burn broadcasts (a size-1 axis takes the other's size), or `None` when they do
/// not broadcast.
pub(super) fn broadcast_batch(lhs: &[usize], rhs: &[usize]) -> Option<Vec<usize>> {
    lhs.iter()
        .zip(rhs)
        .map(|(&a, &b)| match (a, b) {
            _ if a == b || b == 1 => Some(a),
            (1, _) => Some(b),
            _ => None,
        })
        .collect()
}

/// Row-major strides of `shape`, the last axis's being `inner`.
pub(super) fn row_major_strides(shape: &[usize], inner: usize) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut stride = inner;
    for (s, &size) in strides.iter_mut().zip(shape).rev() {
        *s = stride;
        stride *= size;
    }
    strides
}

/// Strides for a product's output `[…, m, n]` (`out_shape`) laid out densely in the memory
/// order of its right operand `[…, k, n]` (`rhs_shape`, `rhs_strides`): the axes of `rhs`
/// (those longer than 1) sorted by stride, when the strides are distinct, the last axis is
/// innermost at stride 1 and the order is not the row-major one. Attention's `P·V` with `V`
/// split into heads (`[b, s, H, d]` read as `[b, H, s, d]`, or a slice of the heads' columns,
/// as MLA's values are) gets its output as `[b, s, H, d]` read as `[b, H, s, d]`, so merging
/// the heads back is a view, not a copy. `None` (a plain row-major output) otherwise, or when
/// a batch axis of `rhs` is broadcast.
pub(super) fn strides_in_order_of(
    rhs_shape: &[usize],
    rhs_strides: &[usize],
    out_shape: &[usize],
) -> Option<Vec<usize>> {
    let rank = rhs_shape.len();
    if rank < 3 || out_shape.len() != rank || rhs_strides.len() != rank {
        return None;
    }
    let batch_equal = rhs_shape[..rank - 2] == out_shape[..rank - 2];
    if !batch_equal || rhs_shape[rank - 2] < 2 || rhs_shape[rank - 1] < 2 {
        return None;
    }
    // The axes that matter (size > 1), innermost first by stride: distinct strides, the last
    // axis first at stride 1, and not already the row-major order.
    let mut order: Vec<usize> = (0..rank).filter(|&i| rhs_shape[i] > 1).collect();
    order.sort_by_key(|&i| rhs_strides[i]);
    let distinct = order
        .windows(2)
        .all(|w| rhs_strides[w[0]] < rhs_strides[w[1]]);
    let last_innermost = order.first() == Some(&(rank - 1)) && rhs_strides[rank - 1] == 1;
    if !distinct || !last_innermost || order.windows(2).all(|w| w[0] > w[1]) {
        return None;
    }
    let mut strides = vec![0; rank];
    let mut stride = 1;
    for &axis in &order {
        strides[axis] = stride;
        stride *= out_shape[axis];
    }
    // Axes of size 1 are never stepped over: any stride will do, the whole tensor's.
    for (axis, s) in strides.iter_mut().enumerate() {
        if rhs_shape[axis] == 1 {
            *s = stride;
        }
    }
    Some(strides)
}

/// Plans the batch axes of a product: `lhs`/`rhs` are `(shape, strides)` of the operands'
/// batch axes, `out` of the output's (its shape from [`broadcast_batch`]), all of equal rank.
/// A broadcast axis (size 1 in one operand) gets stride 0 in that operand.
pub(super) fn plan_batch(
    lhs: (&[usize], &[usize]),
    rhs: (&[usize], &[usize]),
    out: (&[usize], &[usize]),
) -> BatchPlan {
    let (out_shape, out_strides) = out;
    let mut axes = Vec::new();
    for (i, &size) in out_shape.iter().enumerate() {
        if size > 1 {
            let sa = if lhs.0[i] == 1 { 0 } else { lhs.1[i] };
            let sb = if rhs.0[i] == 1 { 0 } else { rhs.1[i] };
            axes.push([size, sa, sb, out_strides[i]]);
        }
    }
    // Runs of axes whose strides chain (the outer axis steps over the whole inner one, in
    // every operand) act as one axis. The longest run becomes the strided batch; the host
    // loops over the others. (Attention's [b, H] with heads interleaved in the rows, as after
    // a reshape and swap of [b, s, H, d], chains neither way: that is b = 64 calls of H = 12,
    // or H calls of b; the longer run makes it 12 calls.)
    let mut runs: Vec<[usize; 4]> = Vec::new();
    for &[size, sa, sb, so] in axes.iter().rev() {
        match runs.last_mut() {
            Some(run)
                if sa == run[1] * run[0] && sb == run[2] * run[0] && so == run[3] * run[0] =>
            {
                run[0] *= size;
            }
            _ => runs.push([size, sa, sb, so]),
        }
    }
    let Some(longest) = (0..runs.len()).max_by_key(|&i| (runs[i][0], usize::MAX - i)) else {
        return BatchPlan {
            outer: Vec::new(),
            inner: [1, 0, 0, 0],
        };
    };
    let inner = runs.remove(longest);
    BatchPlan { outer: runs, inner }
}

impl BatchPlan {
    /// The `(lhs, rhs, out)` element offsets of the first matrix product of each strided
    /// batch: one per index of the outer axes (the last of `outer` fastest).
    pub(super) fn outer_offsets(&self) -> Vec<[usize; 3]> {
        let outer: usize = self.outer.iter().map(|a| a[0]).product();
        (0..outer)
            .map(|index| {
                let (mut o, mut rest) = ([0; 3], index);
                for axis in self.outer.iter().rev() {
                    let i = rest % axis[0];
                    rest /= axis[0];
                    for (x, s) in o.iter_mut().zip(&axis[1..]) {
                        *x += i * s;
                    }
                }
                o
            })
            .collect()
    }

    /// The `(lhs, rhs, out)` element offsets of every matrix product of the plan: each of
    /// [`Self::outer_offsets`] followed by its strided batch.
    pub(super) fn offsets(&self) -> Vec<[usize; 3]> {
        let [count, sa, sb, so] = self.inner;
        self.outer_offsets()
            .into_iter()
            .flat_map(|o| (0..count).map(move |j| [o[0] + j * sa, o[1] + j * sb, o[2] + j * so]))
            .collect()
    }
}

/// The strides of a view of `shape`/`strides` (in elements) as `new_shape`, or `None` when no
/// view exists and the elements must be copied. PyTorch's `view` rule: each run of old axes
/// that are laid out as one block (every outer stride is the inner stride times the inner
/// size) may be re-split freely; a new axis may not straddle two such runs. Unlike burn's
/// reshape analysis it merges axes of a strided tensor — `[b, s, v]` logits whose rows are
/// padded to a pitch become `[b·s, v]` without a copy.
pub(super) fn view_strides(
    shape: &[usize],
    strides: &[usize],
    new_shape: &[usize],
) -> Option<Vec<usize>> {
    let count: usize = shape.iter().product();
    if new_shape.iter().product::<usize>() != count || shape.len() != strides.len() {
        return None;
    }
    let mut new_strides = vec![0; new_shape.len()];
    if count == 0 {
        // No element is ever addressed: any strides will do, contiguous ones by convention.
        let mut stride = 1;
        for (s, &n) in new_strides.iter_mut().zip(new_shape).rev() {
            *s = stride;
            stride *= n.max(1);
        }
        return Some(new_strides);
    }
    // Walk both shapes from the innermost axis, one block of chained old axes at a time.
    let mut view_axis = new_shape.len();
    let mut base = strides.last().copied().unwrap_or(1);
    let (mut block_count, mut view_count) = (1usize, 1usize);
    for axis in (0..shape.len()).rev() {
        block_count *= shape[axis];
        let block_ends =
            axis == 0 || (shape[axis - 1] != 1 && strides[axis - 1] != block_count * base);
        if block_ends {
            while view_axis > 0 && (view_count < block_count || new_shape[view_axis - 1] == 1) {
                view_axis -= 1;
                new_strides[view_axis] = view_count * base;
                view_count *= new_shape[view_axis];
            }
            if view_count != block_count {
                return None;
            }
            if axis > 0 {
                base = strides[axis - 1];
                block_count = 1;
                view_count = 1;
            }
        }
    }
    // Leading new axes of size 1 (a rank increase).
    while view_axis > 0 {
        view_axis -= 1;
        if new_shape[view_axis] != 1 {
            return None;
        }
        new_strides[view_axis] = view_count * base;
    }
    Some(new_strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded xorshift64 stream of integers below `n`, for the brute-force tests.
    fn uniform_below(mut state: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        }
    }

    #[test]
    fn row_and_column_major_matrices_are_recognised() {
        let row_major = |leading| {
            Some(MatrixLayout {
                column_major: false,
                leading,
            })
        };
        let column_major = |leading| {
            Some(MatrixLayout {
                column_major: true,
                leading,
            })
        };
        // [m, k] contiguous, with and without padded rows.
        assert_eq!(matrix_layout(4, 3, 3, 1), row_major(3));
        assert_eq!(matrix_layout(4, 3, 8, 1), row_major(8));
        // A transposed view of a [3, 4] matrix: strides (1, 4).
        assert_eq!(matrix_layout(4, 3, 1, 4), column_major(4));
        // Neither axis unit-stride, or overlapping rows: must be copied.
        assert_eq!(matrix_layout(4, 3, 6, 2), None);
        assert_eq!(matrix_layout(4, 3, 2, 1), None);
        assert_eq!(matrix_layout(4, 3, 0, 1), None);
        // One row or one column: any stride of the length-1 axis.
        assert_eq!(matrix_layout(1, 5, 0, 1), row_major(5));
        assert_eq!(matrix_layout(5, 1, 1, 7), row_major(1));
        // One row whose elements are 4 apart: column-major, a column every 4 elements.
        assert_eq!(matrix_layout(1, 5, 9, 4), column_major(4));
    }

    /// The plan of a product into a row-major output of `matrix` elements per matrix.
    fn plan_batch(
        lhs: (&[usize], &[usize]),
        rhs: (&[usize], &[usize]),
        matrix: usize,
    ) -> Option<(Vec<usize>, BatchPlan)> {
        let shape = broadcast_batch(lhs.0, rhs.0)?;
        let strides = row_major_strides(&shape, matrix);
        let plan = super::plan_batch(lhs, rhs, (&shape, &strides));
        Some((shape, plan))
    }

    #[test]
    fn batch_axes_merge_when_their_strides_chain() {
        // [2, 3] batch of contiguous 4×5 · 5×6 products: one call of 6.
        let (shape, plan) =
            plan_batch((&[2, 3], &[60, 20]), (&[2, 3], &[90, 30]), 24).expect("broadcastable");
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(plan.outer, Vec::<[usize; 4]>::new());
        assert_eq!(plan.inner, [6, 20, 30, 24]);
        // rhs broadcast over the whole batch: stride 0.
        let (_, plan) = plan_batch((&[2, 3], &[60, 20]), (&[1, 1], &[0, 0]), 24).expect("ok");
        assert_eq!(plan.inner, [6, 20, 0, 24]);
        // rhs broadcast over the inner axis only ([b, 1, t, r] against [b, H, s, t]): a
        // host loop over b, a strided batch over H.
        let (_, plan) = plan_batch((&[2, 3], &[60, 20]), (&[2, 1], &[30, 30]), 24).expect("ok");
        assert_eq!(plan.outer, vec![[2, 60, 30, 72]]);
        assert_eq!(plan.inner, [3, 20, 0, 24]);
        // Attention scores of [b, s, H, d] heads seen as [b, H, s, d] (b = 4, H = 3, s = 5,
        // d = 2: batch strides (30, 2)) against the transposed keys of the same layout: b and
        // H do not chain; the longer axis (b) is the strided batch, the host loops over H.
        let (_, plan) = plan_batch((&[4, 3], &[30, 2]), (&[4, 3], &[30, 2]), 25).expect("ok");
        assert_eq!(plan.inner, [4, 30, 30, 75]);
        assert_eq!(plan.outer, vec![[3, 2, 2, 25]]);
        // Shapes that do not broadcast.
        assert!(plan_batch((&[2], &[20]), (&[3], &[30]), 24).is_none());
    }

    /// The `(lhs, rhs, out)` element offsets of every product a plan makes, sorted.
    fn planned_offsets(plan: &BatchPlan) -> Vec<[usize; 3]> {
        let mut all = plan.offsets();
        all.sort_unstable();
        all
    }

    #[test]
    fn every_plan_makes_each_product_of_the_broadcast_exactly_once() {
        // Brute force: every output batch index, its offsets in each operand (a size-1 axis
        // broadcasts) — against the plan's strided batches and host loop, for batch shapes of
        // rank 1–4 with sizes 1–3 and strides from contiguous, permuted and broadcast layouts.
        let mut next = uniform_below(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..500 {
            let rank = 1 + next(4);
            let out: Vec<usize> = (0..rank).map(|_| 1 + next(3)).collect();
            let mut operand = || {
                let shape: Vec<usize> = out
                    .iter()
                    .map(|&n| if next(3) == 0 { 1 } else { n })
                    .collect();
                // Contiguous strides of a random axis order, times a matrix size of 6.
                let mut order: Vec<usize> = (0..rank).collect();
                for i in (1..rank).rev() {
                    order.swap(i, next(i + 1));
                }
                let mut strides = vec![0; rank];
                let mut stride = 6;
                for &axis in order.iter().rev() {
                    strides[axis] = stride;
                    stride *= shape[axis];
                }
                (shape, strides)
            };
            let (la, sa) = operand();
            let (lb, sb) = operand();
            let out: Vec<usize> = la.iter().zip(&lb).map(|(&a, &b)| a.max(b)).collect();
            let mut so = vec![0; rank];
            let mut stride = 6;
            for i in (0..rank).rev() {
                so[i] = stride;
                stride *= out[i];
            }
            let (shape, plan) = plan_batch((&la, &sa), (&lb, &sb), 6).expect("broadcastable");
            assert_eq!(shape, out);
            let mut expected = Vec::new();
            for index in 0..out.iter().product::<usize>() {
                let (mut o, mut rest) = ([0; 3], index);
                for i in (0..rank).rev() {
                    let k = rest % out[i];
                    rest /= out[i];
                    o[0] += if la[i] == 1 { 0 } else { k * sa[i] };
                    o[1] += if lb[i] == 1 { 0 } else { k * sb[i] };
                    o[2] += k * so[i];
                }
                expected.push(o);
            }
            expected.sort_unstable();
            assert_eq!(
                planned_offsets(&plan),
                expected,
                "{la:?}/{sa:?} · {lb:?}/{sb:?}"
            );
        }
    }
    #[test]
    fn outputs_follow_a_permuted_right_operand() {
        // V of [b, s, H, d] = [2, 5, 3, 4] read as [b, H, s, d]: strides (60, 4, 12, 1). P·V
        // [2, 3, 7, 5]·[2, 3, 5, 4] → [2, 3, 7, 4] as [b, 7, H, d]: strides (84, 4, 12, 1), so
        // swapping H back and merging (H, d) is a view.
        let out = strides_in_order_of(&[2, 3, 5, 4], &[60, 4, 12, 1], &[2, 3, 7, 4]);
        assert_eq!(out, Some(vec![84, 4, 12, 1]));
        let merged = view_strides(&[2, 7, 3, 4], &[84, 12, 4, 1], &[2, 7, 12]);
        assert_eq!(merged, Some(vec![84, 12, 1]));
        // A slice of the heads' columns (MLA's values: 4 of every 6, rows of 18): the same.
        let out = strides_in_order_of(&[2, 3, 5, 4], &[90, 6, 18, 1], &[2, 3, 7, 4]);
        assert_eq!(out, Some(vec![84, 4, 12, 1]));
        // Row-major (padded or not), transposed (column-major matrices), broadcast, or with
        // two axes at one stride: a plain output.
        for strides in [
            [60, 20, 4, 1],
            [80, 20, 4, 1],
            [60, 20, 1, 5],
            [60, 12, 12, 1],
        ] {
            assert_eq!(
                strides_in_order_of(&[2, 3, 5, 4], &strides, &[2, 3, 7, 4]),
                None,
                "{strides:?}"
            );
        }
        assert_eq!(
            strides_in_order_of(&[2, 1, 5, 4], &[20, 0, 4, 1], &[2, 3, 7, 4]),
            None
        );
        // A size-1 axis anywhere is skipped: [1, s, H, d] as [1, H, s, d].
        assert_eq!(
            strides_in_order_of(&[1, 3, 5, 4], &[60, 4, 12, 1], &[1, 3, 7, 4]),
            Some(vec![84, 4, 12, 1])
        );
        // Brute force: the output's offsets are a bijection onto 0..len for any permutation.
        let mut next = uniform_below(0x51ed_2701_a3c4_9b1fu64);
        for _ in 0..300 {
            let rank = 3 + next(3);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + next(4)).collect();
            let mut order: Vec<usize> = (0..rank - 1).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, next(i + 1));
            }
            order.push(rank - 1);
            let mut strides = vec![0; rank];
            let mut stride = 1;
            for &axis in order.iter().rev() {
                strides[axis] = stride;
                stride *= shape[axis];
            }
            let mut out_shape = shape.clone();
            out_shape[rank - 2] = 1 + next(4);
            let Some(out) = strides_in_order_of(&shape, &strides, &out_shape) else {
                continue;
            };
            let len: usize = out_shape.iter().product();
            let mut seen = vec![false; len];
            for index in 0..len {
                let (mut offset, mut rest) = (0, index);
                for i in (0..rank).rev() {
                    offset += (rest % out_shape[i]) * out[i];
                    rest /= out_shape[i];
                }
                assert!(
                    offset < len && !seen[offset],
                    "{shape:?}/{strides:?}: {out:?}"
                );
                seen[offset] = true;
            }
        }
    }

    #[test]
    fn views_address_the_same_elements_as_the_tensor_they_reshape() {
        // Brute force: for random shapes, strides (contiguous, permuted, padded rows, size-1
        // axes, broadcast) and every factorisation-preserving new shape, a view's offsets of
        // each element in row-major order equal the original's; and a view exists whenever
        // the tensor is contiguous (no copy for what burn would also view).
        fn offsets(shape: &[usize], strides: &[usize]) -> Vec<usize> {
            let count: usize = shape.iter().product();
            (0..count)
                .map(|mut i| {
                    let mut offset = 0;
                    for (&n, &s) in shape.iter().zip(strides).rev() {
                        offset += (i % n) * s;
                        i /= n;
                    }
                    offset
                })
                .collect()
        }
        let mut next = uniform_below(0x2545_f491_4f6c_dd1du64);
        let mut viewed = 0;
        for _ in 0..3000 {
            let rank = 1 + next(4);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + next(4)).collect();
            // Strides of a random axis order, with padding after a random axis.
            let mut order: Vec<usize> = (0..rank).collect();
            if next(2) == 0 {
                for i in (1..rank).rev() {
                    order.swap(i, next(i + 1));
                }
            }
            let pad_after = next(rank + 1);
            let mut strides = vec![0; rank];
            let mut stride = 1;
            for (k, &axis) in order.iter().rev().enumerate() {
                strides[axis] = stride;
                stride *= shape[axis] + usize::from(k == pad_after);
            }
            if next(5) == 0 {
                let axis = next(rank);
                strides[axis] = 0; // a broadcast axis
            }
            let count: usize = shape.iter().product();
            // A random new shape of the same count: split count into up to 4 factors.
            let mut new_shape = Vec::new();
            let mut rest = count;
            for _ in 0..next(4) {
                let divisors: Vec<usize> = (1..=rest).filter(|d| rest.is_multiple_of(*d)).collect();
                let d = divisors[next(divisors.len())];
                new_shape.push(d);
                rest /= d;
            }
            new_shape.push(rest);
            let contiguous = order.iter().enumerate().all(|(i, &a)| a == i)
                && pad_after >= rank.saturating_sub(1)
                && strides.iter().all(|&s| s > 0);
            match view_strides(&shape, &strides, &new_shape) {
                Some(new_strides) => {
                    viewed += 1;
                    assert_eq!(
                        offsets(&new_shape, &new_strides),
                        offsets(&shape, &strides),
                        "{shape:?}/{strides:?} as {new_shape:?}"
                    );
                }
                None => assert!(
                    !contiguous,
                    "a contiguous {shape:?}/{strides:?} has no view as {new_shape:?}"
                ),
            }
        }
        assert!(
            viewed > 1000,
            "only {viewed} views: the test exercises too little"
        );
        // The case that motivates it: [2, 3, 5] with rows padded to 8 merges to [6, 5].
        assert_eq!(
            view_strides(&[2, 3, 5], &[24, 8, 1], &[6, 5]),
            Some(vec![8, 1])
        );
        // …but not into one axis across the padding.
        assert_eq!(view_strides(&[2, 3, 5], &[24, 8, 1], &[30]), None);
        // A transposed matrix cannot be flattened.
        assert_eq!(view_strides(&[3, 4], &[1, 3], &[12]), None);
        // Counts that differ.
        assert_eq!(view_strides(&[3, 4], &[4, 1], &[13]), None);
    }
}
