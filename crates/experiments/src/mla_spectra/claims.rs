//! The paper's numeric claims beside the run's measurements.
//!
//! Every number is the mean over layers at the last probed step, with the paper's estimator
//! (empirical σ², MP null), unless a claim says otherwise. The paper's values are read off
//! its figures ("≈ 2", "60 to 65"), so a claim of a value is checked at ±30 % (the reading
//! precision of a curve on a plot); claims of an order ("A above B") are checked strictly.
//! The paper's scale is LLaMA-130M (`m = 768` rows of `QKᵀ` per layer) after 20 000 steps;
//! counts are compared as a fraction of `m`, so that a smaller run is judged at its own size.

use super::analysis::{PAPER, PRODUCT, VariantMetrics, final_mean};
use crate::report::{Claim, Verdict};
use attn_models::AttentionVariant;

/// One claim and its check, before it becomes a report row.
#[derive(Debug, Clone, PartialEq)]
struct ClaimCheck {
    /// What the paper says.
    claim: String,
    /// The paper's value.
    paper: String,
    /// What this run measured.
    measured: String,
    /// How agreement is judged.
    tolerance: String,
    /// `Some(true)`: confirmed; `Some(false)`: not confirmed; `None`: not measurable here.
    agrees: Option<bool>,
}

fn find(runs: &[VariantMetrics], v: AttentionVariant) -> Option<&VariantMetrics> {
    runs.iter().find(|r| r.variant == v)
}

fn within(measured: f64, target: f64, rel: f64) -> bool {
    (measured - target).abs() <= rel * target.abs()
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| format!("{v:.3}"))
}

/// Checks every claim that the run's variants allow; `m` is the number of rows of `QKᵀ`
/// (`heads · d_k`) and `layers` the depth.
pub fn check(runs: &[VariantMetrics], m: usize, layers: usize) -> Vec<Claim> {
    use AttentionVariant::{Mha, MlaDecoupled as Dec, MlaPreRope as Pre};
    let mean = |v: AttentionVariant, metric: &str| {
        find(runs, v).and_then(|r| final_mean(r, PAPER, metric))
    };
    let mut out = Vec::new();
    let value =
        |claim: &str, paper: &str, target: f64, v: AttentionVariant, metric: &str, scale: f64| {
            let x = mean(v, metric).map(|x| x / scale);
            ClaimCheck {
                claim: format!("{claim} ({})", v.name()),
                paper: paper.into(),
                measured: fmt(x),
                tolerance: "±30 % of the paper's value".into(),
                agrees: x.map(|x| within(x, target, 0.3)),
            }
        };
    // Fig. 1(a): MP-Gap.
    out.push(value(
        "MP-Gap plateaus near 2",
        "≈ 2",
        2.0,
        Mha,
        "mp_gap",
        1.0,
    ));
    let gaps = (
        mean(Mha, "mp_gap"),
        mean(Pre, "mp_gap"),
        mean(Dec, "mp_gap"),
    );
    out.push(ClaimCheck {
        claim: "MP-Gap: MHA > PreRoPE > Decoupled".into(),
        paper: "≈ 2 > ≈ 0.4 > ≈ 0".into(),
        measured: format!("{} / {} / {}", fmt(gaps.0), fmt(gaps.1), fmt(gaps.2)),
        tolerance: "strict order".into(),
        agrees: match gaps {
            (Some(a), Some(b), Some(c)) => Some(a > b && b > c),
            _ => None,
        },
    });
    out.push(ClaimCheck {
        claim: "MP-Gap of Decoupled stays near zero (|Δ| < 10 % of MHA's)".into(),
        paper: "≈ 0".into(),
        measured: fmt(gaps.2),
        tolerance: "|Δ_dec| < 0.1·Δ_mha".into(),
        agrees: match (gaps.0, gaps.2) {
            (Some(a), Some(c)) => Some(c.abs() < 0.1 * a.abs()),
            _ => None,
        },
    });
    // Fig. 1(b): outlier counts, as a fraction of m (paper: 60–65 of 768).
    let paper_fraction = 62.5 / 768.0;
    for v in [Mha, Pre] {
        let mut c = value(
            "outliers per layer, as a fraction of m",
            "60–65 of 768 = 0.081",
            paper_fraction,
            v,
            "outlier_count",
            m as f64,
        );
        c.tolerance = "±30 % (0.057–0.106)".into();
        out.push(c);
    }
    let dec_count = mean(Dec, "outlier_count");
    out.push(ClaimCheck {
        claim: "Decoupled has no outliers".into(),
        paper: "0".into(),
        measured: fmt(dec_count),
        tolerance: "mean < 1 per layer".into(),
        agrees: dec_count.map(|c| c < 1.0),
    });
    // Fig. 1(c) and Fig. 4: outlier energy.
    for v in [Mha, Pre] {
        out.push(value(
            "outlier energy near 0.7",
            "≈ 0.70",
            0.7,
            v,
            "outlier_energy",
            1.0,
        ));
    }
    let e = mean(Dec, "outlier_energy");
    out.push(ClaimCheck {
        claim: "outlier energy of Decoupled below 0.3".into(),
        paper: "< 0.30".into(),
        measured: fmt(e),
        tolerance: "< 0.3".into(),
        agrees: e.map(|e| e < 0.3),
    });
    // Fig. 2: soft rank 2 / 1.5 / 1.1.
    for (v, target, paper) in [(Mha, 2.0, "≈ 2"), (Pre, 1.5, "≈ 1.5"), (Dec, 1.1, "≈ 1.1")] {
        out.push(value(
            "MP soft rank λ₁/λ₊",
            paper,
            target,
            v,
            "mp_soft_rank",
            1.0,
        ));
    }
    // Fig. 2: stable rank.
    let sr = (
        mean(Mha, "stable_rank"),
        mean(Pre, "stable_rank"),
        mean(Dec, "stable_rank"),
    );
    out.push(ClaimCheck {
        claim: "stable rank of Decoupled ≈ 3× MHA's and PreRoPE's".into(),
        paper: "≈ 30 vs < 10".into(),
        measured: format!("{} vs {} / {}", fmt(sr.2), fmt(sr.0), fmt(sr.1)),
        tolerance: "Decoupled ≥ 2× both".into(),
        agrees: match sr {
            (Some(a), Some(b), Some(c)) => Some(c >= 2.0 * a && c >= 2.0 * b),
            _ => None,
        },
    });
    // Fig. 3: the mid-layer band of MHA.
    if let Some(r) = find(runs, Mha) {
        let t = r.table("weight", PAPER, "mp_gap", false);
        let half = t.steps.len() / 2;
        let per_layer: Vec<f64> = t
            .values
            .iter()
            .map(|row| {
                let v: Vec<f64> = row[half..]
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            })
            .collect();
        let argmax = per_layer
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(l, _)| l);
        // Layers 6–8 of 12 are the middle half-to-two-thirds of the depth.
        let lo = (layers as f64 * 6.0 / 12.0).floor() as usize;
        let hi = (layers as f64 * 8.0 / 12.0).ceil() as usize;
        out.push(ClaimCheck {
            claim: "MHA's MP-Gap peaks in a mid-layer band (second half of training)".into(),
            paper: "layers 6–8 of 12".into(),
            measured: argmax.map_or("—".into(), |l| format!("layer {l} of {layers}")),
            tolerance: format!("layers {lo}–{hi} (same relative depth)"),
            agrees: argmax.map(|l| (lo..=hi).contains(&l)),
        });
    }
    // The product null: the paper's rule at initialisation.
    for r in runs {
        let init = r.layers_at(0, PAPER, "outlier_count");
        let init_product = r.layers_at(0, PRODUCT, "outlier_count");
        if init.is_empty() {
            continue;
        }
        let a = init.iter().sum::<f64>() / init.len() as f64;
        let b = init_product.iter().sum::<f64>() / init_product.len().max(1) as f64;
        out.push(ClaimCheck {
            claim: format!(
                "(this project) outliers at initialisation, MP null vs product null ({})",
                r.variant.name()
            ),
            paper: "the MP rule assumes 0 at initialisation".into(),
            measured: format!("{a:.1} vs {b:.1}"),
            tolerance: "product null: < 1 per layer".into(),
            agrees: (!init_product.is_empty()).then_some(b < 1.0),
        });
    }
    out.into_iter()
        .map(|c| {
            let verdict = c.agrees.map_or(Verdict::NotApplicable, Verdict::from_bool);
            Claim::new(c.claim, c.paper, c.measured, c.tolerance, verdict)
        })
        .collect()
}
