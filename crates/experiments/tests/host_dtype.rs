//! The seed-002 measurements refuse to run in f32. burn 0.21 keys a device's default float
//! dtype by the device's type, shared by every `NdArray<E, I>`: after an f32 CPU backend has
//! created a tensor, `NdArray<f64>`'s parameters would be f32. This test needs a process of
//! its own (it sets that default for the whole process), hence a file of its own.

use burn::backend::NdArray;
use burn::tensor::Tensor;
use experiments::rank_collapse::common::host_device;

#[test]
fn an_f32_cpu_backend_used_first_makes_the_f64_measurements_an_error() {
    let device = Default::default();
    let _ = Tensor::<NdArray<f32>, 1>::zeros([1], &device);
    let err = host_device().expect_err("the CPU default is f32 now");
    assert!(err.to_string().contains("need f64"), "{err}");
}
