//! The optimizer on every example (and the test inputs of passes/tests/in/) at default
//! sizes: it must terminate in under 200 ms each (issue 7).
//!
//! `cargo bench -p einattn-passes --bench optimize` runs criterion, then times each case
//! on its own (median, p95 and max of single runs) and writes the figures, with the
//! command, machine and date, to `bench/results/optimize_<date>/optimize.json`. Under `cargo test`
//! (no `--bench` argument) every case runs once and nothing is written.

use criterion::Criterion;
use einattn_ir::Cascade;
use einattn_passes::rewrite::{optimize, OptimizeOptions};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{machine, time_runs, utc_date};

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

fn write_results(cases: &[Case], options: &OptimizeOptions, path: &Path) -> std::io::Result<()> {
    let mut rows = Vec::new();
    for case in cases {
        let timing = time_runs(RUNS, 1e3, || {
            black_box(run(case, options));
        });
        let out = optimize(&case.cascade, options).map_err(std::io::Error::other)?;
        let rules: Vec<&str> = out.applied.iter().map(|a| a.rule.as_str()).collect();
        println!(
            "{:<28} median {:>7.2} ms (p95 {:>7.2}, max {:>7.2})  {}",
            case.name,
            timing.median,
            timing.p95,
            timing.max,
            rules.join(", ")
        );
        rows.push(serde_json::json!({
            "example": case.name,
            "optimize_ms": {
                "median": timing.median, "p95": timing.p95, "max": timing.max
            },
            "applied": rules,
            "passes_before": out.before.passes,
            "passes_after": out.after.passes,
            "flops_before": out.before.flops,
            "flops_after": out.after.flops,
            "within_budget": timing.max < BUDGET_MS,
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
    let dir = repo_root()
        .join("bench/results")
        .join(format!("optimize_{}", utc_date()));
    let path = dir.join("optimize.json");
    match write_results(&cases, &options, &path) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
