//! The cuBLAS backend computes the products burn computes: every layout and broadcast the
//! models produce, forward and through autodiff. Needs an NVIDIA GPU and libcublas, so the
//! tests are ignored by default; on the device:
//! `cargo test --release -p experiments --features cuda --test cublas -- --ignored`
//! (or the test binary built with `--no-run`, run with `--ignored`).
//!
//! Reference: the exact product in f64 of the same (bf16- or f32-valued) inputs, on the host.
//! Tolerance, per entry, from the error of one accumulation in f32 and one rounding of the
//! result (Higham, §3.5): `|ĉ − c| ≤ u_out·|c| + (k·u₃₂ + 2·u_in)·(|A||B|)`, with `u_out`
//! the output's unit roundoff (bf16 2⁻⁸, f32 2⁻²⁴), `u₃₂ = 2⁻²⁴` and `u_in` the rounding of
//! the inputs inside the tensor cores (TF32 2⁻¹¹ for f32 operands, 0 for bf16, which they
//! take exactly). burn's own kernel is held to the same bound, so the two are compared
//! through the same yardstick.
#![cfg(feature = "cuda")]

mod common;
use common::{host, strides};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use experiments::cublas::{CublasCuda, Inner, counts, init};

type Dev = cubecl::cuda::CudaDevice;

fn device() -> Dev {
    let device = Dev::default();
    init(&device).expect("libcublas loads");
    device
}

/// Exact `[batch…, m, k]·[batch…, k, n]` of contiguous host data with burn's broadcasting;
/// returns the product and `|A||B|`.
fn reference(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
    let r = sa.len();
    let (m, k, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
    let out_batch: Vec<usize> = (0..r - 2).map(|i| sa[i].max(sb[i])).collect();
    let batches: usize = out_batch.iter().product();
    let (mut c, mut abs) = (vec![0.0; batches * m * n], vec![0.0; batches * m * n]);
    for bi in 0..batches {
        // Batch index → offsets in each operand (size-1 axes broadcast).
        let (mut rest, mut oa, mut ob, mut stride_a, mut stride_b) = (bi, 0, 0, m * k, k * n);
        for i in (0..r - 2).rev() {
            let idx = rest % out_batch[i];
            rest /= out_batch[i];
            if sa[i] > 1 {
                oa += idx * stride_a;
            }
            if sb[i] > 1 {
                ob += idx * stride_b;
            }
            stride_a *= sa[i];
            stride_b *= sb[i];
        }
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut t) = (0.0, 0.0);
                for p in 0..k {
                    let x = a[oa + i * k + p] * b[ob + p * n + j];
                    s += x;
                    t += x.abs();
                }
                c[bi * m * n + i * n + j] = s;
                abs[bi * m * n + i * n + j] = t;
            }
        }
    }
    let mut shape = out_batch;
    shape.extend([m, n]);
    (c, abs, shape)
}

/// Checks `got` against the exact product within the bound of the module docs.
fn assert_close(
    got: &[f64],
    exact: &[f64],
    abs: &[f64],
    k: usize,
    u_out: f64,
    u_in: f64,
    what: &str,
) {
    assert_eq!(got.len(), exact.len(), "{what}: length");
    let u32_ = 2f64.powi(-24);
    for (i, ((g, c), t)) in got.iter().zip(exact).zip(abs).enumerate() {
        let tol = u_out * c.abs() + (k as f64 * u32_ + 2.0 * u_in) * t + 1e-30;
        assert!(
            (g - c).abs() <= tol,
            "{what}: entry {i}: got {g}, exact {c}, |Δ| {} > {tol}",
            (g - c).abs()
        );
    }
}

/// One product through both backends, each against the exact reference.
fn check<const D: usize>(
    a: Tensor<CublasCuda, D>,
    b: Tensor<CublasCuda, D>,
    u_out: f64,
    u_in: f64,
    what: &str,
) {
    check_path(a, b, u_out, u_in, what, None)
}

/// [`check`], and when `tables` is given, whether the product went through pointer tables.
fn check_path<const D: usize>(
    a: Tensor<CublasCuda, D>,
    b: Tensor<CublasCuda, D>,
    u_out: f64,
    u_in: f64,
    what: &str,
    tables: Option<bool>,
) {
    // The exact reference is computed from contiguous copies of the same values.
    let (sa, sb) = (a.dims().to_vec(), b.dims().to_vec());
    let (ha, hb) = (host(&a), host(&b));
    let (exact, abs, shape) = reference(&ha, &sa, &hb, &sb);
    let k = sa[D - 1];
    // A `k` that is not a multiple of the 16-byte vector may be cut into bulk and remainder
    // (`Gemm::enqueue`): the remainder's partial sum is rounded to the output once more,
    // ≤ u_out·Σ_remainder |a||b| ≤ u_out·|A||B|, charged to the `|A||B|` term as u_in += u_out/2.
    let vector = 16 / a.dtype().size();
    let u_in = if k > vector && k % vector != 0 {
        u_in + u_out / 2.0
    } else {
        u_in
    };
    let before = counts();
    let ours = a.clone().matmul(b.clone());
    let after = counts();
    assert_eq!(
        after.cublas,
        before.cublas + 1,
        "{what}: did not run on cuBLAS"
    );
    if let Some(tables) = tables {
        assert_eq!(
            after.pointer_tables,
            before.pointer_tables + u64::from(tables),
            "{what}: pointer tables expected: {tables}"
        );
    }
    assert_eq!(ours.dims().to_vec(), shape, "{what}: shape");
    assert_close(
        &host(&ours),
        &exact,
        &abs,
        k,
        u_out,
        u_in,
        &format!("{what} (cuBLAS)"),
    );
    // burn's kernel on the very same primitives.
    let theirs: Tensor<Inner, D> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(
        <Inner as burn::tensor::ops::FloatTensorOps<Inner>>::float_matmul(
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
        ),
    ));
    assert_close(
        &host(&theirs),
        &exact,
        &abs,
        k,
        u_out,
        u_in,
        &format!("{what} (burn)"),
    );
}

fn random<const D: usize>(shape: [usize; D], device: &Dev) -> Tensor<CublasCuda, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn cublas_products_match_the_exact_product_in_every_layout() {
    let device = device();
    <CublasCuda as Backend>::seed(&device, 7);
    let bf16 = (2f64.powi(-8), 0.0);
    // Plain, odd sizes (the output head's 32 100 is not a multiple of 8).
    check(
        random([37, 64], &device),
        random([64, 101], &device),
        bf16.0,
        bf16.1,
        "2-D odd",
    );
    // Batched attention scores [b, H, s, d]·[b, H, d, t] with a transposed key view.
    let q = random([2, 3, 17, 16], &device);
    let k = random([2, 3, 19, 16], &device);
    check(
        q.clone(),
        k.clone().swap_dims(2, 3),
        bf16.0,
        bf16.1,
        "QKᵀ (transposed view)",
    );
    // A transposed left operand (the weight gradient's xᵀ·dy).
    let x = random([40, 24], &device);
    let dy = random([40, 12], &device);
    check(x.transpose(), dy, bf16.0, bf16.1, "xᵀ·dy");
    // Broadcast: [b, H, s, t]·[b, 1, t, r] (absorbed MLA) and [b, s, d]·[1, d, e].
    let p = random([2, 3, 5, 7], &device);
    let c = random([2, 1, 7, 9], &device);
    check(p, c, bf16.0, bf16.1, "[b,H,s,t]·[b,1,t,r]");
    let h = random([4, 6, 8], &device);
    let w = random([1, 8, 10], &device);
    check(h, w, bf16.0, bf16.1, "[b,s,d]·[1,d,e]");
    // A slice (rows of a larger buffer, offset start) and a permuted batch.
    let big = random([3, 10, 12], &device);
    let sliced = big.clone().slice([0..3, 2..9, 0..12]);
    check(
        sliced,
        random([3, 12, 5], &device),
        bf16.0,
        bf16.1,
        "sliced rows",
    );
    let permuted = random([5, 2, 6, 4], &device).swap_dims(0, 1); // [2, 5, 6, 4], batch strides swapped
    check(
        permuted,
        random([2, 5, 4, 3], &device),
        bf16.0,
        bf16.1,
        "permuted batch",
    );
    // Split heads: [b, s, H, d] seen as [b, H, s, d], whose batch axes share no stride (one
    // batched call over pointer tables), against a contiguous right operand, and both ways
    // round as in attention's P·V and its gradients.
    let v = random([3, 24, 4, 16], &device).swap_dims(1, 2); // [3, 4, 24, 16]
    let p = random([3, 4, 8, 24], &device);
    let tables = Some(true);
    // The output follows V's order ([b, s, H, d] read as [b, H, s, d]): the heads merge back
    // into [b, s, H·d] as a view.
    let out = p.clone().matmul(v.clone());
    assert_eq!(strides(&out), vec![8 * 4 * 16, 16, 4 * 16, 1], "P·V output");
    let merged = out.swap_dims(1, 2).reshape([3, 8, 4 * 16]);
    assert_eq!(
        strides(&merged),
        vec![8 * 4 * 16, 4 * 16, 1],
        "merged heads"
    );
    check_path(p, v.clone(), bf16.0, bf16.1, "P·V, V split heads", tables);
    check_path(
        v.clone().swap_dims(2, 3),
        random([3, 4, 24, 8], &device),
        bf16.0,
        bf16.1,
        "Vᵀ·dO, split heads transposed",
        tables,
    );
    check_path(
        random([3, 24, 4, 16], &device).swap_dims(1, 2),
        v.swap_dims(2, 3),
        bf16.0,
        bf16.1,
        "QKᵀ, both split heads",
        tables,
    );
    // MLA's values: a slice of each head's columns (the last 256 of 512); the output follows
    // their order too. burn views a slice only when its byte offsets are multiples of the
    // allocator's alignment (512 bytes on CUDA; else it copies it, row-major): the expected
    // layout is read off the operand.
    let kv = random([2, 24, 2, 512], &device).swap_dims(1, 2); // [2, 2, 24, 512]
    let v_slice = kv.slice([0..2, 0..2, 0..24, 256..512]); // [2, 2, 24, 256]
    let v_strides = strides(&v_slice);
    let expected = if v_strides[1] < v_strides[2] {
        vec![8 * 2 * 256, 256, 2 * 256, 1] // a view: [b, s, H, d] order
    } else {
        vec![2 * 8 * 256, 8 * 256, 256, 1] // a copy: row-major
    };
    let p = random([2, 2, 8, 24], &device);
    let out = p.clone().matmul(v_slice.clone());
    assert_eq!(strides(&out), expected, "P·V (sliced V {v_strides:?})");
    check(p, v_slice, bf16.0, bf16.1, "P·V, V a slice of split heads");
    // Split heads with an unaligned width: pieces along k, so the host loop of calls.
    check_path(
        random([2, 10, 3, 12], &device).swap_dims(1, 2),
        random([2, 3, 12, 8], &device),
        bf16.0,
        bf16.1,
        "split heads, k = 12 in two pieces",
        Some(false),
    );
    // A matrix with no unit stride (every other column) is copied first.
    let strided = random([6, 16], &device)
        .reshape([6, 8, 2])
        .slice([0..6, 0..8, 0..1])
        .reshape([6, 8]);
    check(
        strided,
        random([8, 5], &device),
        bf16.0,
        bf16.1,
        "no unit stride",
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn cublas_f32_products_use_tf32_within_its_bound() {
    let device = device();
    let a: Tensor<CublasCuda, 2> = random([33, 70], &device).cast(burn::tensor::DType::F32);
    let b: Tensor<CublasCuda, 2> = random([70, 20], &device).cast(burn::tensor::DType::F32);
    check(a, b, 2f64.powi(-24), 2f64.powi(-11), "f32 (TF32)");
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn autodiff_gradients_run_on_cublas_and_match_the_exact_ones() {
    // loss = Σ (X·W)ᵢⱼ·Gᵢⱼ: dX = G·Wᵀ, dW = Xᵀ·G. Both products of the backward pass must go
    // through cuBLAS (burn-autodiff calls B::float_matmul), and match the exact values.
    type A = Autodiff<CublasCuda>;
    let device = device();
    let x: Tensor<A, 2> =
        Tensor::random([24, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let w: Tensor<A, 2> =
        Tensor::random([16, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let g: Tensor<A, 2> = Tensor::random([24, 8], Distribution::Normal(0.0, 1.0), &device);
    let before = counts();
    let loss = (x.clone().matmul(w.clone()) * g.clone()).sum();
    let grads = loss.backward();
    let after = counts();
    assert!(
        after.cublas >= before.cublas + 3,
        "forward and both gradients on cuBLAS"
    );
    let (hx, hw, hg) = (host(&x), host(&w), host(&g));
    let wt: Vec<f64> = (0..8 * 16).map(|i| hw[(i % 16) * 8 + i / 16]).collect();
    let xt: Vec<f64> = (0..16 * 24).map(|i| hx[(i % 24) * 16 + i / 24]).collect();
    let (dx, dx_abs, _) = reference(&hg, &[24, 8], &wt, &[8, 16]);
    let (dw, dw_abs, _) = reference(&xt, &[16, 24], &hg, &[24, 8]);
    let u = 2f64.powi(-8);
    assert_close(
        &host(&x.grad(&grads).expect("dX")),
        &dx,
        &dx_abs,
        8,
        u,
        0.0,
        "dX",
    );
    assert_close(
        &host(&w.grad(&grads).expect("dW")),
        &dw,
        &dw_abs,
        24,
        u,
        0.0,
        "dW",
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn linear_layers_reach_cublas() {
    // nn::Linear goes through ModuleOps::linear's default, which multiplies with float_matmul.
    let device = device();
    let layer = burn::nn::LinearConfig::new(32, 48).init::<CublasCuda>(&device);
    let x = random([4, 9, 32], &device);
    let before = counts();
    let y = layer.forward(x.clone());
    let after = counts();
    assert_eq!(after.cublas, before.cublas + 1);
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().expect("bias").val();
    let expected = x.matmul(weight.unsqueeze()) + bias.unsqueeze();
    let (a, b) = (host(&y), host(&expected));
    let max = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    // Same product, bias added in bf16 in a possibly different order: one rounding of |y|.
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
    assert!(
        max <= 2f64.powi(-7) * scale,
        "max |Δ| {max} vs scale {scale}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn linear_weight_gradients_are_one_product_over_every_row() {
    // `linear_weight_backward` flattens the batch: dW = Σ_rows x_r c_rᵀ as one product with
    // k = all the rows (3·5), one f32 accumulation and one rounding, not a bf16 product per
    // batch element added up afterwards.
    let device = device();
    type Ad = Autodiff<CublasCuda>;
    let layer = burn::nn::LinearConfig::new(24, 40)
        .with_bias(false)
        .init::<Ad>(&device);
    let x: Tensor<Ad, 3> = Tensor::from_inner(random([3, 5, 24], &device));
    let c: Tensor<Ad, 3> = Tensor::from_inner(random([3, 5, 40], &device));
    let before = counts();
    let grads = (layer.forward(x.clone()) * c.clone()).sum().backward();
    let dw = host(&layer.weight.val().grad(&grads).expect("dW"));
    // Forward, and the weight's gradient as one product (x needs no gradient).
    assert_eq!(counts().cublas, before.cublas + 2);
    let (xs, cs) = (host(&x), host(&c));
    let (mut exact, mut abs) = (vec![0.0; 24 * 40], vec![0.0; 24 * 40]);
    for r in 0..15 {
        for i in 0..24 {
            for j in 0..40 {
                exact[i * 40 + j] += xs[r * 24 + i] * cs[r * 40 + j];
                abs[i * 40 + j] += (xs[r * 24 + i] * cs[r * 40 + j]).abs();
            }
        }
    }
    assert_close(
        &dw,
        &exact,
        &abs,
        15,
        2f64.powi(-8),
        0.0,
        "dW of a [3, 5, 24] batch",
    );
}

/// The row stride of a float tensor's primitive (its second-to-last axis).
fn row_stride<const D: usize>(t: &Tensor<CublasCuda, D>) -> usize {
    strides(t)[D - 2]
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcublas"]
fn unaligned_widths_run_on_aligned_pitches_and_match_the_exact_products() {
    // The output head's shape in small: a width (1001 bf16 = 2002 bytes) whose rows are not
    // 16-byte aligned. The product's output comes back on an aligned pitch, operands with
    // unaligned rows and enough reuse (≥ 64 products per element) are copied to one, and the
    // values are those of the exact products, forward and in both gradients.
    let device = device();
    let (b, s, d, v) = (2, 70, 96, 1001);
    let x = random([b, s, d], &device);
    let w = random([d, v], &device);
    let y = x.clone().matmul(w.clone().unsqueeze::<3>());
    let pitch = row_stride(&y);
    assert!(pitch >= v && pitch % 8 == 0, "row stride {pitch}");
    let (hx, hw) = (host(&x), host(&w));
    let (exact, abs, _) = reference(&hx, &[b, s, d], &hw, &[1, d, v]);
    let u = 2f64.powi(-8);
    assert_close(&host(&y), &exact, &abs, d, u, 0.0, "[b,s,d]·[1,d,v]");
    // Merging the batch into the rows is a view of the pitched rows, not a copy.
    let flat = y.clone().reshape([b * s, v]);
    assert_eq!(row_stride(&flat), pitch);
    assert_eq!(host(&flat), host(&y));
    // A reshape that no view can express still copies, to the same values.
    let t = y.clone().swap_dims(1, 2).reshape([b, v * s]);
    let ht = host(&t);
    let hy = host(&y);
    for (i, value) in ht.iter().enumerate() {
        let (bi, rest) = (i / (v * s), i % (v * s));
        let (j, r) = (rest / s, rest % s);
        assert_eq!(*value, hy[(bi * s + r) * v + j]);
    }

    // Gradients through autodiff with an upstream gradient `c`: dX = c·Wᵀ reads c's
    // unaligned rows (copied: reuse d = 96) and Wᵀ (copied: reuse s = 70); dW = Σ xᵀ·c.
    type Ad = Autodiff<CublasCuda>;
    let xa: Tensor<Ad, 3> = Tensor::from_inner(x).require_grad();
    let wa: Tensor<Ad, 2> = Tensor::from_inner(w).require_grad();
    let c = random([b, s, v], &device);
    let before = counts();
    let grads = (xa.clone().matmul(wa.clone().unsqueeze::<3>()) * Tensor::from_inner(c.clone()))
        .sum()
        .backward();
    assert!(counts().cublas >= before.cublas + 3);
    let hc = host(&c);
    let wt: Vec<f64> = (0..v * d).map(|i| hw[(i % d) * v + i / d]).collect();
    let (dx, dx_abs, _) = reference(&hc, &[b, s, v], &wt, &[1, v, d]);
    // k = 1001 is cut into 1000 + 1: the remainder's partial product is rounded to bf16 once
    // before the bulk is added, ≤ u·Σ_remainder |c||W| ≤ u·|c||W|: u_in = u/2.
    assert_close(
        &host(&xa.grad(&grads).expect("dX")),
        &dx,
        &dx_abs,
        v,
        u,
        u / 2.0,
        "dX = c·Wᵀ",
    );
    let (mut dw, mut dw_abs) = (vec![0.0; d * v], vec![0.0; d * v]);
    for r in 0..b * s {
        for i in 0..d {
            for j in 0..v {
                let p = hx[r * d + i] * hc[r * v + j];
                dw[i * v + j] += p;
                dw_abs[i * v + j] += p.abs();
            }
        }
    }
    // burn's matmul backward rounds each batch's product to bf16 and sums them afterwards
    // (one more rounding of the sum): Σ_batch u·|partial| ≤ u·Σ|x||c|, charged to the
    // `|A||B|` term as u_in = u/2 per batch element.
    assert_close(
        &host(&wa.grad(&grads).expect("dW")),
        &dw,
        &dw_abs,
        b * s,
        u,
        b as f64 * u / 2.0,
        "dW = Σ xᵀ·c",
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn slices_starting_on_16_bytes_are_views_and_read_as_the_parent() {
    use burn::tensor::DType;
    let device = device();
    // MLA-Decoupled's down-projection output `[b, s, r + d_r]` split into its latent and its
    // rotary key (bf16: 16-byte starts at every multiple of 8 columns: views), and a block
    // starting at column 3 (6 bytes: burn's slice, a view or a copy by its own rule). Each is
    // read back exactly and used by a product and by an element-wise kernel of burn's; the
    // two blocks are differentiated through.
    let (b, s, r, dr) = (3, 5, 48, 16);
    let x = random([b, s, r + dr], &device).cast(DType::BF16);
    let xs = host(&x);
    let parent = strides(&x);
    for (range, view) in [(0..r, true), (r..r + dr, true), (3..r, false)] {
        let part = x.clone().slice([0..b, 0..s, range.clone()]);
        let what = format!("columns {range:?}");
        if view {
            assert_eq!(strides(&part), parent, "{what}: a view");
        }
        let width = range.len();
        let want: Vec<f64> = (0..b * s * width)
            .map(|i| xs[(i / width) * (r + dr) + range.start + i % width])
            .collect();
        assert_eq!(host(&part), want, "{what}: values");
        // burn's element-wise kernel and a contiguous copy read the view's entries.
        assert_eq!(
            host(&(part.clone() * 2.0)),
            want.iter().map(|v| 2.0 * v).collect::<Vec<_>>(),
            "{what}: ×2"
        );
        let w = random([width, 8], &device).cast(DType::BF16);
        let (got, rows) = (host(&part.clone().matmul(w.clone().unsqueeze())), b * s);
        let (c, abs, _) = reference(&want, &[rows, width], &host(&w), &[width, 8]);
        // A width that is not a multiple of 8 is cut into bulk and remainder, whose partial
        // sum is rounded once more (as in `check_path`): u_in = u/2.
        let u = 1.0 / 256.0;
        let u_in = if width % 8 != 0 { u / 2.0 } else { 0.0 };
        assert_close(&got, &c, &abs, width, u, u_in, &format!("{what}: product"));
    }
    // Through autodiff: the two blocks' gradients land in their columns of the parent's.
    let leaf = Tensor::<Autodiff<CublasCuda>, 3>::from_inner(x.clone()).require_grad();
    let (c0, c1) = (random([b, s, r], &device), random([b, s, dr], &device));
    let loss = (leaf.clone().slice([0..b, 0..s, 0..r])
        * Tensor::from_inner(c0.clone().cast(DType::BF16)))
    .sum()
        + (leaf.clone().slice([0..b, 0..s, r..r + dr])
            * Tensor::from_inner(c1.clone().cast(DType::BF16)))
        .sum();
    let dx = host(&leaf.grad(&loss.backward()).expect("dx"));
    let (h0, h1) = (host(&c0.cast(DType::BF16)), host(&c1.cast(DType::BF16)));
    let want: Vec<f64> = (0..b * s * (r + dr))
        .map(|i| {
            let (row, col) = (i / (r + dr), i % (r + dr));
            if col < r {
                h0[row * r + col]
            } else {
                h1[row * dr + col - r]
            }
        })
        .collect();
    assert_eq!(dx, want, "gradient of the two blocks");
}
