//! The fused kernels of [`super::fused`] and their launchers on burn-cuda's tensors.

use super::backend::Inner;
use burn_backend::ops::FloatTensorOps;
use burn_backend::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
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
/// of bf16 when `N = 8`; `width` is a multiple of `N`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_forward_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gain: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<F, N>>,
    rstd: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row >= rows {
        terminate!();
    }
    let vectors = width as usize / N::value();
    let base = row as usize * vectors;
    let lane = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let mut squares = Vector::<f32, N>::new(f32::new(0.0));
    let mut j = lane;
    while j < vectors {
        let v = Vector::<f32, N>::cast_from(x[base + j]);
        squares += v * v;
        j += step;
    }
    let total = plane_sum(lane_sum::<N>(squares));
    let r = f32::new(1.0) / (total / f32::cast_from(width) + eps).sqrt();
    let rv = Vector::<f32, N>::new(r);
    let mut k = lane;
    while k < vectors {
        y[base + k] = Vector::<F, N>::cast_from(
            Vector::<f32, N>::cast_from(x[base + k]) * rv * Vector::<f32, N>::cast_from(gain[k]),
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
/// [`column_sums`]. Deterministic: fixed groups per plane, fixed order.
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
                r = rstd[row as usize];
                let mut dot = Vector::<f32, N>::new(f32::new(0.0));
                let mut j = lane;
                while j < vectors {
                    dot += Vector::<f32, N>::cast_from(x[base + j])
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
                    let xv = Vector::<f32, N>::cast_from(x[e]);
                    let d = Vector::<f32, N>::cast_from(dy[e]);
                    let r = Vector::<f32, N>::new(scale[i]);
                    dx[e] = Vector::<F, N>::cast_from(
                        r * (g * d) - xv * Vector::<f32, N>::new(coef[i]),
                    );
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
        #[unroll]
        for e in 0..N::value() {
            if e < count && v[e] > top {
                top = v[e];
            }
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
/// it in registers for both steps.
#[cube(launch)]
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
    let mut lse = RunningLse::new();
    if resident {
        let first = lane * N::value();
        let seen = lane < vectors && first < visible;
        let mut v = Vector::<f32, N>::new(f32::new(0.0));
        if seen {
            v = c * Vector::<f32, N>::cast_from(scores[base + lane]);
            lse.add(v, visible - first);
        }
        let total = lse.plane_total();
        if lane < vectors {
            let mut p = Vector::<f32, N>::new(f32::new(0.0));
            if seen {
                p = visible_exp(v, total, first, visible);
            }
            probs[base + lane] = Vector::<F, N>::cast_from(p);
        }
    } else {
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
/// training stops on a non-finite loss).
#[cube(launch)]
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
/// vectors of `N` logits, rows `pitch` (input) and `out_pitch` (output) vectors apart.
#[cube(launch)]
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
    let end = end as usize;
    let mut acc0 = f32::new(0.0);
    let mut acc1 = f32::new(0.0);
    let mut acc2 = f32::new(0.0);
    let mut acc3 = f32::new(0.0);
    let mut i = start as usize;
    while i + 4 <= end {
        let a0 = terms[i * w + j];
        let a1 = terms[(i + 1) * w + j];
        let a2 = terms[(i + 2) * w + j];
        let a3 = terms[(i + 3) * w + j];
        acc0 += a0;
        acc1 += a1;
        acc2 += a2;
        acc3 += a3;
        i += 4;
    }
    while i < end {
        acc0 += terms[i * w + j];
        i += 1;
    }
    partial[chunk as usize * w + j] = (acc0 + acc1) + (acc2 + acc3);
}

/// Where thread `e` of a rotary kernel works, for rows of `per_row` threads over `x`
/// `[b, h, s, ·]` with strides `sx0, sx1, sx2` (in whatever unit `x` is indexed by).
#[derive(CubeType)]
struct RotaryIndex {
    /// The row `(batch·h + head)·s + position`, which is also the contiguous output's row.
    row: u32,
    /// The position along `s` (the tables' row is `start + position`).
    position: u32,
    /// The thread's index within its row.
    column: u32,
    /// Offset of the row's first entry in `x`.
    source: usize,
}

#[cube]
fn rotary_index(
    e: u32,
    per_row: u32,
    seq: u32,
    heads: u32,
    sx0: usize,
    sx1: usize,
    sx2: usize,
) -> RotaryIndex {
    let row = e / per_row;
    let position = row % seq;
    let head = (row / seq) % heads;
    let batch = row / (seq * heads);
    RotaryIndex {
        row,
        position,
        column: e % per_row,
        source: batch as usize * sx0 + head as usize * sx1 + position as usize * sx2,
    }
}

/// Rotary embedding of `x` `[b, h, s, w]` (any strides) at positions `start..start + s` into
/// the contiguous `out`, one thread per pair: `(x_a, x_b)` becomes
/// `(x_a cos θ − sign·x_b sin θ, x_b cos θ + sign·x_a sin θ)`, the pairs being `(k, k + w/2)`
/// (`interleaved` false, HF LLaMA) or `(2k, 2k + 1)` (true, DeepSeek); `sign = −1` rotates
/// back, which is the gradient (the rotation is orthogonal). Index arithmetic in u32 (the
/// launcher checks the sizes fit).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    pairs: u32,
    start: u32,
    sign: f32,
    #[comptime] interleaved: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= pairs {
        terminate!();
    }
    let w = x.shape(3) as u32;
    let half = w / 2;
    let at = rotary_index(
        e,
        half,
        x.shape(2) as u32,
        x.shape(1) as u32,
        x.stride(0),
        x.stride(1),
        x.stride(2),
    );
    let k = at.column;
    let mut a = k;
    let mut b = k + half;
    if interleaved {
        a = 2 * k;
        b = 2 * k + 1;
    }
    let base = at.source;
    let step = x.stride(3);
    let table = (start + at.position) as usize * cos.stride(0) + k as usize;
    let c = f32::cast_from(cos[table]);
    let sn = sign * f32::cast_from(sin[table]);
    let xa = f32::cast_from(x[base + a as usize * step]);
    let xb = f32::cast_from(x[base + b as usize * step]);
    let o = at.row as usize * w as usize;
    out[o + a as usize] = F::cast_from(xa * c - xb * sn);
    out[o + b as usize] = F::cast_from(xb * c + xa * sn);
}

/// [`rotary_kernel`] for the half pairing `(k, k + w/2)`, one thread per `N` consecutive
/// pairs, 16-byte loads of bf16 when `N = 8`. Strides (`sx*` of `x`, `table_pitch` of `cos`
/// and `sin`) and `half` are in vectors; `x`'s last axis has unit stride.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_half_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    cos: &Tensor<Vector<F, N>>,
    sin: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    heads: u32,
    seq: u32,
    half: u32,
    sx0: u32,
    sx1: u32,
    sx2: u32,
    table_pitch: u32,
    start: u32,
    sign: f32,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let at = rotary_index(
        e,
        half,
        seq,
        heads,
        sx0 as usize,
        sx1 as usize,
        sx2 as usize,
    );
    let k = at.column as usize;
    let base = at.source + k;
    let table = (start + at.position) as usize * table_pitch as usize + k;
    let c = Vector::<f32, N>::cast_from(cos[table]);
    let sn = Vector::<f32, N>::new(sign) * Vector::<f32, N>::cast_from(sin[table]);
    let xa = Vector::<f32, N>::cast_from(x[base]);
    let xb = Vector::<f32, N>::cast_from(x[base + half as usize]);
    let o = at.row as usize * 2 * half as usize + k;
    out[o] = Vector::<F, N>::cast_from(xa * c - xb * sn);
    out[o + half as usize] = Vector::<F, N>::cast_from(xb * c + xa * sn);
}

/// [`rotary_kernel`] for the interleaved pairing `(2k, 2k + 1)`, one thread per vector of
/// `N` consecutive entries (`N/2` whole pairs, `N` even), 16-byte loads of bf16 when `N = 8`;
/// the tables are read as scalars (`N/2` entries per vector, from cache). Strides (`sx*` of
/// `x`) and `width` are in vectors, `table_pitch` in entries; `x`'s last axis has unit stride.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_interleaved_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    heads: u32,
    seq: u32,
    width: u32,
    sx0: u32,
    sx1: u32,
    sx2: u32,
    table_pitch: u32,
    start: u32,
    sign: f32,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS as u32;
    if e >= vectors {
        terminate!();
    }
    let at = rotary_index(
        e,
        width,
        seq,
        heads,
        sx0 as usize,
        sx1 as usize,
        sx2 as usize,
    );
    let j = at.column as usize;
    let v = Vector::<f32, N>::cast_from(x[at.source + j]);
    let pairs = comptime!(N::value() / 2);
    let table = (start + at.position) as usize * table_pitch as usize + j * pairs;
    let mut o = Vector::<F, N>::empty();
    #[unroll]
    for k in 0..pairs {
        let c = f32::cast_from(cos[table + k]);
        let sn = sign * f32::cast_from(sin[table + k]);
        let xa = v[2 * k];
        let xb = v[2 * k + 1];
        o[2 * k] = F::cast_from(xa * c - xb * sn);
        o[2 * k + 1] = F::cast_from(xb * c + xa * sn);
    }
    out[e as usize] = o;
}

/// `Σ value` over the cube's planes (`CUBE_DIM_Y` ≤ [`ROWS_PER_CUBE`] of them, 32 lanes each),
/// in a fixed order; the result is valid in unit 0 of the cube.
#[cube]
fn cube_sum(value: f32) -> f32 {
    let mut per_plane = SharedMemory::<f32>::new(ROWS_PER_CUBE as usize);
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

/// Per cube: `partial[offset + cube] = Σ x_i²` over a grid-stride share of `x` (f32
/// arithmetic).
#[cube(launch)]
fn sum_of_squares_kernel<F: Float>(
    x: &Tensor<F>,
    partial: &mut Tensor<f32>,
    offset: u32,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let threads = (CUBE_COUNT_X * CUBE_DIM_X * CUBE_DIM_Y) as usize;
    let mut i = ((CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) * CUBE_DIM_X + UNIT_POS_X) as usize;
    let mut acc = f32::new(0.0);
    while i < len as usize {
        let v = f32::cast_from(x[i]);
        acc += v * v;
        i += threads;
    }
    let total = cube_sum(acc);
    if UNIT_POS == 0 {
        partial[(offset + CUBE_POS_X) as usize] = total;
    }
}

/// `total[0] = Σ x_i` of an f32 `x`, by one cube.
#[cube(launch)]
fn cube_total_kernel(x: &Tensor<f32>, total: &mut Tensor<f32>, len: u32) {
    let mut i = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    let mut acc = f32::new(0.0);
    while i < len as usize {
        acc += x[i];
        i += (CUBE_DIM_X * CUBE_DIM_Y) as usize;
    }
    let sum = cube_sum(acc);
    if UNIT_POS == 0 {
        total[0] = sum;
    }
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
        && rows.div_ceil(ROWS_PER_CHUNK) <= u16::MAX as usize
        && plane_is_warp(t)
}

/// Whether the RMSNorm kernels take `x` `[n, w]` and `gain` `[w]` (of `x`'s dtype).
pub(super) fn rms_norm_supported(x: &Primitive, gain: &Primitive) -> bool {
    let [rows, width] = x.meta.shape().dims::<2>();
    supported(x, rows, width) && gain.dtype == x.dtype
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

/// `dy` in `like`'s dtype and contiguous (gradients may arrive broadcast or in f32).
fn gradient_like(dy: Primitive, like: &Primitive) -> Primitive {
    into_contiguous(in_dtype(dy, like.dtype))
}

/// Rows per chunk of [`column_sums`]' passes.
const ROWS_PER_CHUNK: usize = 64;
/// Threads per cube of the column sums and the element-wise kernels.
const THREADS: u32 = 256;

/// Column sums of an f32 `[n, w]` tensor, `[1, w]`, in passes of [`column_sum_kernel`] that
/// each cut the rows by [`ROWS_PER_CHUNK`]. (burn's `sum_dim(0)` launched two cubes for
/// `[16384, 768]` and took 1.9 ms.) Deterministic: a fixed order of additions.
fn column_sums(terms: Primitive) -> Primitive {
    let [mut rows, width] = terms.meta.shape().dims::<2>();
    let mut current = terms;
    loop {
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
        if rows == 1 {
            return current;
        }
    }
}

/// RMSNorm forward on `x` `[n, w]` (contiguous) and `gain` `[w]`: `(y, r)`, `r` f32 `[n]`.
pub(super) fn rms_norm_forward(x: Primitive, gain: Primitive, eps: f64) -> (Primitive, Primitive) {
    let [rows, width] = x.meta.shape().dims::<2>();
    let y = empty_like(&x, x.meta.shape().clone(), x.dtype);
    let rstd = empty_like(&x, Shape::new([rows]), DType::F32);
    let (count, dim) = geometry(rows);
    let dtype = x.dtype;
    let vector = vector_size(&[&x, &gain]);
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
        eps as f32,
        dtype.into(),
    );
    (y, rstd)
}

/// Planes of the RMSNorm backward at most: each sums the gain's gradient over its groups of
/// [`NORM_GROUP_ROWS`] rows (one group for `n = 16 384`) into a partial row, `[P, w]` f32 in
/// all (12.6 MB for `w = 768`, which stays in L2), where one `[n, w]` f32 row of terms per
/// input row (50 MB written and read again, ≈ 100 µs with its column sums) was the first
/// version.
const NORM_BACKWARD_PLANES: usize = 4096;

/// RMSNorm backward: `(dx [n, w], dγ [w])` in the dtypes of `x` and `gain`.
pub(super) fn rms_norm_backward(
    x: Primitive,
    gain: Primitive,
    rstd: Primitive,
    dy: Primitive,
) -> (Primitive, Primitive) {
    let [rows, width] = x.meta.shape().dims::<2>();
    let dy = gradient_like(dy, &x);
    let dx = empty_like(&x, x.meta.shape().clone(), x.dtype);
    // One partial row of the gain's gradient per plane that has a group of rows to do.
    let groups = rows.div_ceil(NORM_GROUP_ROWS);
    let planes = groups.min(NORM_BACKWARD_PLANES);
    let partial = empty_like(&x, Shape::new([planes, width]), DType::F32);
    let (count, dim) = geometry(planes);
    let (dtype, gain_dtype) = (x.dtype, gain.dtype);
    let vector = vector_size(&[&x, &gain, &dy]);
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
        dtype.into(),
    );
    let dgain = Inner::float_reshape(column_sums(partial), Shape::new([width]));
    (dx, in_dtype(dgain, gain_dtype))
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
    let dprobs = gradient_like(dprobs, &probs);
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
    let dy = gradient_like(dy, &gate);
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
    let [rows, vocab] = logits.meta.shape().dims::<2>();
    // A pitched input is read in place: its last row ends `rows · pitch` elements in.
    let pitch = logits.meta.strides()[0].max(vocab);
    supported(logits, rows, pitch)
        && index_dtype(targets.dtype)
        && targets.meta.shape().dims::<1>() == [rows]
}

/// `t` `[n, w]` as the row kernels read it: unchanged when its rows are unit-stride and do
/// not overlap (contiguous or pitched), else a contiguous copy.
pub(super) fn with_unit_rows(t: Primitive) -> Primitive {
    let [rows, width] = t.meta.shape().dims::<2>();
    let strides = t.meta.strides();
    if (strides[1] == 1 || width == 1) && (strides[0] >= width || rows == 1) {
        t
    } else {
        into_contiguous(t)
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
    (Inner::float_mean(nll), lse)
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
    let grad = into_contiguous(in_dtype(grad, DType::F32));
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

/// The rotary embedding (`sign = 1`) or its gradient (`sign = −1`) of `x` (any strides),
/// contiguous; `cos`, `sin` contiguous.
pub(super) fn rotary(
    x: Primitive,
    cos: Primitive,
    sin: Primitive,
    start: usize,
    interleaved: bool,
    sign: f32,
) -> Primitive {
    let pairs = x.meta.num_elements() / 2;
    let out = empty_like(&x, x.meta.shape().clone(), x.dtype);
    let dtype = x.dtype;
    let [_, heads, seq, w] = x.meta.shape().dims::<4>();
    let half = w / 2;
    // Vectors along the last axis: they must divide the pairs' span (`w/2` for the half
    // pairing, `w` for the interleaved one, whose vectors hold whole pairs) and every stride
    // of `x` (the half pairing's tables too, which it reads as vectors), in vectors within u32.
    let strides = x.meta.strides();
    let table_pitch = cos.meta.strides()[0];
    let fits = |v: usize| {
        let span = if interleaved { w } else { half };
        let table = if interleaved { 1 } else { table_pitch };
        span % v == 0
            && strides[..3]
                .iter()
                .chain([&table])
                .all(|&st| st % v == 0 && st / v <= u32::MAX as usize)
    };
    let mut vector = if interleaved {
        vector_size(&[&x])
    } else {
        vector_size(&[&x, &cos, &sin])
    };
    while vector > 1 && !fits(vector) {
        vector /= 2;
    }
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
            heads as u32,
            seq as u32,
            (w / vector) as u32,
            (strides[0] / vector) as u32,
            (strides[1] / vector) as u32,
            (strides[2] / vector) as u32,
            table_pitch as u32,
            start as u32,
            sign,
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
            heads as u32,
            seq as u32,
            (half / vector) as u32,
            (strides[0] / vector) as u32,
            (strides[1] / vector) as u32,
            (strides[2] / vector) as u32,
            (table_pitch / vector) as u32,
            start as u32,
            sign,
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
        start as u32,
        sign,
        interleaved,
        dtype.into(),
    );
    out
}

/// Planes in the first pass of [`sum_of_squares`] at most ([`ROWS_PER_CUBE`] per cube).
const SQUARE_PLANES: usize = 16384;
/// Elements per lane in the first pass of [`sum_of_squares`] below [`SQUARE_PLANES`]: each
/// lane's loads are a chain of dependent additions, so few per lane keep it bandwidth-bound
/// (64 per lane, 768 planes for a `[768, 2048]` gradient, took 26 µs on the H200; see
/// docs/performance.md).
const SQUARE_LOADS_PER_LANE: usize = 8;

/// Whether [`sum_of_squares`] takes `xs`: at least one tensor, each addressable with u32
/// indices and laid out as warps (its passes reduce over planes), all on one device, and the
/// partials' offsets within u32.
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
/// [`sum_of_squares_supported`], all on one device), `[1]`: per tensor one pass of up to
/// [`SQUARE_PLANES`] planes whose cubes write a partial each into one shared buffer, then one
/// cube adding all the partials — `|xs| + 1` launches for a model's gradient norm. The order of
/// every addition is fixed: deterministic.
pub(super) fn sum_of_squares(xs: &[Primitive]) -> Primitive {
    let cubes: Vec<usize> = xs
        .iter()
        .map(|x| square_cubes(x.meta.num_elements()))
        .collect();
    let partials: usize = cubes.iter().sum();
    let first = &xs[0];
    let partial = empty_like(first, Shape::new([partials]), DType::F32);
    let mut offset = 0;
    for (x, &c) in xs.iter().zip(&cubes) {
        sum_of_squares_kernel::launch::<CudaRuntime>(
            &x.client,
            CubeCount::Static(c as u32, 1, 1),
            CubeDim::new_2d(LANES, ROWS_PER_CUBE),
            x.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            offset as u32,
            x.meta.num_elements() as u32,
            x.dtype.into(),
        );
        offset += c;
    }
    let total = empty_like(first, Shape::new([1]), DType::F32);
    cube_total_kernel::launch::<CudaRuntime>(
        &first.client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_2d(LANES, ROWS_PER_CUBE),
        partial.into_tensor_arg(),
        total.clone().into_tensor_arg(),
        partials as u32,
    );
    total
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
