//! `cargo xtask models`: parameter counts and KV-cache sizes of every attention variant.

use attn_models::config::{AttentionVariant, LlamaConfig};
use burn::backend::NdArray;
use burn::module::Module;

#[derive(clap::Args)]
pub struct Args {
    /// Preset: paper (LLaMA-130M) or tiny.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Also export each variant (seeded initialisation) to DIR/<variant>/ with the logits of a
    /// fixed token sequence in `logits.json`, for checking against HF transformers
    /// (`scripts/hf_check.py`).
    #[arg(long)]
    export: Option<std::path::PathBuf>,
}

/// The token sequence whose logits `--export` records.
const PROBE_TOKENS: [i64; 16] = [1, 5, 9, 2, 7, 7, 3, 11, 13, 4, 8, 6, 10, 12, 14, 0];

fn export(dir: &std::path::Path, preset: &str) -> Result<(), String> {
    use burn::prelude::*;
    type B = NdArray<f32>;
    let device = Default::default();
    for variant in AttentionVariant::ALL {
        let config = LlamaConfig::preset(preset, variant)
            .ok_or_else(|| format!("unknown preset `{preset}`"))?;
        <B as Backend>::seed(&device, 7);
        let model = config.init::<B>(&device).map_err(|e| e.to_string())?;
        let out = dir.join(variant.name());
        attn_models::export::save(&model, &config, &out).map_err(|e| e.to_string())?;
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(PROBE_TOKENS.to_vec(), [1, PROBE_TOKENS.len()]),
            &device,
        );
        let logits: Vec<f32> = model
            .forward(tokens)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let json = serde_json::json!({ "tokens": PROBE_TOKENS, "vocab": config.vocab_size, "logits": logits });
        std::fs::write(out.join("logits.json"), json.to_string()).map_err(|e| e.to_string())?;
        eprintln!("exported {}", out.display());
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), String> {
    if let Some(dir) = &args.export {
        export(dir, &args.preset)?;
    }
    let device = Default::default();
    println!(
        "| variant | parameters | attention parameters per layer | KV cache values per token (all layers) | KV cache bytes per token (bf16) | vs MHA |"
    );
    println!("|---|---|---|---|---|---|");
    let mut mha_cache = None;
    for variant in AttentionVariant::ALL {
        let config = LlamaConfig::preset(&args.preset, variant)
            .ok_or_else(|| format!("unknown preset `{}` (paper, tiny)", args.preset))?;
        let model = config
            .init::<NdArray<f32>>(&device)
            .map_err(|e| e.to_string())?;
        let total = model.num_params();
        let attention = model.blocks[0].attention.num_params();
        let cache = config.n_layers * config.attention.kv_cache_values_per_token();
        let reference = *mha_cache.get_or_insert(cache);
        println!(
            "| {} | {total} | {attention} | {cache} | {} | {:.3} |",
            variant.name(),
            2 * cache,
            cache as f64 / reference as f64
        );
    }
    Ok(())
}
