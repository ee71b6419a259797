//! Effective query/key weights from safetensors checkpoints (feature `checkpoint`).
//!
//! Recognised layouts, per layer `N` (any prefix before `layers.N.` or `h.N.`, attention module
//! named `self_attn`, `attn`, `attention` or `self_attention`):
//!
//! * **HF LLaMA** (and Mistral, Qwen2, … — any `q_proj`/`k_proj` pair, or `wq`/`wk` in
//!   Mistral's and Meta's own `layers.N.attention.` format): `q_proj.weight`
//!   `[H·d_h, d]`, `k_proj.weight` `[H_kv·d_h, d]`. With grouped-query attention each key head
//!   is repeated for the `H/H_kv` query heads that read it, so `Q_hK_hᵀ` is the form head `h`
//!   uses. A QK-norm's gain (`q_norm`, `k_norm`: `[d_h]` shared by the heads in Qwen3 and
//!   Gemma 3, one per row in OLMo-2) scales the projection's rows, `diag(g)·W` — `1 + w` when
//!   config.json's `model_type` is one whose RMSNorm scales that way (Gemma 3, Qwen3-Next,
//!   Qwen3.5: `GAIN_PLUS_ONE_MODEL_TYPES`; not Gemma 3n or 4); as for MLA's
//!   latent norms, the per-token `1/rms` is left out (it scales a head's whole row of scores).
//!   A gated query (Qwen3-Next, Qwen3.5: `q_proj` gives each head `d_h` query rows, then
//!   `d_h` rows of an output gate; `GATED_QUERY_MODEL_TYPES`) keeps its query rows only.
//!   A LayerNorm QK-norm (Cohere's and Chameleon's over each head with a `[H, d_h]` gain,
//!   ESMC's over the whole projection, any norm with a bias beside its gain:
//!   `LAYER_NORM_QK_MODEL_TYPES`) also centres: its mean subtraction, a linear map, enters
//!   too, `diag(g_h)·(I − 11ᵀ/d_h)·W_h`.
//! * **Fused query/key/value projections**, split as their models' forwards split them:
//!   Phi-3's `qkv_proj` `[H·d_h + 2·H_kv·d_h, d]` (every query row, then the keys', then the
//!   values'; `H_kv` from config.json's `num_key_value_heads`, else `H`), GPT-NeoX's (Pythia)
//!   and BLOOM's `query_key_value` `[3·H·d_h, d]` (head by head: its query, key, value rows),
//!   GPT-2's Conv1D `c_attn` `[d, 3·d]` (`[in, out]`: query, key, value columns). Other models
//!   use the same names otherwise (Falcon's and ChatGLM's `query_key_value`, Qwen-1's and
//!   StarCoder's `c_attn`): with a config.json whose `model_type` is not `phi3`, `gpt_neox`,
//!   `bloom` or `gpt2` respectively, a fused projection is an error, not a guess.
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
//! A checkpoint with several stacks of such layers (a vision-language model's vision tower
//! and language model, an encoder and a decoder: `STACK.N.` with different `STACK`s, such as
//! `model.language_model.layers` and `model.vision_tower.encoder.layers`) is read one stack at
//! a time, chosen by its name ([`Checkpoint::open_stack`]); their layers are never merged.
//! Its head count, KV-head count and `model_type` come from the config.json section whose
//! layer count and width are the stack's (`text_config`, `vision_config`, an
//! encoder–decoder's `encoder_*` / `decoder_*` keys), else from the top level
//! ([`Checkpoint::heads_from`] says which).
//!
//! A checkpoint is one `.safetensors` file, a sharded one's `model.safetensors.index.json`
//! (HF's `weight_map` from tensor name to shard file), or a directory holding either (the
//! index if there is one, else every `*.safetensors` file in it). Every shard is
//! memory-mapped and its header validated when the checkpoint is opened; a tensor's bytes are
//! read only when its layer is.
//!
//! Biases (Qwen2's, GPT-2's, BLOOM's) are not read: they add terms linear in each token to
//! the scores, outside the bilinear form `Q_hK_hᵀ` the diagnostics are about.
//!
//! The head count comes from `config.json` beside the checkpoint (`num_attention_heads`; the
//! `params.json` of Mistral's and Meta's own format when there is no `config.json`) or from
//! the caller. F32, F16, BF16, F64 and FP8 (`F8_E4M3`, `F8_E5M2`) tensors are read as
//! `f32`; an FP8 weight with a `…weight_scale_inv` beside it (DeepSeek-V3's block scales, in
//! blocks of config.json's `quantization_config.weight_block_size`, else 128 × 128) is scaled.
//!
//! ```
//! use rmt_core::checkpoint::{AttentionKind, Checkpoint};
//! use safetensors::{Dtype, tensor::TensorView};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("rmt-core-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! // A one-layer LLaMA-style checkpoint: q_proj, k_proj [H·d_h, d] with H = 2, d_h = 2, d = 4.
//! let bytes: Vec<u8> = (0..16).flat_map(|i| ((i % 5) as f32 - 2.0).to_le_bytes()).collect();
//! let view = || TensorView::new(Dtype::F32, vec![4, 4], &bytes);
//! let path = dir.join("model.safetensors");
//! safetensors::serialize_to_file(
//!     [
//!         ("model.layers.0.self_attn.q_proj.weight", view()?),
//!         ("model.layers.0.self_attn.k_proj.weight", view()?),
//!     ],
//!     None::<std::collections::HashMap<String, String>>,
//!     &path,
//! )?;
//! let checkpoint = Checkpoint::open(&path, Some(2))?;
//! // The shapes alone, from the header: nothing is read yet.
//! let kind = checkpoint.layout(0)?;
//! assert_eq!(kind, AttentionKind::Mha { heads: 2, kv_heads: 2, head_dim: 2 });
//! // The effective Q and K (row-major, [rows, width]).
//! let layer = checkpoint.layer(0)?;
//! assert_eq!((layer.rows, layer.width, layer.q.len()), (4, 4, 16));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use crate::effective::{
    MlaShapes, MlaWeights, RowMajor, mha_effective, mha_layout, mla_effective, mla_factors,
    mla_layout,
};
use crate::error::{Result, RmtError};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use crate::effective::{AttentionKind, AttentionLayer, LayerFactors};

/// Where a checkpoint's head count came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadsFrom {
    /// The caller (`--heads`).
    Caller,
    /// config.json's (or params.json's) top level, under this key (`num_attention_heads`).
    TopLevel(String),
    /// The config.json section whose layer count and width are the stack's, under this key
    /// (`text_config.num_attention_heads`, `decoder_attention_heads`).
    Section(String),
}

impl HeadsFrom {
    /// `--heads`, or the config.json key.
    pub fn key(&self) -> &str {
        match self {
            HeadsFrom::Caller => "--heads",
            HeadsFrom::TopLevel(key) | HeadsFrom::Section(key) => key,
        }
    }
}

/// The file name of a sharded HF checkpoint's index.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// A memory-mapped safetensors checkpoint: one file or the shards of one.
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    heads: Option<usize>,
    /// The name before `.N.` of the stack read (`model.layers`).
    stack: String,
    /// Attention tensors by layer index, then by leaf name (`q_proj`, `kv_b_proj`, …).
    layers: BTreeMap<usize, BTreeMap<String, Entry>>,
    /// Appended to "not found" errors when the file opened is one shard of an index beside it.
    shard_hint: String,
    /// FP8 block scales (`…weight_scale_inv`) by the full name of the weight they scale.
    scales: BTreeMap<String, Entry>,
    /// The gains of norms that have a bias beside them (`….q_norm.weight`): LayerNorms.
    norm_biases: BTreeSet<String>,
    /// Where the head count came from.
    heads_from: Option<HeadsFrom>,
    /// The `model_type` of the stack's config.json section, else of its top level.
    model_type: Option<String>,
    /// The `num_key_value_heads` of the stack's config.json section.
    kv_heads: Option<usize>,
    /// config.json's head counts below its top level, named in the error when none is the
    /// stack's.
    nested_heads: Vec<String>,
    /// Rows and columns of a block that one scale covers (config.json's
    /// `quantization_config.weight_block_size`, else DeepSeek-V3's 128 × 128).
    scale_block: [usize; 2],
}

/// One mapped safetensors file and its validated header.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Bytes before the data: the 8-byte header length and the JSON header.
    data_start: usize,
    metadata: Metadata,
}

/// Where a tensor lives: its shard and its full name.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    name: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("shards", &self.shards.len())
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn err(msg: impl Into<String>) -> RmtError {
    RmtError::Checkpoint(msg.into())
}

/// What a recognised attention tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `LEAF.weight`.
    Weight,
    /// `LEAF.weight_scale_inv`: the block scales of an FP8 weight (DeepSeek-V3's layout).
    ScaleInv,
}

/// A recognised attention tensor's name, `STACK.N.MODULE.LEAF.weight` (or `.weight_scale_inv`)
/// with `STACK` ending in `layers` or `h` and `MODULE` one of `self_attn`, `attn`, `attention`,
/// `self_attention`, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AttentionName {
    /// What comes before `N` (`model.layers`, `model.language_model.layers`,
    /// `transformer.h`): one stack of layers. A vision-language or encoder–decoder model has
    /// several.
    stack: String,
    /// `N`.
    index: usize,
    /// `q_proj`, `kv_b_proj`, …
    leaf: String,
    role: Role,
}

fn parse_attention_name(name: &str) -> Option<AttentionName> {
    let parts: Vec<&str> = name.split('.').collect();
    let at = (0..parts.len().saturating_sub(4)).find(|&at| {
        matches!(parts[at], "layers" | "h")
            && parts[at + 1].parse::<usize>().is_ok()
            && matches!(
                parts[at + 2],
                "self_attn" | "attn" | "attention" | "self_attention"
            )
    })?;
    let role = match &parts[at + 3..] {
        [_, "weight"] => Role::Weight,
        [_, "weight_scale_inv"] => Role::ScaleInv,
        _ => return None,
    };
    Some(AttentionName {
        stack: parts[..=at].join("."),
        index: parts[at + 1].parse().ok()?,
        leaf: parts[at + 3].to_string(),
        role,
    })
}

/// Checks a QK-norm gain's length against its projection's `rows`: `d_h` (one gain per
/// head dimension, shared by the heads: Qwen3, Gemma 3) or `rows` (one per row: OLMo-2).
fn check_norm_gain(name: &str, len: usize, rows: usize, head_dim: usize) -> Result<()> {
    if len == head_dim || len == rows {
        return Ok(());
    }
    Err(err(format!(
        "{name} has {len} entries: a QK-norm gain has the head width {head_dim} or the projection's {rows} rows"
    )))
}

/// How a stack's layers are named: `model.layers.N`, `transformer.h.N`.
fn stack_pattern(stack: &str) -> String {
    format!("{stack}.N")
}

/// An FP8 value as `f32`: `E4M3` (`float8_e4m3fn`: bias 7, no infinities, `S.1111.111` is
/// NaN, largest 448) or `E5M2` (bias 15, IEEE-style infinities and NaNs).
fn fp8_to_f32(byte: u8, e4m3: bool) -> f32 {
    // Mantissa bits, exponent bias, and the all-ones exponent.
    let (bits, bias, top) = if e4m3 { (3, 7, 15) } else { (2, 15, 31) };
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exponent = i32::from((byte & 0x7f) >> bits);
    let m = byte & ((1 << bits) - 1);
    let fraction = f32::from(m) / f32::from(1u8 << bits);
    match (e4m3, exponent == top) {
        (true, true) if m == 0b111 => f32::NAN,
        (false, true) if m == 0 => sign * f32::INFINITY,
        (false, true) => f32::NAN,
        // Subnormal: 0.m · 2^(1 − bias).
        _ if exponent == 0 => sign * fraction * 2f32.powi(1 - bias),
        _ => sign * (1.0 + fraction) * 2f32.powi(exponent - bias),
    }
}

/// Every code of an FP8 format ([`fp8_to_f32`]), computed once: a table lookup per element
/// rather than a `powi` (64 M codes in 0.17 s against 0.33, throwaway timing on this host).
fn fp8_table(e4m3: bool) -> &'static [f32; 256] {
    use std::sync::OnceLock;
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    let table = if e4m3 { &E4M3 } else { &E5M2 };
    table.get_or_init(|| std::array::from_fn(|b| fp8_to_f32(b as u8, e4m3)))
}

/// One element's bytes to its value.
type Decode = fn(&[u8]) -> f32;

/// How [`tensor_to_f32`] reads one element of `dtype`: its size in bytes and its value as
/// `f32` (`None`: the dtype is not read). The one list of the dtypes read.
fn element_decoder(dtype: Dtype) -> Option<(usize, Decode)> {
    let decode: Decode = match dtype {
        Dtype::F32 => |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        Dtype::F64 => {
            |c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
        }
        Dtype::F16 => |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
        Dtype::BF16 => |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        Dtype::F8_E4M3 => |c| fp8_table(true)[usize::from(c[0])],
        Dtype::F8_E5M2 => |c| fp8_table(false)[usize::from(c[0])],
        _ => return None,
    };
    Some((dtype.bitsize() / 8, decode))
}

fn unsupported_dtype(name: &str, dtype: Dtype) -> RmtError {
    err(format!(
        "{name}: unsupported dtype {dtype:?} (F32, F16, BF16, F64, F8_E4M3, F8_E5M2 are read)"
    ))
}

/// A safetensors tensor's values as `f32` (F32, F64, F16, BF16, F8_E4M3 and F8_E5M2 are
/// read; an FP8 tensor's block scales are applied by [`Checkpoint::layer`]), rejecting NaN
/// and infinities.
///
/// # Errors
/// Another dtype, or a non-finite value.
pub fn tensor_to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let (size, decode) =
        element_decoder(view.dtype()).ok_or_else(|| unsupported_dtype(name, view.dtype()))?;
    let values: Vec<f32> = view.data().chunks_exact(size).map(decode).collect();
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        let why = if view.dtype() == Dtype::F64 {
            " (as f32: the f64 value is outside f32's range, or not finite)"
        } else {
            ""
        };
        return Err(err(format!(
            "{name}: non-finite value {v} at flat index {i}{why}"
        )));
    }
    Ok(values)
}

/// `text`, read from `path`, as JSON.
fn parse_json(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| err(format!("{}: not valid JSON ({e})", path.display())))
}

/// What this reader takes from a HF-style `config.json`.
#[derive(Debug, Default)]
struct ConfigJson {
    /// The top level's attention hyper-parameters.
    top: ConfigSection,
    /// Those of nested sections (`text_config`, `vision_config`) and of an encoder–decoder's
    /// `encoder_*` / `decoder_*` keys: one per stack of a multi-stack model.
    nested: Vec<ConfigSection>,
    /// `quantization_config.weight_block_size`.
    scale_block: Option<[usize; 2]>,
    /// Every head count config.json gives below its top level (`text_config.num_attention_heads
    /// = 32`, `encoder_attention_heads = 6`, …), for the error when none can be chosen.
    nested_heads: Vec<String>,
}

/// One set of attention hyper-parameters of a config.json: its top level, a nested section
/// (`text_config`), or an encoder–decoder's `encoder_*` / `decoder_*` keys.
#[derive(Debug, Clone, Default)]
struct ConfigSection {
    /// Where its head count is, for messages (`text_config.num_attention_heads`).
    heads_key: String,
    heads: Option<usize>,
    /// `num_key_value_heads` (a fused `qkv_proj`'s split needs it).
    kv_heads: Option<usize>,
    /// The layer count (`num_hidden_layers`, `num_layers`, `n_layer`, `depth`, `encoder_layers`).
    layers: Option<usize>,
    /// The model width (`hidden_size`, `d_model`, `n_embd`, `dim`, `embed_dim`).
    width: Option<usize>,
    /// `model_type`.
    model_type: Option<String>,
}

impl ConfigSection {
    /// Whether this section describes a stack of `layers` layers of width `width`: it gives
    /// at least one of the two, and each it gives is the stack's.
    fn describes(&self, layers: usize, width: usize) -> bool {
        (self.layers.is_some() || self.width.is_some())
            && self.layers.is_none_or(|l| l == layers)
            && self.width.is_none_or(|w| w == width)
    }
}

/// The keys a `config.json` may give the head count under.
const HEAD_KEYS: [&str; 4] = ["num_attention_heads", "n_heads", "num_heads", "n_head"];
/// … the layer count under.
const LAYER_KEYS: [&str; 5] = [
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "depth",
];
/// … the model width under.
const WIDTH_KEYS: [&str; 5] = ["hidden_size", "d_model", "n_embd", "dim", "embed_dim"];

/// The config.json `model_type`s whose QK-norm (an RMSNorm) scales by `1 + w` rather than
/// `w`: the modeling files of transformers 5.25 whose `q_norm` multiplies by
/// `1.0 + self.weight` (their weights are initialised to 0), with their text and
/// sub-model types. Gemma 3n's and Gemma 4's scale by `w`, as Qwen3's and OLMo-2's do.
const GAIN_PLUS_ONE_MODEL_TYPES: [&str; 16] = [
    "gemma3",
    "gemma3_text",
    "t5gemma2",
    "t5gemma2_text",
    "t5gemma2_encoder",
    "t5gemma2_decoder",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen4_exp",
    "qwen4_exp_text",
    "minimax_m3_vl",
    "minimax_m3_vl_text",
    "step3p7",
];

/// The config.json `model_type`s whose `q_proj` gives each head `d_h` query rows followed by
/// `d_h` rows of a sigmoid output gate (transformers 5.25: `query, gate =
/// torch.chunk(q_proj(x).view(…, -1, 2·d_h), 2, dim=-1)`); the gate rows are not part of
/// `Q`.
const GATED_QUERY_MODEL_TYPES: [&str; 7] = [
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen4_exp",
    "qwen4_exp_text",
];

/// The config.json `model_type`s whose QK-norm is a LayerNorm (transformers 5.25): over
/// each head's `d_h` entries with a `[H, d_h]` gain (Cohere's Command R+ with `use_qk_norm`,
/// Chameleon), over each head with a `[d_h]` gain (Nemotron-3.5 Transcribe's audio
/// encoders), or over the whole projection (ESMC).
/// The mean subtraction is a linear map, `(I − 11ᵀ/n)` over each group of `n` rows, and
/// enters `Q` and `K`; its `1/σ` is per-token and left out, as an RMSNorm's `1/rms` is. A
/// norm with a bias beside its gain is a LayerNorm whatever the `model_type` (an RMSNorm has
/// none); the bias, like a projection's, is not read.
const LAYER_NORM_QK_MODEL_TYPES: [&str; 7] = [
    "cohere",
    "chameleon",
    "esmc",
    "nemo_speechlm",
    "nemotron3_5_transcribe_audio",
    "nemotron3_5_transcribe_asr_audio",
    "nemotron3_5_transcribe_word_timestamp",
];

/// Reads the attention hyper-parameters and the FP8 block size from a HF-style `config.json`
/// (none there: nothing is known).
fn read_config(path: &Path) -> Result<ConfigJson> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(ConfigJson::default());
    };
    let shown = path.display();
    let value = parse_json(path, &text)?;
    // A count under `key` of `object`, if there is one: an integer ≥ 1, else an error.
    let count = |object: &serde_json::Value, key: &str| -> Result<Option<usize>> {
        let Some(h) = object.get(key) else {
            return Ok(None);
        };
        match h.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n as usize)),
            _ => Err(err(format!("{shown}: {key} is {h}, not a count ≥ 1"))),
        }
    };
    // The first of `keys` that `object` has, if it is an integer ≥ 1 (lenient: a nested
    // section's or a size's odd value, such as Swin's per-stage `num_heads` list, is not an
    // error, only not a count).
    let first = |object: &serde_json::Value, keys: &[&str]| -> Option<usize> {
        let key = keys.iter().find(|key| object.get(**key).is_some())?;
        object[*key]
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
    };
    // The section at `object`, named `at` ("" for the top level, "text_config." below it).
    let section = |object: &serde_json::Value, at: &str| ConfigSection {
        heads_key: format!(
            "{at}{}",
            HEAD_KEYS
                .into_iter()
                .find(|key| object.get(key).is_some())
                .unwrap_or(HEAD_KEYS[0])
        ),
        heads: first(object, &HEAD_KEYS),
        kv_heads: first(object, &["num_key_value_heads"]),
        layers: first(object, &LAYER_KEYS),
        width: first(object, &WIDTH_KEYS),
        model_type: object
            .get("model_type")
            .and_then(|t| t.as_str())
            .map(str::to_string),
    };
    // The top level's head counts are checked: they are the ones used without a stack.
    let mut top = section(&value, "");
    top.heads = count(&value, &top.heads_key)?;
    top.kv_heads = count(&value, "num_key_value_heads")?;
    let mut config = ConfigJson {
        top,
        ..Default::default()
    };
    if let Some(sections) = value.as_object() {
        for (key, inner) in sections {
            // Whisper's `encoder_attention_heads`, BART's …: the encoder's or the decoder's.
            if key.contains("heads")
                && !key.contains("key_value")
                && !HEAD_KEYS.contains(&key.as_str())
                && inner.is_u64()
            {
                config.nested_heads.push(format!("{key} = {inner}"));
                if let Some(part) = key.strip_suffix("_attention_heads") {
                    config.nested.push(ConfigSection {
                        heads_key: key.clone(),
                        heads: first(&value, &[key.as_str()]),
                        layers: first(&value, &[&format!("{part}_layers")]),
                        width: config.top.width,
                        ..Default::default()
                    });
                }
            }
            if inner.is_object() {
                let nested = section(inner, &format!("{key}."));
                if let Some(h) = nested.heads {
                    config
                        .nested_heads
                        .push(format!("{} = {h}", nested.heads_key));
                    config.nested.push(nested);
                }
            }
        }
    }
    if let Some(block) = value.pointer("/quantization_config/weight_block_size") {
        let sizes: Option<Vec<usize>> = block
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_default();
        match sizes.as_deref() {
            Some(&[rows, cols]) if rows >= 1 && cols >= 1 => {
                config.scale_block = Some([rows, cols])
            }
            _ => {
                return Err(err(format!(
                    "{shown}: quantization_config.weight_block_size is {block}, not two sizes ≥ 1"
                )));
            }
        }
    }
    Ok(config)
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file =
            std::fs::File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        // SAFETY: the map is read-only and private to this process; a file truncated or
        // rewritten underneath it is the caller's concurrency problem, as with any reader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        // Checks the header and that the data offsets cover the file exactly.
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            err(format!(
                "{}: not a valid safetensors file ({e})",
                path.display()
            ))
        })?;
        Ok(Self {
            data_start: 8 + header,
            path,
            map,
            metadata,
        })
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(name)
            .ok_or_else(|| err(format!("{name}: not in {}", self.path.display())))
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.info(name)?;
        let (start, end) = info.data_offsets;
        let data = &self.map[self.data_start + start..self.data_start + end];
        TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| err(format!("{name} in {}: {e}", self.path.display())))
    }
}

/// The shard files of `path` (the file itself, those an index names, or a directory's) and,
/// for an index, each tensor it lists with the position of its shard.
type ShardFiles = (Vec<PathBuf>, Option<Vec<(String, usize)>>);

fn shard_files(path: &Path) -> Result<ShardFiles> {
    let shown = path.display();
    if path.is_dir() {
        let index = path.join(SHARD_INDEX);
        if index.is_file() {
            return indexed_shards(&index);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| err(format!("{shown}: {e}")))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(err(format!(
                "{shown}: no {SHARD_INDEX} and no .safetensors file in this directory"
            )));
        }
        return Ok((files, None));
    }
    if path.extension().is_some_and(|x| x == "json") {
        return indexed_shards(path);
    }
    Ok((vec![path.to_path_buf()], None))
}

/// The shard files that a HF index's `weight_map` names, in order of first mention, and
/// each tensor with the position of its shard.
fn indexed_shards(index: &Path) -> Result<ShardFiles> {
    let shown = index.display();
    let text = std::fs::read_to_string(index).map_err(|e| err(format!("{shown}: {e}")))?;
    let value = parse_json(index, &text)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            err(format!(
                "{shown}: no \"weight_map\" object (not a shard index)"
            ))
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    // Shard path → position in `files` (DeepSeek-V3 lists ≈ 90 000 tensors in 163 shards).
    let mut position: BTreeMap<PathBuf, usize> = BTreeMap::new();
    let mut listed = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| {
            err(format!(
                "{shown}: the shard of {tensor} is {file}, not a file name"
            ))
        })?;
        let path = dir.join(name);
        let s = *position.entry(path.clone()).or_insert_with(|| {
            files.push(path);
            files.len() - 1
        });
        listed.push((tensor.clone(), s));
    }
    if files.is_empty() {
        return Err(err(format!("{shown}: the weight_map is empty")));
    }
    Ok((files, Some(listed)))
}

/// The tensors one layer's attention is read from, by role.
enum Parts<'a> {
    Mha {
        q: &'a Entry,
        k: &'a Entry,
        /// QK-norm gains (`q_norm`, `k_norm`: Qwen3, Gemma 3, OLMo-2).
        q_norm: Option<&'a Entry>,
        k_norm: Option<&'a Entry>,
    },
    /// One fused query/key/value projection.
    Fused { w: &'a Entry, fused: Fused },
    Mla {
        /// `q_a_proj` and `q_a_layernorm`.
        q_down: Option<(&'a Entry, Option<&'a Entry>)>,
        /// `q_b_proj`, or `q_proj` without query compression.
        q_up: &'a Entry,
        kv_down: &'a Entry,
        kv_norm: Option<&'a Entry>,
        kv_up: &'a Entry,
    },
}

impl Checkpoint {
    /// Opens and validates a checkpoint: a `.safetensors` file, a sharded checkpoint's
    /// [`SHARD_INDEX`], or a directory with either. `heads` overrides the head count of a
    /// `config.json` beside it.
    ///
    /// # Errors
    /// Unreadable or corrupt files (bad header, offsets out of range, truncated data), an
    /// index that is not one or names a tensor its shard lacks, a tensor in two shards, a
    /// `config.json` that is not JSON or has a head count below 1, no attention weights, or
    /// attention weights in more than one stack ([`Checkpoint::open_stack`] chooses one).
    pub fn open(path: impl AsRef<Path>, heads: Option<usize>) -> Result<Self> {
        Self::open_stack(path, heads, None)
    }

    /// [`Checkpoint::open`] for a checkpoint with several stacks of attention layers (a
    /// vision-language model's vision tower and language model, an encoder and a decoder):
    /// `stack` is the name before `.N.` of the one to read (`model.language_model.layers`).
    /// `None` reads the only stack there is.
    ///
    /// # Errors
    /// As [`Checkpoint::open`], and a `stack` the checkpoint does not have (the error lists
    /// those it has).
    pub fn open_stack(
        path: impl AsRef<Path>,
        heads: Option<usize>,
        stack: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if heads == Some(0) {
            return Err(err("--heads must be at least 1"));
        }
        let (files, listed) = shard_files(&path)?;
        let shards = files
            .into_iter()
            .map(Shard::open)
            .collect::<Result<Vec<_>>>()?;
        if let Some(expected) = &listed {
            for (name, s) in expected {
                if shards[*s].metadata.info(name).is_none() {
                    return Err(err(format!(
                        "{}: the index puts {name} in {}, which has no such tensor",
                        path.display(),
                        shards[*s].path.display()
                    )));
                }
            }
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut stacks: BTreeMap<String, BTreeMap<usize, BTreeMap<String, Entry>>> =
            BTreeMap::new();
        let mut scales = BTreeMap::new();
        // The gains (`….q_norm.weight`) of norms with a bias: LayerNorms.
        let mut norm_biases = BTreeSet::new();
        // A GPTQ/AWQ-packed weight's name, for the error when nothing else is found.
        let mut packed = None;
        for (s, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().into_keys() {
                if let Some(other) = seen.insert(name.clone(), s) {
                    return Err(err(format!(
                        "{name} is in both {} and {}",
                        shards[other].path.display(),
                        shard.path.display()
                    )));
                }
                if packed.is_none() && name.ends_with(".qweight") {
                    packed = Some(name.clone());
                }
                if let Some(norm) = name.strip_suffix("_norm.bias") {
                    norm_biases.insert(format!("{norm}_norm.weight"));
                }
                match parse_attention_name(&name) {
                    Some(AttentionName {
                        stack,
                        index,
                        leaf,
                        role: Role::Weight,
                    }) => {
                        stacks
                            .entry(stack)
                            .or_default()
                            .entry(index)
                            .or_default()
                            .insert(leaf, Entry { shard: s, name });
                    }
                    Some(AttentionName {
                        role: Role::ScaleInv,
                        ..
                    }) => {
                        let weight = name.trim_end_matches("_scale_inv").to_string();
                        scales.insert(weight, Entry { shard: s, name });
                    }
                    None => {}
                }
            }
        }
        let beside = path.parent().unwrap_or(Path::new(".")).join(SHARD_INDEX);
        let shard_hint = if path.is_file() && listed.is_none() && beside.is_file() {
            format!(
                " ({} is one shard of the checkpoint indexed by {}: pass that index or its directory)",
                path.display(),
                beside.display()
            )
        } else {
            String::new()
        };
        if stacks.is_empty() {
            let packed = packed
                .map(|name| {
                    format!("; {name} is a GPTQ/AWQ-packed weight, which is not read: dequantize the checkpoint first")
                })
                .unwrap_or_default();
            return Err(err(format!(
                "{}: no attention weights found (expected names like model.layers.0.self_attn.q_proj.weight){packed}{shard_hint}",
                path.display()
            )));
        }
        let listing = stacks
            .iter()
            .map(|(s, l)| {
                let plural = if l.len() == 1 { "" } else { "s" };
                format!("{} ({} layer{plural})", stack_pattern(s), l.len())
            })
            .collect::<Vec<_>>()
            .join(", ");
        let stack = match stack {
            Some(chosen) => chosen.to_string(),
            None if stacks.len() == 1 => stacks.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(err(format!(
                    "{}: attention layers in {} stacks, {}: choose one by its name (`--stack {}` for the first)",
                    path.display(),
                    stacks.len(),
                    listing,
                    stacks.keys().next().map(String::as_str).unwrap_or_default()
                )));
            }
        };
        let Some(layers) = stacks.remove(&stack) else {
            return Err(err(format!(
                "{}: no attention stack `{}` (stacks: {})",
                path.display(),
                stack_pattern(&stack),
                listing
            )));
        };
        let dir = if path.is_dir() {
            path.as_path()
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        // HF's config.json, else the params.json of Mistral's and Meta's own format.
        let config = ["config.json", "params.json"]
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join("config.json"));
        let config = read_config(&config)?;
        let mut checkpoint = Self {
            heads: None,
            heads_from: None,
            scales,
            norm_biases,
            scale_block: config.scale_block.unwrap_or([128, 128]),
            model_type: None,
            kv_heads: None,
            nested_heads: config.nested_heads,
            path,
            shards,
            stack,
            layers,
            shard_hint,
        };
        // The config.json section that describes this stack: the one section (or several
        // that agree) whose layer count and width are the stack's, else the top level.
        let (count, width) = checkpoint.stack_size();
        let agreeing = |a: &ConfigSection, b: &ConfigSection| {
            (a.heads, a.kv_heads, &a.model_type) == (b.heads, b.kv_heads, &b.model_type)
        };
        let describing: Vec<&ConfigSection> = std::iter::once(&config.top)
            .chain(&config.nested)
            .filter(|s| s.heads.is_some() && width.is_some_and(|w| s.describes(count, w)))
            .collect();
        let section = match describing.as_slice() {
            [one, rest @ ..] if rest.iter().all(|s| agreeing(one, s)) => Some(*one),
            _ if config.top.heads.is_some() => Some(&config.top),
            _ => None,
        };
        checkpoint.heads = heads.or(section.and_then(|s| s.heads));
        checkpoint.heads_from = match section {
            _ if heads.is_some() => Some(HeadsFrom::Caller),
            Some(s) if std::ptr::eq(s, &config.top) => {
                Some(HeadsFrom::TopLevel(s.heads_key.clone()))
            }
            Some(s) => Some(HeadsFrom::Section(s.heads_key.clone())),
            None => None,
        };
        checkpoint.kv_heads = section.and_then(|s| s.kv_heads);
        checkpoint.model_type = section
            .and_then(|s| s.model_type.clone())
            .or(config.top.model_type);
        Ok(checkpoint)
    }

    /// The stack's layer count (its highest index plus one) and, read off the first layer's
    /// headers, its model width (`None` where the headers do not tell it): the input side of
    /// the projection its keys are read from.
    fn stack_size(&self) -> (usize, Option<usize>) {
        let count = self.layers.keys().next_back().map_or(0, |last| last + 1);
        let width = self.layers.keys().next().and_then(|&first| {
            let shape = |e: &Entry| self.shape::<2>(e).ok();
            match self.parts(first).ok()? {
                Parts::Mha { k, .. } => shape(k).map(|[_, d]| d),
                Parts::Mla { kv_down, .. } => shape(kv_down).map(|[_, d]| d),
                Parts::Fused { w, fused } => shape(w).map(|s| fused.input_width(s)),
            }
        });
        (count, width)
    }

    /// The name before `.N.` of the stack of layers read (`model.layers` for HF LLaMA).
    pub fn stack(&self) -> &str {
        &self.stack
    }

    /// The layer indices that have attention weights, ascending.
    pub fn layer_indices(&self) -> Vec<usize> {
        self.layers.keys().copied().collect()
    }

    /// The head count in use.
    pub fn heads(&self) -> Option<usize> {
        self.heads
    }

    /// Where the head count came from: the caller, config.json's top level, or the section
    /// of it that describes the stack read (`None`: no head count).
    pub fn heads_from(&self) -> Option<&HeadsFrom> {
        self.heads_from.as_ref()
    }

    /// How many files the checkpoint is read from.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Whether the QK-norm whose gain is `gain` is a LayerNorm (mean subtracted:
    /// [`LAYER_NORM_QK_MODEL_TYPES`], or a bias beside the gain) rather than an RMSNorm.
    fn is_layer_norm(&self, gain: &Entry) -> bool {
        self.model_type_in(&LAYER_NORM_QK_MODEL_TYPES) || self.norm_biases.contains(&gain.name)
    }

    /// A QK-norm gain's length and, for a LayerNorm, how many consecutive rows it centres
    /// together, from the headers: a `[d_h]` gain (shared by the heads) or a `[H, d_h]` one
    /// (a LayerNorm's, per head) centres each head's `d_h` rows, a gain with the
    /// projection's `rows` entries all of them. An RMSNorm centres nothing (`None`).
    fn qk_norm_shape(
        &self,
        gain: &Entry,
        rows: usize,
        head_dim: usize,
    ) -> Result<(usize, Option<usize>)> {
        let layer_norm = self.is_layer_norm(gain);
        let (len, group) = match self.shards[gain.shard].info(&gain.name)?.shape.as_slice() {
            [heads, width] if layer_norm => {
                self.shape::<2>(gain)?;
                if *width != head_dim {
                    return Err(err(format!(
                        "{} is [{heads}, {width}], not [H, {head_dim}]",
                        gain.name
                    )));
                }
                (heads * width, head_dim)
            }
            _ => {
                let [len] = self.shape::<1>(gain)?;
                (len, if len == rows { rows } else { head_dim })
            }
        };
        check_norm_gain(&gain.name, len, rows, head_dim)?;
        Ok((len, layer_norm.then_some(group)))
    }

    /// Whether `q_proj` holds each head's query rows followed by as many rows of an output
    /// gate ([`GATED_QUERY_MODEL_TYPES`]).
    fn gated_query(&self) -> bool {
        self.model_type_in(&GATED_QUERY_MODEL_TYPES)
    }

    /// Whether config.json's `model_type` is one of `types`.
    fn model_type_in(&self, types: &[&str]) -> bool {
        self.model_type
            .as_deref()
            .is_some_and(|t| types.contains(&t))
    }

    /// The head count, or the error that says where to give it.
    fn known_heads(&self) -> Result<usize> {
        self.heads.ok_or_else(|| {
            if self.nested_heads.is_empty() {
                err("cannot tell the number of heads: no config.json (or params.json) beside the checkpoint gives num_attention_heads; put the model's there or pass --heads")
            } else {
                let (count, width) = self.stack_size();
                let width = width.map(|w| format!(" of width {w}")).unwrap_or_default();
                let plural = if count == 1 { "" } else { "s" };
                err(format!(
                    "cannot tell the number of heads: config.json has no num_attention_heads, only {}, and no one of its sections (or several that agree) gives the layer count and width of the stack read, {} ({count} layer{plural}{width}): pass --heads with that stack's",
                    self.nested_heads.join(", "),
                    stack_pattern(&self.stack)
                ))
            }
        })
    }

    /// Which tensors layer `index` is read from.
    fn parts(&self, index: usize) -> Result<Parts<'_>> {
        let leaves = self
            .layers
            .get(&index)
            .ok_or_else(|| err(format!("no attention weights for layer {index}")))?;
        let entry = |leaf: &str| leaves.get(leaf);
        let need = |leaf: &str| {
            entry(leaf).ok_or_else(|| {
                err(format!(
                    "layer {index}: MLA layer without {leaf}{}",
                    self.shard_hint
                ))
            })
        };
        if let Some(kv_down) = entry("kv_a_proj_with_mqa") {
            let q_down = entry("q_a_proj").map(|qa| (qa, entry("q_a_layernorm")));
            Ok(Parts::Mla {
                q_up: need(if q_down.is_some() {
                    "q_b_proj"
                } else {
                    "q_proj"
                })?,
                q_down,
                kv_down,
                kv_norm: entry("kv_a_layernorm"),
                kv_up: need("kv_b_proj")?,
            })
        } else if let (Some(q), Some(k)) = (
            entry("q_proj").or(entry("wq")),
            entry("k_proj").or(entry("wk")),
        ) {
            Ok(Parts::Mha {
                q,
                k,
                q_norm: entry("q_norm"),
                k_norm: entry("k_norm"),
            })
        } else if let Some((w, fused)) = Fused::LEAVES
            .into_iter()
            .find_map(|(leaf, fused)| entry(leaf).map(|w| (w, fused)))
        {
            if let Some(model_type) = self.model_type.as_deref()
                && !self.model_type_in(fused.model_types())
            {
                return Err(err(format!(
                    "layer {index}: {}'s layout depends on the model, and config.json's model_type `{model_type}` is not one whose layout is read ({})",
                    fused.leaf(),
                    Fused::LEAVES
                        .iter()
                        .map(|(leaf, f)| format!("{leaf}: {}", f.model_types().join(", ")))
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            Ok(Parts::Fused { w, fused })
        } else {
            Err(err(format!(
                "layer {index}: none of q_proj/k_proj, wq/wk, kv_a_proj_with_mqa, qkv_proj, query_key_value or c_attn found (have: {}){}",
                leaves.keys().cloned().collect::<Vec<_>>().join(", "),
                self.shard_hint
            )))
        }
    }

    /// A tensor's shape from the header, checking its rank and that its dtype is read.
    fn shape<const R: usize>(&self, e: &Entry) -> Result<[usize; R]> {
        let info = self.shards[e.shard].info(&e.name)?;
        if element_decoder(info.dtype).is_none() {
            return Err(unsupported_dtype(&e.name, info.dtype));
        }
        info.shape.as_slice().try_into().map_err(|_| {
            err(format!(
                "{}: expected a rank-{R} tensor, found shape {:?}",
                e.name, info.shape
            ))
        })
    }

    /// A tensor's values as `f32`, checking its rank.
    fn load<const R: usize>(&self, e: &Entry) -> Result<(Vec<f32>, [usize; R])> {
        let shape = self.shape::<R>(e)?;
        Ok((self.values(e)?, shape))
    }

    /// A tensor's values as `f32`, whatever its rank.
    fn values(&self, e: &Entry) -> Result<Vec<f32>> {
        tensor_to_f32(&e.name, &self.shards[e.shard].view(&e.name)?)
    }

    /// A weight matrix's `[rows, cols]`, and its FP8 block scales' entry, whose shape must be
    /// `[⌈rows/b_r⌉, ⌈cols/b_c⌉]` for blocks of `b_r × b_c`.
    fn matrix_shape(&self, e: &Entry) -> Result<([usize; 2], Option<&Entry>)> {
        let [rows, cols] = self.shape::<2>(e)?;
        let Some(scale) = self.scales.get(&e.name) else {
            return Ok(([rows, cols], None));
        };
        let [br, bc] = self.scale_block;
        let want = [rows.div_ceil(br), cols.div_ceil(bc)];
        let found = self.shape::<2>(scale)?;
        if found != want {
            return Err(err(format!(
                "{}: {found:?} scales for a [{rows}, {cols}] weight in blocks of {br} × {bc} (expected {want:?})",
                scale.name
            )));
        }
        Ok(([rows, cols], Some(scale)))
    }

    /// A weight matrix as `f32`, its FP8 block scales applied (`W = W₈ · s[i/b_r, j/b_c]`, as
    /// DeepSeek-V3's `weight_dequant`).
    fn matrix(&self, e: &Entry) -> Result<RowMajor> {
        let ([rows, cols], scale) = self.matrix_shape(e)?;
        let (mut data, _) = self.load::<2>(e)?;
        if let Some(scale) = scale {
            let (s, _) = self.load::<2>(scale)?;
            let [br, bc] = self.scale_block;
            let per_row = cols.div_ceil(bc);
            for (i, row) in data.chunks_exact_mut(cols).enumerate() {
                for (j, w) in row.iter_mut().enumerate() {
                    *w *= s[(i / br) * per_row + j / bc];
                }
            }
            if let Some(i) = data.iter().position(|w| !w.is_finite()) {
                return Err(err(format!(
                    "{}: scaled by {}, entry {i} overflows f32",
                    e.name, scale.name
                )));
            }
        }
        RowMajor::new(data, rows, cols)
    }

    fn vector(&self, e: Option<&Entry>) -> Result<Option<Vec<f32>>> {
        e.map(|e| self.load::<1>(e).map(|(v, _)| v)).transpose()
    }

    /// A projection with its QK-norm's gain, if any, applied to its rows: `diag(g)·W`, `g`
    /// repeated over the heads when it has `d_h` entries (`1 + w` for
    /// [`GAIN_PLUS_ONE_MODEL_TYPES`]), after a LayerNorm's centring
    /// ([`Checkpoint::qk_norm_shape`]). `gated_heads`: a gated query's head count, whose
    /// gate rows are dropped first ([`GATED_QUERY_MODEL_TYPES`]).
    fn normed(
        &self,
        w: &Entry,
        norm: Option<&Entry>,
        gated_heads: Option<usize>,
        head_dim: usize,
    ) -> Result<RowMajor> {
        let mut w = self.matrix(w)?;
        if let Some(heads) = gated_heads {
            // Head after head: d_h query rows, then d_h gate rows.
            let per_head = w.rows / heads * w.cols;
            let query: Vec<f32> = w
                .data
                .chunks_exact(per_head)
                .flat_map(|head| &head[..per_head / 2])
                .copied()
                .collect();
            w = RowMajor::new(query, w.rows / 2, w.cols)?;
        }
        let gain = match norm {
            Some(e) => {
                let (_, centred) = self.qk_norm_shape(e, w.rows, head_dim)?;
                // A LayerNorm over groups of n rows (a head's d_h, or all): centring,
                // (I − 11ᵀ/n)·W_group, then the gain.
                if let Some(n) = centred {
                    for block in w.data.chunks_exact_mut(n * w.cols) {
                        let mut mean = vec![0.0f64; w.cols];
                        for row in block.chunks_exact(w.cols) {
                            for (m, x) in mean.iter_mut().zip(row) {
                                *m += f64::from(*x) / n as f64;
                            }
                        }
                        for row in block.chunks_exact_mut(w.cols) {
                            for (x, m) in row.iter_mut().zip(&mean) {
                                *x = (f64::from(*x) - m) as f32;
                            }
                        }
                    }
                }
                Some(self.values(e)?)
            }
            None => None,
        };
        if let Some(mut gain) = gain {
            if self.model_type_in(&GAIN_PLUS_ONE_MODEL_TYPES) {
                gain.iter_mut().for_each(|g| *g += 1.0);
            }
            for (r, row) in w.data.chunks_exact_mut(w.cols).enumerate() {
                let g = gain[r % gain.len()];
                row.iter_mut().for_each(|x| *x *= g);
            }
        }
        Ok(w)
    }

    /// Layer `index`'s parametrisation, from the headers alone (no tensor is read): every
    /// check of [`Checkpoint::layer`] but the values' finiteness. Checking every layer this
    /// way first finds a malformed checkpoint before any work is done.
    ///
    /// # Errors
    /// As [`Checkpoint::layer`], less non-finite values.
    pub fn layout(&self, index: usize) -> Result<AttentionKind> {
        let heads = self.known_heads()?;
        match self.parts(index)? {
            Parts::Mha {
                q,
                k,
                q_norm,
                k_norm,
            } => {
                let (mut q, k) = (self.matrix_shape(q)?.0, self.matrix_shape(k)?.0);
                if self.gated_query() {
                    if !q[0].is_multiple_of(2 * heads) {
                        return Err(err(format!(
                            "layer {index}: a gated q_proj has {} rows, not 2·H·d_h for H = {heads}",
                            q[0]
                        )));
                    }
                    q[0] /= 2;
                }
                let kind = mha_layout(index, heads, q, k)?;
                let head_dim = q[0] / heads;
                for (gain, rows) in [(q_norm, q[0]), (k_norm, k[0])] {
                    if let Some(gain) = gain {
                        self.qk_norm_shape(gain, rows, head_dim)?;
                    }
                }
                Ok(kind)
            }
            Parts::Fused { w, fused } => {
                let (q, k) =
                    fused.split_shapes(index, heads, self.kv_heads, self.matrix_shape(w)?.0)?;
                mha_layout(index, heads, q, k)
            }
            Parts::Mla {
                q_down,
                q_up,
                kv_down,
                kv_norm,
                kv_up,
            } => {
                let length = |e: Option<&Entry>| -> Result<Option<usize>> {
                    e.map(|e| self.shape::<1>(e).map(|[n]| n)).transpose()
                };
                let matrix = |e: &Entry| self.matrix_shape(e).map(|(shape, _)| shape);
                let q_down = match q_down {
                    Some((qa, g)) => Some((matrix(qa)?, length(g)?)),
                    None => None,
                };
                let shapes = MlaShapes {
                    q_down,
                    q_up: matrix(q_up)?,
                    kv_down: matrix(kv_down)?,
                    kv_norm: length(kv_norm)?,
                    kv_up: matrix(kv_up)?,
                };
                mla_layout(index, heads, &shapes).map(|l| l.kind)
            }
        }
    }

    /// Forms layer `index`'s effective `Q` and `K`.
    ///
    /// # Errors
    /// Unknown head count, missing tensors, an unread dtype, non-finite values, or shapes
    /// that contradict the head count or each other.
    pub fn layer(&self, index: usize) -> Result<AttentionLayer> {
        let heads = self.known_heads()?;
        match self.weights(index)? {
            LayerWeights::Mha { q, k } => mha_effective(index, heads, q, k),
            LayerWeights::Mla(w) => mla_effective(index, heads, w),
        }
    }

    /// Forms what layer `index`'s diagnostics read ([`LayerFactors`]): for an MLA layer
    /// its key basis alone, without the `d`-wide `Q, K` of [`Checkpoint::layer`]
    /// ([`mla_factors`]). `cargo xtask diagnose` goes through it.
    ///
    /// # Errors
    /// As [`Checkpoint::layer`].
    pub fn layer_factors(&self, index: usize) -> Result<LayerFactors> {
        let heads = self.known_heads()?;
        match self.weights(index)? {
            LayerWeights::Mha { q, k } => mha_effective(index, heads, q, k).map(Into::into),
            LayerWeights::Mla(w) => mla_factors(index, heads, w),
        }
    }

    /// Layer `index`'s projection weights, read once its shapes are checked.
    fn weights(&self, index: usize) -> Result<LayerWeights> {
        // The shapes first: a malformed layer is reported before its tensors are read.
        let kind = self.layout(index)?;
        Ok(match self.parts(index)? {
            Parts::Mha {
                q,
                k,
                q_norm,
                k_norm,
            } => {
                let gated = self.gated_query().then_some(self.known_heads()?);
                let AttentionKind::Mha { head_dim, .. } = kind else {
                    return Err(err(format!(
                        "layer {index}: q_proj and k_proj, not an MHA layout"
                    )));
                };
                LayerWeights::Mha {
                    q: self.normed(q, q_norm, gated, head_dim)?,
                    k: self.normed(k, k_norm, None, head_dim)?,
                }
            }
            Parts::Fused { w, fused } => {
                let heads = self.known_heads()?;
                let w = self.matrix(w)?;
                let (q, k) = fused.split_shapes(index, heads, self.kv_heads, [w.rows, w.cols])?;
                let (q, k) = fused.split(&w, heads, q, k)?;
                LayerWeights::Mha { q, k }
            }
            Parts::Mla {
                q_down,
                q_up,
                kv_down,
                kv_norm,
                kv_up,
            } => {
                let q_down = match q_down {
                    Some((qa, g)) => Some((self.matrix(qa)?, self.vector(g)?)),
                    None => None,
                };
                LayerWeights::Mla(MlaWeights {
                    q_down,
                    q_up: self.matrix(q_up)?,
                    kv_down: self.matrix(kv_down)?,
                    kv_norm: self.vector(kv_norm)?,
                    kv_up: self.matrix(kv_up)?,
                })
            }
        })
    }
}

/// How a fused query/key/value projection orders its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fused {
    /// `qkv_proj` `[H·d_h + 2·H_kv·d_h, d]`: every query row, then the keys', then the
    /// values' (Phi-3; `H_kv` from config.json's `num_key_value_heads`, else `H`).
    Stacked,
    /// `query_key_value` `[3·H·d_h, d]`: head after head, its query, key and value rows
    /// (GPT-NeoX/Pythia, BLOOM).
    PerHead,
    /// `c_attn` `[d, 3·d]`, a Conv1D's `[in, out]`: query, key and value columns (GPT-2).
    Conv1D,
}

impl Fused {
    /// The leaf names, in the order they are looked for.
    const LEAVES: [(&'static str, Fused); 3] = [
        ("qkv_proj", Fused::Stacked),
        ("query_key_value", Fused::PerHead),
        ("c_attn", Fused::Conv1D),
    ];

    /// The leaf name.
    fn leaf(self) -> &'static str {
        Self::LEAVES
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(leaf, _)| leaf)
    }

    /// The config.json `model_type`s whose fused projection is laid out this way. Others
    /// use the same names differently (Falcon's and ChatGLM's `query_key_value`, Qwen-1's
    /// and StarCoder's `c_attn`): a checkpoint of another known type is an error, not a
    /// guess; one without a config.json is read by the name alone.
    fn model_types(self) -> &'static [&'static str] {
        match self {
            Fused::Stacked => &["phi3"],
            Fused::PerHead => &["gpt_neox", "bloom"],
            Fused::Conv1D => &["gpt2"],
        }
    }

    /// The model width `d` of a fused projection of `[rows, cols]`: its input side (a
    /// Conv1D stores `[in, out]`, a Linear `[out, in]`).
    fn input_width(self, [rows, cols]: [usize; 2]) -> usize {
        match self {
            Fused::Conv1D => rows,
            Fused::Stacked | Fused::PerHead => cols,
        }
    }

    /// The `[rows, cols]` of the query and key projections inside a fused one of `shape`.
    fn split_shapes(
        self,
        index: usize,
        heads: usize,
        kv_heads: Option<usize>,
        [rows, cols]: [usize; 2],
    ) -> Result<([usize; 2], [usize; 2])> {
        match self {
            Fused::Stacked => {
                let kv = kv_heads.unwrap_or(heads);
                let per = heads + 2 * kv;
                if rows == 0 || rows % per != 0 {
                    return Err(err(format!(
                        "layer {index}: qkv_proj has {rows} rows, not (H + 2·H_kv)·d_h for H = {heads}, H_kv = {kv} (config.json's num_key_value_heads)"
                    )));
                }
                let (hd, d) = (rows / per, self.input_width([rows, cols]));
                Ok(([heads * hd, d], [kv * hd, d]))
            }
            Fused::PerHead => {
                if rows == 0 || rows % (3 * heads) != 0 {
                    return Err(err(format!(
                        "layer {index}: query_key_value has {rows} rows, not 3·H·d_h for H = {heads}"
                    )));
                }
                let d = self.input_width([rows, cols]);
                Ok(([rows / 3, d], [rows / 3, d]))
            }
            Fused::Conv1D => {
                if cols == 0 || cols != 3 * rows {
                    return Err(err(format!(
                        "layer {index}: c_attn is [{rows}, {cols}], not GPT-2's Conv1D [d, 3·d]"
                    )));
                }
                let d = self.input_width([rows, cols]);
                Ok(([cols / 3, d], [cols / 3, d]))
            }
        }
    }

    /// The query and key projections (`[out, in]`) inside the fused `w`, whose split is
    /// `q`, `k` ([`Fused::split_shapes`]).
    fn split(
        self,
        w: &RowMajor,
        heads: usize,
        q: [usize; 2],
        k: [usize; 2],
    ) -> Result<(RowMajor, RowMajor)> {
        let rows = |range: std::ops::Range<usize>| {
            w.data[range.start * w.cols..range.end * w.cols].to_vec()
        };
        let (qd, kd) = match self {
            Fused::Stacked => (rows(0..q[0]), rows(q[0]..q[0] + k[0])),
            Fused::PerHead => {
                let hd = q[0] / heads;
                let (mut qd, mut kd) = (
                    Vec::with_capacity(q[0] * q[1]),
                    Vec::with_capacity(k[0] * k[1]),
                );
                for h in 0..heads {
                    qd.extend(rows(3 * h * hd..(3 * h + 1) * hd));
                    kd.extend(rows((3 * h + 1) * hd..(3 * h + 2) * hd));
                }
                (qd, kd)
            }
            Fused::Conv1D => {
                let m = q[0];
                let column = |c: usize| (0..w.rows).map(move |r| w.data[r * w.cols + c]);
                (
                    (0..m).flat_map(column).collect(),
                    (m..2 * m).flat_map(column).collect(),
                )
            }
        };
        Ok((
            RowMajor::new(qd, q[0], q[1])?,
            RowMajor::new(kd, k[0], k[1])?,
        ))
    }
}

/// One layer's projection weights as read.
enum LayerWeights {
    Mha { q: RowMajor, k: RowMajor },
    Mla(MlaWeights),
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

    /// [`write_safetensors`] in `f32` for owned names.
    fn write_owned(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        write_safetensors(path, &refs, Dtype::F32);
    }

    /// A fresh directory for one test's files (removed by the test).
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rmt-ckpt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
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
        let name = |stack: &str, index, leaf: &str, role| {
            Some(AttentionName {
                stack: stack.into(),
                index,
                leaf: leaf.into(),
                role,
            })
        };
        assert_eq!(
            parse_attention_name("model.layers.11.self_attn.q_proj.weight"),
            name("model.layers", 11, "q_proj", Role::Weight)
        );
        assert_eq!(
            parse_attention_name("layers.0.attn.kv_b_proj.weight"),
            name("layers", 0, "kv_b_proj", Role::Weight)
        );
        assert_eq!(
            parse_attention_name("model.layers.4.self_attn.q_a_proj.weight_scale_inv"),
            name("model.layers", 4, "q_a_proj", Role::ScaleInv)
        );
        assert_eq!(
            parse_attention_name("model.vision.layers.0.mlp.layers.2.self_attn.k_proj.weight"),
            name(
                "model.vision.layers.0.mlp.layers",
                2,
                "k_proj",
                Role::Weight
            )
        );
        assert_eq!(
            parse_attention_name("transformer.h.3.attn.c_attn.weight"),
            name("transformer.h", 3, "c_attn", Role::Weight)
        );
        assert_eq!(
            parse_attention_name("gpt_neox.layers.0.attention.query_key_value.weight"),
            name("gpt_neox.layers", 0, "query_key_value", Role::Weight)
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

    /// A vision-language model's two stacks of `layers.0` are not merged: opening it without
    /// a stack is an error that names both; each stack reads its own weights.
    #[test]
    fn several_stacks_are_told_apart() {
        let dir = scratch_dir("stacks");
        let path = dir.join("model.safetensors");
        let (text, vision) = ("model.language_model", "model.vision_tower.encoder");
        let stack = |prefix: &str| format!("{prefix}.layers");
        // The language model's one layer is 4 wide, the vision tower's 6.
        let stacks = [(text, 1, 4), (vision, 3, 6)];
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = stacks
            .iter()
            .flat_map(|&(stack, seed, d)| {
                ["q_proj", "k_proj"]
                    .into_iter()
                    .enumerate()
                    .map(move |(i, leaf)| {
                        let name = format!("{stack}.layers.0.self_attn.{leaf}.weight");
                        (name, vec![d, d], values(d * d, seed + i as u32))
                    })
            })
            .collect();
        let borrowed: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        write_safetensors(&path, &borrowed, Dtype::F32);
        let e = Checkpoint::open(&path, Some(2)).unwrap_err().to_string();
        assert!(e.contains("2 stacks"), "{e}");
        assert!(e.contains("model.language_model.layers.N (1 layer)"), "{e}");
        assert!(
            e.contains("model.vision_tower.encoder.layers.N (1 layer)"),
            "{e}"
        );
        assert!(e.contains("`--stack model.language_model.layers`"), "{e}");
        for (prefix, seed, d) in stacks {
            let ck = Checkpoint::open_stack(&path, Some(2), Some(&stack(prefix))).unwrap();
            assert_eq!(ck.stack(), stack(prefix));
            assert_eq!(ck.heads_from(), Some(&HeadsFrom::Caller));
            assert_eq!(ck.layer(0).unwrap().q, values(d * d, seed));
        }
        let e = Checkpoint::open_stack(&path, Some(2), Some("model.layer"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no attention stack `model.layer.N`"), "{e}");
        // A vision-language config.json gives its head counts one level down. The section
        // whose layer count and width are the stack's gives its head count, KV-head count
        // and model_type; a top level that describes the stack comes first.
        let open_with = |config: &str, prefix: &str| {
            std::fs::write(dir.join("config.json"), config).unwrap();
            Checkpoint::open_stack(&path, None, Some(&stack(prefix))).unwrap()
        };
        let nested = r#""text_config": {"num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1, "hidden_size": 4, "model_type": "gemma3_text"}, "vision_config": {"num_heads": 3, "num_hidden_layers": 1, "hidden_size": 6}"#;
        for (config, prefix, heads, from, kv_heads, model_type) in [
            (
                format!(r#"{{{nested}, "model_type": "gemma3"}}"#),
                text,
                2,
                "text_config.num_attention_heads",
                Some(1),
                "gemma3_text",
            ),
            (
                format!(r#"{{{nested}, "model_type": "gemma3"}}"#),
                vision,
                3,
                "vision_config.num_heads",
                None,
                "gemma3",
            ),
            // A top level that gives the text model's counts flat.
            (
                r#"{"num_attention_heads": 1, "num_hidden_layers": 1, "hidden_size": 4, "model_type": "llava", "vision_config": {"num_heads": 3, "hidden_size": 6}}"#.to_string(),
                text,
                1,
                "num_attention_heads",
                None,
                "llava",
            ),
            (
                r#"{"num_attention_heads": 1, "num_hidden_layers": 1, "hidden_size": 4, "model_type": "llava", "vision_config": {"num_heads": 3, "hidden_size": 6}}"#.to_string(),
                vision,
                3,
                "vision_config.num_heads",
                None,
                "llava",
            ),
            // A nested section's odd values (Swin's per-stage head list) are not counts, and
            // not errors.
            (
                r#"{"text_config": {"num_attention_heads": 2, "hidden_size": 4}, "vision_config": {"num_heads": [3, 6], "num_hidden_layers": 0, "hidden_size": 6}}"#.to_string(),
                text,
                2,
                "text_config.num_attention_heads",
                None,
                "",
            ),
            // An encoder–decoder's flat counts, told apart by their layer counts.
            (
                r#"{"encoder_attention_heads": 2, "encoder_layers": 3, "decoder_attention_heads": 3, "decoder_layers": 1, "d_model": 6}"#.to_string(),
                vision,
                3,
                "decoder_attention_heads",
                None,
                "",
            ),
        ] {
            let ck = open_with(&config, prefix);
            assert_eq!(ck.heads(), Some(heads), "{config} {prefix}");
            assert_eq!(
                ck.heads_from().map(HeadsFrom::key),
                Some(from),
                "{config} {prefix}"
            );
            assert_eq!(ck.kv_heads, kv_heads, "{config} {prefix}");
            assert_eq!(ck.model_type.as_deref().unwrap_or(""), model_type);
        }
        // No section describes the stack alone (no widths, equal layer counts, different
        // head counts): named in the error, for the caller to choose.
        let ck = open_with(
            r#"{"text_config": {"num_attention_heads": 2, "num_hidden_layers": 1}, "vision_config": {"num_heads": 1, "num_hidden_layers": 1}, "decoder_attention_heads": 2, "num_key_value_heads": 1}"#,
            text,
        );
        let e = ck.layer(0).unwrap_err().to_string();
        assert!(
            e.contains(
                "only decoder_attention_heads = 2, text_config.num_attention_heads = 2, vision_config.num_heads = 1, and no one of its sections (or several that agree) gives the layer count and width of the stack read, model.language_model.layers.N (1 layer of width 4): pass --heads"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn gqa_keys_are_repeated_per_group() {
        let dir = scratch_dir("gqa");
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

    /// QK-norm gains scale the projections' rows: a `[d_h]` gain in every head (Qwen3), a
    /// gain per row (OLMo-2), `1 + w` under Gemma 3's config.json but `w` under Gemma 4's;
    /// a gain of another length is an error found from the headers; a gated query's gate
    /// rows are dropped.
    #[test]
    fn qk_norm_gains_scale_the_rows() {
        let dir = scratch_dir("qknorm");
        let path = dir.join("model.safetensors");
        let (heads, kv, hd, d) = (4, 2, 3, 8);
        let (q, k) = (values(heads * hd * d, 1), values(kv * hd * d, 2));
        let (g_q, g_k) = (values(hd, 3), values(kv * hd, 4));
        // Layer 0: `q_proj` [q_rows, d], `k_proj` as above, and these norms (leaf, shape,
        // values); config.json with the model type.
        let write = |q_rows: usize, q_proj: &[f32], norms: &[(&str, Vec<usize>, Vec<f32>)]| {
            // `q_norm.bias` as it is, `q_norm` the gain.
            let name = |leaf: &str| match leaf.ends_with(".bias") {
                true => format!("model.layers.0.self_attn.{leaf}"),
                false => format!("model.layers.0.self_attn.{leaf}.weight"),
            };
            let mut tensors = vec![
                (name("q_proj"), vec![q_rows, d], q_proj.to_vec()),
                (name("k_proj"), vec![kv * hd, d], k.clone()),
            ];
            tensors.extend(
                norms
                    .iter()
                    .map(|(leaf, s, v)| (name(leaf), s.clone(), v.clone())),
            );
            let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
                .iter()
                .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
                .collect();
            write_safetensors(&path, &tensors, Dtype::F32);
        };
        let config = |model_type: &str| {
            std::fs::write(
                dir.join("config.json"),
                format!(r#"{{"num_attention_heads": {heads}, "model_type": "{model_type}"}}"#),
            )
            .unwrap()
        };
        let norms = |g_k_len: usize| {
            [
                ("q_norm", vec![hd], g_q.clone()),
                ("k_norm", vec![g_k_len], values(g_k_len, 4)),
            ]
        };
        write(heads * hd, &q, &norms(kv * hd));
        for (model_type, offset) in [("qwen3", 0.0), ("gemma3_text", 1.0), ("gemma4_text", 0.0)] {
            config(model_type);
            let layer = Checkpoint::open(&path, None).unwrap().layer(0).unwrap();
            for (r, row) in layer.q.chunks_exact(d).enumerate() {
                for (c, x) in row.iter().enumerate() {
                    assert_eq!(
                        *x,
                        q[r * d + c] * (g_q[r % hd] + offset),
                        "{model_type} Q[{r}, {c}]"
                    );
                }
            }
            // Query head h reads key head h / 2; key row r has its own gain.
            for (r, row) in layer.k.chunks_exact(d).enumerate() {
                let kr = (r / hd / 2) * hd + r % hd;
                for (c, x) in row.iter().enumerate() {
                    assert_eq!(
                        *x,
                        k[kr * d + c] * (g_k[kr] + offset),
                        "{model_type} K[{r}, {c}]"
                    );
                }
            }
        }
        write(heads * hd, &q, &norms(5));
        let ck = Checkpoint::open(&path, None).unwrap();
        let e = ck.layout(0).unwrap_err().to_string();
        assert!(e.contains("k_norm.weight has 5 entries"), "{e}");
        assert!(ck.layer(0).is_err());
        // A gated query (Qwen3-Next): q_proj gives each head hd query rows, then hd gate
        // rows; only the query rows are Q (and its gain is 1 + w).
        let gated: Vec<f32> = (0..heads)
            .flat_map(|h| [&q[h * hd * d..(h + 1) * hd * d], &vec![9.0; hd * d][..]].concat())
            .collect();
        write(2 * heads * hd, &gated, &[("q_norm", vec![hd], g_q.clone())]);
        config("qwen3_next");
        let layer = Checkpoint::open(&path, None).unwrap().layer(0).unwrap();
        let want: Vec<f32> = (0..heads * hd * d)
            .map(|i| q[i] * (g_q[(i / d) % hd] + 1.0))
            .collect();
        assert_eq!(layer.q, want);
        // LayerNorms: each group of `n` rows centred, then the gain (`gain[r % len]`).
        let layer_norm = |label: &str, n: usize, gain: &[f32]| {
            let layer = Checkpoint::open(&path, None).unwrap().layer(0).unwrap();
            for (r, row) in layer.q.chunks_exact(d).enumerate() {
                let group = r / n * n;
                for (c, x) in row.iter().enumerate() {
                    let mean = (0..n).map(|i| q[(group + i) * d + c]).sum::<f32>() / n as f32;
                    let want = (q[r * d + c] - mean) * gain[r % gain.len()];
                    assert!(
                        (x - want).abs() <= 1e-6,
                        "{label} Q[{r}, {c}]: {x} vs {want}"
                    );
                }
            }
        };
        // Cohere's over each head, a [H, d_h] gain; Chameleon's the same with a bias.
        let g_heads = values(heads * hd, 5);
        let bias = ("q_norm.bias", vec![heads, hd], values(heads * hd, 6));
        let per_head = ("q_norm", vec![heads, hd], g_heads.clone());
        write(heads * hd, &q, std::slice::from_ref(&per_head));
        config("cohere");
        layer_norm("Cohere", hd, &g_heads);
        write(heads * hd, &q, &[per_head.clone(), bias.clone()]);
        config("chameleon");
        layer_norm("Chameleon", hd, &g_heads);
        // ESMC's over the whole projection, a gain per row.
        write(
            heads * hd,
            &q,
            &[("q_norm", vec![heads * hd], g_heads.clone())],
        );
        config("esmc");
        layer_norm("ESMC", heads * hd, &g_heads);
        // A bias beside the gain makes a LayerNorm whatever the model type: over each head
        // with a [d_h] gain (Nemotron-3.5 Transcribe's audio encoder).
        let shared = ("q_norm", vec![hd], g_q.clone());
        write(
            heads * hd,
            &q,
            &[shared, ("q_norm.bias", vec![hd], values(hd, 6))],
        );
        config("qwen3");
        layer_norm("a [d_h] gain with a bias", hd, &g_q);
        // The [H, d_h] gain under an RMSNorm model type, without a bias, is not read as one.
        write(heads * hd, &q, &[per_head]);
        let e = Checkpoint::open(&path, None)
            .unwrap()
            .layout(0)
            .unwrap_err();
        assert!(e.to_string().contains("rank-1"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Mistral's own format (`consolidated.safetensors`): `layers.N.attention.wq`/`wk`, the
    /// head count from `params.json`.
    #[test]
    fn mistral_format_is_read() {
        let dir = scratch_dir("mistral");
        let path = dir.join("consolidated.safetensors");
        let (q, k) = (values(16 * 8, 1), values(8 * 8, 2));
        write_safetensors(
            &path,
            &[
                ("layers.0.attention.wq.weight", vec![16, 8], q.clone()),
                ("layers.0.attention.wk.weight", vec![8, 8], k.clone()),
                ("layers.0.attention.wv.weight", vec![8, 8], values(64, 3)),
            ],
            Dtype::F32,
        );
        std::fs::write(
            dir.join("params.json"),
            r#"{"dim": 8, "n_heads": 4, "n_kv_heads": 2}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(&path, None).unwrap();
        assert_eq!((ck.heads(), ck.stack()), (Some(4), "layers"));
        let layer = ck.layer(0).unwrap();
        let kind = AttentionKind::Mha {
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        assert_eq!((&layer.kind, &layer.q), (&kind, &q));
        assert_eq!(&layer.k[..32], &k[..32]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Fused projections are split as their models' forwards split them: Phi-3's `qkv_proj`
    /// (queries, keys, values; GQA from `num_key_value_heads`), GPT-NeoX's and BLOOM's
    /// `query_key_value` (head by head), GPT-2's Conv1D `c_attn` (`[in, out]`, columns). A
    /// size that does not split, and Falcon's `query_key_value`, are errors.
    #[test]
    fn fused_projections_are_split() {
        let dir = scratch_dir("fused");
        let path = dir.join("model.safetensors");
        let (heads, kv, hd, d) = (4, 2, 3, 8);
        let (q, k) = (values(heads * hd * d, 1), values(kv * hd * d, 2));
        let v = values(kv * hd * d, 3);
        let rows = |w: &[f32], r: std::ops::Range<usize>| w[r.start * d..r.end * d].to_vec();
        let config = |extra: &str| {
            std::fs::write(
                dir.join("config.json"),
                format!(r#"{{"num_attention_heads": {heads}{extra}}}"#),
            )
            .unwrap()
        };
        let open = |name: &str, shape: Vec<usize>, w: Vec<f32>| {
            write_safetensors(&path, &[(name, shape, w)], Dtype::F32);
            Checkpoint::open(&path, None).unwrap()
        };
        // Phi-3: [q; k; v] rows, two key heads.
        config(&format!(r#", "num_key_value_heads": {kv}"#));
        let stacked = [q.clone(), k.clone(), v.clone()].concat();
        let ck = open(
            "model.layers.0.self_attn.qkv_proj.weight",
            vec![(heads + 2 * kv) * hd, d],
            stacked,
        );
        let layer = ck.layer(0).unwrap();
        assert_eq!(layer.q, q);
        assert_eq!(
            rows(&layer.k, 0..2 * hd),
            [rows(&k, 0..hd), rows(&k, 0..hd)].concat()
        );
        // GPT-NeoX: head h's q, k, v rows in turn (MHA: four key heads).
        config("");
        let k4 = values(heads * hd * d, 4);
        let per_head: Vec<f32> = (0..heads)
            .flat_map(|h| {
                let r = h * hd..(h + 1) * hd;
                [rows(&q, r.clone()), rows(&k4, r.clone()), rows(&k4, r)].concat()
            })
            .collect();
        let ck = open(
            "gpt_neox.layers.0.attention.query_key_value.weight",
            vec![3 * heads * hd, d],
            per_head.clone(),
        );
        let layer = ck.layer(0).unwrap();
        assert_eq!((layer.q.clone(), layer.k.clone()), (q.clone(), k4.clone()));
        // GPT-2: c_attn [d, 3d] (m = d), the query in columns 0..d, the key in d..2d.
        let (q2, k2) = (values(d * d, 6), values(d * d, 7));
        let conv: Vec<f32> = (0..d)
            .flat_map(|j| {
                let (q2, k2) = (&q2, &k2);
                (0..3 * d).map(move |c| match c / d {
                    0 => q2[c * d + j],
                    1 => k2[(c - d) * d + j],
                    _ => 0.5,
                })
            })
            .collect();
        let ck = open("transformer.h.0.attn.c_attn.weight", vec![d, 3 * d], conv);
        let layer = ck.layer(0).unwrap();
        assert_eq!((layer.q, layer.k), (q2, k2));
        // Sizes that do not split: a Linear-style c_attn [3d, d] (Qwen-1's) is not GPT-2's.
        let ck = open(
            "h.0.attn.c_attn.weight",
            vec![3 * d, d],
            values(3 * d * d, 8),
        );
        let e = ck.layout(0).unwrap_err().to_string();
        assert!(e.contains("not GPT-2's Conv1D [d, 3·d]"), "{e}");
        let ck = open(
            "h.0.self_attention.query_key_value.weight",
            vec![3 * heads * hd - 1, d],
            values((3 * heads * hd - 1) * d, 5),
        );
        let e = ck.layout(0).unwrap_err().to_string();
        assert!(e.contains("not 3·H·d_h for H = 4"), "{e}");
        // A model type known to lay the same names out otherwise is an error; its own
        // types are read.
        for (model_type, read) in [("falcon", false), ("chatglm", false), ("gpt_neox", true)] {
            config(&format!(r#", "model_type": "{model_type}""#));
            let ck = open(
                "transformer.h.0.self_attention.query_key_value.weight",
                vec![3 * heads * hd, d],
                per_head.clone(),
            );
            match ck.layout(0) {
                Ok(_) => assert!(read, "{model_type}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!read, "{model_type}: {e}");
                    assert!(
                        e.contains(&format!("model_type `{model_type}` is not one whose layout is read (qkv_proj: phi3; query_key_value: gpt_neox, bloom; c_attn: gpt2)")),
                        "{e}"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mla_effective_weights_follow_design() {
        let dir = scratch_dir("mla");
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
        // What the diagnostics read: the layer's key basis alone (b = r_kv + d_rope < d).
        let factors = ck.layer_factors(2).unwrap();
        let basis = layer.key_basis.as_ref().expect("b = 4 < d = 6");
        assert_eq!(
            (factors.rows, factors.width, &factors.kind),
            (m, d, &layer.kind)
        );
        assert_eq!(
            (factors.factors.dim, &factors.factors.q, &factors.factors.k),
            (rkv + rope, &basis.q, &basis.k)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bf16_and_f16_are_read() {
        let dir = scratch_dir("half");
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
        let dir = scratch_dir("bad");
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
        // Only GPTQ/AWQ-packed attention weights: named in the error.
        let gptq = dir.join("gptq.safetensors");
        let name = "model.layers.0.self_attn.q_proj.qweight";
        write_safetensors(&gptq, &[(name, vec![4, 4], values(16, 1))], Dtype::F32);
        let e = Checkpoint::open(&gptq, Some(1)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{name} is a GPTQ/AWQ-packed weight")),
            "{e}"
        );
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

    /// A sharded HF checkpoint (index, two shards, config.json) reads exactly like the same
    /// tensors in one file, whether the index or its directory is named.
    #[test]
    fn sharded_checkpoints_read_like_one_file() {
        let dir = scratch_dir("shards");
        let sharded = dir.join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        let (heads, d) = (2, 6);
        let name = |l: usize, leaf: &str| format!("model.layers.{l}.self_attn.{leaf}.weight");
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = (0..3)
            .flat_map(|l| {
                ["q_proj", "k_proj"]
                    .into_iter()
                    .enumerate()
                    .map(move |(t, leaf)| {
                        (name(l, leaf), vec![d, d], values(d * d, (2 * l + t) as u32))
                    })
            })
            .collect();
        // Layer 1's q_proj in the first shard, its k_proj in the second.
        let (first, second) = tensors.split_at(3);
        let files = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        write_owned(&sharded.join(files[0]), first);
        write_owned(&sharded.join(files[1]), second);
        let weight_map: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| (n.clone(), files[i / 3].into()))
            .collect();
        let index = sharded.join(SHARD_INDEX);
        std::fs::write(
            &index,
            serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
        )
        .unwrap();
        std::fs::write(
            sharded.join("config.json"),
            format!("{{\"num_attention_heads\": {heads}}}"),
        )
        .unwrap();
        let single = dir.join("single.safetensors");
        write_owned(&single, &tensors);
        let one = Checkpoint::open(&single, Some(heads)).unwrap();
        for path in [&sharded, &index] {
            let ck = Checkpoint::open(path, None).unwrap();
            assert_eq!(ck.shard_count(), 2);
            assert_eq!(ck.heads(), Some(heads));
            assert_eq!(ck.layer_indices(), vec![0, 1, 2]);
            for l in 0..3 {
                let (a, b) = (ck.layer(l).unwrap(), one.layer(l).unwrap());
                assert_eq!((a.q, a.k, a.kind), (b.q, b.k, b.kind), "layer {l}");
            }
        }
        // One shard alone: layer 1 lacks its k_proj, and the error says where the rest is.
        let shard = Checkpoint::open(sharded.join(files[0]), None).unwrap();
        let e = shard.layout(1).unwrap_err().to_string();
        assert!(e.contains("have: q_proj") && e.contains(SHARD_INDEX), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Indexes and directories that do not add up are one clear error each; a layer's
    /// shapes are checked from the headers before anything is read.
    #[test]
    fn bad_shards_and_layouts_are_clear_errors() {
        let dir = scratch_dir("badshards");
        let pair = |l: usize, k_rows: usize, q: Vec<f32>| {
            vec![
                (format!("layers.{l}.self_attn.q_proj.weight"), vec![4, 4], q),
                (
                    format!("layers.{l}.self_attn.k_proj.weight"),
                    vec![k_rows, 4],
                    values(4 * k_rows, 2),
                ),
            ]
        };
        let open_err = |path: &Path| Checkpoint::open(path, Some(2)).unwrap_err().to_string();
        let a = dir.join("a.safetensors");
        write_owned(&a, &pair(0, 4, values(16, 1)));
        let index = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let e = open_err(&index(
            "missing.json",
            r#"{"weight_map": {"layers.0.self_attn.q_proj.weight": "nowhere.safetensors"}}"#,
        ));
        assert!(e.contains("nowhere.safetensors"), "{e}");
        let e = open_err(&index(
            "absent.json",
            r#"{"weight_map": {"layers.9.self_attn.q_proj.weight": "a.safetensors"}}"#,
        ));
        assert!(e.contains("has no such tensor"), "{e}");
        let e = open_err(&index("nomap.json", r#"{"metadata": {}}"#));
        assert!(e.contains("weight_map"), "{e}");
        let e = open_err(&index("broken.json", "{"));
        assert!(e.contains("not valid JSON"), "{e}");
        // The same tensor in two files of a directory without an index.
        let twice = dir.join("twice");
        std::fs::create_dir_all(&twice).unwrap();
        std::fs::copy(&a, twice.join("x.safetensors")).unwrap();
        std::fs::copy(&a, twice.join("y.safetensors")).unwrap();
        let e = open_err(&twice);
        assert!(e.contains("is in both"), "{e}");
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(open_err(&empty).contains("no .safetensors file"));
        // A head count of 0 in config.json.
        std::fs::write(twice.join("config.json"), r#"{"num_attention_heads": 0}"#).unwrap();
        std::fs::remove_file(twice.join("y.safetensors")).unwrap();
        let e = Checkpoint::open(&twice, None).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads is 0"), "{e}");
        // Layer 1's k_proj contradicts the head count: `layout` finds it from the header;
        // layer 0's NaN is only found when its values are read.
        let mut q = values(16, 1);
        q[3] = f32::NAN;
        let b = dir.join("b.safetensors");
        let mut ts = pair(0, 4, q);
        ts.extend(pair(1, 3, values(16, 3)));
        write_owned(&b, &ts);
        let ck = Checkpoint::open(&b, Some(2)).unwrap();
        assert!(ck.layout(0).is_ok());
        assert!(ck.layer(0).unwrap_err().to_string().contains("non-finite"));
        let e = ck.layout(1).unwrap_err().to_string();
        assert!(e.contains("k_proj has 3 rows"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// FP8 codes decode to the published values of both formats.
    #[test]
    fn fp8_codes_decode() {
        let e4m3 = |b| fp8_to_f32(b, true);
        let e5m2 = |b| fp8_to_f32(b, false);
        // E4M3 (float8_e4m3fn): 1, 2, −1, the largest (448 = 1.75·2⁸), the smallest
        // subnormal (2⁻⁹), 0, and the one NaN code of each sign.
        assert_eq!(e4m3(0x38), 1.0);
        assert_eq!(e4m3(0x40), 2.0);
        assert_eq!(e4m3(0xB8), -1.0);
        assert_eq!(e4m3(0x7E), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
        assert_eq!(e4m3(0x00), 0.0);
        assert!(e4m3(0x7F).is_nan() && e4m3(0xFF).is_nan());
        // E5M2: 1, the largest (57344 = 1.75·2¹⁵), the smallest subnormal (2⁻¹⁶), ±∞, NaN.
        assert_eq!(e5m2(0x3C), 1.0);
        assert_eq!(e5m2(0x7B), 57344.0);
        assert_eq!(e5m2(0x01), 2f32.powi(-16));
        assert_eq!(e5m2(0x7C), f32::INFINITY);
        assert_eq!(e5m2(0xFC), f32::NEG_INFINITY);
        assert!(e5m2(0x7E).is_nan());
        // Every finite E4M3 code round-trips through f32 exactly as the format's grid says:
        // consecutive positive codes increase.
        let finite: Vec<f32> = (0u8..0x7F).map(e4m3).collect();
        assert!(finite.windows(2).all(|w| w[0] < w[1]));
    }

    /// An FP8 weight with DeepSeek-V3 block scales is read as `W₈ · s[i/b_r, j/b_c]`, with
    /// the block from config.json (partial blocks at the edges); scales of the wrong shape,
    /// and a NaN code, are clear errors.
    #[test]
    fn fp8_weights_are_scaled_by_blocks() {
        let dir = scratch_dir("fp8");
        let (rows, cols, block) = (4, 6, [2, 4]);
        // E4M3 codes of small numbers (no NaN code 0x7F/0xFF among them).
        let codes: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 + 5) % 0x70) as f32)
            .collect();
        let scales = vec![0.5, 2.0, -1.0, 0.25]; // [⌈4/2⌉, ⌈6/4⌉] = [2, 2]
        let p = "model.layers.0.self_attn.";
        let raw = |codes: &[f32]| -> Vec<u8> { codes.iter().map(|&c| c as u8).collect() };
        let write = |path: &Path, codes: &[f32], scale_shape: Vec<usize>, scales: &[f32]| {
            let bytes = raw(codes);
            let sbytes: Vec<u8> = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
            let kbytes: Vec<u8> = values(rows * cols, 9)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let views = vec![
                (
                    format!("{p}q_proj.weight"),
                    TensorView::new(Dtype::F8_E4M3, vec![rows, cols], &bytes).unwrap(),
                ),
                (
                    format!("{p}q_proj.weight_scale_inv"),
                    TensorView::new(Dtype::F32, scale_shape, &sbytes).unwrap(),
                ),
                (
                    format!("{p}k_proj.weight"),
                    TensorView::new(Dtype::F32, vec![rows, cols], &kbytes).unwrap(),
                ),
            ];
            safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
        };
        std::fs::write(
            dir.join("config.json"),
            r#"{"num_attention_heads": 2, "quantization_config": {"weight_block_size": [2, 4]}}"#,
        )
        .unwrap();
        let good = dir.join("good.safetensors");
        write(&good, &codes, vec![2, 2], &scales);
        let layer = Checkpoint::open(&good, None).unwrap().layer(0).unwrap();
        for i in 0..rows {
            for j in 0..cols {
                let want = fp8_to_f32(codes[i * cols + j] as u8, true)
                    * scales[(i / block[0]) * 2 + j / block[1]];
                assert_eq!(layer.q[i * cols + j], want, "({i}, {j})");
            }
        }
        // Scales of the wrong shape: found from the headers, before anything is read.
        let bad = dir.join("bad.safetensors");
        write(&bad, &codes, vec![1, 4], &scales);
        let e = Checkpoint::open(&bad, None)
            .unwrap()
            .layout(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected [2, 2]"), "{e}");
        // The NaN code.
        let mut nan = codes.clone();
        nan[7] = 0x7F as f32;
        let nan_path = dir.join("nan.safetensors");
        write(&nan_path, &nan, vec![2, 2], &scales);
        let e = Checkpoint::open(&nan_path, None)
            .unwrap()
            .layer(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite value NaN at flat index 7"), "{e}");
        // A block size that is not two sizes ≥ 1.
        std::fs::write(
            dir.join("config.json"),
            r#"{"num_attention_heads": 2, "quantization_config": {"weight_block_size": [0, 4]}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(&good, None).unwrap_err().to_string();
        assert!(e.contains("weight_block_size"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
