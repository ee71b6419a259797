#!/usr/bin/env python3
"""Load checkpoints exported by `cargo xtask models --export DIR` into HF transformers and
compare their logits with the ones attn-models computed (DIR/<variant>/logits.json).

    python3 scripts/hf_check.py DIR

MHA loads as LlamaForCausalLM, MLA-Decoupled as DeepseekV2ForCausalLM; MLA-PreRoPE is not an
HF architecture and is skipped. Prints one line per variant; exits 1 if a comparison fails.
"""
import json, os, sys

import torch
import transformers
from transformers import AutoModelForCausalLM

root = sys.argv[1]
ok = True
for variant in ["mha", "mla-decoupled", "mla-prerope"]:
    path = os.path.join(root, variant)
    if not os.path.isdir(path):
        continue
    ref = json.load(open(os.path.join(path, "logits.json")))
    if variant == "mla-prerope":
        print(f"variant={variant} skipped=not-an-hf-architecture")
        continue
    try:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    except Exception as e:  # report and go on to the next variant
        print(f"variant={variant} load_error={type(e).__name__}: {str(e)[:300]}")
        ok = False
        continue
    model.eval()
    tokens = torch.tensor([ref["tokens"]])
    with torch.no_grad():
        logits = model(tokens).logits[0].float()
    theirs = torch.tensor(ref["logits"]).reshape(logits.shape)
    diff = (logits - theirs).abs().max().item()
    rel = diff / theirs.abs().max().item()
    good = rel < 1e-4
    ok &= good
    print(f"variant={variant} class={type(model).__name__} transformers={transformers.__version__} max_abs_diff={diff:.3e} rel={rel:.3e} ok={good}")
sys.exit(0 if ok else 1)
