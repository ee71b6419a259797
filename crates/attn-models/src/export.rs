//! safetensors export and import under HF LLaMA and DeepSeek-V2 names, with a `config.json`
//! that HF transformers and `cargo xtask diagnose` read.
//!
//! Names (every Linear stored PyTorch-style, `[out, in]`):
//!
//! * `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (absent when tied);
//! * per layer `model.layers.N.`: `input_layernorm.weight`, `post_attention_layernorm.weight`,
//!   `mlp.{gate,up,down}_proj.weight`;
//! * MHA: `self_attn.{q,k,v,o}_proj.weight`;
//! * MLA (both variants): `self_attn.q_a_proj.weight`, `self_attn.q_a_layernorm.weight`,
//!   `self_attn.q_b_proj.weight`, `self_attn.kv_a_proj_with_mqa.weight`,
//!   `self_attn.kv_a_layernorm.weight`, `self_attn.kv_b_proj.weight`, `self_attn.o_proj.weight`.
//!
//! `config.json` carries the HF fields of `LlamaForCausalLM` (MHA) or `DeepseekV2ForCausalLM`
//! (MLA; PreRoPE has `qk_rope_head_dim = 0` and is not an HF architecture) and, under
//! `attn_models`, this crate's full [`LlamaConfig`], from which [`load`] rebuilds the model.

use crate::ModelError;
use crate::attention::Attention;
use crate::config::{AttentionVariant, LlamaConfig};
use crate::transformer::Llama;
use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// A parameter reached by its HF name.
pub(crate) enum Slot<'a, B: Backend> {
    /// A Linear's weight (burn `[in, out]`, stored `[out, in]`).
    Linear(&'a mut Linear<B>),
    /// An RMSNorm gain.
    Norm(&'a mut RmsNorm<B>),
    /// The embedding table (`[vocab, d]` in both).
    Embedding(&'a mut Embedding<B>),
}

/// Every parameter of `model` with its HF name: the one mapping that export, import and the
/// effective weights share.
pub(crate) fn slots<B: Backend>(model: &mut Llama<B>) -> Vec<(String, Slot<'_, B>)> {
    let mut out: Vec<(String, Slot<'_, B>)> = vec![(
        "model.embed_tokens.weight".into(),
        Slot::Embedding(&mut model.embed),
    )];
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let p = format!("model.layers.{i}.");
        out.push((
            format!("{p}input_layernorm.weight"),
            Slot::Norm(&mut block.attn_norm),
        ));
        match &mut block.attention {
            Attention::Mha(a) => {
                out.push((
                    format!("{p}self_attn.q_proj.weight"),
                    Slot::Linear(&mut a.wq),
                ));
                out.push((
                    format!("{p}self_attn.k_proj.weight"),
                    Slot::Linear(&mut a.wk),
                ));
                out.push((
                    format!("{p}self_attn.v_proj.weight"),
                    Slot::Linear(&mut a.wv),
                ));
                out.push((
                    format!("{p}self_attn.o_proj.weight"),
                    Slot::Linear(&mut a.wo),
                ));
            }
            Attention::Mla(a) => {
                out.push((
                    format!("{p}self_attn.q_a_proj.weight"),
                    Slot::Linear(&mut a.q_down),
                ));
                if let Some(n) = &mut a.q_norm {
                    out.push((format!("{p}self_attn.q_a_layernorm.weight"), Slot::Norm(n)));
                }
                out.push((
                    format!("{p}self_attn.q_b_proj.weight"),
                    Slot::Linear(&mut a.q_up),
                ));
                out.push((
                    format!("{p}self_attn.kv_a_proj_with_mqa.weight"),
                    Slot::Linear(&mut a.kv_down),
                ));
                if let Some(n) = &mut a.kv_norm {
                    out.push((format!("{p}self_attn.kv_a_layernorm.weight"), Slot::Norm(n)));
                }
                out.push((
                    format!("{p}self_attn.kv_b_proj.weight"),
                    Slot::Linear(&mut a.kv_up),
                ));
                out.push((
                    format!("{p}self_attn.o_proj.weight"),
                    Slot::Linear(&mut a.wo),
                ));
            }
        }
        out.push((
            format!("{p}post_attention_layernorm.weight"),
            Slot::Norm(&mut block.ffn_norm),
        ));
        out.push((
            format!("{p}mlp.gate_proj.weight"),
            Slot::Linear(&mut block.gate),
        ));
        out.push((
            format!("{p}mlp.up_proj.weight"),
            Slot::Linear(&mut block.up),
        ));
        out.push((
            format!("{p}mlp.down_proj.weight"),
            Slot::Linear(&mut block.down),
        ));
    }
    out.push(("model.norm.weight".into(), Slot::Norm(&mut model.norm)));
    if let Some(head) = &mut model.head {
        out.push(("lm_head.weight".into(), Slot::Linear(head)));
    }
    out
}

/// A tensor's values as `f32`, row-major.
pub(crate) fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    data_to_f32(t.into_data())
}

/// The values of a float tensor's data as f32.
pub(crate) fn data_to_f32(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32")
}

impl<B: Backend> Slot<'_, B> {
    /// `(shape, values)` in HF layout.
    pub(crate) fn read(&self) -> HfTensor {
        match self {
            Slot::Linear(l) => {
                let w = l.weight.val().transpose();
                (w.dims().to_vec(), to_f32(w))
            }
            Slot::Norm(n) => {
                let g = n.gamma.val();
                (g.dims().to_vec(), to_f32(g))
            }
            Slot::Embedding(e) => {
                let w = e.weight.val();
                (w.dims().to_vec(), to_f32(w))
            }
        }
    }

    /// Replaces the parameter with HF-layout values, checking the shape.
    fn write(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<(), ModelError> {
        let (expected, _) = match self {
            Slot::Linear(l) => (l.weight.val().transpose().dims().to_vec(), ()),
            Slot::Norm(n) => (n.gamma.val().dims().to_vec(), ()),
            Slot::Embedding(e) => (e.weight.val().dims().to_vec(), ()),
        };
        if shape != expected.as_slice() {
            return Err(ModelError::Checkpoint(format!(
                "{name}: shape {shape:?}, the model expects {expected:?}"
            )));
        }
        match self {
            Slot::Linear(l) => {
                let device = l.weight.val().device();
                let t = Tensor::<B, 2>::from_data(
                    TensorData::new(values, [shape[0], shape[1]]),
                    &device,
                )
                .transpose();
                l.weight = replace(&l.weight, t);
            }
            Slot::Norm(n) => {
                let device = n.gamma.val().device();
                let t = Tensor::<B, 1>::from_data(TensorData::new(values, [shape[0]]), &device);
                n.gamma = replace(&n.gamma, t);
            }
            Slot::Embedding(e) => {
                let device = e.weight.val().device();
                let t = Tensor::<B, 2>::from_data(
                    TensorData::new(values, [shape[0], shape[1]]),
                    &device,
                );
                e.weight = replace(&e.weight, t);
            }
        }
        Ok(())
    }
}

/// A parameter with new values, same id, trainable.
fn replace<B: Backend, const D: usize>(
    p: &Param<Tensor<B, D>>,
    t: Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    p.clone().map(|_| t.require_grad())
}

/// A tensor in HF layout: `(shape, row-major values)`.
pub type HfTensor = (Vec<usize>, Vec<f32>);

/// Every parameter as `(HF name, tensor)`, HF layout, in a fixed order.
pub fn named_tensors<B: Backend>(model: &Llama<B>) -> Vec<(String, HfTensor)> {
    let mut model = model.clone();
    slots(&mut model)
        .into_iter()
        .map(|(name, slot)| (name, slot.read()))
        .collect()
}

/// The HF `config.json` for this model, with this crate's configuration under `attn_models`.
pub fn hf_config(config: &LlamaConfig) -> serde_json::Value {
    let a = &config.attention;
    let mut v = serde_json::json!({
        "hidden_size": a.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        "num_hidden_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": a.init_std,
        "attention_bias": false,
        "torch_dtype": "float32",
        "attention_variant": a.variant.name(),
        "gap_removed": a.gap_removed,
        "attn_models": config,
    });
    let m = v.as_object_mut().expect("an object");
    match a.variant {
        AttentionVariant::Mha => {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            m.insert("model_type".into(), "llama".into());
            m.insert("head_dim".into(), a.head_dim.into());
        }
        _ => {
            let decoupled = a.variant == AttentionVariant::MlaDecoupled;
            m.insert(
                "architectures".into(),
                serde_json::json!(["DeepseekV2ForCausalLM"]),
            );
            m.insert("model_type".into(), "deepseek_v2".into());
            m.insert("q_lora_rank".into(), a.q_latent_width().into());
            m.insert("kv_lora_rank".into(), a.kv_latent_width().into());
            m.insert("qk_nope_head_dim".into(), a.head_dim.into());
            m.insert(
                "qk_rope_head_dim".into(),
                (if decoupled { a.rope_dim } else { 0 }).into(),
            );
            m.insert("v_head_dim".into(), a.value_width().into());
            // Dense feed-forward in every layer: HF DeepSeek-V2 uses its MoE block only for
            // layers ≥ first_k_dense_replace, so the expert fields are placeholders it
            // validates but never builds (transformers 5 wants integers there).
            m.insert("first_k_dense_replace".into(), config.n_layers.into());
            m.insert("n_routed_experts".into(), 1.into());
            m.insert("n_shared_experts".into(), 1.into());
            m.insert("num_experts_per_tok".into(), 1.into());
            m.insert("moe_intermediate_size".into(), config.ffn_hidden.into());
            m.insert("moe_layer_freq".into(), 1.into());
            if !decoupled {
                m.insert(
                    "prerope_placement".into(),
                    serde_json::to_value(a.prerope_placement).expect("serialisable"),
                );
            }
        }
    }
    v
}

/// Writes `dir/model.safetensors` (f32) and `dir/config.json`.
///
/// # Errors
/// File system errors.
pub fn save<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = named_tensors(model)
        .into_iter()
        .map(|(name, (shape, values))| {
            (
                name,
                shape,
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Checkpoint(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = dir.join("model.safetensors");
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))?;
    let json = serde_json::to_string_pretty(&hf_config(config)).expect("serialisable");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, json).map_err(io(&cfg))?;
    Ok(())
}

/// Reads the configuration a [`save`] wrote.
///
/// # Errors
/// Missing or malformed `config.json`, or one without the `attn_models` section.
pub fn load_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))?;
    let section = v.get("attn_models").ok_or_else(|| {
        ModelError::Checkpoint(format!(
            "{}: no `attn_models` section (not written by this crate)",
            path.display()
        ))
    })?;
    let config: LlamaConfig = serde_json::from_value(section.clone())
        .map_err(|e| ModelError::Checkpoint(format!("{}: attn_models: {e}", path.display())))?;
    config.validate()?;
    Ok(config)
}

/// Rebuilds a model from `dir/config.json` and `dir/model.safetensors`. Every parameter must
/// be present with its exact shape; F32, F16 and BF16 tensors are read.
///
/// # Errors
/// Missing files, a corrupt safetensors file, missing or mis-shaped tensors, non-finite
/// values.
pub fn load<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(LlamaConfig, Llama<B>), ModelError> {
    let config = load_config(dir)?;
    let mut model = config.init::<B>(device)?;
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        ModelError::Checkpoint(format!(
            "{}: not a valid safetensors file ({e})",
            path.display()
        ))
    })?;
    for (name, mut slot) in slots(&mut model) {
        let view = st.tensor(&name).map_err(|_| {
            ModelError::Checkpoint(format!("{}: missing tensor {name}", path.display()))
        })?;
        let values = rmt_core::checkpoint::tensor_to_f32(&name, &view)?;
        slot.write(&name, view.shape(), values)?;
    }
    Ok((config, model))
}
