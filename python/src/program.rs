//! A `.ein` source as the Python package holds it: compiled once at its own sizes (so
//! errors show at `einattn.compile`), then again at the sizes the caller's tensors have.
//! Nothing here knows Python or CUDA.

use einattn_backends::abi::{Dtype, Manifest, Source, TensorRole};
use einattn_backends::family::{self, CompileError, KernelOptions, Request};
use einattn_backends::tile::Elem;
use einattn_backends::Target;
use einattn_ir::cascade::{Cascade, ExtentSource, TensorKind};
use einattn_ir::{Handle, Tensor};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Why a call failed, by the Python exception it becomes.
#[derive(Debug)]
pub enum Failure {
    /// The source or the options do not compile: rendered diagnostics (`CompileError`).
    Compile(String),
    /// Tensors whose shapes do not fit the cascade, a bad option (`ValueError`).
    Value(String),
    /// A file that cannot be read (`OSError`).
    Io(String),
}

pub type Result<T> = std::result::Result<T, Failure>;

/// Compile options the caller chose.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub strategy: Option<String>,
    pub chunk_tokens: Option<u64>,
    pub optimize: bool,
}

/// A source file, its size bindings and options, and the cascade at those sizes.
pub struct Program {
    pub path: String,
    text: String,
    defines: Vec<(String, u64)>,
    options: Options,
    /// The cascade at `defines`: what the caller's tensors are matched against.
    template: Cascade,
    /// The tensors the caller passes, in declaration order: inputs and parameter arrays.
    pub tensors: Vec<Handle<Tensor>>,
    /// Scalar parameters (no ranks), in declaration order, with their defaults.
    pub scalars: Vec<(String, Option<f64>)>,
    /// Warnings of the front end (a `-D` the source does not use), rendered.
    pub warnings: String,
}

/// The kernels of one compile: what a launch needs.
pub struct Kernels {
    pub manifest: Manifest,
    /// PTX text by entry.
    pub ptx: BTreeMap<String, String>,
    /// A hash of each entry's PTX, computed once: the launcher's key for loaded modules
    /// (hashing the text on every call cost about as much as a short kernel runs).
    pub ptx_hash: BTreeMap<String, u64>,
    /// Names of the caller's tensors, in [`Program::tensors`] order.
    pub inputs: Vec<String>,
    /// The outputs: name, shape, dtype.
    pub outputs: Vec<(String, Vec<u64>, Dtype)>,
    /// Scratch arrays: name, bytes (zeroed before every kernel that asks, in the launch).
    pub scratch: Vec<(String, u64)>,
    pub scalars: Vec<(String, Option<f64>)>,
    pub sizes: Vec<(String, u64)>,
}

impl Program {
    pub fn open(path: &str, defines: Vec<(String, u64)>, options: Options) -> Result<Program> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Io(format!("cannot read `{path}`: {e}")))?;
        let (template, warnings) = einattn_dsl::compile_source_with_warnings(path, &text, &defines)
            .map_err(|d| Failure::Compile(d.render(path, &text)))?;
        let warnings = if warnings.is_empty() {
            String::new()
        } else {
            warnings.render(path, &text)
        };
        let mut tensors = Vec::new();
        let mut scalars = Vec::new();
        for (h, t) in template.tensors.iter() {
            match t.kind {
                TensorKind::Param if t.ranks.is_empty() => {
                    scalars.push((t.name.clone(), t.default))
                }
                TensorKind::Input | TensorKind::Param => tensors.push(h),
                TensorKind::Output | TensorKind::Temp => {}
            }
        }
        let program = Program {
            path: path.to_string(),
            text,
            defines,
            options,
            template,
            tensors,
            scalars,
            warnings,
        };
        // A cascade no family reads is refused now, not at the first call.
        program.kernels(&program.defines, None, Target::Sm80)?;
        Ok(program)
    }

    pub fn name(&self) -> &str {
        &self.template.name
    }

    /// The caller's view of the program as JSON: each tensor with its ranks (a size symbol
    /// or a fixed extent per dimension), its dtype and whether it is a parameter array;
    /// the scalars with their defaults; the outputs.
    pub fn signature_json(&self) -> String {
        let c = &self.template;
        let dims = |h: Handle<Tensor>| -> Vec<serde_json::Value> {
            c.tensors[h]
                .ranks
                .iter()
                .map(|&r| match &c.ranks[r].source {
                    ExtentSource::Symbol(s) => serde_json::json!(s),
                    _ => serde_json::json!(c.ranks[r].extent),
                })
                .collect()
        };
        let tensor = |h: Handle<Tensor>| {
            let t = &c.tensors[h];
            serde_json::json!({
                "name": t.name,
                "dims": dims(h),
                "dtype": t.dtype.map(|d| d.name()),
                "param": t.kind == TensorKind::Param,
                "default": t.default,
            })
        };
        serde_json::json!({
            "name": c.name,
            "path": self.path,
            "defines": self.defines,
            "tensors": self.tensors.iter().map(|&h| tensor(h)).collect::<Vec<_>>(),
            "scalars": self.scalars.iter().map(|(n, d)| serde_json::json!({"name": n, "default": d})).collect::<Vec<_>>(),
            "outputs": c.outputs().map(tensor).collect::<Vec<_>>(),
        })
        .to_string()
    }

    /// The size bindings the caller's tensor shapes give (in [`Program::tensors`] order),
    /// over the program's own.
    pub fn sizes_for(&self, shapes: &[Vec<u64>]) -> Result<Vec<(String, u64)>> {
        let c = &self.template;
        if shapes.len() != self.tensors.len() {
            return Err(Failure::Value(format!(
                "`{}` takes {} tensors ({}), got {}",
                c.name,
                self.tensors.len(),
                self.tensor_names().join(", "),
                shapes.len()
            )));
        }
        let mut bound: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for (&h, shape) in self.tensors.iter().zip(shapes) {
            let t = &c.tensors[h];
            if shape.len() != t.ranks.len() {
                return Err(Failure::Value(format!(
                    "`{}` has {} dimensions {shape:?}; {} declares {}",
                    t.name,
                    shape.len(),
                    c.name,
                    self.declaration(h)
                )));
            }
            for (d, (&r, &got)) in t.ranks.iter().zip(shape).enumerate() {
                let rank = &c.ranks[r];
                let place = format!("dimension {d} of `{}` (rank {})", t.name, rank.name);
                match &rank.source {
                    ExtentSource::Symbol(symbol) => match bound.get(symbol) {
                        Some((v, from)) if *v != got => {
                            return Err(Failure::Value(format!(
                                "{place} is {got}, but {from} gave {symbol} = {v}"
                            )))
                        }
                        Some(_) => {}
                        None => {
                            bound.insert(symbol.clone(), (got, place));
                        }
                    },
                    _ if rank.extent != got => {
                        return Err(Failure::Value(format!(
                            "{place} is {got}; {} fixes it at {}",
                            c.name, rank.extent
                        )))
                    }
                    _ => {}
                }
            }
        }
        let mut sizes: BTreeMap<String, u64> = self.defines.iter().cloned().collect();
        for (symbol, (v, _)) in bound {
            sizes.insert(symbol, v);
        }
        Ok(sizes.into_iter().collect())
    }

    /// The cascade at `sizes`, with every caller tensor's shape checked against it (an
    /// extent written as an expression is only known here).
    fn instance(&self, sizes: &[(String, u64)], shapes: Option<&[Vec<u64>]>) -> Result<Cascade> {
        let cascade = einattn_dsl::compile_source(&self.path, &self.text, sizes)
            .map_err(|d| Failure::Compile(d.render(&self.path, &self.text)))?;
        if let Some(shapes) = shapes {
            for (&h, shape) in self.tensors.iter().zip(shapes) {
                let name = &self.template.tensors[h].name;
                let want = cascade
                    .tensor_by_name(name)
                    .map(|t| shape_of(&cascade, t))
                    .unwrap_or_default();
                if &want != shape {
                    return Err(Failure::Value(format!(
                        "`{name}` has shape {shape:?}; at {} the cascade needs {want:?}",
                        sizes_text(sizes)
                    )));
                }
            }
        }
        Ok(cascade)
    }

    /// The outputs' names and shapes for tensors of `shapes` (what a fake tensor needs).
    pub fn output_shapes(&self, shapes: &[Vec<u64>]) -> Result<Vec<(String, Vec<u64>)>> {
        let sizes = self.sizes_for(shapes)?;
        let cascade = self.instance(&sizes, Some(shapes))?;
        Ok(cascade
            .outputs()
            .map(|h| (cascade.tensors[h].name.clone(), shape_of(&cascade, h)))
            .collect())
    }

    /// The kernels for tensors of `shapes`, storing sequence tensors as `elem`, for `target`.
    pub fn kernels_for(&self, shapes: &[Vec<u64>], elem: &str, target: Target) -> Result<Kernels> {
        let elem = match elem {
            "bf16" => Elem::Bf16,
            "f16" => Elem::F16,
            other => {
                return Err(Failure::Value(format!(
                    "einattn kernels store sequence tensors as bf16 or f16, not {other}"
                )))
            }
        };
        let sizes = self.sizes_for(shapes)?;
        self.instance(&sizes, Some(shapes))?;
        self.kernels(&sizes, Some(elem), target)
    }

    fn kernels(
        &self,
        sizes: &[(String, u64)],
        elem: Option<Elem>,
        target: Target,
    ) -> Result<Kernels> {
        let cascade = self.instance(sizes, None)?;
        let options = KernelOptions {
            target,
            elem,
            optimize: self.options.optimize,
            strategy: self.options.strategy.clone(),
            chunk_tokens: self.options.chunk_tokens,
            ..KernelOptions::default()
        };
        let instantiate = |s: &[(String, u64)]| {
            einattn_dsl::compile_source(&self.path, &self.text, s)
                .map_err(|d| CompileError::Source(d.items().to_vec()))
        };
        let compiled = family::compile(&Request {
            cascade: &cascade,
            options: &options,
            defines: sizes,
            instantiate: &instantiate,
        })
        .map_err(|e| match e {
            CompileError::Usage(m) => Failure::Value(m),
            other => Failure::Compile(render_compile_error(&self.path, &self.text, other)),
        })?;
        let manifest = compiled.manifest();
        let ptx: BTreeMap<String, String> = compiled
            .modules()
            .iter()
            .map(|m| (m.ptx.entry.clone(), m.ptx.text.clone()))
            .collect();
        let mut outputs: Vec<(String, Vec<u64>, Dtype)> = Vec::new();
        let mut scratch: Vec<(String, u64)> = Vec::new();
        for k in &manifest.kernels {
            for t in k.tensors_with(TensorRole::Output) {
                if !outputs.iter().any(|o| o.0 == t.name) {
                    outputs.push((t.name.clone(), t.shape.clone(), t.dtype));
                }
            }
            for s in &k.scratch {
                if !scratch.iter().any(|x| x.0 == s.name) {
                    let bytes = s.elements.checked_mul(s.dtype.bytes()).ok_or_else(|| {
                        Failure::Value(format!("scratch `{}` is too large", s.name))
                    })?;
                    scratch.push((s.name.clone(), bytes));
                }
            }
            for p in &k.params {
                if let Source::Argument { name } = &p.from {
                    return Err(Failure::Value(format!(
                        "`{}` takes a launcher-computed argument `{name}`, which only SP plans give",
                        k.kernel
                    )));
                }
            }
        }
        if outputs.is_empty() {
            return Err(Failure::Value("no kernel writes an output".into()));
        }
        let ptx_hash = ptx
            .iter()
            .map(|(entry, text)| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(text, &mut hasher);
                (entry.clone(), std::hash::Hasher::finish(&hasher))
            })
            .collect();
        Ok(Kernels {
            manifest,
            ptx,
            ptx_hash,
            inputs: self.tensor_names(),
            outputs,
            scratch,
            scalars: self.scalars.clone(),
            sizes: sizes.to_vec(),
        })
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors
            .iter()
            .map(|&h| self.template.tensors[h].name.clone())
            .collect()
    }

    /// `Q[b, p, h, e]` with the extents of the ranks: `Q[b: B, p: N, h: H, e: D]`.
    fn declaration(&self, h: Handle<Tensor>) -> String {
        let c = &self.template;
        let t = &c.tensors[h];
        let dims: Vec<String> = t
            .ranks
            .iter()
            .map(|&r| match &c.ranks[r].source {
                ExtentSource::Symbol(s) => format!("{}: {s}", c.ranks[r].name),
                _ => format!("{}: {}", c.ranks[r].name, c.ranks[r].extent),
            })
            .collect();
        format!("{}[{}]", t.name, dims.join(", "))
    }
}

fn shape_of(cascade: &Cascade, t: Handle<Tensor>) -> Vec<u64> {
    cascade.tensors[t]
        .ranks
        .iter()
        .map(|&r| cascade.ranks[r].extent)
        .collect()
}

fn sizes_text(sizes: &[(String, u64)]) -> String {
    let mut out = String::new();
    for (i, (n, v)) in sizes.iter().enumerate() {
        let _ = write!(out, "{}{n}={v}", if i == 0 { "" } else { ", " });
    }
    out
}

/// A compile error as the CLI renders it.
pub fn render_compile_error(path: &str, text: &str, e: CompileError) -> String {
    e.render(path, |ds| {
        einattn_dsl::Diagnostics::new(ds).render(path, text)
    })
}

/// The analysis report of `path` at `defines`, as JSON.
pub fn analyze_json(path: &str, defines: &[(String, u64)]) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Io(format!("cannot read `{path}`: {e}")))?;
    let cascade = einattn_dsl::compile_source(path, &text, defines)
        .map_err(|d| Failure::Compile(d.render(path, &text)))?;
    let report = einattn_passes::analysis::analyze(
        &cascade,
        &einattn_passes::analysis::AnalysisOptions::default(),
    );
    serde_json::to_string(&report)
        .map_err(|e| Failure::Value(format!("cannot serialize the report: {e}")))
}

/// A tensor's values for the interpreter: name, shape, f64 in row-major order.
pub type HostTensor = (String, Vec<usize>, Vec<f64>);

/// Evaluates `path` with the reference interpreter: `given` inputs, the rest drawn from
/// `seed`; returns every input, parameter and output.
pub fn run(
    path: &str,
    defines: &[(String, u64)],
    given: Vec<HostTensor>,
    seed: u64,
) -> Result<Vec<HostTensor>> {
    use einattn_ir::interp;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Io(format!("cannot read `{path}`: {e}")))?;
    let cascade = einattn_dsl::compile_source(path, &text, defines)
        .map_err(|d| Failure::Compile(d.render(path, &text)))?;
    let mut inputs = interp::random_inputs(&cascade, seed);
    for (name, shape, values) in given {
        let Some(h) = cascade.inputs().find(|&h| cascade.tensors[h].name == name) else {
            let names: Vec<&str> = cascade
                .inputs()
                .map(|h| cascade.tensors[h].name.as_str())
                .collect();
            return Err(Failure::Value(format!(
                "`{}` has no input or parameter `{name}` (it has: {})",
                cascade.name,
                names.join(", ")
            )));
        };
        let want = interp::shape_of(&cascade, h);
        if shape != want {
            return Err(Failure::Value(format!(
                "`{name}` has shape {shape:?}; {} needs {want:?}",
                cascade.name
            )));
        }
        inputs.insert(h, interp::TensorData::new(shape, values));
    }
    let order = einattn_ir::validate::topological_order(&cascade);
    let values = interp::evaluate_in_order(&cascade, &inputs, &order)
        .map_err(|e| Failure::Value(format!("evaluation failed: {e}")))?;
    let mut out = Vec::new();
    for (h, t) in cascade.tensors.iter() {
        if t.kind == TensorKind::Temp {
            continue;
        }
        let data = match (values.get(h), inputs.get(&h)) {
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) => continue,
        };
        out.push((
            t.name.clone(),
            data.shape.clone(),
            data.stored().into_owned(),
        ));
    }
    Ok(out)
}
