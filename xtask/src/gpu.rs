//! The CUDA backends the GPU commands choose between (`--matmul`).

/// Which kernels multiply matrices on the CUDA backend (bf16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Matmul {
    /// cuBLAS for every float product (`experiments::cublas::CublasCuda`), forward and
    /// backward, and the fused RMSNorm, causal-softmax, SwiGLU and cross-entropy kernels
    /// (`register_fused`).
    #[default]
    Cublas,
    /// cuBLAS products with burn's compositions for RMSNorm, the causal softmax, SwiGLU and the
    /// loss: what the fused kernels gain.
    CublasComposed,
    /// burn-cuda's own cubecl kernels (`burn::backend::Cuda<bf16, i32>`).
    Cubecl,
}

impl Matmul {
    /// How reports name the backend.
    pub fn label(self) -> &'static str {
        match self {
            Matmul::Cublas => "cuda bf16, cuBLAS matmuls, fused kernels",
            Matmul::CublasComposed => "cuda bf16, cuBLAS matmuls, burn's composed element-wise ops",
            Matmul::Cubecl => "cuda bf16, cubecl matmuls",
        }
    }
}

/// Runs `$body` with `$B` the autodiff CUDA backend that `$matmul` names; for cuBLAS, first
/// checks that libcublas loads (an error, not a panic in the first product) and registers the
/// fused kernels or removes them.
#[cfg(feature = "cuda")]
macro_rules! with_cuda_backend {
    ($matmul:expr, |$b:ident| $body:expr) => {{
        match $matmul {
            $crate::gpu::Matmul::Cublas | $crate::gpu::Matmul::CublasComposed => {
                experiments::cublas::init(&Default::default()).map_err(|e| e.to_string())?;
                if $matmul == $crate::gpu::Matmul::Cublas {
                    experiments::cublas::register_fused();
                } else {
                    experiments::cublas::unregister_fused();
                }
                type $b = burn::backend::Autodiff<experiments::cublas::CublasCuda>;
                $body
            }
            $crate::gpu::Matmul::Cubecl => {
                type $b = burn::backend::Autodiff<burn::backend::Cuda<half::bf16, i32>>;
                $body
            }
        }
    }};
}
#[cfg(feature = "cuda")]
pub(crate) use with_cuda_backend;
