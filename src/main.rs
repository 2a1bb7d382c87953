use clap::{Parser, Subcommand, ValueEnum};
use einattn::cli::{self, CliError, Stage};
use einattn_exec::ReportFormat;
use std::path::PathBuf;
use std::process::ExitCode;

/// Compile attention algorithms written as extended Einsum cascades.
#[derive(Parser)]
#[command(name = "einattn", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explain a cascade: passes over each rank, live buffers, FLOPs, bytes, roofline.
    Analyze {
        file: PathBuf,
        /// Bind a size symbol: -D N=4096
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        sp: SpFlags,
    },
    /// Derive a cheaper equivalent cascade (fewer passes, bytes, FLOPs) with the rewrite engine.
    Optimize {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        /// Write the optimized cascade here instead of printing it.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Print the backward cascade (reverse-mode gradients) of a cascade, in the language itself.
    Grad {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        /// Inputs and parameters to differentiate, comma-separated (default: every input).
        #[arg(long, value_delimiter = ',')]
        wrt: Option<Vec<String>>,
        /// Write the backward cascade here instead of printing it.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Evaluate a cascade with the CPU reference interpreter and write inputs and outputs as .npy.
    Run {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        /// Seed for the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        given: GivenFlags,
        /// Directory for NAME.npy of every input and output.
        #[arg(long, default_value = "einattn-out")]
        out: PathBuf,
        /// Refuse to run when the tensors held at once would exceed this many elements
        /// (8 bytes each).
        #[arg(long, value_name = "N", default_value_t = einattn_ir::interp::Limits::default().max_elements)]
        max_elements: u64,
        /// Refuse to run when the Einsums would iterate more than this many points.
        #[arg(long, value_name = "N", default_value_t = einattn_ir::interp::Limits::default().max_work)]
        max_work: u64,
    },
    /// Compile a cascade; `--emit` prints one stage of the pipeline.
    Compile {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        /// Print one stage of the pipeline instead of compiling.
        #[arg(long, value_enum)]
        emit: Option<EmitStage>,
        #[command(flatten)]
        sp: SpFlags,
        #[command(flatten)]
        kernel: KernelFlags,
        /// Output directory.
        #[arg(short = 'o', long = "out", default_value = "einattn-build")]
        out: PathBuf,
    },
    /// Run the compiled kernel on the GPU with fresh random inputs and compare with the
    /// reference interpreter; exits 1 on a mismatch, 3 when there is no GPU.
    Check {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        #[command(flatten)]
        kernel: KernelFlags,
        /// Seed of the random inputs (default: drawn from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        given: GivenFlags,
        /// Write every output the kernels computed to DIR as NAME.npy (to compare with
        /// another implementation on the same --input files).
        #[arg(long, value_name = "DIR", conflicts_with = "devices")]
        save_outputs: Option<PathBuf>,
        /// Check the backward kernels (of `einattn grad`'s cascade) on a forward's values.
        #[arg(long, conflicts_with = "devices")]
        grad: bool,
        /// Split the sequence over GPUs (`--sp P`): plan, run the plan over NCCL and
        /// compare with one GPU on the whole problem.
        #[command(flatten)]
        sp: SpFlags,
    },
    /// Run the plan `compile FILE --sp P -o DIR` wrote, on P GPUs of this host (or one
    /// process per GPU under a launcher that sets RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT), and compare with one GPU; exits 1 on a mismatch.
    RunPlan {
        dir: PathBuf,
        /// Seed of the random inputs (default: drawn from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Run every rank on GPU 0, collectives as device copies (checks a plan's kernels
        /// and steps on a machine with one GPU; the times mean nothing).
        #[arg(long, conflicts_with = "cpu")]
        one_gpu: bool,
        /// Run each rank's transfers on a second stream, ordered against compute by the
        /// plan's events, so they overlap compute.
        #[arg(long, conflicts_with = "cpu")]
        overlap: bool,
        /// Run the plan on the CPU executor instead (the reference interpreter per step,
        /// collectives simulated; no GPU needed) and compare with the interpreter.
        #[arg(long)]
        cpu: bool,
    },
    /// Time the compiled kernel on the GPU: median, TFLOP/s, percent of the peak.
    Bench {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        #[command(flatten)]
        kernel: KernelFlags,
        #[arg(long, default_value_t = 50)]
        reps: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        given: GivenFlags,
        /// Time the backward kernels (of `einattn grad`'s cascade) instead, alone and after
        /// the forward's kernels (forward + backward).
        #[arg(long, conflicts_with = "devices")]
        grad: bool,
        /// Time the plan for P GPUs instead (each rank draws its own inputs; no reference).
        #[command(flatten)]
        sp: SpFlags,
    },
}

#[derive(clap::Args)]
struct KernelFlags {
    /// GPU architecture of the PTX.
    #[arg(long, value_enum)]
    target: Option<TargetArg>,
    /// Storage type of Q, K, V and O (default: the cascade's).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Tile sizes by rank: --tile m0=64,p0=128 (key tile, query rows per CTA).
    #[arg(long, value_name = "RANK=SIZE,...", value_delimiter = ',', value_parser = cli::parse_define)]
    tile: Vec<(String, u64)>,
    /// Warps per CTA.
    #[arg(long)]
    warps: Option<u32>,
    /// Pipeline stages of the K/V shared-memory ring.
    #[arg(long)]
    stages: Option<u32>,
    /// Run the rewrite engine before compiling.
    #[arg(long)]
    optimize: bool,
    /// Tensor-core instructions: per-warp `mma.sync`, or warpgroup `wgmma` (sm_90a; linear
    /// attention). Default: the scheduler's choice.
    #[arg(long, value_enum)]
    mma: Option<MmaArg>,
    /// Who copies K and V into shared memory (softmax attention, wgmma): every thread
    /// (cooperative), or a producer warpgroup beside the compute warps (producer: warp
    /// specialization with mbarriers; pingpong: also the compute warpgroups issue their
    /// matrix products in turn; the `-tma` forms copy with the copy engine through tensor
    /// maps, one thread issuing). Default: the scheduler's choice.
    #[arg(long, value_enum)]
    loads: Option<LoadsArg>,
    /// The grid of a warp-specialized softmax kernel: one CTA per (query tile, batch, head)
    /// (tiles), or one CTA per SM looping over them (persistent). Default: the scheduler's
    /// choice.
    #[arg(long, value_enum)]
    grid: Option<GridArg>,
    /// Softmax attention: rescale the output at every key tile whose max grew (eager), or
    /// keep each row's max until a tile's scores exceed it by 2^8 (lazy; exact, and most
    /// tiles then skip the rescale). Default: lazy with wgmma (sm_90a), eager with mma.sync.
    #[arg(long, value_enum)]
    rescale: Option<RescaleArg>,
    /// Softmax attention on sm_90a: each thread stores its output elements (direct), or the
    /// consumer warpgroups stage them in shared memory for the copy engine (tma; needs the
    /// copy-engine producer and one CTA per work tile). Default: tma wherever it applies,
    /// direct elsewhere.
    #[arg(long, value_enum)]
    store: Option<StoreArg>,
    /// Softmax attention on sm_90a: the probabilities reach P V as register fragments
    /// (registers), or each warpgroup writes its rows of P to shared memory for its wgmma to
    /// read back (shared; FlashAttention-3's choice for 192-key tiles at head dim 64; key
    /// tiles a multiple of 64). Default: registers.
    #[arg(long, value_enum)]
    probs: Option<ProbsArg>,
    /// Softmax attention on sm_90a, warp-specialized: where the wait for the previous key
    /// tile's deferred P V goes: where ptxas schedules it (free; it moves it before this
    /// tile's softmax), or after the softmax it should overlap, held by a fence (pinned).
    /// Default: pinned.
    #[arg(long, value_enum)]
    pv_wait: Option<PvWaitArg>,
    /// Linear attention: one CTA walks the sequence (single), parallel chunks in two
    /// kernels (chunked), or one block per CTA with a decoupled look-back (lookback).
    #[arg(long, value_parser = ["single", "chunked", "lookback"])]
    strategy: Option<String>,
    /// Linear attention, chunked strategy: tokens per chunk.
    #[arg(long)]
    chunk_tokens: Option<u64>,
}

impl KernelFlags {
    fn into_args(self) -> cli::KernelArgs {
        cli::KernelArgs {
            target: self.target.map(|t| match t {
                TargetArg::Sm80 => einattn_backends::Target::Sm80,
                TargetArg::Sm90a => einattn_backends::Target::Sm90a,
            }),
            options: einattn_backends::KernelOptions {
                target: einattn_backends::Target::default(),
                elem: self.dtype.map(|d| match d {
                    DtypeArg::Bf16 => einattn_backends::tile::Elem::Bf16,
                    DtypeArg::F16 => einattn_backends::tile::Elem::F16,
                }),
                tiles: self.tile,
                warps: self.warps,
                stages: self.stages,
                mma: self.mma.map(|m| match m {
                    MmaArg::Sync => einattn_backends::tile::MmaUnit::Sync,
                    MmaArg::Wgmma => einattn_backends::tile::MmaUnit::Warpgroup,
                }),
                loads: self.loads.map(|l| {
                    use einattn_backends::tile::Loads;
                    let (pingpong, tma) = match l {
                        LoadsArg::Cooperative => return Loads::Cooperative,
                        LoadsArg::Producer => (false, false),
                        LoadsArg::Pingpong => (true, false),
                        LoadsArg::ProducerTma => (false, true),
                        LoadsArg::PingpongTma => (true, true),
                    };
                    Loads::ProducerWarpgroup { pingpong, tma }
                }),
                persistent: self.grid.map(|g| matches!(g, GridArg::Persistent)),
                lazy_rescale: self.rescale.map(|r| matches!(r, RescaleArg::Lazy)),
                store_tma: self.store.map(|s| matches!(s, StoreArg::Tma)),
                p_in_shared: self.probs.map(|p| matches!(p, ProbsArg::Shared)),
                pin_deferred_wait: self.pv_wait.map(|w| matches!(w, PvWaitArg::Pinned)),
                optimize: self.optimize,
                strategy: self.strategy,
                chunk_tokens: self.chunk_tokens,
            },
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    #[value(name = "sm_80")]
    Sm80,
    #[value(name = "sm_90a")]
    Sm90a,
}

#[derive(Clone, Copy, ValueEnum)]
enum MmaArg {
    Sync,
    Wgmma,
}

#[derive(Clone, Copy, ValueEnum)]
enum LoadsArg {
    Cooperative,
    Producer,
    Pingpong,
    ProducerTma,
    PingpongTma,
}

#[derive(Clone, Copy, ValueEnum)]
enum GridArg {
    Tiles,
    Persistent,
}

#[derive(Clone, Copy, ValueEnum)]
enum RescaleArg {
    Eager,
    Lazy,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreArg {
    Direct,
    Tma,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProbsArg {
    Registers,
    Shared,
}

#[derive(Clone, Copy, ValueEnum)]
enum PvWaitArg {
    Free,
    Pinned,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F16,
}

/// Values in place of drawn ones, for `run`, `check` and `bench`.
#[derive(clap::Args)]
struct GivenFlags {
    /// Read an input or parameter from an .npy file instead of drawing it: --input Q=q.npy
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_input)]
    input: Vec<(String, PathBuf)>,
    /// Set a parameter (every element of a parameter tensor) instead of its default or a
    /// drawn value: --param scale=0.125
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_param)]
    param: Vec<(String, f64)>,
}

impl GivenFlags {
    fn into_given(self) -> einattn_exec::given::Given {
        einattn_exec::given::Given {
            params: self.param,
            files: self.input,
            tensors: Vec::new(),
        }
    }
}

#[derive(clap::Args)]
struct SpFlags {
    /// Split the sequence across P devices and plan the communication.
    #[arg(long = "sp", value_name = "P", value_parser = clap::value_parser!(u64).range(1..))]
    devices: Option<u64>,
    /// The query and key ranks of the split sequence (detected when omitted): --seq p,m
    #[arg(long = "seq", value_name = "Q,K", value_parser = parse_pair, requires = "devices")]
    sequence: Option<(String, String)>,
    /// Use this scheme instead of the cheapest (lasp2, lasp1, allgather_kv, ring, ...).
    #[arg(long, requires = "devices")]
    scheme: Option<String>,
    /// `check`/`bench --sp P`: run every rank on GPU 0, collectives as device copies.
    #[arg(long, requires = "devices")]
    one_gpu: bool,
    /// `check`/`bench --sp P`: run each rank's transfers on a second stream, ordered
    /// against compute by the plan's events, so they overlap compute.
    #[arg(long, requires = "devices")]
    overlap: bool,
}

impl SpFlags {
    fn into_args(self) -> cli::SpArgs {
        cli::SpArgs {
            devices: self.devices,
            sequence: self.sequence,
            scheme: self.scheme,
            one_gpu: self.one_gpu,
            overlap: self.overlap,
        }
    }
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("expected Q,K, got `{text}`"))?;
    Ok((a.trim().to_string(), b.trim().to_string()))
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

impl From<Format> for ReportFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Text => ReportFormat::Text,
            Format::Json => ReportFormat::Json,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum EmitStage {
    Ast,
    Ir,
    Report,
    Schedule,
    /// The Tile IR of every kernel, in launch order.
    Tile,
    /// The PTX of every kernel, in launch order (`-o DIR` writes one file per kernel).
    Ptx,
}

fn parse_param(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got `{text}`"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    Ok((name.trim().to_string(), value))
}

fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got `{text}`"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Writes to stdout, returning from the enclosing function on failure: a closed pipe
/// (`einattn ... | head`) ends the output quietly, instead of panicking as `print!` does;
/// any other failure (a full disk) is an error, instead of exit 0 with nothing written.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*).map_err(stdout_error)?;
    }};
}
macro_rules! sayln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).map_err(stdout_error)?;
    }};
}

/// What a failed write to stdout ends the command with: nothing and exit 0 for a reader
/// that went away (EPIPE), an error for anything else.
fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError {
            message: String::new(),
            exit_code: 0,
        }
    } else {
        CliError::input(format!("error: cannot write to standard output: {e}"))
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Prints a check's report; a mismatch exits with its own code.
fn report_check(report: &str, pass: bool) -> Result<(), CliError> {
    say!("{report}");
    if pass {
        Ok(())
    } else {
        Err(CliError {
            message: "error: the GPU output does not match the reference".into(),
            exit_code: einattn_exec::MISMATCH_EXIT,
        })
    }
}

fn execute(args: Args) -> Result<(), CliError> {
    match args.command {
        Command::Analyze {
            file,
            define,
            format,
            sp,
        } => {
            let format = format.into();
            sayln!("{}", cli::analyze(&file, &define, format, &sp.into_args())?);
        }
        Command::Optimize { file, define, out } => {
            say!("{}", cli::optimize(&file, &define, out.as_deref())?);
        }
        Command::Grad {
            file,
            define,
            wrt,
            out,
        } => {
            say!("{}", cli::grad(&file, &define, wrt, out.as_deref())?);
        }
        Command::Run {
            file,
            define,
            seed,
            given,
            out,
            max_elements,
            max_work,
        } => {
            let limits = einattn_ir::interp::Limits {
                max_elements,
                max_work,
            };
            let summary = cli::run(&file, &define, seed, &given.into_given(), &out, limits)?;
            for (name, shape, path) in summary.written {
                sayln!("{name:>8} {shape:?} -> {}", path.display());
            }
        }
        Command::Compile {
            file,
            define,
            emit,
            sp,
            kernel,
            out,
        } => {
            let kernel = kernel.into_args();
            match emit {
                Some(emit) => {
                    let stage = match emit {
                        EmitStage::Ast => Stage::Ast,
                        EmitStage::Ir => Stage::Ir,
                        EmitStage::Report => Stage::Report,
                        EmitStage::Schedule => Stage::Schedule,
                        EmitStage::Tile => Stage::Tile,
                        EmitStage::Ptx => Stage::Ptx,
                    };
                    say!("{}", cli::emit(&file, &define, stage, &kernel)?);
                }
                None if sp.devices.is_some() => say!(
                    "{}",
                    cli::compile_plan(&file, &define, &sp.into_args(), &kernel, &out)?
                ),
                None => say!("{}", cli::compile_ptx(&file, &define, &kernel, &out)?),
            }
        }
        Command::Check {
            file,
            define,
            kernel,
            seed,
            given,
            save_outputs,
            grad,
            sp,
        } => {
            let (report, pass) = cli::check(
                &file,
                &define,
                &kernel.into_args(),
                seed.unwrap_or_else(clock_seed),
                &given.into_given(),
                save_outputs.as_deref(),
                grad,
                &sp.into_args(),
            )?;
            report_check(&report, pass)?;
        }
        Command::RunPlan {
            dir,
            seed,
            cpu: true,
            ..
        } => {
            let (report, pass) = cli::run_plan_cpu(
                &dir,
                seed.unwrap_or_else(clock_seed),
                einattn_ir::interp::Limits::default(),
            )?;
            say!("{report}");
            if !pass {
                return Err(CliError {
                    message: "error: the plan's outputs on the CPU do not match the reference"
                        .into(),
                    exit_code: einattn_exec::MISMATCH_EXIT,
                });
            }
        }
        Command::RunPlan {
            dir,
            seed,
            one_gpu,
            overlap,
            ..
        } => {
            let mapping = einattn_exec::ranks::RankMode {
                mapping: if one_gpu {
                    einattn_exec::ranks::RankMapping::OneGpuForAll
                } else {
                    einattn_exec::ranks::RankMapping::OneGpuEach
                },
                overlap,
            };
            let (report, pass) = cli::run_plan(&dir, seed.unwrap_or_else(clock_seed), mapping)?;
            report_check(&report, pass)?;
        }
        Command::Bench {
            file,
            define,
            kernel,
            reps,
            format,
            given,
            grad,
            sp,
        } => {
            let format = format.into();
            say!(
                "{}",
                cli::bench(
                    &file,
                    &define,
                    &kernel.into_args(),
                    reps.max(1),
                    format,
                    &given.into_given(),
                    grad,
                    &sp.into_args()
                )?
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Output still buffered (a last line without a newline) must reach stdout too.
    let flushed = |()| {
        use std::io::Write as _;
        std::io::stdout().flush().map_err(stdout_error)
    };
    match execute(Args::parse()).and_then(flushed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("{}", e.message.trim_end());
            }
            ExitCode::from(u8::try_from(e.exit_code).unwrap_or(1))
        }
    }
}
