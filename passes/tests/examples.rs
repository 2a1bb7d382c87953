//! The analysis of every example in `examples/`, through the parser: explicit asserts of
//! the numbers the design fixes (passes, states, FLOP formulas). The full reports, text and
//! JSON, are file tests (`tests/filetests/analyze/`).

use einattn_passes::analysis::{analyze, AnalysisOptions, BufferKind, Report};
use std::path::PathBuf;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn report_with(name: &str, defines: &[(&str, u64)]) -> Report {
    let path = examples_dir().join(format!("{name}.ein"));
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let defines: Vec<(String, u64)> = defines.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    let cascade = einattn_dsl::compile_source(&format!("{name}.ein"), &source, &defines)
        .unwrap_or_else(|e| panic!("{name}.ein does not compile: {e:?}"));
    analyze(&cascade, &AnalysisOptions::default())
}

fn report(name: &str) -> Report {
    report_with(name, &[])
}

fn size(r: &Report, symbol: &str) -> u64 {
    r.sizes[symbol]
}

fn einsum<'r>(r: &'r Report, name: &str) -> &'r einattn_passes::analysis::EinsumReport {
    r.einsums
        .iter()
        .find(|e| e.einsum == name)
        .unwrap_or_else(|| panic!("{}: no Einsum {name}", r.kernel))
}

#[test]
fn every_example_is_analyzed_without_warnings() {
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ein"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    assert!(names.len() >= 8, "examples: {names:?}");
    for name in names {
        let r = report(&name);
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        assert!(!r.render_text().is_empty(), "{name}");
    }
}

#[test]
fn softmax_cascades_need_three_two_and_one_passes() {
    assert_eq!(report("attention_3pass").passes["m"], 3);
    assert_eq!(report("attention_2pass").passes["m"], 2);
    let one = report("attention_1pass");
    assert_eq!(one.passes["m"], 1);
    assert_eq!(one.passes["m0"], 2, "LM before SLN");
    for name in ["attention_causal", "attention_sliding_window"] {
        let r = report(name);
        assert_eq!(r.passes["m"], 1, "{name}");
        assert_eq!(r.passes["m0"], 2, "{name}");
    }
}

#[test]
fn pass_reasons_name_the_full_reduction() {
    let r = report("attention_3pass");
    let m = r.pass_detail.iter().find(|p| p.name == "m").unwrap();
    assert_eq!(
        m.reasons,
        [
            "pass 2 over m starts at SN: it needs GM, a max over all of m",
            "pass 3 over m starts at A: it needs SD, a sum over all of m",
        ]
    );
}

#[test]
fn one_pass_states_are_per_query() {
    let r = report("attention_1pass");
    let d = size(&r, "D");
    let buf = |n: &str| r.buffers.iter().find(|b| b.tensor == n).unwrap();
    assert_eq!(buf("RNV").kind, BufferKind::State);
    assert_eq!(buf("RNV").elements_per_point, d);
    assert_eq!(buf("RM").elements_per_point, 1);
    assert_eq!(buf("RD").elements_per_point, 1);
    assert_eq!(buf("BQK").kind, BufferKind::Tile);
    assert_eq!(buf("BQK").elements_per_point, size(&r, "TILE"));
    assert_eq!(r.parallel_ranks, ["p"]);
}

#[test]
fn lightning_is_one_pass_over_blocks_with_a_d_by_e_state() {
    let r = report("lightning");
    assert_eq!(
        r.passes["n"], 1,
        "the block rank t, reported under its parent n"
    );
    assert_eq!(r.key_rank.as_deref(), Some("n"));
    assert_eq!(r.parallel_ranks, ["b", "h"]);
    let kv = r.buffers.iter().find(|b| b.tensor == "KV").unwrap();
    assert_eq!(kv.kind, BufferKind::State);
    assert_eq!(kv.ranks, ["d", "e"]);
    let d = size(&r, "D");
    assert_eq!(kv.elements_per_point, d * d);
    assert_eq!(r.fusion_groups.len(), 1);
}

#[test]
fn lightning_naive_and_linear_attention_need_one_pass() {
    assert_eq!(report("lightning_naive").passes["m"], 1);
    assert_eq!(report("linear_attention").passes["n"], 1);
}

#[test]
fn three_pass_flops_follow_the_formula() {
    let r = report("attention_3pass");
    let (m, d) = (size(&r, "M"), size(&r, "D"));
    assert_eq!(einsum(&r, "QK").contraction_flops, 2 * m * m * d);
    assert_eq!(einsum(&r, "AV").contraction_flops, 2 * m * m * d);
    assert_eq!(r.flops_by_class.contraction, 4 * m * m * d);
    assert_eq!(einsum(&r, "SN").transcendental_ops, m * m);
}

#[test]
fn causal_mask_keeps_the_triangle() {
    let r = report("attention_causal");
    let (b, h, n, d) = (size(&r, "B"), size(&r, "H"), size(&r, "N"), size(&r, "D"));
    let triangle = n * (n + 1) / 2;
    assert_eq!(einsum(&r, "S").points, b * h * triangle * d);
    assert_eq!(einsum(&r, "S").contraction_flops, 2 * b * h * triangle * d);
    assert_eq!(einsum(&r, "PV").contraction_flops, 2 * b * h * triangle * d);
    let naive = report("lightning_naive");
    let (b, h, n, d) = (
        size(&naive, "B"),
        size(&naive, "H"),
        size(&naive, "N"),
        size(&naive, "D"),
    );
    assert_eq!(einsum(&naive, "S").points, b * h * n * (n + 1) / 2 * d);
}

#[test]
fn sliding_window_counts_the_band() {
    let r = report("attention_sliding_window");
    let (b, h, n, d, w) = (
        size(&r, "B"),
        size(&r, "H"),
        size(&r, "N"),
        size(&r, "D"),
        size(&r, "W"),
    );
    // Query p sees min(p + 1, W) keys.
    let band: u64 = (0..n).map(|p| (p + 1).min(w)).sum();
    assert_eq!(einsum(&r, "QK").points, b * h * band * d);
}

#[test]
fn long_sequences_are_analyzed_without_enumerating_n_squared() {
    let r = report_with("attention_causal", &[("N", 65536)]);
    let n = 65536u64;
    assert_eq!(
        einsum(&r, "S").points,
        size(&r, "B") * size(&r, "H") * n * (n + 1) / 2 * size(&r, "D")
    );
}

#[test]
fn a_map_inside_a_contraction_operand_runs_once_per_operand_point() {
    // O[b, h, f] = P[b, h, m] / L[b, h] * V[b, m, h, f]: the division runs per (b, h, m),
    // the product with V on the tensor cores per (b, h, m, f).
    let r = report("flash_decoding");
    let (b, h, n, d) = (size(&r, "B"), size(&r, "H"), size(&r, "N"), size(&r, "D"));
    let o = einsum(&r, "O");
    assert_eq!(o.class, einattn_passes::analysis::OpClass::Contraction);
    assert_eq!(o.contraction_flops, 2 * b * h * n * d);
    assert_eq!(o.scalar_flops, b * h * n);
    assert_eq!(r.passes["m"], 3, "written as the plain 3-pass softmax");
}

#[test]
fn a_batched_dot_product_is_scalar_work() {
    // EZ[t] = P[t, v] * Z[t, v]: both operands over (t, v), no matrix shape.
    let r = report("lm_head_entropy");
    let (t, v) = (size(&r, "T"), size(&r, "VOCAB"));
    let ez = einsum(&r, "EZ");
    assert_eq!(ez.class, einattn_passes::analysis::OpClass::Scalar);
    assert_eq!(ez.scalar_flops, 2 * t * v);
    assert_eq!(r.passes["v"], 3);
}

#[test]
fn gqa_with_two_splits_is_one_fused_pass_with_tiles_of_the_key_rank() {
    // `split h -> g, r` (K/V head groups) and `split m -> m1, m0` (key tiles): the tile
    // buffers are steps of the key rank's outer rank m1, not of the head group g.
    let r = report_with("gqa", &[("N", 1024)]);
    assert_eq!(r.passes["m"], 1);
    for b in r.buffers.iter().filter(|b| b.kind == BufferKind::Tile) {
        assert_eq!(b.rank, "m1", "{b:?}");
        assert!(!b.ranks.contains(&"m1".to_string()), "{b:?}");
    }
    let s = r.buffers.iter().find(|b| b.tensor == "S").expect("S");
    assert_eq!(s.elements_per_point, 64, "{s:?}");
    assert_eq!(r.fusion_groups.len(), 1, "{:#?}", r.fusion_groups);
    assert_eq!(r.bytes_fused, r.bytes_min);
}

#[test]
fn new_variants_analyze_with_their_key_ranks() {
    let doc = report("document_mask");
    assert_eq!(doc.passes["m"], 1);
    let s = einsum(&doc, "S");
    assert_eq!(
        s.value_mask,
        ["data-dependent mask `SEG[b, p] == SEG[b, 64*m1 + m0]`"]
    );
    // Downstream maps inherit the data-dependent absence.
    assert!(einsum(&doc, "P")
        .value_mask
        .iter()
        .any(|m| m.contains("S's")));
    for (name, key) in [
        ("delta_rule", "t"),
        ("gla", "t"),
        ("delta_rule_chunked", "n"),
    ] {
        let r = report(name);
        assert_eq!(r.key_rank.as_deref(), Some(key), "{name}");
        assert_eq!(r.passes[key], 1, "{name}");
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
    }
    let gemm = report("rmsnorm_gemm");
    assert_eq!(
        einsum(&gemm, "Y").class,
        einattn_passes::analysis::OpClass::Contraction
    );
}
