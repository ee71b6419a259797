use super::*;
use crate::linalg::view;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn gaussian(rows: usize, cols: usize, rng: &mut rand_pcg::Pcg64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| StandardNormal.sample(rng))
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = DiagnosticsConfig::default();
    let q = DMatrix::<f64>::zeros(8, 4);
    let k = DMatrix::<f64>::zeros(8, 5);
    assert!(matches!(
        diagnose_layer(view(&q), view(&k), 2, &cfg, None),
        Err(RmtError::ShapeMismatch { .. })
    ));
    let k = DMatrix::<f64>::zeros(8, 4);
    assert!(matches!(
        diagnose_layer(view(&q), view(&k), 3, &cfg, None),
        Err(RmtError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        diagnose_layer(view(&q), view(&k), 2, &cfg, None),
        Err(RmtError::Degenerate(_))
    ));
    let mut q = DMatrix::<f64>::from_element(8, 4, 1.0);
    q[(3, 2)] = f64::NAN;
    assert!(matches!(
        diagnose_layer(view(&q), view(&k), 2, &cfg, None),
        Err(RmtError::NonFinite { .. })
    ));
    // Q and K are scanned only when ‖M‖² is not finite: every bad entry must still surface,
    // with its input and index, even where it meets zeros (0·∞ is NaN).
    let ones = DMatrix::<f64>::from_element(8, 4, 1.0);
    let mut bad_k = ones.clone();
    bad_k[(5, 1)] = f64::INFINITY;
    assert_eq!(
        diagnose_layer(view(&ones), view(&bad_k), 2, &cfg, None).unwrap_err(),
        RmtError::NonFinite {
            what: "K",
            index: 5 + 8,
            value: f64::INFINITY
        }
    );
    let mut bad_q = DMatrix::<f64>::zeros(8, 4);
    bad_q[(2, 3)] = f64::NEG_INFINITY;
    assert!(matches!(
        diagnose_layer(view(&bad_q), view(&k), 2, &cfg, None),
        Err(RmtError::NonFinite {
            what: "Q",
            index: 26,
            ..
        })
    ));
    // Finite inputs whose product overflows: in f32 M itself holds an infinity; in f64 M is
    // finite but ‖M‖² is not.
    let big32 = DMatrix::<f32>::from_fn(6, 4, |i, j| 1e20 * (1.0 + (i + j) as f32));
    assert!(matches!(
        diagnose_layer(view(&big32), view(&big32), 2, &cfg, None),
        Err(RmtError::NonFinite {
            what: "M = QKᵀ",
            ..
        })
    ));
    let big64 = DMatrix::<f64>::from_fn(6, 4, |i, j| 1e77 * (1.0 + (i + j) as f64));
    assert!(matches!(
        diagnose_layer(view(&big64), view(&big64), 2, &cfg, None),
        Err(RmtError::Degenerate(reason)) if reason.contains("overflows")
    ));
    // Through thin factors (m ≥ 2b) M is not formed: its overflow is ‖M‖²'s.
    let tall = DMatrix::<f32>::from_fn(8, 4, |i, j| 1e20 * (1.0 + (i + j) as f32));
    assert!(matches!(
        diagnose_layer(view(&tall), view(&tall), 2, &cfg, None),
        Err(RmtError::Degenerate(reason)) if reason.contains("overflows")
    ));
    let e = DMatrix::<f64>::zeros(0, 4);
    assert!(matches!(
        diagnose_layer(view(&e), view(&e), 1, &cfg, None),
        Err(RmtError::Empty { .. })
    ));
    let bad = DiagnosticsConfig {
        estimators: vec![],
        ..Default::default()
    };
    let q = DMatrix::<f64>::from_element(8, 4, 1.0);
    assert!(diagnose_layer(view(&q), view(&q), 2, &bad, None).is_err());
}

/// The metrics are exactly DESIGN.md's formulas on the full spectrum.
#[test]
fn metrics_follow_the_definitions() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    let (m, d) = (48, 96);
    let q = gaussian(m, d, &mut rng);
    let k = gaussian(m, d, &mut rng);
    let cfg = DiagnosticsConfig {
        fast_path: false,
        ..Default::default()
    };
    let diag = diagnose_layer(view(&q), view(&k), 4, &cfg, None).unwrap();
    let mm = &q * k.transpose();
    let g = &mm * mm.transpose() / d as f64;
    let ev = crate::spectra::symmetric_eigenvalues(&g).unwrap();
    let mean = mm.iter().sum::<f64>() / (m * m) as f64;
    let sigma2 = mm.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m * m) as f64;
    let lp = sigma2 * (1.0 + (m as f64 / d as f64).sqrt()).powi(2);
    let out: Vec<f64> = ev.iter().copied().filter(|&l| l > lp).collect();
    let total: f64 = ev.iter().sum();
    let got = diag
        .layer
        .get(VarianceEstimator::Empirical, NullModel::Mp)
        .unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
    assert!(close(got.sigma2, sigma2));
    assert!(close(got.lambda_plus, lp));
    assert!(close(got.lambda_max, ev[0]));
    assert!(close(got.mp_gap, ev[0] - lp));
    assert_eq!(got.outlier_count, out.len());
    assert!(close(got.outlier_energy, out.iter().sum::<f64>() / total));
    assert!(close(got.mp_soft_rank, ev[0] / lp));
    assert!(close(got.stable_rank, total / ev[0]));
    assert!(close(got.normalized_stable_rank, total / ev[0] / m as f64));
    assert!(close(diag.layer.trace, total));
}

/// BBP transition (Baik–Ben Arous–Péché; Benaych-Georges & Nadakuditi 2012) for
/// information-plus-noise `X = Z + Σ θᵢ√d·uᵢvᵢᵀ`, `Z` i.i.d. N(0,1), `G = XXᵀ/d` at γ = 1:
/// a spike detaches iff `θ > γ^{1/4} = 1`, to `λ(θ) = (1+θ²)(γ+θ²)/θ²`. Diagnosed as
/// `M = X·I` (K = I). Outlier eigenvalues fluctuate by O(m^{−1/2}) (5 % at m = 400); the bulk
/// edge by the Tracy–Widom scale s ≈ 2^{4/3}m^{−2/3} ≈ 0.046, so one bulk eigenvalue may sit
/// just above λ₊ (P ≈ 1 − F₁(0) ≈ 0.17) but none beyond λ₊ + 3s.
#[test]
fn planted_spikes_follow_the_bbp_transition() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(2);
    let (m, d) = (400, 400);
    let thetas = [0.5, 1.5, 2.0, 3.0];
    let u = gaussian(m, 4, &mut rng).qr().q();
    let v = gaussian(d, 4, &mut rng).qr().q();
    let mut x = gaussian(m, d, &mut rng);
    for (i, t) in thetas.iter().enumerate() {
        x += u.column(i) * v.column(i).transpose() * (t * (d as f64).sqrt());
    }
    let eye = DMatrix::<f64>::identity(d, d);
    let cfg = DiagnosticsConfig {
        estimators: vec![VarianceEstimator::Trimmed],
        fast_path: false,
        ..Default::default()
    };
    let diag = diagnose_layer(view(&x), view(&eye), 1, &cfg, None).unwrap();
    let got = diag
        .layer
        .get(VarianceEstimator::Trimmed, NullModel::Mp)
        .unwrap();
    assert!((got.sigma2 - 1.0).abs() < 0.03, "σ² = {}", got.sigma2);
    assert!((3..=4).contains(&got.outlier_count), "{got:?}");
    let g = &x * x.transpose() / d as f64;
    let ev = crate::spectra::symmetric_eigenvalues(&g).unwrap();
    // Near the transition the finite-size bias grows (the scale there is m^{−1/3}): 10 % at
    // θ = 1.5, 5 % further out.
    for (i, (t, tol)) in [(3.0f64, 0.05), (2.0, 0.05), (1.5, 0.10)]
        .iter()
        .enumerate()
    {
        let predicted = (1.0 + t * t).powi(2) / (t * t);
        assert!(
            (ev[i] / predicted - 1.0).abs() < *tol,
            "spike θ={t}: λ = {} vs {predicted}",
            ev[i]
        );
    }
    let s_tw = 2f64.powf(4.0 / 3.0) * (m as f64).powf(-2.0 / 3.0);
    let beyond = ev
        .iter()
        .filter(|&&l| l > got.lambda_plus + 3.0 * s_tw)
        .count();
    assert_eq!(beyond, 3);
}

/// At initialisation (Q, K i.i.d. Gaussian, m = d = 768) G's spectrum is Fuss–Catalan with
/// edge 27/4·σ²: the paper's MP rule flags the FC mass above 4σ² as "outliers" — expected
/// 768·(1 − F_FC(4)) of them (DESIGN.md measured 47) — while the product null flags none
/// (up to the TW fluctuation of one eigenvalue). Eigenvalue counts in an interval fluctuate
/// by O(√log m) ≈ 3.
#[test]
fn paper_rule_flags_the_fuss_catalan_tail_at_initialisation() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(12);
    let (m, d) = (768, 768);
    let q = gaussian(m, d, &mut rng);
    let k = gaussian(m, d, &mut rng);
    let cfg = DiagnosticsConfig {
        nulls: vec![NullModel::Mp, NullModel::Product],
        fast_path: false,
        ..Default::default()
    };
    let diag = diagnose_layer(view(&q), view(&k), 12, &cfg, None).unwrap();
    let mp = diag
        .layer
        .get(VarianceEstimator::Empirical, NullModel::Mp)
        .unwrap();
    let product = diag
        .layer
        .get(VarianceEstimator::Empirical, NullModel::Product)
        .unwrap();
    let fc = crate::laws::ProductGaussianLaw::fuss_catalan(2, 1.0).unwrap();
    let expected = m as f64 * (1.0 - fc.cdf(4.0));
    assert!(
        (mp.outlier_count as f64 - expected).abs() < 8.0,
        "{} vs {expected}",
        mp.outlier_count
    );
    // λ₁/σ² ≈ 27/4 + c·TW₁ with c the soft-edge scale: mean −1.21c, sd 1.27c; 3 sd.
    let (edge, c) = fc.soft_edge_scaling(m);
    let ratio = mp.lambda_max / mp.sigma2;
    assert!(
        (ratio - (edge - 1.21 * c)).abs() < 3.0 * 1.27 * c,
        "λ₁/σ² = {ratio}, edge {edge}, scale {c}"
    );
    assert!(product.outlier_count <= 1, "{product:?}");
    assert!(product.tw_p_value > 0.01, "{product:?}");
}

/// The partial-spectrum path returns the full path's numbers, including with outliers close
/// to λ₊, and reports when it was used.
#[test]
fn fast_path_matches_full_spectrum() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
    let (m, d) = (256, 256);
    let mut q = gaussian(m, d, &mut rng);
    let k = gaussian(m, d, &mut rng);
    // Spikes of graded strength, from far above the edge down to just above it.
    let u = gaussian(m, 6, &mut rng).qr().q();
    for i in 0..6 {
        let w = u.column(i) * (u.column(i).transpose() * &k) * (0.08 * (i as f64 + 1.0));
        q += w;
    }
    let cfg_fast = DiagnosticsConfig {
        nulls: vec![NullModel::Mp, NullModel::Product],
        ..Default::default()
    };
    let cfg_full = DiagnosticsConfig {
        fast_path: false,
        ..cfg_fast.clone()
    };
    let fast = diagnose_layer(view(&q), view(&k), 4, &cfg_fast, None).unwrap();
    let full = diagnose_layer(view(&q), view(&k), 4, &cfg_full, None).unwrap();
    assert!(!full.layer.partial_spectrum);
    for (a, b) in fast.layer.diagnoses.iter().zip(&full.layer.diagnoses) {
        let (x, y) = (a.metrics.named_values(), b.metrics.named_values());
        for ((name, vx), (_, vy)) in x.iter().zip(&y) {
            assert!(
                (vx - vy).abs() <= 1e-8 * vy.abs().max(1e-9),
                "{name}: fast {vx} vs full {vy}"
            );
        }
    }
}

#[test]
fn per_head_diagnostics_use_each_heads_block() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(4);
    let (heads, dk, d) = (4, 16, 64);
    let mut q = gaussian(heads * dk, d, &mut rng);
    let k = gaussian(heads * dk, d, &mut rng);
    // Plant a spike in head 2 only.
    let rows = 2 * dk..3 * dk;
    let kh = k.rows(rows.start, dk).clone_owned();
    let u = gaussian(dk, 1, &mut rng);
    let spike = &u * (u.transpose() * &kh) * 2.0;
    let mut block = q.rows_mut(rows.start, dk);
    block += spike;
    let cfg = DiagnosticsConfig {
        per_head: true,
        ..Default::default()
    };
    let diag = diagnose_layer(view(&q), view(&k), heads, &cfg, None).unwrap();
    assert_eq!(diag.per_head.len(), heads);
    let gaps: Vec<f64> = diag
        .per_head
        .iter()
        .map(|h| {
            h.get(VarianceEstimator::Empirical, NullModel::Mp)
                .unwrap()
                .mp_soft_rank
        })
        .collect();
    let best = gaps
        .iter()
        .cloned()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0;
    assert_eq!(best, 2, "{gaps:?}");
    for (h, hd) in diag.per_head.iter().enumerate() {
        assert_eq!(hd.head, Some(h));
        assert_eq!(hd.rows, dk);
    }
}

#[test]
fn estimators_recover_the_bulk_variance_despite_spikes() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(5);
    let (m, d) = (300, 300);
    let x = gaussian(m, d, &mut rng) * 1.5; // entry variance 2.25
    let u = gaussian(m, 4, &mut rng).qr().q();
    let mut spiked = x.clone();
    for i in 0..4 {
        spiked += u.column(i) * u.column(i).transpose() * (30.0 * (i + 1) as f64);
    }
    // G = XXᵀ/d is MP(1, 2.25) plus spikes: diagnose it as M = X·I.
    let eye = DMatrix::<f64>::identity(d, d);
    let cfg = DiagnosticsConfig {
        estimators: VarianceEstimator::ALL.to_vec(),
        fast_path: false,
        ..Default::default()
    };
    let diag = diagnose_layer(view(&spiked), view(&eye), 1, &cfg, None).unwrap();
    for est in [
        VarianceEstimator::Median,
        VarianceEstimator::Trimmed,
        VarianceEstimator::CdfFit,
    ] {
        let s2 = diag.layer.get(est, NullModel::Mp).unwrap().sigma2;
        // Finite-n fluctuation of a bulk statistic at m = 300 is O(1/m); 3 % is generous.
        assert!((s2 / 2.25 - 1.0).abs() < 0.03, "{est:?}: σ² = {s2}");
        assert_eq!(
            diag.layer.get(est, NullModel::Mp).unwrap().outlier_count,
            4,
            "{est:?}"
        );
    }
    // The paper's empirical estimator is inflated by the spikes.
    let emp = diag
        .layer
        .get(VarianceEstimator::Empirical, NullModel::Mp)
        .unwrap()
        .sigma2;
    assert!(emp > 2.25 * 1.1, "{emp}");
}

#[test]
fn f32_and_f64_inputs_agree() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(6);
    let q = gaussian(64, 64, &mut rng);
    let k = gaussian(64, 64, &mut rng);
    let q32 = q.map(|x| x as f32);
    let k32 = k.map(|x| x as f32);
    let cfg = DiagnosticsConfig::default();
    let a = diagnose_layer(view(&q), view(&k), 2, &cfg, None).unwrap();
    let b = diagnose_layer(view(&q32), view(&k32), 2, &cfg, None).unwrap();
    let (x, y) = (a.layer.diagnoses[0].metrics, b.layer.diagnoses[0].metrics);
    assert!((x.lambda_max / y.lambda_max - 1.0).abs() < 1e-5);
    assert!((x.sigma2 / y.sigma2 - 1.0).abs() < 1e-5);
}

#[test]
fn results_round_trip_through_json() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
    let q = gaussian(32, 32, &mut rng);
    let k = gaussian(32, 32, &mut rng);
    let diag = diagnose_layer(
        view(&q),
        view(&k),
        2,
        &DiagnosticsConfig::everything(),
        None,
    )
    .unwrap();
    let json = serde_json::to_string(&diag).unwrap();
    let back: LayerDiagnostics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, diag);
}

/// Layers diagnosed in parallel (each on one worker: the one-stage reduction on one core)
/// give exactly what one layer at a time gives (the reduction's pass split between two
/// cores, parallel products), in order.
#[test]
fn layers_in_parallel_match_one_at_a_time() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(77);
    let (m, d) = (1032, 1032);
    let layers: Vec<(DMatrix<f32>, DMatrix<f32>)> = (0..3)
        .map(|_| {
            let q = gaussian(m, d, &mut rng).map(|x| x as f32);
            let k = gaussian(m, d, &mut rng).map(|x| x as f32);
            (q, k)
        })
        .collect();
    let views: Vec<_> = layers.iter().map(|(q, k)| (view(q), view(k))).collect();
    let cfg = DiagnosticsConfig::default();
    let all = diagnose_layers(&views, 4, &cfg, None);
    assert_eq!(all.len(), 3);
    for ((q, k), got) in views.iter().zip(&all) {
        let one = diagnose_layer(*q, *k, 4, &cfg, None).unwrap();
        assert!(one.layer.partial_spectrum);
        assert_eq!(got.as_ref().unwrap(), &one);
    }
    // A bad layer is its own error; the others are still diagnosed.
    let bad = DMatrix::<f32>::zeros(m, d);
    let mixed = [views[0], (view(&bad), view(&bad)), views[2]];
    let out = diagnose_layers(&mixed, 4, &cfg, None);
    assert!(out[0].is_ok() && out[2].is_ok());
    assert!(matches!(out[1], Err(RmtError::Degenerate(_))));
}

/// Spiked `Q` (`m × b`) and Gaussian `K`: outliers from far above the MP edge down to near it.
fn spiked_pair(m: usize, b: usize, seed: u64) -> (DMatrix<f64>, DMatrix<f64>) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut q = gaussian(m, b, &mut rng);
    let k = gaussian(m, b, &mut rng);
    let u = gaussian(m, 4, &mut rng).qr().q();
    for i in 0..4 {
        q += u.column(i) * (u.column(i).transpose() * &k) * (0.3 * (i as f64 + 1.0));
    }
    (q, k)
}

/// With three times more rows than columns, a block goes through thin QR factors (no
/// `m × m` matrix): it gives the metrics of `G = MMᵀ/d` formed explicitly, for every
/// estimator and null (the full spectrum, its `m − b` zeros included) and on the fast path.
/// The tolerance is a few hundred ulps of f64: both sides are backward-stable computations of
/// the same eigenvalues.
#[test]
fn thin_factors_match_the_explicit_gram() {
    let (m, b) = (144, 48);
    let (q, k) = spiked_pair(m, b, 11);
    let mm = &q * k.transpose();
    let g = &mm * mm.transpose() / b as f64;
    let moments = EntryMoments::from_sums(mm.sum(), mm.norm_squared(), m * m);
    let all = DiagnosticsConfig {
        estimators: VarianceEstimator::ALL.to_vec(),
        nulls: vec![NullModel::Mp, NullModel::Product],
        ..Default::default()
    };
    for config in [all, DiagnosticsConfig::default()] {
        let thin = diagnose_layer(view(&q), view(&k), 1, &config, None).unwrap();
        let explicit = diagnose_gram(view(&g), moments, b, None, &config, None).unwrap();
        assert_eq!(thin.layer.partial_spectrum, explicit.partial_spectrum);
        assert!(
            thin.layer
                .get(VarianceEstimator::Empirical, NullModel::Mp)
                .unwrap()
                .outlier_count
                >= 2
        );
        assert_same_diagnoses(&thin.layer, &explicit, 1e-10);
    }
}

/// `Q, K` given in a basis of the key space (`K = CB`, `Q̃ = QBᵀ`, `K̃ = C`) give the
/// diagnostics of the `d`-wide `Q, K`, whole layer and per head, with `d` kept as the width.
#[test]
fn a_basis_of_the_key_space_gives_the_same_diagnostics() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(12);
    let (m, d, b, heads) = (96, 64, 24, 4);
    let c = gaussian(m, b, &mut rng);
    let basis = gaussian(b, d, &mut rng);
    let k = &c * &basis;
    let mut q = gaussian(m, d, &mut rng);
    let u = gaussian(m, 2, &mut rng).qr().q();
    for i in 0..2 {
        q += u.column(i) * (u.column(i).transpose() * &k) * (0.02 * (i as f64 + 1.0));
    }
    let q_in_basis = &q * basis.transpose();
    // The paper's estimator on the full spectrum and on the fast path. (The spectrum-based
    // estimators are left out: with rank(M) ≤ b < d, half the spectrum beyond the null's
    // atom is zero; the basis gives exact zeros and reports the median undefined, where the
    // d-wide product leaves rounding errors of ≈ 1e-15·λ₁ to take medians of.)
    for fast_path in [false, true] {
        let config = DiagnosticsConfig {
            nulls: vec![NullModel::Mp, NullModel::Product],
            per_head: true,
            fast_path,
            ..Default::default()
        };
        let full = diagnose_layer(view(&q), view(&k), heads, &config, None).unwrap();
        let reduced =
            diagnose_layer_in_basis(view(&q_in_basis), view(&c), d, heads, &config, None).unwrap();
        assert_eq!(reduced.layer.width, d);
        assert_same_diagnoses(&reduced.layer, &full.layer, 1e-9);
        for (a, b) in reduced.per_head.iter().zip(&full.per_head) {
            assert_same_diagnoses(a, b, 1e-9);
        }
    }
    let median = DiagnosticsConfig {
        estimators: vec![VarianceEstimator::Median],
        ..Default::default()
    };
    let reduced =
        diagnose_layer_in_basis(view(&q_in_basis), view(&c), d, heads, &median, None).unwrap();
    assert_eq!(reduced.layer.undefined.len(), 1);
    let config = DiagnosticsConfig::default();
    assert!(matches!(
        diagnose_layer_in_basis(view(&q_in_basis), view(&c), 0, heads, &config, None),
        Err(RmtError::InvalidParameter { .. })
    ));
}
