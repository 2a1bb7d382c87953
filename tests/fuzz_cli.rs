//! A fuzzer for the CLI, run by `cargo test`: the examples, mutated (bytes, tokens, lines,
//! sizes), through `analyze` (also `--sp P` and JSON), `optimize`, `compile --emit` (PTX,
//! Tile IR, IR, syntax tree, schedule, report), `grad` and `run`, one process per case under a
//! memory limit (RLIMIT_AS) and a time limit. Every case must end with exit 0 (it worked),
//! 1 (bad input), 2 (bad usage) or 3 (no GPU): a panic (101), an abort (134), any other
//! signal, a case over the time limit or over the memory limit (an allocation failure
//! aborts) fails the test, which lists each failing case and writes it to
//! `target/fuzz-failures/` to reproduce.
//!
//! Deterministic: case `i` is drawn from stream `i` of a ChaCha generator seeded with
//! `EINATTN_FUZZ_SEED` (default below), whatever the number of workers.
//! `EINATTN_FUZZ_CASES` sets the number of cases (default 10,000: a couple of minutes in
//! release mode on two cores).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DEFAULT_CASES: usize = 10_000;
const DEFAULT_SEED: u64 = 0x5eed_f022;
/// Per case: wall-clock time and address space.
const CASE_TIME: Duration = Duration::from_secs(5);
const CASE_MEMORY_BYTES: u64 = 1 << 30;
/// `run` gets bounds small enough that a case stays well inside the time limit (the
/// interpreter visits about 10 million points a second).
const RUN_MAX_ELEMENTS: &str = "1048576";
const RUN_MAX_WORK: &str = "4194304";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn examples() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("examples/")
        .filter_map(|e| {
            let p = e.ok()?.path();
            if p.extension()? != "ein" {
                return None;
            }
            Some((
                p.file_name()?.to_str()?.to_string(),
                std::fs::read(&p).ok()?,
            ))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

/// Values a mutated size or `-D` takes: edges of every check downstream.
const INTERESTING_NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    15,
    16,
    17,
    63,
    64,
    65,
    100,
    128,
    256,
    1000,
    1024,
    4096,
    65536,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    (1 << 32) + 64,
    1 << 40,
    (1 << 40) + 1,
    1 << 62,
    1 << 63,
    u64::MAX,
];

/// Tokens spliced into programs: keywords, operators, functions, odd characters.
const TOKENS: &[&str] = &[
    "kernel", "size", "rank", "split", "input", "output", "param", "init", "where", "and", "inf",
    "->", "=", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "(", ")", "[", "]", ",", ":",
    ";", "#", "\n", "\r", "\r\n", "\t", "max", "min", "exp", "log", "tanh", "sqrt", "sum", "f32",
    "bf16", "f16", "0", "1", "-1", "0.5", "1e30", "1e309", "m1", "m0", "p", "m", "n", "N", "M",
    "D", "I", "TILE", "x", "_", "\u{0}", "\u{feff}", "é",
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn interesting_number(rng: &mut ChaCha8Rng) -> u64 {
    *pick(rng, INTERESTING_NUMBERS)
}

/// Splits text into tokens: identifier/number runs, whitespace runs, single others.
fn tokenize(text: &[u8]) -> Vec<Vec<u8>> {
    let class = |b: u8| {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
            0
        } else if b == b' ' || b == b'\t' {
            1
        } else {
            2
        }
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    for &b in text {
        match out.last_mut() {
            Some(last) if class(b) != 2 && class(last[0]) == class(b) => last.push(b),
            _ => out.push(vec![b]),
        }
    }
    out
}

fn lines(text: &[u8]) -> Vec<Vec<u8>> {
    text.split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// One mutation of `text` (`others`: every example, for splicing).
fn mutate(rng: &mut ChaCha8Rng, text: &mut Vec<u8>, others: &[(String, Vec<u8>)]) {
    match rng.random_range(0..10) {
        // A byte replaced, inserted or removed.
        0 => {
            if !text.is_empty() {
                let i = rng.random_range(0..text.len());
                text[i] = match rng.random_range(0..4) {
                    0 => rng.random(),
                    _ => *pick(rng, b"()[],:=#\n\r\t +-*/<>!0123456789azAZ_;."),
                };
            }
        }
        1 => {
            let i = rng.random_range(0..=text.len());
            let b = *pick(rng, b"()[],:=#\n\r +-*/<>0123456789mpn;\xff\x00");
            text.insert(i, b);
        }
        2 => {
            if !text.is_empty() {
                let i = rng.random_range(0..text.len());
                let n = rng.random_range(1..=8).min(text.len() - i);
                text.drain(i..i + n);
            }
        }
        // A token replaced by another (from this program or the dictionary), dropped,
        // or repeated.
        3 | 4 => {
            let mut tokens = tokenize(text);
            if tokens.is_empty() {
                return;
            }
            let i = rng.random_range(0..tokens.len());
            match rng.random_range(0..4) {
                0 => tokens[i] = pick(rng, TOKENS).as_bytes().to_vec(),
                1 => {
                    let j = rng.random_range(0..tokens.len());
                    tokens[i] = tokens[j].clone();
                }
                2 => {
                    tokens.remove(i);
                }
                _ => {
                    let t = tokens[i].clone();
                    tokens.insert(i, t);
                }
            }
            *text = tokens.concat();
        }
        // A number replaced by an interesting one.
        5 => {
            let mut tokens = tokenize(text);
            let numbers: Vec<usize> = (0..tokens.len())
                .filter(|&i| tokens[i].iter().all(u8::is_ascii_digit))
                .collect();
            if !numbers.is_empty() {
                let i = *pick(rng, &numbers);
                tokens[i] = interesting_number(rng).to_string().into_bytes();
                *text = tokens.concat();
            }
        }
        // Lines dropped, repeated, swapped, or spliced in from another example.
        6 => {
            let mut l = lines(text);
            if !l.is_empty() {
                let i = rng.random_range(0..l.len());
                l.remove(i);
                *text = l.concat();
            }
        }
        7 => {
            let mut l = lines(text);
            if !l.is_empty() {
                let i = rng.random_range(0..l.len());
                let copies = if rng.random_range(0..8) == 0 { 50 } else { 1 };
                for _ in 0..copies {
                    let line = l[i].clone();
                    l.insert(i, line);
                }
                *text = l.concat();
            }
        }
        8 => {
            let mut l = lines(text);
            if l.len() >= 2 {
                let i = rng.random_range(0..l.len());
                let j = rng.random_range(0..l.len());
                l.swap(i, j);
                *text = l.concat();
            }
        }
        _ => {
            let (_, other) = pick(rng, others);
            let theirs = lines(other);
            let mut l = lines(text);
            if !theirs.is_empty() {
                let line = pick(rng, &theirs).clone();
                let i = rng.random_range(0..=l.len());
                l.insert(i, line);
                *text = l.concat();
            }
        }
    }
}

/// A `-D` for a symbol the examples use: small for `run`/`compile`, sometimes extreme.
fn size_flags(rng: &mut ChaCha8Rng, small: bool) -> Vec<String> {
    let mut flags = Vec::new();
    let symbols = ["N", "M", "D", "B", "H", "TILE", "BLOCK", "W", "V", "S", "K"];
    if small {
        for (name, values) in [
            ("N", &[64u64, 128, 256][..]),
            ("M", &[64, 128, 256][..]),
            ("D", &[16, 32, 64][..]),
            ("B", &[1, 2][..]),
            ("H", &[1, 2][..]),
        ] {
            if rng.random_range(0..3) != 0 {
                flags.push("-D".to_string());
                flags.push(format!("{name}={}", pick(rng, values)));
            }
        }
    }
    if rng.random_range(0..4) == 0 {
        flags.push("-D".to_string());
        flags.push(format!(
            "{}={}",
            pick(rng, &symbols),
            interesting_number(rng)
        ));
    }
    flags
}

struct Case {
    example: String,
    program: Vec<u8>,
    /// Arguments; `{file}` is the program's path, `{out}` a scratch folder.
    args: Vec<String>,
}

impl Case {
    fn command(&self) -> String {
        let mut words: Vec<&str> = self
            .args
            .iter()
            .map(String::as_str)
            .take_while(|a| !a.starts_with('{'))
            .collect();
        words.truncate(2);
        words.join(" ")
    }
}

fn generate(seed: u64, index: usize, examples: &[(String, Vec<u8>)]) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    let (name, base) = pick(&mut rng, examples);
    let mut program = base.clone();
    // One case in eight runs an example as written, with random sizes and commands; most
    // of the rest change it once or twice, so that many still compile and reach the
    // analysis, the rewrites, the kernels and the interpreter.
    let mutations = match rng.random_range(0..8) {
        0 => 0,
        1..=3 => 1,
        4 | 5 => 2,
        _ => rng.random_range(3..=6),
    };
    for _ in 0..mutations {
        mutate(&mut rng, &mut program, examples);
    }
    let s = |x: &str| x.to_string();
    let mut args: Vec<String> = match rng.random_range(0..22) {
        0..=3 => vec![s("analyze"), s("{file}")],
        4 => vec![s("analyze"), s("{file}"), s("--format"), s("json")],
        5 | 6 => {
            let p = *pick(&mut rng, &[1u64, 2, 3, 4, 8, 16, 1024, 1025, 1 << 32]);
            vec![s("analyze"), s("{file}"), s("--sp"), p.to_string()]
        }
        7..=9 => vec![s("optimize"), s("{file}")],
        10..=12 => vec![s("compile"), s("{file}"), s("--emit"), s("ptx")],
        13 | 14 => vec![s("compile"), s("{file}"), s("--emit"), s("tile")],
        15 => {
            let stage = *pick(&mut rng, &["ir", "ast", "schedule", "report"]);
            vec![s("compile"), s("{file}"), s("--emit"), s(stage)]
        }
        20 | 21 => vec![s("grad"), s("{file}")],
        _ => vec![
            s("run"),
            s("{file}"),
            s("--out"),
            s("{out}"),
            s("--max-elements"),
            s(RUN_MAX_ELEMENTS),
            s("--max-work"),
            s(RUN_MAX_WORK),
            s("--seed"),
            rng.random_range(0..1000u32).to_string(),
        ],
    };
    let small = matches!(args[0].as_str(), "run" | "compile") || rng.random_range(0..2) == 0;
    args.extend(size_flags(&mut rng, small));
    Case {
        example: name.clone(),
        program,
        args,
    }
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Exit(i32),
    Signal(i32),
    TimedOut,
}

impl Outcome {
    fn acceptable(&self) -> bool {
        matches!(self, Outcome::Exit(0..=3))
    }
}

fn run_case(case: &Case, work: &Path) -> (Outcome, String, Duration) {
    let file = work.join("case.ein");
    let out = work.join("out");
    let stderr_path = work.join("stderr.txt");
    std::fs::write(&file, &case.program).expect("write the case");
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            a.replace("{file}", &file.display().to_string())
                .replace("{out}", &out.display().to_string())
        })
        .collect();
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_einattn"));
    command
        .args(&args)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: only async-signal-safe work between fork and exec: one setrlimit call.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: CASE_MEMORY_BYTES,
                rlim_max: CASE_MEMORY_BYTES,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = command.spawn().expect("the binary starts");
    let outcome = loop {
        match child.try_wait().expect("wait") {
            Some(status) => {
                break match (status.code(), status.signal()) {
                    (Some(c), _) => Outcome::Exit(c),
                    (None, Some(sig)) => Outcome::Signal(sig),
                    (None, None) => Outcome::Signal(-1),
                }
            }
            None if start.elapsed() > CASE_TIME => {
                let _ = child.kill();
                let _ = child.wait();
                break Outcome::TimedOut;
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let elapsed = start.elapsed();
    let text = std::fs::read(&stderr_path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).into_owned();
    (outcome, text, elapsed)
}

/// Where failing cases are written to reproduce them.
fn failure_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures")
}

#[test]
fn mutated_examples_never_panic_hang_or_exhaust_memory() {
    let cases: usize = env_or("EINATTN_FUZZ_CASES", DEFAULT_CASES);
    let seed: u64 = env_or("EINATTN_FUZZ_SEED", DEFAULT_SEED);
    let examples = examples();
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let tally: Mutex<BTreeMap<(String, Outcome), usize>> = Mutex::new(BTreeMap::new());
    let slowest: Mutex<(Duration, String)> = Mutex::new((Duration::ZERO, String::new()));
    let root = std::env::temp_dir().join(format!("einattn-fuzz-{}", std::process::id()));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for w in 0..workers {
            let (next, failures, tally, slowest, examples) =
                (&next, &failures, &tally, &slowest, &examples);
            let work = root.join(format!("worker{w}"));
            scope.spawn(move || {
                std::fs::create_dir_all(&work).expect("worker folder");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cases {
                        break;
                    }
                    let case = generate(seed, i, examples);
                    let (outcome, stderr, elapsed) = run_case(&case, &work);
                    let panicked = stderr.contains("panicked at");
                    if let Ok(mut t) = tally.lock() {
                        *t.entry((case.command(), outcome.clone())).or_default() += 1;
                    }
                    if let Ok(mut s) = slowest.lock() {
                        if elapsed > s.0 {
                            *s = (elapsed, format!("case {i}: {}", case.args.join(" ")));
                        }
                    }
                    if !outcome.acceptable() || panicked {
                        let dir = failure_dir();
                        let _ = std::fs::create_dir_all(&dir);
                        let stem = dir.join(format!("case{i}"));
                        let _ = std::fs::write(stem.with_extension("ein"), &case.program);
                        let _ = std::fs::write(
                            stem.with_extension("cmd"),
                            case.args.join(" ") + "\n",
                        );
                        let excerpt: String = stderr.chars().take(600).collect();
                        if let Ok(mut f) = failures.lock() {
                            f.push(format!(
                                "case {i} (from {}): {outcome:?} after {elapsed:?}: einattn {}\n  written to {}.ein\n  {excerpt}",
                                case.example,
                                case.args.join(" "),
                                stem.display()
                            ));
                        }
                    }
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&root);
    let tally = tally.into_inner().unwrap_or_default();
    let mut summary = String::new();
    for ((command, outcome), n) in &tally {
        summary.push_str(&format!("  {command:<16} {outcome:?}: {n}\n"));
    }
    let (slow, slow_case) = slowest.into_inner().unwrap_or_default();
    eprintln!(
        "fuzz: {cases} cases (seed {seed:#x}) on {workers} workers in {:?}; slowest {slow:?} ({slow_case})\n{summary}",
        start.elapsed()
    );
    let total: usize = tally.values().sum();
    assert_eq!(total, cases, "every case ran");
    let failures = failures.into_inner().unwrap_or_default();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
