//! The fused RMSNorm and causal-softmax kernels of `experiments::cublas` compute the
//! functions `attn_models::fused` defines, forward and backward. Needs an NVIDIA GPU, so the
//! tests are ignored by default; on the device:
//! `cargo test --release -p experiments --features cuda --test fused -- --ignored`.
//!
//! Reference: the exact function in f64 of the same bf16 inputs (bf16 values are exact in
//! f64), on the host. Tolerances, per entry, from the kernels' arithmetic (module docs of
//! `cublas::fused`): one rounding of the output to bf16, `2⁻⁸·|ref|` (unit roundoff of an
//! 8-bit significand), plus the f32 evaluation, `γₙ·Σ|terms| ≈ n·2⁻²⁴·Σ|terms|` for a sum of
//! `n` terms (Higham, §3.1); the softmax adds the error of CUDA's fast `exp`, at most
//! `2 + 1.16·|x|` ulp of f32 (CUDA C Programming Guide, table of intrinsic functions), which
//! for the test's arguments (`|x| ≲ 30`) is within `2⁻¹⁴` relative (`FAST_EXP`).
#![cfg(feature = "cuda")]

mod common;
use common::{host, strides};

use attn_models::fused;
use burn::backend::Autodiff;
use burn::module::Param;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use experiments::cublas::{CublasCuda, fused_counts, init, register_fused};

type Dev = cubecl::cuda::CudaDevice;
type Train = Autodiff<CublasCuda>;

const U_BF16: f64 = 1.0 / 256.0;
const U_F32: f64 = 1.0 / 16_777_216.0;
/// Relative error allowed for CUDA's fast `exp` and the few f32 operations around it
/// (module docs): `2⁻¹⁴`.
const FAST_EXP: f64 = 1.0 / 16384.0;

fn device() -> Dev {
    let device = Dev::default();
    init(&device).expect("libcublas loads");
    register_fused();
    device
}

/// `|got − want| ≤ tol` entry by entry, with the worst ratio in the message.
fn assert_within(what: &str, got: &[f64], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0.0f64, 0);
    for i in 0..got.len() {
        assert!(got[i].is_finite(), "{what}[{i}] = {}", got[i]);
        let ratio = (got[i] - want[i]).abs() / tol[i].max(f64::MIN_POSITIVE);
        if ratio > worst {
            (worst, at) = (ratio, i);
        }
    }
    assert!(
        worst <= 1.0,
        "{what}[{at}]: got {} want {} tolerance {} ({worst:.2}× the bound)",
        got[at],
        want[at],
        tol[at]
    );
}

/// An RMSNorm of width `w` with a random gain (burn's init is all ones, which would hide a
/// gain applied on the wrong axis).
fn norm<B: Backend>(w: usize, device: &B::Device) -> RmsNorm<B> {
    let mut norm = RmsNormConfig::new(w).with_epsilon(1e-5).init(device);
    norm.gamma = Param::from_tensor(Tensor::random([w], Distribution::Normal(1.0, 0.5), device));
    norm
}

/// `r = (mean_j x_j² + ε)^{-1/2}` of one row.
fn rstd(row: &[f64], eps: f64) -> f64 {
    1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt()
}

/// RMSNorm's exact input gradient for rows `xs` `[n, w]`, gain `gs` and output gradient
/// `dys`, per entry: `dx_ij = r_i u_ij − x_ij r_i³ (1/w) Σ_k x_ik u_ik` with `u_ij = γ_j dy_ij`,
/// and the sum of its terms' magnitudes (for the f32 part of a tolerance).
fn rms_norm_dx_exact(
    xs: &[f64],
    gs: &[f64],
    dys: &[f64],
    w: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut dx, mut terms) = (Vec::with_capacity(xs.len()), Vec::with_capacity(xs.len()));
    for (row, dy) in xs.chunks(w).zip(dys.chunks(w)) {
        let r = rstd(row, eps);
        let u: Vec<f64> = (0..w).map(|j| gs[j] * dy[j]).collect();
        let dot: f64 = (0..w).map(|k| row[k] * u[k]).sum();
        let dot_abs: f64 = (0..w).map(|k| (row[k] * u[k]).abs()).sum();
        for j in 0..w {
            dx.push(r * u[j] - row[j] * r.powi(3) * dot / w as f64);
            terms.push(r * u[j].abs() + row[j].abs() * r.powi(3) * dot_abs / w as f64);
        }
    }
    (dx, terms)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rms_norm_forward_and_backward_match_the_exact_function() {
    let device = device();
    // 37 rows: not a multiple of the 8 rows per cube, nor of the grouped backward's 4 rows.
    // Widths below, at and above a warp, read in vectors of 1 (w = 7), 4 (20, 100) and 8
    // (768, 40, 16, 1024, 1600). Rows of up to 4 vectors a lane (1 024 bf16) take the
    // backward that holds a row in registers, one plane per row; wider ones (1 600) the grouped
    // backward, here with 17 000 rows: 4 250 groups, more than its 4 096 planes, so that some
    // planes add a second group to their partial row. A pitch beyond the width: the first `w`
    // columns of wider rows, read in place (MLA-Decoupled's 256-wide `c_kv` beside its 32-wide
    // `k_pe`; and a pitch of 4-element vectors).
    for (n, w, pitch) in [
        (37, 7, 7),
        (37, 20, 20),
        (37, 100, 100),
        (64, 768, 768),
        (9000, 40, 40),
        (17_000, 16, 16),
        (300, 256, 288),
        (37, 20, 28),
        (45, 1024, 1024),
        (17_000, 1600, 1600),
    ] {
        let norm = norm::<Train>(w, &device);
        let wide = Tensor::<Train, 2>::random([n, pitch], Distribution::Normal(0.0, 2.0), &device)
            .require_grad();
        let x = wide.clone().slice([0..n, 0..w]);
        let c = Tensor::<Train, 2>::random([n, w], Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let y = fused::rms_norm(&norm, x.clone());
        assert_eq!(
            fused_counts().rms_norm,
            before.rms_norm + 1,
            "fused kernel ran"
        );
        let grads = (y.clone() * c.clone()).sum().backward();
        // The gradient of the wide rows: `dx` in the first `w` columns, zero after them.
        let dwide = host(&wide.grad(&grads).expect("dx"));
        let dx: Vec<f64> = dwide.chunks(pitch).flat_map(|r| r[..w].to_vec()).collect();
        assert!(
            dwide
                .chunks(pitch)
                .all(|r| r[w..].iter().all(|&v| v == 0.0)),
            "dx beyond the slice ({n}×{w}, pitch {pitch})"
        );
        let dg = norm.gamma.val().grad(&grads).expect("dγ");

        let (xs, gs, cs) = (host(&x), host(&norm.gamma.val()), host(&c));
        let eps = norm.epsilon;
        let (mut y_ref, mut y_tol) = (vec![0.0; n * w], vec![0.0; n * w]);
        let (mut dg_ref, mut dg_abs) = (vec![0.0; w], vec![0.0; w]);
        for i in 0..n {
            let row = &xs[i * w..(i + 1) * w];
            let r = rstd(row, eps);
            for j in 0..w {
                let e = i * w + j;
                y_ref[e] = gs[j] * row[j] * r;
                y_tol[e] = (U_BF16 + (w + 4) as f64 * U_F32) * y_ref[e].abs();
                dg_ref[j] += cs[e] * row[j] * r;
                dg_abs[j] += (cs[e] * row[j] * r).abs();
            }
        }
        let (dx_ref, dx_terms) = rms_norm_dx_exact(&xs, &gs, &cs, w, eps);
        let dx_tol: Vec<f64> = (0..n * w)
            .map(|e| U_BF16 * dx_ref[e].abs() + (w + 8) as f64 * U_F32 * dx_terms[e])
            .collect();
        let dg_tol: Vec<f64> = (0..w)
            .map(|j| U_BF16 * dg_ref[j].abs() + (n + 4) as f64 * U_F32 * dg_abs[j])
            .collect();
        assert_within(&format!("y ({n}×{w})"), &host(&y), &y_ref, &y_tol);
        assert_within(&format!("dx ({n}×{w})"), &dx, &dx_ref, &dx_tol);
        assert_within(&format!("dγ ({n}×{w})"), &host(&dg), &dg_ref, &dg_tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rms_norm_backward_adds_the_residual_gradient_in_the_kernel() {
    let device = device();
    // `x` `[b, s, w]` (an intermediate, as the residual stream is) feeds the norm and, as in
    // a block, the addition after it: `L = Σ c⊙(x + 2·norm(x))`. Autodiff takes the addition
    // first (it is later in the graph), so `x` has the gradient `c` when the norm's backward
    // runs: `dx = c + norm's gradient for 2c`. Widths of the row kernel (768) and of the
    // grouped one (1 600).
    for (b, s, w) in [(3, 40, 768), (2, 30, 1600)] {
        let norm = norm::<Train>(w, &device);
        let leaf = Tensor::<Train, 3>::random([b, s, w], Distribution::Normal(0.0, 2.0), &device)
            .require_grad();
        let x = leaf.clone() * 1.0;
        let c = Tensor::<Train, 3>::random([b, s, w], Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let y = fused::rms_norm(&norm, x.clone());
        let loss = ((x.clone() + y.mul_scalar(2.0)) * c.clone()).sum();
        let grads = loss.backward();
        assert_eq!(
            fused_counts().accumulated,
            before.accumulated + 1,
            "the kernel added the earlier gradient ({w})"
        );
        let (xs, gs, cs) = (host(&x), host(&norm.gamma.val()), host(&c));
        let twice: Vec<f64> = cs.iter().map(|v| 2.0 * v).collect();
        let (norm_part, terms) = rms_norm_dx_exact(&xs, &gs, &twice, w, norm.epsilon);
        let want: Vec<f64> = norm_part.iter().zip(&cs).map(|(d, c)| d + c).collect();
        // As the plain backward (one rounding of the sum to bf16, the f32 dot product), the
        // earlier gradient `c` being exact in bf16 (and `2c` too).
        let tol: Vec<f64> = (0..want.len())
            .map(|e| U_BF16 * want[e].abs() + (w + 8) as f64 * U_F32 * terms[e])
            .collect();
        let dx = leaf.grad(&grads).expect("dx");
        assert_within(&format!("dx ({w})"), &host(&dx), &want, &tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rms_norm_takes_strided_input_and_the_inference_backend() {
    let device = device();
    let (n, w) = (48, 96);
    let norm = norm::<CublasCuda>(w, &device);
    // A transposed view: the kernel must read it as the logical [n, w] tensor.
    let x = Tensor::<CublasCuda, 2>::random([w, n], Distribution::Normal(0.0, 1.0), &device)
        .transpose();
    let before = fused_counts();
    let y = fused::rms_norm(&norm, x.clone().unsqueeze::<3>());
    assert_eq!(fused_counts().rms_norm, before.rms_norm + 1);
    let reference = norm.forward(x.unsqueeze::<3>());
    // burn's composition rounds the rms and the quotient to bf16 as well: 3 roundings.
    let (got, want) = (host(&y), host(&reference));
    let tol: Vec<f64> = want.iter().map(|v| 4.0 * U_BF16 * v.abs()).collect();
    assert_within("y vs burn's RmsNorm", &got, &want, &tol);
}

/// The exact causal softmax of one row's visible entries.
fn softmax_row(row: &[f64], visible: usize) -> Vec<f64> {
    let m = row[..visible]
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row[..visible].iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    (0..row.len())
        .map(|j| if j < visible { e[j] / s } else { 0.0 })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn causal_softmax_forward_and_backward_match_the_exact_function() {
    let device = device();
    // [b, H, s, t], offset: square (training), a cached prefix (decoding), more keys than a
    // warp has lanes, and one query; scales 1, 1/√64 and 1/√96 (MLA-Decoupled's d_k). The
    // kernels read vectors of 1 (t = 9, 33), 2 (t = 62, 70) and 8 keys (t = 64, 256; t = 600:
    // more vectors than lanes, and causal limits inside a vector). At most one vector per
    // lane (t = 9, 62, 64, 256: the training shape) takes the kernels' resident path, more
    // (t = 33, 70, 600) the looping one.
    for (shape, offset, scale) in [
        ([2, 3, 9, 9], 0, 1.0),
        ([2, 3, 5, 9], 4, 0.125),
        ([1, 2, 40, 70], 30, 1.0 / 96f64.sqrt()),
        ([1, 2, 1, 33], 32, 0.125),
        ([1, 1, 30, 62], 32, 1.0),
        ([2, 2, 64, 64], 0, 0.125),
        ([2, 2, 256, 256], 0, 0.125),
        ([1, 2, 50, 600], 550, 1.0 / 96f64.sqrt()),
    ] {
        let [_, _, s, t] = shape;
        let scores = Tensor::<Train, 4>::random(shape, Distribution::Uniform(-8.0, 8.0), &device)
            .require_grad();
        let c = Tensor::<Train, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let probs = fused::causal_softmax(scores.clone(), offset, scale);
        assert_eq!(fused_counts().causal_softmax, before.causal_softmax + 1);
        let grads = (probs.clone() * c.clone()).sum().backward();
        let ds = scores.grad(&grads).expect("d scores");

        let (xs, ps, cs) = (host(&scores), host(&probs), host(&c));
        let rows = xs.len() / t;
        let (mut p_ref, mut p_tol) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        let (mut d_ref, mut d_tol) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        for r in 0..rows {
            let visible = offset + r % s + 1;
            let span = r * t..(r + 1) * t;
            let scaled: Vec<f64> = xs[span.clone()].iter().map(|x| scale * x).collect();
            let exact = softmax_row(&scaled, visible);
            // The backward kernel works from the forward's bf16 output, as autodiff keeps it.
            let (p, cr) = (&ps[span.clone()], &cs[span.clone()]);
            let dot: f64 = (0..visible).map(|k| p[k] * cr[k]).sum();
            let dot_abs: f64 = (0..visible).map(|k| (p[k] * cr[k]).abs()).sum();
            for j in 0..t {
                let e = r * t + j;
                p_ref[e] = exact[j];
                // The f32 product c·x (|c·x| ≤ 8) is rounded once more, ≤ 8·u₃₂ in each
                // exponent and in the log-sum-exp: 16·u₃₂ relative in p.
                p_tol[e] = (U_BF16 + FAST_EXP + (t + 20) as f64 * U_F32) * exact[j];
                d_ref[e] = scale * p[j] * (cr[j] - dot);
                d_tol[e] = U_BF16 * d_ref[e].abs()
                    + (t + 4) as f64 * U_F32 * scale * p[j] * (cr[j].abs() + dot_abs);
            }
        }
        assert_within(&format!("p {shape:?} offset {offset}"), &ps, &p_ref, &p_tol);
        assert_within(
            &format!("dx {shape:?} offset {offset}"),
            &host(&ds),
            &d_ref,
            &d_tol,
        );
        // Masked entries are exactly zero, forward and backward.
        for r in 0..rows {
            let visible = offset + r % s + 1;
            assert!(ps[r * t + visible..(r + 1) * t].iter().all(|&p| p == 0.0));
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn swiglu_forward_and_backward_match_the_exact_function() {
    let device = device();
    // Read in vectors of 1 (21 entries), 4 (3 700) and 8 (131 072) elements.
    for shape in [[3, 7], [37, 100], [64, 2048]] {
        let gate = Tensor::<Train, 2>::random(shape, Distribution::Normal(0.0, 3.0), &device)
            .require_grad();
        let up = Tensor::<Train, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let c = Tensor::<Train, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let y = fused::swiglu(gate.clone(), up.clone());
        assert_eq!(fused_counts().swiglu, before.swiglu + 1);
        let grads = (y.clone() * c.clone()).sum().backward();
        let (dg, du) = (
            gate.grad(&grads).expect("d gate"),
            up.grad(&grads).expect("d up"),
        );
        let (gs, us, cs) = (host(&gate), host(&up), host(&c));
        let n = gs.len();
        let (mut y_ref, mut y_tol) = (vec![0.0; n], vec![0.0; n]);
        let (mut g_ref, mut g_tol) = (vec![0.0; n], vec![0.0; n]);
        let (mut u_ref, mut u_tol) = (vec![0.0; n], vec![0.0; n]);
        for i in 0..n {
            let (g, u, d, s) = (gs[i], us[i], cs[i], sigmoid(gs[i]));
            y_ref[i] = g * s * u;
            y_tol[i] = U_BF16 * y_ref[i].abs() + FAST_EXP * (g * u).abs();
            g_ref[i] = d * u * s * (1.0 + g * (1.0 - s));
            g_tol[i] = U_BF16 * g_ref[i].abs() + FAST_EXP * (d * u).abs() * (1.0 + g.abs());
            u_ref[i] = d * g * s;
            u_tol[i] = U_BF16 * u_ref[i].abs() + FAST_EXP * (d * g).abs();
        }
        assert_within(&format!("y {shape:?}"), &host(&y), &y_ref, &y_tol);
        assert_within(&format!("d gate {shape:?}"), &host(&dg), &g_ref, &g_tol);
        assert_within(&format!("d up {shape:?}"), &host(&du), &u_ref, &u_tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cross_entropy_and_its_gradient_match_the_exact_function() {
    use burn::tensor::{Int, TensorData};
    let device = device();
    // A vocabulary below a warp's width, odd sizes, and the paper's 32 000; then rows on a
    // pitch (a column slice of a wider leaf, as the cuBLAS head's output is laid out), read
    // in place and with a gradient on the same pitch (zero in the leaf's extra columns). The
    // kernels read vectors of 1 (v = 17, 1 001), 4 (36 on a pitch of 40) and 8 logits (1 000,
    // also on a pitch of 1 008, and 32 000).
    // 5 003 rows: the mean's one cube (1 024 threads, four sums each) takes four rows a
    // thread in its unrolled loop and the rest one at a time.
    for (n, v, pad) in [
        (5, 17, 0),
        (37, 1000, 0),
        (16, 32_000, 0),
        (9, 1001, 7),
        (7, 36, 4),
        (11, 1000, 8),
        (5003, 24, 0),
    ] {
        let leaf =
            Tensor::<Train, 2>::random([n, v + pad], Distribution::Normal(0.0, 3.0), &device)
                .require_grad();
        let logits = leaf.clone().slice([0..n, 0..v]);
        let targets: Vec<i32> = (0..n).map(|i| ((i * 7919 + 13) % v) as i32).collect();
        let t = Tensor::<Train, 1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device);
        let before = fused_counts();
        let loss = fused::cross_entropy(logits.clone(), t);
        assert_eq!(fused_counts().cross_entropy, before.cross_entropy + 1);
        let grads = loss.clone().backward();
        let dleaf = host(&leaf.grad(&grads).expect("d logits"));
        let w = v + pad;
        assert!((0..n * w).all(|i| i % w < v || dleaf[i] == 0.0));
        let dl: Vec<f64> = (0..n * v).map(|i| dleaf[(i / v) * w + i % v]).collect();

        let xs = host(&logits);
        let (mut loss_ref, mut loss_tol) = (0.0, FAST_EXP);
        let (mut d_ref, mut d_tol) = (vec![0.0; n * v], vec![0.0; n * v]);
        for i in 0..n {
            let row = &xs[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let ti = targets[i] as usize;
            loss_ref += (lse - row[ti]) / n as f64;
            // Each row's loss, then its share of the sum's rounding: any order of f32
            // additions of n terms is within (n − 1)·u·Σ|term| (Higham, Accuracy and
            // Stability, §4.2).
            loss_tol += (v + 4) as f64 * U_F32 * (lse.abs() + row[ti].abs()) / n as f64
                + n as f64 * U_F32 * (lse - row[ti]).abs() / n as f64;
            for j in 0..v {
                let p = (row[j] - lse).exp();
                let hot = if j == ti { 1.0 } else { 0.0 };
                d_ref[i * v + j] = (p - hot) / n as f64;
                d_tol[i * v + j] = U_BF16 * d_ref[i * v + j].abs()
                    + (FAST_EXP + (v + 4) as f64 * U_F32) * (p + hot) / n as f64;
            }
        }
        assert_within(
            &format!("loss {n}×{v}"),
            &host(&loss),
            &[loss_ref],
            &[loss_tol],
        );
        assert_within(&format!("d logits {n}×{v}+{pad}"), &dl, &d_ref, &d_tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_target_outside_the_vocabulary_gives_a_nan_loss() {
    use burn::tensor::{Int, TensorData};
    let device = device();
    let logits = Tensor::<CublasCuda, 2>::random([4, 50], Distribution::Default, &device);
    for bad in [50, -1] {
        let t = Tensor::<CublasCuda, 1, Int>::from_data(
            TensorData::new(vec![0i32, 1, bad, 3], [4]),
            &device,
        );
        let loss = host(&fused::cross_entropy(logits.clone(), t));
        assert!(loss[0].is_nan(), "target {bad}: loss {loss:?}");
    }
}

/// The partner of entry `i` of a rotary pair in a row of width `w`.
fn partner(i: usize, w: usize, interleaved: bool) -> usize {
    match (interleaved, i < w / 2) {
        (true, _) => i ^ 1,
        (false, true) => i + w / 2,
        (false, false) => i - w / 2,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rotary_embedding_matches_the_composition_forward_and_backward() {
    use attn_models::rope::{Rope, RopePairing};
    let device = device();
    let (b, h, s) = (2, 3, 5);
    let mut dense = 0;
    // The half pairing reads vectors of 4 (w = 8) and 8 pairs (w = 64), single pairs at
    // w = 6; the interleaved one vectors of 2 (w = 6: one pair each), 4 (w = 4: the whole
    // row) and 8 entries (w = 8, MLA-Decoupled's 32, 64, and its queries' 96: 64 fixed
    // coordinates, then 32 rotated, tables of 48 columns).
    for (w, pairing, fixed) in [
        (6, RopePairing::Half, 0),
        (8, RopePairing::Half, 0),
        (64, RopePairing::Half, 0),
        (4, RopePairing::Interleaved, 0),
        (6, RopePairing::Interleaved, 0),
        (8, RopePairing::Interleaved, 0),
        (32, RopePairing::Interleaved, 0),
        (64, RopePairing::Interleaved, 0),
        (96, RopePairing::Interleaved, 64),
    ] {
        let rope = match fixed {
            0 => Rope::<Train>::new(w, 16, 10_000.0, pairing, &device),
            _ => Rope::<Train>::interleaved_after(fixed, w - fixed, 16, 10_000.0, &device),
        };
        let interleaved = pairing == RopePairing::Interleaved;
        for start in [0, 3] {
            // Heads split from `[b, s, h·w]` as the models do: a strided view.
            let x =
                Tensor::<Train, 4>::random([b, s, h, w], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad();
            let xv = x.clone().swap_dims(1, 2);
            let c =
                Tensor::<Train, 4>::random([b, h, s, w], Distribution::Normal(0.0, 1.0), &device);
            let before = fused_counts();
            let y = rope.apply(xv.clone(), start);
            assert_eq!(fused_counts().rotary, before.rotary + 1);
            let dx = x
                .grad(&(y.clone() * c.clone()).sum().backward())
                .expect("dx");
            let x2 = x.clone().detach().require_grad();
            let y_ref = rope.apply_composed(x2.clone().swap_dims(1, 2), start);
            let dx_ref = x2
                .grad(&(y_ref.clone() * c.clone()).sum().backward())
                .expect("dx");
            // Both sides round to bf16: the composition three times (two products and a sum),
            // the kernel once; |cos|, |sin| ≤ 1 bound the terms by |x_a| + |x_b|.
            let bound = |v: &[f64]| -> Vec<f64> {
                (0..v.len())
                    .map(|e| {
                        let base = e - e % w;
                        let p = base + partner(e % w, w, interleaved);
                        4.0 * U_BF16 * (v[e].abs() + v[p].abs())
                    })
                    .collect()
            };
            let what = format!("{pairing:?} w {w} (fixed {fixed}) start {start}");
            // Heads split from a dense `[b, s, h·w]` (burn pads rows of other widths, w = 6, to
            // 16 bytes): the gradient came back in their memory order, so `x`'s is contiguous
            // (the merge of the heads in the split's backward was a view).
            let row_major = vec![s * h * w, h * w, w, 1];
            if strides(&x.clone().inner()) == row_major {
                dense += 1;
                assert_eq!(strides(&dx), row_major, "dx strides {what}");
            }
            let xs = host(&xv);
            assert_within(&format!("y {what}"), &host(&y), &host(&y_ref), &bound(&xs));
            // dx is [b, s, h, w]: the same pairs along the last axis.
            let cs = host(&c.clone().swap_dims(1, 2));
            assert_within(
                &format!("dx {what}"),
                &host(&dx),
                &host(&dx_ref),
                &bound(&cs),
            );
        }
    }
    // The models' widths 8, 32 and 64 are dense: the layout check above ran (rows of 96 bf16,
    // 192 bytes, come padded, as do those of 6).
    assert!(dense >= 10, "dense cases: {dense}");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn column_blocks_are_views_and_their_gradients_land_in_their_columns() {
    use burn::tensor::DType;
    let device = device();
    let (b, s) = (3, 5);
    // MLA-Decoupled's `[latent | rotary key]` in bf16 (both blocks views, vectors of 8), and
    // odd blocks in f32 (the second starts on 20 bytes: burn's copy; single entries).
    for (r, dr, dtype) in [(48, 16, DType::BF16), (5, 3, DType::F32)] {
        let w = r + dr;
        let normal = |shape: [usize; 3]| {
            Tensor::<CublasCuda, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .cast(dtype)
        };
        let leaf = Tensor::<Train, 3>::from_inner(normal([b, s, w])).require_grad();
        let (c0, c1, c2) = (normal([b, s, r]), normal([b, s, dr]), normal([b, s, w]));
        let before = fused_counts();
        let y0 = fused::columns(leaf.clone(), 0..r);
        let y1 = fused::columns(leaf.clone(), r..w);
        let whole = fused::columns(leaf.clone(), 0..w);
        let after = fused_counts();
        // Two blocks; all the columns are `x` itself (no node, no block).
        assert_eq!(after.columns - before.columns, 2, "{dtype:?}");
        assert_eq!(after.declined, before.declined, "{dtype:?}");
        let xs = host(&leaf);
        let pick = |start: usize, width: usize| -> Vec<f64> {
            (0..b * s * width)
                .map(|i| xs[(i / width) * w + start + i % width])
                .collect()
        };
        assert_eq!(host(&y0), pick(0, r), "latent {dtype:?}");
        assert_eq!(host(&y1), pick(r, dr), "rotary key {dtype:?}");
        assert_eq!(host(&whole), xs, "all columns {dtype:?}");
        if dtype == DType::BF16 {
            let parent = strides(&leaf.clone().inner());
            assert_eq!(strides(&y0.clone().inner()), parent, "latent is a view");
            assert_eq!(strides(&y1.clone().inner()), parent, "rotary key is a view");
        }
        // `x` has a consumer of its own as well: the blocks' gradients go into its columns of
        // that gradient (in place: at least the second block accumulates).
        let loss = (y0 * Tensor::from_inner(c0.clone())).sum()
            + (y1 * Tensor::from_inner(c1.clone())).sum()
            + (leaf.clone() * Tensor::from_inner(c2.clone())).sum();
        let dx = host(&leaf.grad(&loss.backward()).expect("dx"));
        assert!(fused_counts().accumulated > after.accumulated, "{dtype:?}");
        let (h0, h1, h2) = (host(&c0), host(&c1), host(&c2));
        let want: Vec<f64> = (0..b * s * w)
            .map(|i| {
                let (row, col) = (i / w, i % w);
                let block = if col < r {
                    h0[row * r + col]
                } else {
                    h1[row * dr + col - r]
                };
                h2[i] + block
            })
            .collect();
        // Each sum of two terms rounded once to the dtype.
        let u = if dtype == DType::BF16 { U_BF16 } else { U_F32 };
        let tol: Vec<f64> = want.iter().map(|v| u * v.abs()).collect();
        assert_within(&format!("dx {dtype:?}"), &dx, &want, &tol);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn shared_suffix_matches_the_composition_forward_and_backward() {
    let device = device();
    let (b, h, t) = (2, 3, 5);
    // Vectors of 8 (MLA-Decoupled's 64 + 32, and 8 + 8) and 2 (6 + 2); a suffix of odd width
    // takes no vector and is declined to burn's `cat`.
    for (w0, w1, taken) in [(64, 32, true), (8, 8, true), (6, 2, true), (4, 1, false)] {
        // `k_nope` split from `[b, t, H·w₀]` and the suffix a slice of wider rows, as the model
        // makes them: both strided views.
        let x = Tensor::<Train, 4>::random([b, t, h, w0], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        // The suffix starts 256 entries (512 bytes) into its rows, as `k_pe` does after MLA's
        // 256-wide latent: an offset at which burn's slice is a view.
        let lead = 256;
        let rows = Tensor::<Train, 4>::random(
            [b, 1, t, lead + w1],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .require_grad();
        let xv = x.clone().swap_dims(1, 2);
        let shared = rows.clone().slice([0..b, 0..1, 0..t, lead..lead + w1]);
        let c =
            Tensor::<Train, 4>::random([b, h, t, w0 + w1], Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let keys = fused::shared_suffix(xv.clone(), shared.clone());
        let took = fused_counts().shared_suffix - before.shared_suffix;
        assert_eq!(took, u64::from(taken), "w {w0} + {w1}");
        let grads = (keys.clone() * c.clone()).sum().backward();
        let (dx, drows) = (
            x.grad(&grads).expect("dx"),
            rows.grad(&grads).expect("drows"),
        );
        // The definition, from the host values: a copy forward; backward `dx` is `c`'s first
        // `w₀` columns and `dshared` the sum of its last `w₁` over heads.
        let (xs, ss, cs) = (host(&xv), host(&shared), host(&c));
        let mut want_keys = Vec::new();
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let row = (bi * h + hi) * t + ti;
                    want_keys.extend_from_slice(&xs[row * w0..(row + 1) * w0]);
                    let srow = bi * t + ti;
                    want_keys.extend_from_slice(&ss[srow * w1..(srow + 1) * w1]);
                }
            }
        }
        let what = format!("w {w0} + {w1}");
        let exact = vec![0.0; want_keys.len()];
        assert_within(&format!("keys {what}"), &host(&keys), &want_keys, &exact);
        // dx [b, t, H, w₀]: a copy of bf16 values, exact.
        let mut want_dx = vec![0.0; b * t * h * w0];
        let mut want_dshared = vec![0.0; b * t * w1];
        let mut magnitude = vec![0.0; b * t * w1];
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let row = &cs[((bi * h + hi) * t + ti) * (w0 + w1)..][..w0 + w1];
                    let at = ((bi * t + ti) * h + hi) * w0;
                    want_dx[at..at + w0].copy_from_slice(&row[..w0]);
                    for j in 0..w1 {
                        want_dshared[(bi * t + ti) * w1 + j] += row[w0 + j];
                        magnitude[(bi * t + ti) * w1 + j] += row[w0 + j].abs();
                    }
                }
            }
        }
        assert_within(
            &format!("dx {what}"),
            &host(&dx),
            &want_dx,
            &vec![0.0; want_dx.len()],
        );
        if taken {
            assert_eq!(
                strides(&dx),
                vec![t * h * w0, h * w0, w0, 1],
                "dx strides {what}"
            );
        }
        // drows: zero outside the slice; inside, H terms added and rounded once to bf16: by the
        // kernel in f32 (γ_H = H·2⁻²⁴ relative to Σ|terms|), by burn's composition possibly in
        // bf16 (H roundings of 2⁻⁸).
        let got = host(&drows);
        let (mut got_shared, mut outside) = (Vec::new(), 0.0f64);
        for (i, v) in got.iter().enumerate() {
            let j = i % (lead + w1);
            if j >= lead {
                got_shared.push(*v);
            } else {
                outside = outside.max(v.abs());
            }
        }
        assert_eq!(outside, 0.0, "drows outside the slice {what}");
        let per_term = if taken { U_F32 } else { U_BF16 };
        let tol: Vec<f64> = (0..want_dshared.len())
            .map(|i| U_BF16 * want_dshared[i].abs() + h as f64 * per_term * magnitude[i])
            .collect();
        assert_within(&format!("dshared {what}"), &got_shared, &want_dshared, &tol);
    }
}

/// The sums `terms(x, y, z)` of a row-major `[X, Y, Z]` output, each of `n` products, and
/// their tolerances: an f32 sum rounded once to bf16, `2⁻⁸·|ref| + n·2⁻²⁴·Σ|terms|` (module
/// docs).
fn exact(
    [nx, ny, nz]: [usize; 3],
    n: usize,
    terms: impl Fn(usize, usize, usize) -> (f64, f64),
) -> (Vec<f64>, Vec<f64>) {
    let mut out = (Vec::new(), Vec::new());
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                let (sum, magnitude) = terms(x, y, z);
                out.0.push(sum);
                out.1
                    .push(U_BF16 * sum.abs() + n as f64 * U_F32 * magnitude);
            }
        }
    }
    out
}

/// `Σ_l a[l]·b[l]` and `Σ_l |a[l]·b[l]|` over `n` terms, `a` and `b` read at `a0 + l·sa` and
/// `b0 + l·sb`.
fn dot(
    a: &[f64],
    b: &[f64],
    n: usize,
    (a0, sa): (usize, usize),
    (b0, sb): (usize, usize),
) -> (f64, f64) {
    (0..n).fold((0.0, 0.0), |(sum, mag), l| {
        let term = a[a0 + l * sa] * b[b0 + l * sb];
        (sum + term, mag + term.abs())
    })
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn linear_maps_and_their_gradients_match_the_exact_products() {
    let device = device();
    let (b, s, d_in) = (2, 24, 64);
    let (n, outs) = (b * s, [48, 40]);
    // `x` (an intermediate, as the models' normalised inputs are) feeds two linear maps and
    // a term of its own: `L = Σ c₁⊙(x·W₁) + Σ c₂⊙(x·W₂) + Σ c₃⊙x`.
    let leaf = Tensor::<Train, 3>::random([b, s, d_in], Distribution::Normal(0.0, 1.0), &device)
        .require_grad();
    let x = leaf.clone() * 1.0;
    let ws = outs.map(|d| {
        Tensor::<Train, 2>::random([d_in, d], Distribution::Normal(0.0, 0.2), &device)
            .require_grad()
    });
    let cs = outs
        .map(|d| Tensor::<Train, 3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &device));
    let c3 = Tensor::<Train, 3>::random([b, s, d_in], Distribution::Normal(0.0, 1.0), &device);
    let before = fused_counts();
    let ys = [0, 1].map(|i| fused::linear(x.clone(), ws[i].clone()));
    assert_eq!(fused_counts().linear, before.linear + 2);
    let loss = (ys[0].clone() * cs[0].clone()).sum()
        + (ys[1].clone() * cs[1].clone()).sum()
        + (x.clone() * c3.clone()).sum();
    let grads = loss.backward();
    // Three consumers of `x`: at least the last of the two products accumulates into the
    // gradient registered before it (the order of the three is autodiff's).
    assert!(fused_counts().accumulated > before.accumulated);
    let xs = host(&x);
    let (w_host, c_host) = (ws.clone().map(|w| host(&w)), cs.clone().map(|c| host(&c)));
    for i in 0..2 {
        let d = outs[i];
        // y = x·W.
        let (want, tol) = exact([1, n, d], d_in, |_, r, j| {
            dot(&xs, &w_host[i], d_in, (r * d_in, 1), (j, d))
        });
        assert_within(&format!("y{i}"), &host(&ys[i]), &want, &tol);
        // dW = xᵀ·c over all n rows.
        let (want, tol) = exact([1, d_in, d], n, |_, k, j| {
            dot(&xs, &c_host[i], n, (k, d_in), (j, d))
        });
        let dw = ws[i].grad(&grads).expect("dW");
        assert_within(&format!("dW{i}"), &host(&dw), &want, &tol);
    }
    // dx = c₁·W₁ᵀ + c₂·W₂ᵀ + c₃: three parts, each product's sum in f32 (`n·2⁻²⁴·Σ|terms|`),
    // and at most three roundings to bf16 of partial sums (the two registrations and the
    // result), each within 2⁻⁸ of a value bounded by the sum of the parts' magnitudes.
    let c3_host = host(&c3);
    let (mut want, mut tol) = (Vec::new(), Vec::new());
    for r in 0..n {
        for k in 0..d_in {
            let parts = [0, 1].map(|i| {
                let d = outs[i];
                dot(&c_host[i], &w_host[i], d, (r * d, 1), (k * d, 1))
            });
            let c = c3_host[r * d_in + k];
            let magnitude = parts[0].1 + parts[1].1;
            want.push(parts[0].0 + parts[1].0 + c);
            tol.push(
                3.0 * U_BF16 * (parts[0].0.abs() + parts[1].0.abs() + c.abs())
                    + outs[0] as f64 * U_F32 * magnitude,
            );
        }
    }
    let dx = leaf.grad(&grads).expect("dx");
    assert_within("dx", &host(&dx), &want, &tol);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_scores_and_their_gradients_match_the_exact_products() {
    let device = device();
    // Rows of 16-byte multiples, as the models' (cuBLAS takes them without a copy).
    let (b, h, s, t) = (2, 3, 8, 16);
    // Whole heads of MHA (64) and MLA-Decoupled (96), contiguous as the rotary or the shared
    // suffix writes them, and queries split from `[b, s, H·w]` as MLA-PreRoPE's are.
    for (w, split) in [(64, false), (96, false), (64, true)] {
        let what = format!("w {w} split {split}");
        let leaf = if split { [b, s, h, w] } else { [b, h, s, w] };
        let qx = Tensor::<Train, 4>::random(leaf, Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let q = if split {
            qx.clone().swap_dims(1, 2)
        } else {
            qx.clone()
        };
        let k = Tensor::<Train, 4>::random([b, h, t, w], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let c = Tensor::<Train, 4>::random([b, h, s, t], Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let scores = fused::attention_scores(q.clone(), k.clone());
        assert_eq!(
            fused_counts().attention_scores,
            before.attention_scores + 1,
            "{what}"
        );
        let grads = (scores.clone() * c.clone()).sum().backward();
        let dqx = qx.grad(&grads).expect("dq");
        let dk = k.grad(&grads).expect("dk");
        let dq = if split {
            dqx.clone().swap_dims(1, 2)
        } else {
            dqx.clone()
        };
        // The keys' gradient in the queries' memory order: contiguous, or split heads.
        let want_strides = if split {
            vec![t * h * w, w, h * w, 1]
        } else {
            vec![h * t * w, t * w, w, 1]
        };
        assert_eq!(strides(&dk), want_strides, "dk strides {what}");
        // Exact products in f64 of the bf16 values (row-major `[b·H, rows, cols]` outputs).
        let (qs, ks, cs) = (host(&q), host(&k), host(&c));
        let (want, tol) = exact([b * h, s, t], w, |bh, i, j| {
            dot(&qs, &ks, w, ((bh * s + i) * w, 1), ((bh * t + j) * w, 1))
        });
        assert_within(&format!("scores {what}"), &host(&scores), &want, &tol);
        // dq = c·k.
        let (want, tol) = exact([b * h, s, w], t, |bh, i, e| {
            dot(&cs, &ks, t, ((bh * s + i) * t, 1), (bh * t * w + e, w))
        });
        assert_within(&format!("dq {what}"), &host(&dq), &want, &tol);
        // dk = cᵀ·q.
        let (want, tol) = exact([b * h, t, w], s, |bh, j, e| {
            dot(&cs, &qs, s, (bh * s * t + j, t), (bh * s * w + e, w))
        });
        assert_within(&format!("dk {what}"), &host(&dk), &want, &tol);
    }
    // Keys shared by the heads (a broadcast whose gradient autodiff sums) are declined.
    let q = Tensor::<Train, 4>::random([b, h, s, 64], Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<Train, 4>::random([b, 1, t, 64], Distribution::Normal(0.0, 1.0), &device);
    let before = fused_counts();
    let scores = fused::attention_scores(q, k);
    assert_eq!(scores.dims(), [b, h, s, t]);
    assert_eq!(fused_counts().declined, before.declined + 1);
    assert_eq!(fused_counts().attention_scores, before.attention_scores);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sum_of_squares_matches_the_exact_sum() {
    let device = device();
    for shape in [[3, 5], [1000, 37], [4096, 768]] {
        let x = Tensor::<CublasCuda, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let before = fused_counts();
        let got = host(&fused::sum_of_squares(x.clone()));
        assert_eq!(fused_counts().sum_of_squares, before.sum_of_squares + 1);
        let xs = host(&x);
        let exact: f64 = xs.iter().map(|v| v * v).sum();
        // f32 squares and sums: γ_n with n the longest chain of additions (≤ the length).
        let tol = (xs.len() + 2) as f64 * U_F32 * exact;
        assert_within(&format!("Σx² {shape:?}"), &got, &[exact], &[tol]);
    }
    // Several tensors in one reduction (a model's gradient norm): one kernel call, partials
    // of every tensor in one buffer.
    let xs: Vec<Tensor<CublasCuda, 1>> = [15, 37_000, 4096 * 768, 1]
        .into_iter()
        .map(|n| Tensor::random([n], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let before = fused_counts();
    let got = host(&fused::sum_of_squares_all(xs.clone()).expect("non-empty"));
    assert_eq!(fused_counts().sum_of_squares, before.sum_of_squares + 1);
    let values: Vec<f64> = xs.iter().flat_map(host).collect();
    let exact: f64 = values.iter().map(|v| v * v).sum();
    let tol = (values.len() + 2) as f64 * U_F32 * exact;
    assert_within("Σx² of four tensors", &got, &[exact], &[tol]);
    // More tensors than one launch takes (16): two full groups and a remainder of 5, sizes
    // from 1 to a few cubes' worth, as a model's gains, biases and matrices come.
    let xs: Vec<Tensor<CublasCuda, 1>> = (0..37)
        .map(|i| Tensor::random([1 + 997 * i], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let before = fused_counts();
    let got = host(&fused::sum_of_squares_all(xs.clone()).expect("non-empty"));
    assert_eq!(fused_counts().sum_of_squares, before.sum_of_squares + 1);
    let values: Vec<f64> = xs.iter().flat_map(host).collect();
    let exact: f64 = values.iter().map(|v| v * v).sum();
    let tol = (values.len() + 2) as f64 * U_F32 * exact;
    assert_within("Σx² of 37 tensors", &got, &[exact], &[tol]);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn embedding_gradient_adds_every_row_of_its_token() {
    use burn::nn::EmbeddingConfig;
    use burn::tensor::{Int, TensorData};
    let device = device();
    let (vocab, w) = (50, 40);
    let embed = EmbeddingConfig::new(vocab, w).init::<Train>(&device);
    // Repeated tokens (7 three times), and token ids at both ends of the vocabulary.
    let ids: Vec<i32> = vec![7, 0, 49, 7, 3, 7, 12, 0];
    let tokens = Tensor::<Train, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 4]), &device);
    let c = Tensor::<Train, 3>::random([2, 4, w], Distribution::Normal(0.0, 1.0), &device);
    let y = embed.forward(tokens);
    let grads = (y * c.clone()).sum().backward();
    let dw = host(&embed.weight.val().grad(&grads).expect("dW"));
    let cs = host(&c);
    let (mut exact, mut abs) = (vec![0.0; vocab * w], vec![0.0; vocab * w]);
    for (i, &t) in ids.iter().enumerate() {
        for j in 0..w {
            exact[t as usize * w + j] += cs[i * w + j];
            abs[t as usize * w + j] += cs[i * w + j].abs();
        }
    }
    let tol: Vec<f64> = (0..vocab * w)
        .map(|e| U_BF16 * exact[e].abs() + (ids.len() + 2) as f64 * U_F32 * abs[e])
        .collect();
    assert_within("dW", &dw, &exact, &tol);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn the_models_use_the_fused_kernels() {
    use attn_models::{AttentionVariant, LlamaConfig};
    use burn::tensor::Int;
    let device = device();
    for variant in [
        AttentionVariant::Mha,
        AttentionVariant::MlaPreRope,
        AttentionVariant::MlaDecoupled,
    ] {
        let config = LlamaConfig::tiny(variant);
        let model = config.init::<Train>(&device).expect("tiny model");
        let tokens = Tensor::<Train, 2, Int>::from_data([[1, 2, 3, 4, 5, 6, 7, 8]], &device);
        let before = fused_counts();
        let logits = model.forward(tokens);
        let after = fused_counts();
        // Per layer an RMSNorm before attention and one before the MLP (MLA adds its latent
        // norms), one final; one causal softmax per layer.
        assert!(
            after.rms_norm - before.rms_norm > 2 * config.n_layers as u64,
            "{variant:?}"
        );
        assert_eq!(
            after.causal_softmax - before.causal_softmax,
            config.n_layers as u64,
            "{variant:?}"
        );
        assert_eq!(
            after.swiglu - before.swiglu,
            config.n_layers as u64,
            "{variant:?}"
        );
        // Queries and keys of every layer (MLA-PreRoPE rotates its latents).
        assert!(
            after.rotary - before.rotary >= config.n_layers as u64,
            "{variant:?}"
        );
        assert_eq!(
            after.attention_scores - before.attention_scores,
            config.n_layers as u64,
            "{variant:?}"
        );
        // Every projection of the attention and the MLP: MHA's four and three, MLA's six
        // (its latents, queries, keys, values, output) and three.
        assert!(
            after.linear - before.linear >= 7 * config.n_layers as u64,
            "{variant:?}"
        );
        // MLA-Decoupled's latent and rotary key: two blocks of one product a layer (the other
        // variants' latents are whole products: no block).
        let blocks = match variant {
            AttentionVariant::MlaDecoupled => 2 * config.n_layers as u64,
            _ => 0,
        };
        assert_eq!(after.columns - before.columns, blocks, "{variant:?}");
        assert_eq!(after.declined, before.declined, "{variant:?}");
        assert!(host(&logits).iter().all(|v| v.is_finite()));
        // In the backward, at least SwiGLU's gate and up share an input in every layer: one
        // of their products accumulates into the other's gradient.
        let _grads = logits.sum().backward();
        assert!(
            fused_counts().accumulated - after.accumulated >= config.n_layers as u64,
            "{variant:?}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn adamw_update_matches_the_exact_update() {
    let device = device();
    // Not a multiple of the cube size, read one element at a time; and a multiple of 8, read
    // in vectors of 8.
    for n in [100_003, 98_312] {
        adamw_update_of_size(n, &device);
    }
}

fn adamw_update_of_size(n: usize, device: &Dev) {
    use attn_models::fused::{AdamWStep, Outcome};
    let normal =
        |sd: f64| Tensor::<CublasCuda, 1>::random([n], Distribution::Normal(0.0, sd), device);
    let (p, g, m) = (normal(1.0), normal(1e-2), normal(1e-3));
    let v = Tensor::<CublasCuda, 1>::random([n], Distribution::Uniform(0.0, 1e-4), device);
    // A large learning rate and decay (θ·0.75 − 0.5·update), so that both terms of θ's update
    // stand far above its bf16 rounding (2⁻⁸·|θ|) and a wrong term would show.
    let (lr, beta_1, beta_2, epsilon, weight_decay) = (0.5, 0.9f32, 0.95f32, 1e-8f32, 0.5f32);
    // The first step (no moments yet) and a later one.
    for (moments, time) in [(None, 1), (Some((m.clone(), v.clone())), 7)] {
        let (hp, hg) = (host(&p), host(&g));
        let (hm, hv) = match &moments {
            Some((m, v)) => (host(m), host(v)),
            None => (vec![0.0; n], vec![0.0; n]),
        };
        let before = fused_counts();
        let step = AdamWStep {
            param: p.clone(),
            grad: g.clone(),
            moments,
            lr,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            time,
        };
        let Outcome::Computed((p1, m1, v1)) = fused::adamw(step) else {
            panic!("the kernel declined a bf16 update");
        };
        assert_eq!(fused_counts().adamw, before.adamw + 1);
        let (b1, b2, t) = (beta_1 as f64, beta_2 as f64, time as i32);
        let keep = 1.0 - lr * weight_decay as f64;
        let (mut want, mut tol) = (
            [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
            vec![vec![0.0; n]; 3],
        );
        for i in 0..n {
            let m_new = b1 * hm[i] + (1.0 - b1) * hg[i];
            let v_new = b2 * hv[i] + (1.0 - b2) * hg[i] * hg[i];
            let update = (m_new / (1.0 - b1.powi(t)))
                / ((v_new / (1.0 - b2.powi(t))).sqrt() + epsilon as f64);
            let p_new = keep * hp[i] - lr * update;
            want[0][i] = p_new;
            want[1][i] = m_new;
            want[2][i] = v_new;
            // One bf16 rounding of each output; f32 arithmetic before it: a few ulp of the
            // terms, and for the update ≤ 32 ulp (β₂ᵗ by repeated products, 1 − β₂ᵗ,
            // the division, the square root: ≈ 16 + 8 at t = 7 with β₂ = 0.95).
            tol[0][i] = U_BF16 * p_new.abs()
                + 4.0 * U_F32 * (keep * hp[i]).abs()
                + 32.0 * U_F32 * lr * update.abs();
            tol[1][i] = U_BF16 * m_new.abs() + 4.0 * U_F32 * (b1 * hm[i].abs() + hg[i].abs());
            tol[2][i] = U_BF16 * v_new.abs() + 4.0 * U_F32 * (b2 * hv[i] + hg[i] * hg[i]);
        }
        assert_within(
            &format!("θ at t = {time}, n = {n}"),
            &host(&p1),
            &want[0],
            &tol[0],
        );
        assert_within(&format!("m at t = {time}"), &host(&m1), &want[1], &tol[1]);
        assert_within(&format!("v at t = {time}"), &host(&v1), &want[2], &tol[2]);
    }
}
