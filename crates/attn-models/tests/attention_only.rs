//! The attention-only model of seed 002 against rmt-core's theory.

use attn_models::attention_only::{AttentionInit, AttentionOnlyConfig, ValueScale};
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

type B = NdArray<f32>;

fn device() -> Device<B> {
    Default::default()
}

/// An `n×d` input with orthonormal rows (`XXᵀ = I`), as the theory assumes.
fn isometric(n: usize, d: usize, seed: u64) -> Tensor<B, 3> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let g = nalgebra::DMatrix::<f64>::from_fn(d, n, |_, _| StandardNormal.sample(&mut rng));
    let x = g.qr().q().transpose(); // n × d
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| x[(i, j)] as f32)
        .collect();
    Tensor::<B, 2>::from_data(TensorData::new(v, [n, d]), &device()).unsqueeze::<3>()
}

fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[test]
fn attention_rows_are_markov_and_gap_removed_rows_vanish() {
    let (n, d) = (24, 48);
    for attention in [
        AttentionInit::KeyQuery { xavier: false },
        AttentionInit::RandomMarkov { sigma2: 1.0 },
    ] {
        for gap_removed in [false, true] {
            let model = AttentionOnlyConfig::new(n, d, 2, attention)
                .with_gap_removed(gap_removed)
                .init::<B>(&device())
                .unwrap();
            let a = model.layers[0].attention(isometric(n, d, 1));
            let sums = to_vec(a.sum_dim(2));
            let target = if gap_removed { 0.0 } else { 1.0 };
            assert!(
                sums.iter().all(|s| (s - target).abs() < 1e-5),
                "{attention:?} gap={gap_removed}: {sums:?}"
            );
        }
    }
    // Identity attention is the identity at initialisation: one layer is X W^V.
    let model = AttentionOnlyConfig::new(n, d, 1, AttentionInit::Identity)
        .init::<B>(&device())
        .unwrap();
    let x = isometric(n, d, 2);
    let y = model.forward(x.clone());
    let expected = x.matmul(model.layers[0].value.val().unsqueeze::<3>());
    let (a, b) = (to_vec(y), to_vec(expected));
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-5));
}

/// Xavier key/query weights make the attention degenerate (Prop 1): all rows ≈ 1/n.
#[test]
fn xavier_attention_is_nearly_uniform() {
    let (n, d) = (32, 64);
    let model = AttentionOnlyConfig::new(n, d, 1, AttentionInit::KeyQuery { xavier: true })
        .init::<B>(&device())
        .unwrap();
    let a = to_vec(model.layers[0].attention(isometric(n, d, 3)));
    let worst = a
        .iter()
        .map(|v| (v * n as f32 - 1.0).abs())
        .fold(0.0f32, f32::max);
    // Logits have variance ≈ 1/d, so n·A_ij = exp(O(1/√d))/mean ≈ 1 ± 3/√d.
    assert!(worst < 4.0 / (d as f32).sqrt(), "{worst}");
}

/// Rank collapse in width (Prop 3) measured on the burn model against rmt-core's derived
/// constant: srank(X₁X₁ᵀ) − 1 ≈ σ⁴(2 + γ)/n. Four seeds at n = 96: the relative spread of
/// one draw's excess is ≈ 20 %; tolerance 35 % on the mean.
#[test]
fn one_layer_rank_collapse_matches_rmt_core() {
    let (n, d) = (96, 192);
    let sigma2 = 1.0;
    let mut excess = 0.0;
    for seed in 0..4 {
        let model = AttentionOnlyConfig::new(n, d, 1, AttentionInit::RandomMarkov { sigma2 })
            .with_value_scale(ValueScale::Unit)
            .with_seed(seed)
            .init::<B>(&device())
            .unwrap();
        let x1 = to_vec(model.forward(isometric(n, d, 10 + seed)));
        let m = nalgebra::DMatrix::<f64>::from_fn(n, d, |i, j| x1[i * d + j] as f64);
        let ev =
            rmt_core::spectra::symmetric_eigenvalues(&rmt_core::spectra::gram(&m, 1.0).unwrap())
                .unwrap();
        let sq: Vec<f64> = ev.iter().map(|l| l * l).collect();
        excess += rmt_core::spectra::stable_rank_of_spectrum(&sq).unwrap() - 1.0;
    }
    let excess = excess / 4.0;
    let predicted =
        rmt_core::markov::stable_rank_excess_width(n, n as f64 / d as f64, sigma2, 1).unwrap();
    assert!(
        (excess / predicted - 1.0).abs() < 0.35,
        "{excess} vs {predicted}"
    );
}

#[test]
fn gradients_reach_every_parameter_of_every_variant() {
    type AB = Autodiff<B>;
    let (n, d) = (8, 12);
    for attention in [
        AttentionInit::KeyQuery { xavier: false },
        AttentionInit::RandomMarkov { sigma2: 0.5 },
        AttentionInit::Identity,
    ] {
        for (skip, ln) in [(false, false), (true, true)] {
            let model = AttentionOnlyConfig::new(n, d, 2, attention)
                .with_skip(skip)
                .with_layer_norm(ln)
                .with_gap_removed(true)
                .init::<AB>(&device())
                .unwrap();
            let x = Tensor::<AB, 3>::random(
                [3, n, d],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device(),
            );
            let y = model.forward(x);
            let grads = (y.clone() * y).mean().backward();
            for layer in &model.layers {
                assert!(layer.value.grad(&grads).is_some());
                assert!(layer.output.grad(&grads).is_some());
                for p in [&layer.query, &layer.key, &layer.matrix]
                    .into_iter()
                    .flatten()
                {
                    assert!(p.grad(&grads).is_some(), "{attention:?}");
                }
                if let Some(norm) = &layer.norm {
                    assert!(norm.gamma.grad(&grads).is_some());
                }
            }
        }
    }
}

#[test]
fn invalid_configurations_are_errors() {
    assert!(
        AttentionOnlyConfig::new(0, 4, 1, AttentionInit::Identity)
            .init::<B>(&device())
            .is_err()
    );
    assert!(
        AttentionOnlyConfig::new(4, 4, 1, AttentionInit::RandomMarkov { sigma2: -1.0 })
            .init::<B>(&device())
            .is_err()
    );
}
