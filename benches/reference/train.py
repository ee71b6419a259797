"""Trains the PyTorch reference (model.py) on the batches `cargo xtask bench train` wrote,
with the optimiser and schedule of the Rust loop, and prints one JSON object: the loss of
every update, the time of every update, and the peak memory.

    python3 train.py --run DIR --impl eager|sdpa|compile [--device cuda] [--dtype bf16]
    python3 train.py --matmul-peak [--device cuda]

DIR holds `model/` (the project's export: config.json + model.safetensors, the initial
weights), `tokens.u32` (little-endian uint32, [steps, batch, context + 1], in the order the
Rust loop consumed them) and `train.json` (steps, batch, lr, warmup, min_lr_ratio, betas,
epsilon, weight_decay, clip_norm, read_every: the losses are read from the device every this
many updates, default 1).

The optimiser is the Rust loop's: AdamW (p ← p(1 − ηλ) − η m̂/(√v̂ + ε)), linear warm-up to
η over W updates then cosine decay to r·η, parameters and optimiser state in the training
dtype (pure bf16 on CUDA, as burn's `Cuda<bf16>` backend trains).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import Llama  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def lr_at(step: int, c: dict) -> float:
    """`experiments::train::TrainConfig::lr_at`."""
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    span = max(c["steps"] - c["warmup"], 1)
    progress = min((step - c["warmup"]) / span, 1.0)
    r = c["min_lr_ratio"]
    return c["lr"] * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(args) -> dict:
    run = Path(args.run)
    c = json.loads((run / "train.json").read_text())
    device, dtype = args.device, DTYPES[args.dtype]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    impl = "sdpa" if args.impl == "compile" else args.impl
    model = Llama.from_export(run / "model", impl).to(device=device, dtype=dtype)
    ctx = model.config.context
    steps = min(args.steps or c["steps"], c["steps"])
    tokens = np.fromfile(run / "tokens.u32", dtype="<u4")
    expected = c["steps"] * c["batch"] * (ctx + 1)
    if tokens.size != expected:
        raise SystemExit(f"{run}/tokens.u32 has {tokens.size} tokens, expected {expected}")
    tokens = torch.from_numpy(tokens.astype(np.int64)).view(c["steps"], c["batch"], ctx + 1)
    optim = torch.optim.AdamW(
        model.parameters(),
        lr=c["lr"],
        betas=(c["beta1"], c["beta2"]),
        eps=c["epsilon"],
        weight_decay=c["weight_decay"],
        fused=device == "cuda",
    )

    forward = torch.compile(model) if args.impl == "compile" else model

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        return loss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    read_every = int(c.get("read_every", 1))
    losses, seconds, pending = [], [], []
    since = time.perf_counter()
    for step in range(steps):
        batch = tokens[step].to(device, non_blocking=True)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, c)
        optim.zero_grad(set_to_none=True)
        loss = step_fn(batch)
        if c.get("clip_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip_norm"])
        optim.step()
        pending.append(loss.detach())
        if len(pending) == read_every or step == steps - 1:
            # One host sync per `read_every` updates, as the Rust loop (its
            # `TrainConfig::read_every`); each update of the window gets an equal share of
            # the window's time.
            losses.extend(torch.stack(pending).float().tolist())
            now = time.perf_counter()
            seconds.extend([(now - since) / len(pending)] * len(pending))
            since, pending = now, []
    out = {
        "impl": args.impl,
        "device": device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "steps": steps,
        "tokens_per_step": c["batch"] * ctx,
        "losses": losses,
        "step_seconds": seconds,
    }
    if device == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def matmul_peak(device: str) -> dict:
    """bf16 (f32 on CPU) matmul throughput at 8192² on `device`, median of 7 rounds after
    warm-up: the denominator of MFU."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 3
    for _ in range(5 * reps):  # about a second on an H100: clocks up, handles made
        a @ b
    rounds = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        rounds.append((time.perf_counter() - t0) / reps)
    t = sorted(rounds)[3]
    return {"n": n, "dtype": str(dtype), "flops_per_second": 2 * n**3 / t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="directory written by `cargo xtask bench train`")
    p.add_argument("--impl", choices=["eager", "sdpa", "compile"], default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--steps", type=int, default=0, help="updates (default: all in DIR)")
    p.add_argument("--matmul-peak", action="store_true")
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "f32"
    torch.manual_seed(0)
    if args.matmul_peak:
        print(json.dumps(matmul_peak(args.device)))
    elif args.run:
        print(json.dumps(train(args)))
    else:
        p.error("give --run DIR or --matmul-peak")


if __name__ == "__main__":
    main()
