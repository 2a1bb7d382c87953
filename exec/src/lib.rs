//! einattn-exec: runs compiled kernels and SP plans on GPUs.
//!
//! Everything here launches kernels through their launch contracts
//! ([`einattn_backends::abi`]): the single-GPU runner ([`whole`]) binds the whole
//! problem's tensors, the plan executor ([`plan`]) binds the regions of a plan step; both
//! fill parameters through the one binder, `abi::bind`.
//!
//! - [`device`]: opening GPUs, the code-generation target and the machine model of the
//!   device at hand;
//! - [`whole`]: the kernels of one compile on the whole problem, on one GPU;
//! - [`check`] and [`bench`]: `einattn check` and `einattn bench`;
//! - [`given`]: the values a user gives a run (`--param`, `--input`) in place of drawn ones;
//! - [`grad`]: the values a backward cascade runs on for `check --grad`;
//! - [`npy`]: `.npy` files in and out;
//! - [`ranks`]: the GPUs of an SP run and their NCCL communicators;
//! - [`plan`]: the plan executor, `check --sp`, `run-plan` and `bench --sp`.

pub mod bench;
pub mod check;
pub mod device;
pub mod given;
pub mod grad;
pub mod npy;
pub mod plan;
pub mod ranks;
pub mod whole;

use std::fmt;

/// Exit code when the GPU result does not match the reference.
pub const MISMATCH_EXIT: i32 = 1;
/// Exit code when there is no GPU to run on.
pub const NO_GPU_EXIT: i32 = 3;

/// Why a run could not be done (a mismatch is a result, not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecError {
    /// No usable GPU (exit 3).
    NoGpu(String),
    /// The inputs (a plan, a manifest, a kernel's needs) are wrong, or the driver failed
    /// (exit 1).
    Input(String),
    /// The command line asks for something this run cannot do (exit 2).
    Usage(String),
}

impl ExecError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecError::NoGpu(_) => NO_GPU_EXIT,
            ExecError::Input(_) => 1,
            ExecError::Usage(_) => 2,
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::NoGpu(reason) => write!(f, "error: no GPU to run on: {reason}"),
            ExecError::Input(m) | ExecError::Usage(m) => write!(f, "error: {m}"),
        }
    }
}

impl std::error::Error for ExecError {}

impl From<einattn_runtime::RuntimeError> for ExecError {
    fn from(e: einattn_runtime::RuntimeError) -> Self {
        match e {
            einattn_runtime::RuntimeError::GpuUnavailable { reason } => ExecError::NoGpu(reason),
            other => ExecError::Input(other.to_string()),
        }
    }
}

impl From<einattn_backends::abi::BindError> for ExecError {
    fn from(e: einattn_backends::abi::BindError) -> Self {
        ExecError::Input(e.0)
    }
}

pub type Result<T> = std::result::Result<T, ExecError>;

/// How a report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}
