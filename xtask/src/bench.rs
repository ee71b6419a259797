//! `cargo xtask bench …`: the project's hot paths against numpy (OpenBLAS/LAPACK) on the
//! same matrices, in the same invocation. One line per size, `key=value` pairs, so a script
//! can read it; `ratio = project / reference` (below 1 is faster).

use crate::npy;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rmt_core::diagnostics::{
    DiagnosticsConfig, LayerDiagnostics, NullModel, VarianceEstimator, diagnose_layers,
};
use rmt_core::eigen::EigenSolver;
use rmt_core::linalg::{MatrixView, view};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Full symmetric spectrum: the project's solver vs numpy.linalg.eigvalsh (LAPACK).
    Eigen {
        /// Matrix sizes.
        #[arg(long, value_delimiter = ',', default_value = "256,768,2048")]
        sizes: Vec<usize>,
        /// Timed repetitions per size (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Solver: two-stage (the default) or faer.
        #[arg(long, default_value = "two-stage")]
        solver: String,
    },
    /// The whole-layer paper metrics of one layer (M = QKᵀ, G, every metric) vs numpy.
    Diagnose {
        /// Widths n (Q, K ∈ ℝ^{n×n}).
        #[arg(long, value_delimiter = ',', default_value = "768,2048,4096")]
        sizes: Vec<usize>,
        /// Precision of Q and K (and of the products): f32, f64 or both.
        #[arg(long, default_value = "both")]
        dtype: String,
        /// Timed repetitions per size (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also time a whole model: this many layers of width 768.
        #[arg(long, default_value_t = 12)]
        layers: usize,
    },
    /// One layer of a published shape (random weights) whose keys span fewer than d
    /// dimensions (MLA: b = r_kv + d_rope; GQA: b = H_kv·d_h): its effective Q, K and the
    /// whole-layer diagnostics through its key basis against the same diagnostics from the
    /// d-wide Q, K, where that m × m G fits (not DeepSeek-V3's).
    KeyBasis {
        /// Shapes: deepseek-v2-lite (MLA, d 2048, 16 heads, no query compression),
        /// deepseek-v3 (MLA, d 7168, 128 heads, r_q 1536; both r_kv 512, d_rope 64),
        /// llama3-8b (GQA, d 4096, 32 query heads, 8 key heads of 128).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "llama3-8b,deepseek-v2-lite,deepseek-v3"
        )]
        presets: Vec<String>,
        /// Timed repetitions per preset (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Forward + backward throughput of each attention variant (no reference: see the
    /// PyTorch comparison in docs/performance.md).
    Models {
        /// Backend: cpu (ndarray, f32) or cuda (needs `--features cuda`).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Float type on CUDA: f32 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Matrix products on CUDA in bf16: cublas or cubecl (burn's kernels; f32 always).
        #[arg(long, value_enum, default_value_t)]
        matmul: crate::gpu::Matmul,
        /// Preset: paper or tiny.
        #[arg(long, default_value = "paper")]
        preset: String,
        /// Sequences per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed steps per variant (after two warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// The probe's overhead: training-loop time without it, at the paper's cadence and at
    /// every step, in the same invocation.
    Probe(crate::bench_probe::Args),
    /// Training throughput and loss curves of the three variants against the PyTorch
    /// reference (benches/reference/), from identical weights and batches, same invocation.
    Train(crate::bench_train::Args),
}

pub fn run(b: Bench) -> Result<(), String> {
    if let Bench::Probe(args) = &b {
        return crate::bench_probe::run(args);
    }
    if let Bench::Train(args) = &b {
        return crate::bench_train::run(args);
    }
    if let Bench::Models {
        backend,
        dtype,
        matmul,
        preset,
        batch,
        steps,
    } = &b
    {
        return models(backend, dtype, *matmul, preset, *batch, (*steps).max(1));
    }
    if let Bench::KeyBasis { presets, repeats } = &b {
        return key_basis(presets, (*repeats).max(1));
    }
    check_numpy()?;
    let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = match b {
        Bench::Eigen {
            sizes,
            repeats,
            solver,
        } => eigen(&dir, &sizes, repeats.max(1), &solver),
        Bench::Diagnose {
            sizes,
            dtype,
            repeats,
            layers,
        } => diagnose(&dir, &sizes, &dtype, repeats.max(1), layers),
        Bench::Models { .. } | Bench::Probe(_) | Bench::Train(_) | Bench::KeyBasis { .. } => {
            unreachable!("handled above")
        }
    };
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn check_numpy() -> Result<(), String> {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err("the reference needs python3 with numpy (`pip install numpy`)".into())
    }
}

/// Wall times of one side of a benchmark, in ms (or any times: `bench train` takes the
/// median of per-update seconds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Times {
    pub(crate) median: f64,
    /// The fastest run: on a shared machine, the one least disturbed by other tenants.
    pub(crate) min: f64,
}

impl Times {
    /// The median (the upper one of an even count) and the minimum of `xs` (not empty).
    pub(crate) fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(|a, b| a.total_cmp(b));
        Times {
            median: xs[xs.len() / 2],
            min: xs[0],
        }
    }
}

/// Wall times in ms of `repeats` runs of `f`, after one warm-up run.
fn time_ms<T>(repeats: usize, mut f: impl FnMut() -> T) -> (Times, T) {
    let mut last = f();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        last = f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (Times::of(times), last)
}

/// The fields every benchmark line ends with: the medians' ratio and the minima's.
fn ratios(project: Times, reference: Times) -> String {
    format!(
        "ratio={:.3} min_ratio={:.3}",
        project.median / reference.median,
        project.min / reference.min
    )
}

/// Runs a Python snippet with `sys.argv[1:] = args` and returns its stdout's last line.
fn python(script: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "numpy reference failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string())
}

/// The reference's median (`ms`) and fastest run (`min_ms`).
fn reference_times(line: &str) -> Result<Times, String> {
    Ok(Times {
        median: field(line, "ms")?,
        min: field(line, "min_ms")?,
    })
}

/// Parses `key=value` pairs of a reference's output line.
fn field(line: &str, key: &str) -> Result<f64, String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("reference output lacks {key}: {line}"))
}

const EIGEN_REFERENCE: &str = r#"
import sys, time, numpy as np
a = np.load(sys.argv[1]); repeats = int(sys.argv[2])
np.linalg.eigvalsh(a)
ts = []
for _ in range(repeats):
    t = time.perf_counter(); ev = np.linalg.eigvalsh(a); ts.append(time.perf_counter() - t)
print(f"ms={sorted(ts)[len(ts)//2]*1e3} min_ms={min(ts)*1e3} max={float(ev[-1])!r} min={float(ev[0])!r}")
"#;

fn wishart(n: usize, seed: u64) -> DMatrix<f64> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let x = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
    rmt_core::spectra::gram(&x, 1.0 / n as f64).expect("finite Gaussian matrix")
}

fn eigen(dir: &Path, sizes: &[usize], repeats: usize, solver: &str) -> Result<(), String> {
    let solver = match solver {
        "two-stage" => EigenSolver::TwoStage,
        "faer" => EigenSolver::Faer,
        other => return Err(format!("unknown solver `{other}` (two-stage, faer)")),
    };
    println!(
        "# bench eigen: {solver:?} vs numpy.linalg.eigvalsh, f64, medians (and minima) of {repeats}, threads={}",
        rayon_threads()
    );
    for &n in sizes {
        let a = wishart(n, n as u64);
        let path = dir.join(format!("eig{n}.npy"));
        npy::write(&path, a.transpose().as_slice(), n, n).map_err(|e| e.to_string())?;
        let (project, ev) = time_ms(repeats, || {
            rmt_core::spectra::symmetric_eigenvalues_with(&a, solver).expect("valid matrix")
        });
        let line = python(EIGEN_REFERENCE, &[path_arg(&path), repeats.to_string()])?;
        let lapack = reference_times(&line)?;
        let err = ((ev[0] - field(&line, "max")?).abs())
            .max((ev[n - 1] - field(&line, "min")?).abs())
            / ev[0];
        println!(
            "n={n} project_ms={:.2} lapack_ms={:.2} {} max_rel_diff={err:.1e}",
            project.median,
            lapack.median,
            ratios(project, lapack)
        );
    }
    Ok(())
}

const DIAGNOSE_REFERENCE: &str = r#"
import sys, time, numpy as np
q = np.load(sys.argv[1]); k = np.load(sys.argv[2]); repeats = int(sys.argv[3]); layers = int(sys.argv[4])
def metrics(q, k):
    m, d = q.shape
    M = q @ k.T
    G = (M @ M.T) / d
    s2 = M.astype(np.float64).var()
    ev = np.linalg.eigvalsh(G)
    lp = s2 * (1 + np.sqrt(m / d)) ** 2
    out = ev[ev > lp]
    tr = ev.sum()
    return dict(lmax=float(ev[-1]), lp=float(lp), gap=float(ev[-1] - lp), count=int(out.size),
                energy=float(out.sum() / tr), soft=float(ev[-1] / lp), stable=float(tr / ev[-1]))
metrics(q, k)
ts = []
for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(layers):
        r = metrics(q, k)
    ts.append(time.perf_counter() - t)
print(f"ms={sorted(ts)[len(ts)//2]*1e3} min_ms={min(ts)*1e3} lmax={r['lmax']!r} count={r['count']} energy={r['energy']!r}")
"#;

/// `Q, K ∈ ℝ^{n×n}` Gaussian with 16 planted rank-one spikes of graded strength in `Q`
/// (a trained layer has tens of outliers; this exercises the outlier path, not only the bulk).
fn spiked_layer(n: usize, seed: u64) -> (DMatrix<f64>, DMatrix<f64>) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut q = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
    let k = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
    let u = DMatrix::<f64>::from_fn(n, 16, |_, _| StandardNormal.sample(&mut rng))
        .qr()
        .q();
    for i in 0..16 {
        let strength = 0.15 * (i + 1) as f64;
        q += u.column(i) * (u.column(i).transpose() * &k) * strength;
    }
    (q, k)
}

fn diagnose(
    dir: &Path,
    sizes: &[usize],
    dtype: &str,
    repeats: usize,
    layers: usize,
) -> Result<(), String> {
    let dtypes: Vec<&str> = match dtype {
        "both" => vec!["f32", "f64"],
        "f32" | "f64" => vec![dtype],
        other => return Err(format!("unknown dtype `{other}` (f32, f64, both)")),
    };
    let config = DiagnosticsConfig::default();
    println!(
        "# bench diagnose: paper metrics (empirical σ², MP null) of one layer vs numpy (same dtype for products, eigvalsh), medians (and minima) of {repeats}, threads={}",
        rayon_threads()
    );
    let mut jobs: Vec<(usize, usize)> = sizes.iter().map(|&n| (n, 1)).collect();
    if layers > 0 {
        jobs.push((768, layers));
    }
    for (n, count) in jobs {
        let (q, k) = spiked_layer(n, 1000 + n as u64);
        for &dt in &dtypes {
            let qp = dir.join(format!("q{n}{dt}.npy"));
            let kp = dir.join(format!("k{n}{dt}.npy"));
            let (project, metrics) = if dt == "f32" {
                let (q32, k32) = (q.map(|x| x as f32), k.map(|x| x as f32));
                npy::write(&qp, q32.transpose().as_slice(), n, n).map_err(|e| e.to_string())?;
                npy::write(&kp, k32.transpose().as_slice(), n, n).map_err(|e| e.to_string())?;
                time_ms(repeats, || {
                    diagnose_copies(view(&q32), view(&k32), count, &config)
                })
            } else {
                npy::write(&qp, q.transpose().as_slice(), n, n).map_err(|e| e.to_string())?;
                npy::write(&kp, k.transpose().as_slice(), n, n).map_err(|e| e.to_string())?;
                time_ms(repeats, || {
                    diagnose_copies(view(&q), view(&k), count, &config)
                })
            };
            let ours = metrics
                .layer
                .get(VarianceEstimator::Empirical, NullModel::Mp)
                .expect("default pair");
            let line = python(
                DIAGNOSE_REFERENCE,
                &[
                    path_arg(&qp),
                    path_arg(&kp),
                    repeats.to_string(),
                    count.to_string(),
                ],
            )?;
            let numpy = reference_times(&line)?;
            let agree = (ours.lambda_max / field(&line, "lmax")? - 1.0).abs();
            let prefix = if count > 1 {
                format!("layers={count} ")
            } else {
                String::new()
            };
            println!(
                "{prefix}n={n} dtype={dt} project_ms={:.1} numpy_ms={:.1} {} partial_spectrum={} outliers={}/{} lambda_max_rel_diff={agree:.1e}",
                project.median,
                numpy.median,
                ratios(project, numpy),
                metrics.layer.partial_spectrum,
                ours.outlier_count,
                field(&line, "count")? as usize,
            );
        }
    }
    Ok(())
}

/// The diagnostics of `count` copies of one layer, as a checkpoint's layers are diagnosed
/// (`diagnose_layers`: in parallel over layers); returns the last.
fn diagnose_copies<T: rmt_core::linalg::Element>(
    q: MatrixView<'_, T>,
    k: MatrixView<'_, T>,
    count: usize,
    config: &DiagnosticsConfig,
) -> LayerDiagnostics {
    diagnose_layers(&vec![(q, k); count], 1, config, None)
        .into_iter()
        .last()
        .expect("count ≥ 1")
        .expect("valid layer")
}

/// Largest `m` for which `bench key-basis` times the `d`-wide reference (its `G` is
/// `m × m`).
const KEY_BASIS_DENSE_MAX_ROWS: usize = 4096;

/// `bench key-basis`: one layer per preset, random `N(0, 0.02²)` weights (seeded).
fn key_basis(presets: &[String], repeats: usize) -> Result<(), String> {
    use rmt_core::effective::{
        AttentionLayer, LayerFactors, MlaWeights, RowMajor, mha_effective, mla_effective,
        mla_factors,
    };
    println!(
        "# bench key-basis: one layer, effective Q, K and the paper metrics through the key basis vs from the d-wide Q, K (same run), medians (and minima) of {repeats}, threads={}",
        rayon_threads()
    );
    for preset in presets {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
        let normal = rand_distr::Normal::new(0.0f32, 0.02).map_err(|e| e.to_string())?;
        let mut matrix = |rows: usize, cols: usize| {
            let data = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
            RowMajor::new(data, rows, cols).map_err(|e| e.to_string())
        };
        // The weights, how to form the layer from them, and how to form its factors alone.
        type Form<L> = Box<dyn Fn() -> rmt_core::Result<L>>;
        let (form, form_factors): (Form<AttentionLayer>, Form<LayerFactors>) = match preset.as_str()
        {
            "llama3-8b" => {
                let (heads, kv_heads, head_dim, d) = (32, 8, 128, 4096);
                let (q, k) = (
                    matrix(heads * head_dim, d)?,
                    matrix(kv_heads * head_dim, d)?,
                );
                let form = move || mha_effective(0, heads, q.clone(), k.clone());
                (
                    Box::new(form.clone()),
                    Box::new(move || form().map(Into::into)),
                )
            }
            "deepseek-v2-lite" | "deepseek-v3" => {
                // (heads, d, r_q (0: none), r_kv, d_nope, d_rope, d_v)
                let (heads, d, rq, rkv, nope, rope, v) = if preset == "deepseek-v3" {
                    (128, 7168, 1536, 512, 128, 64, 128)
                } else {
                    (16, 2048, 0, 512, 128, 64, 128)
                };
                let m = heads * (nope + rope);
                let q_down = if rq > 0 {
                    Some((matrix(rq, d)?, Some(vec![1.0; rq])))
                } else {
                    None
                };
                let weights = MlaWeights {
                    q_down,
                    q_up: matrix(m, if rq > 0 { rq } else { d })?,
                    kv_down: matrix(rkv + rope, d)?,
                    kv_norm: Some(vec![1.0; rkv]),
                    kv_up: matrix(heads * (nope + v), rkv)?,
                };
                let w = weights.clone();
                (
                    Box::new(move || mla_effective(0, heads, weights.clone())),
                    Box::new(move || mla_factors(0, heads, w.clone())),
                )
            }
            other => {
                return Err(format!(
                    "unknown preset `{other}` (llama3-8b, deepseek-v2-lite, deepseek-v3)"
                ));
            }
        };
        let (effective, layer) = time_ms(repeats, &form);
        let layer = layer.map_err(|e| e.to_string())?;
        // What `cargo xtask diagnose` forms; the same diagnostics (checked below).
        let (factors_time, factors) = time_ms(repeats, &form_factors);
        let factors = factors.map_err(|e| e.to_string())?;
        let (m, d) = (layer.rows, layer.width);
        let b = layer.factors().2;
        let config = DiagnosticsConfig::default();
        let (basis, through_basis) = time_ms(repeats, || layer.diagnose(&config));
        let through_basis = through_basis.map_err(|e| e.to_string())?;
        let from_factors = factors.diagnose(&config).map_err(|e| e.to_string())?;
        let ours = through_basis
            .layer
            .get(VarianceEstimator::Empirical, NullModel::Mp)
            .expect("default pair");
        let theirs = from_factors
            .layer
            .get(VarianceEstimator::Empirical, NullModel::Mp)
            .expect("default pair");
        if (theirs.lambda_max, theirs.outlier_count) != (ours.lambda_max, ours.outlier_count) {
            return Err(format!(
                "{preset}: the layer's factors alone diagnose differently from the layer"
            ));
        }
        let prefix = format!(
            "preset={preset} d={d} m={m} b={b} effective_ms={:.1} factors_ms={:.1} basis_ms={:.1} outliers={}",
            effective.median, factors_time.median, basis.median, ours.outlier_count
        );
        if m > KEY_BASIS_DENSE_MAX_ROWS {
            println!(
                "{prefix} dense_ms=NA (G would be {m}² = {:.1} GiB in f32)",
                (m * m * 4) as f64 / (1u64 << 30) as f64
            );
            continue;
        }
        let dense_layer = AttentionLayer {
            key_basis: None,
            ..layer.clone()
        };
        let (dense, from_dense) = time_ms(repeats, || dense_layer.diagnose(&config));
        let from_dense = from_dense.map_err(|e| e.to_string())?;
        let reference = from_dense
            .layer
            .get(VarianceEstimator::Empirical, NullModel::Mp)
            .expect("default pair");
        println!(
            "{prefix} dense_ms={:.1} {} dense_outliers={} lambda_max_rel_diff={:.1e}",
            dense.median,
            ratios(basis, dense),
            reference.outlier_count,
            (ours.lambda_max / reference.lambda_max - 1.0).abs()
        );
    }
    Ok(())
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn models(
    backend: &str,
    dtype: &str,
    matmul: crate::gpu::Matmul,
    preset: &str,
    batch: usize,
    steps: usize,
) -> Result<(), String> {
    match backend {
        "cpu" => models_on::<burn::backend::Autodiff<burn::backend::NdArray<f32>>>(
            &Default::default(),
            "cpu f32",
            preset,
            batch,
            steps,
        ),
        "cuda" => cuda_models(dtype, matmul, preset, batch, steps),
        other => Err(format!("unknown backend `{other}` (cpu, cuda)")),
    }
}

#[cfg(feature = "cuda")]
fn cuda_models(
    dtype: &str,
    matmul: crate::gpu::Matmul,
    preset: &str,
    batch: usize,
    steps: usize,
) -> Result<(), String> {
    use burn::backend::{Autodiff, Cuda};
    let device = burn::backend::cuda::CudaDevice::default();
    match dtype {
        "bf16" => crate::gpu::with_cuda_backend!(matmul, |B| models_on::<B>(
            &device,
            matmul.label(),
            preset,
            batch,
            steps
        )),
        "f32" => models_on::<Autodiff<Cuda<f32, i32>>>(&device, "cuda f32", preset, batch, steps),
        other => Err(format!("unknown dtype `{other}` (f32, bf16)")),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_models(_: &str, _: crate::gpu::Matmul, _: &str, _: usize, _: usize) -> Result<(), String> {
    Err(crate::bench_train::NO_CUDA.into())
}

/// Times `steps` forward + backward passes of each variant (causal LM, mean of logits as the
/// loss: the same graph as training without the optimizer) and prints tokens/s.
fn models_on<B: burn::tensor::backend::AutodiffBackend>(
    device: &B::Device,
    label: &str,
    preset: &str,
    batch: usize,
    steps: usize,
) -> Result<(), String> {
    use attn_models::config::{AttentionVariant, LlamaConfig};
    use burn::prelude::*;
    println!(
        "# bench models: {preset} preset, {label}, batch {batch}, forward + backward, {steps} timed steps after 2 warm-up"
    );
    for variant in AttentionVariant::ALL {
        let config = LlamaConfig::preset(preset, variant)
            .ok_or_else(|| format!("unknown preset `{preset}` (paper, tiny)"))?;
        let seq = config.context;
        let model = config.init::<B>(device).map_err(|e| e.to_string())?;
        let ids: Vec<i64> = (0..(batch * seq) as i64)
            .map(|i| (i * 7919) % config.vocab_size as i64)
            .collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
        let step = || {
            let grads = model.forward(tokens.clone()).mean().backward();
            std::hint::black_box(grads);
        };
        for _ in 0..2 {
            step();
        }
        B::sync(device).map_err(|e| format!("{e:?}"))?;
        let t = Instant::now();
        for _ in 0..steps {
            step();
        }
        B::sync(device).map_err(|e| format!("{e:?}"))?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "variant={} params={} tokens_per_s={:.0} ms_per_step={:.1}",
            variant.name(),
            model.num_params(),
            (batch * seq * steps) as f64 / secs,
            secs * 1e3 / steps as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ratios_read_the_median_and_the_fastest_run() {
        let ours = Times::of(vec![30.0, 10.0, 20.0, 50.0, 40.0]);
        assert_eq!((ours.median, ours.min), (30.0, 10.0));
        let theirs = Times::of(vec![60.0, 40.0, 80.0]);
        assert_eq!(ratios(ours, theirs), "ratio=0.500 min_ratio=0.250");
        let line = "ms=60.5 min_ms=40.25 lmax=1.0";
        let parsed = reference_times(line).unwrap();
        assert_eq!((parsed.median, parsed.min), (60.5, 40.25));
        assert!(reference_times("ms=60.5 lmax=1.0").is_err());
    }
}
