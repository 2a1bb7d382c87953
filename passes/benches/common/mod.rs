//! Timing and provenance shared by the benchmarks that record figures in bench/results/.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock statistics of repeated runs, in the unit `time_runs` was asked for.
pub struct Timing {
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

/// Runs `f` a few times to warm up, then `runs` times; `unit_per_second` picks the unit
/// (1e6 for microseconds, 1e3 for milliseconds).
pub fn time_runs(runs: usize, unit_per_second: f64, mut f: impl FnMut()) -> Timing {
    for _ in 0..3 {
        f();
    }
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * unit_per_second
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Timing {
        median: at(0.5),
        p95: at(0.95),
        max: at(1.0),
    }
}

/// `YYYY-MM-DD` (UTC) from the system clock, without a date crate.
pub fn utc_date() -> String {
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

pub fn machine() -> String {
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
