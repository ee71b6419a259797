use crate::compute::{
    storage::{
        cpu::{PINNED_MEMORY_ALIGNMENT, PinnedMemoryStorage},
        gpu::GpuStorage,
    },
    sync::Fence,
};
use cubecl_core::{
    MemoryConfiguration,
    ir::MemoryDeviceProperties,
    server::{Binding, ServerError},
};
use cubecl_runtime::{
    logging::ServerLogger,
    memory_management::{
        MemoryAllocationMode, MemoryManagement, MemoryManagementOptions, drop_queue,
    },
    stream::EventStreamBackend,
};
use std::sync::Arc;

#[derive(Debug)]
pub struct Stream {
    pub sys: cudarc::driver::sys::CUstream,
    pub memory_management_gpu: MemoryManagement<GpuStorage>,
    pub memory_management_cpu: MemoryManagement<PinnedMemoryStorage>,
    pub errors: Vec<ServerError>,
    pub drop_queue: drop_queue::PendingDropQueue<Fence>,
    /// attention-spectra patch: pinned staging of kernel metadata, see [`MetadataStaging`].
    pub metadata_staging: MetadataStaging,
}

/// attention-spectra patch: a pinned ring through which kernel metadata (the shapes and strides
/// a launch uploads) reaches the device, in [`METADATA_CHUNKS`] chunks of
/// [`METADATA_CHUNK_BYTES`] used in turn. A chunk is reused once the event recorded when it
/// was last left has passed, thousands of launches later.
///
/// Unpatched, each upload reserved a slice of the pinned memory pool and went through the
/// drop queue, whose flush every 64 uploads waited on the host for the fence of the 64 before:
/// the device thread could never be more than about 128 uploads ahead of the GPU, and each
/// reservation scanned the pool's slices.
#[derive(Debug)]
pub struct MetadataStaging {
    host: *mut u8,
    chunk: usize,
    used: usize,
    events: Vec<Option<cudarc::driver::sys::CUevent>>,
}

/// Bytes per chunk of [`MetadataStaging`]; a larger upload takes cubecl's own path.
pub const METADATA_CHUNK_BYTES: usize = 64 * 1024;
/// Chunks of [`MetadataStaging`] (4 MiB of pinned memory in all).
pub const METADATA_CHUNKS: usize = 64;

// SAFETY: the pinned allocation is owned by the staging and only touched through `&mut self`.
unsafe impl Send for MetadataStaging {}

impl Default for MetadataStaging {
    fn default() -> Self {
        Self {
            host: std::ptr::null_mut(),
            chunk: 0,
            used: 0,
            events: vec![None; METADATA_CHUNKS],
        }
    }
}

impl MetadataStaging {
    /// Copies `data` (at most [`METADATA_CHUNK_BYTES`]) into the ring and returns its staged
    /// copy, which stays untouched until the work enqueued on `stream` after this call, up to
    /// the next [`METADATA_CHUNKS`] − 1 chunk changes, has run.
    ///
    /// # Safety
    /// `stream` must be a live stream of the current context, the same on every call.
    pub unsafe fn stage(
        &mut self,
        data: &[u8],
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<&[u8], cudarc::driver::DriverError> {
        use cudarc::driver::result::{event, malloc_host};
        assert!(
            data.len() <= METADATA_CHUNK_BYTES,
            "metadata upload too long"
        );
        if self.host.is_null() {
            // SAFETY: a plain pinned allocation, freed in `drop`.
            self.host = unsafe { malloc_host(METADATA_CHUNKS * METADATA_CHUNK_BYTES, 0)? }.cast();
        }
        let len = data.len().next_multiple_of(16);
        if self.used + len > METADATA_CHUNK_BYTES {
            // Leave the chunk: its event passes once every copy that reads it has run.
            let left = match self.events[self.chunk] {
                Some(e) => e,
                None => event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?,
            };
            self.events[self.chunk] = Some(left);
            // SAFETY: `left` is a live event and `stream` a live stream (contract).
            unsafe { event::record(left, stream)? };
            self.chunk = (self.chunk + 1) % METADATA_CHUNKS;
            self.used = 0;
            if let Some(entered) = self.events[self.chunk] {
                // SAFETY: a live event; once it has passed, no copy still reads the chunk.
                unsafe { event::synchronize(entered)? };
            }
        }
        // SAFETY: the range lies inside the allocation and no pending copy reads it.
        let staged = unsafe {
            let start = self.host.add(self.chunk * METADATA_CHUNK_BYTES + self.used);
            std::ptr::copy_nonoverlapping(data.as_ptr(), start, data.len());
            std::slice::from_raw_parts(start, data.len())
        };
        self.used += len;
        Ok(staged)
    }
}

impl Drop for MetadataStaging {
    fn drop(&mut self) {
        // SAFETY: every copy that read the ring is waited for before it is freed.
        unsafe {
            for event in self.events.iter().flatten() {
                let _ = cudarc::driver::result::event::synchronize(*event);
                let _ = cudarc::driver::result::event::destroy(*event);
            }
            if !self.host.is_null() {
                let _ = cudarc::driver::result::free_host(self.host.cast());
            }
        }
    }
}

impl drop_queue::Fence for Fence {
    fn sync(self) {
        let _ = self.wait_sync().ok();
    }
}

#[derive(new, Debug)]
pub struct CudaStreamBackend {
    mem_props: MemoryDeviceProperties,
    mem_config: MemoryConfiguration,
    mem_alignment: usize,
    logger: Arc<ServerLogger>,
}

impl EventStreamBackend for CudaStreamBackend {
    type Stream = Stream;
    type Event = Fence;

    fn create_stream(&self) -> Self::Stream {
        let stream = cudarc::driver::result::stream::create(
            cudarc::driver::result::stream::StreamKind::NonBlocking,
        )
        .expect("Can create a new stream.");

        let storage = GpuStorage::new(self.mem_alignment, stream);
        let memory_management_gpu = MemoryManagement::from_configuration(
            storage,
            &self.mem_props,
            self.mem_config.clone(),
            self.logger.clone(),
            MemoryManagementOptions::new("Main GPU Memory"),
        );
        // We use the same page size and memory pools configuration for CPU pinned memory, since we
        // expect the CPU to have at least the same amount of RAM as GPU memory.
        let memory_management_cpu = MemoryManagement::from_configuration(
            PinnedMemoryStorage::new(),
            &MemoryDeviceProperties {
                max_page_size: self.mem_props.max_page_size,
                alignment: PINNED_MEMORY_ALIGNMENT as u64,
            },
            self.mem_config.clone(),
            self.logger.clone(),
            MemoryManagementOptions::new("Pinned CPU Memory").mode(MemoryAllocationMode::Auto),
        );

        Stream {
            sys: stream,
            memory_management_gpu,
            memory_management_cpu,
            errors: Vec::new(),
            drop_queue: Default::default(),
            metadata_staging: Default::default(),
        }
    }

    fn flush(stream: &mut Self::Stream) -> Self::Event {
        Fence::new(stream.sys)
    }

    fn wait_event(stream: &mut Self::Stream, event: Self::Event) {
        event.wait_async(stream.sys);
    }

    fn wait_event_sync(event: Self::Event) -> Result<(), ServerError> {
        event.wait_sync()
    }

    fn handle_cursor(stream: &Self::Stream, binding: &Binding) -> u64 {
        stream
            .memory_management_gpu
            .get_cursor(binding.memory.clone())
            .unwrap()
    }

    fn is_healthy(stream: &Self::Stream) -> bool {
        stream.errors.is_empty()
    }
}
