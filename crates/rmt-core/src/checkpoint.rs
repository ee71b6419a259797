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

use crate::effective::{MlaWeights, RowMajor, mha_effective, mla_effective};
use crate::error::{Result, RmtError};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::effective::{AttentionKind, AttentionLayer};

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

/// A safetensors tensor's values as `f32` (F32, F64, F16 and BF16 are read), rejecting NaN
/// and infinities.
///
/// # Errors
/// Another dtype, or a non-finite value.
pub fn tensor_to_f32(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
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
    Ok(values)
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
        let values = tensor_to_f32(name, &view)?;
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

    fn load2(&self, st: &SafeTensors<'_>, name: &str) -> Result<RowMajor> {
        let (data, shape) = self.load(st, name, 2)?;
        RowMajor::new(data, shape[0], shape[1])
    }

    fn mha_layer(
        &self,
        st: &SafeTensors<'_>,
        index: usize,
        heads: usize,
        q: &str,
        k: &str,
    ) -> Result<AttentionLayer> {
        mha_effective(index, heads, self.load2(st, q)?, self.load2(st, k)?)
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
        let vector = |leaf: &str| -> Result<Option<Vec<f32>>> {
            name(leaf)
                .map(|n| self.load(st, n, 1).map(|(v, _)| v))
                .transpose()
        };
        let q_down = match name("q_a_proj") {
            Some(qa) => Some((self.load2(st, qa)?, vector("q_a_layernorm")?)),
            None => None,
        };
        let q_up = match q_down {
            Some(_) => self.load2(st, need("q_b_proj")?)?,
            None => self.load2(st, need("q_proj")?)?,
        };
        let weights = MlaWeights {
            q_down,
            q_up,
            kv_down: self.load2(st, kva_name)?,
            kv_norm: vector("kv_a_layernorm")?,
            kv_up: self.load2(st, need("kv_b_proj")?)?,
        };
        mla_effective(index, heads, weights)
    }
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
