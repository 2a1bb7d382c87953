//! einattn-runtime: load PTX, allocate, copy, launch and time kernels on one GPU.
//!
//! The CUDA driver is opened at run time (cudarc's `dynamic-loading`), so this crate builds
//! on machines without CUDA. cudarc's loader panics when `libcuda` is missing, or when it
//! loads but lacks a function cudarc calls, so every entry point goes through
//! [`Gpu::open`], which asks `is_culib_present()` and looks up the driver functions first
//! ([`missing_driver_symbols`]) and answers [`RuntimeError::GpuUnavailable`] instead.
//!
//! Everything runs on one stream per [`Gpu`]; cudarc's per-buffer event tracking is turned off
//! because kernels receive raw device pointers ([`KernelArg::Ptr`]) and stream order already
//! orders them. A second stream of the same device ([`Gpu::second_stream`]) is a `Gpu` of
//! its own; work on two streams is ordered only by the caller's events ([`Gpu::record`],
//! [`Gpu::wait`]).

pub mod nccl;
pub mod rendezvous;
pub mod stand_in;

pub use nccl::{NcclGroup, NcclRank};
pub use rendezvous::{share_bytes, LaunchEnv};
pub use stand_in::StandInGroup;

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};

/// Errors of the runtime. Driver failures keep the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no usable GPU: {reason}")]
    GpuUnavailable { reason: String },
    #[error("CUDA driver error while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("NCCL error while {0}")]
    Nccl(String),
    /// The launcher's processes could not meet (see [`rendezvous::share_bytes`]).
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

fn drv<T>(what: &str, r: std::result::Result<T, DriverError>) -> Result<T> {
    r.map_err(|source| RuntimeError::Driver {
        what: what.to_string(),
        source,
    })
}

/// Whether the CUDA driver library can be opened on this machine (no panic when it can't).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Driver functions every run needs (initialization, devices, contexts, modules, launches,
/// copies, events), by the names cudarc looks up. A library named `libcuda.so` that lacks
/// one of these is not a usable driver.
const REQUIRED_DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuStreamSynchronize",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventElapsedTime",
];

/// The driver functions of [`REQUIRED_DRIVER_SYMBOLS`] that the CUDA driver library found
/// on this machine does not export (all of them when there is no library). cudarc panics
/// on the first call of a missing one, so look before calling.
pub fn missing_driver_symbols() -> Vec<&'static str> {
    if !driver_present() {
        return REQUIRED_DRIVER_SYMBOLS.to_vec();
    }
    // SAFETY: `culib` opens the library `driver_present` just found (the same names in the
    // same order); looking a symbol up calls nothing in it.
    let lib = unsafe { cudarc::driver::sys::culib() };
    REQUIRED_DRIVER_SYMBOLS
        .iter()
        .copied()
        .filter(|name| unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err())
        .collect()
}

/// Runs a first driver call, turning a panic inside cudarc (a function missing from the
/// library that the list above does not name) into `GpuUnavailable`.
fn guarded<T>(what: &str, call: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
    std::panic::catch_unwind(call).map_err(|payload| {
        let why = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic in the CUDA bindings".to_string());
        RuntimeError::GpuUnavailable {
            reason: format!("the CUDA driver library failed while {what}: {why}"),
        }
    })
}

/// One GPU and the stream every operation of this crate runs on.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// A point in a stream's work ([`Gpu::record`]), for another stream to wait on.
pub struct Event(cudarc::driver::CudaEvent);

/// Element types a [`DeviceBuffer`] can hold; 16-bit floats travel as their bit patterns.
pub trait Element: Copy {
    type Repr: cudarc::driver::DeviceRepr + Copy + Default;
    fn to_repr(self) -> Self::Repr;
    fn from_repr(r: Self::Repr) -> Self;
}

impl Element for f32 {
    type Repr = f32;
    fn to_repr(self) -> f32 {
        self
    }
    fn from_repr(r: f32) -> f32 {
        r
    }
}
impl Element for f64 {
    type Repr = f64;
    fn to_repr(self) -> f64 {
        self
    }
    fn from_repr(r: f64) -> f64 {
        r
    }
}
impl Element for half::bf16 {
    type Repr = u16;
    fn to_repr(self) -> u16 {
        self.to_bits()
    }
    fn from_repr(r: u16) -> Self {
        half::bf16::from_bits(r)
    }
}
impl Element for half::f16 {
    type Repr = u16;
    fn to_repr(self) -> u16 {
        self.to_bits()
    }
    fn from_repr(r: u16) -> Self {
        half::f16::from_bits(r)
    }
}
impl Element for u16 {
    type Repr = u16;
    fn to_repr(self) -> u16 {
        self
    }
    fn from_repr(r: u16) -> u16 {
        r
    }
}
impl Element for u32 {
    type Repr = u32;
    fn to_repr(self) -> u32 {
        self
    }
    fn from_repr(r: u32) -> u32 {
        r
    }
}

/// A typed device allocation.
pub struct DeviceBuffer<T: Element> {
    slice: CudaSlice<T::Repr>,
    _elem: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
    /// The raw device address, for [`KernelArg::Ptr`].
    pub fn device_address(&self, gpu: &Gpu) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(&gpu.stream);
        ptr
    }
    /// A kernel argument pointing at this buffer.
    pub fn arg(&self, gpu: &Gpu) -> KernelArg {
        KernelArg::Ptr(self.device_address(gpu))
    }
}

/// A kernel loaded from PTX.
pub struct Kernel {
    function: CudaFunction,
    _module: Arc<CudaModule>,
    pub entry: String,
}

/// Resource use of a loaded kernel as the driver reports it.
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    pub registers: i32,
    pub local_bytes: i32,
    pub static_shared_bytes: i32,
    pub max_threads_per_block: i32,
}

impl Kernel {
    pub fn resources(&self) -> Result<KernelResources> {
        Ok(KernelResources {
            registers: drv("reading NUM_REGS", self.function.num_regs())?,
            local_bytes: drv("reading LOCAL_SIZE_BYTES", self.function.local_size_bytes())?,
            static_shared_bytes: drv(
                "reading SHARED_SIZE_BYTES",
                self.function.shared_size_bytes(),
            )?,
            max_threads_per_block: drv(
                "reading MAX_THREADS_PER_BLOCK",
                self.function.max_threads_per_block(),
            )?,
        })
    }
}

/// One kernel parameter, in the order the PTX `.entry` declares them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    /// A tensor map passed by value (`.param .align 64 .b8 NAME[128]`).
    TensorMap(TensorMap),
}

/// A tensor map the driver encoded ([`tensor_map`]): the 128 opaque bytes the copy engine
/// reads, passed to the kernel by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct TensorMap(cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte, 64-byte-aligned value the kernel takes by value.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// A tiled rank-4 view of a device tensor for the copy engine: extents innermost first,
/// byte strides of dims 1..4, the box one copy moves; 128-byte swizzle, zeros past the
/// extents (the layout the kernels' shared tiles have). The copy engine moves bytes and
/// converts nothing, so elements are described by their size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledView {
    pub address: u64,
    pub element_bytes: u64,
    pub dims: [u64; 4],
    pub strides: [u64; 3],
    pub boxes: [u32; 4],
}

/// Encodes `view` with `cuTensorMapEncodeTiled` (no context needed).
pub fn tensor_map(view: &TiledView) -> Result<TensorMap> {
    use cudarc::driver::sys::{
        CUtensorMapDataType as D, CUtensorMapFloatOOBfill as Fill,
        CUtensorMapInterleave as Interleave, CUtensorMapL2promotion as L2,
        CUtensorMapSwizzle as Swizzle,
    };
    let data_type = match view.element_bytes {
        1 => D::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        2 => D::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        4 => D::CU_TENSOR_MAP_DATA_TYPE_UINT32,
        8 => D::CU_TENSOR_MAP_DATA_TYPE_UINT64,
        n => {
            return Err(RuntimeError::InvalidArgument(format!(
                "a tensor map of {n}-byte elements"
            )))
        }
    };
    let address = usize::try_from(view.address).map_err(|_| {
        RuntimeError::InvalidArgument(format!("address {:#x} does not fit", view.address))
    })?;
    let mut map = cudarc::driver::sys::CUtensorMap { opaque: [0; 16] };
    let element_strides = [1u32; 4];
    // SAFETY: every pointer addresses an array of the rank's length (4, or 3 strides) that
    // lives through the call; the driver only writes `map`.
    let status = unsafe {
        cudarc::driver::sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            4,
            std::ptr::with_exposed_provenance_mut(address),
            view.dims.as_ptr(),
            view.strides.as_ptr(),
            view.boxes.as_ptr(),
            element_strides.as_ptr(),
            Interleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            Swizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            L2::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            Fill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    drv("encoding a tensor map", status.result())?;
    Ok(TensorMap(map))
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dynamic_smem_bytes: u32,
}

/// Median and spread of repeated timings, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub reps: usize,
}

/// Above this much dynamic shared memory a kernel must opt in (`cuFuncSetAttribute`).
const DEFAULT_DYNAMIC_SMEM_LIMIT: u32 = 48 * 1024;

impl Gpu {
    /// Opens GPU `ordinal`, or says why none can be used.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(RuntimeError::GpuUnavailable {
                reason: "the CUDA driver library (libcuda.so) was not found; set LD_LIBRARY_PATH \
                         to its folder (e.g. /usr/local/nvidia/lib64) on a machine with a GPU"
                    .into(),
            });
        }
        let missing = missing_driver_symbols();
        if !missing.is_empty() {
            return Err(RuntimeError::GpuUnavailable {
                reason: format!(
                    "the CUDA driver library found (libcuda.so) lacks {}; it is not a usable \
                     driver (set LD_LIBRARY_PATH to the folder of the real one)",
                    missing.join(", ")
                ),
            });
        }
        let count = guarded("counting devices", CudaContext::device_count)?.map_err(|e| {
            RuntimeError::GpuUnavailable {
                reason: format!("cuInit/cuDeviceGetCount failed: {e}"),
            }
        })?;
        if (count as usize) <= ordinal {
            return Err(RuntimeError::GpuUnavailable {
                reason: format!("GPU {ordinal} requested but {count} present"),
            });
        }
        let ctx = drv(
            "creating the context",
            guarded("creating the context", move || CudaContext::new(ordinal))?,
        )?;
        // SAFETY: each `Gpu` uses one stream, so stream order is the only order needed on it;
        // callers that use a second stream order it with explicit events (raw pointers
        // handed to kernels would bypass the per-buffer events anyway).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream })
    }

    pub fn name(&self) -> Result<String> {
        drv("reading the device name", self.ctx.name())
    }
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        drv(
            "reading the compute capability",
            self.ctx.compute_capability(),
        )
    }
    pub fn multiprocessor_count(&self) -> Result<i32> {
        drv(
            "reading the SM count",
            self.ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )
    }
    /// Largest dynamic shared memory one block may opt into.
    pub fn max_dynamic_smem_per_block(&self) -> Result<i32> {
        drv(
            "reading the opt-in shared memory limit",
            self.ctx.attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            ),
        )
    }

    /// Loads a PTX module (JIT-compiled by the driver) and looks up `entry`.
    pub fn load_ptx(&self, ptx: &str, entry: &str) -> Result<Kernel> {
        let module = drv(
            &format!("loading PTX module for `{entry}`"),
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.to_string())),
        )?;
        let function = drv(
            &format!("looking up entry `{entry}`"),
            module.load_function(entry),
        )?;
        Ok(Kernel {
            function,
            _module: module,
            entry: entry.to_string(),
        })
    }

    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let repr: Vec<T::Repr> = host.iter().map(|x| x.to_repr()).collect();
        let slice = drv("copying to the device", self.stream.clone_htod(&repr))?;
        Ok(DeviceBuffer {
            slice,
            _elem: PhantomData,
        })
    }

    /// Allocates `len` elements all set to `value` (use a poison value for outputs).
    pub fn filled<T: Element>(&self, len: usize, value: T) -> Result<DeviceBuffer<T>> {
        self.upload(&vec![value; len])
    }

    pub fn download<T: Element>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        let repr = drv("copying to the host", self.stream.clone_dtoh(&buf.slice))?;
        Ok(repr.into_iter().map(T::from_repr).collect())
    }

    /// Copies `src[range]` into `dst` at `dst_offset`, on this GPU's stream.
    pub fn copy_within<T: Element>(
        &self,
        src: &DeviceBuffer<T>,
        range: std::ops::Range<usize>,
        dst: &mut DeviceBuffer<T>,
        dst_offset: usize,
    ) -> Result<()> {
        let n = range.len();
        if range.end > src.len() || dst_offset + n > dst.len() {
            return Err(RuntimeError::InvalidArgument("copy out of range".into()));
        }
        let from = src.slice.slice(range);
        let mut to = dst.slice.slice_mut(dst_offset..dst_offset + n);
        drv(
            "copying on the device",
            self.stream.memcpy_dtod(&from, &mut to),
        )
    }

    /// Sets every byte of `buf` to 0 on this GPU's stream (no host copy).
    pub fn zero<T: Element>(&self, buf: &mut DeviceBuffer<T>) -> Result<()>
    where
        T::Repr: cudarc::driver::ValidAsZeroBits,
    {
        drv(
            "zeroing device memory",
            self.stream.memset_zeros(&mut buf.slice),
        )
    }

    /// Overwrites a buffer with `value` from the host (poisoning before a check).
    pub fn fill<T: Element>(&self, buf: &mut DeviceBuffer<T>, value: T) -> Result<()> {
        let repr = vec![value.to_repr(); buf.len()];
        drv(
            "copying to the device",
            self.stream.memcpy_htod(&repr, &mut buf.slice),
        )
    }

    /// Launches `kernel`; raises its dynamic shared-memory limit first when the launch
    /// needs more than the default 48 KB.
    pub fn launch(&self, kernel: &Kernel, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        if dims.dynamic_smem_bytes > DEFAULT_DYNAMIC_SMEM_LIMIT {
            drv(
                "raising MAX_DYNAMIC_SHARED_SIZE_BYTES",
                kernel.function.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dims.dynamic_smem_bytes as i32,
                ),
            )?;
        }
        let cfg = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.dynamic_smem_bytes,
        };
        let mut builder = self.stream.launch_builder(&kernel.function);
        for a in args {
            match a {
                KernelArg::Ptr(p) | KernelArg::U64(p) => builder.arg(p),
                KernelArg::U32(x) => builder.arg(x),
                KernelArg::I32(x) => builder.arg(x),
                KernelArg::F32(x) => builder.arg(x),
                KernelArg::TensorMap(m) => builder.arg(m),
            };
        }
        // SAFETY: the caller passes the arguments in the order and types of the PTX entry
        // (the backends' ABI description); buffers outlive the launch because `synchronize`
        // or a later download orders after it on the same stream.
        drv(&format!("launching `{}`", kernel.entry), unsafe {
            builder.launch(cfg)
        })?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        drv("synchronizing the stream", self.stream.synchronize())
    }

    /// Another stream of this GPU, as a `Gpu` whose every operation runs there. Nothing
    /// orders it against this one but [`Gpu::record`] and [`Gpu::wait`]; buffers of either
    /// may be used on both.
    pub fn second_stream(&self) -> Result<Gpu> {
        let stream = drv("creating a stream", self.ctx.new_stream())?;
        Ok(Gpu {
            ctx: self.ctx.clone(),
            stream,
        })
    }

    /// An event that completes when the work enqueued on this stream so far has.
    pub fn record(&self) -> Result<Event> {
        drv("recording an event", self.stream.record_event(None)).map(Event)
    }

    /// Makes the work enqueued on this stream from now on wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<()> {
        drv("waiting for an event", self.stream.wait(&event.0))
    }

    /// Times `run` with CUDA events: `warmup` untimed calls, then `reps` timed ones (one
    /// event pair each); returns the median. `run` must only enqueue work on this GPU.
    pub fn time<F: FnMut() -> Result<()>>(
        &self,
        warmup: usize,
        reps: usize,
        mut run: F,
    ) -> Result<Timing> {
        if reps == 0 {
            return Err(RuntimeError::InvalidArgument("reps must be > 0".into()));
        }
        for _ in 0..warmup {
            run()?;
        }
        self.synchronize()?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut pairs = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = drv("creating an event", self.ctx.new_event(flags))?;
            let stop = drv("creating an event", self.ctx.new_event(flags))?;
            drv("recording an event", start.record(&self.stream))?;
            run()?;
            drv("recording an event", stop.record(&self.stream))?;
            pairs.push((start, stop));
        }
        self.synchronize()?;
        let mut ms = Vec::with_capacity(reps);
        for (start, stop) in &pairs {
            ms.push(drv("reading event time", start.elapsed_ms(stop))? as f64);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(Timing {
            median_ms: ms[ms.len() / 2],
            min_ms: ms[0],
            max_ms: ms[ms.len() - 1],
            reps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_driver_is_a_typed_error_not_a_panic() {
        match Gpu::open(0) {
            Ok(gpu) => {
                // A GPU is here: the context must answer basic queries.
                assert!(gpu.multiprocessor_count().unwrap_or(0) > 0);
            }
            Err(RuntimeError::GpuUnavailable { reason }) => {
                eprintln!("skipping GPU part: {reason}");
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }

    #[test]
    fn element_round_trips_bits() {
        let x = half::bf16::from_f32(1.5);
        assert_eq!(half::bf16::from_repr(x.to_repr()), x);
        let y = half::f16::from_f32(-2.25);
        assert_eq!(half::f16::from_repr(y.to_repr()), y);
    }
}
