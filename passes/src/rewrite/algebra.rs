//! Expression-level rewrites on the e-graph, and extraction of the cheapest form.
//!
//! Every rule is an identity of the IR's semantics, including absence: a rule that moves
//! a factor across a reduction requires the factor to be free of the reduced rank (no
//! capture) and never absent (a reduction over only absent points yields its identity,
//! while a product with an absent factor is absent).

use super::extract::Extractor;
use super::lang::{Ein, EinAnalysis, EinGraph, Leaf, RankSet};
use super::tree::{materialize, Choice, TreeForm};
use egg::{
    rewrite, Applier, CostFunction, Id, Language, PatternAst, RecExpr, Rewrite, Runner, StopReason,
    Subst, Symbol, Var,
};
use einattn_ir::{Cascade, IndexExpr};
use std::collections::HashSet;
use std::time::Duration;

/// Limits of one equality-saturation run; the defaults keep every example well under
/// the 200 ms budget on two cores.
#[derive(Clone, Debug, PartialEq)]
pub struct SaturationLimits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for SaturationLimits {
    fn default() -> Self {
        SaturationLimits {
            iterations: 12,
            nodes: 6_000,
            time: Duration::from_millis(60),
        }
    }
}

/// What one saturation run did.
#[derive(Clone, Debug)]
pub struct AlgebraOutcome {
    pub cascade: Cascade,
    /// Rules on the path from the original terms to the extracted ones, in order, each
    /// once.
    pub rules_used: Vec<String>,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub stop_reason: String,
    /// Whether some root's extracted term differs from its original one.
    pub changed: bool,
}

fn var(name: &str) -> Var {
    // The names are literals of this file, all valid variables.
    name.parse()
        .unwrap_or_else(|_| unreachable!("`{name}` is a pattern variable"))
}

/// `?rank` binds a rank that is not free in `?factor`, and `?factor` is never absent.
fn independent(
    factor: &'static str,
    rank: &'static str,
) -> impl Fn(&mut EinGraph, Id, &Subst) -> bool {
    let (factor, rank) = (var(factor), var(rank));
    move |egraph, _, subst| {
        let f = &egraph[subst[factor]].data;
        match egraph[subst[rank]].data.rank {
            Some(r) => !f.free.contains(r) && !f.may_be_absent,
            None => false,
        }
    }
}

fn never_absent(a: &'static str, b: &'static str) -> impl Fn(&mut EinGraph, Id, &Subst) -> bool {
    let (a, b) = (var(a), var(b));
    move |egraph, _, subst| {
        !egraph[subst[a]].data.may_be_absent && !egraph[subst[b]].data.may_be_absent
    }
}

/// The names of every rule, in the order [`rules`] returns them.
pub const RULE_NAMES: &[&str] = &[
    "mul-commute",
    "mul-associate",
    "mul-associate-back",
    "add-commute",
    "mul-div-associate",
    "div-mul-associate",
    "sum-factor-out",
    "sum-factor-in",
    "division-delay",
    "division-hoist",
    "max-add-factor-out",
    "reduce-interchange",
    "mul-distribute",
    "mul-factor",
    "div-distribute",
    "sum-distribute",
    "sum-merge",
    "exp-of-sum",
    "exp-product",
    "exp-of-difference",
    "exp-quotient",
    "decay-factor",
    "mask-hoist",
    "mask-sink",
];

/// The expression-level rules. See docs/rewrites.md for each one's statement and side
/// conditions.
pub fn rules() -> Vec<Rewrite<Ein, EinAnalysis>> {
    vec![
        // Contraction algebra: products commute and associate.
        rewrite!("mul-commute"; "(* ?a ?b)" => "(* ?b ?a)"),
        rewrite!("mul-associate"; "(* (* ?a ?b) ?c)" => "(* ?a (* ?b ?c))"),
        rewrite!("mul-associate-back"; "(* ?a (* ?b ?c))" => "(* (* ?a ?b) ?c)"),
        rewrite!("add-commute"; "(+ ?a ?b)" => "(+ ?b ?a)"),
        rewrite!("mul-div-associate"; "(* (/ ?a ?b) ?c)" => "(/ (* ?a ?c) ?b)"),
        rewrite!("div-mul-associate"; "(/ (* ?a ?c) ?b)" => "(* (/ ?a ?b) ?c)"),
        // A factor free of the summed rank leaves the sum (right-product-first), and back.
        rewrite!("sum-factor-out"; "(reduce sum ?r (* ?a ?b))" => "(* ?a (reduce sum ?r ?b))"
            if independent("?a", "?r")),
        rewrite!("sum-factor-in"; "(* ?a (reduce sum ?r ?b))" => "(reduce sum ?r (* ?a ?b))"
            if independent("?a", "?r")),
        // Division delay: divide after the contraction, once per output point.
        rewrite!("division-delay"; "(reduce sum ?r (/ ?a ?b))" => "(/ (reduce sum ?r ?a) ?b)"
            if independent("?b", "?r")),
        rewrite!("division-hoist"; "(/ (reduce sum ?r ?a) ?b)" => "(reduce sum ?r (/ ?a ?b))"
            if independent("?b", "?r")),
        rewrite!("max-add-factor-out"; "(reduce max ?r (+ ?a ?b))" => "(+ ?a (reduce max ?r ?b))"
            if independent("?a", "?r")),
        rewrite!("reduce-interchange"; "(reduce ?op ?r (reduce ?op ?s ?a))" => "(reduce ?op ?s (reduce ?op ?r ?a))"),
        // Maps over sums.
        rewrite!("mul-distribute"; "(* ?a (+ ?b ?c))" => "(+ (* ?a ?b) (* ?a ?c))"),
        rewrite!("mul-factor"; "(+ (* ?a ?b) (* ?a ?c))" => "(* ?a (+ ?b ?c))"),
        rewrite!("div-distribute"; "(/ (+ ?a ?b) ?c)" => "(+ (/ ?a ?c) (/ ?b ?c))"),
        rewrite!("sum-distribute"; "(reduce sum ?r (+ ?a ?b))" => "(+ (reduce sum ?r ?a) (reduce sum ?r ?b))"
            if never_absent("?a", "?b")),
        rewrite!("sum-merge"; "(+ (reduce sum ?r ?a) (reduce sum ?r ?b))" => "(reduce sum ?r (+ ?a ?b))"
            if never_absent("?a", "?b")),
        rewrite!("exp-of-sum"; "(exp (+ ?a ?b))" => "(* (exp ?a) (exp ?b))"),
        rewrite!("exp-product"; "(* (exp ?a) (exp ?b))" => "(exp (+ ?a ?b))"),
        rewrite!("exp-of-difference"; "(exp (- ?a ?b))" => "(/ (exp ?a) (exp ?b))"),
        rewrite!("exp-quotient"; "(/ (exp ?a) (exp ?b))" => "(exp (- ?a ?b))"),
        // exp(c (p - m)) = exp(c p) exp(-c m): a decay splits across the two ranks.
        rewrite!("decay-factor"; "(exp (* ?c ?i))" => { DecayFactor { c: var("?c"), i: var("?i") } }),
        // Absence propagates through maps, so a mask may sit anywhere in a product.
        rewrite!("mask-hoist"; "(* (mask ?k ?a) ?b)" => "(mask ?k (* ?a ?b))"),
        rewrite!("mask-sink"; "(mask ?k (* ?a ?b))" => "(* (mask ?k ?a) ?b)"),
    ]
}

/// Splits `exp(c * i)`, `i` a rank value over two or more ranks, into
/// `exp(c * i1) * exp(c * i2)` with `i1` the first rank's term.
struct DecayFactor {
    c: Var,
    i: Var,
}

impl Applier<Ein, EinAnalysis> for DecayFactor {
    fn apply_one(
        &self,
        egraph: &mut EinGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Ein>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        let index_leaf = egraph[subst[self.i]].nodes.iter().find_map(|n| match n {
            Ein::Leaf(Leaf::Index(k)) => Some(*k),
            _ => None,
        });
        let Some(k) = index_leaf else { return vec![] };
        let Some(index) = egraph.analysis.leaves.indices.get(k as usize).cloned() else {
            return vec![];
        };
        let Some(&(coef, rank)) = index.terms.first() else {
            return vec![];
        };
        if index.terms.len() < 2 {
            return vec![];
        }
        let mut first = IndexExpr::constant(0);
        first.add_term(coef, rank);
        let mut rest = index.clone();
        rest.add_term(-coef, rank);
        let first = egraph.analysis.leaves.index(&first);
        let rest = egraph.analysis.leaves.index(&rest);
        let c = subst[self.c];
        let first = egraph.add(Ein::Leaf(first));
        let rest = egraph.add(Ein::Leaf(rest));
        let a = egraph.add(Ein::Mul([c, first]));
        let b = egraph.add(Ein::Mul([c, rest]));
        let ea = egraph.add(Ein::Exp([a]));
        let eb = egraph.add(Ein::Exp([b]));
        let product = egraph.add(Ein::Mul([ea, eb]));
        if egraph.union_trusted(eclass, product, rule_name) {
            vec![product]
        } else {
            vec![]
        }
    }
}

/// The extraction cost: FLOPs, counting each node once per point of its free ranks (a
/// subterm is computed once over the ranks it depends on), plus a prohibitive charge for
/// an `exp` whose argument the user never wrote: `exp(QK) / exp(GM)` equals
/// `exp(QK - GM)` but overflows in f32 where the original cannot.
pub struct FlopCost<'a> {
    egraph: &'a EinGraph,
    extents: Vec<f64>,
    trusted_exp_args: HashSet<Id>,
    /// The e-nodes of the terms as built: on equal FLOPs the form with fewer new nodes
    /// wins, so the user's spelling survives where rewriting gains nothing.
    original: HashSet<Ein>,
    /// Classes of temporaries the cascade computes once and reads several times. Tree
    /// costs would charge them at every read, favouring forms that avoid reading them
    /// (and then recompute their work in another shape); reading one is free instead.
    computed_once: HashSet<Id>,
}

const UNTRUSTED_EXP: f64 = 1e18;

impl<'a> FlopCost<'a> {
    pub fn new(
        egraph: &'a EinGraph,
        cascade: &Cascade,
        trusted_exp_args: &HashSet<Id>,
        original: &HashSet<Ein>,
        computed_once: &[Id],
    ) -> Self {
        FlopCost {
            egraph,
            extents: cascade.ranks.iter().map(|(_, r)| r.extent as f64).collect(),
            trusted_exp_args: trusted_exp_args.iter().map(|&i| egraph.find(i)).collect(),
            original: canonical_nodes(egraph, original),
            computed_once: computed_once.iter().map(|&i| egraph.find(i)).collect(),
        }
    }

    fn volume(&self, set: RankSet) -> f64 {
        set.ranks()
            .iter()
            .map(|r| self.extents.get(r.index()).copied().unwrap_or(1.0))
            .product()
    }
}

impl CostFunction<Ein> for FlopCost<'_> {
    /// FLOPs, then e-nodes not in the original terms.
    type Cost = (f64, usize);
    fn cost<C>(&mut self, enode: &Ein, mut costs: C) -> (f64, usize)
    where
        C: FnMut(Id) -> (f64, usize),
    {
        let (children, new_nodes) = enode.children().iter().fold((0.0, 0), |(f, n), &c| {
            if self.computed_once.contains(&self.egraph.find(c)) {
                return (f, n);
            }
            let (cf, cn) = costs(c);
            (f + cf, n + cn)
        });
        let new_node = usize::from(!self.original.contains(enode));
        let data = |c: &Id| &self.egraph[*c].data;
        let own = match enode {
            Ein::Num(_) | Ein::Leaf(_) | Ein::Mask(_) => 0.0,
            Ein::Reduce([_, rank, body]) => {
                let space = match data(rank).rank {
                    Some(r) => data(body).free.with(r),
                    None => data(body).free,
                };
                self.volume(space)
            }
            Ein::Exp([a]) if !self.trusted_exp_args.contains(&self.egraph.find(*a)) => {
                UNTRUSTED_EXP + self.volume(data(a).free)
            }
            other => {
                let free = other
                    .children()
                    .iter()
                    .fold(RankSet::default(), |s, c| s.union(data(c).free));
                self.volume(free)
            }
        };
        (own + children, new_nodes + new_node)
    }
}

/// `nodes` with their children canonical in `egraph` (after unions moved them).
fn canonical_nodes(egraph: &EinGraph, nodes: &HashSet<Ein>) -> HashSet<Ein> {
    nodes
        .iter()
        .map(|n| n.clone().map_children(|c| egraph.find(c)))
        .collect()
}

/// Every `exp` argument in the e-graph as built: the exponentials the user wrote.
pub fn exp_arguments(egraph: &EinGraph) -> HashSet<Id> {
    egraph
        .classes()
        .flat_map(|c| c.nodes.iter())
        .filter_map(|n| match n {
            Ein::Exp([a]) => Some(egraph.find(*a)),
            _ => None,
        })
        .collect()
}

struct BestNodes<'a, CF: CostFunction<Ein>> {
    extractor: Extractor<'a, CF>,
}

impl<CF: CostFunction<Ein>> Choice for BestNodes<'_, CF> {
    fn node(&self, class: Id) -> &Ein {
        self.extractor.find_best_node(class)
    }
}

/// Saturates the cascade's terms with `rules` and extracts the cheapest by [`FlopCost`].
pub fn saturate(
    cascade: &Cascade,
    rules: &[Rewrite<Ein, EinAnalysis>],
    limits: &SaturationLimits,
    explain: bool,
) -> AlgebraOutcome {
    let form = TreeForm::build(cascade);
    let (egraph, roots) = form.egraph(explain);
    let trusted = exp_arguments(&egraph);
    let original: HashSet<Ein> = egraph
        .classes()
        .flat_map(|c| c.nodes.iter().cloned())
        .collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(rules);
    let stop_reason = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(StopReason::TimeLimit(t)) => format!("time limit ({t:.3} s)"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    let iterations = runner.iterations.len();
    let mut egraph = runner.egraph;
    let egraph_nodes = egraph.total_number_of_nodes();
    let definitions = form.definition_classes(&egraph);
    let computed_once: Vec<Id> = form
        .shared
        .iter()
        .filter_map(|t| definitions.iter().find(|(d, _)| d == t)?.1)
        .collect();
    let cost = FlopCost::new(&egraph, cascade, &trusted, &original, &computed_once);
    let extractor = Extractor::new(&egraph, cost);
    let extracted: Vec<RecExpr<Ein>> = roots.iter().map(|&r| extractor.find_best(r).1).collect();
    let changed = form
        .roots
        .iter()
        .zip(&extracted)
        .any(|(root, new)| root.term.to_string() != new.to_string());
    let choice = BestNodes { extractor };
    let rewritten = materialize(cascade, &form, &egraph, &roots, &choice);
    drop(choice);
    let mut rules_used: Vec<String> = Vec::new();
    if explain && changed {
        for (root, new) in form.roots.iter().zip(&extracted) {
            if root.term.to_string() == new.to_string() {
                continue;
            }
            let mut explanation = egraph.explain_equivalence(&root.term, new);
            for step in explanation.make_flat_explanation().iter() {
                collect_rules(step, &mut rules_used);
            }
        }
    }
    AlgebraOutcome {
        cascade: rewritten,
        rules_used,
        iterations,
        egraph_nodes,
        stop_reason,
        changed,
    }
}

fn collect_rules(term: &egg::FlatTerm<Ein>, out: &mut Vec<String>) {
    for rule in [term.backward_rule, term.forward_rule]
        .into_iter()
        .flatten()
    {
        let name = rule.to_string();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    for child in &term.children {
        collect_rules(child, out);
    }
}

/// Prefers e-nodes a rule added: extracting with it shows what one rule does on its own,
/// whatever it costs (the per-rule property tests use it).
struct PreferRewritten {
    original: HashSet<Ein>,
}

impl CostFunction<Ein> for PreferRewritten {
    type Cost = (usize, usize);
    fn cost<C>(&mut self, enode: &Ein, mut costs: C) -> (usize, usize)
    where
        C: FnMut(Id) -> (usize, usize),
    {
        // Leaves are shared by both sides of every rule; only operator nodes tell them apart.
        let own = usize::from(!enode.is_leaf() && self.original.contains(enode));
        enode.children().iter().fold((own, 1), |(o, s), &c| {
            let (co, cs) = costs(c);
            (o + co, s + cs)
        })
    }
}

/// Applies the rule named `rule` for one round and rebuilds the cascade from terms that
/// use what it added. `None` when the rule is unknown or did not change any root (the
/// per-rule property tests check both the rewrite and that it fired).
pub fn apply_rule_once(cascade: &Cascade, rule: &str) -> Option<Cascade> {
    let all = rules();
    let chosen: Vec<Rewrite<Ein, EinAnalysis>> = all
        .into_iter()
        .filter(|r| r.name.as_str() == rule)
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let form = TreeForm::build(cascade);
    let (egraph, roots) = form.egraph(false);
    let original: HashSet<Ein> = egraph
        .classes()
        .flat_map(|c| c.nodes.iter().cloned())
        .collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(1)
        .with_node_limit(100_000)
        .run(&chosen);
    let egraph = runner.egraph;
    let canonical: HashSet<Ein> = original
        .iter()
        .map(|n| n.clone().map_children(|c| egraph.find(c)))
        .collect();
    let extractor = Extractor::new(
        &egraph,
        PreferRewritten {
            original: canonical,
        },
    );
    let changed = form
        .roots
        .iter()
        .zip(&roots)
        .any(|(root, &id)| extractor.find_best(id).1.to_string() != root.term.to_string());
    if !changed {
        return None;
    }
    let choice = BestNodes { extractor };
    Some(materialize(cascade, &form, &egraph, &roots, &choice))
}
