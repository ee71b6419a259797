//! Helpers the GPU test files share.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use experiments::cublas::CublasCuda;

/// The host values of a tensor, as f64 (bf16 and f32 values are exact in f64).
pub fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f64> {
    t.to_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("float data")
}

/// The element strides of `t`'s buffer.
pub fn strides<const D: usize>(t: &Tensor<CublasCuda, D>) -> Vec<usize> {
    t.clone().into_primitive().tensor().meta.strides().to_vec()
}
