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

use super::plan::{
    MatrixLayout, broadcast_batch, matrix_layout, plan_batch, row_major_leading, row_major_strides,
    strides_in_order_of, view_strides,
};
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

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
    /// Of the cuBLAS products, those made as one `cublasGemmBatchedEx` over pointer tables
    /// (batch axes that share no stride, as over split heads) instead of a loop of calls.
    pub pointer_tables: u64,
}

static CUBLAS_PRODUCTS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_PRODUCTS: AtomicU64 = AtomicU64::new(0);
static TABLE_PRODUCTS: AtomicU64 = AtomicU64::new(0);

/// Products per path so far, process-wide.
pub fn counts() -> MatmulCounts {
    MatmulCounts {
        cublas: CUBLAS_PRODUCTS.load(Ordering::Relaxed),
        fallback: FALLBACK_PRODUCTS.load(Ordering::Relaxed),
        pointer_tables: TABLE_PRODUCTS.load(Ordering::Relaxed),
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

/// One thread's cuBLAS handle on one device, the stream it was last bound to, and the pinned
/// staging of pointer tables (made on first use).
struct Blas {
    ordinal: usize,
    context: Arc<CudaContext>,
    handle: blas::cublasHandle_t,
    stream: Cell<cudarc::driver::sys::CUstream>,
    tables: RefCell<Option<PointerStaging>>,
}

/// Pinned host memory for the pointer tables of `cublasGemmBatchedEx`, which reads them from
/// device memory: [`STAGING_SLOTS`] slots of [`STAGING_SLOT_POINTERS`] pointers used in turn,
/// each copied to the device on the stream (pinned, so the copy is asynchronous: from pageable
/// memory the driver may wait for the stream) and reused only once the event recorded after
/// its copy has passed — in practice long since, `STAGING_SLOTS − 1` products later.
struct PointerStaging {
    host: *mut u64,
    events: Vec<Option<cudarc::driver::sys::CUevent>>,
    next: usize,
}

/// Slots of [`PointerStaging`].
const STAGING_SLOTS: usize = 64;
/// Pointers per slot: the three tables of one batched product (`3 × 768` for attention's
/// `b·H = 64 × 12` products) fit with room to spare.
const STAGING_SLOT_POINTERS: usize = 3 * 2048;

impl PointerStaging {
    fn new() -> Result<Self, CublasError> {
        // SAFETY: a plain pinned allocation, freed in `drop`.
        let host = unsafe {
            cudarc::driver::result::malloc_host(STAGING_SLOTS * STAGING_SLOT_POINTERS * 8, 0)?
        };
        Ok(Self {
            host: host.cast(),
            events: vec![None; STAGING_SLOTS],
            next: 0,
        })
    }

    /// Copies `pointers` to the device buffer `device` on `stream`, in stream order.
    ///
    /// # Safety
    /// `device` must hold at least `pointers.len()` u64 and stay live until the copy has run
    /// (a buffer whose release is ordered on `stream`); `stream` must belong to the current
    /// context.
    unsafe fn upload(
        &mut self,
        pointers: &[u64],
        device: u64,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), CublasError> {
        assert!(
            pointers.len() <= STAGING_SLOT_POINTERS,
            "pointer table too long"
        );
        let slot = self.next;
        self.next = (slot + 1) % STAGING_SLOTS;
        let event = match self.events[slot] {
            // SAFETY: the event is live; waiting for it makes the slot free to overwrite.
            Some(event) => {
                unsafe { cudarc::driver::result::event::synchronize(event)? };
                event
            }
            None => {
                let event = cudarc::driver::result::event::create(
                    cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                )?;
                self.events[slot] = Some(event);
                event
            }
        };
        // SAFETY: the slot lies inside the pinned allocation and no copy still reads it.
        let staged = unsafe {
            let start = self.host.add(slot * STAGING_SLOT_POINTERS);
            std::ptr::copy_nonoverlapping(pointers.as_ptr(), start, pointers.len());
            std::slice::from_raw_parts(start, pointers.len())
        };
        // SAFETY: see the function's contract; the staged slot outlives the copy (the event).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(device, staged, stream)?;
            cudarc::driver::result::event::record(event, stream)?;
        }
        Ok(())
    }
}

impl Drop for PointerStaging {
    fn drop(&mut self) {
        // SAFETY: every copy that read the slots is waited for before they are freed.
        unsafe {
            for event in self.events.iter().flatten() {
                let _ = cudarc::driver::result::event::synchronize(*event);
                let _ = cudarc::driver::result::event::destroy(*event);
            }
            let _ = cudarc::driver::result::free_host(self.host.cast());
        }
    }
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
            tables: RefCell::new(None),
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
    /// cuBLAS cannot take these operands (or this output to accumulate into); they are
    /// handed back.
    Declined(
        CubeTensor<CudaRuntime>,
        CubeTensor<CudaRuntime>,
        Option<CubeTensor<CudaRuntime>>,
    ),
}

/// `lhs · rhs` through cuBLAS, or the operands back when cuBLAS cannot take them. With `into`
/// (`acc`, of the product's shape), `acc + lhs·rhs` written over `acc`'s buffer (`β = 1`),
/// which must be a uniquely owned row-major matrix (rank 2, unit column stride).
fn cublas_matmul(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
    into: Option<CubeTensor<CudaRuntime>>,
) -> Product {
    let rank = lhs.meta.shape().len();
    let supported = lhs.dtype == rhs.dtype
        && blas_types(lhs.dtype).is_some()
        && lhs.qparams.is_none()
        && rhs.qparams.is_none()
        && rank >= 2
        && rhs.meta.shape().len() == rank
        && lhs.device == rhs.device;
    if !supported {
        return Product::Declined(lhs, rhs, into);
    }
    let (m, k) = (lhs.meta.shape()[rank - 2], lhs.meta.shape()[rank - 1]);
    let (k2, n) = (rhs.meta.shape()[rank - 2], rhs.meta.shape()[rank - 1]);
    let fits = |x: usize| x > 0 && x <= i32::MAX as usize;
    if k != k2 || !fits(m) || !fits(n) || !fits(k) {
        return Product::Declined(lhs, rhs, into);
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
    // Operands whose rows are not 16-byte aligned (a vocabulary of 32 100 bf16) are copied to
    // an aligned pitch when each element is reused in enough products to pay for the copy.
    let bytes = lhs.dtype.size();
    let (lhs, la) = realigned(lhs, la, n, bytes, m, k);
    let (rhs, lb) = realigned(rhs, lb, m, bytes, k, n);
    if !fits(la.leading) || !fits(lb.leading) {
        return Product::Declined(lhs, rhs, into);
    }
    let batch = rank - 2;
    let Some(out_batch) = broadcast_batch(&lhs.meta.shape()[..batch], &rhs.meta.shape()[..batch])
    else {
        return Product::Declined(lhs, rhs, into);
    };
    let mut out_shape = out_batch;
    out_shape.extend([m, n]);
    if out_shape.contains(&0) {
        return Product::Declined(lhs, rhs, into);
    }
    // An output to accumulate into is written as cuBLAS writes any output: row-major rows
    // (`plan::row_major_leading`, which also gives a single row its own width as the leading
    // dimension, whatever its stride).
    let accumulate = into.is_some();
    let out_strides = match &into {
        Some(acc) => {
            let strides = acc.meta.strides();
            let leading = (rank == 2
                && acc.dtype == lhs.dtype
                && acc.qparams.is_none()
                && acc.device == lhs.device
                && acc.meta.shape().as_slice() == out_shape.as_slice()
                && acc.can_mut())
            .then(|| row_major_leading(m, n, strides[0], strides[1]))
            .flatten();
            match leading {
                Some(leading) => vec![leading, 1],
                None => return Product::Declined(lhs, rhs, into),
            }
        }
        None => Vec::new(),
    };
    // The output follows a permuted right operand's memory order (split heads: merging them
    // back is then a view); otherwise its rows are padded to an aligned pitch (a strided view
    // is returned), so that the products reading it later (the head's gradients) are aligned
    // as well.
    let in_order = (!accumulate && !lb.column_major && (n * bytes) % ROW_ALIGN_BYTES == 0)
        .then(|| strides_in_order_of(rhs.meta.shape(), rhs.meta.strides(), &out_shape))
        .flatten();
    let (out_strides, out_len) = match (accumulate, in_order) {
        (true, _) => (out_strides, 0),
        (false, Some(strides)) => (strides, out_shape.iter().product()),
        (false, None) => pitched_strides(&out_shape, aligned_leading(n, bytes)),
    };
    let out_leading = out_strides[batch];
    let plan = plan_batch(
        (&lhs.meta.shape()[..batch], &lhs.meta.strides()[..batch]),
        (&rhs.meta.shape()[..batch], &rhs.meta.strides()[..batch]),
        (&out_shape[..batch], &out_strides[..batch]),
    );
    if plan.inner[0] > i32::MAX as usize || !fits(out_leading) {
        return Product::Declined(lhs, rhs, into);
    }
    let out = match into {
        Some(acc) => acc,
        None => empty_strided(&lhs, out_shape, out_strides, out_len),
    };
    let (element, compute) = blas_types(lhs.dtype).expect("checked above");
    let gemm = Gemm {
        m,
        n,
        k,
        accumulate,
        lhs: la,
        rhs: lb,
        out_leading,
        plan,
        bytes,
        element,
        compute,
        pieces: Gemm::pieces([m, n, k], la, lb, bytes),
    };
    // A batch the strided call cannot cover in one goes through pointer tables, in a buffer
    // of cubecl's (its release is ordered on the stream like any buffer's).
    let table = gemm.table_len().map(|len| {
        TABLE_PRODUCTS.fetch_add(1, Ordering::Relaxed);
        lhs.client.empty(len * 8)
    });
    // The product is enqueued on cubecl's stream from cubecl's device thread, in order with
    // the kernels submitted before and after it, without waiting for that thread here.
    let mut handles = vec![lhs.handle.clone(), rhs.handle.clone(), out.handle.clone()];
    handles.extend(table);
    let ordinal = lhs.device.index;
    lhs.client.submit_with_resources(handles, move |resources| {
        let result = resources
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("resolving a buffer: {e:?}"))
            .and_then(|guards| {
                let [a, b, c] = [0, 1, 2].map(|i| guards[i].resource());
                // cubecl's stream for this thread (third_party/cubecl-cuda exposes it).
                if c.stream.is_null() {
                    return Err("cubecl-cuda without its stream exposed".to_string());
                }
                with_blas(ordinal, |state| {
                    state.bind(c.stream)?;
                    let mut staging = state.tables.borrow_mut();
                    let table = match guards.get(3) {
                        Some(guard) => {
                            if staging.is_none() {
                                *staging = Some(PointerStaging::new()?);
                            }
                            let staging = staging.as_mut().expect("just made");
                            Some((guard.resource().ptr, staging, c.stream))
                        }
                        None => None,
                    };
                    // SAFETY: the pointers are the live buffers of the operands, the output
                    // and the table (their guards are held until the calls are enqueued), and
                    // `gemm` stays inside them by construction of the layouts and the plan.
                    unsafe { gemm.enqueue(state.handle, [a.ptr, b.ptr, c.ptr], table) }
                })
                .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            record_failure(format!("cuBLAS matmul {m}×{k}·{k}×{n}: {e}"));
        }
    });
    Product::Computed(out)
}

/// The first failure of a product enqueued on the device thread, reported by the next product
/// on the caller's thread (a failed product leaves its output unwritten).
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

fn record_failure(message: String) {
    FAILURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert(message);
}

/// One planned product `C = A·B` (`[m, k]·[k, n]`, row-major `C` with rows `out_leading`
/// apart), its batch plan and cuBLAS types: plain data, sent to the device thread.
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    /// `C += A·B` (`β = 1`) rather than `C = A·B`.
    accumulate: bool,
    lhs: MatrixLayout,
    rhs: MatrixLayout,
    out_leading: usize,
    plan: super::plan::BatchPlan,
    bytes: usize,
    element: blas::cudaDataType,
    compute: blas::cublasComputeType_t,
    /// The pieces of `m`, `n` and `k`, from [`Gemm::pieces`].
    pieces: [Vec<(usize, usize)>; 3],
}

// SAFETY: the cuBLAS enums are plain integers.
unsafe impl Send for Gemm {}

impl Gemm {
    /// The pieces `(start, extent)` of `m`, `n` and `k`: each of them that is the unit-stride
    /// axis of an operand or of `C` and not a multiple of the 16-byte vector (8 bf16) is cut
    /// into a multiple of it and a remainder of fewer than 8 (see [`Gemm::enqueue`]); `k`'s
    /// remainder comes first. `bytes` is the element size.
    fn pieces(
        [m, n, k]: [usize; 3],
        la: MatrixLayout,
        lb: MatrixLayout,
        bytes: usize,
    ) -> [Vec<(usize, usize)>; 3] {
        let vector = (ROW_ALIGN_BYTES / bytes).max(1);
        let cut = |extent: usize, unit_stride: bool| -> Vec<(usize, usize)> {
            let bulk = extent / vector * vector;
            if !unit_stride || bulk == extent || bulk == 0 {
                vec![(0, extent)]
            } else {
                vec![(0, bulk), (bulk, extent - bulk)]
            }
        };
        let mut ks = cut(k, !la.column_major || lb.column_major);
        ks.reverse();
        [cut(m, la.column_major), cut(n, true), ks]
    }

    /// The length of the pointer tables (`B`, `A`, `C`: one entry each per matrix of the
    /// batch) when the product is one `cublasGemmBatchedEx` instead of a host loop of
    /// strided-batched calls: the batch has axes the strided batch cannot merge (attention's
    /// `[b, H]` over split heads: 12 calls of 64), the product is one piece, and the tables fit
    /// a staging slot. `None`: the loop.
    fn table_len(&self) -> Option<usize> {
        let count = self.plan.outer.iter().map(|a| a[0]).product::<usize>() * self.plan.inner[0];
        let one_piece = self.pieces.iter().all(|p| p.len() == 1);
        (!self.plan.outer.is_empty() && one_piece && 3 * count <= STAGING_SLOT_POINTERS)
            .then_some(3 * count)
    }

    /// Enqueues the product on `handle`'s stream: one `cublasGemmBatchedEx` over pointer
    /// tables uploaded into `table` (device memory of [`Gemm::table_len`] pointers) through
    /// `staging` when given, else a host loop of `cublasGemmStridedBatchedEx` calls over the
    /// outer batch axes and the pieces of [`Gemm::pieces`]. cuBLAS runs the bulk of a cut axis
    /// on its 8-wide kernels (its `align2` kernels, for the vocabulary's 32 100 columns, ran
    /// the output head at a third of the rate) and the remainder as a thin product. A cut
    /// along `k` computes the remainder's terms first and adds the bulk to them (`β = 1`):
    /// besides the one rounding of the result, their partial sum is rounded once to the
    /// output's precision, an error of at most `u·Σ_{p ∈ remainder} |a_ip||b_pj|`.
    ///
    /// # Safety
    /// `pointers` (`A`, `B`, `C`) must be live device buffers holding the operands and the
    /// output as `self` describes them, `handle` bound to `stream`, the stream that orders
    /// them, and `table` a live device buffer of `table_len()` u64 ordered on that stream.
    unsafe fn enqueue(
        &self,
        handle: blas::cublasHandle_t,
        pointers: [u64; 3],
        table: Option<(u64, &mut PointerStaging, cudarc::driver::sys::CUstream)>,
    ) -> Result<(), CublasError> {
        let [ms, ns, ks] = &self.pieces;
        let (la, lb) = (self.lhs, self.rhs);
        // Element offsets of (row, col) in each operand's layout.
        let at = |l: MatrixLayout, row: usize, col: usize| {
            if l.column_major {
                col * l.leading + row
            } else {
                row * l.leading + col
            }
        };
        let op = |l: MatrixLayout| {
            if l.column_major {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let address = |base: u64, offset: usize| base + (offset * self.bytes) as u64;
        let one = 1f32;
        // The first (or only) piece along `k` overwrites `C` unless the product accumulates.
        let zero = if self.accumulate { 1f32 } else { 0f32 };
        if let Some((device, staging, stream)) = table {
            // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS's first table is B's.
            let offsets = self.plan.offsets();
            let count = offsets.len();
            let mut tables = Vec::with_capacity(3 * count);
            tables.extend(offsets.iter().map(|o| address(pointers[1], o[1])));
            tables.extend(offsets.iter().map(|o| address(pointers[0], o[0])));
            tables.extend(offsets.iter().map(|o| address(pointers[2], o[2])));
            let entry = |i: usize| (device + (i * count * 8) as u64) as *const *const c_void;
            // SAFETY: see the function's contract; every table entry addresses a matrix of
            // the batch inside its operand.
            unsafe {
                staging.upload(&tables, device, stream)?;
                blas::cublasGemmBatchedEx(
                    handle,
                    op(lb),
                    op(la),
                    self.n as i32,
                    self.m as i32,
                    self.k as i32,
                    (&one as *const f32).cast(),
                    entry(0),
                    self.element,
                    lb.leading as i32,
                    entry(1),
                    self.element,
                    la.leading as i32,
                    (&zero as *const f32).cast(),
                    entry(2).cast(),
                    self.element,
                    self.out_leading as i32,
                    count as i32,
                    self.compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .result()?;
            }
            return Ok(());
        }
        let plan = &self.plan;
        for [oa, ob, oc] in plan.outer_offsets() {
            for &(m0, mm) in ms {
                for &(n0, nn) in ns {
                    for (piece, &(k0, kk)) in ks.iter().enumerate() {
                        let beta = if piece == 0 { zero } else { one };
                        let a = address(pointers[0], oa + at(la, m0, k0));
                        let b = address(pointers[1], ob + at(lb, k0, n0));
                        let c = address(pointers[2], oc + m0 * self.out_leading + n0);
                        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS gets (B, A)
                        // and (n, m).
                        // SAFETY: see the function's contract; every piece lies inside the
                        // product's matrices.
                        unsafe {
                            cudarc::cublas::result::gemm_strided_batched_ex(
                                handle,
                                op(lb),
                                op(la),
                                nn as i32,
                                mm as i32,
                                kk as i32,
                                (&one as *const f32).cast(),
                                b as *const c_void,
                                self.element,
                                lb.leading as i32,
                                plan.inner[2] as i64,
                                a as *const c_void,
                                self.element,
                                la.leading as i32,
                                plan.inner[1] as i64,
                                (&beta as *const f32).cast(),
                                c as *mut c_void,
                                self.element,
                                self.out_leading as i32,
                                plan.inner[3] as i64,
                                plan.inner[0] as i32,
                                self.compute,
                                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The row alignment, in bytes, of cuBLAS's widest (8 × bf16) tensor-core loads. A leading
/// dimension that is not a multiple of it sends cuBLAS to `align2`/`align4` kernels, which
/// ran the output head's products (vocabulary 32 100) at a fraction of the rate.
const ROW_ALIGN_BYTES: usize = 16;

/// How many products each element of a realigned operand must take part in for the copy to
/// pay (a copy reads and writes each element once; a product is ≥ this many multiply-adds).
const REALIGN_MIN_REUSE: usize = 64;

/// The leading dimension for rows of `width` elements of `bytes` each: `width` itself when
/// its rows are aligned, else rounded up to the next aligned pitch.
fn aligned_leading(width: usize, bytes: usize) -> usize {
    if (width * bytes).is_multiple_of(ROW_ALIGN_BYTES) {
        width
    } else {
        (width * bytes).next_multiple_of(ROW_ALIGN_BYTES) / bytes
    }
}

/// The strides of a pitched row-major `shape` (`[…, rows, cols]`) whose rows are `leading`
/// elements apart (`leading ≥ cols`) and whose matrices are `rows · leading` apart, and the
/// number of elements its storage spans.
fn pitched_strides(shape: &[usize], leading: usize) -> (Vec<usize>, usize) {
    let rank = shape.len();
    let mut strides = row_major_strides(&shape[..rank - 1], leading);
    strides.push(1);
    let len = leading * shape[..rank - 1].iter().product::<usize>();
    (strides, len)
}

/// An uninitialised tensor of `shape` (`[…, rows, cols]`) whose rows are `leading` elements
/// apart (`leading ≥ cols`) and whose matrices are `rows · leading` apart: a pitched
/// row-major layout, which burn's kernels read like any strided view.
pub(super) fn empty_pitched(
    like: &CubeTensor<CudaRuntime>,
    shape: Vec<usize>,
    leading: usize,
) -> CubeTensor<CudaRuntime> {
    let (strides, len) = pitched_strides(&shape, leading);
    empty_strided(like, shape, strides, len)
}

/// An uninitialised tensor of `shape` with the given `strides` over a fresh buffer of `len`
/// elements (the strides address nothing beyond it: a pitched or permuted dense layout).
fn empty_strided(
    like: &CubeTensor<CudaRuntime>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    len: usize,
) -> CubeTensor<CudaRuntime> {
    let mut out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype::<CudaRuntime>(
        like.client.clone(),
        like.device.clone(),
        burn_backend::Shape::new([len]),
        like.dtype,
    );
    *out.meta = cubecl::zspace::metadata::Metadata::new(burn_backend::Shape::from(shape), strides);
    out
}

/// `t` (whose matrix has cuBLAS layout `layout`, `rows × cols` as read by the product, and
/// whose elements each take part in `reuse` multiply-adds) with an aligned leading dimension:
/// unchanged when it already has one or when a copy would not pay, else copied in its own
/// orientation (a column-major matrix stays column-major: the copy reads and writes rows of
/// its transpose, coalesced both ways) onto an aligned pitch.
fn realigned(
    t: CubeTensor<CudaRuntime>,
    layout: MatrixLayout,
    reuse: usize,
    bytes: usize,
    rows: usize,
    cols: usize,
) -> (CubeTensor<CudaRuntime>, MatrixLayout) {
    let vectors = if layout.column_major { cols } else { rows };
    if (layout.leading * bytes).is_multiple_of(ROW_ALIGN_BYTES)
        || vectors < 2
        || reuse < REALIGN_MIN_REUSE
    {
        return (t, layout);
    }
    use burn_backend::ops::FloatTensorOps;
    let rank = t.meta.shape().len();
    // The stored orientation: rows of the matrix, or rows of its transpose.
    let stored = if layout.column_major {
        Inner::float_swap_dims(t, rank - 2, rank - 1)
    } else {
        t
    };
    let width = stored.meta.shape()[rank - 1];
    let leading = aligned_leading(width, bytes);
    let copy = empty_pitched(&stored, stored.meta.shape().to_vec(), leading);
    cubecl::std::tensor::copy_into(
        &stored.client,
        stored.clone().binding(),
        copy.clone().binding(),
        stored.dtype.into(),
    );
    let out = if layout.column_major {
        Inner::float_swap_dims(copy, rank - 2, rank - 1)
    } else {
        copy
    };
    let layout = MatrixLayout {
        column_major: layout.column_major,
        leading,
    };
    (out, layout)
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
    report_failure();
    match cublas_matmul(lhs, rhs, None) {
        Product::Computed(out) => {
            CUBLAS_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            out
        }
        Product::Declined(lhs, rhs, _) => {
            FALLBACK_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            <Inner as burn_backend::ops::FloatTensorOps<Inner>>::float_matmul(lhs, rhs)
        }
    }
}

/// `acc + lhs·rhs` for `lhs` `[m, k]`, `rhs` `[k, n]` and `acc` `[m, n]`, written over
/// `acc`'s buffer by one cuBLAS product with `β = 1` (the sum formed in the product's f32
/// accumulator, rounded once), where an addition after the product would read both and
/// write the sum in a pass of its own. `Err` hands the three back when cuBLAS cannot take the
/// operands or `acc` is not a uniquely owned row-major matrix of the product's shape and
/// dtype. (The operands handed back are matched at once by the caller: boxing them would add
/// an allocation per product for nothing.)
#[allow(clippy::result_large_err)]
pub(super) fn matmul_accumulate(
    lhs: FloatTensor<CublasCuda>,
    rhs: FloatTensor<CublasCuda>,
    acc: FloatTensor<CublasCuda>,
) -> Result<FloatTensor<CublasCuda>, [FloatTensor<CublasCuda>; 3]> {
    report_failure();
    match cublas_matmul(lhs, rhs, Some(acc)) {
        Product::Computed(out) => {
            CUBLAS_PRODUCTS.fetch_add(1, Ordering::Relaxed);
            Ok(out)
        }
        Product::Declined(lhs, rhs, acc) => Err([lhs, rhs, acc.expect("handed back")]),
    }
}

/// Panics with the first failure of a product enqueued earlier on the device thread (its
/// output is garbage).
fn report_failure() {
    if let Some(failure) = FAILURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        panic!("{failure}");
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

/// Bytes a view's start must be aligned to: the widest vector any kernel loads (16 bytes:
/// eight bf16, four f32), so that a view reads as its parent does.
const VIEW_ALIGNMENT: u64 = 16;

/// `slice` as a view whenever every step is 1, the last axis keeps unit stride and two
/// entries or more, and the view's first element lies on a 16-byte boundary
/// ([`VIEW_ALIGNMENT`]); else burn's slice. burn views a slice only when its first
/// and last bytes lie on the allocator's 512-byte alignment, and copies every other: MLA's
/// latent `kv[:, :, ..r]` (its last byte inside a row) was a 25 µs copy per layer, the
/// decoupled rotary key `kv[:, :, r..]` another (docs/performance.md).
pub(super) fn slice(
    tensor: FloatTensor<CublasCuda>,
    slices: &[burn_backend::Slice],
) -> FloatTensor<CublasCuda> {
    let shape = tensor.meta.shape().clone();
    let strides = tensor.meta.strides().to_vec();
    let ranges: Vec<_> = slices
        .iter()
        .enumerate()
        .map(|(i, s)| s.to_range(shape[i]))
        .collect();
    let unit_steps = slices.iter().all(|s| s.step == 1);
    let elem = tensor.dtype.size() as u64;
    let start: u64 = ranges
        .iter()
        .zip(&strides)
        .map(|(r, &st)| (r.start * st) as u64)
        .sum();
    let non_empty = ranges.iter().all(|r| r.end > r.start);
    // A last axis cut to one entry would leave the view no unit stride once reshaped away
    // (`view_strides`), a layout burn's matmul rejects: burn's slice (a copy) keeps those.
    let unit_last = strides.last() == Some(&1) && ranges.last().is_some_and(|r| r.len() > 1);
    if tensor.qparams.is_some()
        || !unit_steps
        || !non_empty
        || !unit_last
        || !(start * elem).is_multiple_of(VIEW_ALIGNMENT)
    {
        return <Inner as burn_backend::ops::FloatTensorOps<Inner>>::float_slice(tensor, slices);
    }
    // The view's last element, and the bytes after it in the parent's binding.
    let last: u64 = ranges
        .iter()
        .zip(&strides)
        .map(|(r, &st)| ((r.end - 1) * st) as u64)
        .sum();
    let parent_last: u64 = shape
        .iter()
        .zip(&strides)
        .map(|(&n, &st)| ((n.max(1) - 1) * st) as u64)
        .sum();
    let mut dims = shape;
    for (i, r) in ranges.iter().enumerate() {
        dims[i] = r.end - r.start;
    }
    let handle = tensor
        .handle
        .clone()
        .offset_start(start * elem)
        .offset_end((parent_last - last) * elem);
    CubeTensor::new(
        tensor.client.clone(),
        handle,
        cubecl::zspace::metadata::Metadata::new(dims, strides),
        tensor.device.clone(),
        tensor.dtype,
    )
}

/// `reshape` as a view whenever the elements' strides allow one ([`view_strides`], PyTorch's
/// rule), else burn's reshape (which copies). burn views only contiguous tensors, splits and
/// added axes; merging the leading axes of a pitched tensor (`[b, s, v]` logits → `[b·s, v]`)
/// would copy it.
pub(super) fn reshape(
    mut tensor: FloatTensor<CublasCuda>,
    shape: burn_backend::Shape,
) -> FloatTensor<CublasCuda> {
    if tensor.qparams.is_none()
        && let Some(strides) = view_strides(tensor.meta.shape(), tensor.meta.strides(), &shape)
    {
        *tensor.meta = cubecl::zspace::metadata::Metadata::new(shape, strides);
        return tensor;
    }
    <Inner as burn_backend::ops::FloatTensorOps<Inner>>::float_reshape(tensor, shape)
}
