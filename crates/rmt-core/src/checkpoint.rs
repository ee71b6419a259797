//! Effective query/key weights from safetensors checkpoints (feature `checkpoint`).
//!
//! Recognised layouts, per layer `N` (any prefix before `layers.N.`, attention module named
//! `self_attn` or `attn`):
//!
//! * **HF LLaMA** (and Mistral, Qwen2, … — any `q_proj`/`k_proj` pair): `q_proj.weight`
//!   `[H·d_h, d]`, `k_proj.weight` `[H_kv·d_h, d]`. With grouped-query attention each key head
//!   is repeated for the `H/H_kv` query heads that read it, so `Q_hK_hᵀ` is the form head `h`
//!   uses.
//! * **DeepSeek-V2/V3 MLA**: `q_a_proj` `[r_q, d]`, `q_a_layernorm` `[r_q]`, `q_b_proj`
//!   `[H·(d_nope + d_rope), r_q]` (or `q_proj` `[H·(d_nope + d_rope), d]` without query
//!   compression), `kv_a_proj_with_mqa` `[r_kv + d_rope, d]`, `kv_a_layernorm` `[r_kv]`,
//!   `kv_b_proj` `[H·(d_nope + d_v), r_kv]`. Effective (DESIGN.md):
//!   `Q = W_qb·diag(g_q)·W_qa`; head `h`'s key rows are its `d_nope` rows of
//!   `W_kb·diag(g_kv)·W_kva[latent]` followed by the shared rotary rows `W_kva[rope]`.
//!   Every size is read off the shapes once the head count is known.
//! * **This project's exports** use exactly these names (attn-models writes MHA under the
//!   LLaMA names and both MLA variants under the DeepSeek names; MLA-PreRoPE has
//!   `d_rope = 0`).
//!
//! The head count comes from `config.json` beside the checkpoint (`num_attention_heads`) or
//! from the caller. F32, F16, BF16 and F64 tensors are read (as `f32`).

use crate::diagnostics::{DiagnosticsConfig, Factorization, LayerDiagnostics, diagnose_layer};
use crate::error::{Result, RmtError};
use crate::linalg::row_major_view;
use faer::{Accum, MatRef};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// The `N` of `layers.N.`.
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
}

impl AttentionLayer {
    /// Diagnoses this layer (whole layer, and per head if `config.per_head`).
    pub fn diagnose(&self, config: &DiagnosticsConfig) -> Result<LayerDiagnostics> {
        let q = row_major_view(&self.q, self.rows, self.width)?;
        let k = row_major_view(&self.k, self.rows, self.width)?;
        diagnose_layer(q, k, self.kind.heads(), config, Some(&self.factorization))
    }
}

/// A memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    map: memmap2::Mmap,
    heads: Option<usize>,
    /// Attention tensors by layer index, then by leaf name (`q_proj`, `kv_b_proj`, …).
    layers: BTreeMap<usize, BTreeMap<String, String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn err(msg: impl Into<String>) -> RmtError {
    RmtError::Checkpoint(msg.into())
}

/// Splits `…layers.N.(self_attn|attn).LEAF.weight` into `(N, LEAF)`.
fn parse_attention_name(name: &str) -> Option<(usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    let at = parts.iter().position(|p| *p == "layers")?;
    let index: usize = parts.get(at + 1)?.parse().ok()?;
    let module = *parts.get(at + 2)?;
    if module != "self_attn" && module != "attn" {
        return None;
    }
    let rest = &parts[at + 3..];
    if rest.len() == 2 && rest[1] == "weight" {
        Some((index, rest[0].to_string()))
    } else {
        None
    }
}

/// Reads the head count from a HF-style `config.json`.
fn heads_from_config(path: &Path) -> Result<Option<usize>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| err(format!("{}: not valid JSON ({e})", path.display())))?;
    for key in ["num_attention_heads", "n_heads", "num_heads", "n_head"] {
        if let Some(h) = value.get(key).and_then(|v| v.as_u64()) {
            return Ok(Some(h as usize));
        }
    }
    Ok(None)
}

impl Checkpoint {
    /// Opens and validates a checkpoint. `heads` overrides the head count of a `config.json`
    /// beside the file.
    ///
    /// # Errors
    /// Unreadable or corrupt file (bad header, offsets out of range, truncated data), a
    /// `config.json` that is not JSON, or no attention weights at all.
    pub fn open(path: impl AsRef<Path>, heads: Option<usize>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file =
            std::fs::File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        // SAFETY: the map is read-only and private to this process; a file truncated or
        // rewritten underneath it is the caller's concurrency problem, as with any reader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        let tensors = SafeTensors::deserialize(&map).map_err(|e| {
            err(format!(
                "{}: not a valid safetensors file ({e})",
                path.display()
            ))
        })?;
        let mut layers: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
        for name in tensors.names() {
            if let Some((index, leaf)) = parse_attention_name(name) {
                layers
                    .entry(index)
                    .or_default()
                    .insert(leaf, name.to_string());
            }
        }
        if layers.is_empty() {
            return Err(err(format!(
                "{}: no attention weights found (expected names like model.layers.0.self_attn.q_proj.weight)",
                path.display()
            )));
        }
        let config_heads = match path.parent() {
            Some(dir) => heads_from_config(&dir.join("config.json"))?,
            None => None,
        };
        if let Some(h) = heads
            && h == 0
        {
            return Err(err("--heads must be at least 1"));
        }
        Ok(Self {
            heads: heads.or(config_heads),
            path,
            map,
            layers,
        })
    }

    /// The layer indices that have attention weights, ascending.
    pub fn layer_indices(&self) -> Vec<usize> {
        self.layers.keys().copied().collect()
    }

    /// The head count in use.
    pub fn heads(&self) -> Option<usize> {
        self.heads
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .map_err(|e| err(format!("{}: {e}", self.path.display())))
    }

    /// Loads one tensor as `f32`, checking its rank.
    fn load(
        &self,
        st: &SafeTensors<'_>,
        name: &str,
        rank: usize,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let view = st.tensor(name).map_err(|e| err(format!("{name}: {e}")))?;
        let shape = view.shape().to_vec();
        if shape.len() != rank {
            return Err(err(format!(
                "{name}: expected a rank-{rank} tensor, found shape {shape:?}"
            )));
        }
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(err(format!(
                    "{name}: unsupported dtype {other:?} (F32, F16, BF16, F64 are read)"
                )));
            }
        };
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(err(format!(
                "{name}: non-finite value {v} at flat index {i}"
            )));
        }
        Ok((values, shape))
    }

    /// Forms layer `index`'s effective `Q` and `K`.
    ///
    /// # Errors
    /// Unknown head count, missing tensors, or shapes that contradict the head count or each
    /// other.
    pub fn layer(&self, index: usize) -> Result<AttentionLayer> {
        let leaves = self
            .layers
            .get(&index)
            .ok_or_else(|| err(format!("no attention weights for layer {index}")))?;
        let heads = self.heads.ok_or_else(|| {
            err("cannot tell the number of heads: put the model's config.json beside the checkpoint or pass --heads")
        })?;
        let st = self.tensors()?;
        let name = |leaf: &str| leaves.get(leaf).map(String::as_str);
        if let Some(kva) = name("kv_a_proj_with_mqa") {
            self.mla_layer(&st, index, heads, kva, &name)
        } else if let (Some(q), Some(k)) = (name("q_proj"), name("k_proj")) {
            self.mha_layer(&st, index, heads, q, k)
        } else {
            Err(err(format!(
                "layer {index}: neither q_proj/k_proj nor kv_a_proj_with_mqa found (have: {})",
                leaves.keys().cloned().collect::<Vec<_>>().join(", ")
            )))
        }
    }

    fn mha_layer(
        &self,
        st: &SafeTensors<'_>,
        index: usize,
        heads: usize,
        q: &str,
        k: &str,
    ) -> Result<AttentionLayer> {
        let (qw, qs) = self.load(st, q, 2)?;
        let (kw, ks) = self.load(st, k, 2)?;
        let (m, d) = (qs[0], qs[1]);
        if ks[1] != d {
            return Err(err(format!(
                "layer {index}: q_proj is {qs:?} but k_proj is {ks:?} (widths differ)"
            )));
        }
        if m % heads != 0 {
            return Err(err(format!(
                "layer {index}: q_proj has {m} rows, not a multiple of {heads} heads"
            )));
        }
        let head_dim = m / heads;
        if ks[0] % head_dim != 0 || heads % (ks[0] / head_dim).max(1) != 0 || ks[0] == 0 {
            return Err(err(format!(
                "layer {index}: k_proj has {} rows, not a whole number of {head_dim}-wide heads dividing {heads}",
                ks[0]
            )));
        }
        let kv_heads = ks[0] / head_dim;
        let group = heads / kv_heads;
        // Repeat each key head for the query heads of its group.
        let mut k_eff = Vec::with_capacity(m * d);
        for h in 0..heads {
            let kh = h / group;
            k_eff.extend_from_slice(&kw[kh * head_dim * d..(kh + 1) * head_dim * d]);
        }
        Ok(AttentionLayer {
            index,
            kind: AttentionKind::Mha {
                heads,
                kv_heads,
                head_dim,
            },
            rows: m,
            width: d,
            q: qw,
            k: k_eff,
            factorization: Factorization::dense(d),
        })
    }

    fn mla_layer<'n>(
        &self,
        st: &SafeTensors<'_>,
        index: usize,
        heads: usize,
        kva_name: &str,
        name: &dyn Fn(&str) -> Option<&'n str>,
    ) -> Result<AttentionLayer> {
        let need = |leaf: &str| {
            name(leaf).ok_or_else(|| err(format!("layer {index}: MLA layer without {leaf}")))
        };
        let (kva, kva_s) = self.load(st, kva_name, 2)?;
        let (kvb, kvb_s) = self.load(st, need("kv_b_proj")?, 2)?;
        let d = kva_s[1];
        let kv_latent = kvb_s[1];
        let g_kv = match name("kv_a_layernorm") {
            Some(n) => self.load(st, n, 1)?.0,
            None => vec![1.0; kv_latent],
        };
        if g_kv.len() != kv_latent || kva_s[0] < kv_latent {
            return Err(err(format!(
                "layer {index}: kv_b_proj {kvb_s:?}, kv_a_proj_with_mqa {kva_s:?} and kv_a_layernorm [{}] disagree on the latent width",
                g_kv.len()
            )));
        }
        let rope = kva_s[0] - kv_latent;
        // Query: q_b·diag(g)·q_a, or q_proj.
        let (q_eff, q_rows, q_latent) = if let Some(qa_name) = name("q_a_proj") {
            let (qa, qa_s) = self.load(st, qa_name, 2)?;
            let (qb, qb_s) = self.load(st, need("q_b_proj")?, 2)?;
            let g_q = match name("q_a_layernorm") {
                Some(n) => self.load(st, n, 1)?.0,
                None => vec![1.0; qa_s[0]],
            };
            if qa_s[1] != d || qb_s[1] != qa_s[0] || g_q.len() != qa_s[0] {
                return Err(err(format!(
                    "layer {index}: q_a_proj {qa_s:?}, q_b_proj {qb_s:?}, q_a_layernorm [{}] and width {d} disagree",
                    g_q.len()
                )));
            }
            (
                scaled_product(&qb, qb_s[0], &g_q, &qa, qa_s[1]),
                qb_s[0],
                Some(qa_s[0]),
            )
        } else {
            let (q, qs) = self.load(st, need("q_proj")?, 2)?;
            if qs[1] != d {
                return Err(err(format!(
                    "layer {index}: q_proj {qs:?} does not match width {d}"
                )));
            }
            (q, qs[0], None)
        };
        if q_rows % heads != 0 {
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
        if kvb_s[0] % heads != 0 || kvb_s[0] / heads < nope {
            return Err(err(format!(
                "layer {index}: kv_b_proj has {} rows, not {heads} heads of ≥ {nope}",
                kvb_s[0]
            )));
        }
        let kv_head = kvb_s[0] / heads; // d_nope + d_v
        // Key content rows of every head: W_kb[nope rows]·diag(g)·W_kva[latent rows].
        let mut kb_nope = Vec::with_capacity(heads * nope * kv_latent);
        for h in 0..heads {
            kb_nope
                .extend_from_slice(&kvb[h * kv_head * kv_latent..(h * kv_head + nope) * kv_latent]);
        }
        let k_content = scaled_product(&kb_nope, heads * nope, &g_kv, &kva[..kv_latent * d], d);
        let rope_rows = &kva[kv_latent * d..];
        let mut k_eff = Vec::with_capacity(q_rows * d);
        for h in 0..heads {
            k_eff.extend_from_slice(&k_content[h * nope * d..(h + 1) * nope * d]);
            k_eff.extend_from_slice(rope_rows);
        }
        let mut inner = Vec::new();
        if let Some(r) = q_latent {
            inner.push(r);
        }
        inner.push(d);
        // The rotary key rows enter K outside the latent: the null's inner width counts them
        // (an approximation for MLA-Decoupled, documented in docs/math.md).
        inner.push(kv_latent + rope);
        Ok(AttentionLayer {
            index,
            kind: AttentionKind::Mla {
                heads,
                q_latent,
                kv_latent,
                nope_dim: nope,
                rope_dim: rope,
            },
            rows: q_rows,
            width: d,
            q: q_eff,
            k: k_eff,
            factorization: Factorization { inner },
        })
    }
}

/// `A·diag(g)·B` for row-major `A ∈ ℝ^{m×r}`, `B ∈ ℝ^{r×n}`, as row-major `f32`.
fn scaled_product(a: &[f32], m: usize, g: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let r = g.len();
    let scaled: Vec<f32> = a.iter().enumerate().map(|(i, x)| x * g[i % r]).collect();
    // SAFETY-free views: row-major m×r and r×n.
    let av = MatRef::from_row_major_slice(&scaled, m, r);
    let bv = MatRef::from_row_major_slice(b, r, n);
    let mut out = faer::Mat::<f32>::zeros(m, n);
    faer::linalg::matmul::matmul(
        out.as_mut(),
        Accum::Replace,
        av,
        bv,
        1.0f32,
        crate::linalg::par(),
    );
    let mut rows = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            rows.push(out[(i, j)]);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Writes a safetensors file from (name, shape, f32 data) triples.
    pub(crate) fn write_safetensors(
        path: &Path,
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
        dtype: Dtype,
    ) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97)) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn parses_attention_names() {
        assert_eq!(
            parse_attention_name("model.layers.11.self_attn.q_proj.weight"),
            Some((11, "q_proj".into()))
        );
        assert_eq!(
            parse_attention_name("layers.0.attn.kv_b_proj.weight"),
            Some((0, "kv_b_proj".into()))
        );
        assert_eq!(
            parse_attention_name("model.layers.3.mlp.up_proj.weight"),
            None
        );
        assert_eq!(
            parse_attention_name("model.layers.x.self_attn.q_proj.weight"),
            None
        );
    }

    #[test]
    fn gqa_keys_are_repeated_per_group() {
        let dir = std::env::temp_dir().join(format!("rmt-ckpt-gqa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let (heads, kv, hd, d) = (4, 2, 3, 8);
        let q = values(heads * hd * d, 1);
        let k = values(kv * hd * d, 2);
        write_safetensors(
            &path,
            &[
                (
                    "model.layers.0.self_attn.q_proj.weight",
                    vec![heads * hd, d],
                    q.clone(),
                ),
                (
                    "model.layers.0.self_attn.k_proj.weight",
                    vec![kv * hd, d],
                    k.clone(),
                ),
            ],
            Dtype::F32,
        );
        let ck = Checkpoint::open(&path, Some(heads)).unwrap();
        let layer = ck.layer(0).unwrap();
        assert_eq!(
            layer.kind,
            AttentionKind::Mha {
                heads,
                kv_heads: kv,
                head_dim: hd
            }
        );
        // Query heads 0, 1 read key head 0; heads 2, 3 read key head 1.
        assert_eq!(&layer.k[0..hd * d], &k[0..hd * d]);
        assert_eq!(&layer.k[hd * d..2 * hd * d], &k[0..hd * d]);
        assert_eq!(&layer.k[2 * hd * d..3 * hd * d], &k[hd * d..2 * hd * d]);
        assert_eq!(layer.q, q);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mla_effective_weights_follow_design() {
        let dir = std::env::temp_dir().join(format!("rmt-ckpt-mla-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let (h, d, rq, rkv, nope, rope, v) = (2, 6, 4, 3, 2, 1, 2);
        let qa = values(rq * d, 1);
        let gq = values(rq, 2);
        let qb = values(h * (nope + rope) * rq, 3);
        let kva = values((rkv + rope) * d, 4);
        let gkv = values(rkv, 5);
        let kvb = values(h * (nope + v) * rkv, 6);
        let p = "model.layers.2.self_attn.";
        write_safetensors(
            &path,
            &[
                (&format!("{p}q_a_proj.weight"), vec![rq, d], qa.clone()),
                (&format!("{p}q_a_layernorm.weight"), vec![rq], gq.clone()),
                (
                    &format!("{p}q_b_proj.weight"),
                    vec![h * (nope + rope), rq],
                    qb.clone(),
                ),
                (
                    &format!("{p}kv_a_proj_with_mqa.weight"),
                    vec![rkv + rope, d],
                    kva.clone(),
                ),
                (&format!("{p}kv_a_layernorm.weight"), vec![rkv], gkv.clone()),
                (
                    &format!("{p}kv_b_proj.weight"),
                    vec![h * (nope + v), rkv],
                    kvb.clone(),
                ),
                (
                    &format!("{p}o_proj.weight"),
                    vec![d, h * v],
                    values(d * h * v, 7),
                ),
            ],
            Dtype::F32,
        );
        std::fs::write(
            dir.join("config.json"),
            format!("{{\"num_attention_heads\": {h}}}"),
        )
        .unwrap();
        let ck = Checkpoint::open(&path, None).unwrap();
        assert_eq!(ck.layer_indices(), vec![2]);
        let layer = ck.layer(2).unwrap();
        assert_eq!(
            layer.kind,
            AttentionKind::Mla {
                heads: h,
                q_latent: Some(rq),
                kv_latent: rkv,
                nope_dim: nope,
                rope_dim: rope
            }
        );
        assert_eq!(layer.factorization.inner, vec![rq, d, rkv + rope]);
        // Reference by explicit sums.
        let m = h * (nope + rope);
        for row in 0..m {
            for col in 0..d {
                let q_ref: f32 = (0..rq)
                    .map(|r| qb[row * rq + r] * gq[r] * qa[r * d + col])
                    .sum();
                assert!((layer.q[row * d + col] - q_ref).abs() < 1e-5);
                let (head, within) = (row / (nope + rope), row % (nope + rope));
                let k_ref: f32 = if within < nope {
                    let kb_row = head * (nope + v) + within;
                    (0..rkv)
                        .map(|r| kvb[kb_row * rkv + r] * gkv[r] * kva[r * d + col])
                        .sum()
                } else {
                    kva[(rkv + within - nope) * d + col]
                };
                assert!(
                    (layer.k[row * d + col] - k_ref).abs() < 1e-5,
                    "row {row} col {col}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bf16_and_f16_are_read() {
        let dir = std::env::temp_dir().join(format!("rmt-ckpt-half-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (dtype, tol) in [(Dtype::BF16, 1e-2), (Dtype::F16, 1e-3)] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            let q = values(16 * 8, 1);
            write_safetensors(
                &path,
                &[
                    ("layers.0.self_attn.q_proj.weight", vec![16, 8], q.clone()),
                    (
                        "layers.0.self_attn.k_proj.weight",
                        vec![16, 8],
                        values(16 * 8, 2),
                    ),
                ],
                dtype,
            );
            let layer = Checkpoint::open(&path, Some(2)).unwrap().layer(0).unwrap();
            for (a, b) in layer.q.iter().zip(&q) {
                assert!((a - b).abs() <= tol * b.abs().max(1.0));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_checkpoints_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("rmt-ckpt-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Corrupt: garbage bytes.
        let junk = dir.join("junk.safetensors");
        std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
        let e = Checkpoint::open(&junk, Some(1)).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        // Truncated: a valid file cut short.
        let good = dir.join("good.safetensors");
        write_safetensors(
            &good,
            &[
                (
                    "layers.0.self_attn.q_proj.weight",
                    vec![4, 4],
                    values(16, 1),
                ),
                (
                    "layers.0.self_attn.k_proj.weight",
                    vec![4, 4],
                    values(16, 2),
                ),
            ],
            Dtype::F32,
        );
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
        assert!(Checkpoint::open(&cut, Some(1)).is_err());
        // No attention weights.
        let mlp = dir.join("mlp.safetensors");
        write_safetensors(
            &mlp,
            &[(
                "model.layers.0.mlp.up_proj.weight",
                vec![4, 4],
                values(16, 1),
            )],
            Dtype::F32,
        );
        let e = Checkpoint::open(&mlp, Some(1)).unwrap_err().to_string();
        assert!(e.contains("no attention weights"), "{e}");
        // Heads that contradict the shapes, and unknown heads.
        let e = Checkpoint::open(&good, Some(3))
            .unwrap()
            .layer(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple of 3 heads"), "{e}");
        let e = Checkpoint::open(&good, None)
            .unwrap()
            .layer(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--heads"), "{e}");
        // Non-finite weights.
        let nan = dir.join("nan.safetensors");
        let mut q = values(16, 1);
        q[5] = f32::NAN;
        write_safetensors(
            &nan,
            &[
                ("layers.0.self_attn.q_proj.weight", vec![4, 4], q),
                (
                    "layers.0.self_attn.k_proj.weight",
                    vec![4, 4],
                    values(16, 2),
                ),
            ],
            Dtype::F32,
        );
        let e = Checkpoint::open(&nan, Some(1))
            .unwrap()
            .layer(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
