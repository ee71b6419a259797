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
fn row_major_leading(
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

/// Plans the batch axes: `lhs`/`rhs` are `(shape, strides)` of the batch axes only (equal
/// rank), `out_strides` the contiguous output's batch strides. A broadcast axis (size 1 in one
/// operand) gets stride 0 in that operand. Returns the output's batch shape and the plan, or
/// `None` if the shapes do not broadcast.
pub(super) fn plan_batch(
    lhs: (&[usize], &[usize]),
    rhs: (&[usize], &[usize]),
    out_strides: &[usize],
) -> Option<(Vec<usize>, BatchPlan)> {
    let rank = lhs.0.len();
    let mut out_shape = Vec::with_capacity(rank);
    let mut axes = Vec::new();
    let axis_pairs = lhs.0.iter().zip(rhs.0).zip(lhs.1.iter().zip(rhs.1));
    for (((&a, &b), (&stride_a, &stride_b)), &so) in axis_pairs.zip(out_strides) {
        let size = if a == b || b == 1 {
            a
        } else if a == 1 {
            b
        } else {
            return None;
        };
        out_shape.push(size);
        if size > 1 {
            let sa = if a == 1 { 0 } else { stride_a };
            let sb = if b == 1 { 0 } else { stride_b };
            axes.push([size, sa, sb, so]);
        }
    }
    let mut inner = [1, 0, 0, 0];
    while let Some(&[size, sa, sb, so]) = axes.last() {
        let merges = inner[0] == 1
            || (sa == inner[1] * inner[0]
                && sb == inner[2] * inner[0]
                && so == inner[3] * inner[0]);
        if !merges {
            break;
        }
        inner = if inner[0] == 1 {
            [size, sa, sb, so]
        } else {
            [size * inner[0], inner[1], inner[2], inner[3]]
        };
        axes.pop();
    }
    Some((out_shape, BatchPlan { outer: axes, inner }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_and_column_major_matrices_are_recognised() {
        // [m, k] contiguous, with and without padded rows.
        assert_eq!(
            matrix_layout(4, 3, 3, 1),
            Some(MatrixLayout {
                column_major: false,
                leading: 3
            })
        );
        assert_eq!(
            matrix_layout(4, 3, 8, 1),
            Some(MatrixLayout {
                column_major: false,
                leading: 8
            })
        );
        // A transposed view of a [3, 4] matrix: strides (1, 4).
        assert_eq!(
            matrix_layout(4, 3, 1, 4),
            Some(MatrixLayout {
                column_major: true,
                leading: 4
            })
        );
        // Neither axis unit-stride, or overlapping rows: must be copied.
        assert_eq!(matrix_layout(4, 3, 6, 2), None);
        assert_eq!(matrix_layout(4, 3, 2, 1), None);
        assert_eq!(matrix_layout(4, 3, 0, 1), None);
        // One row or one column: any stride of the length-1 axis.
        assert_eq!(
            matrix_layout(1, 5, 0, 1),
            Some(MatrixLayout {
                column_major: false,
                leading: 5
            })
        );
        assert_eq!(
            matrix_layout(5, 1, 1, 7),
            Some(MatrixLayout {
                column_major: false,
                leading: 1
            })
        );
    }

    #[test]
    fn batch_axes_merge_when_their_strides_chain() {
        // [2, 3] batch of contiguous 4×5 · 5×6 products: one call of 6.
        let (shape, plan) = plan_batch((&[2, 3], &[60, 20]), (&[2, 3], &[90, 30]), &[72, 24])
            .expect("broadcastable");
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(plan.outer, Vec::<[usize; 4]>::new());
        assert_eq!(plan.inner, [6, 20, 30, 24]);
        // rhs broadcast over the whole batch: stride 0.
        let (_, plan) =
            plan_batch((&[2, 3], &[60, 20]), (&[1, 1], &[0, 0]), &[72, 24]).expect("ok");
        assert_eq!(plan.inner, [6, 20, 0, 24]);
        // rhs broadcast over the inner axis only ([b, 1, t, r] against [b, H, s, t]): a
        // host loop over b, a strided batch over H.
        let (_, plan) =
            plan_batch((&[2, 3], &[60, 20]), (&[2, 1], &[30, 30]), &[72, 24]).expect("ok");
        assert_eq!(plan.outer, vec![[2, 60, 30, 72]]);
        assert_eq!(plan.inner, [3, 20, 0, 24]);
        // Shapes that do not broadcast.
        assert!(plan_batch((&[2], &[20]), (&[3], &[30]), &[24]).is_none());
    }
}
