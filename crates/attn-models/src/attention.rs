//! The three attention variants of seed 000, with optional gap removal (seed 002), KV-cache
//! decoding, and (MLA) the absorbed-matrix inference path.
//!
//! Shapes: `b` batch, `s` new tokens, `t` keys (cached + new), `H` heads, `d` model width.

use crate::cache::LayerCache;
use crate::config::{AttentionConfig, AttentionVariant, PreRopePlacement};
use crate::fused::linear_layer;
use crate::rope::{Rope, RopePairing};
use burn::nn::{Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;

/// The attention scores and probabilities of one forward pass, for probing.
#[derive(Debug, Clone)]
pub struct AttentionMaps<B: Backend> {
    /// Scaled scores `QKᵀ/√d_k` before masking, `[b, H, s, t]`.
    pub scores: Tensor<B, 4>,
    /// Attention matrix after the causal softmax (and gap removal, if on), `[b, H, s, t]`.
    pub probs: Tensor<B, 4>,
}

impl<B: Backend> AttentionMaps<B> {
    /// The maps of raw scores `QKᵀ` `[b, H, s, t]` taken through a softmax with `scale`.
    fn new(raw_scores: Tensor<B, 4>, scale: f64, probs: Tensor<B, 4>) -> Self {
        Self {
            scores: raw_scores.mul_scalar(scale),
            probs,
        }
    }
}

/// Causal softmax over the last axis of `scale · scores` (`scores` `[b, H, s, t]`, `scale`
/// the `1/√d_k` of `QKᵀ/√d_k`, applied inside the softmax: the scaled scores are never
/// written out) for queries at positions `offset..offset+s` and keys `0..t`
/// (`t = offset + s`), and, with `gap_removed`, the
/// subtraction of each row's uniform distribution over its visible keys: row `i` becomes
/// `A_i − 1_{j≤offset+i}/(offset+i+1)`, which sums to 0 (the causal analogue of
/// `A − 1ₙₙ/n`, seed 002 eq. 9).
pub fn causal_probs<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f64,
    offset: usize,
    gap_removed: bool,
) -> Tensor<B, 4> {
    let [_, _, s, t] = scores.dims();
    let device = scores.device();
    let probs = crate::fused::causal_softmax(scores, offset, scale);
    if !gap_removed {
        return probs;
    }
    let mask = Tensor::<B, 2, Bool>::tril_mask([s, t], offset as i64, &device);
    let visible = Tensor::<B, 2>::ones([s, t], &device).mask_fill(mask, 0.0);
    let counts = Tensor::<B, 1, Int>::arange((offset as i64 + 1)..(offset + s) as i64 + 1, &device)
        .float()
        .reshape([s, 1]);
    probs - (visible / counts).unsqueeze::<4>()
}

fn linear<B: Backend>(d_in: usize, d_out: usize, std: f64, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// `[b, s, H·w] → [b, H, s, w]`.
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, hw] = x.dims();
    x.reshape([b, s, heads, hw / heads]).swap_dims(1, 2)
}

/// The two column blocks of a per-head weight `[r, H·(w₀ + w₁)]` whose columns are, head by
/// head, `w₀` then `w₁` (DeepSeek-V2's `kv_b_proj`: key then value) → `[r, H·w₀]` and
/// `[r, H·w₁]`, each in head order. Weight-sized copies only.
fn head_column_blocks<B: Backend>(
    w: Tensor<B, 2>,
    heads: usize,
    widths: [usize; 2],
) -> [Tensor<B, 2>; 2] {
    let [r, _] = w.dims();
    let [w0, w1] = widths;
    let per_head = w.reshape([r, heads, w0 + w1]);
    [
        per_head
            .clone()
            .slice([0..r, 0..heads, 0..w0])
            .reshape([r, heads * w0]),
        per_head
            .slice([0..r, 0..heads, w0..w0 + w1])
            .reshape([r, heads * w1]),
    ]
}

/// `[b, H, s, w] → [b, s, H·w]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, w] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * w])
}

/// Standard multi-head attention with rotary embeddings (HF LLaMA pairing) on every head.
#[derive(Module, Debug)]
pub struct Mha<B: Backend> {
    /// `q_proj` (burn layout `[d, H·d_h]`).
    pub wq: Linear<B>,
    /// `k_proj`.
    pub wk: Linear<B>,
    /// `v_proj`.
    pub wv: Linear<B>,
    /// `o_proj` (`[H·d_h, d]`).
    pub wo: Linear<B>,
    rope: Option<Rope<B>>,
    n_heads: usize,
    head_dim: usize,
    gap_removed: bool,
}

impl<B: Backend> Mha<B> {
    fn new(c: &AttentionConfig, device: &B::Device) -> Self {
        let (d, h, hd) = (c.d_model, c.n_heads, c.head_dim);
        Self {
            wq: linear(d, h * hd, c.init_std, device),
            wk: linear(d, h * hd, c.init_std, device),
            wv: linear(d, h * c.value_width(), c.init_std, device),
            wo: linear(h * c.value_width(), d, c.init_std, device),
            rope: c
                .rope
                .then(|| Rope::new(hd, c.max_seq_len, c.rope_theta, RopePairing::Half, device)),
            n_heads: h,
            head_dim: hd,
            gap_removed: c.gap_removed,
        }
    }

    /// `x` `[b, s, d]` at positions `offset..offset+s` → `[b, s, d]` (and the maps).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
        cache: Option<&mut LayerCache<B>>,
        want_maps: bool,
    ) -> (Tensor<B, 3>, Option<AttentionMaps<B>>) {
        let mut q = split_heads(linear_layer(&self.wq, x.clone()), self.n_heads);
        let mut k = split_heads(linear_layer(&self.wk, x.clone()), self.n_heads);
        let mut v = split_heads(linear_layer(&self.wv, x), self.n_heads);
        if let Some(rope) = &self.rope {
            q = rope.apply(q, offset);
            k = rope.apply(k, offset);
        }
        if let Some(cache) = cache {
            k = cache.append_keys(k);
            v = cache.append_values(v);
        }
        let scores = crate::fused::attention_scores(q, k);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let probs = causal_probs(scores.clone(), scale, offset, self.gap_removed);
        let out = linear_layer(&self.wo, merge_heads(probs.clone().matmul(v)));
        (
            out,
            want_maps.then(|| AttentionMaps::new(scores, scale, probs)),
        )
    }
}

/// Multi-head latent attention, both variants, in DeepSeek-V2's layout:
///
/// * `c_q = norm(W_dq x)` (`q_a_proj`, `q_a_layernorm`), `q = W_uq c_q` (`q_b_proj`), per head
///   `[nope | rope]` (rope width 0 for PreRoPE);
/// * `[c_kv | k_pe] = W_dkv x` (`kv_a_proj_with_mqa`), `c_kv ← norm(c_kv)`
///   (`kv_a_layernorm`), `[k_nope | v] = W_ukv c_kv` per head (`kv_b_proj`);
/// * Decoupled: `q_pe` per head and the one shared `k_pe` are rotated (DeepSeek's
///   interleaved pairing), scores `(q_nope·k_nope + q_pe·k_pe)/√(d_h + d_r)`;
/// * PreRoPE (latent placement): `c_q` and the keys' `c_kv` are rotated before the
///   up-projection, values use the unrotated `c_kv`; (input placement): `x` is rotated
///   before the down-projections, for queries and keys.
#[derive(Module, Debug)]
pub struct Mla<B: Backend> {
    /// `q_a_proj` (`[d, r_q]` in burn's layout).
    pub q_down: Linear<B>,
    /// `q_a_layernorm`.
    pub q_norm: Option<RmsNorm<B>>,
    /// `q_b_proj` (`[r_q, H·(d_h + d_r)]`).
    pub q_up: Linear<B>,
    /// `kv_a_proj_with_mqa` (`[d, r_kv + d_r]`).
    pub kv_down: Linear<B>,
    /// `kv_a_layernorm`.
    pub kv_norm: Option<RmsNorm<B>>,
    /// `kv_b_proj` (`[r_kv, H·(d_h + d_v)]`).
    pub kv_up: Linear<B>,
    /// `o_proj` (`[H·d_v, d]`).
    pub wo: Linear<B>,
    rope_q: Option<Rope<B>>,
    rope_kv: Option<Rope<B>>,
    rope_pe: Option<Rope<B>>,
    /// `rope_pe`'s rotation over whole query heads `[q_nope | q_pe]` (the nope part fixed).
    rope_q_head: Option<Rope<B>>,
    variant: AttentionVariant,
    placement: PreRopePlacement,
    n_heads: usize,
    nope: usize,
    rope_dim: usize,
    value_dim: usize,
    kv_latent: usize,
    gap_removed: bool,
}

impl<B: Backend> Mla<B> {
    fn new(c: &AttentionConfig, device: &B::Device) -> Self {
        let (d, h, hd, dv) = (c.d_model, c.n_heads, c.head_dim, c.value_width());
        let (rq, rkv) = (c.q_latent_width(), c.kv_latent_width());
        let decoupled = c.variant == AttentionVariant::MlaDecoupled;
        let rope_dim = if decoupled { c.rope_dim } else { 0 };
        let norm = |w: usize| {
            c.latent_norm
                .then(|| RmsNormConfig::new(w).with_epsilon(c.norm_eps).init(device))
        };
        let prerope = c.variant == AttentionVariant::MlaPreRope && c.rope;
        let rope = |w: usize, pairing| Rope::new(w, c.max_seq_len, c.rope_theta, pairing, device);
        let (rope_q, rope_kv) = match (prerope, c.prerope_placement) {
            (false, _) => (None, None),
            (true, PreRopePlacement::Latent) => (
                Some(rope(rq, RopePairing::Half)),
                Some(rope(rkv, RopePairing::Half)),
            ),
            (true, PreRopePlacement::Input) => (Some(rope(d, RopePairing::Half)), None),
        };
        Self {
            q_down: linear(d, rq, c.init_std, device),
            q_norm: norm(rq),
            q_up: linear(rq, h * (hd + rope_dim), c.init_std, device),
            kv_down: linear(d, rkv + rope_dim, c.init_std, device),
            kv_norm: norm(rkv),
            kv_up: linear(rkv, h * (hd + dv), c.init_std, device),
            wo: linear(h * dv, d, c.init_std, device),
            rope_q,
            rope_kv,
            rope_pe: (decoupled && c.rope).then(|| rope(c.rope_dim, RopePairing::Interleaved)),
            rope_q_head: (decoupled && c.rope).then(|| {
                Rope::interleaved_after(hd, c.rope_dim, c.max_seq_len, c.rope_theta, device)
            }),
            variant: c.variant,
            placement: c.prerope_placement,
            n_heads: h,
            nope: hd,
            rope_dim,
            value_dim: dv,
            kv_latent: rkv,
            gap_removed: c.gap_removed,
        }
    }

    fn norm_q(&self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.q_norm {
            Some(n) => crate::fused::rms_norm(n, c),
            None => c,
        }
    }

    fn norm_kv(&self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.kv_norm {
            Some(n) => crate::fused::rms_norm(n, c),
            None => c,
        }
    }

    fn input_rotation(&self) -> bool {
        self.placement == PreRopePlacement::Input && self.rope_q.is_some() && self.rope_kv.is_none()
    }

    /// The query latent `c_q` `[b, s, r_q]` (rotated for PreRoPE) and, for the new tokens,
    /// the key latent (rotated for PreRoPE), the value latent, and the decoupled rotary key
    /// `k_pe` `[b, 1, s, d_r]` — before any caching.
    #[allow(clippy::type_complexity)]
    fn latents(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
    ) -> (
        Tensor<B, 3>,
        Tensor<B, 3>,
        Tensor<B, 3>,
        Option<Tensor<B, 4>>,
    ) {
        let [b, s, _] = x.dims();
        let rkv = self.kv_latent;
        if self.input_rotation() {
            let rope = self.rope_q.as_ref().expect("input rotation has a table");
            let xr = rope.apply3(x.clone(), offset);
            let c_q = self.norm_q(linear_layer(&self.q_down, xr.clone()));
            let c_key = self.norm_kv(linear_layer(&self.kv_down, xr));
            let c_value = self.norm_kv(linear_layer(&self.kv_down, x));
            return (c_q, c_key, c_value, None);
        }
        let mut c_q = self.norm_q(linear_layer(&self.q_down, x.clone()));
        if let Some(rope) = &self.rope_q {
            c_q = rope.apply3(c_q, offset);
        }
        let kv = linear_layer(&self.kv_down, x);
        // The latent and the rotary key are blocks of columns of one product (`fused::columns`:
        // views where the backend makes them, their gradients written into one).
        let c_kv = self.norm_kv(crate::fused::columns(kv.clone(), 0..rkv));
        let k_pe = (self.rope_dim > 0).then(|| {
            let dr = self.rope_dim;
            let pe = crate::fused::columns(kv, rkv..rkv + dr).reshape([b, 1, s, dr]);
            match &self.rope_pe {
                Some(rope) => rope.apply(pe, offset),
                None => pe,
            }
        });
        let c_key = match &self.rope_kv {
            Some(rope) => rope.apply3(c_kv.clone(), offset),
            None => c_kv.clone(),
        };
        (c_q, c_key, c_kv, k_pe)
    }

    /// Appends the new latents to the cache and returns the full ones. With latent-placement
    /// PreRoPE only the unrotated latent is cached and the keys' rotation is recomputed from
    /// the positions.
    #[allow(clippy::type_complexity)]
    fn cached_latents(
        &self,
        c_key: Tensor<B, 3>,
        c_value: Tensor<B, 3>,
        k_pe: Option<Tensor<B, 4>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let Some(cache) = cache else {
            return (c_key, c_value, k_pe);
        };
        let c_value = cache.append_latent(c_value);
        let k_pe = k_pe.map(|pe| cache.append_rope_key(pe));
        let c_key = if self.input_rotation() {
            cache.append_rotated_latent(c_key)
        } else if let Some(rope) = &self.rope_kv {
            rope.apply3(c_value.clone(), 0)
        } else {
            c_value.clone()
        };
        (c_key, c_value, k_pe)
    }

    /// The plain path: up-project keys and values for every cached token.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
        cache: Option<&mut LayerCache<B>>,
        want_maps: bool,
    ) -> (Tensor<B, 3>, Option<AttentionMaps<B>>) {
        let (h, hd, dv) = (self.n_heads, self.nope, self.value_dim);
        let (c_q, c_key, c_value, k_pe) = self.latents(x, offset);
        let (c_key, c_value, k_pe) = self.cached_latents(c_key, c_value, k_pe, cache);
        let q = split_heads(linear_layer(&self.q_up, c_q), h); // [b, H, s, hd + dr]
        // Keys and values each from their own columns of `kv_up` (two products, from the
        // rotated latent for keys where PreRoPE rotated it): no value columns are computed
        // only to be dropped, no activation-sized slice (nor its slice-assign into zeros in
        // the backward), and both come out contiguous, so `P·V` writes its output in the
        // heads' order and `merge_heads` is a view (docs/performance.md).
        let [w_k, w_v] = head_column_blocks(self.kv_up.weight.val(), h, [hd, dv]);
        let k_nope = split_heads(crate::fused::linear(c_key, w_k), h); // [b, H, t, hd]
        let v = split_heads(crate::fused::linear(c_value, w_v), h); // [b, H, t, dv]
        let scores = match (k_pe, self.rope_dim) {
            (Some(pe), dr) if dr > 0 => {
                // One product over whole heads, `[q_nope | rope(q_pe)]·[k_nope | k_pe]ᵀ`, the
                // shared `k_pe` repeated for every head: both operands contiguous, so one
                // strided batch, where `q_nope·k_nopeᵀ + q_pe·k_peᵀ` took two products over
                // strided views (host loops of calls), a score-sized sum, and slices of `q`
                // (docs/performance.md).
                let q = match &self.rope_q_head {
                    Some(rope) => rope.apply(q, offset),
                    None => q,
                };
                let keys = crate::fused::shared_suffix(k_nope, pe); // [b, H, t, hd + dr]
                crate::fused::attention_scores(q, keys)
            }
            _ => crate::fused::attention_scores(q, k_nope),
        };
        let scale = 1.0 / ((hd + self.rope_dim) as f64).sqrt();
        let probs = causal_probs(scores.clone(), scale, offset, self.gap_removed);
        let out = linear_layer(&self.wo, merge_heads(probs.clone().matmul(v)));
        (
            out,
            want_maps.then(|| AttentionMaps::new(scores, scale, probs)),
        )
    }

    /// The absorbed path (DeepSeek-V2 inference): `W_uk` is folded into the query
    /// (`q̃_h = W_uk,hᵀ q_h`, scores `q̃_h·c_kv`) and `W_uv` into the output
    /// (`o_h = W_uv,h (A c_kv)`), so keys and values are never up-projected and the cache
    /// holds only latents. Same result as [`Mla::forward`] up to rounding.
    fn forward_absorbed(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let (h, hd, dv, rkv) = (self.n_heads, self.nope, self.value_dim, self.kv_latent);
        let (c_q, c_key, c_value, k_pe) = self.latents(x, offset);
        let (c_key, c_value, k_pe) = self.cached_latents(c_key, c_value, k_pe, cache);
        let [b, t, _] = c_value.dims();
        let q = split_heads(linear_layer(&self.q_up, c_q), h);
        let s = q.dims()[2];
        // kv_up weight [r_kv, H·(hd + dv)] → per head [1, H, r_kv, hd] and [1, H, r_kv, dv].
        let [w_k, w_v] = head_column_blocks(self.kv_up.weight.val(), h, [hd, dv]);
        let w_uk = w_k.reshape([rkv, h, hd]).swap_dims(0, 1).unsqueeze::<4>();
        let w_uv = w_v.reshape([rkv, h, dv]).swap_dims(0, 1).unsqueeze::<4>();
        let q_nope = q.clone().slice([0..b, 0..h, 0..s, 0..hd]);
        let q_latent = q_nope.matmul(w_uk.transpose()); // [b, H, s, r_kv]
        let keys = c_key.reshape([b, 1, t, rkv]);
        let mut scores = q_latent.matmul(keys.transpose());
        if let (Some(pe), dr) = (k_pe, self.rope_dim)
            && dr > 0
        {
            let q_pe = q.slice([0..b, 0..h, 0..s, hd..hd + dr]);
            let q_pe = match &self.rope_pe {
                Some(rope) => rope.apply(q_pe, offset),
                None => q_pe,
            };
            scores = scores + q_pe.matmul(pe.transpose());
        }
        let scale = 1.0 / ((hd + self.rope_dim) as f64).sqrt();
        let probs = causal_probs(scores, scale, offset, self.gap_removed);
        let latent_out = probs.matmul(c_value.reshape([b, 1, t, rkv])); // [b, H, s, r_kv]
        linear_layer(&self.wo, merge_heads(latent_out.matmul(w_uv)))
    }
}

/// One attention layer of any variant.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Attention<B: Backend> {
    /// MHA.
    Mha(Mha<B>),
    /// MLA-PreRoPE or MLA-Decoupled.
    Mla(Mla<B>),
}

impl AttentionConfig {
    /// Builds the layer (after [`AttentionConfig::validate`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Attention<B>, crate::ModelError> {
        self.validate()?;
        let attention = match self.variant {
            AttentionVariant::Mha => Attention::Mha(Mha::new(self, device)),
            _ => Attention::Mla(Mla::new(self, device)),
        };
        crate::materialize(&attention);
        Ok(attention)
    }
}

impl<B: Backend> Attention<B> {
    /// `x` `[b, s, d]` at positions `offset..offset+s` → `[b, s, d]`; with a cache, the new
    /// keys/values (or latents) are appended and attend to everything cached.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        match self {
            Attention::Mha(a) => a.forward(x, offset, cache, false).0,
            Attention::Mla(a) => a.forward(x, offset, cache, false).0,
        }
    }

    /// Like [`Attention::forward`] from position 0 without a cache, also returning the
    /// scores and probabilities `[b, H, s, s]`.
    pub fn forward_with_maps(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, AttentionMaps<B>) {
        let (out, maps) = match self {
            Attention::Mha(a) => a.forward(x, 0, None, true),
            Attention::Mla(a) => a.forward(x, 0, None, true),
        };
        (out, maps.expect("maps were asked for"))
    }

    /// MLA's absorbed-matrix inference path (MHA: the plain path).
    pub fn forward_absorbed(
        &self,
        x: Tensor<B, 3>,
        offset: usize,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        match self {
            Attention::Mha(a) => a.forward(x, offset, cache, false).0,
            Attention::Mla(a) => a.forward_absorbed(x, offset, cache),
        }
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        match self {
            Attention::Mha(a) => a.n_heads,
            Attention::Mla(a) => a.n_heads,
        }
    }
}
