//! The CLI on hostile inputs, as files: each `tests/hardening/NAME.cmd` is one command line
//! (arguments separated by whitespace; `{out}` is a fresh scratch folder) run in
//! `tests/hardening/`, and `NAME.expected` is what it must print: the line `exit N`, then
//! its stderr, then `--- stdout` and its stdout. Every case must finish within a few
//! seconds. `UPDATE_EXPECTED=1 cargo test --test hardening` rewrites the expected files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hardening")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("einattn-hardening-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// What a case printed, in the `.expected` format.
fn render(code: Option<i32>, stdout: &[u8], stderr: &[u8], out: &Path) -> String {
    let clean = |b: &[u8]| String::from_utf8_lossy(b).replace(&out.display().to_string(), "{out}");
    let code = code.map_or("signal".to_string(), |c| c.to_string());
    format!(
        "exit {code}\n{}--- stdout\n{}",
        clean(stderr),
        clean(stdout)
    )
}

fn run_case(name: &str) -> (String, Duration) {
    let dir = cases_dir();
    let cmd = std::fs::read_to_string(dir.join(format!("{name}.cmd"))).expect("the .cmd file");
    let out = scratch(name);
    let args: Vec<String> = cmd
        .split_whitespace()
        .map(|a| a.replace("{out}", &out.display().to_string()))
        .collect();
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_einattn"))
        .args(&args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    let elapsed = start.elapsed();
    let text = render(output.status.code(), &output.stdout, &output.stderr, &out);
    let _ = std::fs::remove_dir_all(&out);
    (text, elapsed)
}

#[test]
fn every_case_prints_what_it_expects_quickly() {
    let dir = cases_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/hardening")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "cmd").then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    names.sort();
    assert!(!names.is_empty());
    let update = std::env::var_os("UPDATE_EXPECTED").is_some();
    let mut failures = Vec::new();
    for name in &names {
        let (got, elapsed) = run_case(name);
        if elapsed > Duration::from_secs(5) {
            failures.push(format!("{name}: took {elapsed:?}"));
        }
        let path = dir.join(format!("{name}.expected"));
        if update {
            std::fs::write(&path, &got).expect("write expected");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            failures.push(format!("{name}:\n--- expected\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A Fortran-order `.npy` is the same array as its C-order twin: `run` reads both to the
/// same inputs and outputs (it used to read Fortran data as if it were row-major).
#[test]
fn fortran_and_c_order_inputs_give_the_same_run() {
    let dir = cases_dir();
    let mut outputs = Vec::new();
    for (k, file) in ["q_c.npy", "q_fortran.npy"].iter().enumerate() {
        let out = scratch(&format!("order{k}"));
        let status = Command::new(env!("CARGO_BIN_EXE_einattn"))
            .args(["run", "quadratic.ein", "--input"])
            .arg(format!("Q={file}"))
            .arg("--out")
            .arg(&out)
            .current_dir(&dir)
            .output()
            .expect("the binary runs");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let read = |name: &str| std::fs::read(out.join(name)).expect("written");
        outputs.push((read("Q.npy"), read("S.npy")));
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(outputs[0] == outputs[1], "C and Fortran order disagree");
}

/// A full disk is an error (it used to exit 0 with nothing written); a reader that goes
/// away (`| head`) ends the output quietly with exit 0.
#[test]
fn stdout_write_errors_are_reported_and_a_closed_pipe_is_not() {
    let root = env!("CARGO_MANIFEST_DIR");
    for args in [
        &["compile", "examples/attention_causal.ein", "--emit", "ptx"][..],
        &["analyze", "examples/attention_causal.ein"][..],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = Command::new(env!("CARGO_BIN_EXE_einattn"))
            .args(args)
            .current_dir(root)
            .stdout(full)
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to standard output"),
            "{args:?}: {stderr}"
        );

        let mut child = Command::new(env!("CARGO_BIN_EXE_einattn"))
            .args(args)
            .current_dir(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("it ends");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The same input gets the same diagnostics every time ("did you mean" suggestions used to
/// depend on hash order when several names were equally close).
#[test]
fn diagnostics_are_deterministic() {
    let root = env!("CARGO_MANIFEST_DIR");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_einattn"))
            .args([
                "analyze",
                "examples/lightning.ein",
                "-D",
                "N=300",
                "-D",
                "q=1",
            ])
            .current_dir(root)
            .output()
            .expect("the binary runs")
    };
    let first = run();
    assert_eq!(first.status.code(), Some(1));
    for _ in 0..8 {
        assert_eq!(run().stderr, first.stderr);
    }
}

/// What `optimize -o` writes is a cascade `analyze` accepts (it used to write one that
/// read a 5-rank state with 4 indices, and exit 0).
#[test]
fn optimize_writes_only_what_analyze_accepts() {
    let dir = cases_dir();
    let out = scratch("optimized");
    let written = out.join("o.ein");
    let opt = Command::new(env!("CARGO_BIN_EXE_einattn"))
        .args(["optimize", "ps_over_parent_rank.ein", "-o"])
        .arg(&written)
        .current_dir(&dir)
        .output()
        .expect("the binary runs");
    assert_eq!(
        opt.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&opt.stderr)
    );
    let analyze = Command::new(env!("CARGO_BIN_EXE_einattn"))
        .arg("analyze")
        .arg(&written)
        .output()
        .expect("the binary runs");
    assert_eq!(
        analyze.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&analyze.stderr)
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// A `libcuda.so` that loads but is not a driver (it lacks `cuInit`) means no usable GPU:
/// exit 3 with the reason, where cudarc used to panic ("Missing symbol cuInit", exit 101).
#[test]
fn a_stub_libcuda_is_no_gpu_not_a_panic() {
    let dir = scratch("stub-libcuda");
    let c = dir.join("stub.c");
    std::fs::write(&c, "int not_cuda(void) { return 0; }\n").expect("write");
    // The C compiler Rust links with builds the stub.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let built = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join("libcuda.so"))
        .arg(&c)
        .status()
        .unwrap_or_else(|e| panic!("`{cc}` builds the stub library: {e}"));
    assert!(built.success(), "`{cc}` failed");
    std::fs::copy(dir.join("libcuda.so"), dir.join("libcuda.so.1")).expect("copy");
    let out = Command::new(env!("CARGO_BIN_EXE_einattn"))
        .args(["check", "examples/attention_causal.ein", "-D", "N=128"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("lacks cuInit"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
