#!/usr/bin/env python3
"""Generate the forwarding half of `experiments::cublas::CublasCuda`.

burn 0.21 has no decorator that wraps a backend and overrides one operation, so the cuBLAS
backend forwards every operation that `burn_cubecl::CubeBackend` implements itself (its
required and overridden methods) to it, word for word, and leaves burn's default methods as
defaults (they are written in terms of the forwarded operations, so they reach cuBLAS where
they multiply matrices). The signatures are copied from burn-backend's trait definitions.

Usage (reads burn-backend-0.21.0 and burn-cubecl-0.21.0 from ~/.cargo/registry/src):
    python3 scripts/gen_backend_forwarding.py > crates/experiments/src/cublas/forward.rs
    cargo fmt -p experiments
"""
import glob
import os
import re
import sys

REGISTRY = glob.glob(f"{os.path.expanduser('~')}/.cargo/registry/src/*/")
def crate_dir(name):
    for r in REGISTRY:
        d = r + name
        if os.path.isdir(d):
            return d
    sys.exit(f"{name} not found under ~/.cargo/registry/src")

BACKEND = crate_dir("burn-backend-0.21.0") + "/src/backend/"
CUBECL = crate_dir("burn-cubecl-0.21.0") + "/src/"

# (trait, file defining it, files holding CubeBackend's impl of it)
TRAITS = [
    ("FloatTensorOps", "ops/tensor.rs", ["ops/tensor.rs"]),
    ("IntTensorOps", "ops/int_tensor.rs", ["ops/int_tensor.rs"]),
    ("BoolTensorOps", "ops/bool_tensor.rs", ["ops/bool_tensor.rs"]),
    ("ModuleOps", "ops/modules/base.rs", ["ops/module.rs"]),
    ("ActivationOps", "ops/activation.rs", ["ops/activation.rs"]),
    ("QTensorOps", "ops/qtensor.rs", ["ops/qtensor.rs"]),
]
# Bodies that are not a plain forward: the override itself, and methods whose types are
# generic over the backend (the primitives inside are equal; the wrapper is rebuilt). `{call}`
# is the plain forward, `{args}` its argument list.
SPECIAL = {
    "float_matmul": "super::backend::matmul(lhs, rhs)",
    "float_reshape": "super::backend::reshape(tensor, shape)",
    "q_matmul": "super::backend::from_inner(<Inner as QTensorOps<Inner>>::q_matmul(\n"
    "            super::backend::to_inner(lhs),\n            super::backend::to_inner(rhs),\n        ))",
    "quantize": "<Inner as QTensorOps<Inner>>::quantize(\n            tensor,\n            scheme,\n"
    "            QuantizationParametersPrimitive {\n                scales: qparams.scales,\n            },\n        )",
    "max_pool2d_with_indices": "let r = {call};\n"
    "        MaxPool2dWithIndices {\n            output: r.output,\n            indices: r.indices,\n        }",
    "max_pool2d_with_indices_backward": "MaxPool2dBackward {\n            x_grad: {call}.x_grad,\n        }",
    "deform_conv2d_backward": "let r = {call};\n        DeformConv2dBackward {\n"
    "            x_grad: r.x_grad,\n            offset_grad: r.offset_grad,\n"
    "            weight_grad: r.weight_grad,\n            mask_grad: r.mask_grad,\n"
    "            bias_grad: r.bias_grad,\n        }",
}
# burn default methods the backend overrides with bodies of its own (not forwards).
OVERRIDES = {
    "embedding_backward": "super::kernels::embedding_backward(weights, output_grad, indices)",
    "linear_weight_backward": "super::backend::linear_weight_backward(x, output_grad)",
}
GENERIC_TYPES = re.compile(r"\b(TensorPrimitive|TransactionPrimitive|\w+Backward|\w+WithIndices|QuantizationParametersPrimitive)<")


def enclosed(text, start, opening, closing):
    """Text inside the first `opening`…`closing` pair at or after `start` (nesting counted)."""
    i = text.index(opening, start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == opening:
            depth += 1
        elif text[j] == closing:
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    raise ValueError(f"unbalanced {opening}{closing}")


def block_after(text, start):
    """Text of the brace block that opens at or after `start` (without the braces)."""
    return enclosed(text, start, "{", "}")


def strip_comments(text):
    return re.sub(r"//[^\n]*", "", text)


def top_level_fns(body):
    """(name, signature) of each fn at depth 0 of an impl/trait body."""
    out = []
    depth = 0
    i = 0
    while i < len(body):
        c = body[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            m = re.match(r"(async\s+)?fn\s+(\w+)", body[i:])
            if m and (i == 0 or not body[i - 1].isalnum()):
                # signature runs to the first `{` or `;` outside parentheses/angles
                j = i
                paren = 0
                while True:
                    ch = body[j]
                    if ch in "(":
                        paren += 1
                    elif ch == ")":
                        paren -= 1
                    elif paren == 0 and ch in "{;":
                        break
                    j += 1
                out.append((m.group(2), bool(m.group(1)), body[i:j].strip()))
                i = j
                continue
        i += 1
    return out


def params(signature):
    """Parameter names of a signature (skipping generics)."""
    inner = enclosed(signature, 0, "(", ")")
    names = []
    depth = 0
    piece = ""
    for ch in inner + ",":
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            if piece.strip():
                names.append(piece.split(":")[0].strip().removeprefix("mut "))
            piece = ""
        else:
            piece += ch
    return names


def generic_args(signature):
    """Explicit generic parameter names of `fn name<...>`, for a turbofish."""
    m = re.match(r"fn\s+\w+\s*<", signature)
    if not m:
        return ""
    inner = enclosed(signature, m.end() - 1, "<", ">")
    names = []
    for piece in re.split(r",(?![^<]*>)", inner):
        name = piece.split(":")[0].strip()
        if name and not name.startswith("'"):
            names.append(name.removeprefix("const ").strip())
    return "::<" + ", ".join(names) + ">" if names else ""


def implemented(trait, files):
    names = set()
    for f in files:
        text = strip_comments(open(CUBECL + f).read())
        for m in re.finditer(rf"impl<[^{{]*?>\s*{trait}<Self>\s+for\s+CubeBackend", text):
            names |= {n for n, _, _ in top_level_fns(block_after(text, m.end()))}
    return names


def main():
    print("// @generated by scripts/gen_backend_forwarding.py from burn-backend 0.21.0 and")
    print("// burn-cubecl 0.21.0: do not edit by hand, regenerate.")
    print("//! Forwarding of every operation `CubeBackend` implements itself (see `super`).")
    print()
    print("#![allow(clippy::too_many_arguments)]")
    print()
    print("use super::{CublasCuda, Inner};")
    print("use burn_backend::ops::*;")
    print("use burn_backend::tensor::*;")
    print("use burn_backend::*;")
    print("use burn_backend::tensor::Device;")
    print("use burn_backend::quantization::QuantScheme;")
    print("use burn_backend::tensor::quantization::QuantizationParametersPrimitive;")
    print("use std::future::Future;")
    print()
    skipped = []
    for trait, trait_file, impl_files in TRAITS:
        text = strip_comments(open(BACKEND + trait_file).read())
        m = re.search(rf"pub trait {trait}<B: Backend>", text)
        fns = top_level_fns(block_after(text, m.end()))
        wanted = implemented(trait, impl_files)
        print(f"impl {trait}<Self> for CublasCuda {{")
        for name, is_async, sig in fns:
            if name not in wanted and name not in OVERRIDES:
                continue
            if GENERIC_TYPES.search(sig) and name not in SPECIAL:
                skipped.append(name)
                continue
            sig = re.sub(r"<B>", "<Self>", sig)
            sig = re.sub(r"\bB::", "Self::", sig)
            sig = sig.replace("crate::", "burn_backend::")
            call = f"<Inner as {trait}<Inner>>::{name}{generic_args(sig)}({', '.join(params(sig))})"
            call = OVERRIDES.get(name, SPECIAL.get(name, "{call}")).replace("{call}", call)
            print(f"    {sig} {{")
            print(f"        {call}")
            print("    }")
        print("}")
        print()
    if skipped:
        print("skipped (generic over the backend):", " ".join(skipped), file=sys.stderr)


main()
