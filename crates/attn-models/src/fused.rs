//! Fused kernels a backend may supply for the models' element-wise blocks.
//!
//! burn composes RMSNorm, the causal softmax, SwiGLU's gate and the cross-entropy loss from
//! generic tensor operations: eight kernels for one RMSNorm, a dozen full-size passes over the
//! `[b, H, s, t]` scores for one softmax and its gradient, f32 copies of the whole `[n, v]`
//! logits for the loss. A backend that has a fused kernel for any of them (with its backward,
//! when it is an autodiff backend) registers it here, keyed by the backend's type; the models
//! call [`linear`], [`rms_norm`], [`causal_softmax`], [`swiglu`], [`cross_entropy`], [`rotary`],
//! [`shared_suffix`], [`attention_scores`], [`columns`] and [`sum_of_squares`], and the training loop's
//! optimizer calls [`adamw`]; each runs the registered kernel when there is one and burn's
//! composition otherwise. The composition is the definition: a registered kernel must
//! compute the same function (tests compare them), and may decline an input it does not
//! handle (a dtype, a layout) by handing it back.
//!
//! No bound is added to the models' `B: Backend`, and a backend with nothing registered (the
//! CPU backends, always) runs exactly the composed code.
//!
//! ```
//! use attn_models::fused::{self, FusedKernels};
//! use burn::backend::NdArray;
//! use burn::nn::RmsNormConfig;
//! use burn::prelude::*;
//!
//! type B = NdArray<f32>;
//! let device = Default::default();
//! let norm = RmsNormConfig::new(4).init::<B>(&device);
//! let x = Tensor::<B, 3>::ones([2, 3, 4], &device);
//! // Nothing registered: burn's RmsNorm.
//! let reference = fused::rms_norm(&norm, x.clone());
//! // A backend's kernel (here one that declines everything, so burn's path still runs).
//! fused::register::<B>(FusedKernels::declining());
//! assert!(fused::is_registered::<B>());
//! let declined = fused::rms_norm(&norm, x);
//! declined.into_data().assert_eq(&reference.into_data(), true);
//! fused::unregister::<B>();
//! ```

use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{log_softmax, silu, softmax};
use std::any::{Any, TypeId};
use std::ops::Range;
use std::sync::{PoisonError, RwLock};

/// A kernel's answer: its result `T`, or its input `I` handed back.
#[derive(Debug)]
pub enum Outcome<T, I = T> {
    /// The kernel's result.
    Computed(T),
    /// The input, handed back: the kernel does not take it (a dtype, a size).
    Declined(I),
}

/// RMSNorm over the last axis: `x` `[b, s, w]`, gain `γ` `[w]`, `ε` →
/// `y_bsj = γ_j·x_bsj / √(mean_j x_bsj² + ε)`, `[b, s, w]`, in `x`'s dtype. `x` is the
/// caller's own tensor (no reshape in between), so that an autodiff kernel sees the gradient
/// `x` already has from its other consumers (the residual stream's) and may add its own to it
/// in the same pass.
pub type RmsNormKernel<B> = fn(Tensor<B, 3>, Tensor<B, 1>, f64) -> Outcome<Tensor<B, 3>>;

/// Causal softmax of `c·scores` (`scores` `[b, H, s, t]`, scale `c`, e.g. `1/√d_k`) for
/// queries at positions `offset..offset+s`: row `i` is the softmax of its first
/// `offset + (i mod s) + 1` entries, each times `c`, and 0 after them. Arguments
/// `(scores, offset, c)`.
pub type CausalSoftmaxKernel<B> = fn(Tensor<B, 4>, usize, f64) -> Outcome<Tensor<B, 4>>;

/// SwiGLU's gating: `silu(gate) ⊙ up = gate·σ(gate)·up` of two `[n, f]` tensors.
pub type SwigluKernel<B> =
    fn(Tensor<B, 2>, Tensor<B, 2>) -> Outcome<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)>;

/// The language-model loss: `logits` `[n, v]`, `targets` `[n]` →
/// `(1/n) Σ_i −log softmax(logits_i)_{t_i}`, `[1]`, in f32.
pub type CrossEntropyKernel<B> =
    fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Outcome<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1, Int>)>;

/// Rotary embedding of `x` `[b, h, s, w]` at positions `start..start + s` with the tables
/// `cos`, `sin` `[max_seq, w/2]` (constants, no gradient); `interleaved` pairs `(2k, 2k+1)`
/// (DeepSeek), else `(k, k + w/2)` (HF LLaMA). See [`crate::rope::Rope::apply`].
pub type RotaryKernel<B> =
    fn(Tensor<B, 4>, Tensor<B, 2>, Tensor<B, 2>, usize, bool) -> Outcome<Tensor<B, 4>>;

/// Whole heads with a suffix every head shares: `x` `[b, H, t, w₀]` and `shared`
/// `[b, 1, t, w₁]` → `[x_h | shared]` `[b, H, t, w₀ + w₁]` (MLA-Decoupled's keys
/// `[k_nope | k_pe]`, so that `q·kᵀ` over whole heads is one product); the gradient of
/// `shared` is the sum over heads. See [`shared_suffix`].
pub type SharedSuffixKernel<B> =
    fn(Tensor<B, 4>, Tensor<B, 4>) -> Outcome<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)>;

/// Attention's raw scores over heads: `q` `[b, H, s, w]`, `k` `[b, H, t, w]` → `q·kᵀ`
/// `[b, H, s, t]`. A kernel is free to choose how it differentiates the product: autodiff's
/// `matmul` computes the keys' gradient as `(qᵀ·dS)ᵀ`, a transposed `[b, H, t, w]` that a
/// consumer reading rows in order must copy, where `dSᵀ·q` writes it in order. See
/// [`attention_scores`].
pub type AttentionScoresKernel<B> =
    fn(Tensor<B, 4>, Tensor<B, 4>) -> Outcome<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)>;

/// A linear map of the last axis without bias: `x` `[b, s, d_in]`, `W` `[d_in, d_out]` →
/// `x·W` `[b, s, d_out]` (`nn::Linear`'s product). A kernel is free to choose how it
/// differentiates it: where `x` feeds several products (the queries', keys' and values'
/// projections; SwiGLU's gate and up), autodiff adds each `dx = dy·Wᵀ` to the gradient
/// already registered in a pass of its own, where the product can accumulate into it
/// (cuBLAS's `β = 1`). See [`linear`].
pub type LinearKernel<B> =
    fn(Tensor<B, 3>, Tensor<B, 2>) -> Outcome<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)>;

/// Columns `range` of the last axis: `x` `[b, s, w]` → `x[:, :, range]` `[b, s, |range|]`
/// (MLA's latent and MLA-Decoupled's rotary key, the two blocks of one down-projection). A
/// kernel may return a view of `x`'s memory, and write the block's gradient into its columns
/// of the gradient `x` already has from its other blocks, where autodiff's slice fills a zero
/// tensor of `x`'s size for each block and adds them up. See [`columns`].
pub type ColumnsKernel<B> = fn(Tensor<B, 3>, Range<usize>) -> Outcome<Tensor<B, 3>>;

/// `Σ_t Σ_i x_{t,i}²` over one or more flat tensors `x_t`, `[1]` in f32 (the squared global
/// norm of a model's gradients, in one reduction instead of one per parameter).
pub type SumOfSquaresKernel<B> = fn(Vec<Tensor<B, 1>>) -> Outcome<Tensor<B, 1>, Vec<Tensor<B, 1>>>;

/// One AdamW update of a flattened parameter (Loshchilov & Hutter; burn's `AdamW` without
/// AMSGrad): with gradient `g`, learning rate `η`, decay `λ` and `t` the step count after this
/// update, `m ← β₁·m + (1−β₁)·g`, `v ← β₂·v + (1−β₂)·g²` (`m = v = 0` before the first step),
/// `θ ← θ·(1 − η·λ) − η·m̂ / (√v̂ + ε)` with `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
#[derive(Debug)]
pub struct AdamWStep<B: Backend> {
    /// `θ`, flattened.
    pub param: Tensor<B, 1>,
    /// `g`, flattened.
    pub grad: Tensor<B, 1>,
    /// `(m, v)` before this update; `None` on the first step.
    pub moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    /// `η`.
    pub lr: f64,
    /// `β₁`.
    pub beta_1: f32,
    /// `β₂`.
    pub beta_2: f32,
    /// `ε`.
    pub epsilon: f32,
    /// `λ` (decoupled: applied as `θ·(1 − η·λ)`).
    pub weight_decay: f32,
    /// `t`, the step count after this update (1 for the first).
    pub time: usize,
}

/// The result of an [`AdamWStep`]: `(θ, m, v)` after the update, flattened.
pub type AdamWUpdate<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// One AdamW update, [`AdamWStep`], in one kernel.
pub type AdamWKernel<B> = fn(AdamWStep<B>) -> Outcome<AdamWUpdate<B>, AdamWStep<B>>;

/// The fused kernels of one backend `B`.
pub struct FusedKernels<B: Backend> {
    /// See [`LinearKernel`].
    pub linear: LinearKernel<B>,
    /// See [`RmsNormKernel`].
    pub rms_norm: RmsNormKernel<B>,
    /// See [`CausalSoftmaxKernel`].
    pub causal_softmax: CausalSoftmaxKernel<B>,
    /// See [`SwigluKernel`].
    pub swiglu: SwigluKernel<B>,
    /// See [`CrossEntropyKernel`].
    pub cross_entropy: CrossEntropyKernel<B>,
    /// See [`RotaryKernel`].
    pub rotary: RotaryKernel<B>,
    /// See [`SharedSuffixKernel`].
    pub shared_suffix: SharedSuffixKernel<B>,
    /// See [`AttentionScoresKernel`].
    pub attention_scores: AttentionScoresKernel<B>,
    /// See [`ColumnsKernel`].
    pub columns: ColumnsKernel<B>,
    /// See [`SumOfSquaresKernel`].
    pub sum_of_squares: SumOfSquaresKernel<B>,
    /// See [`AdamWKernel`].
    pub adamw: AdamWKernel<B>,
}

impl<B: Backend> FusedKernels<B> {
    /// Kernels that decline every input: a base to override some of.
    pub fn declining() -> Self {
        Self {
            linear: |x, weight| Outcome::Declined((x, weight)),
            rms_norm: |x, _, _| Outcome::Declined(x),
            causal_softmax: |scores, _, _| Outcome::Declined(scores),
            swiglu: |gate, up| Outcome::Declined((gate, up)),
            cross_entropy: |logits, targets| Outcome::Declined((logits, targets)),
            rotary: |x, _, _, _, _| Outcome::Declined(x),
            shared_suffix: |x, shared| Outcome::Declined((x, shared)),
            attention_scores: |q, k| Outcome::Declined((q, k)),
            columns: |x, _| Outcome::Declined(x),
            sum_of_squares: Outcome::Declined,
            adamw: Outcome::Declined,
        }
    }
}

impl<B: Backend> Clone for FusedKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for FusedKernels<B> {}

type Entry = (TypeId, Box<dyn Any + Send + Sync>);

static REGISTRY: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

/// Registers `kernels` for backend `B`, replacing any registered before.
pub fn register<B: Backend>(kernels: FusedKernels<B>) {
    let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    registry.retain(|(id, _)| *id != TypeId::of::<B>());
    registry.push((TypeId::of::<B>(), Box::new(kernels)));
}

/// Removes `B`'s kernels: the models use burn's composition again.
pub fn unregister<B: Backend>() {
    let mut registry = REGISTRY.write().unwrap_or_else(PoisonError::into_inner);
    registry.retain(|(id, _)| *id != TypeId::of::<B>());
}

/// Whether `B` has kernels registered.
pub fn is_registered<B: Backend>() -> bool {
    kernels::<B>().is_some()
}

fn kernels<B: Backend>() -> Option<FusedKernels<B>> {
    let registry = REGISTRY.read().unwrap_or_else(PoisonError::into_inner);
    registry
        .iter()
        .find(|(id, _)| *id == TypeId::of::<B>())
        .and_then(|(_, k)| k.downcast_ref::<FusedKernels<B>>().copied())
}

/// `x·W` for `x` `[b, s, d_in]` and `W` `[d_in, d_out]` → `[b, s, d_out]`: `B`'s kernel
/// ([`LinearKernel`]) when registered and accepting, else burn's `linear` (what
/// `nn::Linear::forward` computes without a bias).
///
/// ```
/// use attn_models::fused;
/// use burn::backend::NdArray;
/// use burn::prelude::*;
///
/// type B = NdArray<f32>;
/// let device = Default::default();
/// let x = Tensor::<B, 3>::from_floats([[[1.0, 2.0]]], &device); // [1, 1, 2]
/// let w = Tensor::<B, 2>::from_floats([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]], &device); // [2, 3]
/// let y = fused::linear(x, w);
/// assert_eq!(y.into_data().to_vec::<f32>().unwrap(), [1.0, 2.0, 8.0]);
/// ```
pub fn linear<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 3> {
    let (x, weight) = match kernels::<B>() {
        Some(k) => match (k.linear)(x, weight) {
            Outcome::Computed(y) => return y,
            Outcome::Declined(inputs) => inputs,
        },
        None => (x, weight),
    };
    burn::tensor::module::linear(x, weight, None)
}

/// `layer.forward(x)` for `x` `[b, s, d_in]` → `[b, s, d_out]`, its product through
/// [`linear`] (a bias, if the layer has one, added after it).
pub fn linear_layer<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let y = linear(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// `norm(x)` over `x`'s last axis `[…, w]` → `[…, w]`: `B`'s fused kernel when registered
/// and accepting, else burn's [`RmsNorm::forward`].
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let Some(k) = kernels::<B>() else {
        return norm.forward(x);
    };
    let dims = x.dims();
    // Rank 3, the models' `[b, s, w]`, goes to the kernel as it is (the same autodiff node);
    // any other rank through a reshape to `[1, n, w]`.
    let x = if D == 3 {
        Tensor::<B, 3>::from_primitive(x.into_primitive())
    } else {
        x.reshape([1, -1, dims[D - 1] as i32])
    };
    let back = |t: Tensor<B, 3>| -> Tensor<B, D> {
        if D == 3 {
            Tensor::from_primitive(t.into_primitive())
        } else {
            t.reshape(dims)
        }
    };
    match (k.rms_norm)(x, norm.gamma.val(), norm.epsilon) {
        Outcome::Computed(y) => back(y),
        Outcome::Declined(x) => norm.forward(back(x)),
    }
}

/// Causal softmax over the last axis of `scale · scores` (`scores` `[b, H, s, t]`) for
/// queries at positions `offset..offset+s` and keys `0..t` → `[b, H, s, t]`: `B`'s fused
/// kernel when registered and accepting (the scale costs nothing there: attention passes its
/// `1/√d_k` here rather than scaling the `[b, H, s, t]` scores in a pass of their own), else
/// a multiplication, masking with `−∞` above the diagonal and burn's softmax.
pub fn causal_softmax<B: Backend>(scores: Tensor<B, 4>, offset: usize, scale: f64) -> Tensor<B, 4> {
    let scores = match kernels::<B>() {
        Some(k) => match (k.causal_softmax)(scores, offset, scale) {
            Outcome::Computed(probs) => return probs,
            Outcome::Declined(scores) => scores,
        },
        None => scores,
    };
    let [_, _, s, t] = scores.dims();
    let mask = Tensor::<B, 2, Bool>::tril_mask([s, t], offset as i64, &scores.device());
    let scores = if scale == 1.0 {
        scores
    } else {
        scores.mul_scalar(scale)
    };
    softmax(
        scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY),
        3,
    )
}

/// `silu(gate) ⊙ up` of `[…, f]` tensors → `[…, f]`: `B`'s fused kernel when registered and
/// accepting, else burn's `silu` and a product.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let (gate, up) = match kernels::<B>() {
        Some(k) => {
            let (gate_dims, up_dims) = (gate.dims(), up.dims());
            let rows = |t: Tensor<B, D>, dims: [usize; D]| t.reshape([-1, dims[D - 1] as i32]);
            match (k.swiglu)(rows(gate, gate_dims), rows(up, up_dims)) {
                Outcome::Computed(y) => return y.reshape(gate_dims),
                // Each back in its own shape: the composition broadcasts as burn does.
                Outcome::Declined((gate, up)) => (gate.reshape(gate_dims), up.reshape(up_dims)),
            }
        }
        None => (gate, up),
    };
    silu(gate) * up
}

/// The rotary embedding by `B`'s fused kernel ([`RotaryKernel`]), or `x` handed back when
/// none is registered or it declines: [`crate::rope::Rope::apply`] then composes it.
pub fn rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    start: usize,
    interleaved: bool,
) -> Outcome<Tensor<B, 4>> {
    match kernels::<B>() {
        Some(k) => (k.rotary)(x, cos.clone(), sin.clone(), start, interleaved),
        None => Outcome::Declined(x),
    }
}

/// `[x_h | shared]` for every head `h`: `x` `[b, H, t, w₀]`, `shared` `[b, 1, t, w₁]` →
/// `[b, H, t, w₀ + w₁]`, by `B`'s fused kernel ([`SharedSuffixKernel`]) when registered and
/// accepting, else burn's `cat` of `x` and `shared` expanded over the heads.
///
/// ```
/// use attn_models::fused;
/// use burn::backend::NdArray;
/// use burn::prelude::*;
///
/// type B = NdArray<f32>;
/// let device = Default::default();
/// let x = Tensor::<B, 4>::from_floats([[[[1.0, 2.0]], [[3.0, 4.0]]]], &device); // [1, 2, 1, 2]
/// let shared = Tensor::<B, 4>::from_floats([[[[9.0]]]], &device); // [1, 1, 1, 1]
/// let keys = fused::shared_suffix(x, shared);
/// assert_eq!(keys.dims(), [1, 2, 1, 3]);
/// assert_eq!(keys.into_data().to_vec::<f32>().unwrap(), [1.0, 2.0, 9.0, 3.0, 4.0, 9.0]);
/// ```
pub fn shared_suffix<B: Backend>(x: Tensor<B, 4>, shared: Tensor<B, 4>) -> Tensor<B, 4> {
    let (x, shared) = match kernels::<B>() {
        Some(k) => match (k.shared_suffix)(x, shared) {
            Outcome::Computed(y) => return y,
            Outcome::Declined(inputs) => inputs,
        },
        None => (x, shared),
    };
    let [b, h, t, _] = x.dims();
    let w1 = shared.dims()[3];
    Tensor::cat(vec![x, shared.expand([b, h, t, w1])], 3)
}

/// Columns `range` of the last axis of `x` `[b, s, w]`, `[b, s, |range|]`, by `B`'s kernel
/// ([`ColumnsKernel`]) when registered and accepting, else burn's `slice`.
///
/// ```
/// use attn_models::fused;
/// use burn::backend::NdArray;
/// use burn::prelude::*;
///
/// type B = NdArray<f32>;
/// let device = Default::default();
/// let x = Tensor::<B, 3>::from_floats([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], &device);
/// let tail = fused::columns(x, 1..3);
/// assert_eq!(tail.dims(), [1, 2, 2]);
/// assert_eq!(tail.into_data().to_vec::<f32>().unwrap(), [2.0, 3.0, 5.0, 6.0]);
/// ```
pub fn columns<B: Backend>(x: Tensor<B, 3>, range: Range<usize>) -> Tensor<B, 3> {
    // All the columns: `x` itself (autodiff's slice would still fill zeros and assign the
    // whole gradient into them).
    if range == (0..x.dims()[2]) {
        return x;
    }
    let x = match kernels::<B>() {
        Some(k) => match (k.columns)(x, range.clone()) {
            Outcome::Computed(y) => return y,
            Outcome::Declined(x) => x,
        },
        None => x,
    };
    let [b, s, _] = x.dims();
    x.slice([0..b, 0..s, range])
}

/// Attention's raw scores `q·kᵀ` `[b, H, s, t]` of queries `q` `[b, H, s, w]` and keys `k`
/// `[b, H, t, w]`, by `B`'s kernel ([`AttentionScoresKernel`]) when registered and accepting,
/// else burn's `q.matmul(k.transpose())`.
///
/// ```
/// use attn_models::fused;
/// use burn::backend::NdArray;
/// use burn::prelude::*;
///
/// type B = NdArray<f32>;
/// let device = Default::default();
/// let q = Tensor::<B, 4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device); // [1, 1, 2, 2]
/// let k = Tensor::<B, 4>::from_floats([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]], &device);
/// let scores = fused::attention_scores(q, k); // [1, 1, 2, 3]
/// assert_eq!(scores.into_data().to_vec::<f32>().unwrap(), [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
/// ```
pub fn attention_scores<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>) -> Tensor<B, 4> {
    let (q, k) = match kernels::<B>() {
        Some(registered) => match (registered.attention_scores)(q, k) {
            Outcome::Computed(scores) => return scores,
            Outcome::Declined(inputs) => inputs,
        },
        None => (q, k),
    };
    q.matmul(k.transpose())
}

/// One AdamW update by `B`'s fused kernel ([`AdamWKernel`]), or the step handed back when
/// none is registered or it declines: the optimizer then runs burn's `AdamW`, which composes
/// the same update.
pub fn adamw<B: Backend>(step: AdamWStep<B>) -> Outcome<AdamWUpdate<B>, AdamWStep<B>> {
    match kernels::<B>() {
        Some(k) => (k.adamw)(step),
        None => Outcome::Declined(step),
    }
}

/// `Σ x_i²` of any tensor, `[1]` in f32: [`sum_of_squares_all`] of `x` alone.
pub fn sum_of_squares<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    let device = x.device();
    sum_of_squares_all(vec![x.reshape([-1])])
        .unwrap_or_else(|| Tensor::<B, 1>::zeros([1], &device).cast(DType::F32))
}

/// `Σ_t Σ_i x_{t,i}²` over the flat tensors `xs`, `[1]` in f32, or `None` when `xs` is empty:
/// `B`'s fused kernel when registered and accepting (one reduction over all of them), else,
/// per tensor, a cast to f32, a square and burn's sum, added in the order of `xs`.
///
/// ```
/// use attn_models::fused;
/// use burn::backend::NdArray;
/// use burn::prelude::*;
///
/// type B = NdArray<f32>;
/// let device = Default::default();
/// let a = Tensor::<B, 1>::from_floats([3.0, 4.0], &device);
/// let b = Tensor::<B, 1>::from_floats([12.0], &device);
/// let total = fused::sum_of_squares_all(vec![a, b]).unwrap();
/// assert_eq!(total.into_scalar(), 169.0); // 9 + 16 + 144
/// ```
pub fn sum_of_squares_all<B: Backend>(xs: Vec<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    if xs.is_empty() {
        return None;
    }
    let xs = match kernels::<B>() {
        Some(k) => match (k.sum_of_squares)(xs) {
            Outcome::Computed(total) => return Some(total),
            Outcome::Declined(xs) => xs,
        },
        None => xs,
    };
    xs.into_iter()
        .map(|x| x.cast(DType::F32).powi_scalar(2).sum())
        .reduce(|acc, s| acc + s)
}

/// The mean next-token loss of `logits` `[n, v]` against `targets` `[n]`, `[1]` in f32:
/// `(1/n) Σ_i −log softmax(logits_i)_{t_i}`, the log-softmax taken in f32 whatever the
/// logits' dtype (as mixed-precision trainers do), so that neither the loss nor its gradient
/// at the logits is rounded to bf16 on the way. `B`'s fused kernel when registered and
/// accepting, else burn's `log_softmax` and a gather.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let (logits, targets) = match kernels::<B>() {
        Some(k) => match (k.cross_entropy)(logits, targets) {
            Outcome::Computed(loss) => return loss,
            Outcome::Declined(inputs) => inputs,
        },
        None => (logits, targets),
    };
    let n = targets.dims()[0];
    let logp = log_softmax(logits.cast(DType::F32), 1);
    logp.gather(1, targets.reshape([n, 1])).mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Distribution, Tolerance};
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Each test registers for its own backend type, so tests running in parallel do not see
    // each other's kernels.
    // Types no other test of the crate uses, so that a registration here never changes what
    // another test computes.
    type Plain = NdArray<f64, i32>;
    type Grad = Autodiff<NdArray<f32, i32>>;
    type Other = NdArray<f32, i64>;

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// A "kernel" that computes the norm differently from burn (`x·γ·r` in one expression
    /// rather than `x/rms·γ`): the test sees whether dispatch reached it.
    fn counted_norm(
        x: Tensor<Grad, 3>,
        gain: Tensor<Grad, 1>,
        eps: f64,
    ) -> Outcome<Tensor<Grad, 3>> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        let r = (x.clone().square().mean_dim(2) + eps).sqrt().recip();
        Outcome::Computed(x * r * gain.unsqueeze())
    }

    #[test]
    fn registered_kernels_are_called_and_match_the_composition() {
        let device = Default::default();
        let norm = RmsNormConfig::new(8).init::<Grad>(&device);
        let x = Tensor::<Grad, 3>::random([2, 5, 8], Distribution::Normal(0.0, 2.0), &device);
        let reference = norm.forward(x.clone());
        register::<Grad>(FusedKernels {
            rms_norm: counted_norm,
            ..FusedKernels::declining()
        });
        let before = CALLS.load(Ordering::SeqCst);
        let fused = rms_norm(&norm, x.clone());
        assert_eq!(CALLS.load(Ordering::SeqCst), before + 1);
        fused
            .into_data()
            .assert_approx_eq::<f32>(&reference.into_data(), Tolerance::rel_abs(1e-5, 1e-6));
        unregister::<Grad>();
        assert!(!is_registered::<Grad>());
        let _ = rms_norm(&norm, x);
        assert_eq!(CALLS.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn a_declined_softmax_falls_back_to_the_masked_composition() {
        let device = Default::default();
        register::<Plain>(FusedKernels::declining());
        let scores = Tensor::<Plain, 4>::random([1, 2, 3, 5], Distribution::Default, &device);
        // burn 0.21's NdArray backends share one default float dtype, set by whichever test
        // creates a tensor first: read in f64 whatever it is (the tolerances hold for f32).
        let x: Vec<f64> = scores.to_data().convert::<f64>().to_vec().unwrap();
        // Offset 2: query i sees keys 0..=2+i; scale 0.5: p_j/p_0 = e^{0.5·(x_j − x_0)}.
        let probs = causal_softmax(scores, 2, 0.5);
        let rows: Vec<f64> = probs.into_data().convert::<f64>().to_vec().unwrap();
        for (r, (row, x)) in rows.chunks(5).zip(x.chunks(5)).enumerate() {
            let i = r % 3;
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6);
            assert!(row[3 + i..].iter().all(|&p| p == 0.0), "row {r}: {row:?}");
            assert!(row[..3 + i].iter().all(|&p| p > 0.0), "row {r}: {row:?}");
            for j in 1..3 + i {
                let ratio = (0.5 * (x[j] - x[0])).exp();
                assert!(
                    (row[j] / row[0] - ratio).abs() < 1e-5 * ratio,
                    "row {r}: {row:?}"
                );
            }
        }
        unregister::<Plain>();
    }

    #[test]
    fn the_shared_suffix_is_repeated_for_every_head_and_its_gradient_summed_over_them() {
        // Nothing registered for `Grad` here: burn's `cat` of the expanded suffix.
        let device = Default::default();
        let x =
            Tensor::<Grad, 4>::random([2, 3, 4, 5], Distribution::Default, &device).require_grad();
        let shared =
            Tensor::<Grad, 4>::random([2, 1, 4, 2], Distribution::Default, &device).require_grad();
        let keys = shared_suffix(x.clone(), shared.clone());
        assert_eq!(keys.dims(), [2, 3, 4, 7]);
        let head = |h: usize| keys.clone().slice([0..2, h..h + 1, 0..4, 0..7]);
        for h in 0..3 {
            let (own, suffix) = (
                head(h).slice([0..2, 0..1, 0..4, 0..5]),
                head(h).slice([0..2, 0..1, 0..4, 5..7]),
            );
            own.into_data().assert_eq(
                &x.clone().slice([0..2, h..h + 1, 0..4, 0..5]).into_data(),
                true,
            );
            suffix
                .into_data()
                .assert_eq(&shared.clone().into_data(), true);
        }
        // d/dshared Σ c⊙keys = Σ_h c[:, h, :, 5..]; d/dx = c[..., ..5].
        let c = Tensor::<Grad, 4>::random([2, 3, 4, 7], Distribution::Default, &device);
        let grads = (keys * c.clone()).sum().backward();
        let want = c
            .clone()
            .slice([0..2, 0..3, 0..4, 5..7])
            .sum_dim(1)
            .inner()
            .into_data();
        let tolerance = Tolerance::rel_abs(1e-6, 1e-6);
        shared
            .grad(&grads)
            .expect("dshared")
            .into_data()
            .assert_approx_eq::<f32>(&want, tolerance);
        x.grad(&grads)
            .expect("dx")
            .into_data()
            .assert_approx_eq::<f32>(
                &c.slice([0..2, 0..3, 0..4, 0..5]).inner().into_data(),
                tolerance,
            );
    }

    #[test]
    fn registration_is_per_backend_type() {
        register::<Other>(FusedKernels::declining());
        assert!(is_registered::<Other>());
        assert!(!is_registered::<Autodiff<Other>>());
        unregister::<Other>();
        assert!(!is_registered::<Other>());
    }
}
