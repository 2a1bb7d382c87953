//! Launching compiled kernels on a stream someone else owns (PyTorch's current stream),
//! with memory someone else allocated (PyTorch tensors), through the CUDA driver API.
//!
//! PyTorch works in each device's primary context; `CudaContext::new` retains that same
//! context, so device pointers and streams from PyTorch are valid here. Modules are loaded
//! once per device and PTX text (kernels compiled for other sizes often print the same
//! PTX, whose sizes are parameters), and kept for the life of the process.

use crate::program::Kernels;
use cudarc::driver::result;
use cudarc::driver::sys::{self, CUfunction_attribute};
use cudarc::driver::CudaContext;
use einattn_backends::abi::{self, ArgValue, ArgValues, Axis, BindError, LaunchContract, Source};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// A loaded entry. The module is never unloaded: functions are shared by every compile that
/// printed the same PTX, for the life of the process.
#[derive(Clone, Copy)]
struct Function(sys::CUfunction);

// SAFETY: a CUfunction is a handle the driver lets any thread use once its context is
// current; this crate makes the context current before every use.
unsafe impl Send for Function {}

#[derive(Default)]
struct Loaded {
    contexts: HashMap<usize, Arc<CudaContext>>,
    /// (device, hash of the PTX, entry) -> function.
    functions: HashMap<(usize, u64, String), Function>,
}

fn loaded() -> &'static Mutex<Loaded> {
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    LOADED.get_or_init(Mutex::default)
}

/// Above this much dynamic shared memory a kernel must opt in.
const DEFAULT_DYNAMIC_SMEM_LIMIT: u32 = 48 * 1024;

fn driver_error(what: &str) -> impl FnOnce(result::DriverError) -> String + '_ {
    move |e| format!("CUDA driver error while {what}: {e}")
}

/// The primary context of `device`, current on this thread.
fn context(state: &mut Loaded, device: usize) -> Result<Arc<CudaContext>, String> {
    // cudarc's loader panics when libcuda is missing: ask first.
    // SAFETY: only tries to open the driver library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) was not found".into());
    }
    let ctx = match state.contexts.get(&device) {
        Some(c) => c.clone(),
        None => {
            let c = CudaContext::new(device).map_err(driver_error("opening the device"))?;
            state.contexts.insert(device, c.clone());
            c
        }
    };
    ctx.bind_to_thread()
        .map_err(driver_error("making the context current"))?;
    Ok(ctx)
}

fn function(
    state: &mut Loaded,
    device: usize,
    contract: &LaunchContract,
    (ptx, hash): (&str, u64),
) -> Result<Function, String> {
    let key = (device, hash, contract.kernel.clone());
    if let Some(f) = state.functions.get(&key) {
        return Ok(*f);
    }
    let image =
        CString::new(ptx).map_err(|_| format!("the PTX of `{}` holds a NUL", contract.kernel))?;
    let entry = CString::new(contract.kernel.as_str())
        .map_err(|_| "an entry name holds a NUL".to_string())?;
    // SAFETY: the context is current (`context` ran first); `image` is NUL-terminated PTX that
    // lives across the call; the module is kept loaded for the life of the process, so the
    // function handle stays valid.
    let f = unsafe {
        let module = result::module::load_data(image.as_ptr() as *const c_void)
            .map_err(driver_error("loading the PTX"))?;
        result::module::get_function(module, entry).map_err(driver_error("looking up the entry"))?
    };
    if contract.dynamic_shared_bytes > DEFAULT_DYNAMIC_SMEM_LIMIT {
        let bytes = i32::try_from(contract.dynamic_shared_bytes)
            .map_err(|_| format!("`{}` asks for too much shared memory", contract.kernel))?;
        // SAFETY: `f` was just loaded in the current context.
        unsafe {
            result::function::set_function_attribute(
                f,
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
        }
        .map_err(driver_error("raising the shared memory limit"))?;
    }
    state.functions.insert(key, Function(f));
    Ok(Function(f))
}

/// A parameter's bytes as the driver copies them.
enum DriverArg {
    U64(u64),
    U32(u32),
    F32(f32),
    Map(einattn_runtime::TensorMap),
}

/// What one launch binds: device addresses by tensor and scratch name, scalar values.
struct Values<'a> {
    contract: &'a LaunchContract,
    pointers: &'a HashMap<&'a str, u64>,
    scratch: &'a HashMap<&'a str, u64>,
    scalars: &'a HashMap<&'a str, f64>,
}

impl ArgValues for Values<'_> {
    fn pointer(&self, source: &Source) -> Result<u64, BindError> {
        match source {
            Source::Tensor { tensor } => self.pointers.get(tensor.as_str()).copied(),
            Source::Scratch { scratch } => self.scratch.get(scratch.as_str()).copied(),
            _ => None,
        }
        .ok_or_else(|| BindError(format!("no device address for {source:?}")))
    }
    fn size(&self, name: &str) -> Result<u64, BindError> {
        self.contract.compiled_size(name)
    }
    fn stride(&self, tensor: &str, axis: Axis) -> Result<u64, BindError> {
        self.contract
            .tensor(tensor)
            .and_then(|t| t.strides)
            .map(|s| s.along(axis))
            .ok_or_else(|| BindError(format!("`{tensor}` has no strides in the contract")))
    }
    fn scalar(&self, param: &str, default: Option<f64>) -> Result<f64, BindError> {
        self.scalars
            .get(param)
            .copied()
            .or(default)
            .ok_or_else(|| BindError(format!("no value for `{param}`")))
    }
}

/// Device addresses and scalar values for one call, in the orders [`Kernels`] gives.
pub struct Call<'a> {
    pub device: usize,
    /// A `CUstream` (PyTorch's `cuda_stream`), 0 for the legacy default stream.
    pub stream: usize,
    pub inputs: &'a [u64],
    pub outputs: &'a [u64],
    pub scratch: &'a [u64],
    pub scalars: &'a [f64],
}

/// Binds and enqueues every kernel of `kernels` on `call.stream`, zeroing the scratch
/// arrays that must start at zero before each kernel that asks.
pub fn launch(kernels: &Kernels, call: &Call) -> Result<(), String> {
    let count = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{want} {what} expected, got {got}"))
        }
    };
    count("input addresses", call.inputs.len(), kernels.inputs.len())?;
    count(
        "output addresses",
        call.outputs.len(),
        kernels.outputs.len(),
    )?;
    count(
        "scratch addresses",
        call.scratch.len(),
        kernels.scratch.len(),
    )?;
    count("scalars", call.scalars.len(), kernels.scalars.len())?;
    let mut pointers: HashMap<&str, u64> = HashMap::new();
    for (name, &p) in kernels.inputs.iter().zip(call.inputs) {
        pointers.insert(name, p);
    }
    for ((name, _, _), &p) in kernels.outputs.iter().zip(call.outputs) {
        pointers.insert(name, p);
    }
    let scratch: HashMap<&str, u64> = kernels
        .scratch
        .iter()
        .zip(call.scratch)
        .map(|((name, _), &p)| (name.as_str(), p))
        .collect();
    let scalars: HashMap<&str, f64> = kernels
        .scalars
        .iter()
        .zip(call.scalars)
        .map(|((name, _), &v)| (name.as_str(), v))
        .collect();
    // Everything is bound and checked before anything is enqueued.
    let mut launches = Vec::new();
    for entry in &kernels.manifest.launch {
        let contract = kernels
            .manifest
            .kernel(entry)
            .ok_or_else(|| format!("no contract for `{entry}`"))?;
        for req in &contract.requires {
            let Some(name) = req.strip_suffix(" > 0") else {
                return Err(format!(
                    "`{entry}` requires `{req}`, which this launcher cannot check"
                ));
            };
            if let Some(&v) = scalars.get(name) {
                if v.is_nan() || v <= 0.0 {
                    return Err(format!("this kernel needs {name} > 0 (got {v})"));
                }
            }
        }
        let values = Values {
            contract,
            pointers: &pointers,
            scratch: &scratch,
            scalars: &scalars,
        };
        let args = abi::bind(contract, &values).map_err(|e| format!("`{entry}`: {e}"))?;
        let grid = contract
            .compiled_grid()
            .map_err(|e| format!("`{entry}`: {e}"))?;
        let ptx = kernels
            .ptx
            .get(entry)
            .zip(kernels.ptx_hash.get(entry))
            .map(|(text, &hash)| (text.as_str(), hash))
            .ok_or_else(|| format!("no PTX for `{entry}`"))?;
        let zero: Vec<(u64, usize)> = contract
            .scratch
            .iter()
            .filter(|s| s.zero_before_launch)
            .map(|s| {
                let bytes = s
                    .elements
                    .checked_mul(s.dtype.bytes())
                    .and_then(|b| usize::try_from(b).ok())
                    .ok_or_else(|| format!("scratch `{}` is too large", s.name))?;
                let at = scratch
                    .get(s.name.as_str())
                    .copied()
                    .ok_or_else(|| format!("no device address for scratch `{}`", s.name))?;
                Ok((at, bytes))
            })
            .collect::<Result<_, String>>()?;
        launches.push((contract, ptx, args, grid, zero));
    }
    let mut state = loaded()
        .lock()
        .map_err(|_| "a previous launch panicked".to_string())?;
    context(&mut state, call.device)?;
    let stream: sys::CUstream = std::ptr::with_exposed_provenance_mut(call.stream);
    for (contract, ptx, args, grid, zero) in launches {
        let f = function(&mut state, call.device, contract, ptx)?;
        for (at, bytes) in zero {
            // SAFETY: `at` addresses `bytes` bytes the caller allocated for this scratch
            // array on this device; the memset is ordered on the launch stream.
            unsafe { result::memset_d8_async(at, 0, bytes, stream) }
                .map_err(driver_error("zeroing a scratch array"))?;
        }
        // Values as the driver reads them (tensor maps encoded), alive through the launch.
        let driver_args = args
            .iter()
            .map(|a| {
                Ok(match *a {
                    ArgValue::Ptr(p) | ArgValue::U64(p) => DriverArg::U64(p),
                    ArgValue::U32(x) => DriverArg::U32(x),
                    ArgValue::F32(x) => DriverArg::F32(x),
                    ArgValue::TensorMap(spec) => DriverArg::Map(
                        einattn_runtime::tensor_map(&einattn_runtime::TiledView {
                            address: spec.address,
                            element_bytes: spec.dtype.bytes(),
                            dims: spec.dims,
                            strides: spec.strides,
                            boxes: spec.boxes,
                        })
                        .map_err(|e| format!("`{}`: {e}", contract.kernel))?,
                    ),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut params: Vec<*mut c_void> = driver_args
            .iter()
            .map(|a| match a {
                DriverArg::U64(p) => p as *const u64 as *mut c_void,
                DriverArg::U32(x) => x as *const u32 as *mut c_void,
                DriverArg::F32(x) => x as *const f32 as *mut c_void,
                DriverArg::Map(m) => m as *const einattn_runtime::TensorMap as *mut c_void,
            })
            .collect();
        // SAFETY: `params` point into `args`, which outlives the call, in the entry's
        // parameter order and types (the launch contract, bound by `abi::bind`); every
        // address came from a tensor the caller checked against the contract's shapes and
        // dtypes on this device; the stream is the caller's, of this device's primary
        // context, which is current.
        unsafe {
            result::launch_kernel(
                f.0,
                (grid[0], grid[1], grid[2]),
                (contract.block[0], contract.block[1], contract.block[2]),
                contract.dynamic_shared_bytes,
                stream,
                &mut params,
            )
        }
        .map_err(|e| {
            format!(
                "CUDA driver error while launching `{}`: {e}",
                contract.kernel
            )
        })?;
    }
    Ok(())
}
