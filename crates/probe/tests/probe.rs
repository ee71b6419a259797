//! The probe's bars: same numbers as rmt-core, planted spikes found where they are, exact
//! resumption.

use attn_models::attention::Attention;
use attn_models::config::{AttentionConfig, AttentionVariant, LlamaConfig};
use attn_models::{EffectiveQk, Llama, export};
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use probe::{Probe, ProbeConfig, Schedule, WriterState, read_csv, read_jsonl};
use rmt_core::diagnostics::{DiagnosticsConfig, NullModel, VarianceEstimator, diagnose_layer};
use rmt_core::linalg::row_major_view;

type B = NdArray<f32>;
type AB = Autodiff<B>;

fn device() -> Device<B> {
    Default::default()
}

fn small(variant: AttentionVariant) -> LlamaConfig {
    let attention = AttentionConfig::new(64, 4, 16, variant)
        .with_rope_dim(8)
        .with_max_seq_len(64)
        .with_init_std(0.05);
    LlamaConfig::new(40, 3, attention, 96, 16)
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("probe-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// burn's ndarray backend has one global RNG (`Backend::seed`): tests that initialise models
/// take this lock, so that a parallel test cannot draw from the stream between a seed and
/// the initialisation it is meant to fix.
static BACKEND_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    BACKEND_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The weight-space rows equal rmt-core's `diagnose_layer` on the same effective weights
/// (products on the burn device in f32 vs faer in f32: agreement to 1e-4 relative).
#[test]
fn weight_metrics_equal_rmt_core() {
    let _rng = rng_lock();
    for variant in AttentionVariant::ALL {
        let config = small(variant);
        let model: Llama<B> = config.init(&device()).unwrap();
        let dir = temp(&format!("equal-{}", variant.name()));
        let mut cfg = ProbeConfig::new("t", variant.name(), Schedule::every(1));
        cfg.activation_space = false;
        let mut probe = Probe::start(cfg.clone(), &dir).unwrap();
        probe.observe::<B, _>(0, &model, None).unwrap();
        probe.finish().unwrap();
        let rows = read_csv(&dir.join("metrics.csv")).unwrap();
        let diag_config = DiagnosticsConfig {
            per_head: true,
            ..cfg.diagnostics.clone()
        };
        for layer in model.effective_qk().unwrap() {
            let q = row_major_view(&layer.q, layer.rows, layer.width).unwrap();
            let k = row_major_view(&layer.k, layer.rows, layer.width).unwrap();
            let reference = diagnose_layer(
                q,
                k,
                layer.kind.heads(),
                &diag_config,
                Some(&layer.factorization),
            )
            .unwrap();
            for spectrum in std::iter::once(&reference.layer).chain(&reference.per_head) {
                let head = spectrum.head.map(|h| h.to_string()).unwrap_or("all".into());
                for d in &spectrum.diagnoses {
                    let est = format!("{}/{}", d.estimator.name(), d.null.name());
                    for (metric, value) in d.metrics.named_values() {
                        let got = rows
                            .iter()
                            .find(|r| {
                                r.layer as usize == layer.index
                                    && r.head == head
                                    && r.estimator == est
                                    && r.metric == metric
                            })
                            .unwrap_or_else(|| {
                                panic!("missing {variant:?} {} {head} {est} {metric}", layer.index)
                            })
                            .value;
                        let tol = if metric == "outlier_count" {
                            0.0
                        } else {
                            1e-4 * value.abs().max(1e-6)
                        };
                        let ok = (got - value).abs() <= tol
                            || (metric == "tw_p_value" && (got - value).abs() < 1e-3);
                        assert!(
                            ok,
                            "{variant:?} layer {} head {head} {est} {metric}: {got} vs {value}",
                            layer.index
                        );
                    }
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A spike planted in one head's `Q` (aligned with that head's keys) shows up in exactly that
/// layer and head.
#[test]
fn a_planted_spike_is_reported_where_it_is() {
    let _rng = rng_lock();
    let config = small(AttentionVariant::Mha);
    let mut model: Llama<B> = config.init(&device()).unwrap();
    let (layer, head, hd) = (1usize, 2usize, 16usize);
    if let Attention::Mha(a) = &mut model.blocks[layer].attention {
        // HF layout Q_h = (wq[:, head cols])ᵀ; add α·a·(K_hᵀc)ᵀ to Q_h.
        let wk = a.wk.weight.val(); // [d, m]
        let kh = wk.slice([0..64, head * hd..(head + 1) * hd]); // [d, hd] = K_hᵀ
        let c = Tensor::<B, 2>::ones([hd, 1], &device());
        let b = kh.matmul(c); // [d, 1] = K_hᵀ c
        let av = Tensor::<B, 2>::ones([1, hd], &device());
        let spike = b.matmul(av).mul_scalar(0.5); // [d, hd]
        let wq = a.wq.weight.val();
        let cols = wq.clone().slice([0..64, head * hd..(head + 1) * hd]) + spike;
        let new = wq.slice_assign([0..64, head * hd..(head + 1) * hd], cols);
        a.wq.weight = a.wq.weight.clone().map(|_| new);
    } else {
        unreachable!()
    }
    let dir = temp("spike");
    let mut cfg = ProbeConfig::new("t", "mha", Schedule::every(1));
    cfg.activation_space = false;
    let mut probe = Probe::start(cfg, &dir).unwrap();
    probe.observe::<B, _>(0, &model, None).unwrap();
    probe.finish().unwrap();
    let rows = read_csv(&dir.join("metrics.csv")).unwrap();
    let soft: Vec<(u32, String, f64)> = rows
        .iter()
        .filter(|r| r.head != "all" && r.estimator == "empirical/mp" && r.metric == "mp_soft_rank")
        .map(|r| (r.layer, r.head.clone(), r.value))
        .collect();
    assert_eq!(soft.len(), 3 * 4);
    let best = soft.iter().max_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!((best.0, best.1.as_str()), (layer as u32, "2"), "{soft:?}");
    let second = soft
        .iter()
        .filter(|s| (s.0, s.1.as_str()) != (1, "2"))
        .map(|s| s.2)
        .fold(0.0, f64::max);
    assert!(best.2 > 2.0 * second, "{best:?} vs {second}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `first..=last` training steps (plain SGD, fixed batch) with the probe; checkpoints
/// (model + writer lengths) at the steps in `checkpoints`. Returns the final model.
#[allow(clippy::too_many_arguments)]
fn train(
    mut model: Llama<AB>,
    probe: &mut Probe,
    first: u64,
    last: u64,
    checkpoints: &[u64],
    config: &LlamaConfig,
    ckpt_dir: &std::path::Path,
) -> Llama<AB> {
    let mut optim = SgdConfig::new().init::<AB, Llama<AB>>();
    let ids: Vec<i64> = (0..32).map(|i| (i * 7 + 3) % 40).collect();
    let tokens = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 16]), &device());
    let probe_tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..16].to_vec(), [1, 16]), &device());
    for step in first..=last {
        if probe.is_due(step) {
            let valid = model.valid();
            let maps = valid.forward_with_maps(probe_tokens.clone()).1;
            probe.observe::<B, _>(step, &valid, Some(maps)).unwrap();
        }
        let logits = model.forward(tokens.clone());
        let loss = (logits.clone() * logits).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.05, model, grads);
        if checkpoints.contains(&step) {
            let state = probe.checkpoint().unwrap();
            let dir = ckpt_dir.join(format!("step-{step}"));
            export::save(&model, config, &dir).unwrap();
            std::fs::write(
                dir.join("probe.json"),
                serde_json::to_string(&state).unwrap(),
            )
            .unwrap();
        }
    }
    model
}

/// Killing a run between two checkpoints and resuming from the last one yields the same
/// metrics files as an uninterrupted run, byte for byte.
#[test]
fn resuming_after_a_kill_loses_and_duplicates_nothing() {
    let _rng = rng_lock();
    let config = small(AttentionVariant::MlaDecoupled);
    let mut cfg = ProbeConfig::new("resume", "mla-decoupled", Schedule::every(2));
    cfg.queue = 1; // exercise the blocking path too
    // Uninterrupted.
    let dir_a = temp("resume-a");
    <AB as Backend>::seed(&device(), 11);
    let model: Llama<AB> = config.init(&device()).unwrap();
    let mut probe = Probe::start(cfg.clone(), &dir_a).unwrap();
    train(model, &mut probe, 0, 9, &[4], &config, &dir_a);
    probe.finish().unwrap();
    // Killed after step 6 (checkpoint at 4), then resumed from it.
    let dir_b = temp("resume-b");
    <AB as Backend>::seed(&device(), 11);
    let model: Llama<AB> = config.init(&device()).unwrap();
    let mut probe = Probe::start(cfg.clone(), &dir_b).unwrap();
    train(model, &mut probe, 0, 6, &[4], &config, &dir_b);
    drop(probe); // the kill: no finish, queued rows of steps 5–6 still reach the files
    let ckpt = dir_b.join("step-4");
    let state: WriterState =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("probe.json")).unwrap()).unwrap();
    let (_, model) = export::load::<AB>(&ckpt, &device()).unwrap();
    let mut probe = Probe::resume(cfg, &dir_b, state).unwrap();
    train(model, &mut probe, 5, 9, &[], &config, &dir_b);
    probe.finish().unwrap();
    for file in ["metrics.csv", "metrics.jsonl"] {
        let a = std::fs::read(dir_a.join(file)).unwrap();
        let b = std::fs::read(dir_b.join(file)).unwrap();
        assert!(a.len() > 1000);
        assert!(a == b, "{file} differs ({} vs {} bytes)", a.len(), b.len());
    }
    let rows = read_jsonl(&dir_a.join("metrics.jsonl")).unwrap();
    let steps: std::collections::BTreeSet<u64> = rows.iter().map(|r| r.step).collect();
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), vec![0, 2, 4, 6, 8]);
    assert!(
        rows.iter()
            .any(|r| r.space == "activation" && r.metric == "attn_entropy_bits")
    );
    assert!(
        rows.iter()
            .any(|r| r.space == "weight" && r.estimator == "empirical/product")
    );
    std::fs::remove_dir_all(&dir_a).ok();
    std::fs::remove_dir_all(&dir_b).ok();
}

#[test]
fn a_truncated_or_foreign_metrics_file_is_an_error() {
    let _rng = rng_lock();
    let dir = temp("foreign");
    let cfg = ProbeConfig::new("t", "mha", Schedule::every(1));
    let probe = Probe::start(cfg.clone(), &dir).unwrap();
    drop(probe);
    let state = WriterState {
        csv_bytes: 1 << 20,
        jsonl_bytes: 0,
    };
    let e = Probe::resume(cfg.clone(), &dir, state)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not belong to this checkpoint"), "{e}");
    let mut bad = cfg;
    bad.workers = 0;
    assert!(Probe::start(bad, &dir).is_err());
    std::fs::remove_dir_all(&dir).ok();
    // Estimators named in the rows are the ones asked for.
    let _ = (VarianceEstimator::Empirical, NullModel::Mp);
}

/// Rows from `record` never wait behind a probe event, however small the queue: only events
/// count against it. (With a bounded channel of jobs, the rows sent while the event's host
/// work runs filled the queue and stalled training at the paper's cadence.)
#[test]
fn recorded_rows_never_stall_behind_an_event() {
    let model: Llama<B> = {
        let _guard = rng_lock();
        small(AttentionVariant::MlaDecoupled)
            .init(&device())
            .unwrap()
    };
    let dir = temp("rows-no-stall");
    let mut cfg = ProbeConfig::new("t", "mla-decoupled", Schedule::every(1));
    cfg.activation_space = false;
    cfg.queue = 1;
    cfg.workers = 1;
    let mut probe = Probe::start(cfg, &dir).unwrap();
    probe.observe::<B, _>(0, &model, None).unwrap();
    let rows = 1000;
    for i in 0..rows {
        probe
            .record(vec![probe::MetricRow {
                run: "t".into(),
                variant: "mla-decoupled".into(),
                step: i,
                layer: 0,
                head: "all".into(),
                space: "train".into(),
                estimator: "-".into(),
                metric: "loss".into(),
                value: i as f64,
            }])
            .unwrap();
    }
    assert_eq!(probe.stats().stalls, 0);
    // A second event while the first may still be in the workers' hands may wait; the rows
    // all arrive either way.
    probe.observe::<B, _>(1, &model, None).unwrap();
    let stats = probe.finish().unwrap();
    let written = read_csv(&dir.join("metrics.csv")).unwrap();
    assert_eq!(stats.rows, written.len() as u64);
    assert_eq!(
        written.iter().filter(|r| r.metric == "loss").count(),
        rows as usize
    );
    let _ = std::fs::remove_dir_all(&dir);
}
