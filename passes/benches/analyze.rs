//! Parse + check + analyze every example, at its default sizes and with the sequence at
//! 65536 tokens (the analysis must never enumerate N^2 points: < 5 ms each).
//!
//! `cargo bench -p einattn-passes --bench analyze` runs criterion, then times each case on
//! its own (median, p95 and max of single runs) and writes the figures, with the command,
//! machine and date, to `bench/results/analyze_<date>/analyze.json`. Under `cargo test` (no
//! `--bench` argument) every case runs once and nothing is written.

use criterion::Criterion;
use einattn_passes::analysis::{analyze, AnalysisOptions};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{machine, time_runs, utc_date};

const LONG_SEQUENCE: u64 = 65536;
/// The budget the design sets for one parse + check + analyze.
const BUDGET_MS: f64 = 5.0;

struct Case {
    example: String,
    sizes: String,
    file_name: String,
    source: String,
    defines: Vec<(String, u64)>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every example twice: at its defaults, and with its sequence size symbol(s) at 65536.
fn cases() -> Vec<Case> {
    let dir = repo_root().join("examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ein"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let Ok(source) = std::fs::read_to_string(&path) else {
            continue;
        };
        let example = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_name = format!("{example}.ein");
        // The examples name their sequence size M or N.
        let long: Vec<(String, u64)> = ["M", "N"]
            .iter()
            .filter(|s| declares_size(&source, s))
            .map(|s| (s.to_string(), LONG_SEQUENCE))
            .collect();
        out.push(Case {
            example: example.clone(),
            sizes: "default".to_string(),
            file_name: file_name.clone(),
            source: source.clone(),
            defines: Vec::new(),
        });
        if !long.is_empty() {
            let label = long
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            out.push(Case {
                example,
                sizes: label,
                file_name,
                source,
                defines: long,
            });
        }
    }
    out
}

fn declares_size(source: &str, symbol: &str) -> bool {
    source.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("size") && words.next() == Some(symbol)
    })
}

fn parse_check_analyze(case: &Case, options: &AnalysisOptions) -> usize {
    match einattn_dsl::compile_source(&case.file_name, &case.source, &case.defines) {
        Ok(cascade) => analyze(&cascade, options).einsums.len(),
        Err(e) => panic!("{} does not compile: {e:?}", case.file_name),
    }
}

fn run_criterion(cases: &[Case], options: &AnalysisOptions) {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    for case in cases {
        c.bench_function(
            &format!("{}/{}/parse+check+analyze", case.example, case.sizes),
            |b| b.iter(|| parse_check_analyze(black_box(case), options)),
        );
    }
    c.final_summary();
}

fn write_results(cases: &[Case], options: &AnalysisOptions, path: &Path) -> std::io::Result<()> {
    let mut rows = Vec::new();
    for case in cases {
        let full = time_runs(200, 1e6, || {
            black_box(parse_check_analyze(case, options));
        });
        let cascade = einattn_dsl::compile_source(&case.file_name, &case.source, &case.defines)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let analysis = time_runs(200, 1e6, || {
            black_box(analyze(&cascade, options));
        });
        println!(
            "{:<28} {:<16} parse+check+analyze median {:>8.1} us (p95 {:>8.1}, max {:>8.1}); analyze alone {:>8.1} us",
            case.example, case.sizes, full.median, full.p95, full.max, analysis.median
        );
        rows.push(serde_json::json!({
            "example": case.example,
            "sizes": case.sizes,
            "parse_check_analyze_us": {
                "median": full.median, "p95": full.p95, "max": full.max
            },
            "analyze_us": {
                "median": analysis.median, "p95": analysis.p95, "max": analysis.max
            },
            "within_budget": full.max < BUDGET_MS * 1000.0,
        }));
    }
    let doc = serde_json::json!({
        "benchmark": "analyze",
        "command": "cargo bench -p einattn-passes --bench analyze",
        "profile": "bench (release)",
        "machine": machine(),
        "date": utc_date(),
        "budget_ms": BUDGET_MS,
        "runs_per_case": 200,
        "note": "single-run wall times after 5 warm-up runs; criterion's estimates are printed above them",
        "results": rows,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

fn main() {
    let options = AnalysisOptions::default();
    let cases = cases();
    assert!(!cases.is_empty(), "no examples found");
    let benchmarking = std::env::args().any(|a| a == "--bench");
    if !benchmarking {
        // `cargo test`: check that every case runs, quickly.
        for case in &cases {
            parse_check_analyze(case, &options);
        }
        println!("{} analyze cases ran once", cases.len());
        return;
    }
    run_criterion(&cases, &options);
    let dir = repo_root()
        .join("bench/results")
        .join(format!("analyze_{}", utc_date()));
    let path = dir.join("analyze.json");
    match write_results(&cases, &options, &path) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
