//! The kernels of one compile on the whole problem, on one GPU: every tensor a contract
//! names uploaded from the host values (the output poisoned with NaN), the scratch arrays
//! allocated, every parameter bound by meaning, the kernels launched in the manifest's
//! order.

use crate::device::{self, DeviceArray};
use crate::{ExecError, Result};
use einattn_backends::abi::{
    self, ArgValue, ArgValues, Axis, BindError, Dtype, LaunchContract, Source, TensorRole,
};
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::TensorData;
use einattn_ir::{Handle, Tensor};
use einattn_runtime::{Gpu, Kernel, KernelArg, KernelResources, LaunchDims};
use std::collections::HashMap;

/// Values of a cascade's inputs and parameters, by tensor.
pub type Inputs = HashMap<Handle<Tensor>, TensorData>;

/// A kernel to launch: its contract and PTX text.
pub type KernelText<'a> = (&'a LaunchContract, &'a str);

/// A bound launch.
struct Launch {
    kernel: Kernel,
    dims: LaunchDims,
    args: Vec<KernelArg>,
    /// Scratch arrays zeroed before this launch (look-back flags).
    zero: Vec<String>,
}

/// The whole problem loaded on one GPU.
pub struct Whole {
    pub gpu: Gpu,
    pub device: String,
    launches: Vec<Launch>,
    tensors: HashMap<String, (Dtype, DeviceArray)>,
    /// Interior mutability: a run zeroes flags while the arrays stay bound.
    scratch: HashMap<String, std::cell::RefCell<DeviceArray>>,
    /// The tensors the kernels write, in contract order (the last is the main output).
    outputs: Vec<String>,
}

/// A driver argument from a bound value (a tensor map encoded by the driver).
pub fn driver_arg(v: ArgValue) -> Result<KernelArg> {
    Ok(match v {
        ArgValue::Ptr(p) => KernelArg::Ptr(p),
        ArgValue::U32(x) => KernelArg::U32(x),
        ArgValue::U64(x) => KernelArg::U64(x),
        ArgValue::F32(x) => KernelArg::F32(x),
        ArgValue::TensorMap(spec) => {
            KernelArg::TensorMap(einattn_runtime::tensor_map(&einattn_runtime::TiledView {
                address: spec.address,
                element_bytes: spec.dtype.bytes(),
                dims: spec.dims,
                strides: spec.strides,
                boxes: spec.boxes,
            })?)
        }
    })
}

/// The host values of a cascade tensor in storage order: drawn or read inputs, or the
/// declared default of a parameter.
pub fn host_values<'h>(
    cascade: &Cascade,
    inputs: &'h Inputs,
    name: &str,
) -> Result<std::borrow::Cow<'h, [f64]>> {
    let t = cascade
        .tensor_by_name(name)
        .ok_or_else(|| ExecError::Input(format!("`{name}` is not a tensor of the cascade")))?;
    match inputs.get(&t) {
        Some(d) => Ok(d.stored()),
        None => match cascade.tensors[t].default {
            Some(v) => {
                let n = usize::try_from(cascade.tensor_elements(t)).map_err(|_| {
                    ExecError::Input(format!(
                        "`{name}` has more elements than this host can hold"
                    ))
                })?;
                Ok(vec![v; n].into())
            }
            None => Err(ExecError::Input(format!("no values for `{name}`"))),
        },
    }
}

/// Checks a contract's `requires` (`NAME > 0`) against the scalar values `scalar` gives.
pub fn check_requires(
    contract: &LaunchContract,
    scalar: &dyn Fn(&str) -> Option<f64>,
) -> Result<()> {
    for req in &contract.requires {
        let Some(name) = req.strip_suffix(" > 0") else {
            return Err(ExecError::Input(format!(
                "`{}` requires `{req}`, which this launcher cannot check",
                contract.kernel
            )));
        };
        if let Some(v) = scalar(name) {
            if v.is_nan() || v <= 0.0 {
                return Err(ExecError::Input(format!(
                    "this kernel folds `{name}` into the max and needs {name} > 0 (got {v})"
                )));
            }
        }
    }
    Ok(())
}

struct WholeValues<'a> {
    gpu: &'a Gpu,
    contract: &'a LaunchContract,
    tensors: &'a HashMap<String, (Dtype, DeviceArray)>,
    scratch: &'a HashMap<String, std::cell::RefCell<DeviceArray>>,
    cascade: &'a Cascade,
    inputs: &'a Inputs,
}

impl ArgValues for WholeValues<'_> {
    fn pointer(&self, source: &Source) -> std::result::Result<u64, BindError> {
        match source {
            Source::Tensor { tensor } => self
                .tensors
                .get(tensor)
                .map(|(_, a)| a.address(self.gpu))
                .ok_or_else(|| BindError(format!("no device array for `{tensor}`"))),
            Source::Scratch { scratch } => self
                .scratch
                .get(scratch)
                .map(|a| a.borrow().address(self.gpu))
                .ok_or_else(|| BindError(format!("no scratch array `{scratch}`"))),
            other => Err(BindError(format!("{other:?} is not a pointer"))),
        }
    }

    fn size(&self, name: &str) -> std::result::Result<u64, BindError> {
        self.contract.compiled_size(name)
    }

    fn stride(&self, tensor: &str, axis: Axis) -> std::result::Result<u64, BindError> {
        self.contract
            .tensor(tensor)
            .and_then(|t| t.strides)
            .map(|s| s.along(axis))
            .ok_or_else(|| BindError(format!("`{tensor}` has no strides in the contract")))
    }

    fn scalar(&self, param: &str, default: Option<f64>) -> std::result::Result<f64, BindError> {
        match host_values(self.cascade, self.inputs, param) {
            Ok(v) => v
                .first()
                .copied()
                .ok_or_else(|| BindError(format!("`{param}` is empty"))),
            Err(_) => default.ok_or_else(|| BindError(format!("no value for `{param}`"))),
        }
    }
}

impl Whole {
    /// Uploads the tensors of `kernels` (in launch order) from `inputs` to GPU `ordinal`,
    /// allocates their scratch and binds every launch.
    pub fn load(
        ordinal: usize,
        kernels: &[KernelText],
        cascade: &Cascade,
        inputs: &Inputs,
    ) -> Result<Whole> {
        let (gpu, device) = device::open(ordinal)?;
        let mut tensors: HashMap<String, (Dtype, DeviceArray)> = HashMap::new();
        let mut scratch: HashMap<String, std::cell::RefCell<DeviceArray>> = HashMap::new();
        let mut outputs: Vec<String> = Vec::new();
        for (contract, _) in kernels {
            for t in &contract.tensors {
                if tensors.contains_key(&t.name) {
                    continue;
                }
                let n = usize::try_from(t.elements())
                    .map_err(|_| ExecError::Input(format!("`{}` is too large", t.name)))?;
                let array = match t.role {
                    TensorRole::Output => {
                        outputs.push(t.name.clone());
                        DeviceArray::filled(&gpu, t.dtype, n, f64::NAN)?
                    }
                    TensorRole::Input | TensorRole::Param => {
                        let values = host_values(cascade, inputs, &t.name)?;
                        if values.len() != n {
                            return Err(ExecError::Input(format!(
                                "`{}` has {} values, the kernel reads {n}",
                                t.name,
                                values.len()
                            )));
                        }
                        DeviceArray::upload(&gpu, t.dtype, &values)?
                    }
                };
                tensors.insert(t.name.clone(), (t.dtype, array));
            }
            for s in &contract.scratch {
                if scratch.contains_key(&s.name) {
                    continue;
                }
                let n = usize::try_from(s.elements)
                    .map_err(|_| ExecError::Input(format!("scratch `{}` is too large", s.name)))?;
                scratch.insert(
                    s.name.clone(),
                    std::cell::RefCell::new(DeviceArray::filled(&gpu, s.dtype, n, 0.0)?),
                );
            }
        }
        if outputs.is_empty() {
            return Err(ExecError::Input("no kernel writes an output".into()));
        }
        let mut launches = Vec::new();
        for (contract, text) in kernels {
            let values = WholeValues {
                gpu: &gpu,
                contract,
                tensors: &tensors,
                scratch: &scratch,
                cascade,
                inputs,
            };
            check_requires(contract, &|name| values.scalar(name, None).ok())?;
            let args = abi::bind(contract, &values)?;
            let kernel = gpu.load_ptx(text, &contract.kernel)?;
            launches.push(Launch {
                kernel,
                dims: dims(contract, contract.compiled_grid()?),
                args: args.into_iter().map(driver_arg).collect::<Result<_>>()?,
                zero: contract
                    .scratch
                    .iter()
                    .filter(|s| s.zero_before_launch)
                    .map(|s| s.name.clone())
                    .collect(),
            });
        }
        Ok(Whole {
            gpu,
            device,
            launches,
            tensors,
            scratch,
            outputs,
        })
    }

    /// Launches every kernel once, in order (asynchronously).
    pub fn run(&self) -> Result<()> {
        self.run_launches(0..self.launches.len())
    }

    /// Launches the kernels of `range` (positions in the launch order) once, in order.
    pub fn run_launches(&self, range: std::ops::Range<usize>) -> Result<()> {
        let launches = self
            .launches
            .get(range)
            .ok_or_else(|| ExecError::Input("launches past the loaded kernels".into()))?;
        for l in launches {
            for name in &l.zero {
                if let Some(a) = self.scratch.get(name) {
                    a.borrow_mut().zero(&self.gpu)?;
                }
            }
            self.gpu.launch(&l.kernel, l.dims, &l.args)?;
        }
        Ok(())
    }

    /// The names of the tensors the kernels write.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// An output tensor's values (waits for the launches).
    pub fn output(&self, name: &str) -> Result<Vec<f64>> {
        let (dtype, array) = self
            .tensors
            .get(name)
            .ok_or_else(|| ExecError::Input(format!("no output `{name}`")))?;
        array.download(&self.gpu, *dtype)
    }

    /// Registers and local memory of the last kernel (the one that writes the output).
    /// Each launch's kernel, its resources as the driver reports them and its dynamic
    /// shared memory, in launch order.
    pub fn resources(&self) -> Result<Vec<LaunchResources>> {
        if self.launches.is_empty() {
            return Err(ExecError::Input("no kernels".into()));
        }
        self.launches
            .iter()
            .map(|l| {
                Ok(LaunchResources {
                    entry: l.kernel.entry.clone(),
                    resources: l.kernel.resources()?,
                    dynamic_shared_bytes: l.dims.dynamic_smem_bytes,
                })
            })
            .collect()
    }
}

/// What one launch's kernel uses.
pub struct LaunchResources {
    pub entry: String,
    pub resources: KernelResources,
    pub dynamic_shared_bytes: u32,
}

impl LaunchResources {
    /// `entry (R registers, L B local, S B shared)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} registers, {} B local, {} B shared)",
            self.entry,
            self.resources.registers,
            self.resources.local_bytes,
            self.dynamic_shared_bytes
        )
    }
}

/// Every launch described, joined by ` then ` in launch order (the line `check` and
/// `bench` print: a split kernel and its merge both show).
pub fn describe_launches(launches: &[LaunchResources]) -> String {
    launches
        .iter()
        .map(LaunchResources::describe)
        .collect::<Vec<_>>()
        .join(" then ")
}

/// Launch dimensions of a contract for a grid.
pub fn dims(contract: &LaunchContract, grid: [u32; 3]) -> LaunchDims {
    LaunchDims {
        grid: (grid[0], grid[1], grid[2]),
        block: (contract.block[0], contract.block[1], contract.block[2]),
        dynamic_smem_bytes: contract.dynamic_shared_bytes,
    }
}
