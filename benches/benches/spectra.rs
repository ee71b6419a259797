//! Criterion benchmarks of rmt-core's hot paths, each beside a reference measured in the same
//! run: the project's eigensolver against faer's one-stage solver, the diagnostics of a
//! layer in f32 against f64. The numpy/LAPACK comparison is `cargo xtask bench`.
//!
//! `cargo bench -p benches`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rmt_core::diagnostics::{DiagnosticsConfig, diagnose_layer};
use rmt_core::eigen::EigenSolver;
use rmt_core::linalg::view;
use rmt_core::spectra::{gram, symmetric_eigenvalues_with};

fn gaussian(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    DMatrix::from_fn(rows, cols, |_, _| StandardNormal.sample(&mut rng))
}

fn eigen(c: &mut Criterion) {
    let mut group = c.benchmark_group("symmetric_eigenvalues");
    group.sample_size(10);
    for n in [256usize, 768] {
        let a = gram(&gaussian(n, n, n as u64), 1.0 / n as f64).unwrap();
        for (name, solver) in [
            ("project", EigenSolver::TwoStage),
            ("faer", EigenSolver::Faer),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), &a, |b, a| {
                b.iter(|| symmetric_eigenvalues_with(a, solver).unwrap())
            });
        }
    }
    group.finish();
}

fn diagnose(c: &mut Criterion) {
    let mut group = c.benchmark_group("diagnose_layer");
    group.sample_size(10);
    let n = 768;
    let (q, k) = (gaussian(n, n, 1), gaussian(n, n, 2));
    let (q32, k32) = (q.map(|x| x as f32), k.map(|x| x as f32));
    let config = DiagnosticsConfig::default();
    group.bench_function(BenchmarkId::new("f64", n), |b| {
        b.iter(|| diagnose_layer(view(&q), view(&k), 12, &config, None).unwrap())
    });
    group.bench_function(BenchmarkId::new("f32", n), |b| {
        b.iter(|| diagnose_layer(view(&q32), view(&k32), 12, &config, None).unwrap())
    });
    group.finish();
}

fn laws(c: &mut Criterion) {
    use rmt_core::laws::{ProductGaussianLaw, SpectralLaw};
    use rmt_core::tracy_widom::{Beta, TracyWidom};
    let tw = TracyWidom::new(Beta::One);
    c.bench_function("tracy_widom_cdf", |b| {
        b.iter(|| tw.cdf(std::hint::black_box(0.5)))
    });
    let law = ProductGaussianLaw::fuss_catalan(2, 1.0).unwrap();
    let _ = law.cdf(1.0); // build the CDF table once
    c.bench_function("fuss_catalan_cdf", |b| {
        b.iter(|| law.cdf(std::hint::black_box(2.5)))
    });
}

criterion_group!(benches, eigen, diagnose, laws);
criterion_main!(benches);
