//! The optimizer end to end, on the examples: what issue 7 asks of it, and that every
//! example comes back equivalent, valid and printable as `.ein` text that parses back.

mod rewrite_support;

use einattn_ir::Cascade;
use einattn_passes::analysis::BufferKind;
use einattn_passes::rewrite::{optimize, OptimizeOptions, Optimized};
use proptest::prelude::*;
use rewrite_support::{assert_equivalent, compile, example};

/// Small sizes for interpreting; tiles and blocks small enough to split them.
fn small_options() -> OptimizeOptions {
    OptimizeOptions {
        tile: 4,
        block: 4,
        // At these sizes every query count is "small": keep the online form.
        split_k_below: 0,
        ..OptimizeOptions::default()
    }
}

fn run(c: &Cascade, options: &OptimizeOptions) -> Optimized {
    optimize(c, options).expect("optimizes")
}

fn rules(o: &Optimized) -> Vec<&str> {
    o.applied.iter().map(|a| a.rule.as_str()).collect()
}

#[test]
fn attention_3pass_becomes_one_pass_over_m() {
    let c = compile(&example("attention_3pass.ein"), &[]);
    assert_eq!(
        run(
            &c,
            &OptimizeOptions {
                explain: false,
                ..Default::default()
            }
        )
        .before
        .passes
        .get("m"),
        Some(&3)
    );
    let out = run(&c, &OptimizeOptions::default());
    assert_eq!(
        out.after.passes.get("m"),
        Some(&1),
        "{}",
        einattn_ir::print::print(&out.cascade)
    );
    assert_eq!(rules(&out), ["algebra", "online-normalizer"]);
    let log = out.render_log();
    assert!(
        log.contains("1. algebra") && log.contains("2. online-normalizer"),
        "{log}"
    );
    assert!(out.applied[0].rules.iter().any(|r| r == "division-delay"));

    let small = compile(&example("attention_3pass.ein"), &[("M", 16), ("D", 4)]);
    let out = run(&small, &small_options());
    assert_eq!(out.after.passes.get("m"), Some(&1));
    assert_equivalent(&small, &out.cascade, 1);
}

#[test]
fn lightning_naive_becomes_chunked_with_a_d_by_e_state() {
    let c = compile(&example("lightning_naive.ein"), &[]);
    let out = run(&c, &OptimizeOptions::default());
    assert_eq!(rules(&out), ["causal-chunk"]);
    let text = einattn_ir::print::print(&out.cascade);
    // One pass over the block rank (the outer rank of the query split, reported as `p`).
    let block = out
        .after
        .pass_detail
        .iter()
        .find(|r| r.rank == "t")
        .unwrap_or_else(|| panic!("no block rank in\n{text}"));
    assert_eq!(block.passes, 1, "{text}");
    let state = out
        .after
        .buffers
        .iter()
        .find(|b| b.kind == BufferKind::State)
        .unwrap_or_else(|| panic!("no state buffer in\n{text}"));
    let d = c.ranks[c.rank_by_name("d").expect("d")].extent;
    let e = c.ranks[c.rank_by_name("e").expect("e")].extent;
    assert_eq!(state.elements_per_point, d * e, "{state:?}");
    assert!(out.after.flops < out.before.flops);

    // Long enough that chunking pays off at blocks of 4.
    let small = compile(
        &example("lightning_naive.ein"),
        &[("N", 32), ("D", 2), ("H", 2)],
    );
    let out = run(&small, &small_options());
    assert_eq!(rules(&out), ["causal-chunk"]);
    assert_equivalent(&small, &out.cascade, 2);
}

#[test]
fn left_first_linear_attention_comes_back_right_first_and_linear_in_n() {
    let source = example("in/linear_left_first.ein");
    let flops = |n: u64| {
        let c = compile(&source, &[("N", n)]);
        let out = run(&c, &OptimizeOptions::default());
        // Right product first: no Einsum iterates both the query and the key rank.
        let (p, k) = (
            out.cascade.rank_by_name("p").expect("p"),
            out.cascade.rank_by_name("n").expect("n"),
        );
        for (h, _) in out.cascade.einsums.iter() {
            let ranks = out.cascade.iteration_ranks(h);
            assert!(
                !(ranks.contains(&p) && ranks.contains(&k)),
                "{}",
                einattn_ir::print::print(&out.cascade)
            );
        }
        (out.before.flops as f64, out.after.flops as f64)
    };
    let (before_1k, after_1k) = flops(1024);
    let (before_4k, after_4k) = flops(4096);
    // Quadratic before (x16 for 4x the length), linear after (x4).
    assert!(before_4k / before_1k > 15.0);
    assert!(
        (after_4k / after_1k - 4.0).abs() < 0.01,
        "{after_1k} -> {after_4k}"
    );

    let small = compile(&source, &[("N", 8), ("D", 3), ("H", 2)]);
    assert_equivalent(&small, &run(&small, &small_options()).cascade, 3);
}

#[test]
fn flash_decoding_splits_the_keys() {
    let c = compile(&example("flash_decoding.ein"), &[]);
    let out = run(&c, &OptimizeOptions::default());
    assert_eq!(rules(&out), ["algebra", "split-k"]);
    let small = compile(
        &example("flash_decoding.ein"),
        &[("N", 32), ("D", 3), ("H", 2)],
    );
    let options = OptimizeOptions {
        split_k_target: 16,
        ..OptimizeOptions::default()
    };
    let out = run(&small, &options);
    assert_eq!(rules(&out), ["algebra", "split-k"]);
    assert_equivalent(&small, &out.cascade, 4);
}

#[test]
fn lm_head_entropy_streams_the_vocabulary() {
    let c = compile(&example("lm_head_entropy.ein"), &[]);
    let out = run(&c, &OptimizeOptions::default());
    assert_eq!(out.before.passes.get("v"), Some(&3));
    assert_eq!(out.after.passes.get("v"), Some(&1));
    let small = compile(
        &example("lm_head_entropy.ein"),
        &[("T", 3), ("D", 2), ("VOCAB", 16)],
    );
    assert_equivalent(&small, &run(&small, &small_options()).cascade, 5);
}

const EXAMPLES: &[&str] = &[
    "attention_1pass.ein",
    "attention_2pass.ein",
    "attention_3pass.ein",
    "attention_alibi.ein",
    "attention_causal.ein",
    "attention_mha.ein",
    "attention_mla.ein",
    "attention_sliding_window.ein",
    "attention_softcap.ein",
    "cross_attention.ein",
    "delta_rule.ein",
    "delta_rule_chunked.ein",
    "differential_attention.ein",
    "document_mask.ein",
    "flash_decoding.ein",
    "gated_attention.ein",
    "gated_linear.ein",
    "gla.ein",
    "gqa.ein",
    "gqa_decoding.ein",
    "gqa_sink_decoding.ein",
    "lightning.ein",
    "lightning_naive.ein",
    "linear_attention.ein",
    "linear_causal.ein",
    "linear_feature_map.ein",
    "lm_head_entropy.ein",
    "qk_norm.ein",
    "relative_bias.ein",
    "rmsnorm_gemm.ein",
    "sigmoid_attention.ein",
    "sink_attention.ein",
    "softmax_plus_one.ein",
    "in/linear_left_first.ein",
];

#[test]
fn every_example_is_listed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .to_string();
        if name.ends_with(".ein") {
            assert!(EXAMPLES.contains(&name.as_str()), "add {name} to EXAMPLES");
        }
    }
}

#[test]
fn optimized_examples_print_as_text_that_parses_back() {
    for name in EXAMPLES {
        let c = compile(&example(name), &[]);
        let out = run(&c, &OptimizeOptions::default());
        let text = einattn_ir::print::print(&out.cascade);
        let back = einattn_dsl::compile_source("optimized.ein", &text, &[])
            .unwrap_or_else(|d| panic!("{name}:\n{}\n{text}", d.render("optimized.ein", &text)));
        assert_eq!(back.einsums.len(), out.cascade.einsums.len(), "{name}");
    }
}

#[test]
fn optimizing_twice_changes_nothing_more() {
    for name in EXAMPLES {
        let c = compile(&example(name), &[]);
        let once = run(&c, &OptimizeOptions::default());
        let twice = run(&once.cascade, &OptimizeOptions::default());
        assert!(twice.applied.is_empty(), "{name}: {:?}", twice.applied);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, .. ProptestConfig::default() })]

    #[test]
    fn optimized_examples_are_equivalent(
        which in 0..EXAMPLES.len(), n_tiles in 1u64..4, d in 1u64..4, seed in any::<u64>(),
    ) {
        let n = 4 * n_tiles;
        let sizes = [("M", n), ("N", n), ("D", d), ("H", 2), ("TILE", 4), ("BLOCK", 4),
                     ("W", 4), ("T", 2), ("VOCAB", n), ("DK", d), ("DV", d), ("GROUP", 2),
                     ("DOUT", 3), ("CHUNK", 2)];
        let c = compile(&example(EXAMPLES[which]), &sizes);
        let out = run(&c, &small_options());
        assert_equivalent(&c, &out.cascade, seed);
    }
}

/// `attention_3pass.ein` with a causal mask on the score.
fn causal_3pass() -> String {
    let source = example("attention_3pass.ein");
    let from = "QK[m, p] = scale * Q[p, e] * K[m, e]";
    assert!(source.contains(from));
    source.replace(from, &format!("{from} where m <= p"))
}

#[test]
fn causal_3pass_becomes_one_pass_over_m() {
    let c = compile(&causal_3pass(), &[]);
    let out = run(&c, &OptimizeOptions::default());
    let text = einattn_ir::print::print(&out.cascade);
    assert_eq!(out.before.passes.get("m"), Some(&3));
    assert_eq!(out.after.passes.get("m"), Some(&1), "{text}");
    assert_eq!(rules(&out), ["algebra", "online-normalizer"], "{text}");
    // The masked contraction is computed once: one Einsum contracts Q with K.
    let contractions = out
        .after
        .einsums
        .iter()
        .filter(|e| e.contracted.iter().any(|r| r == "e"))
        .count();
    assert_eq!(contractions, 1, "{text}");
    // Rows whose first tiles are all masked: the running max starts finite, and the
    // rescale is the plain exp(GM_run[m1] - GM_run[m1 + 1]) the kernel recognizer reads.
    assert!(text.contains("init GM_run[0, p] = -1e38"), "{text}");
    assert!(!text.contains(", -1e38)"), "{text}");

    let small = compile(&causal_3pass(), &[("M", 16), ("D", 4)]);
    let out = run(&small, &small_options());
    assert_eq!(out.after.passes.get("m"), Some(&1));
    assert_equivalent(&small, &out.cascade, 11);
}

#[test]
fn optimized_text_keeps_sizes_symbolic() {
    // Derived at the default size, run at another: equal to the original at that size.
    let source = example("attention_3pass.ein");
    let out = run(&compile(&source, &[]), &OptimizeOptions::default());
    let text = einattn_ir::print::print(&out.cascade);
    assert!(text.contains("[M1, "), "{text}");
    let sizes = [("M", 2048), ("D", 4)];
    let original = compile(&source, &sizes);
    let optimized = compile(&text, &sizes);
    assert_eq!(
        optimized.ranks[optimized.rank_by_name("m").expect("m")].extent,
        2048
    );
    let err = rewrite_support::max_relative_error(&original, &optimized, 5);
    assert!(err < 1e-10, "relative error {err}\n{text}");
}

#[test]
fn optimized_text_refuses_sizes_it_has_built_in() {
    // `/ D` lowers to a literal: the printed cascade pins D rather than half applying -D.
    let source = example("rmsnorm_gemm.ein");
    let out = run(&compile(&source, &[]), &OptimizeOptions::default());
    let text = einattn_ir::print::print(&out.cascade);
    assert!(text.contains("size D = 256 fixed"), "{text}");
    assert!(einattn_dsl::compile_source("o.ein", &text, &[]).is_ok());
    let refused = einattn_dsl::compile_source("o.ein", &text, &[("D".to_string(), 512)])
        .expect_err("a -D on a fixed size is refused");
    assert!(
        refused.render("o.ein", &text).contains("fixed at 256"),
        "{}",
        refused.render("o.ein", &text)
    );
    // T is not built in: it still rescales.
    let t = einattn_dsl::compile_source("o.ein", &text, &[("T".to_string(), 8)]).expect("T=8");
    assert_eq!(t.ranks[t.rank_by_name("t").expect("t")].extent, 8);
}

#[test]
fn a_prime_key_length_is_not_split_into_tiles_of_one() {
    let c = compile(&example("attention_3pass.ein"), &[("M", 1021)]);
    let out = run(&c, &OptimizeOptions::default());
    assert_eq!(rules(&out), ["algebra"]);
    assert_eq!(out.after.passes.get("m"), Some(&2));
    assert!(
        out.notes.iter().any(|n| n.contains("1021")),
        "{:?}",
        out.notes
    );
    assert!(out.render_log().contains("note: "), "{}", out.render_log());
    assert!(out.after.flops <= out.before.flops);
}

#[test]
fn a_pass_saved_at_any_price_is_not_cheaper() {
    use einattn_passes::analysis::{analyze, AnalysisOptions};
    use einattn_passes::rewrite::{normalizer, split, CascadeCost};
    // The 2-pass form at a prime length, made 1-pass with tiles of 1: one pass fewer, but
    // a rescale per key. The old cost (passes first) took it; the time estimate must not.
    let c = compile(&example("attention_2pass.ein"), &[("M", 1021)]);
    let m = c.rank_by_name("m").expect("m");
    let mut split_c = c.clone();
    split::split_rank(&mut split_c, m, 1).expect("splits");
    let group = normalizer::find_group(&split_c, m).expect("a softmax group");
    let one_pass = normalizer::online(&split_c, &group);
    let options = AnalysisOptions::default();
    let (before, after) = (analyze(&c, &options), analyze(&one_pass, &options));
    let (cb, ca) = (CascadeCost::of(&before), CascadeCost::of(&after));
    assert!(ca.memory_passes < cb.memory_passes, "{cb} -> {ca}");
    assert!(
        after.flops as f64 > 1.4 * before.flops as f64,
        "{cb} -> {ca}"
    );
    assert!(ca > cb, "{cb} -> {ca}");
    // Removing a pass that costs nothing extra is cheaper.
    let tiled = compile(&example("attention_2pass.ein"), &[("M", 1024)]);
    let m = tiled.rank_by_name("m").expect("m");
    let mut split_t = tiled.clone();
    split::split_rank(&mut split_t, m, 64).expect("splits");
    let group = normalizer::find_group(&split_t, m).expect("a softmax group");
    let one = normalizer::online(&split_t, &group);
    assert!(
        CascadeCost::of(&analyze(&one, &options)) < CascadeCost::of(&analyze(&tiled, &options))
    );
}

/// Document-masked causal softmax in 3-pass form: the mask compares values.
const DOCUMENT_3PASS: &str = "kernel document_3pass
size N = 8
size D = 2
rank e: D
rank f: D
rank m: N
rank p: N
input Q[p, e]: f32
input K[m, e]: f32
input V[m, f]: f32
input SEG[p]: f32
output O[p, f]: f32
S[m, p] = Q[p, e] * K[m, e] where m <= p and SEG[p] == SEG[m]
G[p] = max[m] S[m, p]
E[m, p] = exp(S[m, p] - G[p])
L[p] = E[m, p]
O[p, f] = E[m, p] * V[m, f] / L[p]
";

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]

    #[test]
    fn a_value_masked_score_is_kept_and_the_softmax_still_streams(
        n_tiles in 1u64..4, d in 1u64..3, seed in any::<u64>(),
    ) {
        let c = compile(DOCUMENT_3PASS, &[("N", 4 * n_tiles), ("D", d)]);
        let out = run(&c, &small_options());
        // The Einsum with the value condition survives as written.
        let s = out.cascade.tensor_by_name("S").expect("S is kept");
        let producer = out.cascade.producer(s).expect("S has its Einsum");
        prop_assert_eq!(out.cascade.einsums[producer].value_mask.len(), 1);
        if n_tiles > 1 {
            prop_assert_eq!(out.after.passes.get("m"), Some(&1));
        }
        assert_equivalent(&c, &out.cascade, seed);
    }
}

#[test]
fn a_temporary_written_at_a_combined_index_survives_the_algebra() {
    // `PS[b, h, m, p]` written from `m1, m0` cannot be inlined into terms; its Einsum must
    // be kept, not dropped (which left a read of whatever tensor took its handle, and a
    // cascade reported as costing nothing).
    let source = example("attention_sliding_window.ein").replace(
        "PS[b, h, m1, p]       = P[b, h, m1, m0, p]",
        "PS[b, h, m, p]        = P[b, h, m1, m0, p]",
    );
    assert!(source.contains("PS[b, h, m, p]"));
    let c = compile(&source, &[]);
    let out = run(&c, &OptimizeOptions::default());
    einattn_ir::validate::validate(&out.cascade).expect("the result validates");
    assert!(out.after.warnings.is_empty(), "{:?}", out.after.warnings);
    assert!(out.after.flops > 0 && out.after.bytes_fused > 0);
    let small = compile(&source, &[("N", 8), ("D", 2), ("TILE", 4), ("W", 3)]);
    let out = run(&small, &small_options());
    assert_equivalent(&small, &out.cascade, 21);
}
