//! Fused RMSNorm, causal-softmax, SwiGLU and cross-entropy kernels (forward and backward) for
//! [`CublasCuda`], and their registration with `attn_models::fused` for `CublasCuda` and
//! `Autodiff<CublasCuda>`. The kernels themselves are in `kernels.rs`.
//!
//! Each kernel gives one row to one plane (warp) of 32 lanes; lane `l` handles the row's
//! entries `l, l + 32, …`, so loads are coalesced, and the row reductions are `plane_sum` /
//! `plane_max`. Arithmetic is f32 whatever the storage dtype; each output is rounded once.
//! burn's compositions round intermediate results to the model dtype (RMSNorm's `rms`, the
//! softmax's shifted scores), so the fused results are as accurate or more.
//!
//! * RMSNorm, forward: `r_i = (mean_j x_ij² + ε)^{-1/2}` (kept, f32), `y_ij = γ_j x_ij r_i`;
//!   rows of `x` may be pitched (a column slice of wider rows is read in place).
//! * RMSNorm, backward: with `u_ij = γ_j dy_ij`,
//!   `dx_ij = r_i u_ij − x_ij r_i³ · (1/w) Σ_k x_ik u_ik` and `dγ_j = Σ_i dy_ij x_ij r_i`
//!   (the kernel sums `dγ`'s terms over a cube's 8 rows in shared memory, or, for rows of
//!   more than 4 vectors a lane (1 024 bf16 in vectors of 8), over a plane's groups of 4
//!   rows, into f32 partial rows that `column_sums` adds in a fixed order).
//! * Causal softmax, forward: row `i` of query position `p = offset + (i mod s)` sees keys
//!   `0..=p`; one pass keeps each lane's running maximum and rescaled sum (the online
//!   softmax), the plane combines them, a second pass writes `exp(x − m)/Σ` and zeros. A row
//!   of at most 32 vectors (the training shape) stays in registers instead: its maximum, then
//!   one exponential per entry. Exponentials here and in the cross-entropy are CUDA's `__expf`.
//! * Causal softmax, backward: `dx_j = y_j (dy_j − Σ_k y_k dy_k)`, zero where masked
//!   (`y_j = 0` there).
//! * SwiGLU (element-wise), with `σ = sigmoid(g)`: `y = g·σ·u`;
//!   `dg = dy·u·σ·(1 + g(1 − σ))`, `du = dy·g·σ`.
//! * Cross-entropy, forward: per row the online log-sum-exp `lse_i` (kept, f32) and
//!   `nll_i = lse_i − x_{i,t_i}`, then burn's mean; backward:
//!   `dx_ij = (g/n)·(exp(x_ij − lse_i) − [j = t_i])`, written once in the logits' dtype
//!   (burn's composition makes two f32 copies of the `[n, v]` logits and several passes).
//! * Rotary embedding (element-wise, reading `x` through its strides, so the heads' transposed
//!   view needs no copy): each pair `(a, b)` → `(a cos θ − b sin θ, b cos θ + a sin θ)`; the
//!   gradient is the rotation by `−θ`, the same kernel with the sign of `sin` flipped, written
//!   in the memory order of the heads' split (`[b, s, H, w]`) when `x` was split from
//!   `[b, s, H·w]`, so that merging them back in the backward is a view.
//! * Heads with a shared suffix (MLA-Decoupled's keys `[k_nope | k_pe]`): a copy in vectors;
//!   the gradient copies `dk_nope` into the split heads' memory order and adds `dk_pe` over
//!   the heads in f32 (burn's `cat` and `expand`: a slice copied for `dk_nope`, a strided
//!   sum for `dk_pe`).
//! * Linear maps `y = x·W` (training only): the products are cuBLAS's; the backward
//!   accumulates `dx = dy·Wᵀ` into the gradient `x` already has from its other consumers
//!   (`β = 1`), where autodiff would add the two in a pass of its own.
//! * Attention scores `S = q·kᵀ` (training only): the product itself is cuBLAS's; the
//!   backward takes `dk = dSᵀ·q` instead of autodiff's `(qᵀ·dS)ᵀ`, so the keys' gradient
//!   comes out in `q`'s memory order rather than transposed (a copy a layer saved).
//! * Sum of squares (gradient norms): per plane a grid-stride share in f32, then one plane
//!   adds the partials (burn's full `sum` of an f32 tensor launched too few cubes: 51 µs for
//!   a `[768, 768]` gradient).
//!
//! Beside these, `kernels::embedding_backward` replaces burn's default embedding gradient in
//! the backend itself (`forward.rs`): f32 atomics into a zeroed `[vocab, w]` table, rounded
//! once.

use super::backend::{CublasCuda, Inner, matmul, matmul_accumulate, reshape, slice};
use super::kernels::{
    AdamWScalars, Primitive, adamw, adamw_supported, causal_softmax_backward,
    causal_softmax_forward, cross_entropy_backward, cross_entropy_forward, cross_entropy_supported,
    in_dtype, place_columns, place_columns_supported, rms_norm_backward, rms_norm_forward,
    rms_norm_supported, rotary, rotary_supported, shared_suffix, shared_suffix_backward,
    shared_suffix_supported, softmax_supported, split_heads_layout, sum_of_squares,
    sum_of_squares_supported, swiglu_backward, swiglu_forward, swiglu_supported, with_unit_rows,
};
use attn_models::fused::{self, AdamWStep, AdamWUpdate, FusedKernels, Outcome};
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Shape, Slice, TensorPrimitive};
use burn_backend::ops::FloatTensorOps;
use burn_cubecl::kernel::into_contiguous;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

static LINEARS: AtomicU64 = AtomicU64::new(0);
static ACCUMULATED: AtomicU64 = AtomicU64::new(0);
static RMS_NORMS: AtomicU64 = AtomicU64::new(0);
static SOFTMAXES: AtomicU64 = AtomicU64::new(0);
static SWIGLUS: AtomicU64 = AtomicU64::new(0);
static CROSS_ENTROPIES: AtomicU64 = AtomicU64::new(0);
static ROTARIES: AtomicU64 = AtomicU64::new(0);
static SHARED_SUFFIXES: AtomicU64 = AtomicU64::new(0);
static ATTENTION_SCORES: AtomicU64 = AtomicU64::new(0);
static COLUMNS: AtomicU64 = AtomicU64::new(0);
static SQUARE_SUMS: AtomicU64 = AtomicU64::new(0);
static ADAMW_STEPS: AtomicU64 = AtomicU64::new(0);
static DECLINED: AtomicU64 = AtomicU64::new(0);

/// How many forward calls the fused kernels took, and declined, since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedCounts {
    /// Linear maps `x·W` whose gradients the fused backward takes (training only).
    pub linear: u64,
    /// Input gradients accumulated into the gradient the input already had from its other
    /// consumers, in the pass that computes them (no addition pass): linear maps' `dy·Wᵀ`
    /// (in the product) and RMSNorms' `dx` (the residual stream's, in the kernel).
    pub accumulated: u64,
    /// RMSNorms computed by the fused kernel.
    pub rms_norm: u64,
    /// Causal softmaxes computed by the fused kernel.
    pub causal_softmax: u64,
    /// SwiGLU gates computed by the fused kernel.
    pub swiglu: u64,
    /// Cross-entropy losses computed by the fused kernel.
    pub cross_entropy: u64,
    /// Rotary embeddings computed by the fused kernel.
    pub rotary: u64,
    /// Heads with a shared suffix (MLA-Decoupled's keys) built by the fused kernel.
    pub shared_suffix: u64,
    /// Attention scores `q·kᵀ` whose gradients the fused backward takes (`dk = dSᵀ·q`).
    pub attention_scores: u64,
    /// Blocks of columns whose gradients the fused backward writes into their parent's
    /// (MLA's latent and MLA-Decoupled's rotary key; training only).
    pub columns: u64,
    /// Sums of squares (gradient norms) computed by the fused kernel.
    pub sum_of_squares: u64,
    /// Parameters updated by the fused AdamW kernel.
    pub adamw: u64,
    /// Inputs handed back to burn's composition.
    pub declined: u64,
}

/// The counts so far (all threads).
pub fn fused_counts() -> FusedCounts {
    FusedCounts {
        linear: LINEARS.load(Ordering::Relaxed),
        accumulated: ACCUMULATED.load(Ordering::Relaxed),
        rms_norm: RMS_NORMS.load(Ordering::Relaxed),
        causal_softmax: SOFTMAXES.load(Ordering::Relaxed),
        swiglu: SWIGLUS.load(Ordering::Relaxed),
        cross_entropy: CROSS_ENTROPIES.load(Ordering::Relaxed),
        rotary: ROTARIES.load(Ordering::Relaxed),
        shared_suffix: SHARED_SUFFIXES.load(Ordering::Relaxed),
        attention_scores: ATTENTION_SCORES.load(Ordering::Relaxed),
        columns: COLUMNS.load(Ordering::Relaxed),
        sum_of_squares: SQUARE_SUMS.load(Ordering::Relaxed),
        adamw: ADAMW_STEPS.load(Ordering::Relaxed),
        declined: DECLINED.load(Ordering::Relaxed),
    }
}

fn computed<T, I>(counter: &AtomicU64, t: T) -> Outcome<T, I> {
    counter.fetch_add(1, Ordering::Relaxed);
    Outcome::Computed(t)
}

fn declined<T, I>(t: I) -> Outcome<T, I> {
    DECLINED.fetch_add(1, Ordering::Relaxed);
    Outcome::Declined(t)
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(t: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

// ---- Inference backend (`CublasCuda`): forward kernels only. -------------------------------

/// `x` `[b, s, w]` as its rows `[b·s, w]` (a view wherever the strides allow one).
fn as_rows(x: Primitive) -> Primitive {
    let [b, s, w] = x.meta.shape().dims::<3>();
    reshape(x, Shape::new([b * s, w]))
}

fn rms_norm_plain(
    x: Tensor<CublasCuda, 3>,
    gain: Tensor<CublasCuda, 1>,
    eps: f64,
) -> Outcome<Tensor<CublasCuda, 3>> {
    let (xp, gp) = (primitive(x), primitive(gain));
    let shape = xp.meta.shape().clone();
    let rows = as_rows(xp.clone());
    if !rms_norm_supported(&rows, &gp) {
        return declined(tensor(xp));
    }
    let (y, _) = rms_norm_forward(with_unit_rows(rows), into_contiguous(gp), eps);
    computed(&RMS_NORMS, tensor(reshape(y, shape)))
}

fn causal_softmax_plain(
    scores: Tensor<CublasCuda, 4>,
    offset: usize,
    scale: f64,
) -> Outcome<Tensor<CublasCuda, 4>> {
    let sp = primitive(scores);
    if !softmax_supported(&sp, offset) {
        return declined(tensor(sp));
    }
    computed(
        &SOFTMAXES,
        tensor(causal_softmax_forward(into_contiguous(sp), offset, scale)),
    )
}

fn swiglu_plain(
    gate: Tensor<CublasCuda, 2>,
    up: Tensor<CublasCuda, 2>,
) -> Outcome<Tensor<CublasCuda, 2>, (Tensor<CublasCuda, 2>, Tensor<CublasCuda, 2>)> {
    let (gp, up) = (primitive(gate), primitive(up));
    if !swiglu_supported(&gp, &up) {
        return declined((tensor(gp), tensor(up)));
    }
    let y = swiglu_forward(into_contiguous(gp), into_contiguous(up));
    computed(&SWIGLUS, tensor(y))
}

type CrossEntropyInputs<B> = (Tensor<B, 2>, Tensor<B, 1, Int>);

fn cross_entropy_plain(
    logits: Tensor<CublasCuda, 2>,
    targets: Tensor<CublasCuda, 1, Int>,
) -> Outcome<Tensor<CublasCuda, 1>, CrossEntropyInputs<CublasCuda>> {
    let (lp, tp) = (primitive(logits), targets.into_primitive());
    if !cross_entropy_supported(&lp, &tp) {
        return declined((tensor(lp), Tensor::from_primitive(tp)));
    }
    let (loss, _) = cross_entropy_forward(with_unit_rows(lp), into_contiguous(tp));
    computed(&CROSS_ENTROPIES, tensor(loss))
}

fn rotary_plain(
    x: Tensor<CublasCuda, 4>,
    cos: Tensor<CublasCuda, 2>,
    sin: Tensor<CublasCuda, 2>,
    start: usize,
    interleaved: bool,
) -> Outcome<Tensor<CublasCuda, 4>> {
    let (xp, cp, sp) = (primitive(x), primitive(cos), primitive(sin));
    if !rotary_supported(&xp, &cp, &sp, start) {
        return declined(tensor(xp));
    }
    let (cp, sp) = (into_contiguous(cp), into_contiguous(sp));
    computed(
        &ROTARIES,
        tensor(rotary(xp, cp, sp, start, interleaved, 1.0, true)),
    )
}

fn shared_suffix_plain(
    x: Tensor<CublasCuda, 4>,
    shared: Tensor<CublasCuda, 4>,
) -> Outcome<Tensor<CublasCuda, 4>, (Tensor<CublasCuda, 4>, Tensor<CublasCuda, 4>)> {
    let (xp, sp) = (primitive(x), primitive(shared));
    if !shared_suffix_supported(&xp, &sp) {
        return declined((tensor(xp), tensor(sp)));
    }
    computed(&SHARED_SUFFIXES, tensor(shared_suffix(xp, sp)))
}

fn sum_of_squares_plain(
    xs: Vec<Tensor<CublasCuda, 1>>,
) -> Outcome<Tensor<CublasCuda, 1>, Vec<Tensor<CublasCuda, 1>>> {
    let xs: Vec<_> = xs.into_iter().map(primitive).collect();
    if !sum_of_squares_supported(&xs) {
        return declined(xs.into_iter().map(tensor).collect());
    }
    let xs: Vec<_> = xs.into_iter().map(into_contiguous).collect();
    computed(&SQUARE_SUMS, tensor(sum_of_squares(&xs)))
}

fn adamw_plain(
    step: AdamWStep<CublasCuda>,
) -> Outcome<AdamWUpdate<CublasCuda>, AdamWStep<CublasCuda>> {
    let (param, grad) = (primitive(step.param.clone()), primitive(step.grad.clone()));
    let moments = step
        .moments
        .as_ref()
        .map(|(m, v)| (primitive(m.clone()), primitive(v.clone())));
    if !adamw_supported(&param, &grad, moments.as_ref().map(|(m, v)| (m, v))) {
        return declined(step);
    }
    let scalars = AdamWScalars {
        beta_1: step.beta_1,
        beta_2: step.beta_2,
        epsilon: step.epsilon,
        lr: step.lr,
        weight_decay: step.weight_decay,
        time: step.time,
    };
    let (p, m, v) = adamw(param, grad, moments, &scalars);
    computed(&ADAMW_STEPS, (tensor(p), tensor(m), tensor(v)))
}

// ---- Training backend (`Autodiff<CublasCuda>`): forward kernels with their backward. -------

type Train = Autodiff<CublasCuda>;

/// The gradient registered so far for autodiff node `$node` (by `$like`'s other consumers),
/// taken out of `$grads`, or `None`. `Gradients` finds a gradient by an autodiff tensor's node:
/// a stand-in tensor carries it (burn does not name the node's type outside its crate).
macro_rules! take_gradient {
    ($grads:expr, $node:expr, $like:expr) => {{
        let mut key = <Train as AutodiffBackend>::from_inner($like.clone());
        key.node = $node.clone();
        $grads.remove::<CublasCuda>(&key)
    }};
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<CublasCuda, 2> for LinearBackward {
    /// `(x, W, x's shape)`: `x` flattened to `[N, d_in]`, `W` `[d_in, d_out]`.
    type State = (Primitive, Primitive, Shape);

    /// `dW = xᵀ·dy` (one product over all `N` rows) and `dx = dy·Wᵀ`. When `x` already has a
    /// gradient from another consumer (the other projections of one input, SwiGLU's gate
    /// beside up), `dx` is accumulated into it by the product (cuBLAS's `β = 1`, the sum
    /// rounded once), where autodiff's registration would add the two in a pass of its own
    /// (read both, write the sum: 75 MB for the paper preset's `[16 384, 768]` bf16).
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let (x, w, x_shape) = ops.state;
        let dy = in_dtype(grads.consume::<CublasCuda>(&ops.node), x.dtype);
        let dims = dy.meta.shape().clone();
        let rows = x.meta.shape()[0];
        let dy = reshape(dy, Shape::new([rows, dims[dims.num_dims() - 1]]));
        if let Some(node) = node_w {
            let dw = matmul(Inner::float_swap_dims(x.clone(), 0, 1), dy.clone());
            grads.register::<CublasCuda>(node.id, dw);
        }
        if let Some(node) = node_x {
            let wt = Inner::float_swap_dims(w, 0, 1);
            let dx = match take_gradient!(grads, node, x) {
                Some(earlier) => {
                    let earlier = reshape(earlier, x.meta.shape().clone());
                    match matmul_accumulate(dy, wt, earlier) {
                        Ok(sum) => {
                            ACCUMULATED.fetch_add(1, Ordering::Relaxed);
                            sum
                        }
                        Err([dy, wt, earlier]) => Inner::float_add(matmul(dy, wt), earlier),
                    }
                }
                None => matmul(dy, wt),
            };
            grads.register::<CublasCuda>(node.id, reshape(dx, x_shape));
        }
    }
}

fn linear_train(
    x: Tensor<Train, 3>,
    weight: Tensor<Train, 2>,
) -> Outcome<Tensor<Train, 3>, (Tensor<Train, 3>, Tensor<Train, 2>)> {
    let (xa, wa) = (primitive(x), primitive(weight));
    let x_shape = xa.primitive.meta.shape().clone();
    let [b, s, d_in] = x_shape.dims::<3>();
    let [d_w, d_out] = wa.primitive.meta.shape().dims::<2>();
    if d_in != d_w || xa.primitive.dtype != wa.primitive.dtype {
        return declined((tensor(xa), tensor(wa)));
    }
    let x2 = reshape(xa.primitive.clone(), Shape::new([b * s, d_in]));
    let y = reshape(
        matmul(x2.clone(), wa.primitive.clone()),
        Shape::new([b, s, d_out]),
    );
    let out = match LinearBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x2, wa.primitive.clone(), x_shape), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    computed(&LINEARS, tensor(out))
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<CublasCuda, 2> for RmsNormBackward {
    /// `(x as rows [n, w], γ, r, x's shape)`.
    type State = (Primitive, Primitive, Primitive, Shape);

    /// `dx` and `dγ` in one kernel. When `x` already has a gradient (the residual stream's,
    /// registered by the addition after the block), the kernel adds `dx` to it in place,
    /// where autodiff's registration would add the two in a pass of its own.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gain] = ops.parents;
        let dy = as_rows(grads.consume::<CublasCuda>(&ops.node));
        let (x, gain, rstd, shape) = ops.state;
        let earlier = node_x
            .as_ref()
            .and_then(|node| take_gradient!(grads, node, x))
            .map(as_rows);
        let (dx, dgain, accumulated) = rms_norm_backward(x, gain, rstd, dy, earlier);
        if accumulated {
            ACCUMULATED.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(node) = node_x {
            grads.register::<CublasCuda>(node.id, reshape(dx, shape));
        }
        if let Some(node) = node_gain {
            grads.register::<CublasCuda>(node.id, dgain);
        }
    }
}

fn rms_norm_train(
    x: Tensor<Train, 3>,
    gain: Tensor<Train, 1>,
    eps: f64,
) -> Outcome<Tensor<Train, 3>> {
    let (xa, ga) = (primitive(x), primitive(gain));
    let shape = xa.primitive.meta.shape().clone();
    let rows = as_rows(xa.primitive.clone());
    if !rms_norm_supported(&rows, &ga.primitive) {
        return declined(tensor(xa));
    }
    // A column slice of wider rows (MLA-Decoupled's `c_kv` beside `k_pe`) is read in place,
    // and kept so for the backward.
    let (xp, gp) = (with_unit_rows(rows), into_contiguous(ga.primitive.clone()));
    let (y, rstd) = rms_norm_forward(xp.clone(), gp.clone(), eps);
    let y = reshape(y, shape.clone());
    let out = match RmsNormBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), ga.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp, gp, rstd, shape), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    computed(&RMS_NORMS, tensor(out))
}

#[derive(Debug)]
struct CausalSoftmaxBackward;

impl Backward<CublasCuda, 1> for CausalSoftmaxBackward {
    /// `(y, offset, scale)`.
    type State = (Primitive, usize, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_scores] = ops.parents;
        let dy = grads.consume::<CublasCuda>(&ops.node);
        let (probs, offset, scale) = ops.state;
        if let Some(node) = node_scores {
            let dscores = causal_softmax_backward(probs, dy, offset, scale);
            grads.register::<CublasCuda>(node.id, dscores);
        }
    }
}

fn causal_softmax_train(
    scores: Tensor<Train, 4>,
    offset: usize,
    scale: f64,
) -> Outcome<Tensor<Train, 4>> {
    let sa = primitive(scores);
    if !softmax_supported(&sa.primitive, offset) {
        return declined(tensor(sa));
    }
    let probs = causal_softmax_forward(into_contiguous(sa.primitive.clone()), offset, scale);
    let out = match CausalSoftmaxBackward
        .prepare::<NoCheckpointing>([sa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((probs.clone(), offset, scale), probs),
        OpsKind::UnTracked(prep) => prep.finish(probs),
    };
    computed(&SOFTMAXES, tensor(out))
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<CublasCuda, 2> for SwigluBackward {
    /// `(gate, up)`.
    type State = (Primitive, Primitive);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<CublasCuda>(&ops.node);
        let (gate, up) = ops.state;
        let (dgate, dup) = swiglu_backward(gate, up, dy);
        if let Some(node) = node_gate {
            grads.register::<CublasCuda>(node.id, dgate);
        }
        if let Some(node) = node_up {
            grads.register::<CublasCuda>(node.id, dup);
        }
    }
}

fn swiglu_train(
    gate: Tensor<Train, 2>,
    up: Tensor<Train, 2>,
) -> Outcome<Tensor<Train, 2>, (Tensor<Train, 2>, Tensor<Train, 2>)> {
    let (ga, ua) = (primitive(gate), primitive(up));
    if !swiglu_supported(&ga.primitive, &ua.primitive) {
        return declined((tensor(ga), tensor(ua)));
    }
    let (gp, up) = (
        into_contiguous(ga.primitive.clone()),
        into_contiguous(ua.primitive.clone()),
    );
    let y = swiglu_forward(gp.clone(), up.clone());
    let out = match SwigluBackward
        .prepare::<NoCheckpointing>([ga.node.clone(), ua.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gp, up), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    computed(&SWIGLUS, tensor(out))
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<CublasCuda, 1> for CrossEntropyBackward {
    /// `(logits, targets, lse)`.
    type State = (Primitive, Primitive, Primitive);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<CublasCuda>(&ops.node);
        let (logits, targets, lse) = ops.state;
        if let Some(node) = node_logits {
            let dlogits = cross_entropy_backward(logits, targets, lse, grad);
            grads.register::<CublasCuda>(node.id, dlogits);
        }
    }
}

fn cross_entropy_train(
    logits: Tensor<Train, 2>,
    targets: Tensor<Train, 1, Int>,
) -> Outcome<Tensor<Train, 1>, CrossEntropyInputs<Train>> {
    let (la, tp) = (primitive(logits), targets.into_primitive());
    if !cross_entropy_supported(&la.primitive, &tp) {
        return declined((tensor(la), Tensor::from_primitive(tp)));
    }
    let (lp, tp) = (with_unit_rows(la.primitive.clone()), into_contiguous(tp));
    let (loss, lse) = cross_entropy_forward(lp.clone(), tp.clone());
    let out = match CrossEntropyBackward
        .prepare::<NoCheckpointing>([la.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((lp, tp, lse), loss),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    };
    computed(&CROSS_ENTROPIES, tensor(out))
}

#[derive(Debug)]
struct RotaryBackward;

impl Backward<CublasCuda, 1> for RotaryBackward {
    /// `(cos, sin, start, interleaved, split)`: `split` when `x` was heads split from
    /// `[b, s, H·w]` ([`split_heads_layout`]).
    type State = (Primitive, Primitive, usize, bool, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<CublasCuda>(&ops.node);
        let (cos, sin, start, interleaved, split) = ops.state;
        if let Some(node) = node_x {
            // The rotation is orthogonal: its gradient is the rotation back (sign −1). For
            // split heads it is written in their memory order, `[b, s, H, w]` (positions along
            // axis 1), and handed back as `[b, H, s, w]`: the heads' merge in the backward of
            // the split is then a view, not a copy of the gradient.
            let dy = in_dtype(dy, cos.dtype);
            let dx = if split {
                let dy = Inner::float_swap_dims(dy, 1, 2);
                let dx = rotary(dy, cos, sin, start, interleaved, -1.0, false);
                Inner::float_swap_dims(dx, 1, 2)
            } else {
                rotary(dy, cos, sin, start, interleaved, -1.0, true)
            };
            grads.register::<CublasCuda>(node.id, dx);
        }
    }
}

/// The tables are constants of the model (`Rope`'s fields, not parameters): only `x` is a
/// parent of the node.
fn rotary_train(
    x: Tensor<Train, 4>,
    cos: Tensor<Train, 2>,
    sin: Tensor<Train, 2>,
    start: usize,
    interleaved: bool,
) -> Outcome<Tensor<Train, 4>> {
    let (xa, cp, sp) = (
        primitive(x),
        primitive(cos).primitive,
        primitive(sin).primitive,
    );
    if !rotary_supported(&xa.primitive, &cp, &sp, start) {
        return declined(tensor(xa));
    }
    let (cp, sp) = (into_contiguous(cp), into_contiguous(sp));
    let split = split_heads_layout(&xa.primitive);
    let y = rotary(
        xa.primitive,
        cp.clone(),
        sp.clone(),
        start,
        interleaved,
        1.0,
        true,
    );
    let out = match RotaryBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cp, sp, start, interleaved, split), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    computed(&ROTARIES, tensor(out))
}

#[derive(Debug)]
struct SharedSuffixBackward;

impl Backward<CublasCuda, 2> for SharedSuffixBackward {
    /// `(w₀, dtype)`: the heads' own width and the inputs' dtype.
    type State = (usize, DType);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_shared] = ops.parents;
        let dkeys = grads.consume::<CublasCuda>(&ops.node);
        let (w0, dtype) = ops.state;
        let (dx, dshared) = shared_suffix_backward(dkeys, w0, dtype);
        if let Some(node) = node_x {
            grads.register::<CublasCuda>(node.id, dx);
        }
        if let Some(node) = node_shared {
            grads.register::<CublasCuda>(node.id, dshared);
        }
    }
}

fn shared_suffix_train(
    x: Tensor<Train, 4>,
    shared: Tensor<Train, 4>,
) -> Outcome<Tensor<Train, 4>, (Tensor<Train, 4>, Tensor<Train, 4>)> {
    let (xa, sa) = (primitive(x), primitive(shared));
    if !shared_suffix_supported(&xa.primitive, &sa.primitive) {
        return declined((tensor(xa), tensor(sa)));
    }
    let (w0, dtype) = (xa.primitive.meta.shape()[3], xa.primitive.dtype);
    let keys = shared_suffix(xa.primitive.clone(), sa.primitive.clone());
    let out = match SharedSuffixBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), sa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((w0, dtype), keys),
        OpsKind::UnTracked(prep) => prep.finish(keys),
    };
    computed(&SHARED_SUFFIXES, tensor(out))
}

#[derive(Debug)]
struct ColumnsBackward;

impl Backward<CublasCuda, 1> for ColumnsBackward {
    /// `(x's shape, the block's first column, x's dtype)`.
    type State = (Shape, usize, DType);

    /// The block's gradient goes into its columns of `x`'s: added in place to the gradient `x`
    /// already has from its other blocks (the latent's and the rotary key's of one
    /// down-projection), or written into zeros by the first of them, where autodiff's slice
    /// fills a zero tensor of `x`'s size for each block and adds them up.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (shape, start, dtype) = ops.state;
        let d = in_dtype(grads.consume::<CublasCuda>(&ops.node), dtype);
        if let Some(node) = node_x {
            let width = shape[2];
            let d = with_unit_rows(as_rows(d));
            let earlier = take_gradient!(grads, node, d).map(as_rows);
            let (dx, accumulated) = place_columns(d, width, start, earlier);
            if accumulated {
                ACCUMULATED.fetch_add(1, Ordering::Relaxed);
            }
            grads.register::<CublasCuda>(node.id, reshape(dx, shape));
        }
    }
}

/// A view of `x`'s columns when `backend::slice` can make one (a copy otherwise, as burn's);
/// the backward is [`ColumnsBackward`].
fn columns_train(x: Tensor<Train, 3>, range: Range<usize>) -> Outcome<Tensor<Train, 3>> {
    let xa = primitive(x);
    let shape = xa.primitive.meta.shape().clone();
    let [b, s, w] = shape.dims::<3>();
    if range.is_empty() || range.end > w {
        return declined(tensor(xa));
    }
    let rows = as_rows(slice(
        xa.primitive.clone(),
        &[
            Slice::from(0..b),
            Slice::from(0..s),
            Slice::from(range.clone()),
        ],
    ));
    if !place_columns_supported(&rows, w, range.start) {
        return declined(tensor(xa));
    }
    let block = reshape(rows, Shape::new([b, s, range.len()]));
    let out = match ColumnsBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((shape, range.start, xa.primitive.dtype), block),
        OpsKind::UnTracked(prep) => prep.finish(block),
    };
    computed(&COLUMNS, tensor(out))
}

#[derive(Debug)]
struct AttentionScoresBackward;

impl Backward<CublasCuda, 2> for AttentionScoresBackward {
    /// `(q, k)`.
    type State = (Primitive, Primitive);

    /// `dq = dS·k` and `dk = dSᵀ·q`: each product's output follows its right operand's memory
    /// order (`backend::matmul`), so `dk` comes out in `q`'s order, contiguous or split heads,
    /// where autodiff's `matmul` gives `(qᵀ·dS)ᵀ`, transposed, which the keys' next
    /// backward (the rotary, the shared suffix) had to copy.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k] = ops.parents;
        let (q, k) = ops.state;
        let ds = in_dtype(grads.consume::<CublasCuda>(&ops.node), q.dtype);
        if let Some(node) = node_k {
            let dk = matmul(Inner::float_swap_dims(ds.clone(), 2, 3), q);
            grads.register::<CublasCuda>(node.id, dk);
        }
        if let Some(node) = node_q {
            grads.register::<CublasCuda>(node.id, matmul(ds, k));
        }
    }
}

fn attention_scores_train(
    q: Tensor<Train, 4>,
    k: Tensor<Train, 4>,
) -> Outcome<Tensor<Train, 4>, (Tensor<Train, 4>, Tensor<Train, 4>)> {
    let (qa, ka) = (primitive(q), primitive(k));
    let ([b, h, _, w], [bk, hk, _, wk]) = (
        qa.primitive.meta.shape().dims::<4>(),
        ka.primitive.meta.shape().dims::<4>(),
    );
    // Broadcast heads or batches (and their summed gradients) are left to autodiff.
    if (b, h, w) != (bk, hk, wk) || qa.primitive.dtype != ka.primitive.dtype {
        return declined((tensor(qa), tensor(ka)));
    }
    let (qp, kp) = (qa.primitive.clone(), ka.primitive.clone());
    let scores = matmul(qp.clone(), Inner::float_swap_dims(kp.clone(), 2, 3));
    let out = match AttentionScoresBackward
        .prepare::<NoCheckpointing>([qa.node.clone(), ka.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((qp, kp), scores),
        OpsKind::UnTracked(prep) => prep.finish(scores),
    };
    computed(&ATTENTION_SCORES, tensor(out))
}

/// Registers the fused kernels with `attn_models::fused` for [`CublasCuda`] (forward) and
/// `Autodiff<CublasCuda>` (forward and backward): from then on every call of
/// `attn_models::fused` on these backends (the models' RMSNorms, causal softmaxes, SwiGLUs,
/// rotary embeddings, MLA-Decoupled's keys and, in training, the scores' gradients; the
/// training loss, gradient norms and `FusedAdamW`'s updates) runs them. Inputs they do not
/// take (f64, sizes past u32 indexing) go to burn's composition.
pub fn register_fused() {
    fused::register::<CublasCuda>(FusedKernels {
        // Without a backward, burn's `linear` is the same product.
        linear: |x, weight| Outcome::Declined((x, weight)),
        rms_norm: rms_norm_plain,
        causal_softmax: causal_softmax_plain,
        swiglu: swiglu_plain,
        cross_entropy: cross_entropy_plain,
        rotary: rotary_plain,
        shared_suffix: shared_suffix_plain,
        // Without a backward, burn's `q.matmul(k.transpose())` is the same product.
        attention_scores: |q, k| Outcome::Declined((q, k)),
        // Without a backward, the slice (`backend::slice`: a view) is all there is.
        columns: |x, _| Outcome::Declined(x),
        sum_of_squares: sum_of_squares_plain,
        adamw: adamw_plain,
    });
    fused::register::<Train>(FusedKernels {
        linear: linear_train,
        rms_norm: rms_norm_train,
        causal_softmax: causal_softmax_train,
        swiglu: swiglu_train,
        cross_entropy: cross_entropy_train,
        rotary: rotary_train,
        shared_suffix: shared_suffix_train,
        attention_scores: attention_scores_train,
        columns: columns_train,
        // Gradient norms and the optimizer's update are taken on the inner backend; an
        // autodiff caller gets burn's composition, which it can differentiate.
        ..FusedKernels::declining()
    });
}

/// Removes the registrations of [`register_fused`]: burn's compositions run again.
pub fn unregister_fused() {
    fused::unregister::<CublasCuda>();
    fused::unregister::<Train>();
}
