//! Finding and running `ptxas` to validate printed PTX and read its resource report.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Resource use of one kernel as `ptxas -v` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtxasReport {
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    pub shared_bytes: u32,
    /// The whole `-v` output.
    pub log: String,
}

impl PtxasReport {
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0 || self.stack_frame > 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    #[error(
        "ptxas not found (set EINATTN_PTXAS, put it on PATH, or `pip install nvidia-cuda-nvcc`)"
    )]
    NotFound,
    #[error("running ptxas failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("ptxas rejected the PTX for {arch}:\n{log}")]
    Rejected { arch: String, log: String },
}

/// Locates ptxas: `$EINATTN_PTXAS`, `PATH`, `/usr/local/cuda/bin`, or the `nvidia-cuda-nvcc`
/// pip package of `python3`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("EINATTN_PTXAS") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let cuda = Path::new("/usr/local/cuda/bin/ptxas");
    if cuda.is_file() {
        return Some(cuda.to_path_buf());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import nvidia, os\nfor d in nvidia.__path__:\n  for sub in ('cu13/bin','cuda_nvcc/bin'):\n    p=os.path.join(d,sub,'ptxas')\n    if os.path.isfile(p): print(p)",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_file())
}

/// ptxas for a test: `None` (after saying so) when it is missing, unless
/// `EINATTN_REQUIRE_PTXAS` is set (as CI does), where a missing ptxas fails the test.
pub fn ptxas_for_test(test: &str) -> Option<PathBuf> {
    match find_ptxas() {
        Some(p) => Some(p),
        None if std::env::var_os("EINATTN_REQUIRE_PTXAS").is_some() => {
            panic!("{test}: ptxas not found and EINATTN_REQUIRE_PTXAS is set")
        }
        None => {
            eprintln!("SKIPPED {test}: ptxas not found (pip install nvidia-cuda-nvcc, or set EINATTN_PTXAS)");
            None
        }
    }
}

/// Assembles `ptx` for `arch` (`sm_80`, `sm_90a`) with `-v` and parses the report.
pub fn assemble(ptxas: &Path, ptx: &str, arch: &str) -> Result<PtxasReport, PtxasError> {
    assemble_cubin(ptxas, ptx, arch).map(|(report, _)| report)
}

/// [`assemble`], keeping the cubin.
pub fn assemble_cubin(
    ptxas: &Path,
    ptx: &str,
    arch: &str,
) -> Result<(PtxasReport, Vec<u8>), PtxasError> {
    let dir = std::env::temp_dir().join(format!("einattn-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // One name per call: two threads assembling the same PTX (tests of one process do)
    // must not remove each other's file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stamp = format!("{call}-{arch}");
    let src = dir.join(format!("{stamp}.ptx"));
    let obj = dir.join(format!("{stamp}.cubin"));
    std::fs::write(&src, ptx)?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .output()?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&src);
    let cubin = std::fs::read(&obj).unwrap_or_default();
    let _ = std::fs::remove_file(&obj);
    if !out.status.success() {
        return Err(PtxasError::Rejected {
            arch: arch.to_string(),
            log,
        });
    }
    Ok((parse_report(arch, &log), cubin))
}

/// Locates cuobjdump (which runs nvdisasm from its own folder or `PATH`):
/// `$EINATTN_CUOBJDUMP`, ptxas's folder, `PATH`, `/usr/local/cuda/bin`.
pub fn find_cuobjdump() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("EINATTN_CUOBJDUMP") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let beside_ptxas = find_ptxas().and_then(|p| p.parent().map(|d| d.join("cuobjdump")));
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("cuobjdump"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside_ptxas
        .into_iter()
        .chain(on_path)
        .chain([PathBuf::from("/usr/local/cuda/bin/cuobjdump")])
        .find(|p| p.is_file())
}

/// The SASS of a cubin, as `cuobjdump -sass` prints it.
pub fn disassemble(cuobjdump: &Path, cubin: &[u8]) -> Result<String, PtxasError> {
    let dir = std::env::temp_dir().join(format!("einattn-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let obj = dir.join(format!("{call}.cubin"));
    std::fs::write(&obj, cubin)?;
    let mut cmd = Command::new(cuobjdump);
    // nvdisasm lives beside cuobjdump in the pip packages.
    if let Some(d) = cuobjdump.parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![d.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
    }
    let out = cmd.arg("-sass").arg(&obj).output()?;
    let _ = std::fs::remove_file(&obj);
    if !out.status.success() {
        return Err(PtxasError::Rejected {
            arch: "cuobjdump".into(),
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn number_before(text: &str, suffix: &str) -> Option<u32> {
    let idx = text.find(suffix)?;
    let head = text[..idx].trim_end();
    let digits: String = head
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

/// Parses `ptxas -v` lines like
/// `Used 168 registers, used 1 barriers, 98304 bytes smem` and
/// `0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads`.
pub fn parse_report(arch: &str, log: &str) -> PtxasReport {
    let mut r = PtxasReport {
        arch: arch.to_string(),
        log: log.to_string(),
        ..Default::default()
    };
    for line in log.lines() {
        if let Some(v) = number_before(line, "registers") {
            r.registers = v;
        }
        if let Some(v) = number_before(line, "bytes smem") {
            r.shared_bytes = v;
        }
        if let Some(v) = number_before(line, "bytes stack frame") {
            r.stack_frame = v;
        }
        if let Some(v) = number_before(line, "bytes spill stores") {
            r.spill_stores = v;
        }
        if let Some(v) = number_before(line, "bytes spill loads") {
            r.spill_loads = v;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_verbose_report() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas info    : Function properties for k\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 98304 bytes smem\n";
        let r = parse_report("sm_90a", log);
        assert_eq!(r.registers, 168);
        assert_eq!(r.stack_frame, 8);
        assert_eq!(r.spill_stores, 4);
        assert_eq!(r.spill_loads, 12);
        assert!(r.spills());
    }
}
