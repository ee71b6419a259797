//! Key/value caches for incremental decoding.

use burn::prelude::*;

/// What one layer keeps between decoding steps. MHA fills `keys` and `values`
/// (`[b, H, t, d_h]`); MLA fills only its `latent` (`[b, t, r_kv]`), plus the shared rotary
/// key `rope_key` (`[b, 1, t, d_r]`, Decoupled) or the rotated latent (PreRoPE with input
/// placement).
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    latent: Option<Tensor<B, 3>>,
    rotated_latent: Option<Tensor<B, 3>>,
    rope_key: Option<Tensor<B, 4>>,
}

fn append4<B: Backend>(
    slot: &mut Option<Tensor<B, 4>>,
    new: Tensor<B, 4>,
    dim: usize,
) -> Tensor<B, 4> {
    let all = match slot.take() {
        Some(old) => Tensor::cat(vec![old, new], dim),
        None => new,
    };
    *slot = Some(all.clone());
    all
}

fn append3<B: Backend>(slot: &mut Option<Tensor<B, 3>>, new: Tensor<B, 3>) -> Tensor<B, 3> {
    let all = match slot.take() {
        Some(old) => Tensor::cat(vec![old, new], 1),
        None => new,
    };
    *slot = Some(all.clone());
    all
}

impl<B: Backend> LayerCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            keys: None,
            values: None,
            latent: None,
            rotated_latent: None,
            rope_key: None,
        }
    }

    pub(crate) fn append_keys(&mut self, k: Tensor<B, 4>) -> Tensor<B, 4> {
        append4(&mut self.keys, k, 2)
    }

    pub(crate) fn append_values(&mut self, v: Tensor<B, 4>) -> Tensor<B, 4> {
        append4(&mut self.values, v, 2)
    }

    pub(crate) fn append_latent(&mut self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        append3(&mut self.latent, c)
    }

    pub(crate) fn append_rotated_latent(&mut self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        append3(&mut self.rotated_latent, c)
    }

    pub(crate) fn append_rope_key(&mut self, k: Tensor<B, 4>) -> Tensor<B, 4> {
        append4(&mut self.rope_key, k, 2)
    }

    /// Cached tokens.
    pub fn len(&self) -> usize {
        self.keys
            .as_ref()
            .map(|k| k.dims()[2])
            .or_else(|| self.latent.as_ref().map(|c| c.dims()[1]))
            .unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values stored per cached token and batch element, counted from the tensors held.
    pub fn values_per_token(&self) -> usize {
        let t = self.len();
        if t == 0 {
            return 0;
        }
        let per4 = |x: &Option<Tensor<B, 4>>| x.as_ref().map_or(0, |x| x.dims()[1] * x.dims()[3]);
        let per3 = |x: &Option<Tensor<B, 3>>| x.as_ref().map_or(0, |x| x.dims()[2]);
        per4(&self.keys)
            + per4(&self.values)
            + per3(&self.latent)
            + per3(&self.rotated_latent)
            + per4(&self.rope_key)
    }
}
