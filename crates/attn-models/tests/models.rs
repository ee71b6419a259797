//! The bars of the attn-models issue, on the CPU backend.

use attn_models::config::{AttentionConfig, AttentionVariant, LlamaConfig, PreRopePlacement};
use attn_models::{EffectiveQk, EffectiveQkTensors, Llama, QkTensors, export};
use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

type B = NdArray<f32>;
type AB = Autodiff<B>;

fn device() -> Device<B> {
    Default::default()
}

/// A small model of each variant: d 32, 4 heads of 8, 2 layers, vocabulary 50.
fn small(variant: AttentionVariant) -> LlamaConfig {
    let attention = AttentionConfig::new(32, 4, 8, variant)
        .with_rope_dim(4)
        .with_max_seq_len(64)
        .with_init_std(0.1);
    LlamaConfig::new(50, 2, attention, 48, 16)
}

fn variants() -> Vec<LlamaConfig> {
    let mut v: Vec<LlamaConfig> = AttentionVariant::ALL.iter().map(|&a| small(a)).collect();
    let mut input = small(AttentionVariant::MlaPreRope);
    input.attention.prerope_placement = PreRopePlacement::Input;
    v.push(input);
    for a in AttentionVariant::ALL {
        let mut c = small(a);
        c.attention.gap_removed = true;
        v.push(c);
    }
    v
}

fn tokens(ids: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device())
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const IDS: [i64; 10] = [3, 17, 42, 8, 8, 1, 49, 23, 5, 30];

#[test]
fn changing_a_future_token_changes_no_earlier_output() {
    for config in variants() {
        let model: Llama<B> = config.init(&device()).unwrap();
        let a = values(model.forward(tokens(&IDS)));
        let mut changed = IDS;
        changed[7] = 11;
        let b = values(model.forward(tokens(&changed)));
        let v = config.vocab_size;
        assert_eq!(
            max_abs_diff(&a[..7 * v], &b[..7 * v]),
            0.0,
            "{:?}",
            config.attention.variant
        );
        assert!(max_abs_diff(&a[7 * v..], &b[7 * v..]) > 1e-6);
    }
}

/// Scores of a sequence of identical inputs: `q_i·k_j = uᵀW_qᵀR_{j−i}W_k u` depends on `j − i`
/// only (a Toeplitz matrix) when the rotation acts on each head's query/key — MHA, and the
/// rotary part of MLA-Decoupled. PreRoPE rotates the latent before `W_uq`, `W_uk`, which do
/// not commute with rotations: no such invariance (documented in docs/architecture.md).
#[test]
fn rotary_scores_depend_on_relative_position() {
    let x = Tensor::<B, 3>::ones([1, 12, 32], &device()) * 0.3
        + Tensor::<B, 1>::from_floats([0.5; 32], &device())
            .unsqueeze::<3>()
            .mul_scalar(0.1);
    for variant in AttentionVariant::ALL {
        let attention = small(variant).attention.init::<B>(&device()).unwrap();
        let (_, maps) = attention.forward_with_maps(x.clone());
        let s = maps
            .scores
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        let at = |h: usize, i: usize, j: usize| s[h * 144 + i * 12 + j];
        let mut worst = 0.0f32;
        for h in 0..4 {
            for i in 1..12 {
                for j in 1..=i {
                    worst = worst.max((at(h, i, j) - at(h, i - 1, j - 1)).abs());
                }
            }
        }
        let scale = s.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        match variant {
            AttentionVariant::MlaPreRope => assert!(
                worst > 1e-3 * scale,
                "PreRoPE looks shift-invariant: {worst}"
            ),
            _ => assert!(
                worst < 1e-5 * scale.max(1.0),
                "{variant:?}: not Toeplitz, worst {worst}"
            ),
        }
    }
}

#[test]
fn cached_decoding_equals_the_full_forward_and_absorbed_equals_plain() {
    for config in variants() {
        let model: Llama<B> = config.init(&device()).unwrap();
        let full = values(model.forward(tokens(&IDS)));
        for absorbed in [false, true] {
            let mut cache = model.new_cache();
            // A prompt of 4 tokens, then one at a time.
            let mut got = values(model.forward_cached(tokens(&IDS[..4]), &mut cache, absorbed));
            for t in 4..IDS.len() {
                got.extend(values(model.forward_cached(
                    tokens(&IDS[t..t + 1]),
                    &mut cache,
                    absorbed,
                )));
            }
            let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&full, &got);
            assert!(
                diff < 1e-4 * scale.max(1.0),
                "{:?} absorbed={absorbed}: {diff}",
                config.attention
            );
            assert_eq!(cache[0].len(), IDS.len());
            assert_eq!(
                cache[0].values_per_token(),
                config.attention.kv_cache_values_per_token()
            );
        }
    }
}

#[test]
fn gap_removed_rows_sum_to_zero() {
    for variant in AttentionVariant::ALL {
        let mut config = small(variant).attention;
        config.gap_removed = true;
        let attention = config.init::<B>(&device()).unwrap();
        let x = Tensor::<B, 3>::random(
            [2, 9, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device(),
        );
        let (_, maps) = attention.forward_with_maps(x);
        let sums = maps
            .probs
            .clone()
            .sum_dim(3)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| s.abs() < 1e-5), "{variant:?}: {sums:?}");
        // And it is not the zero map.
        let largest = maps
            .probs
            .abs()
            .max()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()[0];
        assert!(largest > 1e-3);
    }
}

/// With full-rank latents (`r = d`), no latent norm and no rotary, MLA represents MHA
/// exactly: `W_dq = W_dkv = I`, `W_uq = W_q`, `W_ukv` = each head's `[W_k; W_v]` rows.
#[test]
fn full_rank_mla_represents_mha_exactly() {
    let mut mha_cfg = small(AttentionVariant::Mha);
    mha_cfg.attention.rope = false;
    let mha: Llama<B> = mha_cfg.init(&device()).unwrap();
    let mut mla_cfg = small(AttentionVariant::MlaPreRope);
    mla_cfg.attention.rope = false;
    mla_cfg.attention.latent_norm = false;
    mla_cfg.attention.q_latent = Some(32);
    mla_cfg.attention.kv_latent = Some(32);
    // Build the MLA checkpoint from the MHA one, in HF layout, then load it.
    let dir = std::env::temp_dir().join(format!("attn-models-represent-{}", std::process::id()));
    export::save(&mha, &mha_cfg, &dir).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let eye: Vec<f32> = (0..32 * 32)
        .map(|i| if i % 33 == 0 { 1.0 } else { 0.0 })
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for name in st.names() {
        if !name.contains("self_attn") {
            let v = st.tensor(name).unwrap();
            tensors.push((name.to_string(), v.shape().to_vec(), get(name)));
        }
    }
    for l in 0..2 {
        let p = format!("model.layers.{l}.self_attn.");
        let (q, k, v, o) = (
            get(&format!("{p}q_proj.weight")),
            get(&format!("{p}k_proj.weight")),
            get(&format!("{p}v_proj.weight")),
            get(&format!("{p}o_proj.weight")),
        );
        let mut kv = Vec::new();
        for h in 0..4 {
            kv.extend_from_slice(&k[h * 8 * 32..(h + 1) * 8 * 32]);
            kv.extend_from_slice(&v[h * 8 * 32..(h + 1) * 8 * 32]);
        }
        tensors.push((format!("{p}q_a_proj.weight"), vec![32, 32], eye.clone()));
        tensors.push((format!("{p}q_b_proj.weight"), vec![32, 32], q));
        tensors.push((
            format!("{p}kv_a_proj_with_mqa.weight"),
            vec![32, 32],
            eye.clone(),
        ));
        tensors.push((format!("{p}kv_b_proj.weight"), vec![64, 32], kv));
        tensors.push((format!("{p}o_proj.weight"), vec![32, 32], o));
    }
    let mla_dir = dir.join("mla");
    std::fs::create_dir_all(&mla_dir).unwrap();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None::<std::collections::HashMap<String, String>>,
        &mla_dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        mla_dir.join("config.json"),
        serde_json::to_string(&export::hf_config(&mla_cfg)).unwrap(),
    )
    .unwrap();
    let (_, mla) = export::load::<B>(&mla_dir, &device()).unwrap();
    let a = values(mha.forward(tokens(&IDS)));
    let b = values(mla.forward(tokens(&IDS)));
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
    std::fs::remove_dir_all(&dir).ok();
}

/// Collects the dotted path of every float parameter without a gradient.
struct MissingGrads<'a> {
    grads: &'a <AB as burn::tensor::backend::AutodiffBackend>::Gradients,
    path: Vec<String>,
    missing: Vec<String>,
    seen: usize,
}

impl ModuleVisitor<AB> for MissingGrads<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
        self.seen += 1;
        if p.grad(self.grads).is_none() {
            self.missing.push(self.path.join("."));
        }
    }
}

#[test]
fn gradients_reach_every_parameter() {
    for config in variants() {
        let model: Llama<AB> = config.init(&device()).unwrap();
        let ids = Tensor::<AB, 2, Int>::from_data(
            TensorData::new(IDS.to_vec(), [1, IDS.len()]),
            &device(),
        );
        let logits = model.forward(ids);
        let loss = (logits.clone() * logits).mean();
        let grads = loss.backward();
        let mut v = MissingGrads {
            grads: &grads,
            path: vec![],
            missing: vec![],
            seen: 0,
        };
        model.visit(&mut v);
        assert!(v.seen > 10);
        assert!(
            v.missing.is_empty(),
            "{:?}: {:?}",
            config.attention.variant,
            v.missing
        );
    }
}

#[test]
fn export_import_round_trips_bit_exactly() {
    for mut config in variants() {
        config.tie_embeddings = config.attention.variant == AttentionVariant::MlaDecoupled;
        let model: Llama<B> = config.init(&device()).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "attn-models-rt-{}-{}",
            config.attention.variant.name(),
            std::process::id()
        ));
        export::save(&model, &config, &dir).unwrap();
        let (config2, model2) = export::load::<B>(&dir, &device()).unwrap();
        assert_eq!(config2, config);
        let (a, b) = (
            export::named_tensors(&model),
            export::named_tensors(&model2),
        );
        assert_eq!(a.len(), b.len());
        for ((na, (sa, va)), (nb, (sb, vb))) in a.iter().zip(&b) {
            assert_eq!((na, sa), (nb, sb));
            assert!(
                va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{na} differs"
            );
        }
        assert_eq!(
            values(model.forward(tokens(&IDS))),
            values(model2.forward(tokens(&IDS)))
        );
        // The exported checkpoint reads back through rmt-core's reader to the same effective
        // weights the model reports.
        let ck =
            rmt_core::checkpoint::Checkpoint::open(dir.join("model.safetensors"), None).unwrap();
        let ours = model.effective_qk().unwrap();
        for (i, layer) in ours.iter().enumerate() {
            let read = ck.layer(i).unwrap();
            assert_eq!(read.kind, layer.kind);
            assert_eq!(read.factorization, layer.factorization);
            assert!(
                max_abs_diff(&read.q, &layer.q) < 1e-6 && max_abs_diff(&read.k, &layer.k) < 1e-6
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_errors() {
    let config = small(AttentionVariant::Mha);
    let model: Llama<B> = config.init(&device()).unwrap();
    let dir = std::env::temp_dir().join(format!("attn-models-bad-{}", std::process::id()));
    export::save(&model, &config, &dir).unwrap();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = export::load::<B>(&dir, &device()).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors"), "{e}");
    // A config that says MLA for MHA weights.
    std::fs::write(&path, &bytes).unwrap();
    let mla = small(AttentionVariant::MlaDecoupled);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&export::hf_config(&mla)).unwrap(),
    )
    .unwrap();
    let e = export::load::<B>(&dir, &device()).unwrap_err().to_string();
    assert!(e.contains("missing tensor"), "{e}");
    // A contradictory configuration.
    let mut bad = small(AttentionVariant::MlaDecoupled);
    bad.attention.rope_dim = 3;
    assert!(bad.init::<B>(&device()).is_err());
    let mut bad = small(AttentionVariant::Mha);
    bad.context = 1000;
    assert!(bad.validate().is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kv_cache_bytes_per_token_at_the_paper_preset() {
    let mha = LlamaConfig::paper(AttentionVariant::Mha);
    // MHA caches 2·L·H·d_h values per token.
    assert_eq!(
        mha.n_layers * mha.attention.kv_cache_values_per_token(),
        2 * 12 * 12 * 64
    );
    let pre = LlamaConfig::paper(AttentionVariant::MlaPreRope);
    assert_eq!(pre.attention.kv_cache_values_per_token(), 384);
    let dec = LlamaConfig::paper(AttentionVariant::MlaDecoupled);
    assert_eq!(dec.attention.kv_cache_values_per_token(), 384 + 32);
}

/// `LlamaConfig::matmul_parameters` counts exactly the parameters of the Linear layers (and the
/// head): the model's parameters less the embedding table and the RMSNorm gains.
#[test]
fn matmul_parameters_are_the_linear_weights() {
    let mut tied = small(AttentionVariant::MlaDecoupled);
    tied.tie_embeddings = true;
    for config in variants().into_iter().chain([tied]) {
        let model = config.init::<B>(&device()).unwrap();
        let d = config.attention.d_model;
        let mut norms = (2 * config.n_layers + 1) * d;
        if config.attention.variant != AttentionVariant::Mha && config.attention.latent_norm {
            norms += config.n_layers
                * (config.attention.q_latent_width() + config.attention.kv_latent_width());
        }
        // Tied, the embedding is the head and counts once as a matmul weight.
        let embedding = if config.tie_embeddings {
            0
        } else {
            config.vocab_size * d
        };
        assert_eq!(
            config.matmul_parameters(),
            model.num_params() - norms - embedding,
            "{:?}",
            config.attention.variant
        );
    }
}

/// Sets every 1-D parameter (the RMSNorm gains) to `1 + 0.5·sin(i)`, so that a misplaced
/// `diag(g)` changes the effective weights.
struct PerturbGains;

impl burn::module::ModuleMapper<B> for PerturbGains {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = if D == 1 {
            let n = tensor.dims()[0];
            let g: Vec<f32> = (0..n).map(|i| 1.0 + 0.5 * (i as f32).sin()).collect();
            Tensor::<B, 1>::from_floats(g.as_slice(), &tensor.device()).reshape(tensor.dims())
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

#[test]
fn device_effective_qk_equals_the_host_products() {
    for config in variants() {
        let model: Llama<B> = config.init(&device()).unwrap().map(&mut PerturbGains);
        let host = model.effective_qk().unwrap();
        let on_device = model.effective_qk_tensors().unwrap();
        assert_eq!(host.len(), on_device.len());
        for (h, d) in host.iter().zip(&on_device) {
            assert_eq!(
                (h.index, &h.kind, &h.factorization),
                (d.index, &d.kind, &d.factorization)
            );
            for (name, ours, theirs) in [("Q", &d.q, &h.q), ("K", &d.k, &h.k)] {
                assert_eq!(ours.dims(), [h.rows, h.width]);
                let ours: Vec<f32> = ours.clone().into_data().to_vec().unwrap();
                // Each entry is an f32 dot product of length r ≤ 32 (the widest latent here) on
                // both sides, in different orders: each side is within γ_r·Σ|aᵢbᵢ| of the exact
                // value (γ_r = r·u, u = 2⁻²⁴), and Σ|aᵢbᵢ| ≤ r·max|a|·max|b| ≤ r·(scale)², with
                // the weights' scale bounded by the largest entry of W (≤ 1 here, std 0.1, gains
                // ≤ 1.5). So |Δ| ≤ 2·r²·u·1.5 ≈ 1.8e-4 at r = 32: a misplaced head or gain moves
                // entries by O(0.01–0.1).
                let r = 32.0f32;
                let tol = 2.0 * r * r * f32::EPSILON / 2.0 * 1.5;
                let diff = max_abs_diff(&ours, theirs);
                assert!(
                    diff <= tol,
                    "{} layer {} {name}: device and host differ by {diff} (tolerance {tol})",
                    config.attention.variant.name(),
                    h.index
                );
            }
        }
        // A model with only the host form gets the device form by upload.
        let uploaded = QkTensors::<B>::upload(&host[0], &device());
        assert_eq!(uploaded.q.into_data().to_vec::<f32>().unwrap(), host[0].q);
    }
}
