//! The language's subtle spots: reduction prefixes vs accesses, statement terminators,
//! reduction order, split composition, evaluation order.

use einattn_dsl::{ast, compile_source, parse};
use einattn_ir::validate::topological_order;
use einattn_ir::*;

const HEAD: &str = "\
kernel t
rank e: 4
rank m: 8
rank p: 8
input Q[p, e]: f32
input K[m, e]: f32
output O[p]: f32
";

fn compile(body: &str) -> Cascade {
    let source = format!("{HEAD}{body}");
    compile_source("t.ein", &source, &[])
        .unwrap_or_else(|d| panic!("{}", d.render("t.ein", &source)))
}

fn reductions(c: &Cascade, tensor: &str) -> Vec<(String, ReduceOp)> {
    let t = c.tensor_by_name(tensor).unwrap();
    let e = &c.einsums[c.producer(t).unwrap()];
    e.reductions
        .iter()
        .map(|r| (c.ranks[r.rank].name.clone(), r.op))
        .collect()
}

#[test]
fn prefix_or_access_is_decided_by_lookahead() {
    // `max[m] S[...]`: a prefix. `mx[m] + 1`: an access (of a tensor named like a prefix).
    let c = compile("S[m, p] = Q[p, e] * K[m, e]\nO[p] = max[m] S[m, p]\n");
    assert_eq!(reductions(&c, "O"), vec![("m".into(), ReduceOp::Max)]);
    let file = parse("t.ein", "kernel t\nA[p] = max[m] + 1\nB[p] = max[m] (-x)\n").unwrap();
    let value = |i: usize| match &file.statements[i].kind {
        ast::StatementKind::Einsum(e) => (e.reductions.len(), e.value.kind.clone()),
        other => panic!("{other:?}"),
    };
    let (prefixes, kind) = value(1);
    assert_eq!(prefixes, 0);
    assert!(matches!(kind, ast::ExprKind::Binary(ast::BinOp::Add, _, _)));
    let (prefixes, kind) = value(2);
    assert_eq!(prefixes, 1);
    assert!(matches!(kind, ast::ExprKind::Neg(_)));
}

#[test]
fn nested_prefixes_reduce_inner_to_outer() {
    let c = compile("O[p] = max[m] sum[e] Q[p, e] * K[m, e]\n");
    assert_eq!(
        reductions(&c, "O"),
        vec![("e".into(), ReduceOp::Sum), ("m".into(), ReduceOp::Max)]
    );
    // Implicit sums are innermost, in order of first mention.
    let source = "kernel i\nrank e: 2\nrank f: 2\nrank m: 2\nrank p: 2\ninput A[p, f]: f32\n\
                  input B[m, e]: f32\noutput O[p]: f32\nO[p] = max[m] A[p, f] * B[m, e]\n";
    let c = compile_source("i.ein", source, &[]).unwrap();
    assert_eq!(
        reductions(&c, "O"),
        vec![
            ("f".into(), ReduceOp::Sum),
            ("e".into(), ReduceOp::Sum),
            ("m".into(), ReduceOp::Max)
        ]
    );
}

#[test]
fn statements_end_at_line_breaks_outside_brackets_and_at_semicolons() {
    let c = compile("S[m, p] = (Q[p, e]\n    * K[m, e]) ; O[p] = max[m] S[m,\n p]\n");
    assert_eq!(c.einsums.len(), 2);
}

#[test]
fn split_parents_compose_in_indices_masks_and_values() {
    let source = "\
kernel s
rank e: 4
rank m: 8
rank p: 8
split m -> m1, m0: 2
input Q[p, e]: f32
input K[m, e]: f32
output S[m1, m0, p]: f32
S[m1, m0, p] = Q[p, e] * K[m, e] * (p - m) where m <= p
";
    let c = compile_source("s.ein", source, &[]).unwrap();
    let r = |n: &str| c.rank_by_name(n).unwrap();
    let composed = IndexExpr {
        terms: vec![(2, r("m1")), (1, r("m0"))],
        constant: 0,
    };
    let e = &c.einsums[Handle::new(0)];
    let mut accesses = Vec::new();
    e.expr.visit_accesses(&mut |a| accesses.push(a.clone()));
    assert_eq!(accesses[1].indices[0], composed);
    assert_eq!(e.mask[0].lhs, composed);
    let mut values = Vec::new();
    e.expr.visit_indices(&mut |i| values.push(i.clone()));
    let p_minus_m = IndexExpr {
        terms: vec![(1, r("p")), (-2, r("m1")), (-1, r("m0"))],
        constant: 0,
    };
    assert!(values.contains(&p_minus_m), "{values:?}");
}

#[test]
fn extents_are_upper_case_rank_names() {
    let source = "\
kernel x
size N = 12
rank n: N
split n -> t, i: 4
rank j: I
input A[n]: f32
output O[t, i]: f32
O[t, i] = A[t*I + j] * (I - 1 - j) * T
";
    let c = compile_source("x.ein", source, &[]).unwrap();
    assert_eq!(c.ranks[c.rank_by_name("j").unwrap()].extent, 4);
    assert_eq!(c.ranks[c.rank_by_name("t").unwrap()].extent, 3);
}

#[test]
fn topological_order_is_stable_and_respects_dependencies() {
    // Written consumers first; the recurrence reads its own state and is not a cycle.
    let source = "\
kernel o
rank m: 8
rank p: 4
split m -> m1, m0: 2
input K[m, p]: f32
output O[p]: f32
O[p] = R[M1, p] + C[p]
R[m1+1, p] = max(R[m1, p], L[m1, p])
init R[0, p] = -inf
C[p] = K[0, p]
L[m1, p] = max[m0] K[m, p]
";
    let c = compile_source("o.ein", source, &[]).unwrap();
    let order: Vec<String> = topological_order(&c)
        .into_iter()
        .map(|e| c.tensors[c.einsums[e].output.tensor].name.clone())
        .collect();
    assert_eq!(order, vec!["C", "L", "R", "O"]);
}

#[test]
fn ast_snapshot() {
    let source = "kernel k\nsize M = 4\nrank m: M\ninput A[m]: f32\nparam s: f32 = -0.5\noutput O: f32\nO = max[m] s * A[m] where m < 3\n";
    insta::assert_debug_snapshot!(parse("k.ein", source).unwrap());
}
