//! The run's metrics, read back and arranged for figures and the report.

use super::RunConfig;
use crate::ExperimentError;
use attn_models::AttentionVariant;
use probe::MetricRow;
use std::collections::BTreeMap;
use std::path::Path;

/// The estimator column of the paper's metrics: empirical σ², MP null.
pub const PAPER: &str = "empirical/mp";
/// The estimator column of the product null beside it.
pub const PRODUCT: &str = "empirical/product";

/// The metric rows of one variant.
#[derive(Debug, Clone)]
pub struct VariantMetrics {
    /// The variant.
    pub variant: AttentionVariant,
    /// Every row of its `metrics.jsonl`.
    pub rows: Vec<MetricRow>,
}

/// Mean and standard deviation over layers at each step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Band {
    /// Steps.
    pub steps: Vec<f64>,
    /// Mean over layers.
    pub mean: Vec<f64>,
    /// Population standard deviation over layers.
    pub std: Vec<f64>,
}

/// A layer × step table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerTable {
    /// Column steps.
    pub steps: Vec<u64>,
    /// `values[layer][column]` (NaN where missing).
    pub values: Vec<Vec<f64>>,
}

impl VariantMetrics {
    /// `step → layer → value` of the whole-layer (`head = all`) rows of a metric, or, with
    /// `mean_over_heads`, the mean of the per-head rows (activation space is per head).
    pub fn by_step_layer(
        &self,
        space: &str,
        estimator: &str,
        metric: &str,
        mean_over_heads: bool,
    ) -> BTreeMap<u64, BTreeMap<u32, f64>> {
        let mut acc: BTreeMap<u64, BTreeMap<u32, (f64, usize)>> = BTreeMap::new();
        for r in &self.rows {
            if r.space != space || r.estimator != estimator || r.metric != metric {
                continue;
            }
            if (r.head == "all") == mean_over_heads {
                continue;
            }
            let e = acc
                .entry(r.step)
                .or_default()
                .entry(r.layer)
                .or_insert((0.0, 0));
            e.0 += r.value;
            e.1 += 1;
        }
        acc.into_iter()
            .map(|(s, layers)| {
                (
                    s,
                    layers
                        .into_iter()
                        .map(|(l, (sum, n))| (l, sum / n as f64))
                        .collect(),
                )
            })
            .collect()
    }

    /// Mean ± std over layers against step.
    pub fn band(&self, space: &str, estimator: &str, metric: &str, per_head: bool) -> Band {
        let mut b = Band::default();
        for (step, layers) in self.by_step_layer(space, estimator, metric, per_head) {
            let v: Vec<f64> = layers.values().copied().filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                continue;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            b.steps.push(step as f64);
            b.mean.push(mean);
            b.std.push(var.sqrt());
        }
        b
    }

    /// Layer × step table of a metric.
    pub fn table(&self, space: &str, estimator: &str, metric: &str, per_head: bool) -> LayerTable {
        let m = self.by_step_layer(space, estimator, metric, per_head);
        let n_layers = m
            .values()
            .flat_map(|l| l.keys())
            .max()
            .map_or(0, |&l| l as usize + 1);
        let steps: Vec<u64> = m.keys().copied().collect();
        let mut values = vec![vec![f64::NAN; steps.len()]; n_layers];
        for (j, layers) in m.values().enumerate() {
            for (&l, &v) in layers {
                values[l as usize][j] = v;
            }
        }
        LayerTable { steps, values }
    }

    /// `(step, value)` of a training scalar (`space` `train` or `validation`).
    pub fn scalar(&self, space: &str, metric: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter(|r| r.space == space && r.metric == metric)
            .map(|r| (r.step as f64, r.value))
            .collect()
    }

    /// The last step with weight-space rows.
    pub fn last_probed_step(&self) -> Option<u64> {
        self.rows
            .iter()
            .filter(|r| r.space == "weight")
            .map(|r| r.step)
            .max()
    }

    /// Per-layer values of a whole-layer weight metric at `step`.
    pub fn layers_at(&self, step: u64, estimator: &str, metric: &str) -> Vec<f64> {
        self.by_step_layer("weight", estimator, metric, false)
            .remove(&step)
            .map(|l| l.into_values().collect())
            .unwrap_or_default()
    }
}

/// Reads `metrics.jsonl` (or, without it, `metrics.csv`) of every variant of a run.
///
/// # Errors
/// Missing or corrupt metrics files.
pub fn load_run(dir: &Path, config: &RunConfig) -> Result<Vec<VariantMetrics>, ExperimentError> {
    config
        .variants
        .iter()
        .map(|&variant| {
            let vdir = dir.join(variant.name());
            let jsonl = vdir.join(probe::rows::JSONL_FILE);
            let rows = if jsonl.is_file() {
                probe::read_jsonl(&jsonl)?
            } else {
                probe::read_csv(&vdir.join(probe::rows::CSV_FILE))?
            };
            Ok(VariantMetrics { variant, rows })
        })
        .collect()
}

/// Mean over layers of a whole-layer weight metric at a variant's last probed step.
pub fn final_mean(v: &VariantMetrics, estimator: &str, metric: &str) -> Option<f64> {
    let step = v.last_probed_step()?;
    let x = v.layers_at(step, estimator, metric);
    (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64)
}
