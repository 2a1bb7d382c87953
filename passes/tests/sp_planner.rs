//! The SP planner on the examples: what it classifies across the split, which schemes
//! apply, what the cost model says and what it picks.

use einattn_ir::Cascade;
use einattn_passes::sp::{self, Classification, SpOptions, StateRole};
use std::path::PathBuf;

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

fn classification(c: &Cascade) -> Classification {
    sp::classify(
        c,
        sp::SequenceRanks::detect(c).expect("a sequence rank is found"),
    )
}

fn role_of<'a>(c: &Cascade, cls: &'a Classification, tensor: &str) -> &'a StateRole {
    let h = c.tensor_by_name(tensor).expect("tensor exists");
    &cls.state(h)
        .unwrap_or_else(|| panic!("{tensor} is not a carried state"))
        .role
}

const LIGHTNING_BIG: [(&str, u64); 4] = [("N", 262144), ("B", 4), ("H", 16), ("D", 128)];
const CAUSAL_BIG: [(&str, u64); 4] = [("N", 65536), ("B", 1), ("H", 16), ("D", 128)];

#[test]
fn lightning_has_one_linear_fixed_size_state_along_the_block_rank() {
    let c = compile("lightning.ein", &[]);
    let cls = classification(&c);
    assert!(cls.seq.single_rank());
    assert_eq!(c.ranks[cls.seq.query.declared].name, "n");
    assert_eq!(c.ranks[cls.seq.query.outer].name, "t");
    assert_eq!(cls.states.len(), 1);
    let kv = &cls.states[0];
    assert_eq!(c.tensors[kv.state].name, "KV");
    assert!(!kv.per_query, "the KV state is d x e per (batch, head)");
    assert!(matches!(
        role_of(&c, &cls, "KV"),
        StateRole::Linear { unit: false, .. }
    ));
    assert!(cls.linear_fixed_size());
    assert!(
        cls.cross_chunk_reads.is_empty(),
        "{:?}",
        cls.cross_chunk_reads
    );
    assert_eq!(
        c.ranks[cls.head_ranks[0]].name, "h",
        "the rank the decay varies over"
    );
}

#[test]
fn causal_attention_carries_a_running_max_and_two_rescaled_sums() {
    let c = compile("attention_causal.ein", &[]);
    let cls = classification(&c);
    assert!(!cls.seq.single_rank());
    assert_eq!(c.ranks[cls.seq.query.declared].name, "p");
    assert_eq!(c.ranks[cls.seq.key.declared].name, "m");
    assert!(matches!(
        role_of(&c, &cls, "RM"),
        StateRole::Extremum { .. }
    ));
    let rm = c.tensor_by_name("RM").expect("RM");
    for s in ["RD", "RNV"] {
        assert_eq!(
            role_of(&c, &cls, s),
            &StateRole::RescaledSum { max_state: rm },
            "{s}"
        );
    }
    assert!(cls.keys_any_order());
    let epilogue: Vec<&str> = cls
        .epilogue
        .iter()
        .map(|&e| c.tensors[c.einsums[e].output.tensor].name.as_str())
        .collect();
    assert_eq!(epilogue, ["O"]);
}

#[test]
fn multi_pass_attention_only_brings_keys_to_queries() {
    let c = compile("attention_3pass.ein", &[]);
    let d = sp::plan_sequence_parallel(&c, &SpOptions::new(2)).expect("plans");
    let applicable: Vec<&str> = d
        .report
        .estimates
        .iter()
        .filter(|e| e.not_applicable.is_none())
        .map(|e| e.scheme.as_str())
        .collect();
    assert!(applicable.contains(&"allgather_kv"), "{applicable:?}");
    assert!(
        !applicable.contains(&"ring"),
        "a global max cannot merge across a ring"
    );
    assert!(!applicable.contains(&"lasp2"));
}

#[test]
fn lightning_picks_lasp2_and_its_gather_is_independent_of_n() {
    for p in [2u64, 4, 8] {
        let c = compile("lightning.ein", &LIGHTNING_BIG);
        let d = sp::plan_sequence_parallel(&c, &SpOptions::new(p)).expect("plans");
        assert_eq!(
            d.report.chosen,
            "lasp2",
            "P={p}:\n{}",
            d.report.render_text()
        );
        let est = |name: &str| {
            d.report
                .estimates
                .iter()
                .find(|e| e.scheme == name)
                .expect(name)
        };
        // Each device receives the other devices' 4 MiB states (B=4, H=16, 128x128 f32).
        assert_eq!(est("lasp2").bytes_per_device, (p - 1) * 4 * 1024 * 1024);
        assert_eq!(est("lasp2").collectives, 1);
        assert_eq!(est("lasp1").steps, p - 1);
        assert!(est("lasp1").total_s > est("lasp2").total_s);
        assert!(est("ring").not_applicable.is_some());
        let ratio = est("lasp2").total_s / est("ulysses").total_s;
        assert!(ratio < 1.0, "P={p}: LASP-2 beats moving all of Q, K, V");
    }
}

#[test]
fn causal_attention_prefers_a_balanced_layout() {
    let c = compile("attention_causal.ein", &CAUSAL_BIG);
    let d = sp::plan_sequence_parallel(&c, &SpOptions::new(2)).expect("plans");
    let text = d.report.render_text();
    let est = |name: &str| {
        d.report
            .estimates
            .iter()
            .find(|e| e.scheme == name)
            .expect(name)
    };
    assert!(est("lasp2").not_applicable.is_some());
    for (plain, zig) in [
        ("ring", "ring_zigzag"),
        ("allgather_kv", "allgather_kv_zigzag"),
    ] {
        assert!(
            est(zig).total_s < est(plain).total_s,
            "{zig} vs {plain}:\n{text}"
        );
    }
    // K and V of the other half: 32768 tokens x 16 heads x 128 x 2 tensors x 2 bytes.
    assert_eq!(
        est("allgather_kv").bytes_per_device,
        32768 * 16 * 128 * 2 * 2
    );
    assert!(
        d.report.chosen.ends_with("zigzag") || d.report.chosen == "ulysses",
        "{text}"
    );
    assert!(text.contains("chosen:"));
    let json: serde_json::Value = serde_json::from_str(&d.report.to_json()).expect("valid JSON");
    assert_eq!(json["devices"], 2);
}

#[test]
fn ulysses_needs_heads_divisible_by_devices() {
    let c = compile("attention_causal.ein", &[("N", 1536), ("H", 2)]);
    let d = sp::plan_sequence_parallel(&c, &SpOptions::new(3)).expect("plans");
    let u = d
        .report
        .estimates
        .iter()
        .find(|e| e.scheme == "ulysses")
        .expect("listed");
    assert!(
        u.not_applicable
            .as_deref()
            .is_some_and(|w| w.contains("not divisible")),
        "{u:?}"
    );
}

#[test]
fn a_forced_scheme_that_does_not_apply_is_an_error() {
    let c = compile("lightning.ein", &[]);
    let mut options = SpOptions::new(2);
    options.scheme = Some("ring".to_string());
    let e = sp::plan_sequence_parallel(&c, &options).expect_err("ring needs key and query ranks");
    assert!(e.to_string().contains("does not apply"), "{e}");
    options.scheme = Some("no_such".to_string());
    assert!(sp::plan_sequence_parallel(&c, &options).is_err());
}

#[test]
fn sequences_that_do_not_split_into_tiles_are_rejected_per_scheme() {
    // 1024 tokens in blocks of 64 = 16 blocks: 3 devices cannot share them.
    let c = compile("lightning.ein", &[]);
    let r = sp::plan_sequence_parallel(&c, &SpOptions::new(3));
    let err = r.expect_err("no scheme applies");
    assert!(err.to_string().contains("whole tiles"), "{err}");
}

#[test]
fn cost_parameters_can_be_overridden_from_json() {
    let p = sp::CostParams::from_json(r#"{"p2p": {"bandwidth": 1e9}, "launch_s": 0.0}"#)
        .expect("valid overrides");
    assert_eq!(p.p2p.bandwidth, 1e9);
    assert_eq!(
        p.p2p.latency_s,
        sp::CostParams::default().p2p.latency_s,
        "unnamed fields keep defaults"
    );
    assert_eq!(p.launch_s, 0.0);
    assert!(sp::CostParams::from_json(r#"{"warp_speed": 9}"#).is_err());
    // A slower link makes LASP-1's chain of hops cost more.
    let c = compile("lightning.ein", &LIGHTNING_BIG);
    let mut options = SpOptions::new(4);
    let fast = sp::plan_sequence_parallel(&c, &options).expect("plans");
    options.cost = p;
    let slow = sp::plan_sequence_parallel(&c, &options).expect("plans");
    let lasp1 = |d: &sp::SpDecision| {
        d.report
            .estimates
            .iter()
            .find(|e| e.scheme == "lasp1")
            .map(|e| e.comm_s)
    };
    assert!(lasp1(&slow) > lasp1(&fast));
}

#[test]
fn value_masks_and_step_bodies_are_not_split_across_devices() {
    // Per-device windows rename indices and affine masks only: a document mask or the
    // delta rule's step body would be planned wrong, so they are refused with a reason.
    for (name, why) in [
        ("document_mask.ein", "data-dependent mask"),
        ("delta_rule.ein", "step body"),
    ] {
        let c = compile(name, &[]);
        let e = sp::plan_sequence_parallel(&c, &SpOptions::new(2)).expect_err(name);
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
}
