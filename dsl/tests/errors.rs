//! One test per error class: the rendered message (snapshot) and where it points.

use einattn_dsl::{compile_source, DiagnosticKind, LineCol};

/// A small valid program the tests break in one place each.
const BASE: &str = "\
kernel t
size M = 8
rank e: 4
rank m: M
rank p: M
input Q[p, e]: f32
input K[m, e]: f32
output O[p]: f32
";

/// Compiles `BASE` followed by `body`; expects failure and returns the first diagnostic's
/// kind, its line:col and the rendering of all diagnostics.
fn fail_with(body: &str, defines: &[(String, u64)]) -> (DiagnosticKind, Option<LineCol>, String) {
    let source = format!("{BASE}{body}");
    fail_source(&source, defines)
}

fn fail_source(
    source: &str,
    defines: &[(String, u64)],
) -> (DiagnosticKind, Option<LineCol>, String) {
    match compile_source("t.ein", source, defines) {
        Ok(_) => panic!("expected an error for:\n{source}"),
        Err(d) => {
            let first = d.first().expect("at least one diagnostic");
            (
                first.kind,
                d.first_location(source),
                d.render("t.ein", source),
            )
        }
    }
}

fn at(line: usize, column: usize) -> Option<LineCol> {
    Some(LineCol { line, column })
}

macro_rules! check {
    ($name:literal, $result:expr, $kind:expr, $loc:expr) => {{
        let (kind, loc, rendered) = $result;
        insta::assert_snapshot!($name, rendered);
        assert_eq!(kind, $kind, "{rendered}");
        assert_eq!(loc, $loc, "{rendered}");
    }};
}

#[test]
fn unknown_tensor_suggests_a_close_name() {
    check!(
        "unknown_tensor",
        fail_with("S[m, p] = Q[p, e] * Kx[m, e]\nO[p] = max[m] S[m, p]\n", &[]),
        DiagnosticKind::UnknownName,
        at(9, 21)
    );
}

#[test]
fn unknown_rank_suggests_a_close_name() {
    check!(
        "unknown_rank",
        fail_with("O[p] = Q[p, ee] * K[m, e]\n", &[]),
        DiagnosticKind::UnknownName,
        at(9, 13)
    );
}

#[test]
fn unknown_rank_in_a_declaration() {
    check!(
        "unknown_rank_in_declaration",
        fail_with("input V[mm, e]: f32\nO[p] = Q[p, e] * K[m, e]\n", &[]),
        DiagnosticKind::UnknownName,
        at(9, 9)
    );
}

#[test]
fn unknown_function() {
    check!(
        "unknown_function",
        fail_with("O[p] = expp(Q[p, e] * K[m, e])\n", &[]),
        DiagnosticKind::UnknownName,
        at(9, 8)
    );
}

#[test]
fn undefined_size_symbol() {
    let source = "kernel t\nsize M = 8\nrank m: MM\ninput K[m]: f32\noutput O: f32\nO = K[m]\n";
    check!(
        "undefined_size",
        fail_source(source, &[]),
        DiagnosticKind::UndefinedSize,
        at(3, 9)
    );
}

#[test]
fn size_given_only_by_define_is_accepted() {
    let source = "kernel t\nrank m: N\ninput K[m]: f32\noutput O: f32\nO = K[m]\n";
    let c = compile_source("t.ein", source, &[("N".into(), 5)]).unwrap();
    assert_eq!(c.ranks[c.rank_by_name("m").unwrap()].extent, 5);
    assert_eq!(c.sizes, vec![("N".to_string(), 5)]);
}

#[test]
fn define_overrides_the_default() {
    let source = format!("{BASE}O[p] = max[m] Q[p, e] * K[m, e]\n");
    let c = compile_source("t.ein", &source, &[("M".into(), 32)]).unwrap();
    assert_eq!(c.ranks[c.rank_by_name("p").unwrap()].extent, 32);
}

#[test]
fn define_for_an_unknown_symbol_is_a_warning() {
    let source = format!("{BASE}O[p] = max[m] Q[p, e] * K[m, e]\n");
    let (cascade, warnings) =
        einattn_dsl::compile_source_with_warnings("t.ein", &source, &[("MM".into(), 16)]).unwrap();
    assert_eq!(cascade.einsums.len(), 1);
    assert_eq!(warnings.len(), 1);
    let w = warnings.first().unwrap();
    assert_eq!(w.kind, DiagnosticKind::UnknownDefine);
    assert_eq!(w.severity, einattn_dsl::Severity::Warning);
    assert_eq!(warnings.first_location(&source), None);
    insta::assert_snapshot!("unknown_define", warnings.render("t.ein", &source));
}

#[test]
fn wrong_number_of_indices() {
    check!(
        "rank_mismatch_count",
        fail_with("O[p] = Q[p] * K[m, e]\n", &[]),
        DiagnosticKind::RankMismatch,
        at(9, 8)
    );
}

#[test]
fn index_over_an_unrelated_rank() {
    // `e` (extent 4) is neither `p`, nor split from it, nor declared over the same size.
    // (`Q[m, e]` is valid: `m` and `p` are both declared over `M`.)
    check!(
        "rank_mismatch_family",
        fail_with("O[p] = Q[e, e] * K[m, e]\n", &[]),
        DiagnosticKind::RankMismatch,
        at(9, 10)
    );
}

#[test]
fn output_index_differs_from_the_declaration() {
    check!(
        "rank_mismatch_output",
        fail_with("O[m] = Q[p, e] * K[m, e]\n", &[]),
        DiagnosticKind::RankMismatch,
        at(9, 3)
    );
}

#[test]
fn tensor_assigned_twice() {
    check!(
        "assigned_twice",
        fail_with("S[p] = Q[p, e]\nS[p] = Q[p, e] * 2\nO[p] = S[p]\n", &[]),
        DiagnosticKind::AssignedTwice,
        at(10, 1)
    );
}

#[test]
fn input_assigned() {
    check!(
        "input_assigned",
        fail_with("Q[p, e] = K[m, e]\nO[p] = Q[p, e]\n", &[]),
        DiagnosticKind::AssignsInput,
        at(9, 1)
    );
}

#[test]
fn output_never_assigned() {
    check!(
        "output_never_assigned",
        fail_with("S[p] = Q[p, e]\n", &[]),
        DiagnosticKind::OutputNeverAssigned,
        at(8, 1)
    );
}

#[test]
fn temporary_read_but_never_assigned() {
    // The front end reports such a name as unknown; a pass can still produce the IR (here
    // by dropping the Einsum that assigns `S`), and validation must catch it.
    let source = format!("{BASE}S[p] = Q[p, e]\nO[p] = S[p] * 2\n");
    let full = compile_source("t.ein", &source, &[]).unwrap();
    let mut broken = full.clone();
    broken.einsums = Default::default();
    for (h, e) in full.einsums.iter() {
        if full.tensors[e.output.tensor].name != "S" {
            let _ = h;
            broken.einsums.append(e.clone());
        }
    }
    let diagnostics = einattn_ir::validate::validate(&broken).unwrap_err();
    let d = einattn_dsl::Diagnostics::new(diagnostics);
    check!(
        "read_never_assigned",
        (
            d.first().unwrap().kind,
            d.first_location(&source),
            d.render("t.ein", &source)
        ),
        DiagnosticKind::ReadNeverAssigned,
        at(10, 8)
    );
}

#[test]
fn cycle_outside_a_recurrence() {
    check!(
        "cycle",
        fail_with("A[p] = B[p] + Q[p, e]\nB[p] = A[p] * 2\nO[p] = B[p]\n", &[]),
        DiagnosticKind::Cycle,
        at(9, 1)
    );
}

#[test]
fn tensor_computed_from_itself() {
    check!(
        "self_cycle",
        fail_with("O[p] = O[p] + Q[p, e]\n", &[]),
        DiagnosticKind::Cycle,
        at(9, 1)
    );
}

const RECURRENT: &str = "\
kernel r
rank m: 8
rank p: 4
split m -> m1, m0: 2
input K[m, p]: f32
output O[p]: f32
L[m1, p] = max[m0] K[m, p]
";

#[test]
fn recurrence_reads_its_own_next_step() {
    let source = format!(
        "{RECURRENT}R[m1+1, p] = max(R[m1+1, p], L[m1, p])\ninit R[0, p] = -inf\nO[p] = R[M1, p]\n"
    );
    check!(
        "recurrence_reads_next_step",
        fail_source(&source, &[]),
        DiagnosticKind::RecurrenceReadsAhead,
        at(8, 20)
    );
}

#[test]
fn init_without_recurrence() {
    let source = format!("{RECURRENT}R[m1, p] = L[m1, p]\ninit R[0, p] = -inf\nO[p] = R[0, p]\n");
    check!(
        "init_without_recurrence",
        fail_source(&source, &[]),
        DiagnosticKind::Recurrence,
        at(9, 1)
    );
}

#[test]
fn recurrence_without_init() {
    let source = format!("{RECURRENT}R[m1+1, p] = max(R[m1, p], L[m1, p])\nO[p] = R[M1, p]\n");
    check!(
        "recurrence_without_init",
        fail_source(&source, &[]),
        DiagnosticKind::Recurrence,
        at(8, 1)
    );
}

#[test]
fn init_depending_on_the_step() {
    let source = format!(
        "{RECURRENT}R[m1+1, p] = max(R[m1, p], L[m1, p])\ninit R[0, p] = m1\nO[p] = R[M1, p]\n"
    );
    check!(
        "init_uses_step",
        fail_source(&source, &[]),
        DiagnosticKind::Recurrence,
        at(9, 16)
    );
}

#[test]
fn split_that_does_not_divide() {
    let source = "kernel s\nsize M = 1000\nrank m: M\nsplit m -> m1, m0: 48\ninput K[m]: f32\noutput O: f32\nO = K[m]\n";
    check!(
        "split_does_not_divide",
        fail_source(source, &[]),
        DiagnosticKind::SplitDoesNotDivide,
        at(4, 20)
    );
}

#[test]
fn split_that_does_not_divide_after_a_define() {
    let source = "kernel s\nsize M = 1024\nsize TILE = 64\nrank m: M\nsplit m -> m1, m0: TILE\ninput K[m]: f32\noutput O: f32\nO = K[m]\n";
    assert!(compile_source("t.ein", source, &[]).is_ok());
    let (kind, loc, _) = fail_source(source, &[("M".into(), 1000)]);
    assert_eq!(kind, DiagnosticKind::SplitDoesNotDivide);
    assert_eq!(loc, at(5, 20));
}

#[test]
fn reduction_without_identity() {
    check!(
        "reduction_without_identity",
        fail_with("O[p] = sub[m] Q[p, e] * K[m, e]\n", &[]),
        DiagnosticKind::NoIdentity,
        at(9, 8)
    );
}

#[test]
fn index_out_of_range() {
    check!(
        "index_out_of_range",
        fail_with("O[p] = Q[p, e] * K[m+1, e]\n", &[]),
        DiagnosticKind::OutOfRange,
        at(9, 20)
    );
}

#[test]
fn index_kept_in_range_by_a_mask() {
    let source = format!("{BASE}O[p] = Q[p, e] * K[m+1, e] where m < 7\n");
    assert!(compile_source("t.ein", &source, &[]).is_ok());
}

#[test]
fn index_that_is_not_affine() {
    check!(
        "index_not_affine",
        fail_with("O[p] = Q[p, e] * K[m*p, e]\n", &[]),
        DiagnosticKind::BadIndex,
        at(9, 20)
    );
}

#[test]
fn reduction_prefix_followed_by_minus() {
    // `max[m] -X` reads as the access `max[m]` minus `X`: the hint says how to write it.
    check!(
        "prefix_then_minus",
        fail_with("O[p] = max[m] -Q[p, e] * K[m, e]\n", &[]),
        DiagnosticKind::UnknownName,
        at(9, 8)
    );
}

#[test]
fn syntax_error_unexpected_token() {
    check!(
        "syntax_unexpected_token",
        fail_with("O[p] = Q[p, e] * * K[m, e]\n", &[]),
        DiagnosticKind::Syntax,
        at(9, 18)
    );
}

#[test]
fn syntax_error_unclosed_bracket() {
    check!(
        "syntax_unclosed_bracket",
        fail_with("O[p] = Q[p, e * K[m, e]\n", &[]),
        DiagnosticKind::Syntax,
        at(10, 1)
    );
}

#[test]
fn syntax_error_bad_character() {
    check!(
        "syntax_bad_character",
        fail_with("O[p] = Q[p, e] @ K[m, e]\n", &[]),
        DiagnosticKind::Syntax,
        at(9, 16)
    );
}

#[test]
fn missing_kernel_statement() {
    check!(
        "missing_kernel",
        fail_source("rank m: 4\ninput K[m]: f32\noutput O: f32\nO = K[m]\n", &[]),
        DiagnosticKind::Syntax,
        at(1, 1)
    );
}

#[test]
fn rank_declared_twice() {
    check!(
        "duplicate_rank",
        fail_source(
            "kernel t\nrank m: 4\nrank m: 8\ninput K[m]: f32\noutput O: f32\nO = K[m]\n",
            &[]
        ),
        DiagnosticKind::Duplicate,
        at(3, 6)
    );
}

#[test]
fn unknown_element_type() {
    check!(
        "unknown_dtype",
        fail_source(
            "kernel t\nrank m: 4\ninput K[m]: f23\noutput O: f32\nO = K[m]\n",
            &[]
        ),
        DiagnosticKind::UnknownName,
        at(3, 13)
    );
}

#[test]
fn every_error_is_reported() {
    let source = format!("{BASE}S[p] = Qx[p, e]\nO[p] = sub[m] S[p] * Kx[m, e]\n");
    let d = compile_source("t.ein", &source, &[]).unwrap_err();
    let kinds: Vec<DiagnosticKind> = d.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        vec![
            DiagnosticKind::UnknownName,
            DiagnosticKind::NoIdentity,
            DiagnosticKind::UnknownName
        ],
        "{}",
        d.render("t.ein", &source)
    );
}

#[test]
fn every_syntax_error_is_reported() {
    let source = format!("{BASE}S[p] = Q[p, e] * * 2\nrank : 4\nO[p] = S[p]\n");
    let d = compile_source("t.ein", &source, &[]).unwrap_err();
    let lines: Vec<usize> = d
        .locations(&source)
        .into_iter()
        .flatten()
        .map(|l| l.line)
        .collect();
    assert_eq!(lines, vec![9, 10], "{}", d.render("t.ein", &source));
    assert!(d.iter().all(|d| d.kind == DiagnosticKind::Syntax));
}

#[test]
fn a_split_that_does_not_divide_is_one_error_however_its_ranks_are_used() {
    let source = "kernel s\nsize M = 1000\nrank m: M\nrank p: 4\nsplit m -> m1, m0: 48\n\
                  input K[m, p]: f32\noutput O[p]: f32\nL[m1, p] = max[m0] K[m, p]\n\
                  R[m1+1, p] = max(R[m1, p], L[m1, p])\ninit R[0, p] = -inf\nO[p] = R[M1, p]\n";
    let d = compile_source("t.ein", source, &[]).unwrap_err();
    assert_eq!(d.len(), 1, "{}", d.render("t.ein", source));
    assert_eq!(
        d.first().map(|d| d.kind),
        Some(DiagnosticKind::SplitDoesNotDivide)
    );
}

#[test]
fn a_define_that_changes_a_fixed_size() {
    let source =
        "kernel s\nsize M = 8 fixed\nrank m: M\ninput K[m]: f32\noutput O: f32\nO = K[m] / M\n";
    assert!(compile_source("t.ein", source, &[("M".into(), 8)]).is_ok());
    check!(
        "define_changes_fixed_size",
        fail_source(source, &[("M".into(), 16)]),
        DiagnosticKind::Invalid,
        at(2, 10)
    );
}

#[test]
fn a_word_other_than_fixed_after_a_size() {
    let source = "kernel s\nsize M = 8 fxed\nrank m: M\ninput K[m]: f32\noutput O: f32\nO = K[m]\n";
    let (kind, loc, rendered) = fail_source(source, &[]);
    assert_eq!(kind, DiagnosticKind::Syntax, "{rendered}");
    assert_eq!(loc, at(2, 12), "{rendered}");
}

const DELTA: &str = "\
kernel d
rank t: 6
rank d: 3
rank e: 2
input k[t, d]: f32
input v[t, e]: f32
output O[t, e]: f32
";

#[test]
fn a_step_body_whose_einsums_read_each_other_in_the_same_step() {
    // KS reads the state after this step's update, which needs KS: a cycle inside one step.
    let source = format!(
        "{DELTA}KS[t, e] = k[t, d] * S[t+1, d, e]\nS[t+1, d, e] = S[t, d, e] - k[t, d] * KS[t, e]\n\
         init S[0, d, e] = 0\nO[t, e] = KS[t, e]\n"
    );
    check!(
        "step_body_cycle",
        fail_source(&source, &[]),
        DiagnosticKind::Cycle,
        at(8, 1)
    );
}

#[test]
fn a_step_body_through_the_current_state_is_valid() {
    let source = format!(
        "{DELTA}KS[t, e] = k[t, d] * S[t, d, e]\nS[t+1, d, e] = S[t, d, e] - k[t, d] * KS[t, e] + k[t, d] * v[t, e]\n\
         init S[0, d, e] = 0\nO[t, e] = KS[t, e]\n"
    );
    let c = compile_source("t.ein", &source, &[])
        .unwrap_or_else(|d| panic!("{}", d.render("t.ein", &source)));
    let bodies = einattn_ir::validate::step_bodies(&c);
    assert_eq!(bodies.len(), 1);
    let names: Vec<&str> = bodies[0]
        .einsums
        .iter()
        .map(|&e| c.tensors[c.einsums[e].output.tensor].name.as_str())
        .collect();
    assert_eq!(names, ["KS", "S"], "one step computes KS first");
}

#[test]
fn reverse_recurrence_reads_its_own_next_step() {
    // A reverse recurrence (its init gives the last step) computes `m1` from `m1 + 1`.
    let source =
        format!("{RECURRENT}R[m1, p] = R[m1, p] + L[m1, p]\ninit R[M1, p] = 0\nO[p] = R[0, p]\n");
    check!(
        "reverse_recurrence_reads_next_step",
        fail_source(&source, &[]),
        DiagnosticKind::RecurrenceReadsAhead,
        at(8, 14)
    );
}

#[test]
fn init_at_the_last_step_of_a_forward_recurrence() {
    let source = format!(
        "{RECURRENT}R[m1+1, p] = R[m1, p] + L[m1, p]\ninit R[M1, p] = 0\nO[p] = R[M1, p]\n"
    );
    check!(
        "init_at_last_step_of_forward_recurrence",
        fail_source(&source, &[]),
        DiagnosticKind::Recurrence,
        at(9, 8)
    );
}

#[test]
fn reverse_recurrence_along_a_split_parent() {
    let source =
        format!("{RECURRENT}R[m, p] = R[m + 1, p] + L[m1, p]\ninit R[M, p] = 0\nO[p] = R[0, p]\n");
    check!(
        "reverse_recurrence_along_split_parent",
        fail_source(&source, &[]),
        DiagnosticKind::Recurrence,
        at(8, 3)
    );
}

#[test]
fn step_body_whose_states_run_opposite_ways() {
    // `A` runs up `m1` and `B` down it, each reading the other's current step: no order
    // of the steps computes both.
    let source = format!(
        "{RECURRENT}A[m1+1, p] = A[m1, p] + B[m1 + 1, p]\ninit A[0, p] = 0\nB[m1, p] = B[m1 + 1, p] + A[m1, p] + L[m1, p]\ninit B[M1, p] = 0\nO[p] = A[M1, p] + B[0, p]\n"
    );
    check!(
        "step_body_opposite_directions",
        fail_source(&source, &[]),
        DiagnosticKind::Cycle,
        at(8, 1)
    );
}
