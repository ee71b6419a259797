//! The paper's figures, drawn from the run's own metrics.
//!
//! | file stem | what |
//! |---|---|
//! | `loss` | training and validation loss vs step, per variant |
//! | `mp_gap`, `outlier_count`, `outlier_energy` | mean ± std over layers vs step (paper Fig. 1); solid: the paper's MP null, dashed: the product null |
//! | `mp_soft_rank`, `stable_rank` | the same for the soft rank and the stable rank (Fig. 2) |
//! | `heatmap_mp_gap_V`, `heatmap_stable_rank_V` | layer × step per variant `V` (Fig. 3) |
//! | `violin_outlier_energy` | outlier energy across layers at the last step (Fig. 4) |
//! | `heatmap_entropy_V` | attention entropy (bits, mean over heads) layer × step (Appendix B) |
//! | `attn_gap` | activation-space softmax gap `σ₁(A) − σ₂(A)`, mean ± std over layers |

use super::analysis::{PAPER, PRODUCT, VariantMetrics};
use crate::ExperimentError;
use crate::plot::{Heatmap, LineChart, Series, ViolinPlot};
use std::path::Path;

/// Whole-layer weight-space metrics drawn against step, with their axis labels.
pub const WEIGHT_METRICS: [(&str, &str); 5] = [
    ("mp_gap", "MP-Gap λ₁ − λ₊"),
    ("outlier_count", "outliers #{λᵢ > λ₊}"),
    ("outlier_energy", "outlier energy"),
    ("mp_soft_rank", "MP soft rank λ₁/λ₊"),
    ("stable_rank", "stable rank Σλᵢ/λ₁"),
];

fn series_of(
    v: &VariantMetrics,
    slot: usize,
    space: &str,
    estimator: &str,
    metric: &str,
    per_head: bool,
    label: &str,
) -> Option<Series> {
    let b = v.band(space, estimator, metric, per_head);
    (!b.steps.is_empty()).then(|| {
        Series::new(format!("{} {label}", v.variant.name()), b.steps, b.mean)
            .with_std(&b.std)
            .color(slot)
    })
}

/// Writes every figure into `dir`.
///
/// # Errors
/// A run without metrics, or drawing and I/O failures.
pub fn write_all(runs: &[VariantMetrics], dir: &Path) -> Result<(), ExperimentError> {
    let mut loss = LineChart::new("Loss")
        .x_label("step")
        .y_label("cross-entropy (nats)");
    for (i, v) in runs.iter().enumerate() {
        let (x, y): (Vec<f64>, Vec<f64>) = v.scalar("train", "loss").into_iter().unzip();
        loss.push(Series::new(format!("{} train", v.variant.name()), x, y).color(i));
        let (x, y): (Vec<f64>, Vec<f64>) = v.scalar("validation", "loss").into_iter().unzip();
        loss.push(
            Series::new(format!("{} validation", v.variant.name()), x, y)
                .dashed()
                .markers()
                .color(i),
        );
    }
    loss.write(dir, "loss")?;

    for (metric, label) in WEIGHT_METRICS {
        let mut chart = LineChart::new(format!("{label}: mean ± std over layers"))
            .x_label("step")
            .y_label(label);
        for (i, v) in runs.iter().enumerate() {
            if let Some(s) = series_of(v, i, "weight", PAPER, metric, false, "(MP null)") {
                chart.push(s);
            }
            if let Some(s) = series_of(v, i, "weight", PRODUCT, metric, false, "(product null)") {
                chart.push(s.dashed());
            }
        }
        chart.write(dir, metric)?;
    }

    let mut gap = LineChart::new("Softmax attention gap σ₁(A) − σ₂(A) on the probe batch")
        .x_label("step")
        .y_label("σ₁ − σ₂ (mean over heads; ± std over layers)");
    for (i, v) in runs.iter().enumerate() {
        if let Some(s) = series_of(v, i, "activation", "-", "attn_gap", true, "") {
            gap.push(s);
        }
    }
    gap.write(dir, "attn_gap")?;

    for v in runs {
        let name = v.variant.name();
        for (metric, space, estimator, per_head, label) in [
            ("mp_gap", "weight", PAPER, false, "MP-Gap"),
            ("stable_rank", "weight", PAPER, false, "stable rank"),
            (
                "attn_entropy_bits",
                "activation",
                "-",
                true,
                "attention entropy (bits)",
            ),
        ] {
            let t = v.table(space, estimator, metric, per_head);
            if t.steps.is_empty() {
                continue;
            }
            let stem = match metric {
                "attn_entropy_bits" => format!("heatmap_entropy_{name}"),
                m => format!("heatmap_{m}_{name}"),
            };
            Heatmap::new(format!("{name}: {label}, layer × step"), t.values.clone())
                .axes("step", "layer")
                .labels(
                    (0..t.values.len()).map(|l| l.to_string()).collect(),
                    t.steps.iter().map(|s| s.to_string()).collect(),
                )
                .colorbar_label(label)
                .write(dir, &stem)?;
        }
    }

    let mut violin = ViolinPlot::new("Outlier energy across layers at the last step (MP null)")
        .axes("variant", "outlier energy");
    for v in runs {
        if let Some(step) = v.last_probed_step() {
            violin = violin.group(v.variant.name(), v.layers_at(step, PAPER, "outlier_energy"));
        }
    }
    violin.write(dir, "violin_outlier_energy")?;
    Ok(())
}
