use clap::{Parser, Subcommand, ValueEnum};
use einattn::cli::{self, CliError, ReportFormat, Stage};
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
    /// Evaluate a cascade with the CPU reference interpreter and write inputs and outputs as .npy.
    Run {
        file: PathBuf,
        #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = cli::parse_define)]
        define: Vec<(String, u64)>,
        /// Seed for the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Read an input or parameter from an .npy file instead of drawing it: --input Q=q.npy
        #[arg(long, value_name = "NAME=PATH", value_parser = parse_input)]
        input: Vec<(String, PathBuf)>,
        /// Directory for NAME.npy of every input and output.
        #[arg(long, default_value = "einattn-out")]
        out: PathBuf,
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
        /// Run the rewrite engine before compiling.
        #[arg(long)]
        optimize: bool,
        /// Output directory.
        #[arg(short = 'o', long = "out", default_value = "einattn-build")]
        out: PathBuf,
    },
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
}

impl SpFlags {
    fn into_args(self) -> cli::SpArgs {
        cli::SpArgs {
            devices: self.devices,
            sequence: self.sequence,
            scheme: self.scheme,
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

#[derive(Clone, Copy, ValueEnum)]
enum EmitStage {
    Ast,
    Ir,
    Report,
}

fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got `{text}`"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn execute(args: Args) -> Result<(), CliError> {
    match args.command {
        Command::Analyze {
            file,
            define,
            format,
            sp,
        } => {
            let format = match format {
                Format::Text => ReportFormat::Text,
                Format::Json => ReportFormat::Json,
            };
            println!("{}", cli::analyze(&file, &define, format, &sp.into_args())?);
        }
        Command::Optimize { file, define, out } => {
            print!("{}", cli::optimize(&file, &define, out.as_deref())?);
        }
        Command::Run {
            file,
            define,
            seed,
            input,
            out,
        } => {
            let summary = cli::run(&file, &define, seed, &input, &out)?;
            for (name, shape, path) in summary.written {
                println!("{name:>8} {shape:?} -> {}", path.display());
            }
        }
        Command::Compile {
            file,
            define,
            emit,
            sp,
            optimize,
            out,
        } => match emit {
            Some(emit) => {
                let stage = match emit {
                    EmitStage::Ast => Stage::Ast,
                    EmitStage::Ir => Stage::Ir,
                    EmitStage::Report => Stage::Report,
                };
                print!("{}", cli::emit(&file, &define, stage)?);
            }
            None => print!(
                "{}",
                cli::compile_plan(&file, &define, &sp.into_args(), optimize, &out)?
            ),
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    match execute(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", e.message.trim_end());
            ExitCode::from(e.exit_code as u8)
        }
    }
}
