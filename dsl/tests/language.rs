//! What the language accepts since issue 14: tensors read at ranks of the same sequence,
//! computed indices range-checked under masks over several ranks, extents written as size
//! expressions, conditions on values, and the warning about a term summed over a rank it
//! does not contain.

use einattn_dsl::{compile_source, compile_source_with_warnings, DiagnosticKind, LineCol};
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::topological_order;

const BASE: &str = "\
kernel t
size M = 8
rank e: 4
rank m: M
rank p: M
input Q[p, e]: f32
input K[m, e]: f32
";

fn compile(body: &str, defines: &[(&str, u64)]) -> Result<einattn_ir::Cascade, String> {
    let source = format!("{BASE}{body}");
    let defines: Vec<(String, u64)> = defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    compile_source("t.ein", &source, &defines).map_err(|d| d.render("t.ein", &source))
}

fn first_error(body: &str) -> (DiagnosticKind, Option<LineCol>, String) {
    let source = format!("{BASE}{body}");
    let d = compile_source("t.ein", &source, &[]).expect_err("an error");
    let first = d.first().expect("a diagnostic");
    (
        first.kind,
        d.first_location(&source),
        d.render("t.ein", &source),
    )
}

#[test]
fn a_tensor_is_read_at_a_rank_declared_over_the_same_size() {
    // Q is declared over p; m is declared over the same size M.
    compile("output O[m]: f32\nO[m] = Q[m, e] * K[m, e]\n", &[]).unwrap();
    // A literal extent that happens to be equal is not the same sequence.
    let (kind, _, text) = first_error("rank z: 8\noutput O[z]: f32\nO[z] = Q[z, e]\n");
    assert_eq!(kind, DiagnosticKind::RankMismatch, "{text}");
}

#[test]
fn a_computed_index_is_range_checked_under_a_mask_over_two_ranks() {
    let table = "rank z: M\ninput TB[z]: f32\noutput S[m, p]: f32\n";
    // p - m lies in 0..M-1 only where m <= p.
    compile(&format!("{table}S[m, p] = TB[p - m] where m <= p\n"), &[]).unwrap();
    compile(&format!("{table}S[m, p] = TB[p - m] where p >= m\n"), &[]).unwrap();
    compile(
        &format!("{table}S[m, p] = TB[m - p] where p - m <= 0\n"),
        &[],
    )
    .unwrap();
    let (kind, loc, text) = first_error(&format!("{table}S[m, p] = TB[p - m]\n"));
    assert_eq!(kind, DiagnosticKind::OutOfRange, "{text}");
    assert_eq!(
        loc,
        Some(LineCol {
            line: 11,
            column: 14
        }),
        "{text}"
    );
    assert!(text.contains("-7..=7"), "{text}");
    // The wrong side of the mask is still out of range.
    let (kind, _, text) = first_error(&format!("{table}S[m, p] = TB[m - p] where m <= p\n"));
    assert_eq!(kind, DiagnosticKind::OutOfRange, "{text}");
    // A window narrows both ends.
    compile(
        "rank w: 3\ninput TW[w]: f32\noutput S[m, p]: f32\nS[m, p] = TW[p - m] where m <= p and p - m < 3\n",
        &[],
    )
    .unwrap();
}

#[test]
fn an_extent_may_be_an_affine_expression_of_sizes() {
    let body =
        "rank z: 2*M - 1\ninput TB[z]: f32\noutput S[m, p]: f32\nS[m, p] = TB[p - m + M - 1]\n";
    let c = compile(body, &[]).unwrap();
    assert_eq!(c.ranks[c.rank_by_name("z").unwrap()].extent, 15);
    let c = compile(body, &[("M", 32)]).unwrap();
    assert_eq!(c.ranks[c.rank_by_name("z").unwrap()].extent, 63);
    // Printed as written, so the printed text rescales too.
    assert!(einattn_ir::print::print(&c).contains("rank z: 2*M - 1"));
    let (kind, _, text) = first_error("rank z: 2*m\n");
    assert_eq!(kind, DiagnosticKind::Invalid, "{text}");
    let (kind, _, text) = first_error("rank z: M - 8\n");
    assert_eq!(kind, DiagnosticKind::Invalid, "{text}");
    assert!(text.contains("at least 1"), "{text}");
}

#[test]
fn a_condition_on_values_masks_points_where_it_fails() {
    let body = "input SEG[p]: f32\noutput C[p]: f32\nC[p] = 1 where m <= p and SEG[p] == SEG[m]\n";
    let c = compile(body, &[]).unwrap();
    let e = &c.einsums.iter().next().unwrap().1;
    assert_eq!((e.mask.len(), e.value_mask.len()), (1, 1));
    // C counts the earlier positions with the same segment id.
    let seg = vec![0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 2.0];
    let mut inputs = random_inputs(&c, 1);
    let h = c.tensor_by_name("SEG").unwrap();
    inputs.insert(h, TensorData::new(vec![8], seg.clone()));
    let values = evaluate_in_order(&c, &inputs, &topological_order(&c)).unwrap();
    let got = values
        .get(c.tensor_by_name("C").unwrap())
        .unwrap()
        .stored()
        .into_owned();
    let want: Vec<f64> = (0..8)
        .map(|p| (0..=p).filter(|&m| seg[m] == seg[p]).count() as f64)
        .collect();
    assert_eq!(got, want);
    // Printed after the affine conditions, and read back the same.
    let text = einattn_ir::print::print(&c);
    assert!(text.contains("where m <= p and SEG[p] == SEG[m]"), "{text}");
    let back = compile_source("t.ein", &text, &[]).unwrap();
    assert_eq!(
        einattn_ir::print::without_spans(&back),
        einattn_ir::print::without_spans(&c)
    );
}

#[test]
fn a_term_summed_over_a_rank_it_lacks_is_a_warning() {
    let source = format!(
        "{BASE}input bias[p]: f32\noutput S[m, p]: f32\nS[m, p] = 0.5 * Q[p, e] * K[m, e] + bias[p]\n"
    );
    let (_, warnings) = compile_source_with_warnings("t.ein", &source, &[]).unwrap();
    let w: Vec<_> = warnings.iter().collect();
    assert_eq!(w.len(), 1, "{}", warnings.render("t.ein", &source));
    assert_eq!(w[0].kind, DiagnosticKind::SummedConstant);
    assert_eq!(
        warnings.first_location(&source),
        Some(LineCol {
            line: 10,
            column: 37
        })
    );
    let text = warnings.render("t.ein", &source);
    assert!(text.contains("added 4 times"), "{text}");
    // Summed in its own Einsum first: nothing to warn about; nor about a deliberate count.
    for body in [
        "input bias[p]: f32\noutput S[m, p]: f32\nQK[m, p] = Q[p, e] * K[m, e]\nS[m, p] = QK[m, p] + bias[p]\n",
        "output N[p]: f32\nN[p] = 1 where m <= p\n",
    ] {
        let source = format!("{BASE}{body}");
        let (_, warnings) = compile_source_with_warnings("t.ein", &source, &[]).unwrap();
        assert!(warnings.is_empty(), "{}", warnings.render("t.ein", &source));
    }
}

/// `a ^ b` is `exp(b * log(a))` (for `a > 0`): it binds tighter than a sign and
/// associates to the right, and it is not an index.
#[test]
fn a_power_reads_as_an_exponential() {
    let value = |body: &str| -> Vec<f64> {
        let c = compile(
            &format!("param g: f32 = 0.5\noutput O[p]: f32\n{body}\n"),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let inputs = random_inputs(&c, 1);
        let out = c.outputs().next().expect("an output");
        evaluate_in_order(&c, &inputs, &topological_order(&c))
            .expect("evaluates")
            .get(out)
            .expect("O")
            .stored()
            .into_owned()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    let pow = value("O[p] = g ^ (p + 1)");
    let want: Vec<f64> = (0..8).map(|p| 0.5f64.powi(p + 1)).collect();
    assert!(close(&pow, &want), "{pow:?}");
    // -2 ^ 2 is -(2 ^ 2); 2 ^ 3 ^ 2 is 2 ^ 9.
    assert!(close(&value("O[p] = -2 ^ 2 + 0 * p"), &[-4.0; 8]));
    assert!(close(&value("O[p] = 2 ^ 3 ^ 2 + 0 * p"), &[512.0; 8]));
    // Right after a reduction prefix too.
    let c = compile("output O[p]: f32\nO[p] = sum[e] Q[p, e] ^ 2\n", &[]);
    assert!(c.is_ok(), "{c:?}");
    let (kind, _, text) = first_error("output O[p]: f32\nO[p] = Q[p ^ 2, e]\n");
    assert_ne!(kind, DiagnosticKind::Syntax, "{text}");
}
