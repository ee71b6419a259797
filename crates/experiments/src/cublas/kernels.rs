//! The fused kernels of [`super::fused`] and their launchers on burn-cuda's tensors.

use super::backend::Inner;
use burn_backend::ops::FloatTensorOps;
use burn_backend::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubecl::std::FastDivmod;
use cubecl::tensor_vector_size_parallel;

pub(super) type Primitive = CubeTensor<CudaRuntime>;

/// Lanes per plane: the kernels assume one warp per row (checked at launch: `supported`).
const LANES: u32 = 32;
/// Rows per cube (`CubeDim { x: LANES, y: ROWS_PER_CUBE }`, 256 threads).
const ROWS_PER_CUBE: u32 = 8;

/// The sum of a vector's lanes, in a fixed order.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for k in 0..N::value() {
        s += v[k];
    }
    s
}

/// RMSNorm forward, one plane per row, each lane reading vectors of `N` elements (16 bytes
/// of bf16 when `N = 8`; `width` is a multiple of `N`). `x`'s rows are `pitch` vectors apart
/// (a column slice of wider rows is read in place), `y`'s are contiguous.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_forward_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gain: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    rstd: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    pitch: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = width as usize / N::value();
    let source = row as usize * pitch as usize;
    let base = row as usize * vectors;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let mut squares = Vector::<f32, N>::new(f32::new(0.0));
    let mut j = lane;
    while j < vectors {
        let v = Vector::<f32, N>::cast_from(x[source + j]);
        squares += v * v;
        j += step;
    }
    let total = plane_sum(lane_sum::<N>(squares));
    let r = f32::new(1.0) / (total / f32::cast_from(width) + eps).sqrt();
    let rv = Vector::<f32, N>::new(r);
    let mut k = lane;
    while k < vectors {
        y[base + k] = Vector::<F, N>::cast_from(
            Vector::<f32, N>::cast_from(x[source + k]) * rv * Vector::<f32, N>::cast_from(gain[k]),
        );
        k += step;
    }
    if lane == 0 {
        rstd[row as usize] = r;
    }
}

/// Rows of one group of the RMSNorm backward: their `dx` and their sum of the gain's gradient
/// are made in one pass over the group's columns, the sum kept in registers.
const NORM_GROUP_ROWS: usize = 4;

/// RMSNorm backward over groups of [`NORM_GROUP_ROWS`] consecutive rows, groups `plane,
/// plane + P, …` for each of the `P` planes (grid-stride). Per group, first each row's
/// coefficient `c = r³·Σ_k x_k γ_k dy_k / w`, then one pass over the columns (vectors of `N`)
/// writing `dx = r·γ·dy − c·x` of every row of the group and adding `Σ_rows dy·x·r` to the
/// plane's own row of `gain_partial` `[P, w]` (f32) once, so that only `P` rows are left for
/// [`column_sums`]. Deterministic: fixed groups per plane, fixed order. `x`'s rows are `pitch`
/// vectors apart, `dx`'s `dx_pitch`, `dy`'s contiguous. With `accumulate`, `dx` holds a
/// gradient already and the kernel adds to it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_backward_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gain: &Tensor<Vector<F, N>>,
    rstd: &Tensor<f32>,
    dy: &Tensor<Vector<F, N>>,
    dx: &mut Tensor<Vector<F, N>>,
    gain_partial: &mut Tensor<f32>,
    rows: u32,
    groups: u32,
    width: u32,
    pitch: u32,
    dx_pitch: u32,
    #[comptime] accumulate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let plane = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    let group_rows = comptime!(NORM_GROUP_ROWS as u32);
    if plane >= groups {
        terminate!();
    }
    let planes = CUBE_COUNT_X * CUBE_DIM_Y;
    let vectors = width as usize / N::value();
    let own = plane as usize * width as usize;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let mut group = plane;
    let mut first = true;
    while group < groups {
        let start = group * group_rows;
        let mut coef = Array::<f32>::new(NORM_GROUP_ROWS);
        let mut scale = Array::<f32>::new(NORM_GROUP_ROWS);
        #[unroll]
        for i in 0..NORM_GROUP_ROWS {
            let row = start + i as u32;
            let mut c = f32::new(0.0);
            let mut r = f32::new(0.0);
            // `row` is the same on every lane: the plane sum is reached by all or none.
            if row < rows {
                let base = row as usize * vectors;
                let source = row as usize * pitch as usize;
                r = rstd[row as usize];
                let mut dot = Vector::<f32, N>::new(f32::new(0.0));
                let mut j = lane;
                while j < vectors {
                    dot += Vector::<f32, N>::cast_from(x[source + j])
                        * Vector::<f32, N>::cast_from(gain[j])
                        * Vector::<f32, N>::cast_from(dy[base + j]);
                    j += step;
                }
                c = r * r * r * plane_sum(lane_sum::<N>(dot)) / f32::cast_from(width);
            }
            coef[i] = c;
            scale[i] = r;
        }
        let mut j = lane;
        while j < vectors {
            let g = Vector::<f32, N>::cast_from(gain[j]);
            let mut acc = Vector::<f32, N>::new(f32::new(0.0));
            #[unroll]
            for i in 0..NORM_GROUP_ROWS {
                let row = start + i as u32;
                if row < rows {
                    let e = row as usize * vectors + j;
                    let out = row as usize * dx_pitch as usize + j;
                    let xv = Vector::<f32, N>::cast_from(x[row as usize * pitch as usize + j]);
                    let d = Vector::<f32, N>::cast_from(dy[e]);
                    let r = Vector::<f32, N>::new(scale[i]);
                    let mut v = r * (g * d) - xv * Vector::<f32, N>::new(coef[i]);
                    if accumulate {
                        v += Vector::<f32, N>::cast_from(dx[out]);
                    }
                    dx[out] = Vector::<F, N>::cast_from(v);
                    acc += d * xv * r;
                }
            }
            let out = own + j * N::value();
            #[unroll]
            for k in 0..N::value() {
                if first {
                    gain_partial[out + k] = acc[k];
                } else {
                    gain_partial[out + k] += acc[k];
                }
            }
            j += step;
        }
        first = false;
        group += planes;
    }
}

/// RMSNorm backward, one plane per row as in the forward, for rows of at most
/// [`NORM_ROW_VECTORS_PER_LANE`] vectors a lane (`per_lane`, a launch constant): each lane
/// keeps its vectors of `x` and `dy` in registers between the two steps, `c = r³·Σ_k x_k γ_k
/// dy_k / w` and `dx = r·γ·dy − c·x`. The row's terms of the gain's gradient, `dy·x·r`, go to
/// shared memory, and the cube adds its [`ROWS_PER_CUBE`] rows in a fixed order into its
/// partial row of `gain_partial` `[⌈n/8⌉, w]` (f32) for [`column_sums`]. The grid has a plane
/// for every row (2 048 cubes for 16 384 rows), where [`rms_norm_backward_kernel`] gives each
/// of at most 4 096 planes a chain of row groups. Pitches and `accumulate` as there.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_backward_rows_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gain: &Tensor<Vector<F, N>>,
    rstd: &Tensor<f32>,
    dy: &Tensor<Vector<F, N>>,
    dx: &mut Tensor<Vector<F, N>>,
    gain_partial: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    pitch: u32,
    dx_pitch: u32,
    #[comptime] per_lane: usize,
    #[comptime] accumulate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let slots = comptime!(per_lane * LANES as usize);
    let mut terms = SharedMemory::<Vector<f32, N>>::new(comptime!(ROWS_PER_CUBE as usize * slots));
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    // Planes past the last row write zero terms: every plane reaches the cube's barrier.
    let live = row < rows;
    let vectors = width as usize / N::value();
    let lane = UNIT_POS_X as usize;
    let source = row as usize * pitch as usize;
    let base = row as usize * vectors;
    let mut xs = Array::<Vector<F, N>>::new(per_lane);
    let mut ds = Array::<Vector<F, N>>::new(per_lane);
    let mut dot = f32::new(0.0);
    let mut r = f32::new(0.0);
    if live {
        r = rstd[row as usize];
        #[unroll]
        for k in 0..per_lane {
            let j = lane + k * LANES as usize;
            if j < vectors {
                xs[k] = x[source + j];
                ds[k] = dy[base + j];
                dot += lane_sum::<N>(
                    Vector::<f32, N>::cast_from(xs[k])
                        * Vector::<f32, N>::cast_from(gain[j])
                        * Vector::<f32, N>::cast_from(ds[k]),
                );
            }
        }
    }
    // `row` is the same on every lane: the plane sum is reached by all of them.
    let c = Vector::<f32, N>::new(r * r * r * plane_sum(dot) / f32::cast_from(width));
    let rv = Vector::<f32, N>::new(r);
    let own = UNIT_POS_Y as usize * slots;
    #[unroll]
    for k in 0..per_lane {
        let j = lane + k * LANES as usize;
        let mut term = Vector::<f32, N>::new(f32::new(0.0));
        if live && j < vectors {
            let xv = Vector::<f32, N>::cast_from(xs[k]);
            let d = Vector::<f32, N>::cast_from(ds[k]);
            let g = Vector::<f32, N>::cast_from(gain[j]);
            let out = row as usize * dx_pitch as usize + j;
            let mut v = rv * (g * d) - xv * c;
            if accumulate {
                v += Vector::<f32, N>::cast_from(dx[out]);
            }
            dx[out] = Vector::<F, N>::cast_from(v);
            term = d * xv * rv;
        }
        terms[own + j] = term;
    }
    sync_cube();
    let out = CUBE_POS_X as usize * vectors;
    let mut j = UNIT_POS as usize;
    while j < vectors {
        let mut acc = Vector::<f32, N>::new(f32::new(0.0));
        #[unroll]
        for p in 0..ROWS_PER_CUBE as usize {
            acc += terms[p * slots + j];
        }
        #[unroll]
        for e in 0..N::value() {
            gain_partial[(out + j) * N::value() + e] = acc[e];
        }
        j += (CUBE_DIM_X * CUBE_DIM_Y) as usize;
    }
}

/// One lane's share of a row's `log Σ e^x`, kept online: `max` the largest value added
/// ([`LSE_FLOOR`] before any) and `sum = Σ e^{x − max}` over the values added. Shared by the
/// causal softmax and the cross-entropy.
#[derive(CubeType)]
struct RunningLse {
    max: f32,
    sum: f32,
}

/// Below any finite value: `e^{LSE_FLOOR − x}` underflows to 0 for every finite `x`.
const LSE_FLOOR: f32 = -3.0e38;

/// The fast-math flags under which cubecl compiles an f32 `exp` (and `ln`) to CUDA's
/// `__expf` (`__logf`): `ex2.approx` of `x·log₂e`, within `2 + 1.16·|x|` ulp (CUDA C
/// Programming Guide, intrinsic functions), where `expf` takes a dozen instructions. No other
/// instruction of the kernels changes under them (cubecl-cpp selects only these, and the
/// division, which needs more flags); NaN and ±∞ still propagate through `ex2.approx`.
fn fast_exp() -> cubecl::ir::features::EnumSet<FastMath> {
    FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
}

#[cube]
impl RunningLse {
    fn new() -> RunningLse {
        RunningLse {
            max: f32::new(LSE_FLOOR),
            sum: f32::new(0.0),
        }
    }

    /// Adds the first `count` entries of `v` (all `N` when `count ≥ N`), rescaling `sum`
    /// once per vector. A NaN entry makes `sum` NaN.
    fn add<N: Size>(&mut self, v: Vector<f32, N>, count: usize) {
        let mut top = self.max;
        let own = visible_max::<N>(v, 0, count);
        if own > top {
            top = own;
        }
        let mut sum = self.sum * (self.max - top).exp();
        #[unroll]
        for e in 0..N::value() {
            if e < count {
                sum += (v[e] - top).exp();
            }
        }
        self.max = top;
        self.sum = sum;
    }

    /// `log Σ e^x` over what every lane of the plane added, in every lane: the plane's
    /// maximum `M`, then `M + log Σ_lanes sum·e^{max − M}`.
    fn plane_total(&self) -> f32 {
        let row_max = plane_max(self.max);
        plane_sum(self.sum * (self.max - row_max).exp()).ln() + row_max
    }
}

/// The largest visible entry of a vector of keys `first..first + N` (those with
/// `first + e < visible`; [`LSE_FLOOR`] when none is; a NaN entry is skipped here and surfaces
/// in the sum of the exponentials). [`RunningLse::add`]'s maximum too, with `first = 0`.
#[cube]
fn visible_max<N: Size>(v: Vector<f32, N>, first: usize, visible: usize) -> f32 {
    let mut top = f32::new(LSE_FLOOR);
    #[unroll]
    for e in 0..N::value() {
        if first + e < visible && v[e] > top {
            top = v[e];
        }
    }
    top
}

/// `e^{v_e − total}` for the entries `e` of a vector of keys `first..first + N` that are
/// visible (`first + e < visible`), 0 for the others.
#[cube]
fn visible_exp<N: Size>(
    v: Vector<f32, N>,
    total: f32,
    first: usize,
    visible: usize,
) -> Vector<f32, N> {
    let mut p = Vector::<f32, N>::new(f32::new(0.0));
    #[unroll]
    for e in 0..N::value() {
        if first + e < visible {
            p[e] = (v[e] - total).exp();
        }
    }
    p
}

/// `Σ v_e` over the visible entries of a vector of keys `first..first + N`.
#[cube]
fn visible_sum<N: Size>(v: Vector<f32, N>, first: usize, visible: usize) -> f32 {
    let mut sum = f32::new(0.0);
    #[unroll]
    for e in 0..N::value() {
        if first + e < visible {
            sum += v[e];
        }
    }
    sum
}

/// The softmax gradient `c·P·(dP − total)` on the visible entries of a vector of keys
/// `first..first + N`, 0 on the others.
#[cube]
fn visible_gradient<N: Size>(
    c: Vector<f32, N>,
    p: Vector<f32, N>,
    dp: Vector<f32, N>,
    total: Vector<f32, N>,
    first: usize,
    visible: usize,
) -> Vector<f32, N> {
    let mut d = c * p * (dp - total);
    #[unroll]
    for e in 0..N::value() {
        if first + e >= visible {
            d[e] = f32::new(0.0);
        }
    }
    d
}

/// The causal softmax's rows, one plane each, each lane reading vectors of `N` keys (`keys`
/// a multiple of `N`); key `k` of row `i` is visible when `k < i mod s + offset + 1`.
/// Forward: `lse = log Σ_{visible} e^{c·x}` ([`RunningLse`]), then `P = e^{c·x − lse}` or 0.
/// Vectors wholly past the visible keys are written as 0 without being read. `resident`
/// (`keys ≤ 32·N`, one vector per lane at most): each lane loads its vector once and keeps
/// it in registers; the row's maximum `m` first, then `e^{c·x − m}` once per entry and
/// `P = e^{c·x − m}/Σ` (`N` exponentials a lane, where the online form takes `2N + 2`).
/// Exponentials are CUDA's `__expf` ([`fast_exp`]).
#[cube(launch, fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
fn causal_softmax_forward_kernel<F: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    probs: &mut Tensor<Vector<F, N>>,
    rows: u32,
    queries: u32,
    keys: u32,
    offset: u32,
    scale: f32,
    #[comptime] resident: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = keys as usize / N::value();
    let base = row as usize * vectors;
    let visible = (row % queries + offset + 1) as usize;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let c = Vector::<f32, N>::new(scale);
    if resident {
        let first = lane * N::value();
        let seen = lane < vectors && first < visible;
        let mut v = Vector::<f32, N>::new(f32::new(0.0));
        let mut top = f32::new(LSE_FLOOR);
        if seen {
            v = c * Vector::<f32, N>::cast_from(scores[base + lane]);
            top = visible_max(v, first, visible);
        }
        let row_max = plane_max(top);
        let mut p = Vector::<f32, N>::new(f32::new(0.0));
        if seen {
            p = visible_exp(v, row_max, first, visible);
        }
        // Σ ≥ 1 (the maximum's own term), or NaN when an entry is.
        let inverse = f32::new(1.0) / plane_sum(lane_sum::<N>(p));
        if lane < vectors {
            probs[base + lane] = Vector::<F, N>::cast_from(p * Vector::<f32, N>::new(inverse));
        }
    } else {
        let mut lse = RunningLse::new();
        let mut j = lane;
        while j * N::value() < visible {
            lse.add(
                c * Vector::<f32, N>::cast_from(scores[base + j]),
                visible - j * N::value(),
            );
            j += step;
        }
        let total = lse.plane_total();
        let mut k = lane;
        while k < vectors {
            let first = k * N::value();
            let mut p = Vector::<f32, N>::new(f32::new(0.0));
            if first < visible {
                let v = c * Vector::<f32, N>::cast_from(scores[base + k]);
                p = visible_exp(v, total, first, visible);
            }
            probs[base + k] = Vector::<F, N>::cast_from(p);
            k += step;
        }
    }
}

/// Backward of [`causal_softmax_forward_kernel`], rows, vectors and `resident` as there:
/// `dx_k = c·P_k·(dP_k − Σ_{j visible} P_j dP_j)` for visible `k`, else 0 (vectors wholly
/// past the visible keys written without being read).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn causal_softmax_backward_kernel<F: Float, N: Size>(
    probs: &Tensor<Vector<F, N>>,
    dprobs: &Tensor<Vector<F, N>>,
    dscores: &mut Tensor<Vector<F, N>>,
    rows: u32,
    queries: u32,
    keys: u32,
    offset: u32,
    scale: f32,
    #[comptime] resident: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = keys as usize / N::value();
    let base = row as usize * vectors;
    let visible = (row % queries + offset + 1) as usize;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let c = Vector::<f32, N>::new(scale);
    let zero = Vector::<f32, N>::new(f32::new(0.0));
    if resident {
        let first = lane * N::value();
        let seen = lane < vectors && first < visible;
        let mut p = zero;
        let mut dp = zero;
        let mut dot = f32::new(0.0);
        if seen {
            p = Vector::<f32, N>::cast_from(probs[base + lane]);
            dp = Vector::<f32, N>::cast_from(dprobs[base + lane]);
            dot = visible_sum(p * dp, first, visible);
        }
        let total = Vector::<f32, N>::new(plane_sum(dot));
        if lane < vectors {
            let mut d = zero;
            if seen {
                d = visible_gradient(c, p, dp, total, first, visible);
            }
            dscores[base + lane] = Vector::<F, N>::cast_from(d);
        }
    } else {
        let mut dot = f32::new(0.0);
        let mut j = lane;
        while j * N::value() < visible {
            let pd = Vector::<f32, N>::cast_from(probs[base + j])
                * Vector::<f32, N>::cast_from(dprobs[base + j]);
            dot += visible_sum(pd, j * N::value(), visible);
            j += step;
        }
        let total = Vector::<f32, N>::new(plane_sum(dot));
        let mut k = lane;
        while k < vectors {
            let first = k * N::value();
            let mut d = zero;
            if first < visible {
                let p = Vector::<f32, N>::cast_from(probs[base + k]);
                let dp = Vector::<f32, N>::cast_from(dprobs[base + k]);
                d = visible_gradient(c, p, dp, total, first, visible);
            }
            dscores[base + k] = Vector::<F, N>::cast_from(d);
            k += step;
        }
    }
}

/// `silu(gate) ⊙ up`, `N` elements per thread.
#[cube(launch)]
fn swiglu_forward_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let one = Vector::<f32, N>::new(f32::new(1.0));
    let sigmoid = one / (one + (Vector::<f32, N>::new(f32::new(0.0)) - g).exp());
    out[i] = Vector::<F, N>::cast_from(g * sigmoid * Vector::<f32, N>::cast_from(up[i]));
}

/// SwiGLU backward, `N` elements per thread (see [`swiglu_backward`]).
#[cube(launch)]
fn swiglu_backward_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    dy: &Tensor<Vector<F, N>>,
    dgate: &mut Tensor<Vector<F, N>>,
    dup: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let d = Vector::<f32, N>::cast_from(dy[i]);
    let one = Vector::<f32, N>::new(f32::new(1.0));
    let sigmoid = one / (one + (Vector::<f32, N>::new(f32::new(0.0)) - g).exp());
    dgate[i] = Vector::<F, N>::cast_from(
        d * Vector::<f32, N>::cast_from(up[i]) * sigmoid * (one + g * (one - sigmoid)),
    );
    dup[i] = Vector::<F, N>::cast_from(d * g * sigmoid);
}

/// Per row `i` of `logits` `[n, v]` (rows `pitch` vectors apart), each lane reading vectors of
/// `N` logits: `lse_i = log Σ_j exp(x_ij)` ([`RunningLse`]) and `nll_i = lse_i − x_{i,t_i}`
/// (the target's logit read again by lane 0; NaN for a target outside `0..v`, so that
/// training stops on a non-finite loss). `exp` and `ln` are CUDA's intrinsics ([`fast_exp`]).
#[cube(launch, fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_forward_kernel<F: Float, I: Int, N: Size>(
    logits: &Tensor<Vector<F, N>>,
    targets: &Tensor<I>,
    nll: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    rows: u32,
    vocab: u32,
    pitch: u32,
    undefined: f32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = vocab as usize / N::value();
    let base = row as usize * pitch as usize;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let mut running = RunningLse::new();
    let mut j = lane;
    while j < vectors {
        running.add(Vector::<f32, N>::cast_from(logits[base + j]), N::value());
        j += step;
    }
    let log_sum = running.plane_total();
    if lane == 0 {
        // A negative target wraps to a large u32: both are outside the vocabulary.
        let t = u32::cast_from(targets[row as usize]) as usize;
        let mut loss = undefined;
        if t < vocab as usize {
            let v = Vector::<f32, N>::cast_from(logits[base + t / N::value()]);
            let mut x_target = f32::new(0.0);
            #[unroll]
            for e in 0..N::value() {
                if t % N::value() == e {
                    x_target = v[e];
                }
            }
            loss = log_sum - x_target;
        }
        nll[row as usize] = loss;
        lse[row as usize] = log_sum;
    }
}

/// `dx_ij = g/n · (exp(x_ij − lse_i) − [j = t_i])`, `g = grad[0]` the gradient of the mean;
/// vectors of `N` logits, rows `pitch` (input) and `out_pitch` (output) vectors apart;
/// `exp` is CUDA's `__expf` ([`fast_exp`]).
#[cube(launch, fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_backward_kernel<F: Float, I: Int, N: Size>(
    logits: &Tensor<Vector<F, N>>,
    targets: &Tensor<I>,
    lse: &Tensor<f32>,
    grad: &Tensor<f32>,
    dlogits: &mut Tensor<Vector<F, N>>,
    rows: u32,
    vocab: u32,
    pitch: u32,
    out_pitch: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = vocab as usize / N::value();
    let base = row as usize * pitch as usize;
    let out = row as usize * out_pitch as usize;
    let scale = grad[0] / f32::cast_from(rows);
    let log_sum = Vector::<f32, N>::new(lse[row as usize]);
    let t = u32::cast_from(targets[row as usize]) as usize;
    let mut j = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    while j < vectors {
        let mut p = (Vector::<f32, N>::cast_from(logits[base + j]) - log_sum).exp();
        #[unroll]
        for e in 0..N::value() {
            if j * N::value() + e == t {
                p[e] -= f32::new(1.0);
            }
        }
        dlogits[out + j] = Vector::<F, N>::cast_from(p * Vector::<f32, N>::new(scale));
        j += step;
    }
}

/// One AdamW update per element (`N` elements per thread), in f32
/// (`attn_models::fused::AdamWStep` has the formula):
/// `m ← b₁·m + (1−β₁)·g`, `v ← b₂·v + (1−β₂)·g²` (`b = β`, or 0 and no read of the old
/// moments on the `first` step), `θ ← keep·θ − η·(m·c₁)/(√(v·c₂) + ε)` with
/// `keep = 1 − η·λ`, `cₖ = 1/(1 − βₖᵗ)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float, N: Size>(
    param: &Tensor<Vector<F, N>>,
    grad: &Tensor<Vector<F, N>>,
    moment_1: &Tensor<Vector<F, N>>,
    moment_2: &Tensor<Vector<F, N>>,
    param_out: &mut Tensor<Vector<F, N>>,
    moment_1_out: &mut Tensor<Vector<F, N>>,
    moment_2_out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    beta_1: f32,
    beta_2: f32,
    keep: f32,
    lr: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    #[comptime] first: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let g = Vector::<f32, N>::cast_from(grad[i]);
    let mut m = Vector::<f32, N>::new(f32::new(1.0) - beta_1) * g;
    let mut v = Vector::<f32, N>::new(f32::new(1.0) - beta_2) * g * g;
    if !first {
        m += Vector::<f32, N>::new(beta_1) * Vector::<f32, N>::cast_from(moment_1[i]);
        v += Vector::<f32, N>::new(beta_2) * Vector::<f32, N>::cast_from(moment_2[i]);
    }
    let step = (m * Vector::<f32, N>::new(correction_1))
        / ((v * Vector::<f32, N>::new(correction_2)).sqrt() + Vector::<f32, N>::new(epsilon));
    param_out[i] = Vector::<F, N>::cast_from(
        Vector::<f32, N>::new(keep) * Vector::<f32, N>::cast_from(param[i])
            - Vector::<f32, N>::new(lr) * step,
    );
    moment_1_out[i] = Vector::<F, N>::cast_from(m);
    moment_2_out[i] = Vector::<F, N>::cast_from(v);
}

/// `partial[c, j] = Σ_{i ∈ chunk c} terms[i, j]` over the rows `c·per_chunk ..` of chunk `c`
/// (`CUBE_POS_Y`): one thread per column, reading rows in turn (coalesced across columns),
/// four rows at a time into four sums, so that four loads are in flight (one at a time, each
/// thread waited out a memory latency per row: ≈ 27 µs a launch for 64 rows).
#[cube(launch)]
fn column_sum_kernel(
    terms: &Tensor<f32>,
    partial: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    per_chunk: u32,
) {
    let j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let w = width as usize;
    if j >= w {
        terminate!();
    }
    let chunk = CUBE_POS_Y;
    let start = chunk * per_chunk;
    let mut end = start + per_chunk;
    if end > rows {
        end = rows;
    }
    partial[chunk as usize * w + j] = strided_sum(terms, start as usize, end as usize, 1, w, j);
}

/// `Σ x[i·stride + offset]` over `i = first, first + step, …` below `end`, in four running
/// sums of every fourth term (four loads in flight; one running sum waits out a memory
/// latency per term), added as `(s₀ + s₁) + (s₂ + s₃)`: a fixed order of additions. The
/// column sums (`stride` = the row length, `offset` = the column) and the flat total
/// (`stride` 1) share it.
#[cube]
fn strided_sum(
    x: &Tensor<f32>,
    first: usize,
    end: usize,
    step: usize,
    stride: usize,
    offset: usize,
) -> f32 {
    let (mut a0, mut a1, mut a2, mut a3) =
        (f32::new(0.0), f32::new(0.0), f32::new(0.0), f32::new(0.0));
    let mut i = first;
    while i + 3 * step < end {
        a0 += x[i * stride + offset];
        a1 += x[(i + step) * stride + offset];
        a2 += x[(i + 2 * step) * stride + offset];
        a3 += x[(i + 3 * step) * stride + offset];
        i += 4 * step;
    }
    while i < end {
        a0 += x[i * stride + offset];
        i += step;
    }
    (a0 + a1) + (a2 + a3)
}

/// Planes of a cube of [`column_total_kernel`]: each adds every `COLUMN_TOTAL_PLANES`-th row.
const COLUMN_TOTAL_PLANES: u32 = 32;

/// Rows [`column_sums`] hands to [`column_total_kernel`] at most: four loads a thread.
const COLUMN_TOTAL_ROWS: usize = 4 * COLUMN_TOTAL_PLANES as usize;

/// `total[j] = Σ_i terms[i, j]` of an f32 `terms` `[rows, w]`, in `total`'s dtype: a cube of
/// [`COLUMN_TOTAL_PLANES`] planes for every 32 columns, lane `x` of plane `y` adding rows
/// `y, y + P, …` of column `32·cube + x` (four running sums, four loads in flight), then plane
/// 0 the planes' sums in order. The cast to `total`'s dtype is the last step (it was a launch
/// of its own). The order of the additions is fixed.
#[cube(launch)]
fn column_total_kernel<F: Float>(
    terms: &Tensor<f32>,
    total: &mut Tensor<F>,
    rows: u32,
    width: u32,
    #[define(F)] _dtype: StorageType,
) {
    let mut sums = SharedMemory::<f32>::new(comptime!((LANES * COLUMN_TOTAL_PLANES) as usize));
    let w = width as usize;
    let j = (CUBE_POS_X * LANES + UNIT_POS_X) as usize;
    let planes = CUBE_DIM_Y as usize;
    let mut sum = f32::new(0.0);
    if j < w {
        sum = strided_sum(terms, UNIT_POS_Y as usize, rows as usize, planes, w, j);
    }
    sums[UNIT_POS as usize] = sum;
    sync_cube();
    if UNIT_POS_Y == 0 && j < w {
        let mut column = f32::new(0.0);
        for p in 0..planes {
            column += sums[p * LANES as usize + UNIT_POS_X as usize];
        }
        total[j] = F::cast_from(column);
    }
}

/// Where the rows of a rotary kernel lie: `x`'s three leading axes `[n0, n1, n2]` (rows of the
/// contiguous output in that order) read through `x`'s strides, and the tables' rows. Strides
/// are in the kernel's unit (vectors, or entries for the scalar kernel).
#[derive(CubeLaunch, CubeType)]
struct RotaryLayout {
    /// `x`'s stride along axis 0.
    sx0: u32,
    /// `x`'s stride along axis 1.
    sx1: u32,
    /// `x`'s stride along axis 2.
    sx2: u32,
    /// Distance between the tables' rows.
    table_pitch: u32,
    /// The position of the first row along the position axis (the tables' row of index 0).
    start: u32,
}

/// Where thread `e` of a rotary kernel works.
#[derive(CubeType)]
struct RotaryIndex {
    /// The row of the contiguous output: `(i0·n1 + i1)·n2 + i2`.
    row: u32,
    /// The tables' row: `start` plus the index along the position axis.
    table_row: u32,
    /// The thread's index within its row.
    column: u32,
    /// Offset of the row's first entry in `x`.
    source: usize,
}

/// Thread `e` of rows of `per_row` threads over `x` `[n0, n1, n2, ·]`: positions run along
/// axis 2 (`position_last`: `x` as `[b, H, s, ·]`, the forward) or axis 1 (`[b, s, H, ·]`: a
/// gradient written in the memory order of split heads). `FastDivmod`: a multiply and a
/// shift per division instead of a u32 division's ≈ 20 instructions.
#[cube]
fn rotary_index(
    e: u32,
    per_row: &FastDivmod<u32>,
    n2: &FastDivmod<u32>,
    n1: &FastDivmod<u32>,
    layout: &RotaryLayout,
    #[comptime] position_last: bool,
) -> RotaryIndex {
    let (row, column) = per_row.div_mod(e);
    let (rest, i2) = n2.div_mod(row);
    let (i0, i1) = n1.div_mod(rest);
    let mut position = i1;
    if position_last {
        position = i2;
    }
    RotaryIndex {
        row,
        table_row: layout.start + position,
        column,
        source: i0 as usize * layout.sx0 as usize
            + i1 as usize * layout.sx1 as usize
            + i2 as usize * layout.sx2 as usize,
    }
}

/// Rotary embedding of `x` `[n0, n1, n2, w]` (any strides; positions along axis 2 or 1, see
/// [`rotary_index`]) into the contiguous `out`, one thread per pair: `(x_a, x_b)` becomes
/// `(x_a cos θ − sign·x_b sin θ, x_b cos θ + sign·x_a sin θ)`, the pairs being `(k, k + w/2)`
/// (`interleaved` false, HF LLaMA) or `(2k, 2k + 1)` (true, DeepSeek); `sign = −1` rotates
/// back, which is the gradient (the rotation is orthogonal). `per_row = w/2`; strides in
/// entries, `x`'s last axis of stride `step`. Index arithmetic in u32 (the launcher checks
/// the sizes fit).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    pairs: u32,
    per_row: FastDivmod<u32>,
    n2: FastDivmod<u32>,
    n1: FastDivmod<u32>,
    layout: RotaryLayout,
    step: u32,
    sign: f32,
    #[comptime] interleaved: bool,
    #[comptime] position_last: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= pairs {
        terminate!();
    }
    let at = rotary_index(e, &per_row, &n2, &n1, &layout, position_last);
    let half = x.shape(3) as u32 / 2;
    let k = at.column;
    let mut a = k;
    let mut b = k + half;
    if interleaved {
        a = 2 * k;
        b = 2 * k + 1;
    }
    let base = at.source;
    let step = step as usize;
    let table = at.table_row as usize * layout.table_pitch as usize + k as usize;
    let c = f32::cast_from(cos[table]);
    let sn = sign * f32::cast_from(sin[table]);
    let xa = f32::cast_from(x[base + a as usize * step]);
    let xb = f32::cast_from(x[base + b as usize * step]);
    let o = at.row as usize * 2 * half as usize;
    out[o + a as usize] = F::cast_from(xa * c - xb * sn);
    out[o + b as usize] = F::cast_from(xb * c + xa * sn);
}

/// [`rotary_kernel`] for the half pairing `(k, k + w/2)`, one thread per `N` consecutive
/// pairs, 16-byte loads of bf16 when `N = 8`. Strides and the tables' pitch are in vectors,
/// `per_row = w/(2N)`; `x`'s last axis has unit stride.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_half_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    cos: &Tensor<Vector<F, N>>,
    sin: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    per_row: FastDivmod<u32>,
    n2: FastDivmod<u32>,
    n1: FastDivmod<u32>,
    layout: RotaryLayout,
    half: u32,
    sign: f32,
    #[comptime] position_last: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let at = rotary_index(e, &per_row, &n2, &n1, &layout, position_last);
    let k = at.column as usize;
    let base = at.source + k;
    let table = at.table_row as usize * layout.table_pitch as usize + k;
    let c = Vector::<f32, N>::cast_from(cos[table]);
    let sn = Vector::<f32, N>::new(sign) * Vector::<f32, N>::cast_from(sin[table]);
    let xa = Vector::<f32, N>::cast_from(x[base]);
    let xb = Vector::<f32, N>::cast_from(x[base + half as usize]);
    let o = at.row as usize * 2 * half as usize + k;
    out[o] = Vector::<F, N>::cast_from(xa * c - xb * sn);
    out[o + half as usize] = Vector::<F, N>::cast_from(xb * c + xa * sn);
}

/// [`rotary_kernel`] for the interleaved pairing `(2k, 2k + 1)`, one thread per vector of
/// `N` consecutive entries (`N/2` whole pairs; `N` is 2, 4 (`four`) or 8 (`four` and
/// `eight`); both flags are launch-time constants, so the entries past `N` are not compiled), 16-byte
/// loads of bf16 when `N = 8`; the tables are read as scalars (`N/2` entries per vector, from
/// cache). Strides of `x` and `per_row = w/N` are in vectors, the tables' pitch in entries;
/// `x`'s last axis has unit stride. The entries of a vector are named by literals (a
/// computed index into a vector register was not generated correctly: the GPU test failed).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_interleaved_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    per_row: FastDivmod<u32>,
    n2: FastDivmod<u32>,
    n1: FastDivmod<u32>,
    layout: RotaryLayout,
    pairs: u32,
    sign: f32,
    #[comptime] position_last: bool,
    #[comptime] four: bool,
    #[comptime] eight: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let at = rotary_index(e, &per_row, &n2, &n1, &layout, position_last);
    let j = at.column as usize;
    let v = Vector::<f32, N>::cast_from(x[at.source + j]);
    let table = at.table_row as usize * layout.table_pitch as usize + j * pairs as usize;
    let mut o = Vector::<F, N>::empty();
    let c = f32::cast_from(cos[table]);
    let sn = sign * f32::cast_from(sin[table]);
    o[0] = F::cast_from(v[0] * c - v[1] * sn);
    o[1] = F::cast_from(v[1] * c + v[0] * sn);
    if four {
        let c = f32::cast_from(cos[table + 1]);
        let sn = sign * f32::cast_from(sin[table + 1]);
        o[2] = F::cast_from(v[2] * c - v[3] * sn);
        o[3] = F::cast_from(v[3] * c + v[2] * sn);
    }
    if eight {
        let c = f32::cast_from(cos[table + 2]);
        let sn = sign * f32::cast_from(sin[table + 2]);
        o[4] = F::cast_from(v[4] * c - v[5] * sn);
        o[5] = F::cast_from(v[5] * c + v[4] * sn);
        let c = f32::cast_from(cos[table + 3]);
        let sn = sign * f32::cast_from(sin[table + 3]);
        o[6] = F::cast_from(v[6] * c - v[7] * sn);
        o[7] = F::cast_from(v[7] * c + v[6] * sn);
    }
    out[e as usize] = o;
}

/// The gradient of a block of columns, one thread per vector of `N` entries: `d` `[n, c]`
/// into columns `start..start + c` of `out` `[n, w]` (both with unit-stride rows, `pitch`
/// and `out_pitch` vectors apart; `start`, `block = c` and `per_row` in vectors). Not
/// `accumulate`: every entry of `out` written, 0 outside the block (`per_row = w/N`).
/// `accumulate`: the block added to `out` in place (`per_row = c/N`), in f32 and rounded once.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn place_columns_kernel<F: Float, N: Size>(
    d: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    per_row: FastDivmod<u32>,
    start: u32,
    block: u32,
    pitch: u32,
    out_pitch: u32,
    #[comptime] accumulate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let (row, j) = per_row.div_mod(e);
    let source = row as usize * pitch as usize;
    let target = row as usize * out_pitch as usize;
    if accumulate {
        let at = target + (start + j) as usize;
        let sum = Vector::<f32, N>::cast_from(out[at])
            + Vector::<f32, N>::cast_from(d[source + j as usize]);
        out[at] = Vector::<F, N>::cast_from(sum);
    } else {
        let mut v = Vector::<F, N>::new(F::new(0.0));
        if j >= start && j < start + block {
            v = d[source + (j - start) as usize];
        }
        out[target + j as usize] = v;
    }
}

/// Keys of whole heads with a shared suffix (MLA-Decoupled's `[k_nope | k_pe]`): `keys`
/// `[b, H, t, w₀ + w₁]` (contiguous) from `k_nope` `[b, H, t, w₀]` and `shared` `[b, 1, t, w₁]`
/// (any strides, unit along the last axis), one thread per vector of `N` entries of `keys`.
/// Strides in vectors; `per_row = (w₀ + w₁)/N`, `nope = w₀/N`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn shared_suffix_kernel<F: Float, N: Size>(
    k_nope: &Tensor<Vector<F, N>>,
    shared: &Tensor<Vector<F, N>>,
    keys: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    per_row: FastDivmod<u32>,
    seq: FastDivmod<u32>,
    heads: FastDivmod<u32>,
    layout: SharedSuffixLayout,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let (row, j) = per_row.div_mod(e);
    let (rest, t) = seq.div_mod(row);
    let (b, h) = heads.div_mod(rest);
    if j < layout.nope {
        keys[e as usize] = k_nope[b as usize * layout.sk0 as usize
            + h as usize * layout.sk1 as usize
            + t as usize * layout.sk2 as usize
            + j as usize];
    } else {
        keys[e as usize] = shared[b as usize * layout.ss0 as usize
            + t as usize * layout.ss2 as usize
            + (j - layout.nope) as usize];
    }
}

/// The strides of [`shared_suffix_kernel`]'s inputs (in vectors) and its split.
#[derive(CubeLaunch, CubeType)]
struct SharedSuffixLayout {
    /// `k_nope`'s stride along the batch.
    sk0: u32,
    /// `k_nope`'s stride along the heads.
    sk1: u32,
    /// `k_nope`'s stride along the keys.
    sk2: u32,
    /// The shared suffix's stride along the batch.
    ss0: u32,
    /// The shared suffix's stride along the keys.
    ss2: u32,
    /// Vectors of the heads' own part, `w₀/N`.
    nope: u32,
}

/// The sizes of [`shared_suffix_backward_kernel`]'s rows.
#[derive(CubeLaunch, CubeType)]
struct SharedSuffixSizes {
    /// Heads `H`.
    heads: u32,
    /// Keys `t`.
    seq: u32,
    /// Vectors per row of `dkeys`, `(w₀ + w₁)/N`.
    per_row: u32,
    /// Vectors of the heads' own part, `w₀/N`.
    nope: u32,
}

/// The gradient of [`shared_suffix_kernel`]: from `dkeys` `[b, H, t, w₀ + w₁]` (contiguous),
/// `dk_nope` `[b, t, H, w₀]` (contiguous: the memory order of heads split from `[b, t, H·w₀]`,
/// so merging them back is a view) and `dshared` `[b, t, w₁]`, the sum over heads in f32.
/// Threads `0..nope_vectors` copy one vector of `dk_nope` each; the rest add one vector of
/// `dshared` over the `H` heads. `nope_per_row = w₀/N`, `shared_per_row = w₁/N`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn shared_suffix_backward_kernel<F: Float, N: Size>(
    dkeys: &Tensor<Vector<F, N>>,
    dk_nope: &mut Tensor<Vector<F, N>>,
    dshared: &mut Tensor<Vector<F, N>>,
    nope_vectors: u32,
    vectors: u32,
    nope_per_row: FastDivmod<u32>,
    shared_per_row: FastDivmod<u32>,
    seq: FastDivmod<u32>,
    heads: FastDivmod<u32>,
    sizes: SharedSuffixSizes,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    if e < nope_vectors {
        // dk_nope's row is (b, t, h).
        let (row, j) = nope_per_row.div_mod(e);
        let (rest, h) = heads.div_mod(row);
        let (b, t) = seq.div_mod(rest);
        let source = ((b * sizes.heads + h) * sizes.seq + t) * sizes.per_row + j;
        dk_nope[e as usize] = dkeys[source as usize];
    } else {
        let i = e - nope_vectors;
        let (row, j) = shared_per_row.div_mod(i);
        let (b, t) = seq.div_mod(row);
        let stride = (sizes.seq * sizes.per_row) as usize;
        let mut source =
            ((b * sizes.heads * sizes.seq + t) * sizes.per_row + sizes.nope + j) as usize;
        let mut acc = Vector::<f32, N>::new(0.0);
        for _ in 0..sizes.heads {
            acc += Vector::<f32, N>::cast_from(dkeys[source]);
            source += stride;
        }
        dshared[i as usize] = Vector::<F, N>::cast_from(acc);
    }
}

/// `Σ value` over the cube's planes (`CUBE_DIM_Y` ≤ [`TOTAL_PLANES`] of them, 32 lanes each),
/// in a fixed order; the result is valid in unit 0 of the cube.
#[cube]
fn cube_sum(value: f32) -> f32 {
    let mut per_plane = SharedMemory::<f32>::new(TOTAL_PLANES as usize);
    let plane = plane_sum(value);
    if UNIT_POS_X == 0 {
        per_plane[UNIT_POS_Y as usize] = plane;
    }
    sync_cube();
    let mut total = f32::new(0.0);
    if UNIT_POS == 0 {
        for p in 0..CUBE_DIM_Y {
            total += per_plane[p as usize];
        }
    }
    total
}

/// `partial[at] = Σ x_i²` (f32 arithmetic) over the share of cube `cube` of `cubes` of `x`'s
/// entries (a grid-stride loop over the `cubes` cubes' threads).
#[cube]
fn square_share<F: Float>(
    x: &Tensor<F>,
    cube: u32,
    cubes: u32,
    partial: &mut Tensor<f32>,
    at: u32,
) {
    let threads = (cubes * CUBE_DIM_X * CUBE_DIM_Y) as usize;
    let mut i = ((cube * CUBE_DIM_Y + UNIT_POS_Y) * CUBE_DIM_X + UNIT_POS_X) as usize;
    let len = x.len();
    let mut acc = f32::new(0.0);
    while i < len {
        let v = f32::cast_from(x[i]);
        acc += v * v;
        i += threads;
    }
    let total = cube_sum(acc);
    if UNIT_POS == 0 {
        partial[at as usize] = total;
    }
}

/// Per cube, one partial sum of squares of one of the tensors `xs` (up to [`SQUARE_GROUP`] in
/// one launch, so a model's ≈ 150 gradients take ≈ 10 launches, not one each): tensor `t` has
/// cubes `starts[t]..starts[t + 1]`, and cube `c` writes `partial[offset + c]`.
#[cube(launch)]
fn sum_of_squares_kernel<F: Float>(
    xs: &Sequence<Tensor<F>>,
    starts: Sequence<u32>,
    partial: &mut Tensor<f32>,
    offset: u32,
    #[define(F)] _dtype: StorageType,
) {
    let count = comptime![xs.len()];
    let cube = CUBE_POS_X;
    #[unroll]
    for t in 0..count {
        let next = comptime![t + 1];
        let begin = *starts.index(t);
        let end = *starts.index(next);
        if cube >= begin && cube < end {
            square_share::<F>(
                xs.index(t),
                cube - begin,
                end - begin,
                partial,
                offset + cube,
            );
        }
    }
}

/// Planes of the one cube of [`cube_total_kernel`] (1 024 threads).
const TOTAL_PLANES: u32 = 32;

/// `total[0] = scale · Σ x_i` of an f32 `x`, by one cube of [`TOTAL_PLANES`] planes. Each
/// thread keeps four partial sums of entries a cube's width apart, so that four loads are in
/// flight (one running sum waits on each load in turn: 16 384 entries took 364 µs in burn's
/// one-plane `mean`, docs/performance.md). The order of the additions is fixed.
#[cube(launch)]
fn cube_total_kernel(x: &Tensor<f32>, total: &mut Tensor<f32>, len: u32, scale: f32) {
    let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
    let first = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    let sum = cube_sum(strided_sum(x, first, len as usize, threads, 1, 0));
    if UNIT_POS == 0 {
        total[0] = sum * scale;
    }
}

/// `scale · Σ x_i` `[1]` of a contiguous f32 `x` ([`cube_total_kernel`]).
fn scaled_total(x: Primitive, scale: f32) -> Primitive {
    let total = empty_like(&x, Shape::new([1]), DType::F32);
    cube_total_kernel::launch::<CudaRuntime>(
        &x.client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_2d(LANES, TOTAL_PLANES),
        x.clone().into_tensor_arg(),
        total.clone().into_tensor_arg(),
        x.meta.num_elements() as u32,
        scale,
    );
    total
}

/// `acc[t_i, :] += dy[i, :]` (f32 atomics) for the rows `i` of `dy` `[n, w]` whose token
/// `t_i` is in the vocabulary.
#[cube(launch)]
fn embedding_backward_kernel<F: Float, I: Int>(
    dy: &Tensor<F>,
    tokens: &Tensor<I>,
    acc: &mut Tensor<Atomic<f32>>,
    rows: u32,
    width: u32,
    vocab: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let token = u32::cast_from(tokens[row as usize]);
    if token >= vocab {
        terminate!();
    }
    let w = width as usize;
    let src = row as usize * w;
    // burn's zeros may pad rows (pitched allocation): address `acc` through its row stride.
    let dst = token as usize * acc.stride(0);
    let mut j = UNIT_POS_X as usize;
    while j < w {
        acc[dst + j].fetch_add(f32::cast_from(dy[src + j]));
        j += CUBE_DIM_X as usize;
    }
}

/// The launch geometry for `rows` rows, one plane each.
fn geometry(rows: usize) -> (CubeCount, CubeDim) {
    let cubes = rows.div_ceil(ROWS_PER_CUBE as usize) as u32;
    (
        CubeCount::Static(cubes, 1, 1),
        CubeDim::new_2d(LANES, ROWS_PER_CUBE),
    )
}

/// The widest vector of elements (16 bytes at most: 8 of bf16, 4 of f32) that the last axis
/// of every one of `tensors` takes: unit stride there, its length and the smallest other
/// stride divisible by it (cubecl's rule, which burn's own element-wise kernels apply). That
/// covers every stride of a 2-D or contiguous tensor; the rotary, whose input may be any
/// view, checks each of its strides itself.
fn vector_size(tensors: &[&Primitive]) -> usize {
    tensors
        .iter()
        .map(|t| {
            tensor_vector_size_parallel(
                t.client.io_optimized_vector_sizes(t.dtype.size()),
                t.meta.shape(),
                t.meta.strides(),
                t.meta.num_dims() - 1,
            )
        })
        .min()
        .unwrap_or(1)
}

/// The widest of `widest`, `widest/2`, … (a power of two) that `fits`; 1 when none does.
fn narrowed(widest: usize, fits: impl Fn(usize) -> bool) -> usize {
    let mut vector = widest;
    while vector > 1 && !fits(vector) {
        vector /= 2;
    }
    vector
}

/// The float dtypes the kernels are compiled for (their arithmetic is f32 whatever these are).
fn float_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
}

/// The integer dtypes the kernels read token ids and targets from.
fn index_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::I32 | DType::I64 | DType::U32)
}

/// Whether the device's planes are warps of [`LANES`]: every kernel with a plane reduction
/// lays its cubes out as `LANES` × rows.
fn plane_is_warp(t: &Primitive) -> bool {
    let hardware = &t.client.properties().hardware;
    hardware.plane_size_min == LANES && hardware.plane_size_max == LANES
}

/// Whether the row kernels can take a float tensor of this `dtype` with `rows` rows of
/// `width`: a float dtype, sizes that fit the kernels' u32 indices, and a 32-lane plane.
fn supported(t: &Primitive, rows: usize, width: usize) -> bool {
    float_dtype(t.dtype)
        && rows > 0
        && width > 0
        && rows
            .checked_mul(width)
            .is_some_and(|n| n <= u32::MAX as usize)
        && rows.div_ceil(ROWS_PER_CUBE as usize) <= i32::MAX as usize
        // The column sums' first grid (`column_sums` of an RMSNorm backward's partial rows,
        // at most one per cube of rows, or 4 096) along y.
        && rows
            .div_ceil(ROWS_PER_CUBE as usize)
            .max(NORM_BACKWARD_PLANES)
            .div_ceil(ROWS_PER_CHUNK)
            <= u16::MAX as usize
        && plane_is_warp(t)
}

/// Whether the row kernels take `t` `[n, w]` read in place when its rows are pitched
/// ([`with_unit_rows`]): [`supported`] with the pitch as the width, since the last row ends
/// `n · pitch` elements in.
fn rows_supported(t: &Primitive) -> bool {
    let [rows, width] = t.meta.shape().dims::<2>();
    supported(t, rows, t.meta.strides()[0].max(width))
}

/// Whether the RMSNorm kernels take `x` `[n, w]` (pitched rows read in place) and `gain`
/// `[w]` (of `x`'s dtype).
pub(super) fn rms_norm_supported(x: &Primitive, gain: &Primitive) -> bool {
    rows_supported(x) && gain.dtype == x.dtype
}

fn empty_like(t: &Primitive, shape: Shape, dtype: DType) -> Primitive {
    empty_device_contiguous_dtype(t.client.clone(), t.device.clone(), shape, dtype)
}

/// `t` in `dtype` (a cast only when it differs).
pub(super) fn in_dtype(t: Primitive, dtype: DType) -> Primitive {
    if t.dtype == dtype {
        t
    } else {
        Inner::float_cast(t, dtype.into())
    }
}

/// `dy` in `dtype` and contiguous (gradients may arrive broadcast, transposed or in f32).
fn contiguous_gradient(dy: Primitive, dtype: DType) -> Primitive {
    into_contiguous(in_dtype(dy, dtype))
}

/// Rows per chunk of [`column_sums`]' passes: 16, four rounds of four loads a thread. (With
/// 64, the first pass over an RMSNorm backward's `[2 048, 768]` partial rows had 96 cubes,
/// each thread waiting out sixteen rounds of loads, and the two passes averaged 7.6 µs a
/// launch: three shorter passes over more cubes instead, +0.6 / +0.5 / 0.0 % tokens/s,
/// docs/performance.md.)
const ROWS_PER_CHUNK: usize = 16;
/// Threads per cube of the column sums and the element-wise kernels.
const THREADS: u32 = 256;

/// Column sums of an f32 `[n, w]` tensor, `[w]` in `dtype`: passes of [`column_sum_kernel`]
/// that each cut the rows by [`ROWS_PER_CHUNK`] while more than [`COLUMN_TOTAL_ROWS`] are
/// left, then [`column_total_kernel`], which adds the rest and writes `dtype`. (burn's
/// `sum_dim(0)` launched two cubes for `[16384, 768]` and took 1.9 ms. Passes down to one row
/// and a cast after them made an RMSNorm backward five launches, the kernel's included; now
/// three.) Deterministic: a fixed order of additions.
fn column_sums(terms: Primitive, dtype: DType) -> Primitive {
    let [mut rows, width] = terms.meta.shape().dims::<2>();
    let mut current = terms;
    while rows > COLUMN_TOTAL_ROWS {
        let chunks = rows.div_ceil(ROWS_PER_CHUNK);
        let partial = empty_like(&current, Shape::new([chunks, width]), DType::F32);
        column_sum_kernel::launch::<CudaRuntime>(
            &current.client,
            CubeCount::Static(width.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
            CubeDim::new_1d(THREADS),
            current.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows as u32,
            width as u32,
            ROWS_PER_CHUNK as u32,
        );
        (current, rows) = (partial, chunks);
    }
    let total = empty_like(&current, Shape::new([width]), dtype);
    column_total_kernel::launch::<CudaRuntime>(
        &total.client,
        CubeCount::Static(width.div_ceil(LANES as usize) as u32, 1, 1),
        CubeDim::new_2d(LANES, COLUMN_TOTAL_PLANES),
        current.into_tensor_arg(),
        total.clone().into_tensor_arg(),
        rows as u32,
        width as u32,
        dtype.into(),
    );
    total
}

/// RMSNorm forward on `x` `[n, w]` (unit-stride rows, any pitch: [`with_unit_rows`]) and
/// `gain` `[w]`: `(y, r)`, `y` contiguous, `r` f32 `[n]`.
pub(super) fn rms_norm_forward(x: Primitive, gain: Primitive, eps: f64) -> (Primitive, Primitive) {
    let [rows, width] = x.meta.shape().dims::<2>();
    let y = empty_like(&x, x.meta.shape().clone(), x.dtype);
    let rstd = empty_like(&x, Shape::new([rows]), DType::F32);
    let (count, dim) = geometry(rows);
    let dtype = x.dtype;
    let vector = vector_size(&[&x, &gain]);
    let pitch = row_pitch(&x) / vector;
    rms_norm_forward_kernel::launch::<CudaRuntime>(
        &x.client,
        count,
        dim,
        vector,
        x.clone().into_tensor_arg(),
        gain.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        rows as u32,
        width as u32,
        pitch as u32,
        eps as f32,
        dtype.into(),
    );
    (y, rstd)
}

/// Vectors a lane of [`rms_norm_backward_rows_kernel`] holds at most (each of `x` and `dy`):
/// rows of up to 4·32·8 = 1 024 bf16 (the paper preset's 768 and 256 take 3 and 1). Its
/// shared memory is then `8·32·4` vectors of up to 8 f32, 32 KiB (48 KiB is the most a
/// kernel has without opting in); wider rows take [`rms_norm_backward_kernel`].
const NORM_ROW_VECTORS_PER_LANE: usize = 4;

/// Planes of [`rms_norm_backward_kernel`] (rows wider than [`NORM_ROW_VECTORS_PER_LANE`]
/// vectors a lane) at most: each sums the gain's gradient over its groups of
/// [`NORM_GROUP_ROWS`] rows into a partial row, `[P, w]` f32 in all, where one `[n, w]` f32
/// row of terms per input row (50 MB for `[16 384, 768]`, written and read again, ≈ 100 µs
/// with its column sums) was the first version.
const NORM_BACKWARD_PLANES: usize = 4096;

/// RMSNorm backward: `(dx [n, w], dγ [w], accumulated)` in the dtypes of `x` and `gain`;
/// `x` with unit-stride rows, any pitch ([`with_unit_rows`]). With `earlier` (a gradient
/// `x` already has, `[n, w]`), `dx` is `earlier` plus the norm's gradient: added in the kernel,
/// over `earlier`'s buffer, when it is a uniquely owned tensor of `x`'s dtype with unit-stride
/// rows (any pitch: burn pads rows that are not a multiple of 512 bytes) (`accumulated`),
/// else by an addition after it.
pub(super) fn rms_norm_backward(
    x: Primitive,
    gain: Primitive,
    rstd: Primitive,
    dy: Primitive,
    earlier: Option<Primitive>,
) -> (Primitive, Primitive, bool) {
    let [rows, width] = x.meta.shape().dims::<2>();
    let dy = contiguous_gradient(dy, x.dtype);
    let (dx, accumulate, left) = gradient_target(earlier, &x, x.dtype, [rows, width]);
    let (dtype, gain_dtype) = (x.dtype, gain.dtype);
    let vector = vector_size(&[&x, &gain, &dy, &dx]);
    let (pitch, dx_pitch) = (row_pitch(&x) / vector, row_pitch(&dx) / vector);
    let per_lane = (width / vector).div_ceil(LANES as usize);
    let partial = if per_lane <= NORM_ROW_VECTORS_PER_LANE {
        // One partial row of the gain's gradient per cube of rows.
        let cubes = rows.div_ceil(ROWS_PER_CUBE as usize);
        let partial = empty_like(&x, Shape::new([cubes, width]), DType::F32);
        let (count, dim) = geometry(rows);
        rms_norm_backward_rows_kernel::launch::<CudaRuntime>(
            &x.client,
            count,
            dim,
            vector,
            x.clone().into_tensor_arg(),
            gain.into_tensor_arg(),
            rstd.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows as u32,
            width as u32,
            pitch as u32,
            dx_pitch as u32,
            per_lane,
            accumulate,
            dtype.into(),
        );
        partial
    } else {
        // One partial row of the gain's gradient per plane that has a group of rows to do.
        let groups = rows.div_ceil(NORM_GROUP_ROWS);
        let planes = groups.min(NORM_BACKWARD_PLANES);
        let partial = empty_like(&x, Shape::new([planes, width]), DType::F32);
        let (count, dim) = geometry(planes);
        rms_norm_backward_kernel::launch::<CudaRuntime>(
            &x.client,
            count,
            dim,
            vector,
            x.clone().into_tensor_arg(),
            gain.into_tensor_arg(),
            rstd.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows as u32,
            groups as u32,
            width as u32,
            pitch as u32,
            dx_pitch as u32,
            accumulate,
            dtype.into(),
        );
        partial
    };
    (
        add_left(dx, left),
        column_sums(partial, gain_dtype),
        accumulate,
    )
}

/// The causal softmax's sizes: `(rows, queries s, keys t)` of `[b, H, s, t]`.
fn softmax_sizes(scores: &Primitive) -> (usize, usize, usize) {
    let [b, h, s, t] = scores.meta.shape().dims::<4>();
    (b * h * s, s, t)
}

/// `P = softmax_causal(c·scores)` row by row (`c` the scale, e.g. `1/√d_k`), in `scores`'
/// dtype: `P_ik = exp(c·x_ik − log Σ_{j visible} exp(c·x_ij))` for visible `k`, else 0.
pub(super) fn causal_softmax_forward(scores: Primitive, offset: usize, scale: f64) -> Primitive {
    let (rows, queries, keys) = softmax_sizes(&scores);
    let probs = empty_like(&scores, scores.meta.shape().clone(), scores.dtype);
    let (count, dim) = geometry(rows);
    let dtype = scores.dtype;
    let vector = vector_size(&[&scores]);
    causal_softmax_forward_kernel::launch::<CudaRuntime>(
        &scores.client,
        count,
        dim,
        vector,
        scores.clone().into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        rows as u32,
        queries as u32,
        keys as u32,
        offset as u32,
        scale as f32,
        keys / vector <= LANES as usize,
        dtype.into(),
    );
    probs
}

/// The gradient at the scores of [`causal_softmax_forward`]:
/// `dx_ik = c·P_ik·(dP_ik − Σ_j P_ij dP_ij)`.
pub(super) fn causal_softmax_backward(
    probs: Primitive,
    dprobs: Primitive,
    offset: usize,
    scale: f64,
) -> Primitive {
    let (rows, queries, keys) = softmax_sizes(&probs);
    let dprobs = contiguous_gradient(dprobs, probs.dtype);
    let dscores = empty_like(&probs, probs.meta.shape().clone(), probs.dtype);
    let (count, dim) = geometry(rows);
    let dtype = probs.dtype;
    let vector = vector_size(&[&probs, &dprobs]);
    causal_softmax_backward_kernel::launch::<CudaRuntime>(
        &probs.client,
        count,
        dim,
        vector,
        probs.clone().into_tensor_arg(),
        dprobs.into_tensor_arg(),
        dscores.clone().into_tensor_arg(),
        rows as u32,
        queries as u32,
        keys as u32,
        offset as u32,
        scale as f32,
        keys / vector <= LANES as usize,
        dtype.into(),
    );
    dscores
}

/// Whether the causal softmax kernel takes `scores` `[b, H, s, t]` at `offset`: the row
/// index arithmetic needs `offset + s ≤ t` (every row sees at least its first key).
pub(super) fn softmax_supported(scores: &Primitive, offset: usize) -> bool {
    let (rows, queries, keys) = softmax_sizes(scores);
    supported(scores, rows, keys) && offset.checked_add(queries).is_some_and(|end| end <= keys)
}

/// Launch geometry of an element-wise kernel over `len` entries.
fn elementwise(len: usize) -> (CubeCount, CubeDim) {
    let cubes = len.div_ceil(THREADS as usize) as u32;
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(THREADS))
}

/// Whether the SwiGLU kernels take `gate` and `up`: equal shapes and float dtypes, sizes
/// within u32 indexing.
pub(super) fn swiglu_supported(gate: &Primitive, up: &Primitive) -> bool {
    let len = gate.meta.num_elements();
    float_dtype(gate.dtype)
        && gate.dtype == up.dtype
        && gate.meta.shape() == up.meta.shape()
        && len > 0
        && len <= u32::MAX as usize - THREADS as usize
}

/// `silu(gate) ⊙ up` of two contiguous tensors of one shape.
pub(super) fn swiglu_forward(gate: Primitive, up: Primitive) -> Primitive {
    let len = gate.meta.num_elements();
    let out = empty_like(&gate, gate.meta.shape().clone(), gate.dtype);
    let vector = vector_size(&[&gate, &up]);
    let (count, dim) = elementwise(len / vector);
    let dtype = gate.dtype;
    swiglu_forward_kernel::launch::<CudaRuntime>(
        &gate.client,
        count,
        dim,
        vector,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (len / vector) as u32,
        dtype.into(),
    );
    out
}

/// SwiGLU backward: `(d gate, d up)` from `dy`, with `σ = sigmoid(gate)`:
/// `d gate = dy·up·σ·(1 + gate·(1 − σ))`, `d up = dy·gate·σ`.
pub(super) fn swiglu_backward(
    gate: Primitive,
    up: Primitive,
    dy: Primitive,
) -> (Primitive, Primitive) {
    let len = gate.meta.num_elements();
    let dy = contiguous_gradient(dy, gate.dtype);
    let dgate = empty_like(&gate, gate.meta.shape().clone(), gate.dtype);
    let dup = empty_like(&gate, gate.meta.shape().clone(), gate.dtype);
    let vector = vector_size(&[&gate, &up, &dy]);
    let (count, dim) = elementwise(len / vector);
    let dtype = gate.dtype;
    swiglu_backward_kernel::launch::<CudaRuntime>(
        &gate.client,
        count,
        dim,
        vector,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        dy.into_tensor_arg(),
        dgate.clone().into_tensor_arg(),
        dup.clone().into_tensor_arg(),
        (len / vector) as u32,
        dtype.into(),
    );
    (dgate, dup)
}

/// Whether the cross-entropy kernels take `logits` `[n, v]` and `targets` `[n]`.
pub(super) fn cross_entropy_supported(logits: &Primitive, targets: &Primitive) -> bool {
    let [rows, _] = logits.meta.shape().dims::<2>();
    rows_supported(logits)
        && index_dtype(targets.dtype)
        && targets.meta.shape().dims::<1>() == [rows]
}

/// `t` `[n, w]` as the row kernels read it: unchanged when its rows are unit-stride and do
/// not overlap (contiguous or pitched), else a contiguous copy.
pub(super) fn with_unit_rows(t: Primitive) -> Primitive {
    if unit_rows(&t) { t } else { into_contiguous(t) }
}

/// Whether `t` `[n, w]` has unit-stride rows that do not overlap, any pitch (a single row or
/// column may have any stride along its length of one): what the row kernels read and write
/// in place, rows [`row_pitch`] apart.
fn unit_rows(t: &Primitive) -> bool {
    let [rows, width] = t.meta.shape().dims::<2>();
    let strides = t.meta.strides();
    (strides[1] == 1 || width == 1) && (strides[0] >= width || rows == 1)
}

/// Where a kernel writes a gradient of rows `[n, w]` of `dtype`: into `earlier`, the gradient
/// the tensor already has, when the kernel may add to it in place (that dtype and shape,
/// unit-stride rows ([`unit_rows`]), a buffer no other tensor shares; `true`); else into a new
/// tensor on `like`'s device, with `earlier` handed back for [`add_left`].
fn gradient_target(
    earlier: Option<Primitive>,
    like: &Primitive,
    dtype: DType,
    shape: [usize; 2],
) -> (Primitive, bool, Option<Primitive>) {
    match earlier {
        Some(t)
            if t.dtype == dtype
                && t.meta.shape().iter().copied().eq(shape)
                && unit_rows(&t)
                && t.can_mut() =>
        {
            (t, true, None)
        }
        other => (empty_like(like, Shape::new(shape), dtype), false, other),
    }
}

/// `out` plus the earlier gradient [`gradient_target`] could not write into, if any.
fn add_left(out: Primitive, left: Option<Primitive>) -> Primitive {
    match left {
        Some(earlier) => Inner::float_add(out, earlier),
        None => out,
    }
}

/// An uninitialised `[n, w]` tensor laid out as `t` is, when `t`'s rows are unit-stride (the
/// cross-entropy's gradient then has the logits' pitch, which keeps the head's backward
/// products on aligned rows).
fn empty_rows_like(t: &Primitive) -> Primitive {
    let [rows, width] = t.meta.shape().dims::<2>();
    let pitch = t.meta.strides()[0];
    if t.meta.strides()[1] != 1 || pitch <= width || rows == 1 {
        return empty_like(t, t.meta.shape().clone(), t.dtype);
    }
    super::backend::empty_pitched(t, t.meta.shape().to_vec(), pitch)
}

/// Elements from one row of a 2-D tensor with unit-stride rows to the next (its width when
/// it has one row, whose stride may be anything).
fn row_pitch(t: &Primitive) -> usize {
    let [rows, width] = t.meta.shape().dims::<2>();
    if rows == 1 {
        width
    } else {
        t.meta.strides()[0]
    }
}

/// `(mean_i nll_i [1], lse [n])` in f32 of `logits` `[n, v]` (unit-stride rows, any pitch:
/// [`with_unit_rows`]) and contiguous `targets` `[n]`.
pub(super) fn cross_entropy_forward(
    logits: Primitive,
    targets: Primitive,
) -> (Primitive, Primitive) {
    let [rows, vocab] = logits.meta.shape().dims::<2>();
    let nll = empty_like(&logits, Shape::new([rows]), DType::F32);
    let lse = empty_like(&logits, Shape::new([rows]), DType::F32);
    let (count, dim) = geometry(rows);
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    let vector = vector_size(&[&logits]);
    let pitch = row_pitch(&logits) / vector;
    cross_entropy_forward_kernel::launch::<CudaRuntime>(
        &logits.client,
        count,
        dim,
        vector,
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        nll.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        rows as u32,
        vocab as u32,
        pitch as u32,
        // A runtime NaN: the loss of a row whose target is outside the vocabulary.
        f32::NAN,
        dtypes,
    );
    (scaled_total(nll, 1.0 / rows as f32), lse)
}

/// Cross-entropy backward: `d logits` in the logits' dtype, from the gradient `grad` `[1]` of
/// the mean.
pub(super) fn cross_entropy_backward(
    logits: Primitive,
    targets: Primitive,
    lse: Primitive,
    grad: Primitive,
) -> Primitive {
    let [rows, vocab] = logits.meta.shape().dims::<2>();
    let grad = contiguous_gradient(grad, DType::F32);
    let dlogits = empty_rows_like(&logits);
    let (count, dim) = geometry(rows);
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    let vector = vector_size(&[&logits, &dlogits]);
    let (pitch, out_pitch) = (row_pitch(&logits) / vector, row_pitch(&dlogits) / vector);
    cross_entropy_backward_kernel::launch::<CudaRuntime>(
        &logits.client,
        count,
        dim,
        vector,
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        dlogits.clone().into_tensor_arg(),
        rows as u32,
        vocab as u32,
        pitch as u32,
        out_pitch as u32,
        dtypes,
    );
    dlogits
}

/// Whether the rotary kernel takes `x` `[b, h, s, w]` with tables `[max_seq, w/2]` at
/// `start`: float `x` of the tables' dtype, even `w`, positions inside the tables.
pub(super) fn rotary_supported(
    x: &Primitive,
    cos: &Primitive,
    sin: &Primitive,
    start: usize,
) -> bool {
    let [_, _, s, w] = x.meta.shape().dims::<4>();
    let [max_seq, half] = cos.meta.shape().dims::<2>();
    let len = x.meta.num_elements();
    float_dtype(x.dtype)
        && cos.dtype == x.dtype
        && sin.dtype == x.dtype
        && sin.meta.shape() == cos.meta.shape()
        && w > 0
        && w % 2 == 0
        && half == w / 2
        && start.checked_add(s).is_some_and(|end| end <= max_seq)
        && len > 0
        && len <= u32::MAX as usize - THREADS as usize
}

/// The rotary embedding (`sign = 1`) or its gradient (`sign = −1`) of `x` `[n0, n1, n2, w]`
/// (any strides), contiguous in `x`'s axis order; positions run along axis 2
/// (`position_last`, `x` as `[b, H, s, w]`) or axis 1 (`[b, s, H, w]`). `cos`, `sin`
/// contiguous.
pub(super) fn rotary(
    x: Primitive,
    cos: Primitive,
    sin: Primitive,
    start: usize,
    interleaved: bool,
    sign: f32,
    position_last: bool,
) -> Primitive {
    let pairs = x.meta.num_elements() / 2;
    let out = empty_like(&x, x.meta.shape().clone(), x.dtype);
    let dtype = x.dtype;
    let [_, n1, n2, w] = x.meta.shape().dims::<4>();
    let half = w / 2;
    // Vectors along the last axis: they must divide the pairs' span (`w/2` for the half
    // pairing, `w` for the interleaved one, whose vectors hold whole pairs) and every stride
    // of `x` (the half pairing's tables too, which it reads as vectors), in vectors within u32.
    let strides = x.meta.strides().to_vec();
    let table_pitch = cos.meta.strides()[0];
    let fits = |v: usize| {
        let span = if interleaved { w } else { half };
        // The interleaved kernel reads the tables as scalars: their pitch does not matter.
        let table = if interleaved { 0 } else { table_pitch };
        span % v == 0
            && strides[..3]
                .iter()
                .chain([&table])
                .all(|&st| st % v == 0 && st / v <= u32::MAX as usize)
    };
    let widest = if interleaved {
        // The interleaved kernel names at most eight entries of a vector.
        vector_size(&[&x]).min(8)
    } else {
        vector_size(&[&x, &cos, &sin])
    };
    let vector = narrowed(widest, fits);
    // Strides of `x` and the tables' pitch in the kernel's unit (`unit` entries).
    let layout = |unit: usize, pitch_unit: usize| {
        RotaryLayoutLaunch::new(
            (strides[0] / unit) as u32,
            (strides[1] / unit) as u32,
            (strides[2] / unit) as u32,
            (table_pitch / pitch_unit) as u32,
            start as u32,
        )
    };
    if vector > 1 && interleaved {
        let vectors = x.meta.num_elements() / vector;
        let (count, dim) = elementwise(vectors);
        rotary_interleaved_kernel::launch::<CudaRuntime>(
            &x.client,
            count,
            dim,
            vector,
            x.clone().into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            vectors as u32,
            (w / vector) as u32,
            n2 as u32,
            n1 as u32,
            layout(vector, 1),
            (vector / 2) as u32,
            sign,
            position_last,
            vector >= 4,
            vector == 8,
            dtype.into(),
        );
        return out;
    }
    if vector > 1 {
        let vectors = pairs / vector;
        let (count, dim) = elementwise(vectors);
        rotary_half_kernel::launch::<CudaRuntime>(
            &x.client,
            count,
            dim,
            vector,
            x.clone().into_tensor_arg(),
            cos.clone().into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            vectors as u32,
            (half / vector) as u32,
            n2 as u32,
            n1 as u32,
            layout(vector, vector),
            (half / vector) as u32,
            sign,
            position_last,
            dtype.into(),
        );
        return out;
    }
    let (count, dim) = elementwise(pairs);
    rotary_kernel::launch::<CudaRuntime>(
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        pairs as u32,
        half as u32,
        n2 as u32,
        n1 as u32,
        layout(1, 1),
        strides[3] as u32,
        sign,
        interleaved,
        position_last,
        dtype.into(),
    );
    out
}

/// Whether `x` `[b, H, s, w]` is heads split from a contiguous `[b, s, H·w]`
/// (`[b, s, H, w]` read with axes 1 and 2 swapped): the layout its gradient is best written
/// in, since merging the heads back is then a view.
pub(super) fn split_heads_layout(x: &Primitive) -> bool {
    let [_, h, s, w] = x.meta.shape().dims::<4>();
    x.meta.strides()[..] == [s * h * w, w, h * w, 1]
}

/// Whether [`place_columns`] takes the gradient `d` `[n, c]` of columns `start..start + c`
/// of a `[n, w]` tensor: a float dtype, unit-stride rows, the block inside the row, sizes
/// within u32 indexing.
pub(super) fn place_columns_supported(d: &Primitive, width: usize, start: usize) -> bool {
    let [rows, block] = d.meta.shape().dims::<2>();
    float_dtype(d.dtype)
        && unit_rows(d)
        && block > 0
        && start + block <= width
        && rows * width <= u32::MAX as usize - THREADS as usize
        && row_pitch(d) <= u32::MAX as usize
}

/// The gradient of `x` `[n, w]` from that of its columns `start..start + c`, `d` `[n, c]`
/// (after [`place_columns_supported`]): added in place to `earlier`, the gradient `x` already
/// has, when that is uniquely owned, of `d`'s dtype and with unit-stride rows (`true` is
/// returned); else written into zeros (one pass over `[n, w]`, where autodiff's slice fills
/// zeros and then assigns the block), and `earlier` added to it.
pub(super) fn place_columns(
    d: Primitive,
    width: usize,
    start: usize,
    earlier: Option<Primitive>,
) -> (Primitive, bool) {
    let [rows, block] = d.meta.shape().dims::<2>();
    let (out, accumulate, left) = gradient_target(earlier, &d, d.dtype, [rows, width]);
    let (pitch, out_pitch) = (row_pitch(&d), row_pitch(&out));
    let fits = |v: usize| {
        [start, block, width, pitch, out_pitch]
            .iter()
            .all(|&n| n % v == 0)
    };
    let vector = narrowed(vector_size(&[&d, &out]), fits);
    let per_row = if accumulate { block } else { width } / vector;
    let vectors = rows * per_row;
    let (count, dim) = elementwise(vectors);
    let dtype = d.dtype;
    place_columns_kernel::launch::<CudaRuntime>(
        &d.client,
        count,
        dim,
        vector,
        d.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        vectors as u32,
        per_row as u32,
        (start / vector) as u32,
        (block / vector) as u32,
        (pitch / vector) as u32,
        (out_pitch / vector) as u32,
        accumulate,
        dtype.into(),
    );
    (add_left(out, left), accumulate)
}

/// Whether [`shared_suffix`] takes `k_nope` `[b, H, t, w₀]` and `shared` `[b, 1, t, w₁]`:
/// one float dtype, matching `b` and `t`, widths and strides that take vectors of 2 entries
/// or more (the models' 64 and 32 take 8), sizes within u32 indexing.
pub(super) fn shared_suffix_supported(k_nope: &Primitive, shared: &Primitive) -> bool {
    let [b, h, t, w0] = k_nope.meta.shape().dims::<4>();
    let [bs, one, ts, w1] = shared.meta.shape().dims::<4>();
    let len = b * h * t * (w0 + w1);
    float_dtype(k_nope.dtype)
        && shared.dtype == k_nope.dtype
        && (bs, one, ts) == (b, 1, t)
        && w0 > 0
        && w1 > 0
        && len <= u32::MAX as usize - THREADS as usize
        && suffix_vector(k_nope, shared) > 1
}

/// The widest vector that divides both widths, unit-stride last axes and every other stride
/// of both inputs (1 when none does).
fn suffix_vector(k_nope: &Primitive, shared: &Primitive) -> usize {
    let [_, _, _, w0] = k_nope.meta.shape().dims::<4>();
    let [_, _, _, w1] = shared.meta.shape().dims::<4>();
    let (sk, ss) = (k_nope.meta.strides(), shared.meta.strides());
    let fits = |v: usize| {
        w0 % v == 0
            && w1 % v == 0
            && sk[3] == 1
            && ss[3] == 1
            && [sk[0], sk[1], sk[2], ss[0], ss[2]]
                .iter()
                .all(|&st| st % v == 0 && st / v <= u32::MAX as usize)
    };
    narrowed(vector_size(&[k_nope, shared]).max(1), fits)
}

/// `[k_nope | shared]` `[b, H, t, w₀ + w₁]` (contiguous), `shared` `[b, 1, t, w₁]` repeated
/// for every head (after [`shared_suffix_supported`]).
pub(super) fn shared_suffix(k_nope: Primitive, shared: Primitive) -> Primitive {
    let [b, h, t, w0] = k_nope.meta.shape().dims::<4>();
    let w1 = shared.meta.shape()[3];
    let vector = suffix_vector(&k_nope, &shared);
    let keys = empty_like(&k_nope, Shape::new([b, h, t, w0 + w1]), k_nope.dtype);
    let vectors = b * h * t * (w0 + w1) / vector;
    let (sk, ss) = (
        k_nope.meta.strides().to_vec(),
        shared.meta.strides().to_vec(),
    );
    let (count, dim) = elementwise(vectors);
    let dtype = k_nope.dtype;
    shared_suffix_kernel::launch::<CudaRuntime>(
        &k_nope.client,
        count,
        dim,
        vector,
        k_nope.clone().into_tensor_arg(),
        shared.into_tensor_arg(),
        keys.clone().into_tensor_arg(),
        vectors as u32,
        ((w0 + w1) / vector) as u32,
        t as u32,
        h as u32,
        SharedSuffixLayoutLaunch::new(
            (sk[0] / vector) as u32,
            (sk[1] / vector) as u32,
            (sk[2] / vector) as u32,
            (ss[0] / vector) as u32,
            (ss[2] / vector) as u32,
            (w0 / vector) as u32,
        ),
        dtype.into(),
    );
    keys
}

/// The gradients of [`shared_suffix`] from `dkeys` `[b, H, t, w₀ + w₁]`: `dk_nope`
/// `[b, H, t, w₀]` laid out as `[b, t, H, w₀]` (see [`split_heads_layout`]) and `dshared`
/// `[b, 1, t, w₁]` (contiguous), the sum over heads taken in f32 and rounded once.
pub(super) fn shared_suffix_backward(
    dkeys: Primitive,
    w0: usize,
    dtype: DType,
) -> (Primitive, Primitive) {
    let dkeys = contiguous_gradient(dkeys, dtype);
    let [b, h, t, w] = dkeys.meta.shape().dims::<4>();
    let w1 = w - w0;
    // `dkeys` is contiguous: the vector need only divide both widths.
    let vector = narrowed(vector_size(&[&dkeys]), |v| {
        w0.is_multiple_of(v) && w1.is_multiple_of(v)
    });
    let dk_nope = empty_like(&dkeys, Shape::new([b, t, h, w0]), dtype);
    let dshared = empty_like(&dkeys, Shape::new([b, 1, t, w1]), dtype);
    let nope_vectors = b * t * h * w0 / vector;
    let vectors = nope_vectors + b * t * w1 / vector;
    let (count, dim) = elementwise(vectors);
    shared_suffix_backward_kernel::launch::<CudaRuntime>(
        &dkeys.client,
        count,
        dim,
        vector,
        dkeys.clone().into_tensor_arg(),
        dk_nope.clone().into_tensor_arg(),
        dshared.clone().into_tensor_arg(),
        nope_vectors as u32,
        vectors as u32,
        (w0 / vector) as u32,
        (w1 / vector) as u32,
        t as u32,
        h as u32,
        SharedSuffixSizesLaunch::new(
            h as u32,
            t as u32,
            (w / vector) as u32,
            (w0 / vector) as u32,
        ),
        dtype.into(),
    );
    (Inner::float_swap_dims(dk_nope, 1, 2), dshared)
}

/// Tensors per launch of [`sum_of_squares`] at most (the kernel's branches over them are
/// unrolled).
const SQUARE_GROUP: usize = 16;
/// Planes of one tensor in the first pass of [`sum_of_squares`] at most ([`ROWS_PER_CUBE`] per
/// cube).
const SQUARE_PLANES: usize = 16384;
/// Elements per lane in the first pass of [`sum_of_squares`] below [`SQUARE_PLANES`]: each
/// lane's loads are a chain of dependent additions, so few per lane keep it bandwidth-bound
/// (64 per lane, 768 planes for a `[768, 2048]` gradient, took 26 µs on the H200; see
/// docs/performance.md).
const SQUARE_LOADS_PER_LANE: usize = 8;

/// Whether [`sum_of_squares`] takes `xs`: at least one tensor, each addressable with u32
/// indices and laid out as warps (its passes reduce over planes), all on one device in one
/// dtype (one launch reads several), and the partials' offsets within u32.
pub(super) fn sum_of_squares_supported(xs: &[Primitive]) -> bool {
    let Some(first) = xs.first() else {
        return false;
    };
    let one = |x: &Primitive| {
        let len = x.meta.num_elements();
        float_dtype(x.dtype)
            && len > 0
            && len <= u32::MAX as usize
            && plane_is_warp(x)
            && x.device == first.device
            && x.dtype == first.dtype
    };
    xs.len() <= u32::MAX as usize / SQUARE_PLANES && xs.iter().all(one)
}

/// Cubes of [`sum_of_squares`]'s first pass over `len` elements.
fn square_cubes(len: usize) -> usize {
    len.div_ceil(LANES as usize * SQUARE_LOADS_PER_LANE)
        .clamp(1, SQUARE_PLANES)
        .div_ceil(ROWS_PER_CUBE as usize)
}

/// `Σ_t Σ_i x_{t,i}²` in f32 of contiguous tensors `xs` (at least one, each accepted by
/// [`sum_of_squares_supported`], all on one device), `[1]`: per group of up to
/// [`SQUARE_GROUP`] tensors one launch, each tensor given up to [`SQUARE_PLANES`] planes whose
/// cubes write a partial each into one shared buffer, then one cube adding all the partials —
/// `⌈|xs|/16⌉ + 1` launches for a model's gradient norm. The order of every addition is fixed:
/// deterministic.
pub(super) fn sum_of_squares(xs: &[Primitive]) -> Primitive {
    let cubes: Vec<usize> = xs
        .iter()
        .map(|x| square_cubes(x.meta.num_elements()))
        .collect();
    let partials: usize = cubes.iter().sum();
    let first = &xs[0];
    let partial = empty_like(first, Shape::new([partials]), DType::F32);
    let mut offset = 0;
    for (group, group_cubes) in xs.chunks(SQUARE_GROUP).zip(cubes.chunks(SQUARE_GROUP)) {
        let mut tensors = SequenceArg::new();
        let mut starts = SequenceArg::new();
        let mut start = 0u32;
        starts.push(start);
        for (x, &c) in group.iter().zip(group_cubes) {
            tensors.push(x.clone().into_tensor_arg());
            start += c as u32;
            starts.push(start);
        }
        sum_of_squares_kernel::launch::<CudaRuntime>(
            &first.client,
            CubeCount::Static(start, 1, 1),
            CubeDim::new_2d(LANES, ROWS_PER_CUBE),
            tensors,
            starts,
            partial.clone().into_tensor_arg(),
            offset as u32,
            first.dtype.into(),
        );
        offset += start as usize;
    }
    scaled_total(partial, 1.0)
}

/// The gradient of an embedding lookup: `dW[t, :] = Σ_{i: t_i = t} dy[i, :]` for `weights`
/// `[vocab, w]`, `dy` `[b, s, w]` and `tokens` `[b, s]`, accumulated in f32 (atomics: the order
/// of the additions, and so the last bits, may vary between runs) and rounded once to
/// `dy`'s dtype. Replaces burn's default (`float_select_add` into zeros: one kernel of
/// 6.5 ms on `[16384, 768]` into `[32000, 768]`). Falls back to it for what it does not take.
pub(crate) fn embedding_backward(
    weights: Primitive,
    dy: Primitive,
    tokens: Primitive,
) -> Primitive {
    use burn_backend::ops::ModuleOps;
    let [vocab, width] = weights.meta.shape().dims::<2>();
    let rows = tokens.meta.num_elements();
    let takes = supported(&dy, rows, width)
        && dy.meta.num_elements() == rows * width
        && index_dtype(tokens.dtype)
        && vocab
            .checked_mul(width)
            .is_some_and(|n| n <= u32::MAX as usize);
    if !takes {
        return <Inner as ModuleOps<Inner>>::embedding_backward(weights, dy, tokens);
    }
    let dtype = dy.dtype;
    let dy = into_contiguous(dy);
    let tokens = into_contiguous(tokens);
    let acc = Inner::float_zeros(
        Shape::new([vocab, width]),
        &weights.device,
        DType::F32.into(),
    );
    let (count, dim) = geometry(rows);
    embedding_backward_kernel::launch::<CudaRuntime>(
        &dy.client,
        count,
        dim,
        dy.clone().into_tensor_arg(),
        tokens.clone().into_tensor_arg(),
        acc.clone().into_tensor_arg(),
        rows as u32,
        width as u32,
        vocab as u32,
        [dtype.into(), tokens.dtype.into()],
    );
    Inner::float_cast(acc, dtype.into())
}

/// Whether the AdamW kernel takes these flat tensors: one float dtype and one length, within
/// u32 indexing.
pub(super) fn adamw_supported(
    param: &Primitive,
    grad: &Primitive,
    moments: Option<(&Primitive, &Primitive)>,
) -> bool {
    let len = param.meta.num_elements();
    let same = |t: &Primitive| t.dtype == param.dtype && t.meta.num_elements() == len;
    float_dtype(param.dtype)
        && len > 0
        && len <= u32::MAX as usize
        && same(grad)
        && moments.is_none_or(|(m, v)| same(m) && same(v))
}

/// AdamW's scalars as the kernel reads them, computed as burn's `AdamW` computes them (f32
/// bias corrections, the decay factor in f64).
pub(super) struct AdamWScalars {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub lr: f64,
    pub weight_decay: f32,
    /// The step count after this update (1 for the first).
    pub time: usize,
}

/// One fused AdamW update of flat `param`, `grad` and (after the first step) the moments:
/// `(param, moment_1, moment_2)`, new contiguous tensors in the parameter's dtype.
pub(super) fn adamw(
    param: Primitive,
    grad: Primitive,
    moments: Option<(Primitive, Primitive)>,
    s: &AdamWScalars,
) -> (Primitive, Primitive, Primitive) {
    let len = param.meta.num_elements();
    let time = s.time.min(i32::MAX as usize) as i32;
    let (param, grad) = (into_contiguous(param), into_contiguous(grad));
    let first = moments.is_none();
    let (m, v) = match moments {
        Some((m, v)) => (into_contiguous(m), into_contiguous(v)),
        // Not read on the first step: any tensor of the right type binds the slots.
        None => (grad.clone(), grad.clone()),
    };
    let shape = param.meta.shape().clone();
    let outs = [0; 3].map(|_| empty_like(&param, shape.clone(), param.dtype));
    let vector = vector_size(&[&param, &grad, &m, &v]);
    let (count, dim) = elementwise(len / vector);
    let dtype = param.dtype;
    adamw_kernel::launch::<CudaRuntime>(
        &param.client,
        count,
        dim,
        vector,
        param.clone().into_tensor_arg(),
        grad.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        outs[0].clone().into_tensor_arg(),
        outs[1].clone().into_tensor_arg(),
        outs[2].clone().into_tensor_arg(),
        (len / vector) as u32,
        s.beta_1,
        s.beta_2,
        (1.0 - s.lr * s.weight_decay as f64) as f32,
        s.lr as f32,
        1.0 / (1.0 - s.beta_1.powi(time)),
        1.0 / (1.0 - s.beta_2.powi(time)),
        s.epsilon,
        first,
        dtype.into(),
    );
    let [p, m, v] = outs;
    (p, m, v)
}
