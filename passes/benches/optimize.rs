//! The optimizer on every example (and the test inputs of passes/tests/in/) at default
//! sizes: it must terminate in under 200 ms each (issue 7).
//!
//! `cargo bench -p einattn-passes --bench optimize` runs criterion, then times each case
//! on its own (median, p95 and max of single runs) and writes the figures, with the
//! command, machine and date, to `bench/results/optimize_<date>.json`. Under `cargo test`
//! (no `--bench` argument) every case runs once and nothing is written.

use criterion::Criterion;
use einattn_ir::Cascade;
use einattn_passes::rewrite::{optimize, OptimizeOptions};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The budget for one optimization.
const BUDGET_MS: f64 = 200.0;
const RUNS: usize = 30;

struct Case {
    name: String,
    cascade: Cascade,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ein_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ein"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
}

fn cases() -> Vec<Case> {
    let root = repo_root();
    let mut paths = ein_files(&root.join("examples"));
    paths.extend(ein_files(&root.join("passes/tests/in")));
    paths
        .into_iter()
        .filter_map(|path| {
            let source = std::fs::read_to_string(&path).ok()?;
            let name = path.file_stem()?.to_string_lossy().into_owned();
            match einattn_dsl::compile_source(&format!("{name}.ein"), &source, &[]) {
                Ok(cascade) => Some(Case { name, cascade }),
                Err(e) => panic!("{name}.ein does not compile: {e:?}"),
            }
        })
        .collect()
}

fn run(case: &Case, options: &OptimizeOptions) -> usize {
    match optimize(&case.cascade, options) {
        Ok(out) => out.applied.len(),
        Err(e) => panic!("{}: {e}", case.name),
    }
}

fn run_criterion(cases: &[Case], options: &OptimizeOptions) {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10)
        .configure_from_args();
    for case in cases {
        c.bench_function(&format!("{}/optimize", case.name), |b| {
            b.iter(|| run(black_box(case), options))
        });
    }
    c.final_summary();
}

struct Timing {
    median_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

fn time_runs(runs: usize, mut f: impl FnMut()) -> Timing {
    for _ in 0..3 {
        f();
    }
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Timing {
        median_ms: at(0.5),
        p95_ms: at(0.95),
        max_ms: at(1.0),
    }
}

/// `YYYY-MM-DD` (UTC) from the system clock, without a date crate.
fn utc_date() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores, {}", std::env::consts::OS)
}

fn write_results(cases: &[Case], options: &OptimizeOptions, path: &Path) -> std::io::Result<()> {
    let mut rows = Vec::new();
    for case in cases {
        let timing = time_runs(RUNS, || {
            black_box(run(case, options));
        });
        let out = optimize(&case.cascade, options).map_err(std::io::Error::other)?;
        let rules: Vec<&str> = out.applied.iter().map(|a| a.rule.as_str()).collect();
        println!(
            "{:<28} median {:>7.2} ms (p95 {:>7.2}, max {:>7.2})  {}",
            case.name,
            timing.median_ms,
            timing.p95_ms,
            timing.max_ms,
            rules.join(", ")
        );
        rows.push(serde_json::json!({
            "example": case.name,
            "optimize_ms": {
                "median": timing.median_ms, "p95": timing.p95_ms, "max": timing.max_ms
            },
            "applied": rules,
            "passes_before": out.before.passes,
            "passes_after": out.after.passes,
            "flops_before": out.before.flops,
            "flops_after": out.after.flops,
            "within_budget": timing.max_ms < BUDGET_MS,
        }));
    }
    let doc = serde_json::json!({
        "benchmark": "optimize",
        "command": "cargo bench -p einattn-passes --bench optimize",
        "profile": "bench (release)",
        "machine": machine(),
        "date": utc_date(),
        "budget_ms": BUDGET_MS,
        "runs_per_case": RUNS,
        "options": "OptimizeOptions::default() (explanations on)",
        "note": "single-run wall times after 3 warm-up runs, default sizes; criterion's estimates are printed above them",
        "results": rows,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

fn main() {
    let options = OptimizeOptions::default();
    let cases = cases();
    assert!(!cases.is_empty(), "no examples found");
    let benchmarking = std::env::args().any(|a| a == "--bench");
    if !benchmarking {
        for case in &cases {
            run(case, &options);
        }
        println!("{} optimize cases ran once", cases.len());
        return;
    }
    run_criterion(&cases, &options);
    let path = repo_root()
        .join("bench/results")
        .join(format!("optimize_{}.json", utc_date()));
    match write_results(&cases, &options, &path) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
