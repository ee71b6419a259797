#!/usr/bin/env python3
"""Check `cargo xtask diagnose` against HF transformers' own attention modules.

    python3 scripts/hf_diagnose_check.py target/release/xtask [WORKDIR]

For each architecture below, a tiny model with random weights (every norm gain drawn
around its neutral value, so that gains matter) is saved by `save_pretrained`. Each layer's
effective Q and K are then derived from the HF modules themselves, not from the weights'
names: every unit vector e_i of the model width goes through the module's own projections
and norms (q_proj → q_norm, q_a_proj → q_a_layernorm → q_b_proj, kv_a_proj_with_mqa →
kv_a_layernorm → kv_b_proj, ...), and each norm's per-token 1/rms is undone with the
module's own epsilon (docs/math.md: only the gain enters); a fused projection's output
(qkv_proj, query_key_value, c_attn) is split as that class's forward splits it. Biases drop
out: each projection's linear part f(e_i) − f(0) is taken. The paper's metrics are computed
from those Q, K in float64 numpy (whole layer and per head) and compared with the rows
`xtask diagnose --format csv --per-head` prints for the saved checkpoint. Prints one line
per architecture; exits 1 if any comparison fails.

Tolerances: the checkpoint path forms M = QKᵀ and G in float32, so eigenvalues carry a
relative error of order 1e-6 (float32 rounding over d ≤ 128 terms); 1e-4 relative leaves
a wide margin. Outlier counts must match exactly (no eigenvalue of these small random
layers lies within 1e-4 of λ₊; the script reports it if one does).
"""
import csv
import io
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

xtask = sys.argv[1]
work = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="hf-diagnose-")
torch.manual_seed(0)


def configs():
    common = dict(vocab_size=64, num_hidden_layers=2, max_position_embeddings=64)
    yield "llama-gqa", transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2, **common
    ), transformers.LlamaForCausalLM
    yield "qwen3", transformers.Qwen3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, **common
    ), transformers.Qwen3ForCausalLM
    yield "olmo2", transformers.Olmo2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
        **common
    ), transformers.Olmo2ForCausalLM
    yield "gemma3", transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=16, **common
    ), transformers.Gemma3ForCausalLM
    # Gemma 4's RMSNorm scales by w, Gemma 3's by 1 + w.
    yield "gemma4", transformers.Gemma4TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=16, **common
    ), transformers.Gemma4ForCausalLM
    # A gated query: q_proj gives each head its query rows and as many gate rows; 1 + w gains.
    yield "qwen3-next", transformers.Qwen3NextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=["full_attention", "full_attention"], num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        **common
    ), transformers.Qwen3NextForCausalLM
    # A QK-norm that is a LayerNorm over each head, with a [H, d_h] gain (Command R+).
    yield "cohere", transformers.CohereConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        use_qk_norm=True, **common
    ), transformers.CohereForCausalLM
    # LayerNorm QK-norms: Chameleon's over each head, [H, d_h] gain and bias (its VQ-VAE's
    # attention blocks are not in a stack of layers, and are not read); ESMC's over the
    # whole projection.
    yield "chameleon", transformers.ChameleonConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, resolution=32, latent_channels=8, attn_resolutions=[]),
        vocabulary_map={"<image>": 63}, **common
    ), transformers.ChameleonForConditionalGeneration
    yield "esmc", transformers.EsmcConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
        head_dim=16, **common
    ), transformers.EsmcForMaskedLM
    yield "deepseek-v3", transformers.DeepseekV3Config(
        hidden_size=128, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=2, **common
    ), transformers.DeepseekV3ForCausalLM
    # Fused query/key/value projections.
    yield "phi3", transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0, **common
    ), transformers.Phi3ForCausalLM
    yield "gpt-neox", transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, rotary_pct=0.25, **common
    ), transformers.GPTNeoXForCausalLM
    yield "bloom", transformers.BloomConfig(
        hidden_size=64, n_head=4, n_layer=2, vocab_size=64
    ), transformers.BloomForCausalLM
    yield "gpt2", transformers.GPT2Config(
        n_embd=64, n_head=4, n_layer=2, vocab_size=64, n_positions=64
    ), transformers.GPT2LMHeadModel
    # A vision-language model: two stacks of `layers.N` (the language model's, SigLIP's),
    # head counts only in text_config / vision_config. Read with --stack; the head count is
    # text_config's, the section whose layer count and width are the stack's.
    text = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=16, vocab_size=300, num_hidden_layers=2,
        max_position_embeddings=64,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14,
    )
    # An encoder–decoder: two stacks of self-attention layers (and cross-attention,
    # `encoder_attn`, which is not read), head counts as encoder/decoder_attention_heads,
    # told apart by encoder_layers / decoder_layers.
    yield "bart-decoder", transformers.BartConfig(
        d_model=64, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=8, encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=64,
        max_position_embeddings=64,
    ), transformers.BartForConditionalGeneration
    yield "gemma3-vlm", transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298,
    ), transformers.Gemma3ForConditionalGeneration


def perturb_gains(model, gemma):
    """Norm gains away from their neutral value (1, or 0 for Gemma's 1 + w)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.5 * torch.randn_like(p))


def undo_rms(norm, x, y):
    """y = norm(x) with each row's 1/rms undone: the gain alone, applied to x (centred
    first, for a LayerNorm)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if "LayerNorm" in type(norm).__name__:
        x = x - x.float().mean(-1, keepdim=True)
    rms = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return y * rms


def gained(norm, x):
    """norm's gain applied to x, through the module (its 1/rms undone; a LayerNorm's bias,
    like a projection's, taken off)."""
    y = norm(x)
    if getattr(norm, "bias", None) is not None:
        y = y - norm.bias
    return undo_rms(norm, x, y)


def per_head_norm(norm, x, heads):
    """A QK-norm over each head's d_h entries, or over the whole projection."""
    if norm is None:
        return x
    if norm.weight.dim() == 2:  # [H, d_h]: over each head's d_h entries, a gain per head
        return gained(norm, x.view(x.shape[0], *norm.weight.shape)).reshape(x.shape)
    width = norm.weight.numel()
    if width == x.shape[-1]:
        return gained(norm, x)
    shaped = x.view(x.shape[0], -1, width)
    return gained(norm, shaped).reshape(x.shape)


def linear(module, x):
    """module's linear part at x: module(x) − module(0), so that biases drop out."""
    return module(x) - module(torch.zeros_like(x[:1]))


def effective_qk(attn, config, heads):
    """Q, K ∈ ℝ^{m×d} (rows grouped by head) from the module, probed with e_1 … e_d."""
    d = config.hidden_size
    eye = torch.eye(d, dtype=torch.float32)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    with torch.no_grad():
        if hasattr(attn, "kv_a_proj_with_mqa"):
            nope, rope, r_kv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
            q = attn.q_b_proj(gained(attn.q_a_layernorm, attn.q_a_proj(eye)))
            ckv = attn.kv_a_proj_with_mqa(eye)
            latent, k_rope = ckv[:, :r_kv], ckv[:, r_kv:]
            kv = attn.kv_b_proj(gained(attn.kv_a_layernorm, latent)).view(d, heads, -1)
            k_nope = kv[:, :, :nope]
            k = torch.cat([k_nope, k_rope[:, None, :].expand(d, heads, rope)], dim=-1)
            q, k = q.reshape(d, -1), k.reshape(d, -1)
            return q.T.double().numpy(), k.T.double().numpy()
        # The splits below are those of each class's forward in transformers 5.25.
        if hasattr(attn, "qkv_proj"):  # Phi-3: every query, then every key, then values
            qkv = linear(attn.qkv_proj, eye)
            hd = qkv.shape[1] // (heads + 2 * kv_heads)
            q, k = qkv[:, : heads * hd], qkv[:, heads * hd : (heads + kv_heads) * hd]
        elif hasattr(attn, "query_key_value"):  # GPT-NeoX, BLOOM: head by head, q k v
            qkv = linear(attn.query_key_value, eye).view(d, heads, -1)
            hd = qkv.shape[2] // 3
            q, k = qkv[..., :hd].reshape(d, -1), qkv[..., hd : 2 * hd].reshape(d, -1)
        elif hasattr(attn, "c_attn"):  # GPT-2: Conv1D, q k v columns
            q, k, _ = linear(attn.c_attn, eye).split(attn.split_size, dim=1)
        else:
            q = linear(attn.q_proj, eye)
            if config.model_type == "qwen3_next":  # per head: query rows, then gate rows
                hd = config.head_dim
                q = q.view(d, heads, 2 * hd)[..., :hd].reshape(d, -1)
            q = per_head_norm(getattr(attn, "q_norm", None), q, heads)
            k = per_head_norm(getattr(attn, "k_norm", None), linear(attn.k_proj, eye), heads)
        hd = q.shape[1] // heads
        k = k.reshape(d, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=1)
        k = k.reshape(d, -1)
    # Rows are the projections' outputs: column i of the probe is e_i's image.
    return q.T.double().numpy(), k.T.double().numpy()


def metrics(q, k, d):
    m = q.shape[0]
    M = q @ k.T
    G = (M @ M.T) / d
    s2 = M.var()
    ev = np.linalg.eigvalsh(G)
    lp = s2 * (1 + math.sqrt(m / d)) ** 2
    tr = ev.sum()
    out = ev[ev > lp]
    margin = np.min(np.abs(ev - lp)) / lp
    return dict(lambda_max=ev[-1], lambda_plus=lp, sigma2=s2, outlier_count=out.size,
                outlier_energy=out.sum() / tr, stable_rank=tr / ev[-1]), margin


ok = True
for name, config, cls in configs():
    path = os.path.join(work, name)
    model = cls(config).float().eval()
    perturb_gains(model, name.startswith("gemma3") or name == "qwen3-next")
    model.save_pretrained(path, safe_serialization=True)
    args = [xtask, "diagnose", path, "--format", "csv", "--per-head"]
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else None
    if name == "gemma3-vlm":  # the language model's stack
        config = config.text_config
        layers, stack, heads = model.model.language_model.layers, "language_model.model.layers", config.num_attention_heads
    elif name == "bart-decoder":  # the decoder's stack
        layers, stack, heads = model.model.decoder.layers, "model.decoder.layers", config.decoder_attention_heads
    else:
        base = next(getattr(model, a) for a in ["model", "gpt_neox", "esmc", "transformer"]
                    if hasattr(model, a))
        layers, stack = getattr(base, "layers", None) or getattr(base, "h", None), None
    if stack:
        args += ["--stack", stack]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        print(f"model={name} xtask_error={run.stderr.strip()}")
        ok = False
        continue
    ours = {}
    for row in csv.DictReader(io.StringIO(run.stdout)):
        if row["estimator"] == "empirical" and row["null"] == "mp":
            ours[(int(row["layer"]), row["head"], row["metric"])] = float(row["value"])
    worst, compared, tightest = 0.0, 0, math.inf
    for layer_index, layer in enumerate(layers):
        attn = next(getattr(layer, a) for a in ["self_attn", "attention", "self_attention", "attn"]
                    if hasattr(layer, a))
        q, k = effective_qk(attn, config, heads)
        d = config.hidden_size
        dk = q.shape[0] // heads
        blocks = [("all", q, k)] + [
            (str(h), q[h * dk:(h + 1) * dk], k[h * dk:(h + 1) * dk]) for h in range(heads)
        ]
        for head, qb, kb in blocks:
            want, margin = metrics(qb, kb, d)
            tightest = min(tightest, margin)
            for metric, value in want.items():
                got = ours.get((layer_index, head, metric))
                if got is None:
                    print(f"model={name} missing={layer_index}/{head}/{metric}")
                    ok = False
                    continue
                if metric == "outlier_count":
                    good = got == value
                    rel = 0.0 if good else math.inf
                else:
                    rel = abs(got - value) / max(abs(value), 1e-30)
                    good = rel < 1e-4
                worst = max(worst, rel)
                compared += 1
                if not good:
                    print(f"model={name} layer={layer_index} head={head} {metric}: ours {got} vs hf {value}")
                    ok = False
    print(f"model={name} values_compared={compared} worst_rel_diff={worst:.1e} "
          f"closest_eigenvalue_to_lambda_plus_rel={tightest:.1e} ok={worst < 1e-4}")
sys.exit(0 if ok else 1)
