//! The backend itself (see the module documentation of `cublas`).

use burn_backend::bf16;
use burn_backend::ops::{TransactionOps, TransactionPrimitive, TransactionPrimitiveData};
use burn_backend::tensor::FloatTensor;
use burn_backend::{
    Backend, BackendTypes, DType, DTypeUsageSet, ExecutionError, TensorData, TensorPrimitive,
};
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaContext, DriverError};

use super::plan::{MatrixLayout, matrix_layout, plan_batch};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The backend whose operations [`CublasCuda`] forwards: burn-cuda's, bf16 floats.
pub type Inner = CubeBackend<CudaRuntime, bf16, i32, u8>;

/// burn-cuda's backend (bf16 floats, i32 ints) with cuBLAS matrix products; see the module
/// documentation. Train with `Autodiff<CublasCuda>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CublasCuda;

/// Why the cuBLAS path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CublasError {
    /// libcublas is not on the library path.
    #[error(
        "libcublas could not be loaded ({0}); add the directory holding libcublas.so to LD_LIBRARY_PATH"
    )]
    Library(String),
    /// The CUDA driver failed (no device, wrong ordinal, …).
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

/// How many products each path computed since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MatmulCounts {
    /// Products computed by cuBLAS (one per `float_matmul`, however many calls it took).
    pub cublas: u64,
    /// Products left to burn's kernel (unsupported dtype, layout or shape).
    pub fallback: u64,
}

static CUBLAS_PRODUCTS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// Products per path so far, process-wide.
pub fn counts() -> MatmulCounts {
    MatmulCounts {
        cublas: CUBLAS_PRODUCTS.load(Ordering::Relaxed),
        fallback: FALLBACK_PRODUCTS.load(Ordering::Relaxed),
    }
}

/// Loads libcublas and creates this thread's cuBLAS handle on `device`: call it once before
/// training so that a missing library is an error, not a panic in the first product.
pub fn init(device: &CudaDevice) -> Result<(), CublasError> {
    std::panic::catch_unwind(|| unsafe {
        blas::culib();
    })
    .map_err(|e| {
        CublasError::Library(
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown loader error".into()),
        )
    })?;
    with_blas(device.index, |_| Ok(()))
}

/// One thread's cuBLAS handle on one device, and the stream it was last bound to.
struct Blas {
    ordinal: usize,
    context: Arc<CudaContext>,
    handle: blas::cublasHandle_t,
    stream: Cell<cudarc::driver::sys::CUstream>,
}

thread_local! {
    static BLAS: RefCell<Vec<Blas>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's cuBLAS handle for device `ordinal` (created on first use; the
/// device's primary context, which cubecl also uses, is made current).
fn with_blas<T>(
    ordinal: usize,
    f: impl FnOnce(&Blas) -> Result<T, CublasError>,
) -> Result<T, CublasError> {
    BLAS.with(|cell| {
        let mut states = cell.borrow_mut();
        if let Some(state) = states.iter().find(|s| s.ordinal == ordinal) {
            state.context.bind_to_thread()?;
            return f(state);
        }
        let context = CudaContext::new(ordinal)?;
        let handle = cudarc::cublas::result::create_handle()?;
        states.push(Blas {
            ordinal,
            context,
            handle,
            stream: Cell::new(std::ptr::null_mut()),
        });
        f(states.last().expect("just pushed"))
    })
}

impl Blas {
    /// Binds the handle to `stream` (cubecl's stream of this thread) if it is not already.
    fn bind(&self, stream: cudarc::driver::sys::CUstream) -> Result<(), CublasError> {
        if self.stream.get() != stream {
            // SAFETY: the handle is live and the stream belongs to the current context.
            unsafe {
                cudarc::cublas::result::set_stream(self.handle, stream as blas::cudaStream_t)?
            };
            self.stream.set(stream);
        }
        Ok(())
    }
}

/// cuBLAS element and compute types for a float dtype, or `None` (burn's kernel then).
fn blas_types(dtype: DType) -> Option<(blas::cudaDataType, blas::cublasComputeType_t)> {
    use blas::cublasComputeType_t::*;
    use blas::cudaDataType::*;
    match dtype {
        DType::BF16 => Some((CUDA_R_16BF, CUBLAS_COMPUTE_32F)),
        DType::F16 => Some((CUDA_R_16F, CUBLAS_COMPUTE_32F)),
        // burn-cuda's own f32 matmul uses TF32 tensor cores; match its numerics.
        DType::F32 => Some((CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32)),
        _ => None,
    }
}

/// What [`cublas_matmul`] did with a product. (It lives for one call and is matched at once:
/// boxing the declined pair would add an allocation per product for nothing.)
#[allow(clippy::large_enum_variant)]
enum Product {
    /// cuBLAS computed it.
    Computed(CubeTensor<CudaRuntime>),
    /// cuBLAS cannot take these operands; they are handed back for burn's kernel.
    Declined(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>),
}

/// `lhs · rhs` through cuBLAS, or the operands back when cuBLAS cannot take them.
fn cublas_matmul(lhs: CubeTensor<CudaRuntime>, rhs: CubeTensor<CudaRuntime>) -> Product {
    let rank = lhs.meta.shape().len();
    let supported = lhs.dtype == rhs.dtype
        && blas_types(lhs.dtype).is_some()
        && lhs.qparams.is_none()
        && rhs.qparams.is_none()
        && rank >= 2
        && rhs.meta.shape().len() == rank
        && lhs.device == rhs.device;
    if !supported {
        return Product::Declined(lhs, rhs);
    }
    let (m, k) = (lhs.meta.shape()[rank - 2], lhs.meta.shape()[rank - 1]);
    let (k2, n) = (rhs.meta.shape()[rank - 2], rhs.meta.shape()[rank - 1]);
    let fits = |x: usize| x > 0 && x <= i32::MAX as usize;
    if k != k2 || !fits(m) || !fits(n) || !fits(k) {
        return Product::Declined(lhs, rhs);
    }
    // Operands whose matrices are neither row- nor column-major are copied first.
    let arrange = |t: CubeTensor<CudaRuntime>, rows: usize, cols: usize| {
        let layout_of = |t: &CubeTensor<CudaRuntime>| {
            let s = t.meta.strides();
            matrix_layout(rows, cols, s[rank - 2], s[rank - 1])
        };
        match layout_of(&t) {
            Some(layout) => (t, layout),
            None => {
                let t = burn_cubecl::kernel::into_contiguous(t);
                let layout = layout_of(&t).expect("a contiguous matrix is row-major");
                (t, layout)
            }
        }
    };
    let (lhs, la) = arrange(lhs, m, k);
    let (rhs, lb) = arrange(rhs, k, n);
    if !fits(la.leading) || !fits(lb.leading) {
        return Product::Declined(lhs, rhs);
    }
    let batch = rank - 2;
    let Some((mut out_shape, plan)) = plan_batch(
        (&lhs.meta.shape()[..batch], &lhs.meta.strides()[..batch]),
        (&rhs.meta.shape()[..batch], &rhs.meta.strides()[..batch]),
        m * n,
    ) else {
        return Product::Declined(lhs, rhs);
    };
    if out_shape.contains(&0) || plan.inner[0] > i32::MAX as usize {
        return Product::Declined(lhs, rhs);
    }
    out_shape.extend([m, n]);
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype::<CudaRuntime>(
        lhs.client.clone(),
        lhs.device.clone(),
        out_shape.into(),
        lhs.dtype,
    );
    let (element, compute) = blas_types(lhs.dtype).expect("checked above");
    let bytes = lhs.dtype.size();
    let resource = |t: &CubeTensor<CudaRuntime>| {
        t.client
            .get_resource(t.handle.clone())
            .expect("a live tensor's buffer resolves")
    };
    // Resolving a buffer goes through cubecl's device queue, after every launch queued before
    // it; the guards keep the bindings alive while the product is enqueued.
    let (ga, gb, gc) = (resource(&lhs), resource(&rhs), resource(&out));
    let (pa, pb, pc) = (ga.resource().ptr, gb.resource().ptr, gc.resource().ptr);
    // cubecl's stream for this thread (third_party/cubecl-cuda exposes it): enqueued there,
    // the product runs after the kernels that wrote its operands and before those that read
    // its output, with no host synchronisation.
    let stream = gc.resource().stream;
    if stream.is_null() {
        // Not cubecl-cuda with the stream exposed: cuBLAS could not be ordered with burn.
        drop((ga, gb, gc));
        return Product::Declined(lhs, rhs);
    }
    let op = |l: MatrixLayout| {
        if l.column_major {
            blas::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas::cublasOperation_t::CUBLAS_OP_N
        }
    };
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS gets (B, A) and (n, m).
    let result = with_blas(lhs.device.index, |state| {
        state.bind(stream)?;
        let (one, zero) = (1f32, 0f32);
        let outer_count: usize = plan.outer.iter().map(|a| a[0]).product();
        for index in 0..outer_count {
            let (mut oa, mut ob, mut oc, mut rest) = (0, 0, 0, index);
            for axis in plan.outer.iter().rev() {
                let i = rest % axis[0];
                rest /= axis[0];
                oa += i * axis[1];
                ob += i * axis[2];
                oc += i * axis[3];
            }
            // SAFETY: the pointers are the live buffers of `lhs`, `rhs` and `out` (guards
            // held), every offset and stride stays inside them by construction of the plan,
            // and the handle's stream belongs to the current (primary) context.
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    state.handle,
                    op(lb),
                    op(la),
                    n as i32,
                    m as i32,
                    k as i32,
                    (&one as *const f32).cast(),
                    (pb + (ob * bytes) as u64) as *const std::ffi::c_void,
                    element,
                    lb.leading as i32,
                    plan.inner[2] as i64,
                    (pa + (oa * bytes) as u64) as *const std::ffi::c_void,
                    element,
                    la.leading as i32,
                    plan.inner[1] as i64,
                    (&zero as *const f32).cast(),
                    (pc + (oc * bytes) as u64) as *mut std::ffi::c_void,
                    element,
                    n as i32,
                    plan.inner[3] as i64,
                    plan.inner[0] as i32,
                    compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("cuBLAS matmul {m}×{k}·{k}×{n} failed: {e}");
    }
    drop((ga, gb, gc));
    Product::Computed(out)
}

impl BackendTypes for CublasCuda {
    type Device = <Inner as BackendTypes>::Device;
    type FloatElem = <Inner as BackendTypes>::FloatElem;
    type IntElem = <Inner as BackendTypes>::IntElem;
    type BoolElem = <Inner as BackendTypes>::BoolElem;
    type FloatTensorPrimitive = <Inner as BackendTypes>::FloatTensorPrimitive;
    type IntTensorPrimitive = <Inner as BackendTypes>::IntTensorPrimitive;
    type BoolTensorPrimitive = <Inner as BackendTypes>::BoolTensorPrimitive;
    type QuantizedTensorPrimitive = <Inner as BackendTypes>::QuantizedTensorPrimitive;
}

impl Backend for CublasCuda {
    fn ad_enabled(device: &Self::Device) -> bool {
        Inner::ad_enabled(device)
    }

    fn memory_persistent_allocations<
        Output: Send,
        Input: Send,
        Func: Fn(Input) -> Output + Send,
    >(
        device: &Self::Device,
        input: Input,
        func: Func,
    ) -> Output {
        Inner::memory_persistent_allocations(device, input, func)
    }

    fn memory_cleanup(device: &Self::Device) {
        Inner::memory_cleanup(device)
    }

    fn name(device: &Self::Device) -> String {
        format!("cublas+{}", Inner::name(device))
    }

    fn seed(device: &Self::Device, seed: u64) {
        Inner::seed(device, seed)
    }

    fn sync(device: &Self::Device) -> Result<(), ExecutionError> {
        Inner::sync(device)
    }

    fn staging<'a, Iter>(data: Iter, device: &Self::Device)
    where
        Iter: Iterator<Item = &'a mut TensorData>,
    {
        Inner::staging(data, device)
    }

    fn supports_dtype(device: &Self::Device, dtype: DType) -> bool {
        Inner::supports_dtype(device, dtype)
    }

    fn dtype_usage(device: &Self::Device, dtype: DType) -> DTypeUsageSet {
        Inner::dtype_usage(device, dtype)
    }

    fn device_count(type_id: u16) -> usize {
        Inner::device_count(type_id)
    }
}

impl TransactionOps<Self> for CublasCuda {
    fn tr_execute(
        transaction: TransactionPrimitive<Self>,
    ) -> impl Future<Output = Result<TransactionPrimitiveData, ExecutionError>> + Send {
        Inner::tr_execute(TransactionPrimitive::<Inner>::new(
            transaction.read_floats,
            transaction.read_qfloats,
            transaction.read_ints,
            transaction.read_bools,
        ))
    }
}

/// The same primitive, seen from the inner backend (the types are equal; the enum is not).
pub(super) fn to_inner(t: TensorPrimitive<CublasCuda>) -> TensorPrimitive<Inner> {
    match t {
        TensorPrimitive::Float(t) => TensorPrimitive::Float(t),
        TensorPrimitive::QFloat(t) => TensorPrimitive::QFloat(t),
    }
}

pub(super) fn from_inner(t: TensorPrimitive<Inner>) -> TensorPrimitive<CublasCuda> {
    match t {
        TensorPrimitive::Float(t) => TensorPrimitive::Float(t),
        TensorPrimitive::QFloat(t) => TensorPrimitive::QFloat(t),
    }
}

/// The override: `lhs · rhs` (`[..., m, k]·[..., k, n] → [..., m, n]`, batch axes broadcast)
/// through cuBLAS where it can, burn's kernel otherwise.
pub(super) fn matmul(
    lhs: FloatTensor<CublasCuda>,
    rhs: FloatTensor<CublasCuda>,
) -> FloatTensor<CublasCuda> {
    match cublas_matmul(lhs, rhs) {
        Product::Computed(out) => {
            CUBLAS_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            out
        }
        Product::Declined(lhs, rhs) => {
            FALLBACK_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            <Inner as burn_backend::ops::FloatTensorOps<Inner>>::float_matmul(lhs, rhs)
        }
    }
}

/// The weight gradient of `nn::Linear`, `xᵀ · dy` summed over every leading axis: `x`
/// `[…, d_in]`, `dy` `[…, d_out]` → `[d_in, d_out]`, as one product of the flattened
/// `[N, d_in]ᵀ · [N, d_out]` (`N` all the rows), accumulated in f32 and rounded once. burn's
/// default multiplies batch by batch (`[b, d_in, d_out]`, written out in bf16) and then adds
/// the batch up with `sum_dim`: `b` times the output traffic and a rounding per batch.
pub(super) fn linear_weight_backward(
    x: FloatTensor<CublasCuda>,
    output_grad: FloatTensor<CublasCuda>,
) -> FloatTensor<CublasCuda> {
    use burn_backend::ops::FloatTensorOps;
    let last = |s: &burn_backend::Shape| s[s.num_dims() - 1];
    let (d_in, d_out) = (last(x.meta.shape()), last(output_grad.meta.shape()));
    let rows = x.meta.shape().num_elements() / d_in.max(1);
    let x = CublasCuda::float_reshape(x, burn_backend::Shape::new([rows, d_in]));
    let dy = CublasCuda::float_reshape(output_grad, burn_backend::Shape::new([rows, d_out]));
    CublasCuda::float_matmul(CublasCuda::float_swap_dims(x, 0, 1), dy)
}
