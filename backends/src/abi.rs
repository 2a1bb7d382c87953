//! The launch contract: everything a launcher needs to run one compiled kernel, and the one
//! binder from what each parameter means to its value.
//!
//! A [`LaunchContract`] names the PTX entry and module, the block and the grid (as a
//! formula over named sizes, so a launcher can run the kernel on a slice of the problem),
//! the dynamic shared memory, the cascade tensors the kernel reads and writes with their
//! element types and layouts, the scratch arrays the launcher allocates, and every kernel
//! parameter in `.entry` order with where its value comes from ([`Source`]). A
//! [`Manifest`] (`manifest.json`) is a set of contracts and the order to launch them in.
//!
//! Every launcher (the single-GPU runner, the plan executor, generated launchers) fills the
//! parameters through [`bind`] and the grid through [`LaunchContract::grid`], giving values
//! by meaning ([`ArgValues`]); sizes stay `u64` until a parameter or grid dimension needs 32
//! bits, where a value that does not fit is an error, never a truncation.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The version tag of `manifest.json`.
pub const MANIFEST_FORMAT: &str = "einattn.manifest/1";

/// The kernels of one compile and the order to launch them in for the whole problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub cascade: String,
    /// The kernel family that read the cascade (`softmax`, `linear`, ...).
    pub family: String,
    /// Entries launched, in order, to compute the whole problem on one GPU (empty for the
    /// kernel set of an SP plan, whose steps say what to launch).
    pub launch: Vec<String>,
    pub kernels: Vec<LaunchContract>,
}

impl Manifest {
    pub fn kernel(&self, entry: &str) -> Option<&LaunchContract> {
        self.kernels.iter().find(|k| k.kernel == entry)
    }

    /// The main output: the first output the last kernel writes (the result the launch
    /// order ends with), else the first output any kernel writes. A family's
    /// [`crate::Compiled::formula`] computes this one.
    pub fn main_output(&self) -> Option<&str> {
        fn first_output(k: &LaunchContract) -> Option<&str> {
            k.tensors
                .iter()
                .find(|t| t.role == TensorRole::Output)
                .map(|t| t.name.as_str())
        }
        self.kernels
            .last()
            .and_then(first_output)
            .or_else(|| self.kernels.iter().find_map(first_output))
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    pub fn from_json(text: &str) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if m.format != MANIFEST_FORMAT {
            return Err(format!("format `{}` is not `{MANIFEST_FORMAT}`", m.format));
        }
        for entry in &m.launch {
            if m.kernel(entry).is_none() {
                return Err(format!(
                    "`launch` names `{entry}`, which is not a kernel of the manifest"
                ));
            }
        }
        for (i, k) in m.kernels.iter().enumerate() {
            k.check()?;
            let plain = !k.kernel.is_empty()
                && k.kernel
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !plain {
                return Err(format!(
                    "kernel name `{}` is not a PTX identifier",
                    k.kernel
                ));
            }
            if m.kernels[..i].iter().any(|o| o.kernel == k.kernel) {
                return Err(format!("kernel `{}` appears twice", k.kernel));
            }
        }
        Ok(m)
    }
}

/// Kernels with their PTX: what `compile -o DIR` writes (`manifest.json` and one
/// `<entry>.ptx` per kernel) and launchers read back.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelSet {
    pub manifest: Manifest,
    /// PTX text by entry.
    pub ptx: BTreeMap<String, String>,
}

impl KernelSet {
    /// Writes `manifest.json` and the modules into `dir` (which must exist); returns the
    /// paths written, the manifest last.
    pub fn write(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
        let mut written = Vec::new();
        let write = |name: &str, text: &str| -> Result<std::path::PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
            Ok(path)
        };
        for k in &self.manifest.kernels {
            let text = self
                .ptx
                .get(&k.kernel)
                .ok_or_else(|| format!("no PTX for `{}`", k.kernel))?;
            written.push(write(&k.ptx, text)?);
        }
        written.push(write("manifest.json", &self.manifest.to_json())?);
        Ok(written)
    }

    /// Reads `dir/manifest.json` and the module each contract names. Module names are
    /// plain file names inside `dir` (`<entry>.ptx`): a manifest cannot point elsewhere.
    pub fn read(dir: &std::path::Path) -> Result<KernelSet, String> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        let manifest =
            Manifest::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut ptx = BTreeMap::new();
        for k in &manifest.kernels {
            if k.ptx != format!("{}.ptx", k.kernel) {
                return Err(format!(
                    "{}: kernel `{}` names module `{}`; modules are `<entry>.ptx` beside the manifest",
                    path.display(),
                    k.kernel,
                    k.ptx
                ));
            }
            let module = dir.join(&k.ptx);
            let text = std::fs::read_to_string(&module)
                .map_err(|e| format!("cannot read `{}`: {e}", module.display()))?;
            if !text.contains(&format!(".entry {}(", k.kernel)) {
                return Err(format!(
                    "`{}` does not define the entry `{}`",
                    module.display(),
                    k.kernel
                ));
            }
            ptx.insert(k.kernel.clone(), text);
        }
        Ok(KernelSet { manifest, ptx })
    }
}

/// How to launch one kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchContract {
    /// The PTX `.entry`.
    pub kernel: String,
    /// The module's file name, next to the manifest.
    pub ptx: String,
    pub target: String,
    pub block: [u32; 3],
    /// The grid at the compiled sizes.
    pub grid: [u32; 3],
    /// The grid as a formula over [`LaunchContract::sizes`] names.
    pub grid_formula: [GridAxis; 3],
    pub dynamic_shared_bytes: u32,
    /// The sizes it was compiled for, by name (`batch`, `heads`, `n_q`, `n_k`, ...): the
    /// values of [`Source::Size`] parameters and grid formulas on the whole problem.
    pub sizes: BTreeMap<String, u64>,
    pub tensors: Vec<ContractTensor>,
    pub scratch: Vec<Scratch>,
    pub params: Vec<ContractParam>,
    /// Conditions on parameter values the kernel relies on (e.g. `scale > 0`).
    pub requires: Vec<String>,
    /// The family's own record of the compile (problem, schedule, strategy), for reports.
    pub family: serde_json::Value,
}

/// A cascade tensor the kernel reads or writes through a pointer parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContractTensor {
    pub name: String,
    pub role: TensorRole,
    pub dtype: Dtype,
    /// The cascade's shape (storage order = declared rank order, row-major).
    pub shape: Vec<u64>,
    /// Element strides of its batch, sequence and head ranks (0 for a rank it lacks), for
    /// kernels that index `[B, N, H, ...]` tensors.
    pub strides: Option<Strides>,
}

impl ContractTensor {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    Input,
    /// A parameter array (per-head decays, ALiBi slopes): f32.
    Param,
    Output,
}

/// Element strides along the batch, sequence and head ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strides {
    pub batch: u64,
    pub seq: u64,
    pub head: u64,
}

impl Strides {
    pub fn along(&self, axis: Axis) -> u64 {
        match axis {
            Axis::Batch => self.batch,
            Axis::Seq => self.seq,
            Axis::Head => self.head,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    Bf16,
    F16,
    F32,
    U32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
            Dtype::U32 => "u32",
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::U32 => 4,
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        Some(match name {
            "bf16" => Dtype::Bf16,
            "f16" => Dtype::F16,
            "f32" => Dtype::F32,
            "u32" => Dtype::U32,
            _ => return None,
        })
    }
}

/// A device array the launcher allocates for the kernel (chunk states, look-back flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scratch {
    pub name: String,
    pub dtype: Dtype,
    /// Elements at the compiled sizes.
    pub elements: u64,
    /// Zeroed before every launch (look-back flags), not only once.
    pub zero_before_launch: bool,
    /// What it holds, in words.
    pub what: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    Ptr,
    U32,
    U64,
    F32,
    /// A 128-byte tensor map for the copy engine, passed by value (`.param .align 64 .b8
    /// NAME[128]`); the launcher encodes it from a [`TensorMapSpec`].
    TensorMap,
}

/// One kernel parameter, in `.entry` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContractParam {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ParamType,
    pub from: Source,
}

/// Where a parameter's value comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The device address of a cascade tensor (see [`LaunchContract::tensors`]).
    Tensor { tensor: String },
    /// The device address of a scratch array (see [`LaunchContract::scratch`]).
    Scratch { scratch: String },
    /// A size by name (see [`LaunchContract::sizes`]).
    Size { size: String },
    /// The element stride of a tensor along one of its batch, sequence and head ranks.
    Stride { tensor: String, axis: Axis },
    /// The value of a scalar parameter of the cascade.
    Scalar { param: String, default: Option<f64> },
    /// A value the launcher computes for a helper kernel (the plan executor's combines).
    Argument { name: String },
    /// The tensor map of a `[batch, seq, heads, head_dim]` tensor for copies of
    /// `box_rows x box_cols` tiles (see [`TensorMapSpec`]): its sequence extent is the size
    /// `seq`, its head extent `heads` divided by the size `heads_per` (the query heads
    /// sharing one K/V head) when given.
    TensorMap {
        tensor: String,
        seq: String,
        heads_per: Option<String>,
        box_rows: u32,
        box_cols: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    Batch,
    Seq,
    Head,
}

/// One grid dimension: `times * clamp(ceil(product of sizes / divide_by), at_least,
/// at_most)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridAxis {
    pub sizes: Vec<String>,
    pub divide_by: u64,
    pub at_least: u64,
    /// A cap for grid-stride kernels, which loop over what the grid does not cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_most: Option<u64>,
    pub times: u64,
}

impl GridAxis {
    /// A fixed count.
    pub fn fixed(n: u64) -> GridAxis {
        GridAxis {
            sizes: Vec::new(),
            divide_by: 1,
            at_least: 0,
            at_most: None,
            times: n,
        }
    }

    /// `ceil(product of sizes / divide_by)`.
    pub fn ceil_div(sizes: &[&str], divide_by: u64) -> GridAxis {
        GridAxis {
            sizes: sizes.iter().map(|s| s.to_string()).collect(),
            divide_by,
            at_least: 0,
            at_most: None,
            times: 1,
        }
    }

    pub fn evaluate(
        &self,
        size: &dyn Fn(&str) -> Result<u64, BindError>,
    ) -> Result<u64, BindError> {
        let mut product: u64 = 1;
        for s in &self.sizes {
            product = product
                .checked_mul(size(s)?)
                .ok_or_else(|| BindError(format!("grid size {} overflows", self)))?;
        }
        if self.divide_by == 0 {
            return Err(BindError(format!("grid size {self} divides by 0")));
        }
        let mut n = product.div_ceil(self.divide_by).max(self.at_least);
        if let Some(cap) = self.at_most {
            n = n.min(cap);
        }
        n.checked_mul(self.times)
            .ok_or_else(|| BindError(format!("grid size {self} overflows")))
    }
}

impl fmt::Display for GridAxis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let product = if self.sizes.is_empty() {
            "1".to_string()
        } else {
            self.sizes.join(" * ")
        };
        let mut text = if self.divide_by == 1 {
            product
        } else {
            format!("ceil({product} / {})", self.divide_by)
        };
        text = match (self.at_least, self.at_most) {
            (0, None) => text,
            (lo, None) => format!("max({text}, {lo})"),
            (lo, Some(hi)) => format!("clamp({text}, {lo}, {hi})"),
        };
        if self.sizes.is_empty() {
            return write!(f, "{}", self.times);
        }
        if self.times != 1 {
            text = format!("{} * {text}", self.times);
        }
        f.write_str(&text)
    }
}

/// A parameter or grid value that could not be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindError(pub String);

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BindError {}

/// A parameter's value, ready for the driver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgValue {
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
    /// What the launcher encodes into the 128 bytes of a tensor-map parameter.
    TensorMap(TensorMapSpec),
}

/// A tiled tensor map, as `cuTensorMapEncodeTiled` takes it: a rank-4 view `[head_dim,
/// seq, heads, batch]` (innermost first) of a tensor, copied in boxes of `box_cols x
/// box_rows` elements into 128-byte-swizzled shared memory (the layout every shared tile
/// has, see the PTX printer), rows past the sequence's end filled with zeros. Every
/// launcher passes these fields to the driver as they are, with no interleave, the 128-byte
/// swizzle, 256-byte L2 promotion, zero fill and unit element strides;
/// [`TensorMapSpec::check`] holds the driver's rules, so a bad value is an error here and
/// not an opaque driver status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMapSpec {
    /// The tensor's device address.
    pub address: u64,
    pub dtype: Dtype,
    /// Extents, innermost first: head dim, sequence, heads, batch.
    pub dims: [u64; 4],
    /// Byte strides of dims 1, 2 and 3 (dim 0 is contiguous).
    pub strides: [u64; 3],
    /// Elements per copy along each dim: `[box_cols, box_rows, 1, 1]`.
    pub boxes: [u32; 4],
}

impl TensorMapSpec {
    /// The driver's rules for a tiled, 128-byte-swizzled map.
    pub fn check(&self) -> Result<(), BindError> {
        let bad = |what: String| Err(BindError(format!("tensor map: {what}")));
        if !self.address.is_multiple_of(16) {
            return bad(format!(
                "address {:#x} is not 16-byte aligned",
                self.address
            ));
        }
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 || d > 1 << 32 {
                return bad(format!("extent {d} of dim {i} is outside 1..=2^32"));
            }
        }
        for (i, &s) in self.strides.iter().enumerate() {
            if !s.is_multiple_of(16) || s >= 1 << 40 || s == 0 {
                return bad(format!(
                    "byte stride {s} of dim {} is not a nonzero multiple of 16 below 2^40",
                    i + 1
                ));
            }
        }
        for (i, &b) in self.boxes.iter().enumerate() {
            if b == 0 || b > 256 {
                return bad(format!("box {b} of dim {i} is outside 1..=256"));
            }
        }
        if u64::from(self.boxes[0]) * self.dtype.bytes() != 128 {
            return bad(format!(
                "a box row of {} {} elements is not the 128 bytes of the swizzle",
                self.boxes[0],
                self.dtype.name()
            ));
        }
        Ok(())
    }
}

/// What a launcher knows, by meaning: it answers the questions [`bind`] asks.
pub trait ArgValues {
    /// The device address of a tensor or scratch array ([`Source::Tensor`],
    /// [`Source::Scratch`]).
    fn pointer(&self, source: &Source) -> Result<u64, BindError>;
    fn size(&self, name: &str) -> Result<u64, BindError>;
    fn stride(&self, tensor: &str, axis: Axis) -> Result<u64, BindError>;
    fn scalar(&self, param: &str, default: Option<f64>) -> Result<f64, BindError>;
    /// A [`Source::Argument`] value.
    fn argument(&self, name: &str) -> Result<ArgValue, BindError> {
        Err(BindError(format!("no value for argument `{name}`")))
    }
}

/// The parameters of `contract` in `.entry` order, from `values`.
pub fn bind(contract: &LaunchContract, values: &dyn ArgValues) -> Result<Vec<ArgValue>, BindError> {
    contract
        .params
        .iter()
        .map(|p| {
            let whole = |v: u64| -> Result<ArgValue, BindError> {
                match p.ty {
                    ParamType::U32 => u32::try_from(v).map(ArgValue::U32).map_err(|_| {
                        BindError(format!(
                            "`{}` = {v} does not fit the kernel's 32-bit parameter",
                            p.name
                        ))
                    }),
                    ParamType::U64 => Ok(ArgValue::U64(v)),
                    ParamType::Ptr => Ok(ArgValue::Ptr(v)),
                    ParamType::F32 | ParamType::TensorMap => Err(BindError(format!(
                        "`{}` is a {:?} parameter, given the number {v}",
                        p.name, p.ty
                    ))),
                }
            };
            let value = match &p.from {
                Source::Tensor { .. } | Source::Scratch { .. } => {
                    ArgValue::Ptr(values.pointer(&p.from)?)
                }
                Source::Size { size } => whole(values.size(size)?)?,
                Source::Stride { tensor, axis } => whole(values.stride(tensor, *axis)?)?,
                Source::Scalar { param, default } => {
                    ArgValue::F32(values.scalar(param, *default)? as f32)
                }
                Source::Argument { name } => values.argument(name)?,
                Source::TensorMap {
                    tensor,
                    seq,
                    heads_per,
                    box_rows,
                    box_cols,
                } => ArgValue::TensorMap(tensor_map(
                    contract, values, tensor, seq, heads_per, *box_rows, *box_cols,
                )?),
            };
            let fits = matches!(
                (p.ty, value),
                (ParamType::Ptr, ArgValue::Ptr(_))
                    | (ParamType::U32, ArgValue::U32(_))
                    | (ParamType::U64, ArgValue::U64(_))
                    | (ParamType::F32, ArgValue::F32(_))
                    | (ParamType::TensorMap, ArgValue::TensorMap(_))
            );
            if !fits {
                return Err(BindError(format!(
                    "`{}` is a {:?} parameter, given {value:?}",
                    p.name, p.ty
                )));
            }
            Ok(value)
        })
        .collect()
}

/// The tensor map of `tensor` at the sizes and strides `values` gives (see
/// [`Source::TensorMap`]).
fn tensor_map(
    contract: &LaunchContract,
    values: &dyn ArgValues,
    tensor: &str,
    seq: &str,
    heads_per: &Option<String>,
    box_rows: u32,
    box_cols: u32,
) -> Result<TensorMapSpec, BindError> {
    let t = contract
        .tensor(tensor)
        .ok_or_else(|| BindError(format!("no tensor `{tensor}` for its tensor map")))?;
    let head_dim = t.shape.last().copied().unwrap_or(1);
    let mut heads = values.size("heads")?;
    if let Some(per) = heads_per {
        let per = values.size(per)?;
        if per == 0 || heads % per != 0 {
            return Err(BindError(format!(
                "{heads} heads are not groups of `{per}`"
            )));
        }
        heads /= per;
    }
    let bytes = t.dtype.bytes();
    let stride = |axis| -> Result<u64, BindError> {
        values
            .stride(tensor, axis)?
            .checked_mul(bytes)
            .ok_or_else(|| BindError(format!("a stride of `{tensor}` overflows")))
    };
    let dims = [head_dim, values.size(seq)?, heads, values.size("batch")?];
    let mut strides = [
        stride(Axis::Seq)?,
        stride(Axis::Head)?,
        stride(Axis::Batch)?,
    ];
    // An axis of extent 1 (a rank the tensor lacks, stride 0) is never stepped along: give
    // it the span of the axes inside it, which the driver accepts.
    let mut span = head_dim.saturating_mul(bytes);
    for i in 0..3 {
        if dims[i + 1] == 1 {
            strides[i] = span.next_multiple_of(16);
        }
        span = strides[i].saturating_mul(dims[i + 1]);
    }
    let spec = TensorMapSpec {
        address: values.pointer(&Source::Tensor {
            tensor: tensor.to_string(),
        })?,
        dtype: t.dtype,
        dims,
        strides,
        boxes: [box_cols, box_rows, 1, 1],
    };
    spec.check()
        .map_err(|e| BindError(format!("`{tensor}`: {e}")))?;
    Ok(spec)
}

impl LaunchContract {
    /// The grid for the sizes `size` gives, each dimension checked to fit the driver's 32
    /// bits (and the 65535 limit of y and z).
    pub fn grid(
        &self,
        size: &dyn Fn(&str) -> Result<u64, BindError>,
    ) -> Result<[u32; 3], BindError> {
        let mut out = [0u32; 3];
        for (i, axis) in self.grid_formula.iter().enumerate() {
            let v = axis.evaluate(size)?;
            let limit = if i == 0 {
                u64::from(u32::MAX >> 1)
            } else {
                65535
            };
            if v > limit {
                return Err(BindError(format!(
                    "grid dimension {} = {v} ({axis}) is over the limit of {limit}",
                    ["x", "y", "z"][i]
                )));
            }
            out[i] = v as u32;
        }
        Ok(out)
    }

    /// The grid at the compiled sizes.
    pub fn compiled_grid(&self) -> Result<[u32; 3], BindError> {
        self.grid(&|s| self.compiled_size(s))
    }

    pub fn compiled_size(&self, name: &str) -> Result<u64, BindError> {
        self.sizes
            .get(name)
            .copied()
            .ok_or_else(|| BindError(format!("`{}` has no size `{name}`", self.kernel)))
    }

    pub fn tensor(&self, name: &str) -> Option<&ContractTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensors with `role`, in contract order.
    pub fn tensors_with(&self, role: TensorRole) -> impl Iterator<Item = &ContractTensor> {
        self.tensors.iter().filter(move |t| t.role == role)
    }

    /// Consistency a hand-edited contract must keep before anything is launched with it:
    /// every parameter's source names something the contract declares, and the grid at
    /// the compiled sizes is the recorded one.
    pub fn check(&self) -> Result<(), String> {
        let k = &self.kernel;
        for p in &self.params {
            let known = match &p.from {
                Source::Tensor { tensor } => self.tensor(tensor).is_some(),
                Source::Scratch { scratch } => self.scratch.iter().any(|s| &s.name == scratch),
                Source::Size { size } => self.sizes.contains_key(size),
                Source::Stride { tensor, .. } => {
                    self.tensor(tensor).is_some_and(|t| t.strides.is_some())
                }
                Source::Scalar { .. } | Source::Argument { .. } => true,
                Source::TensorMap {
                    tensor,
                    seq,
                    heads_per,
                    ..
                } => {
                    self.tensor(tensor).is_some_and(|t| t.strides.is_some())
                        && [seq.as_str(), "heads", "batch"]
                            .into_iter()
                            .chain(heads_per.as_deref())
                            .all(|s| self.sizes.contains_key(s))
                }
            };
            if !known {
                return Err(format!(
                    "`{k}`: parameter `{}` reads {:?}, which the contract does not declare",
                    p.name, p.from
                ));
            }
        }
        for axis in &self.grid_formula {
            for s in &axis.sizes {
                if !self.sizes.contains_key(s) {
                    return Err(format!(
                        "`{k}`: the grid reads size `{s}`, which the contract does not declare"
                    ));
                }
            }
        }
        let grid = self.compiled_grid().map_err(|e| format!("`{k}`: {e}"))?;
        if grid != self.grid {
            return Err(format!(
                "`{k}`: the grid formula gives {grid:?} at the compiled sizes, the contract says {:?}",
                self.grid
            ));
        }
        if self.block.contains(&0)
            || self.block.iter().map(|&b| u64::from(b)).product::<u64>() > 1024
        {
            return Err(format!(
                "`{k}`: block {:?} is not a CUDA block shape",
                self.block
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract() -> LaunchContract {
        LaunchContract {
            kernel: "k".into(),
            ptx: "k.ptx".into(),
            target: "sm_80".into(),
            block: [128, 1, 1],
            grid: [16, 4, 1],
            grid_formula: [
                GridAxis::ceil_div(&["n_q"], 64),
                GridAxis::ceil_div(&["batch", "heads"], 1),
                GridAxis::fixed(1),
            ],
            dynamic_shared_bytes: 0,
            sizes: [("n_q", 1000), ("batch", 2), ("heads", 2)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensors: vec![ContractTensor {
                name: "Q".into(),
                role: TensorRole::Input,
                dtype: Dtype::Bf16,
                shape: vec![2, 1000, 2, 64],
                strides: Some(Strides {
                    batch: 128000,
                    seq: 128,
                    head: 64,
                }),
            }],
            scratch: vec![],
            params: vec![
                ContractParam {
                    name: "Q".into(),
                    ty: ParamType::Ptr,
                    from: Source::Tensor { tensor: "Q".into() },
                },
                ContractParam {
                    name: "n_q".into(),
                    ty: ParamType::U32,
                    from: Source::Size { size: "n_q".into() },
                },
                ContractParam {
                    name: "Q_sn".into(),
                    ty: ParamType::U64,
                    from: Source::Stride {
                        tensor: "Q".into(),
                        axis: Axis::Seq,
                    },
                },
                ContractParam {
                    name: "scale".into(),
                    ty: ParamType::F32,
                    from: Source::Scalar {
                        param: "scale".into(),
                        default: Some(0.125),
                    },
                },
            ],
            requires: vec![],
            family: serde_json::Value::Null,
        }
    }

    struct Values(u64);
    impl ArgValues for Values {
        fn pointer(&self, _: &Source) -> Result<u64, BindError> {
            Ok(0xdead_0000)
        }
        fn size(&self, _: &str) -> Result<u64, BindError> {
            Ok(self.0)
        }
        fn stride(&self, _: &str, axis: Axis) -> Result<u64, BindError> {
            Ok(if axis == Axis::Seq { 128 } else { 0 })
        }
        fn scalar(&self, _: &str, default: Option<f64>) -> Result<f64, BindError> {
            default.ok_or_else(|| BindError("no scalar".into()))
        }
    }

    #[test]
    fn binds_by_meaning_in_entry_order() {
        let args = bind(&contract(), &Values(1000)).expect("binds");
        assert_eq!(
            args,
            vec![
                ArgValue::Ptr(0xdead_0000),
                ArgValue::U32(1000),
                ArgValue::U64(128),
                ArgValue::F32(0.125)
            ]
        );
    }

    #[test]
    fn a_size_past_32_bits_is_an_error_not_a_truncation() {
        let err = bind(&contract(), &Values(4_294_967_360)).err();
        assert!(err.is_some_and(|e| e.0.contains("does not fit")));
        let c = contract();
        assert!(c.grid(&|_| Ok(1 << 40)).is_err());
        assert_eq!(c.grid(&|s| c.compiled_size(s)), Ok([16, 4, 1]));
    }

    #[test]
    fn hand_edits_that_break_the_contract_are_refused() {
        assert_eq!(contract().check(), Ok(()));
        let mut wrong_grid = contract();
        wrong_grid.grid = [17, 4, 1];
        assert!(wrong_grid.check().is_err());
        let mut unknown = contract();
        unknown.params[1].from = Source::Size { size: "n_z".into() };
        assert!(unknown.check().is_err());
        let mut block = contract();
        block.block = [2048, 1, 1];
        assert!(block.check().is_err());
    }

    #[test]
    fn grid_formulas_read_as_written() {
        let axes = &contract().grid_formula;
        assert_eq!(axes[0].to_string(), "ceil(n_q / 64)");
        assert_eq!(axes[1].to_string(), "batch * heads");
        assert_eq!(axes[2].to_string(), "1");
        let chunks = GridAxis {
            sizes: vec!["n_q".into()],
            divide_by: 512,
            at_least: 1,
            at_most: None,
            times: 1,
        };
        assert_eq!(chunks.to_string(), "max(ceil(n_q / 512), 1)");
        assert_eq!(chunks.evaluate(&|_| Ok(0)), Ok(1));
    }

    #[test]
    fn a_manifest_round_trips_and_rejects_unknown_launches() {
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            cascade: "c".into(),
            family: "softmax".into(),
            launch: vec!["k".into()],
            kernels: vec![contract()],
        };
        let back = Manifest::from_json(&m.to_json()).expect("parses");
        assert_eq!(back, m);
        let mut bad = m;
        bad.launch = vec!["nope".into()];
        assert!(Manifest::from_json(&bad.to_json()).is_err());
    }

    fn mapped(tensor: Strides, shape: Vec<u64>) -> LaunchContract {
        let mut c = contract();
        c.sizes.insert("n_k".into(), 1000);
        c.sizes.insert("kv_group".into(), 2);
        c.tensors.push(ContractTensor {
            name: "K".into(),
            role: TensorRole::Input,
            dtype: Dtype::Bf16,
            shape,
            strides: Some(tensor),
        });
        c.params = vec![ContractParam {
            name: "K_tmap".into(),
            ty: ParamType::TensorMap,
            from: Source::TensorMap {
                tensor: "K".into(),
                seq: "n_k".into(),
                heads_per: Some("kv_group".into()),
                box_rows: 128,
                box_cols: 64,
            },
        }];
        c
    }

    struct Compiled<'a>(&'a LaunchContract);
    impl ArgValues for Compiled<'_> {
        fn pointer(&self, _: &Source) -> Result<u64, BindError> {
            Ok(0x7f00_0000_0000)
        }
        fn size(&self, name: &str) -> Result<u64, BindError> {
            self.0.compiled_size(name)
        }
        fn stride(&self, tensor: &str, axis: Axis) -> Result<u64, BindError> {
            Ok(self
                .0
                .tensor(tensor)
                .and_then(|t| t.strides)
                .map_or(0, |s| s.along(axis)))
        }
        fn scalar(&self, _: &str, _: Option<f64>) -> Result<f64, BindError> {
            Ok(0.0)
        }
    }

    #[test]
    fn a_tensor_map_is_the_tensors_four_axes_in_bytes() {
        // K [B=2, N=1000, H/group=1, D=128]: one K/V head (MQA-like), so its head axis has
        // extent 1 and stride 0 in the cascade; the map gives it the span inside it.
        let c = mapped(
            Strides {
                batch: 128_000,
                seq: 128,
                head: 0,
            },
            vec![2, 1000, 128],
        );
        assert_eq!(c.check(), Ok(()));
        let args = bind(&c, &Compiled(&c)).expect("binds");
        let [ArgValue::TensorMap(m)] = args[..] else {
            panic!("{args:?}")
        };
        assert_eq!(m.dims, [128, 1000, 1, 2]);
        assert_eq!(m.strides, [256, 256_000, 256_000]);
        assert_eq!(m.boxes, [64, 128, 1, 1]);
        assert_eq!(m.address, 0x7f00_0000_0000);
    }

    #[test]
    fn a_tensor_map_the_copy_engine_cannot_use_is_a_bind_error() {
        // Rows 8 bytes apart: not a multiple of 16.
        let c = mapped(
            Strides {
                batch: 4000,
                seq: 4,
                head: 0,
            },
            vec![2, 1000, 128],
        );
        let err = bind(&c, &Compiled(&c)).err();
        assert!(err.is_some_and(|e| e.0.contains("multiple of 16")));
        // A tensor map from a size the contract lacks is refused before any launch.
        let mut missing = c.clone();
        missing.sizes.remove("kv_group");
        assert!(missing.check().is_err());
    }
}
