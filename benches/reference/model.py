"""PyTorch reference of the three attention variants of seed 000 (MHA, MLA-PreRoPE,
MLA-Decoupled) in a LLaMA-style decoder, for comparison with the Rust models only.

It mirrors `crates/attn-models` operation for operation: the same shapes, the same
initialisation (N(0, init_std) for every Linear and the embedding, RMSNorm gains 1), the
same rotary tables (`theta^(-2i/w)`, half pairing for MHA and PreRoPE, interleaved pairs
for Decoupled's rotary slice), RMSNorm with the mean square in float32, scores scaled by
`1/sqrt(d_qk)`. Weights load from the project's safetensors export (HF LLaMA / DeepSeek-V2
names, `[out, in]`) and the model is built from the `attn_models` section of the export's
`config.json`, so the same file drives both implementations.

Shapes: `b` batch, `s` tokens, `H` heads, `d` model width.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionConfig:
    d_model: int
    n_heads: int
    head_dim: int
    variant: str  # "mha", "mla-pre-rope", "mla-decoupled"
    value_dim: int | None = None
    q_latent: int | None = None
    kv_latent: int | None = None
    rope_dim: int = 32
    prerope_placement: str = "latent"
    rope_theta: float = 10000.0
    rope: bool = True
    latent_norm: bool = True
    gap_removed: bool = False
    max_seq_len: int = 4096
    init_std: float = 0.02
    norm_eps: float = 1e-6

    @property
    def dv(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def rq(self) -> int:
        return self.q_latent or self.n_heads * self.head_dim // 2

    @property
    def rkv(self) -> int:
        return self.kv_latent or self.n_heads * self.head_dim // 2


@dataclass
class LlamaConfig:
    vocab_size: int
    n_layers: int
    attention: AttentionConfig
    ffn_hidden: int
    context: int
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    @staticmethod
    def from_export(dir: Path) -> "LlamaConfig":
        """The `attn_models` section of an export's `config.json`."""
        raw = json.loads((Path(dir) / "config.json").read_text())
        if "attn_models" not in raw:
            raise ValueError(f"{dir}/config.json has no `attn_models` section")
        section = dict(raw["attn_models"])
        section["attention"] = AttentionConfig(**section["attention"])
        return LlamaConfig(**section)


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x²) + ε) · g`, the mean square in float32 (as burn's RmsNorm)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = (x.float().square().mean(-1, keepdim=True) + self.eps).sqrt()
        return (x / rms.to(x.dtype)) * self.weight


class Rope(nn.Module):
    """Rotary embedding of width `w`: pair `i` turns by `p · θ^(-2i/w)` at position `p`.
    `interleaved` pairs (2i, 2i+1) (DeepSeek's rotary slice); otherwise (i, i + w/2)."""

    def __init__(self, width: int, max_seq: int, theta: float, interleaved: bool):
        super().__init__()
        half = width // 2
        freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / width)
        angle = torch.arange(max_seq, dtype=torch.float64)[:, None] * freq[None, :]
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: [..., s, w]."""
        s, w = x.shape[-2], x.shape[-1]
        cos = self.cos[:s].to(x.dtype)
        sin = self.sin[:s].to(x.dtype)
        if self.interleaved:
            pairs = x.unflatten(-1, (w // 2, 2))
            x1, x2 = pairs[..., 0], pairs[..., 1]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
        x1, x2 = x[..., : w // 2], x[..., w // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, 0.0, std)
    return layer


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, H·w] → [b, H, s, w]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, H, s, w] → [b, s, H·w]."""
    return x.transpose(1, 2).flatten(-2)


def causal_attention(q, k, v, scale: float, impl: str, gap_removed: bool) -> torch.Tensor:
    """`softmax(q kᵀ · scale + causal mask) v`; q [b, H, s, w], k [b, H or 1, s, w],
    v [b, H, s, d_v]. `impl` "sdpa" uses PyTorch's fused kernels (flash / memory-efficient),
    "eager" the explicit matrices."""
    if impl == "sdpa" and not gap_removed:
        if k.shape[1] != q.shape[1]:
            k = k.expand(-1, q.shape[1], -1, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    if gap_removed:
        counts = torch.arange(1, s + 1, device=q.device, dtype=probs.dtype)[:, None]
        probs = probs - (~mask).to(probs.dtype) / counts
    return probs @ v


class Mha(nn.Module):
    def __init__(self, c: AttentionConfig, impl: str):
        super().__init__()
        d, h, hd = c.d_model, c.n_heads, c.head_dim
        self.q_proj = linear(d, h * hd, c.init_std)
        self.k_proj = linear(d, h * hd, c.init_std)
        self.v_proj = linear(d, h * c.dv, c.init_std)
        self.o_proj = linear(h * c.dv, d, c.init_std)
        self.rope = Rope(hd, c.max_seq_len, c.rope_theta, False) if c.rope else None
        self.c, self.impl = c, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] → [b, s, d]."""
        h = self.c.n_heads
        q, k, v = (split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        out = causal_attention(
            q, k, v, 1 / math.sqrt(self.c.head_dim), self.impl, self.c.gap_removed
        )
        return self.o_proj(merge_heads(out))


class Mla(nn.Module):
    """Both MLA variants. PreRoPE rotates the normed latents (or, with input placement, the
    input) before the up-projection; Decoupled adds per-head rotary queries and one rotary
    key shared by all heads."""

    def __init__(self, c: AttentionConfig, impl: str):
        super().__init__()
        d, h, hd, dv = c.d_model, c.n_heads, c.head_dim, c.dv
        decoupled = c.variant == "mla-decoupled"
        self.dr = c.rope_dim if decoupled else 0
        self.q_a_proj = linear(d, c.rq, c.init_std)
        self.q_a_layernorm = RMSNorm(c.rq, c.norm_eps) if c.latent_norm else None
        self.q_b_proj = linear(c.rq, h * (hd + self.dr), c.init_std)
        self.kv_a_proj_with_mqa = linear(d, c.rkv + self.dr, c.init_std)
        self.kv_a_layernorm = RMSNorm(c.rkv, c.norm_eps) if c.latent_norm else None
        self.kv_b_proj = linear(c.rkv, h * (hd + dv), c.init_std)
        self.o_proj = linear(h * dv, d, c.init_std)
        prerope = c.variant == "mla-pre-rope" and c.rope
        self.input_rotation = prerope and c.prerope_placement == "input"
        rope = lambda w, inter: Rope(w, c.max_seq_len, c.rope_theta, inter)  # noqa: E731
        self.rope_q = rope(d if self.input_rotation else c.rq, False) if prerope else None
        self.rope_kv = rope(c.rkv, False) if prerope and not self.input_rotation else None
        self.rope_pe = rope(c.rope_dim, True) if decoupled and c.rope else None
        self.c, self.impl = c, impl

    def _norm(self, norm, x):
        return norm(x) if norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] → [b, s, d]."""
        c, h, hd, dv, dr = self.c, self.c.n_heads, self.c.head_dim, self.c.dv, self.dr
        b, s, _ = x.shape
        k_pe = None
        if self.input_rotation:
            xr = self.rope_q(x)
            c_q = self._norm(self.q_a_layernorm, self.q_a_proj(xr))
            c_key = self._norm(self.kv_a_layernorm, self.kv_a_proj_with_mqa(xr))
            c_value = self._norm(self.kv_a_layernorm, self.kv_a_proj_with_mqa(x))
        else:
            c_q = self._norm(self.q_a_layernorm, self.q_a_proj(x))
            if self.rope_q is not None:
                c_q = self.rope_q(c_q)
            kv = self.kv_a_proj_with_mqa(x)
            c_value = self._norm(self.kv_a_layernorm, kv[..., : c.rkv])
            if dr > 0:
                k_pe = kv[..., c.rkv :].reshape(b, 1, s, dr)
                if self.rope_pe is not None:
                    k_pe = self.rope_pe(k_pe)
            c_key = self.rope_kv(c_value) if self.rope_kv is not None else c_value
        q = split_heads(self.q_b_proj(c_q), h)  # [b, H, s, hd + dr]
        kv = split_heads(self.kv_b_proj(c_value), h)  # [b, H, s, hd + dv]
        v = kv[..., hd : hd + dv]
        keys_rotated = self.input_rotation or self.rope_kv is not None
        k_nope = (split_heads(self.kv_b_proj(c_key), h) if keys_rotated else kv)[..., :hd]
        if k_pe is not None:
            q_nope, q_pe = q[..., :hd], q[..., hd:]
            if self.rope_pe is not None:
                q_pe = self.rope_pe(q_pe)
            q = torch.cat((q_nope, q_pe), -1)
            k = torch.cat((k_nope, k_pe.expand(-1, h, -1, -1)), -1)
        else:
            q, k = q, k_nope
        out = causal_attention(
            q, k, v, 1 / math.sqrt(hd + dr), self.impl, self.c.gap_removed
        )
        return self.o_proj(merge_heads(out))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, impl: str):
        super().__init__()
        a = c.attention
        self.input_layernorm = RMSNorm(a.d_model, c.norm_eps)
        self.self_attn = Mha(a, impl) if a.variant == "mha" else Mla(a, impl)
        self.post_attention_layernorm = RMSNorm(a.d_model, c.norm_eps)
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": linear(a.d_model, c.ffn_hidden, a.init_std),
                "up_proj": linear(a.d_model, c.ffn_hidden, a.init_std),
                "down_proj": linear(c.ffn_hidden, a.d_model, a.init_std),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        m = self.mlp
        return x + m["down_proj"](F.silu(m["gate_proj"](h)) * m["up_proj"](h))


class Llama(nn.Module):
    """The decoder. Parameter names are the export's (`model.layers.N.self_attn.q_proj.weight`,
    ...), so `load_state_dict` reads the project's safetensors directly."""

    def __init__(self, c: LlamaConfig, impl: str = "sdpa"):
        super().__init__()
        a = c.attention
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, a.d_model)
        nn.init.normal_(self.model.embed_tokens.weight, 0.0, a.init_std)
        self.model.layers = nn.ModuleList(Block(c, impl) for _ in range(c.n_layers))
        self.model.norm = RMSNorm(a.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else linear(a.d_model, c.vocab_size, a.init_std)
        self.config = c

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] (int64) → logits [b, s, vocab]."""
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x)
        x = self.model.norm(x)
        if self.lm_head is None:
            return x @ self.model.embed_tokens.weight.t()
        return self.lm_head(x)

    @staticmethod
    def from_export(dir: Path, impl: str = "sdpa") -> "Llama":
        """The model of `dir/config.json` with the weights of `dir/model.safetensors`."""
        from safetensors.torch import load_file

        model = Llama(LlamaConfig.from_export(dir), impl)
        state = load_file(str(Path(dir) / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{dir}: missing {missing}, unexpected {unexpected}")
        return model
