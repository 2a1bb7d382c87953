//! The generated Rust module: one type per compiled cascade, written from its launch
//! contracts (`einattn_backends::abi`).
//!
//! Everything a launch needs that the compile fixed (sizes, strides, grid, block, dynamic
//! shared memory) is written as a literal; what the caller gives (device slices, scalar
//! parameters) is checked against the contract before any device memory is touched. Every
//! parameter is bound through `abi::bind`, the binder all launchers share: it checks that
//! sizes fit their parameter's width here, at build time, and this file writes each value
//! where the binder placed it. Paths are fully qualified (`::cudarc::driver::...`) so the
//! module can be `include!`d next to the user's own `use` lines.

use einattn_backends::abi::{
    self, ArgValue, ArgValues, Axis, BindError, Dtype, LaunchContract, Manifest, Source, TensorRole,
};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One compiled cascade: what its generated type is made from.
pub struct Unit {
    pub type_name: String,
    /// The `.ein` path as the build script gave it.
    pub source: String,
    pub cascade: String,
    pub defines: Vec<(String, u64)>,
    pub target: &'static str,
    pub manifest: Manifest,
    pub ptx: Vec<PtxFile>,
}

/// One kernel's PTX, written beside the module.
pub struct PtxFile {
    pub entry: String,
    pub file: String,
    pub text: String,
}

/// A cascade tensor the launcher takes as a device slice.
struct TensorArg {
    name: String,
    ident: String,
    dtype: Dtype,
    shape: Vec<u64>,
    output: bool,
}

struct ScratchArray {
    name: String,
    ident: String,
    dtype: Dtype,
    elements: u64,
    what: String,
}

struct Scalar {
    name: String,
    ident: String,
    default: Option<f64>,
}

/// A kernel of the unit, in launch order.
struct Launch<'a> {
    contract: &'a LaunchContract,
    field: String,
    ptx_file: &'a str,
}

/// Rust's keywords (strict and reserved), which a tensor name may not become.
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
    "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait", "true", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
];

/// `attention_causal` -> `AttentionCausal`.
pub fn type_name(cascade: &str) -> String {
    let mut out = String::new();
    for part in cascade.split(|c: char| !c.is_ascii_alphanumeric()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert_str(0, "Kernel");
    }
    out
}

pub fn is_type_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
        && !KEYWORDS.contains(&name)
}

/// `AttentionCausal` -> `attention_causal`; `QK` -> `qk`; any other character -> `_`.
pub fn snake(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let after_lower = i > 0 && chars[i - 1].is_ascii_lowercase();
            let before_lower = i > 0
                && chars[i - 1].is_ascii_uppercase()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if (after_lower || before_lower) && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, 'x');
    }
    out
}

/// A snake-case identifier for `name` that is no keyword and not in `taken` (which it
/// joins).
fn ident(name: &str, taken: &mut BTreeSet<String>) -> String {
    let base = snake(name);
    let base = if KEYWORDS.contains(&base.as_str()) || base == "_" {
        format!("{base}_")
    } else {
        base
    };
    let mut candidate = base.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{base}_{n}");
        n += 1;
    }
    taken.insert(candidate.clone());
    candidate
}

fn rust_type(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "::half::bf16",
        Dtype::F16 => "::half::f16",
        Dtype::F32 => "f32",
        Dtype::U32 => "u32",
    }
}

/// An f64 as an f32 literal that reads back as the same f32.
fn f32_literal(v: f64) -> String {
    let x = v as f32;
    if x.is_infinite() {
        return if x > 0.0 {
            "f32::INFINITY"
        } else {
            "f32::NEG_INFINITY"
        }
        .into();
    }
    if x.is_nan() {
        return "f32::NAN".into();
    }
    let text = format!("{x:?}");
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}

fn string_literal(s: &str) -> String {
    format!("{s:?}")
}

/// The values a contract's fixed parameters take; pointers and scalars are placeholders,
/// written as expressions instead.
struct Fixed<'a>(&'a LaunchContract);

impl ArgValues for Fixed<'_> {
    fn pointer(&self, _: &Source) -> Result<u64, BindError> {
        Ok(0)
    }
    fn size(&self, name: &str) -> Result<u64, BindError> {
        self.0.compiled_size(name)
    }
    fn stride(&self, tensor: &str, axis: Axis) -> Result<u64, BindError> {
        self.0
            .tensor(tensor)
            .and_then(|t| t.strides)
            .map(|s| s.along(axis))
            .ok_or_else(|| BindError(format!("`{tensor}` has no strides in the contract")))
    }
    fn scalar(&self, _: &str, default: Option<f64>) -> Result<f64, BindError> {
        Ok(default.unwrap_or(0.0))
    }
    // `argument` keeps the trait's answer: a helper kernel's launcher-computed value has no
    // place in a whole-problem launch.
}

/// The module text for `units`; an error names the unit (by index) that has no launcher.
pub fn module(units: &[Unit]) -> Result<String, (usize, String)> {
    let mut out = String::new();
    header(&mut out, units);
    error_type(&mut out);
    let maps = units.iter().any(|u| {
        u.manifest.kernels.iter().any(|k| {
            k.params
                .iter()
                .any(|p| matches!(p.from, Source::TensorMap { .. }))
        })
    });
    if maps {
        tensor_map_helper(&mut out);
    }
    for (i, unit) in units.iter().enumerate() {
        kernel_type(&mut out, unit).map_err(|e| (i, e))?;
    }
    Ok(out)
}

macro_rules! w {
    ($out:expr) => {
        $out.push('\n');
    };
    ($out:expr, $($t:tt)*) => {
        // Writing to a String cannot fail.
        let _ = writeln!($out, $($t)*);
    };
}

fn header(out: &mut String, units: &[Unit]) {
    w!(
        out,
        "// @generated by einattn-build {}. Do not edit: change the `.ein` sources or the",
        env!("CARGO_PKG_VERSION")
    );
    w!(out, "// build script instead.");
    w!(out, "//");
    for u in units {
        w!(
            out,
            "// {}: `{}` from {}{}, {}, {} family, {} kernel{}",
            u.type_name,
            u.cascade,
            u.source,
            defines_text(&u.defines),
            u.target,
            u.manifest.family,
            u.manifest.launch.len(),
            if u.manifest.launch.len() == 1 {
                ""
            } else {
                "s"
            }
        );
    }
    w!(out, "//");
    w!(
        out,
        "// Each type loads its PTX (embedded with `include_str!`) into a cudarc context and"
    );
    w!(
        out,
        "// launches on a stream of that context. Tensors are device slices (`CudaSlice`,"
    );
    w!(
        out,
        "// `CudaView`, `CudaViewMut`) of `half::bf16` or `half::f16` (cudarc's `f16` feature)"
    );
    w!(
        out,
        "// and `f32`, row-major in the order the cascade declares their ranks. Sizes are"
    );
    w!(
        out,
        "// constants of the compile: a slice of another length, or of another context, is"
    );
    w!(out, "// refused before any device memory is touched.");
    w!(out);
}

fn defines_text(defines: &[(String, u64)]) -> String {
    if defines.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = defines.iter().map(|(n, v)| format!("-D {n}={v}")).collect();
    format!(" ({})", parts.join(" "))
}

/// The tensor-map parameter and its encoder, for kernels whose tiles the copy engine loads
/// (a `TensorMapSpec`'s fixed layout: rank 4, 128-byte swizzle, zeros past the ends).
fn tensor_map_helper(out: &mut String) {
    out.push_str(
        r#"/// A tensor map the driver encoded, passed to the kernel by value.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct TensorMap(::cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte value the kernel takes by value.
unsafe impl ::cudarc::driver::DeviceRepr for TensorMap {}

impl TensorMap {
    /// A rank-4 tiled view of `address`: extents innermost first, byte strides of dims
    /// 1..4, the box one copy moves (elements are 2-byte values the copy engine moves as is).
    fn tiled(
        kernel: &'static str,
        what: &'static str,
        address: u64,
        dims: [u64; 4],
        strides: [u64; 3],
        boxes: [u32; 4],
    ) -> ::std::result::Result<TensorMap, KernelError> {
        use ::cudarc::driver::sys as cu;
        let mut map = cu::CUtensorMap { opaque: [0; 16] };
        let element_strides = [1u32; 4];
        // SAFETY: every pointer addresses an array of the rank's length that lives through
        // the call; the driver only writes `map`.
        let status = unsafe {
            cu::cuTensorMapEncodeTiled(
                &mut map,
                cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                4,
                ::std::ptr::with_exposed_provenance_mut(address as usize),
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        status.result().map_err(KernelError::driver(kernel, what))?;
        Ok(TensorMap(map))
    }
}

"#,
    );
}

fn error_type(out: &mut String) {
    out.push_str(
        r#"/// Why a kernel could not be loaded or launched. `kernel` is the generated type's name.
#[derive(Debug)]
#[allow(dead_code)] // generated API: a program uses what it needs of it
pub enum KernelError {
    /// The GPU cannot run the kernel's PTX target.
    Device {
        kernel: &'static str,
        message: ::std::string::String,
    },
    /// A device slice does not hold the elements the kernel was compiled for.
    Length {
        kernel: &'static str,
        tensor: &'static str,
        expected: usize,
        got: usize,
    },
    /// A slice or the stream belongs to another CUDA context than the loaded kernel.
    Context {
        kernel: &'static str,
        what: &'static str,
    },
    /// A scalar parameter breaks a condition the kernel relies on.
    Requires {
        kernel: &'static str,
        condition: &'static str,
        value: f32,
    },
    /// A CUDA driver call failed.
    Driver {
        kernel: &'static str,
        what: &'static str,
        source: ::cudarc::driver::DriverError,
    },
}

impl ::std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
        match self {
            KernelError::Device { kernel, message } => write!(f, "{kernel}: {message}"),
            KernelError::Length {
                kernel,
                tensor,
                expected,
                got,
            } => write!(
                f,
                "{kernel}: `{tensor}` has {got} elements; the kernel was compiled for {expected}"
            ),
            KernelError::Context { kernel, what } => write!(
                f,
                "{kernel}: {what} belongs to another CUDA context than the one the kernel was loaded into"
            ),
            KernelError::Requires {
                kernel,
                condition,
                value,
            } => write!(f, "{kernel}: the kernel needs {condition} (got {value})"),
            KernelError::Driver {
                kernel,
                what,
                source,
            } => write!(f, "{kernel}: CUDA driver error while {what}: {source}"),
        }
    }
}

impl ::std::error::Error for KernelError {
    fn source(&self) -> ::std::option::Option<&(dyn ::std::error::Error + 'static)> {
        match self {
            KernelError::Driver { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl KernelError {
    fn driver(
        kernel: &'static str,
        what: &'static str,
    ) -> impl FnOnce(::cudarc::driver::DriverError) -> KernelError {
        move |source| KernelError::Driver {
            kernel,
            what,
            source,
        }
    }

    /// Refuses what lives in another context than `context`.
    fn check_context(
        kernel: &'static str,
        what: &'static str,
        of: &::cudarc::driver::CudaContext,
        context: &::cudarc::driver::CudaContext,
    ) -> ::std::result::Result<(), KernelError> {
        if of.cu_ctx() == context.cu_ctx() {
            Ok(())
        } else {
            Err(KernelError::Context { kernel, what })
        }
    }

    /// Refuses a slice of the wrong length or context.
    fn check_slice(
        kernel: &'static str,
        tensor: &'static str,
        got: usize,
        expected: usize,
        of: &::cudarc::driver::CudaContext,
        context: &::cudarc::driver::CudaContext,
    ) -> ::std::result::Result<(), KernelError> {
        if got != expected {
            return Err(KernelError::Length {
                kernel,
                tensor,
                expected,
                got,
            });
        }
        KernelError::check_context(kernel, tensor, of, context)
    }
}
"#,
    );
}

/// The tensors, scratch arrays and scalars of every kernel of `unit`, each once.
struct Interface {
    tensors: Vec<TensorArg>,
    scratch: Vec<ScratchArray>,
    scalars: Vec<Scalar>,
    launches: Vec<LaunchSpec>,
}

/// What one kernel reads of the interface.
struct LaunchSpec {
    /// `params.x > 0` conditions: (scalar index, condition text).
    requires: Vec<(usize, String)>,
}

fn interface(launches: &[Launch]) -> Result<Interface, String> {
    // Names the launcher's own arguments and fields use.
    let mut arg_names: BTreeSet<String> = ["stream", "params", "scratch", "self", "context"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut tensors: Vec<TensorArg> = Vec::new();
    let mut scratch: Vec<ScratchArray> = Vec::new();
    let mut scratch_fields = BTreeSet::new();
    let mut scalars: Vec<Scalar> = Vec::new();
    let mut scalar_fields = BTreeSet::new();
    let mut specs = Vec::new();
    for l in launches {
        let c = l.contract;
        for t in &c.tensors {
            match tensors.iter_mut().find(|a| a.name == t.name) {
                Some(a) => {
                    if a.dtype != t.dtype || a.shape != t.shape {
                        return Err(format!(
                            "the kernels disagree on `{}` ({} {:?} and {} {:?})",
                            t.name,
                            a.dtype.name(),
                            a.shape,
                            t.dtype.name(),
                            t.shape
                        ));
                    }
                    a.output |= t.role == TensorRole::Output;
                }
                None => tensors.push(TensorArg {
                    name: t.name.clone(),
                    ident: ident(&t.name, &mut arg_names),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    output: t.role == TensorRole::Output,
                }),
            }
        }
        for s in &c.scratch {
            match scratch.iter().find(|a| a.name == s.name) {
                Some(a) if a.dtype != s.dtype || a.elements != s.elements => {
                    return Err(format!(
                        "the kernels disagree on the scratch array `{}`",
                        s.name
                    ))
                }
                Some(_) => {}
                None => scratch.push(ScratchArray {
                    name: s.name.clone(),
                    ident: ident(&s.name, &mut scratch_fields),
                    dtype: s.dtype,
                    elements: s.elements,
                    what: s.what.clone(),
                }),
            }
        }
        for p in &c.params {
            if let Source::Scalar { param, default } = &p.from {
                match scalars.iter().find(|s| &s.name == param) {
                    Some(s) if s.default != *default => {
                        return Err(format!("the kernels disagree on the default of `{param}`"))
                    }
                    Some(_) => {}
                    None => scalars.push(Scalar {
                        name: param.clone(),
                        ident: ident(param, &mut scalar_fields),
                        default: *default,
                    }),
                }
            }
        }
        let mut requires = Vec::new();
        for r in &c.requires {
            let name = r.strip_suffix(" > 0").ok_or_else(|| {
                format!(
                    "`{}` requires `{r}`, which einattn-build cannot check",
                    c.kernel
                )
            })?;
            let i = scalars.iter().position(|s| s.name == name).ok_or_else(|| {
                format!(
                    "`{}` requires `{r}`, but `{name}` is not one of its scalar parameters",
                    c.kernel
                )
            })?;
            requires.push((i, r.clone()));
        }
        specs.push(LaunchSpec { requires });
    }
    if !tensors.iter().any(|t| t.output) {
        return Err("no kernel writes an output".into());
    }
    // Inputs and parameter arrays first, then outputs, each in contract order.
    tensors.sort_by_key(|t| t.output);
    Ok(Interface {
        tensors,
        scratch,
        scalars,
        launches: specs,
    })
}

fn kernel_type(out: &mut String, unit: &Unit) -> Result<(), String> {
    let mut fields = BTreeSet::from(["context".to_string()]);
    let mut launches = Vec::new();
    for entry in &unit.manifest.launch {
        let contract = unit
            .manifest
            .kernel(entry)
            .ok_or_else(|| format!("the manifest launches `{entry}` but has no contract for it"))?;
        contract.check()?;
        let ptx = unit
            .ptx
            .iter()
            .find(|p| &p.entry == entry)
            .ok_or_else(|| format!("no PTX for `{entry}`"))?;
        launches.push(Launch {
            contract,
            field: ident(entry, &mut fields),
            ptx_file: &ptx.file,
        });
    }
    if launches.is_empty() {
        return Err("the compile launches no kernel".into());
    }
    let face = interface(&launches)?;
    let name = &unit.type_name;
    let params_type = format!("{name}Params");
    let scratch_type = format!("{name}Scratch");
    let has_scratch = !face.scratch.is_empty();

    // The type and its documentation.
    w!(out);
    w!(
        out,
        "/// `{}` from `{}`{}, compiled for {} by the {} family.",
        unit.cascade,
        unit.source,
        defines_text(&unit.defines),
        unit.target,
        unit.manifest.family
    );
    w!(out, "///");
    w!(
        out,
        "/// [`{name}::launch`] takes these tensors (row-major, contiguous), in this order:"
    );
    for t in &face.tensors {
        w!(
            out,
            "/// - `{}`: `{}` {:?}, {}{}",
            t.ident,
            t.name,
            t.shape,
            t.dtype.name(),
            if t.output { ", written" } else { "" }
        );
    }
    w!(out, "///");
    w!(out, "/// Kernels, in launch order:");
    for l in &launches {
        let c = l.contract;
        w!(
            out,
            "/// - `{}`: grid {:?}, {} threads, {} B of dynamic shared memory",
            c.kernel,
            c.grid,
            c.block[0] * c.block[1] * c.block[2],
            c.dynamic_shared_bytes
        );
    }
    w!(
        out,
        "#[allow(dead_code)] // generated API: a program uses what it needs of it"
    );
    w!(out, "pub struct {name} {{");
    w!(
        out,
        "    context: ::std::sync::Arc<::cudarc::driver::CudaContext>,"
    );
    for l in &launches {
        w!(out, "    {}: ::cudarc::driver::CudaFunction,", l.field);
    }
    w!(out, "}}");

    params_struct(out, name, &params_type, &face);
    if has_scratch {
        w!(out);
        w!(
            out,
            "/// Device arrays [`{name}`]'s kernels use during a launch. [`{name}::launch`] allocates"
        );
        w!(
            out,
            "/// them each time; keep one and call [`{name}::launch_with_scratch`] to skip that."
        );
        w!(
            out,
            "#[allow(dead_code)] // generated API: a program uses what it needs of it"
        );
        w!(out, "pub struct {scratch_type} {{");
        for s in &face.scratch {
            w!(
                out,
                "    /// {} ({} {})",
                s.what,
                s.elements,
                s.dtype.name()
            );
            w!(
                out,
                "    {}: ::cudarc::driver::CudaSlice<{}>,",
                s.ident,
                rust_type(s.dtype)
            );
        }
        w!(out, "}}");
    }

    // Constants.
    w!(out);
    w!(
        out,
        "#[allow(dead_code)] // generated API: a program uses what it needs of it"
    );
    w!(out, "impl {name} {{");
    w!(out, "    /// The generated type's name, as errors give it.");
    w!(
        out,
        "    pub const NAME: &'static str = {};",
        string_literal(name)
    );
    w!(
        out,
        "    /// The `.ein` source, as the build script named it."
    );
    w!(
        out,
        "    pub const SOURCE: &'static str = {};",
        string_literal(&unit.source)
    );
    w!(
        out,
        "    /// The size bindings of the compile (`-D NAME=VALUE`)."
    );
    let defines: Vec<String> = unit
        .defines
        .iter()
        .map(|(n, v)| format!("({}, {v})", string_literal(n)))
        .collect();
    w!(
        out,
        "    pub const DEFINES: &'static [(&'static str, u64)] = &[{}];",
        defines.join(", ")
    );
    w!(out, "    /// The PTX target.");
    w!(
        out,
        "    pub const TARGET: &'static str = {};",
        string_literal(unit.target)
    );
    for t in &face.tensors {
        let upper = t.ident.to_ascii_uppercase();
        let elements: u64 = t.shape.iter().product();
        let elements = usize::try_from(elements)
            .map_err(|_| format!("`{}` has more elements than a usize holds", t.name))?;
        let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        w!(out, "    /// The shape of `{}`.", t.name);
        w!(
            out,
            "    pub const {upper}_SHAPE: [usize; {}] = [{}];",
            t.shape.len(),
            dims.join(", ")
        );
        w!(out, "    /// The elements of `{}`.", t.name);
        w!(out, "    pub const {upper}_LEN: usize = {elements};");
    }
    w!(out, "}}");

    // load, launch, check, enqueue.
    w!(out);
    w!(
        out,
        "#[allow(dead_code)] // generated API: a program uses what it needs of it"
    );
    w!(out, "impl {name} {{");
    load_fn(out, unit, &launches)?;
    let slice_args = |out: &mut String| tensor_params(out, &face);
    let uses_params_in_check = face.launches.iter().any(|l| !l.requires.is_empty());
    let uses_params_in_enqueue = !face.scalars.is_empty();
    let params_arg = if uses_params_in_check || uses_params_in_enqueue {
        "params"
    } else {
        "_params"
    };
    let tensor_idents: Vec<&str> = face.tensors.iter().map(|t| t.ident.as_str()).collect();
    let check_call = |out: &mut String| {
        // Outputs are `&mut`: `check` reads them through a shared reborrow.
        let mut args: Vec<String> = face
            .tensors
            .iter()
            .map(|t| {
                if t.output {
                    format!("&*{}", t.ident)
                } else {
                    t.ident.clone()
                }
            })
            .collect();
        if uses_params_in_check {
            args.push("params".into());
        }
        w!(out, "        self.check(stream, {})?;", args.join(", "));
    };
    let enqueue_call = |out: &mut String, scratch: Option<&str>| {
        let mut args: Vec<String> = Vec::new();
        if let Some(s) = scratch {
            args.push(s.to_string());
        }
        args.extend(tensor_idents.iter().map(|t| t.to_string()));
        if uses_params_in_enqueue {
            args.push("params".into());
        }
        w!(out, "        self.enqueue(stream, {})", args.join(", "));
    };

    w!(out);
    w!(
        out,
        "    /// Checks every slice and parameter against the launch contract, then enqueues the"
    );
    w!(
        out,
        "    /// kernels on `stream` (asynchronously: synchronize the stream before reading outputs)."
    );
    if has_scratch {
        w!(
            out,
            "    /// Allocates the scratch arrays on `stream` and frees them after the kernels (stream-ordered)."
        );
    }
    w!(
        out,
        "    #[allow(clippy::too_many_arguments)] // one argument per tensor of the cascade"
    );
    w!(out, "    pub fn launch(");
    w!(out, "        &self,");
    w!(
        out,
        "        stream: &::std::sync::Arc<::cudarc::driver::CudaStream>,"
    );
    slice_args(out);
    w!(out, "        {params_arg}: &{params_type},");
    w!(out, "    ) -> ::std::result::Result<(), KernelError> {{");
    check_call(out);
    if has_scratch {
        w!(out, "        let mut scratch = self.scratch(stream)?;");
        enqueue_call(out, Some("&mut scratch"));
    } else {
        enqueue_call(out, None);
    }
    w!(out, "    }}");

    if has_scratch {
        w!(out);
        w!(
            out,
            "    /// [`{name}::launch`] with scratch arrays from [`{name}::scratch`], reused across launches"
        );
        w!(
            out,
            "    /// on one stream (a launch on another stream must not overlap a launch that uses them)."
        );
        w!(
            out,
            "    #[allow(clippy::too_many_arguments)] // one argument per tensor of the cascade"
        );
        w!(out, "    pub fn launch_with_scratch(");
        w!(out, "        &self,");
        w!(
            out,
            "        stream: &::std::sync::Arc<::cudarc::driver::CudaStream>,"
        );
        w!(out, "        scratch: &mut {scratch_type},");
        slice_args(out);
        w!(out, "        {params_arg}: &{params_type},");
        w!(out, "    ) -> ::std::result::Result<(), KernelError> {{");
        check_call(out);
        for s in &face.scratch {
            w!(
                out,
                "        KernelError::check_slice(Self::NAME, {}, scratch.{}.len(), {}, scratch.{}.context(), &self.context)?;",
                string_literal(&format!("scratch `{}`", s.name)),
                s.ident,
                s.elements,
                s.ident
            );
        }
        enqueue_call(out, Some("scratch"));
        w!(out, "    }}");

        w!(out);
        w!(
            out,
            "    /// Allocates the scratch arrays of a launch on `stream`, zeroed."
        );
        w!(out, "    pub fn scratch(");
        w!(out, "        &self,");
        w!(
            out,
            "        stream: &::std::sync::Arc<::cudarc::driver::CudaStream>,"
        );
        w!(
            out,
            "    ) -> ::std::result::Result<{scratch_type}, KernelError> {{"
        );
        w!(
            out,
            "        KernelError::check_context(Self::NAME, \"the stream\", stream.context(), &self.context)?;"
        );
        w!(out, "        Ok({scratch_type} {{");
        for s in &face.scratch {
            w!(out, "            {}: stream", s.ident);
            w!(
                out,
                "                .alloc_zeros::<{}>({})",
                rust_type(s.dtype),
                s.elements
            );
            w!(
                out,
                "                .map_err(KernelError::driver(Self::NAME, {}))?,",
                string_literal(&format!("allocating the scratch array `{}`", s.name))
            );
        }
        w!(out, "        }})");
        w!(out, "    }}");
    }

    check_fn(out, &face, &params_type, uses_params_in_check);
    enqueue_fn(
        out,
        &face,
        &launches,
        &params_type,
        has_scratch.then_some(scratch_type.as_str()),
        uses_params_in_enqueue,
    )?;
    w!(out, "}}");
    Ok(())
}

/// The device-slice parameters of a launch method, one per tensor: outputs mutable.
fn tensor_params(out: &mut String, face: &Interface) {
    for t in &face.tensors {
        let (reference, trait_name) = if t.output {
            ("&mut ", "DevicePtrMut")
        } else {
            ("&", "DevicePtr")
        };
        w!(
            out,
            "        {}: {reference}impl ::cudarc::driver::{trait_name}<{}>,",
            t.ident,
            rust_type(t.dtype)
        );
    }
}

fn params_struct(out: &mut String, name: &str, params_type: &str, face: &Interface) {
    w!(out);
    w!(
        out,
        "/// The scalar parameters of [`{name}`]{}.",
        if face.scalars.iter().all(|s| s.default.is_some()) {
            ", `Default` giving the cascade's defaults"
        } else {
            ""
        }
    );
    let all_default = face.scalars.iter().all(|s| s.default.is_some());
    if all_default {
        if face.scalars.is_empty() {
            w!(out, "#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]");
        } else {
            w!(out, "#[derive(Clone, Copy, Debug, PartialEq)]");
        }
    } else {
        w!(out, "#[derive(Clone, Copy, Debug, PartialEq)]");
    }
    w!(
        out,
        "#[allow(dead_code)] // generated API: a program uses what it needs of it"
    );
    if face.scalars.is_empty() {
        w!(out, "pub struct {params_type} {{}}");
        return;
    }
    w!(out, "pub struct {params_type} {{");
    for s in &face.scalars {
        let requires: Vec<&str> = face
            .launches
            .iter()
            .flat_map(|l| &l.requires)
            .filter(|(i, _)| face.scalars[*i].name == s.name)
            .map(|(_, r)| r.as_str())
            .collect();
        let mut doc = format!("`{}`", s.name);
        if let Some(d) = s.default {
            doc.push_str(&format!(" (default {d})"));
        }
        if let Some(r) = requires.first() {
            doc.push_str(&format!("; the kernel needs {r}"));
        }
        w!(out, "    /// {doc}");
        w!(out, "    pub {}: f32,", s.ident);
    }
    w!(out, "}}");
    if all_default {
        w!(out);
        w!(out, "impl Default for {params_type} {{");
        w!(out, "    fn default() -> Self {{");
        w!(out, "        {params_type} {{");
        for s in &face.scalars {
            w!(
                out,
                "            {}: {},",
                s.ident,
                f32_literal(s.default.unwrap_or_default())
            );
        }
        w!(out, "        }}");
        w!(out, "    }}");
        w!(out, "}}");
    }
}

fn load_fn(out: &mut String, unit: &Unit, launches: &[Launch]) -> Result<(), String> {
    w!(
        out,
        "    /// Loads the kernels into `context` (the driver compiles the PTX for the GPU); refuses a"
    );
    w!(out, "    /// GPU that cannot run the target.");
    w!(out, "    pub fn load(");
    w!(
        out,
        "        context: &::std::sync::Arc<::cudarc::driver::CudaContext>,"
    );
    w!(out, "    ) -> ::std::result::Result<Self, KernelError> {{");
    w!(out, "        let (major, minor) = context");
    w!(out, "            .compute_capability()");
    w!(
        out,
        "            .map_err(KernelError::driver(Self::NAME, \"reading the compute capability\"))?;"
    );
    let (condition, needs) = match unit.target {
        "sm_90a" => (
            "(major, minor) != (9, 0)",
            "sm_90a PTX runs only on compute capability 9.0 (Hopper); compile for sm_80 to run elsewhere",
        ),
        "sm_80" => ("major < 8", "sm_80 PTX needs compute capability 8.0 or newer"),
        other => return Err(format!("einattn-build does not know the target `{other}`")),
    };
    w!(out, "        if {condition} {{");
    w!(out, "            return Err(KernelError::Device {{");
    w!(out, "                kernel: Self::NAME,");
    w!(
        out,
        "                message: format!(\"this GPU has compute capability {{major}}.{{minor}}; {needs}\"),"
    );
    w!(out, "            }});");
    w!(out, "        }}");
    for l in launches {
        let c = l.contract;
        w!(
            out,
            "        let {} = Self::function(context, include_str!({}), {})?;",
            l.field,
            string_literal(l.ptx_file),
            string_literal(&c.kernel)
        );
        // Past 48 KiB a kernel must opt in to its dynamic shared memory.
        if c.dynamic_shared_bytes > 48 * 1024 {
            let bytes = i32::try_from(c.dynamic_shared_bytes).map_err(|_| {
                format!(
                    "`{}` asks for {} B of shared memory",
                    c.kernel, c.dynamic_shared_bytes
                )
            })?;
            w!(out, "        {}", l.field);
            w!(out, "            .set_attribute(");
            w!(out, "                ::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,");
            w!(out, "                {bytes},");
            w!(out, "            )");
            w!(
                out,
                "            .map_err(KernelError::driver(Self::NAME, {}))?;",
                string_literal(&format!(
                    "raising the shared memory limit of `{}`",
                    c.kernel
                ))
            );
        }
    }
    w!(out, "        Ok({} {{", unit.type_name);
    w!(out, "            context: context.clone(),");
    for l in launches {
        w!(out, "            {},", l.field);
    }
    w!(out, "        }})");
    w!(out, "    }}");
    w!(out);
    w!(out, "    fn function(");
    w!(
        out,
        "        context: &::std::sync::Arc<::cudarc::driver::CudaContext>,"
    );
    w!(out, "        ptx: &'static str,");
    w!(out, "        entry: &'static str,");
    w!(
        out,
        "    ) -> ::std::result::Result<::cudarc::driver::CudaFunction, KernelError> {{"
    );
    w!(out, "        context");
    w!(
        out,
        "            .load_module(::cudarc::nvrtc::Ptx::from_src(ptx))"
    );
    w!(
        out,
        "            .and_then(|module| module.load_function(entry))"
    );
    w!(
        out,
        "            .map_err(KernelError::driver(Self::NAME, \"loading the PTX\"))"
    );
    w!(out, "    }}");
    Ok(())
}

fn check_fn(out: &mut String, face: &Interface, params_type: &str, uses_params: bool) {
    w!(out);
    w!(
        out,
        "    /// Every slice's length and context, the stream's context, and the conditions on"
    );
    w!(out, "    /// parameters the kernels rely on.");
    w!(
        out,
        "    #[allow(clippy::too_many_arguments)] // one argument per tensor of the cascade"
    );
    w!(out, "    fn check(");
    w!(out, "        &self,");
    w!(out, "        stream: &::cudarc::driver::CudaStream,");
    for t in &face.tensors {
        w!(
            out,
            "        {}: &impl ::cudarc::driver::DeviceSlice<{}>,",
            t.ident,
            rust_type(t.dtype)
        );
    }
    if uses_params {
        w!(out, "        params: &{params_type},");
    }
    w!(out, "    ) -> ::std::result::Result<(), KernelError> {{");
    w!(
        out,
        "        KernelError::check_context(Self::NAME, \"the stream\", stream.context(), &self.context)?;"
    );
    for t in &face.tensors {
        let upper = t.ident.to_ascii_uppercase();
        w!(
            out,
            "        KernelError::check_slice(Self::NAME, {}, {}.len(), Self::{upper}_LEN, {}.stream().context(), &self.context)?;",
            string_literal(&t.ident),
            t.ident,
            t.ident
        );
    }
    let mut seen = BTreeSet::new();
    for (i, r) in face.launches.iter().flat_map(|l| &l.requires) {
        if !seen.insert(r.clone()) {
            continue;
        }
        let field = &face.scalars[*i].ident;
        w!(
            out,
            "        if params.{field}.is_nan() || params.{field} <= 0.0 {{"
        );
        w!(out, "            return Err(KernelError::Requires {{");
        w!(out, "                kernel: Self::NAME,");
        w!(out, "                condition: {},", string_literal(r));
        w!(out, "                value: params.{field},");
        w!(out, "            }});");
        w!(out, "        }}");
    }
    w!(out, "        Ok(())");
    w!(out, "    }}");
}

fn enqueue_fn(
    out: &mut String,
    face: &Interface,
    launches: &[Launch],
    params_type: &str,
    scratch_type: Option<&str>,
    uses_params: bool,
) -> Result<(), String> {
    w!(out);
    w!(
        out,
        "    /// Enqueues every kernel in order; the arguments were checked by `check`."
    );
    w!(
        out,
        "    #[allow(clippy::too_many_arguments)] // one argument per tensor of the cascade"
    );
    w!(out, "    fn enqueue(");
    w!(out, "        &self,");
    w!(
        out,
        "        stream: &::std::sync::Arc<::cudarc::driver::CudaStream>,"
    );
    if let Some(s) = scratch_type {
        w!(out, "        scratch: &mut {s},");
    }
    tensor_params(out, face);
    if uses_params {
        w!(out, "        params: &{params_type},");
    }
    w!(out, "    ) -> ::std::result::Result<(), KernelError> {{");
    // Trait methods called on cudarc's concrete types (the slices' come from their bounds).
    if scratch_type.is_some() {
        w!(
            out,
            "        use ::cudarc::driver::{{DevicePtrMut as _, PushKernelArg as _}};"
        );
    } else {
        w!(out, "        use ::cudarc::driver::PushKernelArg as _;");
    }
    w!(
        out,
        "        // Device addresses. cudarc's guards stay alive until every kernel is enqueued:"
    );
    w!(
        out,
        "        // dropping one records the slice's read or write event after the launches."
    );
    for t in &face.tensors {
        let call = if t.output {
            "device_ptr_mut"
        } else {
            "device_ptr"
        };
        w!(
            out,
            "        let ({0}_ptr, _{0}_guard) = {0}.{call}(stream);",
            t.ident
        );
    }
    let total = launches.len();
    for (k, l) in launches.iter().enumerate() {
        let c = l.contract;
        let values = abi::bind(c, &Fixed(c)).map_err(|e| format!("`{}`: {e}", c.kernel))?;
        let grid = c
            .compiled_grid()
            .map_err(|e| format!("`{}`: {e}", c.kernel))?;
        w!(out);
        w!(out, "        // {} of {total}: `{}`.", k + 1, c.kernel);
        w!(out, "        {{");
        // Scratch arrays this kernel reads, in order of first use.
        let mut used: Vec<&ScratchArray> = Vec::new();
        for p in &c.params {
            if let Source::Scratch { scratch } = &p.from {
                let s = face
                    .scratch
                    .iter()
                    .find(|s| &s.name == scratch)
                    .ok_or_else(|| format!("`{}` reads an undeclared scratch array", c.kernel))?;
                if !used.iter().any(|u| u.name == s.name) {
                    used.push(s);
                }
            }
        }
        for s in c.scratch.iter().filter(|s| s.zero_before_launch) {
            let a = face
                .scratch
                .iter()
                .find(|a| a.name == s.name)
                .ok_or_else(|| format!("`{}` zeroes an undeclared scratch array", c.kernel))?;
            w!(
                out,
                "            // {} must start at zero on every launch.",
                a.what
            );
            w!(out, "            stream");
            w!(
                out,
                "                .memset_zeros(&mut scratch.{})",
                a.ident
            );
            w!(
                out,
                "                .map_err(KernelError::driver(Self::NAME, {}))?;",
                string_literal(&format!("zeroing `{}`", a.name))
            );
        }
        for s in &used {
            w!(
                out,
                "            let (scratch_{0}, _scratch_{0}_guard) = scratch.{0}.device_ptr_mut(stream);",
                s.ident
            );
        }
        // Tensor maps first: the launch builder borrows them.
        for (p, v) in c.params.iter().zip(&values) {
            let (Source::TensorMap { tensor, .. }, ArgValue::TensorMap(spec)) = (&p.from, v) else {
                continue;
            };
            let t = face
                .tensors
                .iter()
                .find(|t| &t.name == tensor)
                .ok_or_else(|| format!("`{}` maps an undeclared tensor", c.kernel))?;
            if spec.dtype.bytes() != 2 {
                return Err(format!(
                    "`{}`: a tensor map of {} elements",
                    c.kernel,
                    spec.dtype.name()
                ));
            }
            w!(
                out,
                "            let {}_map = TensorMap::tiled(Self::NAME, {}, {}_ptr, {:?}, {:?}, {:?})?;",
                p.name,
                string_literal(&format!("encoding the tensor map of `{tensor}`")),
                t.ident,
                spec.dims,
                spec.strides,
                spec.boxes
            );
        }
        w!(
            out,
            "            let mut args = stream.launch_builder(&self.{});",
            l.field
        );
        for (p, v) in c.params.iter().zip(&values) {
            let value = match (&p.from, v) {
                (Source::Tensor { tensor }, _) => {
                    let t = face
                        .tensors
                        .iter()
                        .find(|t| &t.name == tensor)
                        .ok_or_else(|| format!("`{}` reads an undeclared tensor", c.kernel))?;
                    format!("&{}_ptr", t.ident)
                }
                (Source::Scratch { scratch }, _) => {
                    let s = face
                        .scratch
                        .iter()
                        .find(|s| &s.name == scratch)
                        .ok_or_else(|| format!("`{}` reads an undeclared scratch", c.kernel))?;
                    format!("&scratch_{}", s.ident)
                }
                (Source::Scalar { param, .. }, _) => {
                    let s = face
                        .scalars
                        .iter()
                        .find(|s| &s.name == param)
                        .ok_or_else(|| format!("`{}` reads an unknown scalar", c.kernel))?;
                    format!("&params.{}", s.ident)
                }
                (Source::TensorMap { .. }, ArgValue::TensorMap(_)) => format!("&{}_map", p.name),
                (_, ArgValue::U32(x)) => format!("&{x}u32"),
                (_, ArgValue::U64(x)) => format!("&{x}u64"),
                (other, value) => {
                    return Err(format!(
                        "`{}`: parameter `{}` reads {other:?} as {value:?}, which a generated launcher cannot give",
                        c.kernel, p.name
                    ))
                }
            };
            w!(out, "            args.arg({value}); // {}", p.name);
        }
        w!(
            out,
            "            // SAFETY: the arguments follow the entry's parameters in order and type, as its"
        );
        w!(
            out,
            "            // launch contract lists them; every slice was checked to hold the elements the"
        );
        w!(
            out,
            "            // kernel reads or writes, and stream order keeps it alive until the kernel ran."
        );
        w!(out, "            unsafe {{");
        w!(
            out,
            "                args.launch(::cudarc::driver::LaunchConfig {{"
        );
        w!(
            out,
            "                    grid_dim: ({}, {}, {}),",
            grid[0],
            grid[1],
            grid[2]
        );
        w!(
            out,
            "                    block_dim: ({}, {}, {}),",
            c.block[0],
            c.block[1],
            c.block[2]
        );
        w!(
            out,
            "                    shared_mem_bytes: {},",
            c.dynamic_shared_bytes
        );
        w!(out, "                }})");
        w!(out, "            }}");
        w!(
            out,
            "            .map_err(KernelError::driver(Self::NAME, {}))?;",
            string_literal(&format!("launching `{}`", c.kernel))
        );
        w!(out, "        }}");
    }
    w!(out, "        Ok(())");
    w!(out, "    }}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_rust_names() {
        assert_eq!(type_name("attention_causal"), "AttentionCausal");
        assert_eq!(type_name("lightning"), "Lightning");
        assert_eq!(type_name("2pass"), "Kernel2pass");
        assert_eq!(snake("AttentionCausal"), "attention_causal");
        assert_eq!(snake("QK"), "qk");
        assert_eq!(snake("AV"), "av");
        assert_eq!(snake("QKVState"), "qkv_state");
        let mut taken = BTreeSet::from(["stream".to_string()]);
        assert_eq!(ident("Q", &mut taken), "q");
        assert_eq!(ident("q", &mut taken), "q_2");
        assert_eq!(ident("type", &mut taken), "type_");
        assert_eq!(ident("stream", &mut taken), "stream_2");
        assert!(is_type_name("Lightning2"));
        assert!(!is_type_name("lightning"));
        assert!(!is_type_name("Light-ning"));
    }

    #[test]
    fn f32_literals_read_back_as_the_same_value() {
        assert_eq!(f32_literal(0.125), "0.125");
        assert_eq!(f32_literal(30.0), "30.0");
        assert_eq!(f32_literal(0.08838834764831845), "0.088388346");
        assert_eq!(f32_literal(f64::NEG_INFINITY), "f32::NEG_INFINITY");
        assert_eq!(f32_literal(1e-8), "1e-8");
    }
}
