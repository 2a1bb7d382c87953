//! Text-file tests, in the manner of Cranelift's filetests and naga's `tests/in` ->
//! `tests/out`: every `.ein` or `.run` file under `tests/filetests/` is a case. Its
//! `# RUN: COMMAND` lines are shell commands run from the repository root with the built
//! `einattn` first on `PATH`; `%s` stands for the case file and `%t` for a fresh scratch
//! folder. What the commands print (stdout, then stderr, then `[exit N]` when N != 0, with
//! the scratch folder written back as `%t`) must equal the case's expected file: the case's
//! path with its extension replaced by `.out`.
//!
//! Files in a folder named `inputs` are what cases read, not cases. Every command must
//! finish within [`LIMIT`].
//!
//! `EINATTN_BLESS=1 cargo test --test filetests` rewrites the expected files. Adding a case
//! needs no Rust: write the file, bless it, read the output, commit both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The time one command may take (hostile inputs must be refused quickly; everything else
/// is far below it).
const LIMIT: Duration = Duration::from_secs(10);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every case file under `dir`, sorted.
fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_none_or(|n| n != "inputs") {
                    stack.push(path);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("ein" | "run")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The commands of a case: the text after `# RUN:` on each line that has it.
fn run_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("# RUN:"))
        .map(|c| c.trim().to_string())
        .collect()
}

/// Runs one case's commands and returns what they printed, as the expected file holds it.
fn run_case(case: &Path, scratch: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(case).map_err(|e| format!("cannot read: {e}"))?;
    let commands = run_lines(&text);
    if commands.is_empty() {
        return Err("no `# RUN:` line".into());
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_einattn"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let rel = case.strip_prefix(root()).unwrap_or(case);
    let mut printed = String::new();
    for command in commands {
        let _ = std::fs::remove_dir_all(scratch);
        std::fs::create_dir_all(scratch).map_err(|e| format!("scratch: {e}"))?;
        let line = command
            .replace("%s", &rel.display().to_string())
            .replace("%t", &scratch.display().to_string());
        let start = Instant::now();
        let out = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(root())
            .env("PATH", &path)
            .env_remove("EINATTN_BLESS")
            .output()
            .map_err(|e| format!("cannot run `{line}`: {e}"))?;
        if start.elapsed() > LIMIT {
            return Err(format!("`{line}` took {:?}", start.elapsed()));
        }
        let mut o = String::from_utf8_lossy(&out.stdout).into_owned();
        o.push_str(&String::from_utf8_lossy(&out.stderr));
        match out.status.code() {
            Some(0) => {}
            Some(code) => o.push_str(&format!("[exit {code}]\n")),
            None => o.push_str("[killed by a signal]\n"),
        }
        printed.push_str(&o.replace(&scratch.display().to_string(), "%t"));
    }
    Ok(printed)
}

/// The first line where `got` and `want` differ, with a little context.
fn first_difference(got: &str, want: &str) -> String {
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    let at = (0..g.len().max(w.len()))
        .find(|&i| g.get(i) != w.get(i))
        .unwrap_or(0);
    format!(
        "first difference at line {}:\n  expected: {}\n  got:      {}",
        at + 1,
        w.get(at).copied().unwrap_or("<end of file>"),
        g.get(at).copied().unwrap_or("<end of output>")
    )
}

#[test]
fn filetests() {
    let dir = root().join("tests/filetests");
    let all = cases(&dir);
    assert!(!all.is_empty(), "no cases under {}", dir.display());
    let bless = std::env::var_os("EINATTN_BLESS").is_some();
    // Every expected file belongs to exactly one case.
    let mut expected: Vec<PathBuf> = all.iter().map(|c| c.with_extension("out")).collect();
    expected.sort();
    let before = expected.len();
    expected.dedup();
    assert_eq!(before, expected.len(), "two cases share an expected file");
    let scratch_root =
        std::env::temp_dir().join(format!("einattn-filetests-{}", std::process::id()));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = all.get(i) else { break };
                let rel = case
                    .strip_prefix(root())
                    .unwrap_or(case)
                    .display()
                    .to_string();
                let want_path = case.with_extension("out");
                let result = run_case(case, &scratch_root.join(i.to_string()));
                let failure = match result {
                    Err(e) => Some(format!("{rel}: {e}")),
                    Ok(got) if bless => std::fs::write(&want_path, got)
                        .err()
                        .map(|e| format!("{rel}: cannot bless: {e}")),
                    Ok(got) => match std::fs::read_to_string(&want_path) {
                        Err(_) => Some(format!(
                            "{rel}: no expected file {} (run with EINATTN_BLESS=1)",
                            want_path.display()
                        )),
                        Ok(want) if want != got => {
                            Some(format!("{rel}: {}", first_difference(&got, &want)))
                        }
                        Ok(_) => None,
                    },
                };
                if let Some(f) = failure {
                    if let Ok(mut v) = failures.lock() {
                        v.push(f);
                    }
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&scratch_root);
    // An expected file without its case is a case that was deleted or renamed.
    let mut orphans = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "out") && !expected.contains(&p) {
                orphans.push(p.display().to_string());
            }
        }
    }
    let mut failures = failures.into_inner().unwrap_or_default();
    failures.sort();
    failures.extend(
        orphans
            .into_iter()
            .map(|o| format!("{o}: no case produces it")),
    );
    assert!(
        failures.is_empty(),
        "{} of {} file tests failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
    println!("{} file tests passed", all.len());
}
