//! Forward + backward of each attention variant at the paper preset (LLaMA-130M shapes,
//! context 256, batch 1) on the CPU ndarray backend. Throughput is reported in tokens/s.
//!
//! `cargo bench -p benches --bench models`

use attn_models::config::{AttentionVariant, LlamaConfig};
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

type AB = Autodiff<NdArray<f32>>;

fn forward_backward(c: &mut Criterion) {
    let device = Default::default();
    let mut group = c.benchmark_group("llama130m_forward_backward_cpu");
    group.sample_size(10);
    let seq = 256;
    group.throughput(Throughput::Elements(seq as u64));
    for variant in AttentionVariant::ALL {
        let config = LlamaConfig::paper(variant);
        let model = config.init::<AB>(&device).expect("valid preset");
        let ids: Vec<i64> = (0..seq as i64)
            .map(|i| (i * 7919) % config.vocab_size as i64)
            .collect();
        let tokens = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [1, seq]), &device);
        group.bench_function(BenchmarkId::new(variant.name(), seq), |b| {
            b.iter(|| {
                let logits = model.forward(tokens.clone());
                let grads = logits.mean().backward();
                std::hint::black_box(grads);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward_backward);
criterion_main!(benches);
