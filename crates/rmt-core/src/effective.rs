//! Effective query/key weights of one attention layer (DESIGN.md, "Definitions").
//!
//! Given a layer's projection weights in PyTorch/HF layout (row-major `[out, in]`, `f32`),
//! forms `Q, K ∈ ℝ^{m×d}` with rows grouped by head so that `Q_hK_hᵀ` is exactly the bilinear
//! form head `h` uses:
//!
//! * MHA / GQA (`q_proj`, `k_proj`): `Q = W_q`; each key head is repeated for the `H/H_kv`
//!   query heads of its group.
//! * MLA (DeepSeek-V2 layout): `Q = W_qb·diag(g_q)·W_qa` (or `q_proj` without query
//!   compression); head `h`'s key rows are its `d_nope` rows of `W_kb·diag(g_kv)·W_kva[latent]`
//!   followed by the shared rotary rows `W_kva[rope]` (repeated in every head). A latent
//!   RMSNorm's gain enters as `diag(g)`; its per-token `1/rms` is left out (it scales a whole
//!   row of scores).
//!
//! The safetensors reader (`checkpoint`, behind the feature of that name) and attn-models'
//! `EffectiveQk` both go through these functions.

use crate::diagnostics::{
    DiagnosticsConfig, Factorization, LayerDiagnostics, diagnose_layer_in_basis,
};
use crate::error::{Result, RmtError};
use crate::linalg::{Element, row_major_view};
use faer::{Accum, MatRef};
use serde::{Deserialize, Serialize};

/// How a layer's attention is parametrised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttentionKind {
    /// Separate query and key projections (MHA, or GQA when `kv_heads < heads`).
    Mha {
        /// Query heads `H`.
        heads: usize,
        /// Key/value heads `H_kv`.
        kv_heads: usize,
        /// Head width `d_h`.
        head_dim: usize,
    },
    /// Multi-head latent attention (DeepSeek-V2 layout).
    Mla {
        /// Heads `H`.
        heads: usize,
        /// Query latent width `r_q` (`None`: no query compression).
        q_latent: Option<usize>,
        /// Key/value latent width `r_kv`.
        kv_latent: usize,
        /// Per-head non-rotary query/key width.
        nope_dim: usize,
        /// Rotary width shared by all heads (0: none, e.g. MLA-PreRoPE).
        rope_dim: usize,
    },
}

impl AttentionKind {
    /// MHA/GQA: the `k_proj` row behind each of the `H·d_h` effective key rows (query head
    /// `h` uses key head `h / (H/H_kv)`); `None` for MLA.
    ///
    /// # Example
    /// ```
    /// use rmt_core::effective::AttentionKind;
    /// let gqa = AttentionKind::Mha { heads: 4, kv_heads: 2, head_dim: 1 };
    /// assert_eq!(gqa.key_rows(), Some(vec![0, 0, 1, 1]));
    /// ```
    pub fn key_rows(&self) -> Option<Vec<usize>> {
        match *self {
            AttentionKind::Mha {
                heads,
                kv_heads,
                head_dim,
            } => {
                let group = heads / kv_heads.max(1);
                Some(
                    (0..heads)
                        .flat_map(|h| {
                            let kh = h / group.max(1);
                            kh * head_dim..(kh + 1) * head_dim
                        })
                        .collect(),
                )
            }
            AttentionKind::Mla { .. } => None,
        }
    }

    /// Number of query heads.
    pub fn heads(&self) -> usize {
        match self {
            AttentionKind::Mha { heads, .. } | AttentionKind::Mla { heads, .. } => *heads,
        }
    }
}

/// One layer's effective `Q, K ∈ ℝ^{m×d}` (row-major), ready to diagnose.
#[derive(Debug, Clone)]
pub struct AttentionLayer {
    /// The layer number `N` (`layers.N.`, `h.N.`).
    pub index: usize,
    /// The parametrisation found.
    pub kind: AttentionKind,
    /// `m = H·d_k` rows.
    pub rows: usize,
    /// Model width `d`.
    pub width: usize,
    /// Effective query weights, row-major `[m, d]`.
    pub q: Vec<f32>,
    /// Effective key weights, row-major `[m, d]`.
    pub k: Vec<f32>,
    /// Factor shapes of `M = QKᵀ` for the product null.
    pub factorization: Factorization,
    /// The same `M` from narrower factors, when the keys span fewer than `d` dimensions
    /// (MLA, GQA); [`AttentionLayer::diagnose`] uses it.
    pub key_basis: Option<KeyBasis>,
}

/// `Q, K` in a basis of the key space: with `K = CB`, `B ∈ ℝ^{b×d}`, the factors
/// `Q̃ = QBᵀ` and `K̃ = C` (`m × b`) give the same `M = QKᵀ = Q̃K̃ᵀ`. For MLA, `B` is
/// `kv_a_proj_with_mqa` (`b = r_kv + d_rope`): head `h`'s key rows are
/// `[W_kb,h·diag(g_kv) | 0]·B` (content) and `[0 | I]·B` (rotary). For GQA, `B` is `k_proj`
/// (`b = H_kv·d_h`) and each effective key row is a unit row of `C` (when `b < d`).
#[derive(Debug, Clone)]
pub struct KeyBasis {
    /// `b`.
    pub dim: usize,
    /// `Q̃ = QBᵀ`, row-major `[m, b]`.
    pub q: Vec<f32>,
    /// `K̃ = C`, row-major `[m, b]`.
    pub k: Vec<f32>,
}

impl AttentionLayer {
    /// The `m × b` factors `Q̃, K̃` of `M` the diagnostics read, and `b`: the key basis when
    /// there is one, else `Q, K` (`b = d`). [`LayerFactors`] holds the same.
    pub fn factors(&self) -> (&[f32], &[f32], usize) {
        match &self.key_basis {
            Some(basis) => (&basis.q, &basis.k, basis.dim),
            None => (&self.q, &self.k, self.width),
        }
    }

    /// Diagnoses this layer (whole layer, and per head if `config.per_head`), through its
    /// [`KeyBasis`] when it has one (the same `M`, formed from `b` columns instead of `d`;
    /// [`diagnose_layer_in_basis`]).
    pub fn diagnose(&self, config: &DiagnosticsConfig) -> Result<LayerDiagnostics> {
        let (q, k, b) = self.factors();
        diagnose_factors(
            q,
            k,
            b,
            self.rows,
            self.width,
            &self.kind,
            &self.factorization,
            config,
        )
    }
}

/// One layer's `M = QKᵀ` as the diagnostics read it: two `m × b` factors `Q̃, K̃` with
/// `M = Q̃K̃ᵀ` — a [`KeyBasis`] of the key space when the keys span `b < d` dimensions (MLA,
/// GQA), else `Q, K` themselves (`B = I`, `b = d`). Unlike [`AttentionLayer`] it need not
/// hold the `d`-wide `Q, K`: [`mla_factors`] forms a DeepSeek-V3 layer's (`m × 576`) without
/// its `24 576 × 7 168` `Q` and `K`.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    /// The layer number `N` (`layers.N.`, `h.N.`).
    pub index: usize,
    /// The parametrisation found.
    pub kind: AttentionKind,
    /// `m = H·d_k` rows.
    pub rows: usize,
    /// Model width `d`.
    pub width: usize,
    /// Factor shapes of `M = QKᵀ` for the product null.
    pub factorization: Factorization,
    /// `Q̃, K̃ ∈ ℝ^{m×b}` (`b = d` with `B = I` when there is no narrower basis).
    pub factors: KeyBasis,
}

impl From<AttentionLayer> for LayerFactors {
    /// The layer's key basis when it has one, else its `d`-wide `Q, K`.
    fn from(layer: AttentionLayer) -> Self {
        let factors = layer.key_basis.unwrap_or(KeyBasis {
            dim: layer.width,
            q: layer.q,
            k: layer.k,
        });
        Self {
            index: layer.index,
            kind: layer.kind,
            rows: layer.rows,
            width: layer.width,
            factorization: layer.factorization,
            factors,
        }
    }
}

impl LayerFactors {
    /// Diagnoses this layer (whole layer, and per head if `config.per_head`): the same
    /// values as [`AttentionLayer::diagnose`] on the layer these factors come from. `M`, `G`
    /// and the reduction run in `f32`, the factors' precision ([`LayerFactors::diagnose_in`]).
    pub fn diagnose(&self, config: &DiagnosticsConfig) -> Result<LayerDiagnostics> {
        self.diagnose_in::<f32>(config)
    }

    /// [`LayerFactors::diagnose`] with `M`, `G` and the reduction in `T` (`f64`: the
    /// factors widened exactly, twice the time). In `f32` an eigenvalue within about
    /// `√m·ε₃₂·λ₁` of `λ₊` (ε₃₂ ≈ 6e-8) can fall on either side of it, changing the outlier
    /// count by one; in `f64` that band is 2²⁹ times narrower.
    pub fn diagnose_in<T: Element>(&self, config: &DiagnosticsConfig) -> Result<LayerDiagnostics> {
        let f = &self.factors;
        diagnose_factors::<T>(
            &in_precision(&f.q),
            &in_precision(&f.k),
            f.dim,
            self.rows,
            self.width,
            &self.kind,
            &self.factorization,
            config,
        )
    }

    /// [`LayerFactors::diagnose_in`] for several layers, in parallel over layers (as
    /// [`crate::diagnostics::diagnose_layers`]); one result per layer, in order.
    pub fn diagnose_all<T: Element>(
        layers: &[LayerFactors],
        config: &DiagnosticsConfig,
    ) -> Vec<Result<LayerDiagnostics>> {
        crate::diagnostics::per_layer_in_parallel(layers, |layer| layer.diagnose_in::<T>(config))
    }
}

/// `f32` values in `T`: borrowed when `T` is `f32`, widened exactly into a copy otherwise.
#[allow(clippy::ptr_arg)] // `Vec<f32>`, not `[f32]`, is what `Any` can name.
fn in_precision<T: Element>(x: &Vec<f32>) -> std::borrow::Cow<'_, [T]> {
    match (x as &dyn std::any::Any).downcast_ref::<Vec<T>>() {
        Some(same) => std::borrow::Cow::Borrowed(same),
        None => std::borrow::Cow::Owned(x.iter().map(|&v| T::from_f64(f64::from(v))).collect()),
    }
}

/// [`diagnose_layer_in_basis`] on row-major `m × b` factors of a layer of width `d`.
#[allow(clippy::too_many_arguments)]
fn diagnose_factors<T: Element>(
    q: &[T],
    k: &[T],
    b: usize,
    rows: usize,
    width: usize,
    kind: &AttentionKind,
    factorization: &Factorization,
    config: &DiagnosticsConfig,
) -> Result<LayerDiagnostics> {
    let q = row_major_view(q, rows, b)?;
    let k = row_major_view(k, rows, b)?;
    diagnose_layer_in_basis(q, k, width, kind.heads(), config, Some(factorization))
}

/// A row-major `f32` matrix `[rows, cols]` in PyTorch's `Linear.weight` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMajor {
    /// `rows·cols` values, row after row.
    pub data: Vec<f32>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl RowMajor {
    /// Checks `data.len() == rows·cols`.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(err(format!(
                "{} values cannot form a {rows}×{cols} matrix",
                data.len()
            )));
        }
        Ok(Self { data, rows, cols })
    }
}

/// The weights of one MLA layer (DeepSeek-V2 names in the comments).
#[derive(Debug, Clone)]
pub struct MlaWeights {
    /// `q_a_proj` `[r_q, d]`, with `q_a_layernorm` `[r_q]` (None: no query compression).
    pub q_down: Option<(RowMajor, Option<Vec<f32>>)>,
    /// `q_b_proj` `[H·(d_nope + d_rope), r_q]`, or `q_proj` `[H·(d_nope + d_rope), d]`.
    pub q_up: RowMajor,
    /// `kv_a_proj_with_mqa` `[r_kv + d_rope, d]`.
    pub kv_down: RowMajor,
    /// `kv_a_layernorm` `[r_kv]`.
    pub kv_norm: Option<Vec<f32>>,
    /// `kv_b_proj` `[H·(d_nope + d_v), r_kv]`.
    pub kv_up: RowMajor,
}

fn err(msg: impl Into<String>) -> RmtError {
    RmtError::Checkpoint(msg.into())
}

/// The parametrisation of an MHA/GQA layer read off the shapes of `q_proj` `[H·d_h, d]` and
/// `k_proj` `[H_kv·d_h, d]` (`[rows, cols]` each).
///
/// # Errors
/// Shapes that contradict each other or the head count.
pub fn mha_layout(
    index: usize,
    heads: usize,
    q: [usize; 2],
    k: [usize; 2],
) -> Result<AttentionKind> {
    let [m, d] = q;
    if heads == 0 {
        return Err(err("the head count must be at least 1"));
    }
    if m == 0 || d == 0 {
        return Err(err(format!("layer {index}: q_proj is [{m}, {d}] (empty)")));
    }
    if k[1] != d {
        return Err(err(format!(
            "layer {index}: q_proj is [{m}, {d}] but k_proj is [{}, {}] (widths differ)",
            k[0], k[1]
        )));
    }
    if m % heads != 0 {
        return Err(err(format!(
            "layer {index}: q_proj has {m} rows, not a multiple of {heads} heads"
        )));
    }
    let head_dim = m / heads;
    if k[0] == 0 || !k[0].is_multiple_of(head_dim) || !heads.is_multiple_of(k[0] / head_dim) {
        return Err(err(format!(
            "layer {index}: k_proj has {} rows, not a whole number of {head_dim}-wide heads dividing {heads}",
            k[0]
        )));
    }
    Ok(AttentionKind::Mha {
        heads,
        kv_heads: k[0] / head_dim,
        head_dim,
    })
}

/// Effective `Q, K` of an MHA/GQA layer from `q_proj` `[H·d_h, d]` and `k_proj` `[H_kv·d_h, d]`.
///
/// # Errors
/// Shapes that contradict each other or the head count.
pub fn mha_effective(
    index: usize,
    heads: usize,
    q: RowMajor,
    k: RowMajor,
) -> Result<AttentionLayer> {
    let (m, d) = (q.rows, q.cols);
    let kind = mha_layout(index, heads, [m, d], [k.rows, k.cols])?;
    let rows = kind.key_rows().expect("mha_layout returns an MHA kind");
    let mut k_eff = Vec::with_capacity(m * d);
    for &r in &rows {
        k_eff.extend_from_slice(&k.data[r * d..(r + 1) * d]);
    }
    // GQA: the keys are k_proj's b = H_kv·d_h rows, repeated. B = W_k, each effective key
    // row a unit row of C, and Q̃ = QW_kᵀ.
    let b = k.rows;
    let key_basis = (b < d).then(|| {
        let q_t = scaled_product(&q.data, m, None, row_major(&k.data, b, d).transpose());
        let mut c = vec![0.0f32; m * b];
        for (row, &r) in c.chunks_exact_mut(b).zip(&rows) {
            row[r] = 1.0;
        }
        KeyBasis {
            dim: b,
            q: q_t,
            k: c,
        }
    });
    Ok(AttentionLayer {
        index,
        kind,
        rows: m,
        width: d,
        q: q.data,
        k: k_eff,
        factorization: Factorization::dense(d),
        key_basis,
    })
}

/// The `[rows, cols]` shapes of one MLA layer's weights (lengths for the gains), in
/// [`MlaWeights`]' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaShapes {
    /// `q_a_proj` `[r_q, d]` and the length of `q_a_layernorm` (None: no query compression).
    pub q_down: Option<([usize; 2], Option<usize>)>,
    /// `q_b_proj` or `q_proj`.
    pub q_up: [usize; 2],
    /// `kv_a_proj_with_mqa`.
    pub kv_down: [usize; 2],
    /// Length of `kv_a_layernorm`.
    pub kv_norm: Option<usize>,
    /// `kv_b_proj`.
    pub kv_up: [usize; 2],
}

impl MlaWeights {
    /// The weights' shapes.
    pub fn shapes(&self) -> MlaShapes {
        let shape = |w: &RowMajor| [w.rows, w.cols];
        MlaShapes {
            q_down: self
                .q_down
                .as_ref()
                .map(|(w, g)| (shape(w), g.as_ref().map(Vec::len))),
            q_up: shape(&self.q_up),
            kv_down: shape(&self.kv_down),
            kv_norm: self.kv_norm.as_ref().map(Vec::len),
            kv_up: shape(&self.kv_up),
        }
    }
}

/// What an MLA layer's weight shapes say ([`mla_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlaLayout {
    /// The parametrisation.
    pub kind: AttentionKind,
    /// Factor shapes of `M = QKᵀ` for the product null.
    pub factorization: Factorization,
    /// Key/value latent width `r_kv`.
    pub kv_latent: usize,
    /// Per-head non-rotary query/key width.
    pub nope_dim: usize,
    /// Rotary width shared by all heads.
    pub rope_dim: usize,
}

/// The parametrisation of an MLA layer and the factor shapes of its `M = QKᵀ`, read off the
/// weights' shapes and the head count.
///
/// # Errors
/// Shapes that contradict each other or the head count.
pub fn mla_layout(index: usize, heads: usize, w: &MlaShapes) -> Result<MlaLayout> {
    if heads == 0 {
        return Err(err("the head count must be at least 1"));
    }
    let d = w.kv_down[1];
    if d == 0 || w.q_up[0] == 0 {
        return Err(err(format!(
            "layer {index}: kv_a_proj_with_mqa is [{}, {d}] and the query projection [{}, {}] (empty)",
            w.kv_down[0], w.q_up[0], w.q_up[1]
        )));
    }
    let kv_latent = w.kv_up[1];
    let g_kv = w.kv_norm.unwrap_or(kv_latent);
    if g_kv != kv_latent || w.kv_down[0] < kv_latent {
        return Err(err(format!(
            "layer {index}: kv_b_proj [{}, {}], kv_a_proj_with_mqa [{}, {}] and kv_a_layernorm [{}] disagree on the latent width",
            w.kv_up[0], w.kv_up[1], w.kv_down[0], w.kv_down[1], g_kv
        )));
    }
    let rope = w.kv_down[0] - kv_latent;
    let q_latent = match w.q_down {
        Some((qa, g)) => {
            let g_q = g.unwrap_or(qa[0]);
            if qa[1] != d || w.q_up[1] != qa[0] || g_q != qa[0] {
                return Err(err(format!(
                    "layer {index}: q_a_proj [{}, {}], q_b_proj [{}, {}], q_a_layernorm [{}] and width {d} disagree",
                    qa[0], qa[1], w.q_up[0], w.q_up[1], g_q
                )));
            }
            Some(qa[0])
        }
        None => {
            if w.q_up[1] != d {
                return Err(err(format!(
                    "layer {index}: q_proj [{}, {}] does not match width {d}",
                    w.q_up[0], w.q_up[1]
                )));
            }
            None
        }
    };
    let q_rows = w.q_up[0];
    if !q_rows.is_multiple_of(heads) {
        return Err(err(format!(
            "layer {index}: {q_rows} query rows are not a multiple of {heads} heads"
        )));
    }
    let qk_dim = q_rows / heads;
    if qk_dim < rope {
        return Err(err(format!(
            "layer {index}: query head width {qk_dim} is below the rotary width {rope}"
        )));
    }
    let nope = qk_dim - rope;
    if !w.kv_up[0].is_multiple_of(heads) || w.kv_up[0] / heads < nope {
        return Err(err(format!(
            "layer {index}: kv_b_proj has {} rows, not {heads} heads of ≥ {nope}",
            w.kv_up[0]
        )));
    }
    let mut inner = Vec::new();
    if let Some(r) = q_latent {
        inner.push(r);
    }
    inner.push(d);
    // The rotary key rows enter K outside the latent: the null's inner width counts them
    // (an approximation for MLA-Decoupled, documented in docs/math.md).
    inner.push(kv_latent + rope);
    Ok(MlaLayout {
        kind: AttentionKind::Mla {
            heads,
            q_latent,
            kv_latent,
            nope_dim: nope,
            rope_dim: rope,
        },
        factorization: Factorization { inner },
        kv_latent,
        nope_dim: nope,
        rope_dim: rope,
    })
}

/// Effective `Q, K` of an MLA layer. Every size is read off the shapes and the head count
/// ([`mla_layout`]).
///
/// # Errors
/// Shapes that contradict each other or the head count.
pub fn mla_effective(index: usize, heads: usize, w: MlaWeights) -> Result<AttentionLayer> {
    let parts = MlaParts::new(index, heads, &w)?;
    let (q, k) = parts.dense(&w);
    let key_basis = mla_key_basis(&w, &parts);
    let MlaLayout {
        kind,
        factorization,
        ..
    } = parts.layout;
    Ok(AttentionLayer {
        index,
        kind,
        rows: w.q_up.rows,
        width: w.kv_down.cols,
        q,
        k,
        factorization,
        key_basis,
    })
}

/// An MLA layer's [`LayerFactors`]: its [`KeyBasis`] (`b = r_kv + d_rope`), formed without
/// the `d`-wide `Q, K` of [`mla_effective`], or those when `b ≥ d`. The diagnostics are
/// those of [`mla_effective`]'s layer.
///
/// # Errors
/// Shapes that contradict each other or the head count.
///
/// # Example
/// ```
/// use rmt_core::diagnostics::DiagnosticsConfig;
/// use rmt_core::effective::{MlaWeights, RowMajor, mla_effective, mla_factors};
///
/// // 4 heads, d = 64, r_q = 24, r_kv = 12, d_nope = 8, d_rope = 4, d_v = 8.
/// let w = |rows: usize, cols: usize, seed: usize| {
///     let data = (0..rows * cols).map(|i| ((i * 7919 + seed) % 101) as f32 / 50.0 - 1.0);
///     RowMajor::new(data.collect(), rows, cols).unwrap()
/// };
/// let weights = MlaWeights {
///     q_down: Some((w(24, 64, 1), None)),
///     q_up: w(4 * 12, 24, 2),
///     kv_down: w(12 + 4, 64, 3),
///     kv_norm: None,
///     kv_up: w(4 * (8 + 8), 12, 4),
/// };
/// let factors = mla_factors(0, 4, weights.clone()).unwrap();
/// assert_eq!((factors.rows, factors.width, factors.factors.dim), (48, 64, 16));
/// let config = DiagnosticsConfig::default();
/// let ours = factors.diagnose(&config).unwrap();
/// let dense = mla_effective(0, 4, weights).unwrap().diagnose(&config).unwrap();
/// assert_eq!(ours.layer.trace, dense.layer.trace);
/// ```
pub fn mla_factors(index: usize, heads: usize, w: MlaWeights) -> Result<LayerFactors> {
    let parts = MlaParts::new(index, heads, &w)?;
    let factors = match mla_key_basis(&w, &parts) {
        Some(basis) => basis,
        None => {
            let (q, k) = parts.dense(&w);
            KeyBasis {
                dim: w.kv_down.cols,
                q,
                k,
            }
        }
    };
    let MlaLayout {
        kind,
        factorization,
        ..
    } = parts.layout;
    Ok(LayerFactors {
        index,
        kind,
        rows: w.q_up.rows,
        width: w.kv_down.cols,
        factorization,
        factors,
    })
}

/// What both forms of an MLA layer start from: its layout, the latent gain `g_kv`, and
/// every head's `d_nope` rows of `kv_b_proj`, head after head.
struct MlaParts {
    layout: MlaLayout,
    g_kv: Vec<f32>,
    kb_nope: Vec<f32>,
}

impl MlaParts {
    fn new(index: usize, heads: usize, w: &MlaWeights) -> Result<Self> {
        let layout = mla_layout(index, heads, &w.shapes())?;
        let (kv_latent, nope) = (layout.kv_latent, layout.nope_dim);
        let g_kv = w.kv_norm.clone().unwrap_or_else(|| vec![1.0; kv_latent]);
        let kv_head = w.kv_up.rows / heads; // d_nope + d_v
        let mut kb_nope = Vec::with_capacity(heads * nope * kv_latent);
        for h in 0..heads {
            kb_nope.extend_from_slice(
                &w.kv_up.data[h * kv_head * kv_latent..(h * kv_head + nope) * kv_latent],
            );
        }
        Ok(Self {
            layout,
            g_kv,
            kb_nope,
        })
    }

    /// The `d`-wide effective `Q, K` (row-major `[m, d]`).
    fn dense(&self, w: &MlaWeights) -> (Vec<f32>, Vec<f32>) {
        let MlaLayout {
            kv_latent,
            nope_dim: nope,
            rope_dim: rope,
            ..
        } = self.layout;
        let heads = self.layout.kind.heads();
        let d = w.kv_down.cols;
        let q = match &w.q_down {
            Some((qa, g)) => {
                let g_q = g.clone().unwrap_or_else(|| vec![1.0; qa.rows]);
                scaled_product(
                    &w.q_up.data,
                    w.q_up.rows,
                    Some(&g_q),
                    row_major(&qa.data, qa.rows, d),
                )
            }
            None => w.q_up.data.clone(),
        };
        let k_content = scaled_product(
            &self.kb_nope,
            heads * nope,
            Some(&self.g_kv),
            row_major(&w.kv_down.data[..kv_latent * d], kv_latent, d),
        );
        let rope_rows = &w.kv_down.data[kv_latent * d..];
        debug_assert_eq!(rope_rows.len(), rope * d);
        let mut k = Vec::with_capacity(w.q_up.rows * d);
        for h in 0..heads {
            k.extend_from_slice(&k_content[h * nope * d..(h + 1) * nope * d]);
            k.extend_from_slice(rope_rows);
        }
        (q, k)
    }
}

/// An MLA layer's [`KeyBasis`], `B = kv_a_proj_with_mqa` (`b = r_kv + d_rope` rows), or
/// `None` when `b ≥ d` (no narrower basis). `Q̃ = QBᵀ` is formed from the factors:
/// `W_qb·diag(g_q)·(W_qa·Bᵀ)`, or `W_q·Bᵀ` without query compression.
fn mla_key_basis(w: &MlaWeights, parts: &MlaParts) -> Option<KeyBasis> {
    let (nope, kb_nope, g_kv) = (parts.layout.nope_dim, &parts.kb_nope, &parts.g_kv);
    let (b, d) = (w.kv_down.rows, w.kv_down.cols);
    if b >= d {
        return None;
    }
    let basis_t = row_major(&w.kv_down.data, b, d).transpose();
    let q = match &w.q_down {
        Some((qa, g)) => {
            let qa_bt = scaled_product(&qa.data, qa.rows, None, basis_t);
            let factor = row_major(&qa_bt, qa.rows, b);
            scaled_product(&w.q_up.data, w.q_up.rows, g.as_deref(), factor)
        }
        None => scaled_product(&w.q_up.data, w.q_up.rows, None, basis_t),
    };
    let kv_latent = g_kv.len();
    let rope = b - kv_latent;
    let mut k = vec![0.0f32; w.q_up.rows * b];
    let mut kb_rows = kb_nope.chunks_exact(kv_latent);
    // Head after head: its content rows [W_kb,h·diag(g_kv) | 0], then its rotary rows [0 | I].
    for head in k.chunks_exact_mut((nope + rope) * b) {
        let (content, rotary) = head.split_at_mut(nope * b);
        for row in content.chunks_exact_mut(b) {
            let kb = kb_rows.next().expect("H·d_nope rows of kv_b_proj");
            for ((c, x), g) in row.iter_mut().zip(kb).zip(g_kv) {
                *c = x * g;
            }
        }
        for (j, row) in rotary.chunks_exact_mut(b).enumerate() {
            row[kv_latent + j] = 1.0;
        }
    }
    Some(KeyBasis { dim: b, q, k })
}

/// A row-major `f32` slice as an `rows × cols` matrix view.
fn row_major(data: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, rows, cols)
}

/// `A·diag(g)·B` (`A·B` without `g`) for row-major `A ∈ ℝ^{m×r}` and `B ∈ ℝ^{r×n}`, as
/// row-major `f32`.
fn scaled_product(a: &[f32], m: usize, g: Option<&[f32]>, b: MatRef<'_, f32>) -> Vec<f32> {
    let (r, n) = b.shape();
    let scaled: Vec<f32>;
    let av = match g {
        Some(g) => {
            debug_assert_eq!(g.len(), r);
            scaled = a.iter().enumerate().map(|(i, x)| x * g[i % r]).collect();
            row_major(&scaled, m, r)
        }
        None => row_major(a, m, r),
    };
    // (AB)ᵀ = BᵀAᵀ column-major is AB row-major, so the product is written straight into
    // the rows returned (no second buffer: for DeepSeek-V3's 24 576 × 7 168 Q, reading a
    // column-major AB back row by row took 17 s, and a copy of it another 0.7 GB of freshly
    // faulted pages).
    let mut rows = vec![0.0f32; m * n];
    crate::linalg::matmul_by_rows(
        faer::MatMut::from_column_major_slice_mut(&mut rows, n, m),
        Accum::Replace,
        b.transpose(),
        av.transpose(),
        1.0f32,
    );
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::{NullModel, assert_same_diagnoses};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> RowMajor {
        RowMajor::new(values(rows * cols, seed), rows, cols).unwrap()
    }

    /// An MLA layer (H = 4, d = 64, r_q = 24, r_kv = 12, d_nope = 8, d_rope = 4): its key
    /// basis satisfies `K = CB` and `Q̃ = QBᵀ`, and diagnosing through it (thin factors,
    /// `m = 48 ≥ 2b = 32`) gives what the `d`-wide `Q, K` give, whole layer and per head,
    /// with and without query compression.
    #[test]
    fn mla_key_basis_gives_the_layers_diagnostics() {
        let (heads, d, rq, rkv, nope, rope, v) = (4, 64, 24, 12, 8, 4, 8);
        let (b, m) = (rkv + rope, heads * (nope + rope));
        for compressed in [true, false] {
            let weights = MlaWeights {
                q_down: compressed.then(|| (matrix(rq, d, 1), Some(values(rq, 2)))),
                q_up: matrix(m, if compressed { rq } else { d }, 3),
                kv_down: matrix(b, d, 4),
                kv_norm: Some(values(rkv, 5)),
                kv_up: matrix(heads * (nope + v), rkv, 6),
            };
            let basis_rows = weights.kv_down.data.clone();
            let layer = mla_effective(0, heads, weights).unwrap();
            let kb = layer.key_basis.as_ref().expect("b = 16 < d = 64");
            assert_eq!(kb.dim, b);
            assert_basis_spans_the_keys(&layer, &basis_rows);
            assert_basis_gives_the_d_wide_diagnoses(&layer);
        }
    }

    /// [`mla_factors`] forms exactly the key basis [`mla_effective`] does (bit for bit), and
    /// the `d`-wide `Q, K` when there is no narrower basis (`b = r_kv + d_rope ≥ d`); its
    /// diagnoses are the layer's.
    #[test]
    fn mla_factors_are_the_layers() {
        let (heads, rq, rkv, nope, rope, v) = (4, 24, 12, 8, 4, 8);
        let (b, m) = (rkv + rope, heads * (nope + rope));
        for d in [64, b] {
            let weights = MlaWeights {
                q_down: Some((matrix(rq, d, 1), Some(values(rq, 2)))),
                q_up: matrix(m, rq, 3),
                kv_down: matrix(b, d, 4),
                kv_norm: Some(values(rkv, 5)),
                kv_up: matrix(heads * (nope + v), rkv, 6),
            };
            let layer = mla_effective(7, heads, weights.clone()).unwrap();
            let factors = mla_factors(7, heads, weights).unwrap();
            assert_eq!(
                (factors.index, &factors.kind, factors.rows, factors.width),
                (7, &layer.kind, m, d)
            );
            assert_eq!(factors.factorization, layer.factorization);
            assert_eq!(layer.key_basis.is_some(), d > b);
            let f = &factors.factors;
            assert_eq!((&f.q[..], &f.k[..], f.dim), layer.factors());
            let config = DiagnosticsConfig {
                per_head: true,
                ..Default::default()
            };
            let (ours, theirs) = (factors.diagnose(&config), layer.diagnose(&config));
            let (ours, theirs) = (ours.unwrap(), theirs.unwrap());
            assert_same_diagnoses(&ours.layer, &theirs.layer, 0.0);
            for (a, b) in ours.per_head.iter().zip(&theirs.per_head) {
                assert_same_diagnoses(a, b, 0.0);
            }
            // In f64: the same values to f32's tolerance (as in the key-basis tests).
            let wide = factors.diagnose_in::<f64>(&config).unwrap();
            assert_same_diagnoses(&ours.layer, &wide.layer, 1e-4);
            for (a, b) in ours.per_head.iter().zip(&wide.per_head) {
                assert_same_diagnoses(a, b, 1e-4);
            }
        }
    }

    /// A GQA layer (8 query heads, 2 key heads of 8, d = 64): its key basis is `k_proj` with
    /// unit rows in `C`, and diagnosing through it (`m = 64 ≥ 2b = 32`) gives what the
    /// `d`-wide `Q, K` give, whole layer and per head.
    #[test]
    fn gqa_key_basis_gives_the_layers_diagnostics() {
        let (heads, kv, hd, d) = (8, 2, 8, 64);
        let layer =
            mha_effective(0, heads, matrix(heads * hd, d, 1), matrix(kv * hd, d, 2)).unwrap();
        let kb = layer.key_basis.as_ref().expect("b = 16 < d = 64");
        assert_eq!(kb.dim, kv * hd);
        let k_proj = matrix(kv * hd, d, 2).data;
        assert_basis_spans_the_keys(&layer, &k_proj);
        assert_basis_gives_the_d_wide_diagnoses(&layer);
        // MHA (H_kv = H, b = d): no narrower basis.
        let mha = mha_effective(0, 8, matrix(64, 64, 3), matrix(64, 64, 4)).unwrap();
        assert!(mha.key_basis.is_none());
    }

    /// `K = CB` and `Q̃ = QBᵀ` for the layer's key basis, `B` given row-major (`b × d`).
    fn assert_basis_spans_the_keys(layer: &AttentionLayer, basis_rows: &[f32]) {
        let kb = layer.key_basis.as_ref().expect("a narrower basis");
        let (m, d, b) = (layer.rows, layer.width, kb.dim);
        let close = |x: f32, y: f32| (x - y).abs() <= 1e-4 * (1.0 + y.abs());
        for i in 0..m {
            for j in 0..d {
                let k: f32 = (0..b)
                    .map(|r| kb.k[i * b + r] * basis_rows[r * d + j])
                    .sum();
                assert!(close(k, layer.k[i * d + j]), "K[{i}, {j}]");
            }
            for r in 0..b {
                let q: f32 = (0..d)
                    .map(|j| layer.q[i * d + j] * basis_rows[r * d + j])
                    .sum();
                assert!(close(kb.q[i * b + r], q), "Q̃[{i}, {r}]");
            }
        }
    }

    /// Diagnosing through the key basis gives what the `d`-wide `Q, K` give, whole layer
    /// and per head. f32's tolerance: 1e-4 relative (the widest gap seen, 2.2e-5, is in
    /// `mp_gap`, a difference of two eigenvalues).
    fn assert_basis_gives_the_d_wide_diagnoses(layer: &AttentionLayer) {
        let config = DiagnosticsConfig {
            nulls: vec![NullModel::Mp, NullModel::Product],
            per_head: true,
            ..Default::default()
        };
        let through_basis = layer.diagnose(&config).unwrap();
        let dense = AttentionLayer {
            key_basis: None,
            ..layer.clone()
        }
        .diagnose(&config)
        .unwrap();
        assert_same_diagnoses(&through_basis.layer, &dense.layer, 1e-4);
        for (a, b) in through_basis.per_head.iter().zip(&dense.per_head) {
            assert_same_diagnoses(a, b, 1e-4);
        }
    }
}
