//! Analysis and SP planning time that does not grow with the sequence length or with `P^2`
//! analyses: masked cascades at N = 2^31 (which took 9.5 s to analyze and 247 s to plan
//! over 8 devices when masked points were enumerated), 1024 devices (which took 4 GB), and
//! the pair classes the planner shares analyses by, checked against analyzing every pair.

use einattn_ir::Cascade;
use einattn_passes::analysis::{self, AnalysisOptions};
use einattn_passes::sp::local::{self, LocalSpec};
use einattn_passes::sp::schemes::{self, PairAnalyzer};
use einattn_passes::sp::{self, SpError, SpOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn compile(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let defines: Vec<(String, u64)> = defines.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    einattn_dsl::compile_source(name, &source, &defines)
        .unwrap_or_else(|e| panic!("{name} does not compile: {e:?}"))
}

/// Generous: the closed forms take milliseconds; enumeration took seconds to minutes.
const LIMIT: Duration = Duration::from_secs(5);

#[test]
fn masked_analysis_at_two_to_the_31_tokens_is_exact_and_fast() {
    let n: u64 = 1 << 31;
    for name in [
        "attention_causal.ein",
        "attention_sliding_window.ein",
        "attention_softcap.ein",
        "lightning.ein",
    ] {
        let c = compile(name, &[("N", n)]);
        let start = Instant::now();
        let report = analysis::analyze(&c, &AnalysisOptions::default());
        assert!(start.elapsed() < LIMIT, "{name}: {:?}", start.elapsed());
        // No mask fell back to the whole box.
        assert!(
            report.warnings.iter().all(|w| !w.contains("too complex")),
            "{name}: {:?}",
            report.warnings
        );
    }
    // The causal score: B * H * D of (N (N + 1) / 2) points, past 2^64 and said so.
    let c = compile("attention_causal.ein", &[("N", n)]);
    let report = analysis::analyze(&c, &AnalysisOptions::default());
    let s = report.einsums.iter().find(|e| e.einsum == "S").expect("S");
    assert_eq!(s.points, u64::MAX);
    let exact = u128::from(n) * u128::from(n + 1) / 2 * 2 * 64;
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.starts_with("`S` iterates") && w.contains("2^64")),
        "{:?} (S has {exact} points)",
        report.warnings
    );
}

#[test]
fn masked_sp_planning_at_two_to_the_31_tokens_is_fast() {
    let c = compile("attention_causal.ein", &[("N", 1 << 31)]);
    for devices in [2, 8] {
        let start = Instant::now();
        let decision = sp::plan_sequence_parallel(&c, &SpOptions::new(devices))
            .unwrap_or_else(|e| panic!("--sp {devices}: {e}"));
        assert!(
            start.elapsed() < LIMIT,
            "--sp {devices}: {:?}",
            start.elapsed()
        );
        assert!(decision
            .report
            .estimates
            .iter()
            .any(|e| e.not_applicable.is_none()));
        // Each device's share of the scores passes 2^64 FLOPs: the table says its times
        // rest on saturated counts.
        assert!(
            decision
                .report
                .warnings
                .iter()
                .any(|w| w.contains("FLOPs exceed 2^64 - 1")),
            "--sp {devices}: {:?}",
            decision.report.warnings
        );
        assert!(decision
            .report
            .render_text()
            .contains("warnings (per-device analyses)"));
    }
}

#[test]
fn optimizing_softcap_at_two_to_the_31_tokens_is_fast_and_says_its_costs_saturate() {
    let c = compile("attention_softcap.ein", &[("N", 1 << 31)]);
    let start = Instant::now();
    let out = einattn_passes::rewrite::optimize(&c, &Default::default()).expect("optimizes");
    assert!(start.elapsed() < LIMIT, "{:?}", start.elapsed());
    let log = out.render_log();
    let after = log
        .lines()
        .find(|l| l.starts_with("after: "))
        .unwrap_or_default();
    assert!(after.contains(" 1 pass(es) over memory"), "{log}");
    assert!(
        log.contains("warning: total FLOPs exceed 2^64 - 1"),
        "{log}"
    );
}

#[test]
fn planning_over_1024_devices_is_bounded_and_more_are_refused() {
    let c = compile("linear_attention.ein", &[]);
    let start = Instant::now();
    let decision = sp::plan_sequence_parallel(&c, &SpOptions::new(1024)).expect("plans");
    assert!(start.elapsed() < LIMIT, "{:?}", start.elapsed());
    assert_eq!(decision.report.chosen, "allgather_kv");
    match sp::plan_sequence_parallel(&c, &SpOptions::new(1025)) {
        Err(SpError::Devices(m)) => assert!(m.contains("at most 1024"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|d| d.chosen)),
    }
}

/// Every pair's shared analysis and mask equal the ones of its own per-device cascade,
/// for masks that see the distance between chunks (causal, sliding window, ALiBi-like
/// rank values), masks over one rank (Lightning) and no mask at all.
#[test]
fn pair_classes_give_each_pairs_own_analysis() {
    let cases: [(&str, &[(&str, u64)]); 6] = [
        ("attention_causal.ein", &[("N", 1024)]),
        ("attention_sliding_window.ein", &[("N", 2048)]),
        ("attention_softcap.ein", &[("N", 1024)]),
        ("linear_attention.ein", &[("N", 256)]),
        ("lightning.ein", &[("N", 1024)]),
        ("flash_decoding.ein", &[]),
    ];
    let options = AnalysisOptions::default();
    for (name, defines) in cases {
        let c = compile(name, defines);
        let Ok(seq) = sp::SequenceRanks::detect(&c) else {
            continue;
        };
        let cls = sp::classify(&c, seq);
        let mut shared = PairAnalyzer::new(&c, &cls, options.clone());
        let devices = 4;
        for zigzag in [false, true] {
            let chunks: Vec<_> = (0..devices)
                .flat_map(|r| schemes::device_chunks(seq.tokens, devices, zigzag, r))
                .collect();
            for &q in &chunks {
                for &k in &chunks {
                    let windows = schemes::pair_windows(&cls, q, k);
                    let own = local::localize(
                        &c,
                        &LocalSpec {
                            windows: windows.clone(),
                            ..LocalSpec::default()
                        },
                    )
                    .map(|l| analysis::analyze(&l.cascade, &options));
                    let got = shared.report(&windows).cloned();
                    match (own, got) {
                        (Ok(own), Ok(got)) => {
                            assert_eq!(own, got, "{name} zigzag={zigzag} q={q:?} k={k:?}")
                        }
                        (Err(a), Err(b)) => assert_eq!(a, b),
                        (a, b) => panic!("{name} q={q:?} k={k:?}: {a:?} vs {b:?}"),
                    }
                    let fresh = PairAnalyzer::new(&c, &cls, options.clone()).pair_mask(q, k);
                    assert_eq!(
                        shared.pair_mask(q, k),
                        fresh,
                        "{name} zigzag={zigzag} q={q:?} k={k:?}"
                    );
                }
            }
        }
    }
}
