//! `report.md` and `report.html` of a run: what ran, at what scale, the losses, the paper's
//! claims beside the measurements, and the figures.

use super::analysis::VariantMetrics;
use super::{DataSource, RunConfig, RunData, claims};
use crate::ExperimentError;
use crate::report::{Report, Verdict, fmt_num};
use std::path::Path;

fn first_last(series: &[(f64, f64)]) -> (String, String) {
    let f = series.first().map_or("—".into(), |p| fmt_num(p.1));
    let l = series.last().map_or("—".into(), |p| fmt_num(p.1));
    (f, l)
}

/// Writes `dir/report.md` and `dir/report.html` (figures are expected in `dir/figures`).
///
/// # Errors
/// File system errors.
pub fn write_report(
    runs: &[VariantMetrics],
    config: &RunConfig,
    data: &RunData,
    backend: &str,
    dir: &Path,
) -> Result<(), ExperimentError> {
    let a = &config.model.attention;
    let t = &config.train;
    let tokens_seen = t.steps as usize * t.batch * t.accumulation * config.model.context;
    let source = match &config.data {
        DataSource::Embedded => "the embedded corpus (this project's own documentation and sources, written as one C4-format shard)".to_string(),
        DataSource::Path(p) => format!("`{}`", p.display()),
    };
    let mut report = Report::new(format!(
        "MLA spectra (seed 000) — `{}` preset, {} steps",
        config.preset, t.steps
    ))
    .paragraph(format!(
        "Pre-training of {} under identical conditions (same data order, seed {}), with the probe \
         logging the Marchenko–Pastur diagnostics of `QKᵀ` per layer and head. Everything below \
         was computed from this run's `metrics.jsonl` files.",
        config
            .variants
            .iter()
            .map(|v| format!("`{}`", v.name()))
            .collect::<Vec<_>>()
            .join(", "),
        t.seed
    ))
    .section("Scale")
    .table(
        vec!["".into(), "this run".into(), "the paper".into()],
        vec![
            vec![
                "model".into(),
                format!(
                    "d {}, {} layers × {} heads of {}, SwiGLU {}, vocabulary {}, context {}",
                    a.d_model,
                    config.model.n_layers,
                    a.n_heads,
                    a.head_dim,
                    config.model.ffn_hidden,
                    config.model.vocab_size,
                    config.model.context
                ),
                "LLaMA-130M: d 768, 12 × 12 heads of 64, SwiGLU 2048, T5 vocabulary, context 256".into(),
            ],
            vec![
                "training".into(),
                format!(
                    "{} steps × {} sequences = {:.2} M tokens; AdamW lr {}, warm-up {}, cosine to {}×",
                    t.steps,
                    t.batch * t.accumulation,
                    tokens_seen as f64 / 1e6,
                    t.lr,
                    t.warmup,
                    t.min_lr_ratio
                ),
                "20 000 steps × 512 sequences ≈ 2.2 B tokens; AdamW lr 1e-3, warm-up 10 %, cosine".into(),
            ],
            vec![
                "data".into(),
                format!(
                    "{source}: {} training documents, {:.2} M training tokens, {} validation windows",
                    data.train_documents,
                    data.train.total_tokens as f64 / 1e6,
                    data.validation.len()
                ),
                "C4 (`allenai/c4`, `en`)".into(),
            ],
            vec!["backend".into(), backend.into(), "PyTorch, bf16".into()],
        ],
    );
    report = report.section("Loss").table(
        vec![
            "variant".into(),
            "validation loss, first → last".into(),
            "training loss, first → last".into(),
        ],
        runs.iter()
            .map(|r| {
                let (v0, v1) = first_last(&r.scalar("validation", "loss"));
                let (t0, t1) = first_last(&r.scalar("train", "loss"));
                vec![
                    r.variant.name().into(),
                    format!("{v0} → {v1}"),
                    format!("{t0} → {t1}"),
                ]
            })
            .collect(),
    );
    report = report.figure(
        "figures/loss",
        "Training (solid) and validation (dashed) loss.",
    );

    let m = a.n_heads * a.qk_head_dim();
    let checks = claims::check(runs, m, config.model.n_layers);
    let confirmed = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Agrees)
        .count();
    let refuted = checks
        .iter()
        .filter(|c| c.verdict == Verdict::DoesNotAgree)
        .count();
    report = report
        .section("The paper's claims beside this run")
        .paragraph(format!(
            "Means over layers at the last probed step, paper estimator (empirical σ², MP null) \
             unless stated. The paper's values are read off its figures, hence ±30 %. \
             {confirmed} of {} claims are confirmed by this run and {refuted} are not. A claim \
             that does not agree here is not refuted by it: this run is {} than the paper's \
             ({:.2} M vs 2.2 B tokens, {} vs 12 layers, m = {m} vs 768); it is reported as \
             measured.",
            checks.len(),
            if tokens_seen < 100_000_000 {
                "far smaller"
            } else {
                "smaller"
            },
            tokens_seen as f64 / 1e6,
            config.model.n_layers
        ))
        .claims(checks);

    report = report
        .section("Figures")
        .figure("figures/mp_gap", "MP-Gap λ₁ − λ₊, mean ± std over layers (paper Fig. 1a). Solid: the paper's MP null; dashed: the product null.")
        .figure("figures/outlier_count", "Outlier count #{λᵢ > λ₊} (Fig. 1b).")
        .figure("figures/outlier_energy", "Outlier energy (Fig. 1c).")
        .figure("figures/mp_soft_rank", "MP soft rank λ₁/λ₊ (Fig. 2, left).")
        .figure("figures/stable_rank", "Stable rank Σλᵢ/λ₁ (Fig. 2, right).");
    for r in runs {
        let v = r.variant.name();
        report = report
            .figure(
                format!("figures/heatmap_mp_gap_{v}"),
                format!("{v}: MP-Gap, layer × step (Fig. 3, top)."),
            )
            .figure(
                format!("figures/heatmap_stable_rank_{v}"),
                format!("{v}: stable rank, layer × step (Fig. 3, bottom)."),
            );
    }
    report = report.figure(
        "figures/violin_outlier_energy",
        "Outlier energy across layers at the last step (Fig. 4).",
    );
    for r in runs {
        let v = r.variant.name();
        report = report.figure(
            format!("figures/heatmap_entropy_{v}"),
            format!("{v}: attention entropy in bits, mean over heads, on the probe batch (Appendix B, Fig. 5)."),
        );
    }
    report = report.figure(
        "figures/attn_gap",
        "Activation space: the softmax attention matrix's gap σ₁(A) − σ₂(A) (seed 002's quantity, here during training).",
    );
    report = report.section("Files").paragraph(
        "`config.json` (the resolved configuration), `tokenizer.json`, and per variant \
         `metrics.csv` / `metrics.jsonl` (columns run, variant, step, layer, head, space, \
         estimator, metric, value), `checkpoints/` and `model/` (HF/DeepSeek safetensors: \
         `cargo xtask diagnose VARIANT/model/model.safetensors`).",
    );
    report.write(dir)?;
    Ok(())
}
