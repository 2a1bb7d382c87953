//! einattn-build: compile `.ein` attention kernels from a build script.
//!
//! ```no_run
//! // build.rs
//! use einattn_build::{Builder, Target};
//!
//! fn main() {
//!     Builder::new()
//!         .kernel("kernels/lightning.ein")
//!         .define("D", 128)
//!         .target(Target::Sm90a)
//!         .compile_or_exit();
//! }
//! ```
//!
//! ```ignore
//! // src/main.rs
//! mod kernels {
//!     include!(concat!(env!("OUT_DIR"), "/einattn_kernels.rs"));
//! }
//! let lightning = kernels::Lightning::load(&ctx)?;
//! lightning.launch(&stream, &q, &k, &v, &s, &mut o, &Default::default())?;
//! ```
//!
//! [`Builder::compile`] compiles every kernel with the einattn compiler (in process), writes
//! each kernel's PTX and one Rust module (`einattn_kernels.rs` unless
//! [`Builder::module_name`] says otherwise) into `OUT_DIR`, and prints
//! `cargo:rerun-if-changed` for every file it read. A source that does not compile fails the
//! build with the diagnostics the CLI prints (`file:line:col`, the line, a caret).
//!
//! The generated module has one type per kernel ([`Kernel`]): `load(&context)` loads its
//! PTX (embedded in the binary with `include_str!`, no file at run time) and `launch(&stream,
//! inputs..., outputs..., &params)` checks every slice against the launch contract, then
//! enqueues the compile's kernels in order. It depends on `cudarc` (features `driver`,
//! `nvrtc` for its `Ptx` type, `f16` for the `half` element types; `dynamic-loading` keeps
//! CUDA out of the build) and `half`, never on einattn crates. `tests/generated/` holds one
//! generated module as a user reads it.
//!
//! bf16 and f16 tensors are `CudaSlice<half::bf16>` / `CudaSlice<half::f16>` (or views), so
//! a slice of the wrong element type does not compile; f32 parameter arrays are
//! `CudaSlice<f32>`; scalar parameters are `f32` fields of a generated `<Type>Params`
//! struct whose `Default` holds the cascade's defaults.

mod generate;

pub use einattn_backends::Target;

use einattn_backends::family::{self, CompileError, KernelOptions, Request};
use einattn_backends::tile::Elem;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Storage type of the sequence tensors (Q, K, V, O); the cascade's own when not set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F16,
}

/// Why a build failed. Its `Display` is what a person must read: for a source error, the
/// rendered diagnostics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("error: cannot {what} `{}`: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source or the options do not compile; `message` holds the located diagnostics.
    #[error("{message}")]
    Compile { path: PathBuf, message: String },
    /// The builder was set up wrong (no kernel, two kernels with one type name, no `OUT_DIR`).
    #[error("error: einattn-build: {0}")]
    Config(String),
    /// The kernels compiled, but this generator cannot write a launcher for their contract.
    #[error("error: {}: {message}", path.display())]
    Generate { path: PathBuf, message: String },
}

/// One `.ein` source to compile, with settings of its own. Settings it leaves unset come
/// from the [`Builder`].
#[derive(Clone, Debug)]
pub struct Kernel {
    path: PathBuf,
    name: Option<String>,
    defines: Vec<(String, u64)>,
    target: Option<Target>,
    dtype: Option<Dtype>,
    strategy: Option<String>,
    chunk_tokens: Option<u64>,
    tiles: Vec<(String, u64)>,
    warps: Option<u32>,
    stages: Option<u32>,
    optimize: Option<bool>,
}

impl Kernel {
    pub fn new(path: impl Into<PathBuf>) -> Kernel {
        Kernel {
            path: path.into(),
            name: None,
            defines: Vec::new(),
            target: None,
            dtype: None,
            strategy: None,
            chunk_tokens: None,
            tiles: Vec::new(),
            warps: None,
            stages: None,
            optimize: None,
        }
    }

    /// The generated type's name (default: the cascade's `kernel` name in UpperCamelCase,
    /// `attention_causal` -> `AttentionCausal`). Needed when one source is compiled twice.
    pub fn name(mut self, name: impl Into<String>) -> Kernel {
        self.name = Some(name.into());
        self
    }

    /// Binds a size symbol (`-D NAME=VALUE`); overrides the builder's binding of the name.
    pub fn define(mut self, name: impl Into<String>, value: u64) -> Kernel {
        self.defines.push((name.into(), value));
        self
    }

    pub fn target(mut self, target: Target) -> Kernel {
        self.target = Some(target);
        self
    }

    pub fn dtype(mut self, dtype: Dtype) -> Kernel {
        self.dtype = Some(dtype);
        self
    }

    /// A family's named strategy (`single`, `chunked`, `lookback` for linear attention).
    pub fn strategy(mut self, strategy: impl Into<String>) -> Kernel {
        self.strategy = Some(strategy.into());
        self
    }

    /// Linear attention, chunked strategy: tokens per chunk.
    pub fn chunk_tokens(mut self, tokens: u64) -> Kernel {
        self.chunk_tokens = Some(tokens);
        self
    }

    /// A tile size by rank name (`--tile m0=64`).
    pub fn tile(mut self, rank: impl Into<String>, size: u64) -> Kernel {
        self.tiles.push((rank.into(), size));
        self
    }

    pub fn warps(mut self, warps: u32) -> Kernel {
        self.warps = Some(warps);
        self
    }

    /// Pipeline stages of the K/V shared-memory ring.
    pub fn stages(mut self, stages: u32) -> Kernel {
        self.stages = Some(stages);
        self
    }

    /// Run the rewrite engine before compiling.
    pub fn optimize(mut self, optimize: bool) -> Kernel {
        self.optimize = Some(optimize);
        self
    }
}

/// Compiles `.ein` kernels into PTX and one generated Rust module. Settings made on the
/// builder (`define`, `target`, `dtype`, `optimize`) apply to every kernel that does not
/// set its own, whatever the order of the calls.
#[derive(Clone, Debug)]
pub struct Builder {
    kernels: Vec<Kernel>,
    defines: Vec<(String, u64)>,
    target: Target,
    dtype: Option<Dtype>,
    optimize: bool,
    out_dir: Option<PathBuf>,
    module_name: String,
    cargo_metadata: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

/// What [`Builder::compile`] wrote and read.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The Rust module to `include!`.
    pub module: PathBuf,
    /// The PTX files beside it (the module embeds them).
    pub ptx: Vec<PathBuf>,
    /// Every source read (each was announced with `cargo:rerun-if-changed`).
    pub files_read: Vec<PathBuf>,
    /// The generated type of each kernel, in the order they were added.
    pub types: Vec<String>,
}

/// The generated module and PTX as text, before anything is written.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The module's file name (`einattn_kernels.rs`).
    pub module_file: String,
    pub module: String,
    /// `(file name, PTX text)`, in the module's order.
    pub ptx: Vec<(String, String)>,
    pub files_read: Vec<PathBuf>,
    pub types: Vec<String>,
    /// Warnings of the front end (a `-D` the source does not use), rendered.
    pub warnings: Vec<String>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder {
            kernels: Vec::new(),
            defines: Vec::new(),
            target: Target::default(),
            dtype: None,
            optimize: false,
            out_dir: None,
            module_name: "einattn_kernels".into(),
            cargo_metadata: true,
        }
    }

    /// Adds a `.ein` source with the builder's settings (paths are relative to the build
    /// script's folder, the package root, as cargo runs it).
    pub fn kernel(self, path: impl Into<PathBuf>) -> Builder {
        self.add_kernel(Kernel::new(path))
    }

    /// Adds a kernel with settings of its own.
    pub fn add_kernel(mut self, kernel: Kernel) -> Builder {
        self.kernels.push(kernel);
        self
    }

    /// Binds a size symbol for every kernel (a kernel's own `define` wins).
    pub fn define(mut self, name: impl Into<String>, value: u64) -> Builder {
        self.defines.push((name.into(), value));
        self
    }

    /// The PTX target of every kernel that names none (default `sm_80`, which also runs on
    /// Hopper; `sm_90a` uses Hopper's instructions and runs only on compute capability 9.0).
    pub fn target(mut self, target: Target) -> Builder {
        self.target = target;
        self
    }

    pub fn dtype(mut self, dtype: Dtype) -> Builder {
        self.dtype = Some(dtype);
        self
    }

    pub fn optimize(mut self, optimize: bool) -> Builder {
        self.optimize = optimize;
        self
    }

    /// Where to write (default: `OUT_DIR`, which cargo sets for build scripts).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.out_dir = Some(dir.into());
        self
    }

    /// The generated module's file stem (default `einattn_kernels`).
    pub fn module_name(mut self, name: impl Into<String>) -> Builder {
        self.module_name = name.into();
        self
    }

    /// Whether to print `cargo:` lines (default: yes; off for use outside build scripts).
    pub fn cargo_metadata(mut self, on: bool) -> Builder {
        self.cargo_metadata = on;
        self
    }

    /// Compiles every kernel and writes the PTX and the module into the output folder.
    pub fn compile(&self) -> Result<Generated, Error> {
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => std::env::var_os("OUT_DIR")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    Error::Config(
                        "OUT_DIR is not set: call this from a build script, or set `out_dir`"
                            .into(),
                    )
                })?,
        };
        // Announced before compiling, so cargo re-runs the script once a broken file is
        // fixed.
        if self.cargo_metadata {
            let mut announced = Vec::new();
            for k in &self.kernels {
                if !announced.contains(&&k.path) {
                    println!("cargo:rerun-if-changed={}", k.path.display());
                    announced.push(&k.path);
                }
            }
        }
        let rendered = self.render()?;
        if self.cargo_metadata {
            for w in &rendered.warnings {
                for line in w.lines().filter(|l| !l.trim().is_empty()) {
                    println!("cargo:warning={line}");
                }
            }
        }
        std::fs::create_dir_all(&out_dir).map_err(|source| Error::Io {
            what: "create",
            path: out_dir.clone(),
            source,
        })?;
        let write = |name: &str, text: &str| -> Result<PathBuf, Error> {
            let path = out_dir.join(name);
            std::fs::write(&path, text).map_err(|source| Error::Io {
                what: "write",
                path: path.clone(),
                source,
            })?;
            Ok(path)
        };
        let mut ptx = Vec::new();
        for (name, text) in &rendered.ptx {
            ptx.push(write(name, text)?);
        }
        let module = write(&rendered.module_file, &rendered.module)?;
        Ok(Generated {
            module,
            ptx,
            files_read: rendered.files_read,
            types: rendered.types,
        })
    }

    /// [`Builder::compile`] for build scripts: on an error, prints it (a source error as
    /// located diagnostics) and exits with status 1, which fails the build.
    pub fn compile_or_exit(&self) -> Generated {
        match self.compile() {
            Ok(generated) => generated,
            Err(e) => {
                eprintln!("{}", e.to_string().trim_end());
                std::process::exit(1)
            }
        }
    }

    /// Compiles every kernel and renders the module and PTX without writing them.
    pub fn render(&self) -> Result<Rendered, Error> {
        if self.kernels.is_empty() {
            return Err(Error::Config(
                "no kernels: add one with `.kernel(\"path.ein\")`".into(),
            ));
        }
        let stem_ok = !self.module_name.is_empty()
            && self
                .module_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !stem_ok {
            return Err(Error::Config(format!(
                "module name `{}` is not a plain file stem (letters, digits, `_`)",
                self.module_name
            )));
        }
        let mut units = Vec::new();
        let mut files_read = Vec::new();
        let mut warnings = Vec::new();
        for kernel in &self.kernels {
            let (unit, warning) = self.compile_one(kernel)?;
            files_read.push(kernel.path.clone());
            warnings.extend(warning);
            if let Some(other) = units
                .iter()
                .find(|u: &&generate::Unit| u.type_name == unit.type_name)
            {
                return Err(Error::Config(format!(
                    "`{}` and `{}` both generate the type `{}`: give one a name with `Kernel::new(..).name(\"...\")`",
                    other.source,
                    unit.source,
                    unit.type_name
                )));
            }
            units.push(unit);
        }
        let module = generate::module(&units).map_err(|(i, message)| Error::Generate {
            path: self.kernels[i].path.clone(),
            message,
        })?;
        let ptx = units
            .iter()
            .flat_map(|u| u.ptx.iter().map(|p| (p.file.clone(), p.text.clone())))
            .collect();
        Ok(Rendered {
            module_file: format!("{}.rs", self.module_name),
            module,
            ptx,
            files_read,
            types: units.into_iter().map(|u| u.type_name).collect(),
            warnings,
        })
    }

    /// The size bindings of `kernel`: the builder's, overridden by the kernel's, by name.
    fn defines_of(&self, kernel: &Kernel) -> Vec<(String, u64)> {
        let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
        for (name, value) in self.defines.iter().chain(&kernel.defines) {
            by_name.insert(name.clone(), *value);
        }
        by_name.into_iter().collect()
    }

    fn compile_one(&self, kernel: &Kernel) -> Result<(generate::Unit, Option<String>), Error> {
        let path = &kernel.path;
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        let defines = self.defines_of(kernel);
        let located = |ds: Vec<einattn_ir::validate::Diagnostic>| Error::Compile {
            path: path.clone(),
            message: einattn_dsl::Diagnostics::new(ds).render(&name, &text),
        };
        let (cascade, warnings) = einattn_dsl::compile_source_with_warnings(&name, &text, &defines)
            .map_err(|d| located(d.items().to_vec()))?;
        let warning = (!warnings.is_empty()).then(|| warnings.render(&name, &text));
        let target = kernel.target.unwrap_or(self.target);
        let options = KernelOptions {
            target,
            elem: kernel.dtype.or(self.dtype).map(|d| match d {
                Dtype::Bf16 => Elem::Bf16,
                Dtype::F16 => Elem::F16,
            }),
            tiles: kernel.tiles.clone(),
            warps: kernel.warps,
            stages: kernel.stages,
            mma: None,
            loads: None,
            persistent: None,
            lazy_rescale: None,
            store_tma: None,
            p_in_shared: None,
            pin_deferred_wait: None,
            optimize: kernel.optimize.unwrap_or(self.optimize),
            strategy: kernel.strategy.clone(),
            chunk_tokens: kernel.chunk_tokens,
        };
        let instantiate = |sizes: &[(String, u64)]| {
            einattn_dsl::compile_source(&name, &text, sizes)
                .map_err(|d| CompileError::Source(d.items().to_vec()))
        };
        let compiled = family::compile(&Request {
            cascade: &cascade,
            options: &options,
            defines: &defines,
            instantiate: &instantiate,
        })
        .map_err(|e| Error::Compile {
            path: path.clone(),
            message: render_compile_error(&name, &text, e),
        })?;
        let type_name = match &kernel.name {
            Some(n) if generate::is_type_name(n) => n.clone(),
            Some(n) => {
                return Err(Error::Config(format!(
                    "`{n}` is not a Rust type name (UpperCamelCase letters and digits)"
                )))
            }
            None => generate::type_name(&compiled.cascade().name),
        };
        let manifest = compiled.manifest();
        let ptx = compiled
            .modules()
            .iter()
            .map(|m| generate::PtxFile {
                entry: m.ptx.entry.clone(),
                file: format!(
                    "{}.{}.ptx",
                    generate::snake(&type_name),
                    file_stem(&m.ptx.entry)
                ),
                text: m.ptx.text.clone(),
            })
            .collect();
        Ok((
            generate::Unit {
                type_name,
                source: name,
                cascade: compiled.cascade().name.clone(),
                defines,
                target: target.name(),
                manifest,
                ptx,
            },
            warning,
        ))
    }
}

/// An entry as a file stem (entries are PTX identifiers; this only guards the file name).
fn file_stem(entry: &str) -> String {
    entry
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A compile error as the CLI renders it: located diagnostics against the source, each
/// family's reason when none read the cascade.
pub fn render_compile_error(file_name: &str, source: &str, e: CompileError) -> String {
    e.render(file_name, |ds| {
        einattn_dsl::Diagnostics::new(ds).render(file_name, source)
    })
}
