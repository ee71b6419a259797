//! The attention-only single-head model of seed 002 (*Mind the Gap*, eq. 3 and A.3.1):
//! `X_ℓ = A_ℓ X_{ℓ−1} W_ℓ^V W_ℓ^O`, optionally `+ X_{ℓ−1}` (skip) and followed by LayerNorm,
//! with the attention `A_ℓ` one of
//!
//! * **key–query**: `softmax(X W_Q W_Kᵀ Xᵀ / √d)` row-wise, `W_Q, W_K` i.i.d. `N(0, 1)`
//!   (Prop 1: a Random Markov matrix for isometric `X`) or Xavier `N(0, 1/d)` (degenerate,
//!   near-uniform attention);
//! * **Random Markov**: `softmax(L)` with trainable logits `L` drawn `N(0, s²)`,
//!   `s² = ln(1 + σ²)` so that the Random Markov variance is `σ²` (rmt-core's
//!   `EntryDistribution::softmax_with_variance`);
//! * **identity**: a trainable matrix equal to `I` at initialisation.
//!
//! With `gap_removed`, `A` is replaced by `A − 1ₙₙ/n` at every forward pass (eq. 9). `W^O` is
//! the identity at initialisation (A.3.1). `W^V` has i.i.d. `N(0, σ_W²)` entries, `σ_W²` from
//! [`ValueScale`].

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// How each layer's attention matrix is produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AttentionInit {
    /// `softmax(X W_Q W_Kᵀ Xᵀ/√d)`; `xavier` draws `W_Q, W_K` from `N(0, 1/d)` instead of `N(0, 1)`.
    KeyQuery {
        /// Xavier scaling of the key/query weights.
        xavier: bool,
    },
    /// A trainable Random Markov matrix `softmax(L)` of variance `σ²` at initialisation.
    RandomMarkov {
        /// Random Markov variance `σ²` (at mean 1).
        sigma2: f64,
    },
    /// A trainable matrix initialised to the identity.
    Identity,
}

/// The variance `σ_W²` of the value weights. The text of seed 002 available here lost its
/// equations; the theory's natural scale is `Unit` (it compensates the `1/√n` bulk of `A`,
/// so the covariance mean `(σ²σ_W²/γ)^ℓ` of Prop 7 is `O(1)`), and the paper's scaling
/// discussion contrasts it with smaller ones — all three are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueScale {
    /// `σ_W² = 1`.
    Unit,
    /// `σ_W² = 1/√n`.
    InvSqrtN,
    /// `σ_W² = 1/n` (He-like).
    InvN,
}

impl ValueScale {
    /// `σ_W²` for `n` tokens.
    pub fn variance(&self, n: usize) -> f64 {
        match self {
            ValueScale::Unit => 1.0,
            ValueScale::InvSqrtN => 1.0 / (n as f64).sqrt(),
            ValueScale::InvN => 1.0 / n as f64,
        }
    }
}

/// The model's configuration.
#[derive(Config, Debug, PartialEq)]
pub struct AttentionOnlyConfig {
    /// Tokens `n`.
    pub n_tokens: usize,
    /// Width `d`.
    pub d: usize,
    /// Layers `L`.
    pub depth: usize,
    /// Attention of every layer.
    pub attention: AttentionInit,
    /// Residual connection `X_ℓ = X_{ℓ−1} + A X W^V W^O`.
    #[config(default = false)]
    pub skip: bool,
    /// LayerNorm after each layer (after the skip).
    #[config(default = false)]
    pub layer_norm: bool,
    /// Replace `A` by `A − 1ₙₙ/n`.
    #[config(default = false)]
    pub gap_removed: bool,
    /// Value-weight variance.
    #[config(default = "ValueScale::Unit")]
    pub value_scale: ValueScale,
    /// Seed of the initialisation (a `Pcg64` stream, so runs are reproducible on any backend).
    #[config(default = 0)]
    pub seed: u64,
}

/// One layer.
#[derive(Module, Debug)]
pub struct AttentionOnlyLayer<B: Backend> {
    /// `W_Q` (`[d, d]`), key–query attention only.
    pub query: Option<Param<Tensor<B, 2>>>,
    /// `W_K` (`[d, d]`), key–query attention only.
    pub key: Option<Param<Tensor<B, 2>>>,
    /// Logits `L` of a Random Markov attention, or the identity-initialised matrix (`[n, n]`).
    pub matrix: Option<Param<Tensor<B, 2>>>,
    /// `W^V` (`[d, d]`).
    pub value: Param<Tensor<B, 2>>,
    /// `W^O` (`[d, d]`, identity at initialisation).
    pub output: Param<Tensor<B, 2>>,
    /// LayerNorm.
    pub norm: Option<LayerNorm<B>>,
    kind: AttentionInit,
    skip: bool,
    gap_removed: bool,
}

/// The stack.
#[derive(Module, Debug)]
pub struct AttentionOnly<B: Backend> {
    /// Layers.
    pub layers: Vec<AttentionOnlyLayer<B>>,
}

fn gaussian<B: Backend>(
    rows: usize,
    cols: usize,
    std: f64,
    rng: &mut rand_pcg::Pcg64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (std * z) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

impl AttentionOnlyConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), crate::ModelError> {
        if self.n_tokens == 0 || self.d == 0 || self.depth == 0 {
            return Err(crate::ModelError::Config(format!(
                "n_tokens {}, d {}, depth {} must all be ≥ 1",
                self.n_tokens, self.d, self.depth
            )));
        }
        if let AttentionInit::RandomMarkov { sigma2 } = self.attention
            && !(sigma2.is_finite() && sigma2 > 0.0)
        {
            return Err(crate::ModelError::Config(format!(
                "Random Markov σ² must be > 0, got {sigma2}"
            )));
        }
        Ok(())
    }

    /// Builds the model.
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<AttentionOnly<B>, crate::ModelError> {
        self.validate()?;
        let (n, d) = (self.n_tokens, self.d);
        let mut rng = rand_pcg::Pcg64::seed_from_u64(self.seed);
        let value_std = self.value_scale.variance(n).sqrt();
        let layers = (0..self.depth)
            .map(|_| {
                let (query, key, matrix) = match self.attention {
                    AttentionInit::KeyQuery { xavier } => {
                        let std = if xavier { 1.0 / (d as f64).sqrt() } else { 1.0 };
                        (
                            Some(Param::from_tensor(gaussian(d, d, std, &mut rng, device))),
                            Some(Param::from_tensor(gaussian(d, d, std, &mut rng, device))),
                            None,
                        )
                    }
                    AttentionInit::RandomMarkov { sigma2 } => {
                        let s = (1.0 + sigma2).ln().sqrt();
                        (
                            None,
                            None,
                            Some(Param::from_tensor(gaussian(n, n, s, &mut rng, device))),
                        )
                    }
                    AttentionInit::Identity => {
                        (None, None, Some(Param::from_tensor(Tensor::eye(n, device))))
                    }
                };
                AttentionOnlyLayer {
                    query,
                    key,
                    matrix,
                    value: Param::from_tensor(gaussian(d, d, value_std, &mut rng, device)),
                    output: Param::from_tensor(Tensor::eye(d, device)),
                    norm: self
                        .layer_norm
                        .then(|| LayerNormConfig::new(d).init(device)),
                    kind: self.attention,
                    skip: self.skip,
                    gap_removed: self.gap_removed,
                }
            })
            .collect();
        let model = AttentionOnly { layers };
        crate::materialize(&model);
        Ok(model)
    }
}

impl<B: Backend> AttentionOnlyLayer<B> {
    /// The attention matrix `[b, n, n]` for input `x` `[b, n, d]` (gap removed if configured).
    pub fn attention(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let a = match self.kind {
            AttentionInit::KeyQuery { .. } => {
                let wq = self
                    .query
                    .as_ref()
                    .expect("key–query layer has W_Q")
                    .val()
                    .unsqueeze::<3>();
                let wk = self
                    .key
                    .as_ref()
                    .expect("key–query layer has W_K")
                    .val()
                    .unsqueeze::<3>();
                let q = x.clone().matmul(wq);
                let k = x.matmul(wk);
                softmax(q.matmul(k.transpose()).div_scalar((d as f64).sqrt()), 2)
            }
            AttentionInit::RandomMarkov { .. } => {
                let l = self
                    .matrix
                    .as_ref()
                    .expect("Random Markov layer has logits")
                    .val();
                softmax(l, 1).unsqueeze::<3>().expand([b as i64, -1, -1])
            }
            AttentionInit::Identity => self
                .matrix
                .as_ref()
                .expect("identity layer has a matrix")
                .val()
                .unsqueeze::<3>()
                .expand([b as i64, -1, -1]),
        };
        if self.gap_removed {
            a.sub_scalar(1.0 / n as f64)
        } else {
            a
        }
    }

    /// `x` `[b, n, d]` → `[b, n, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = self.attention(x.clone());
        let w = self.value.val().matmul(self.output.val()).unsqueeze::<3>();
        let mut y = a.matmul(x.clone()).matmul(w);
        if self.skip {
            y = y + x;
        }
        match &self.norm {
            Some(norm) => norm.forward(y),
            None => y,
        }
    }
}

impl<B: Backend> AttentionOnly<B> {
    /// `x` `[b, n, d]` → `X_L`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layers.iter().fold(x, |x, layer| layer.forward(x))
    }

    /// Every layer's output `X_1 … X_L` (for rank-collapse measurements).
    pub fn forward_all(&self, x: Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let mut out = Vec::with_capacity(self.layers.len());
        let mut h = x;
        for layer in &self.layers {
            h = layer.forward(h);
            out.push(h.clone());
        }
        out
    }
}
