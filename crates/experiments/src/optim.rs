//! AdamW that runs a backend's fused update kernel ([`attn_models::fused::adamw`]) where one
//! is registered, and burn's `AdamW` everywhere else.
//!
//! burn's `AdamW` composes each parameter's update from about fifteen element-wise tensor
//! operations, each a kernel launch and a pass over the parameter; on the GPU that was
//! ≈ 1 300 launches per update of LLaMA-130M. [`FusedAdamW`] hands the same update to the
//! backend's kernel (one pass per parameter) and falls back to burn's `AdamW` itself, so the
//! two share one definition and one state: the optimizer state is burn's `AdamWState`, and a
//! checkpoint written by either loads into the other.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::LinearConfig;
//! use burn::optim::{GradientsParams, Optimizer};
//! use burn::prelude::*;
//! use experiments::optim::FusedAdamWConfig;
//!
//! type B = Autodiff<NdArray<f32>>;
//! let device = Default::default();
//! let layer = LinearConfig::new(4, 2).init::<B>(&device);
//! let mut optim = FusedAdamWConfig::new().with_weight_decay(0.1).init::<B, _>();
//! let x = Tensor::<B, 2>::ones([3, 4], &device);
//! let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
//! let layer = optim.step(1e-3, layer, grads); // burn's AdamW here: nothing is registered
//! # let _ = layer;
//! ```

use attn_models::fused::{self, AdamWStep, Outcome};
use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// The hyper-parameters of [`FusedAdamW`] (burn's `AdamWConfig` defaults; no AMSGrad, no
/// cautious decay, which the fused update does not implement).
#[derive(Config, Debug)]
pub struct FusedAdamWConfig {
    /// `β₁`.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// `β₂`.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// `ε`.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay `λ`.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
}

impl FusedAdamWConfig {
    /// The optimizer, wrapped as burn wraps its own simple optimizers.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> OptimizerAdaptor<FusedAdamW, M, B> {
        OptimizerAdaptor::from(FusedAdamW {
            config: self.clone(),
            composed: AdamWConfig::new()
                .with_beta_1(self.beta_1)
                .with_beta_2(self.beta_2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(self.weight_decay)
                .build(),
        })
    }
}

/// AdamW, one fused kernel per parameter where the backend registered one; see the module
/// documentation.
#[derive(Clone)]
pub struct FusedAdamW {
    config: FusedAdamWConfig,
    /// burn's AdamW with the same hyper-parameters: the fallback and the definition.
    composed: AdamW,
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        // AMSGrad's extra moment (from a state burn wrote) is not the fused update's.
        if state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some())
        {
            return self.composed.step(lr, tensor, grad, state);
        }
        let dims = tensor.dims();
        let time = state.as_ref().map_or(0, |s| s.momentum.time) + 1;
        let step = AdamWStep {
            param: tensor.reshape([-1]),
            grad: grad.reshape([-1]),
            moments: state.map(|s| {
                (
                    s.momentum.moment_1.reshape([-1]),
                    s.momentum.moment_2.reshape([-1]),
                )
            }),
            lr,
            beta_1: self.config.beta_1,
            beta_2: self.config.beta_2,
            epsilon: self.config.epsilon,
            weight_decay: self.config.weight_decay,
            time,
        };
        match fused::adamw(step) {
            Outcome::Computed((param, moment_1, moment_2)) => {
                let momentum = AdaptiveMomentumState::new(
                    time,
                    moment_1.reshape(dims),
                    moment_2.reshape(dims),
                );
                (param.reshape(dims), Some(AdamWState::new(momentum)))
            }
            Outcome::Declined(step) => {
                let state = step.moments.map(|(m, v)| {
                    AdamWState::new(AdaptiveMomentumState::new(
                        time - 1,
                        m.reshape(dims),
                        v.reshape(dims),
                    ))
                });
                self.composed
                    .step(lr, step.param.reshape(dims), step.grad.reshape(dims), state)
            }
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_models::fused::FusedKernels;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{GradientsParams, Optimizer};
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    use burn::tensor::Tolerance;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Backends no other test of the crate uses: a registration here changes nothing else.
    // Both hold f64: burn 0.21 keys a device's default float dtype by the device type, which
    // every `NdArray<E, I>` shares, so the first backend to create a tensor on the CPU sets
    // the dtype of the others' (an f32 backend here made the f64 test's parameters f32 when
    // it ran first).
    type Unregistered = Autodiff<NdArray<f64, i64>>;
    type Host = NdArray<f64, i32>;
    type Registered = Autodiff<Host>;

    /// Gradients of `Σ layer(x)²` for inputs `x` fixed by `seed` (built on the host: the
    /// backends' RNG is shared by tests running in parallel).
    fn step_grads<B: AutodiffBackend>(layer: &Linear<B>, seed: u64) -> GradientsParams {
        let values: Vec<f32> = (0..30u64)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let data = TensorData::new(values, [5, 6]).convert::<B::FloatElem>();
        let x = Tensor::<B, 2>::from_data(data, &Default::default());
        GradientsParams::from_grads(layer.forward(x).powi_scalar(2).sum().backward(), layer)
    }

    /// `layer` with its lazily initialised parameters drawn, so that clones share them.
    fn initialised<B: Backend>(layer: Linear<B>) -> Linear<B> {
        let _ = layer.weight.val();
        let _ = layer.bias.as_ref().map(|b| b.val());
        layer
    }

    fn config() -> FusedAdamWConfig {
        FusedAdamWConfig::new()
            .with_beta_1(0.8)
            .with_beta_2(0.95)
            .with_epsilon(1e-6)
            .with_weight_decay(0.1)
    }

    fn burn_adamw() -> AdamWConfig {
        let c = config();
        AdamWConfig::new()
            .with_beta_1(c.beta_1)
            .with_beta_2(c.beta_2)
            .with_epsilon(c.epsilon)
            .with_weight_decay(c.weight_decay)
    }

    #[test]
    fn without_a_kernel_it_is_burns_adamw_and_shares_its_checkpoints() {
        type B = Unregistered;
        let device = Default::default();
        let start = initialised(LinearConfig::new(6, 3).init::<B>(&device));
        let (mut ours, mut theirs) = (config().init::<B, Linear<B>>(), burn_adamw().init());
        let (mut a, mut b) = (start.clone(), start);
        for seed in 0..3 {
            let lr = 1e-2 / (seed + 1) as f64;
            a = ours.step(lr, a.clone(), step_grads(&a, seed));
            b = theirs.step(lr, b.clone(), step_grads(&b, seed));
        }
        a.weight
            .val()
            .into_data()
            .assert_eq(&b.weight.val().into_data(), true);
        // burn's optimizer state loads into ours and continues as it does in burn's.
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = Recorder::<B>::record(&recorder, theirs.to_record(), ()).expect("record");
        let mut ours = config()
            .init::<B, Linear<B>>()
            .load_record(Recorder::<B>::load(&recorder, bytes.clone(), &device).expect("loads"));
        let mut theirs = burn_adamw()
            .init::<B, Linear<B>>()
            .load_record(Recorder::<B>::load(&recorder, bytes, &device).expect("loads"));
        let a = ours.step(1e-3, b.clone(), step_grads(&b, 9));
        let b = theirs.step(1e-3, b.clone(), step_grads(&b, 9));
        a.weight
            .val()
            .into_data()
            .assert_eq(&b.weight.val().into_data(), true);
    }

    static KERNEL_CALLS: AtomicUsize = AtomicUsize::new(0);

    /// A "kernel" for [`Registered`]'s inner backend: the update of [`AdamWStep`] written
    /// out element by element in f64 on the host.
    fn host_kernel(step: AdamWStep<Host>) -> Outcome<fused::AdamWUpdate<Host>, AdamWStep<Host>> {
        KERNEL_CALLS.fetch_add(1, Ordering::Relaxed);
        let device = step.param.device();
        let values = |t: &Tensor<Host, 1>| t.to_data().convert::<f64>().to_vec().expect("f64");
        let (p, g) = (values(&step.param), values(&step.grad));
        let (m0, v0) = match &step.moments {
            Some((m, v)) => (values(m), values(v)),
            None => (vec![0.0; p.len()], vec![0.0; p.len()]),
        };
        let (b1, b2) = (step.beta_1 as f64, step.beta_2 as f64);
        let t = step.time as i32;
        let (mut out, mut m, mut v) = (vec![0.0; p.len()], m0, v0);
        for i in 0..p.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let update = (m[i] / (1.0 - b1.powi(t)))
                / ((v[i] / (1.0 - b2.powi(t))).sqrt() + step.epsilon as f64);
            out[i] = p[i] * (1.0 - step.lr * step.weight_decay as f64) - step.lr * update;
        }
        let dtype = step.param.dtype();
        let tensor = |x: Vec<f64>| {
            Tensor::<Host, 1>::from_data(TensorData::from(x.as_slice()), &device).cast(dtype)
        };
        Outcome::Computed((tensor(out), tensor(m), tensor(v)))
    }

    #[test]
    fn a_registered_kernel_runs_every_step_and_agrees_with_burns_adamw() {
        type B = Registered;
        let device = Default::default();
        fused::register::<Host>(FusedKernels {
            adamw: host_kernel,
            ..FusedKernels::declining()
        });
        let start = initialised(LinearConfig::new(6, 3).init::<B>(&device));
        // The tolerance below is for f64 parameters.
        assert_eq!(start.weight.val().dtype(), burn::tensor::DType::F64);
        let (mut ours, mut theirs) = (config().init::<B, Linear<B>>(), burn_adamw().init());
        let (mut a, mut b) = (start.clone(), start);
        for seed in 0..4 {
            let lr = 1e-2 / (seed + 1) as f64;
            a = ours.step(lr, a.clone(), step_grads(&a, seed));
            b = theirs.step(lr, b.clone(), step_grads(&b, seed));
        }
        fused::unregister::<Host>();
        // Every update of both parameters (weight, bias) went through the kernel.
        assert_eq!(KERNEL_CALLS.load(Ordering::Relaxed), 4 * 2);
        // Both compute in f64 except burn's bias corrections `1 − βᵗ`, taken in f32: a
        // relative error ≤ 2·2⁻²⁴ in each changes an update of size ≤ lr ≤ 1e-2 by
        // ≤ 1.5·2⁻²³·lr ≈ 1.8e-9, over 4 updates ≤ 7.2e-9.
        let tolerance = Tolerance::absolute(1e-8);
        a.weight
            .val()
            .into_data()
            .assert_approx_eq::<f64>(&b.weight.val().into_data(), tolerance);
        a.bias
            .expect("bias")
            .val()
            .into_data()
            .assert_approx_eq::<f64>(&b.bias.expect("bias").val().into_data(), tolerance);
        // The kernel's state is burn's: its record is the one burn's optimizer writes.
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = Recorder::<B>::record(&recorder, ours.to_record(), ()).expect("record");
        let record = Recorder::<B>::load(&recorder, bytes, &device).expect("loads into burn's");
        let _ = burn_adamw().init::<B, Linear<B>>().load_record(record);
    }
}
