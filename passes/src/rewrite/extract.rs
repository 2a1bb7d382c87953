//! Extraction of the cheapest e-node per e-class, as `egg::Extractor` does it, in time
//! that does not grow with the square of the e-graph's depth.
//!
//! `egg::Extractor` sweeps every e-class, in the e-graph's (hash) order, until a sweep
//! changes no cost. A class gets its cost only once its children have theirs, so a chain
//! of `n` temporaries, met in an order unrelated to the chain, needs about `n` sweeps of
//! every class: `optimize` of a 5,000-Einsum chain spent 37 s there. Re-evaluating a class
//! whose children did not change since its last evaluation cannot change it, so this
//! extractor runs the same sweeps but visits, in sweep order, only the classes a child's
//! change made stale: the sequence of cost updates, and so every cost and chosen e-node,
//! is exactly egg's (ties included), at the price of the updates alone.

use super::lang::{Ein, EinGraph};
use egg::{CostFunction, Id, Language, RecExpr};
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

/// The cheapest e-node of every e-class under a cost function.
pub struct Extractor<'a, CF: CostFunction<Ein>> {
    egraph: &'a EinGraph,
    /// Per class (by position in the sweep order): its cost and e-node once it has one.
    best: Vec<Option<(CF::Cost, Ein)>>,
    /// Position of each canonical class in the sweep order.
    position: HashMap<Id, usize>,
}

impl<'a, CF: CostFunction<Ein>> Extractor<'a, CF> {
    pub fn new(egraph: &'a EinGraph, mut cost_function: CF) -> Self {
        // egg's sweep order: the e-graph's class iteration order.
        let order: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        let position: HashMap<Id, usize> =
            order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let slot = |id: Id| position.get(&egraph.find(id)).copied();
        // The classes whose e-nodes read each class.
        let mut parents: Vec<Vec<usize>> = vec![Vec::new(); order.len()];
        for (i, &id) in order.iter().enumerate() {
            for node in &egraph[id].nodes {
                for &child in node.children() {
                    if let Some(c) = slot(child) {
                        if parents[c].last() != Some(&i) {
                            parents[c].push(i);
                        }
                    }
                }
            }
        }
        let mut best: Vec<Option<(CF::Cost, Ein)>> = vec![None; order.len()];
        // The first sweep visits every class; later ones only the stale.
        let mut this_sweep: BTreeSet<usize> = (0..order.len()).collect();
        let mut next_sweep: BTreeSet<usize> = BTreeSet::new();
        loop {
            while let Some(i) = this_sweep.pop_first() {
                let pass = cheapest_node(egraph, &best, &slot, &mut cost_function, order[i]);
                let improved = match (&best[i], &pass) {
                    (None, Some(_)) => true,
                    (Some(old), Some(new)) => new.0 < old.0,
                    _ => false,
                };
                if improved {
                    best[i] = pass;
                    // Readers later in this sweep see the new cost in this sweep, as in
                    // egg; earlier ones (and the class itself) in the next.
                    for &p in &parents[i] {
                        if p > i {
                            this_sweep.insert(p);
                        } else {
                            next_sweep.insert(p);
                        }
                    }
                }
            }
            if next_sweep.is_empty() {
                break;
            }
            std::mem::swap(&mut this_sweep, &mut next_sweep);
        }
        Extractor {
            egraph,
            best,
            position,
        }
    }

    fn entry(&self, eclass: Id) -> Option<&(CF::Cost, Ein)> {
        let i = *self.position.get(&self.egraph.find(eclass))?;
        self.best.get(i)?.as_ref()
    }

    /// The cheapest e-node of `eclass`. Panics, as egg's does, on a class without a cost
    /// (one whose every e-node reads itself): the e-graphs built here have none.
    pub fn find_best_node(&self, eclass: Id) -> &Ein {
        match self.entry(eclass) {
            Some((_, node)) => node,
            None => panic!("e-class {eclass} has no finite-cost term"),
        }
    }

    /// The cheapest term of `eclass` and its cost.
    pub fn find_best(&self, eclass: Id) -> (CF::Cost, RecExpr<Ein>) {
        match self.entry(eclass) {
            Some((cost, node)) => (
                cost.clone(),
                node.build_recexpr(|id| self.find_best_node(id).clone()),
            ),
            None => panic!("e-class {eclass} has no finite-cost term"),
        }
    }
}

/// egg's `make_pass`: the first e-node of least cost among those whose children all have
/// a cost (`None` sorts last), with its cost.
fn cheapest_node<CF: CostFunction<Ein>>(
    egraph: &EinGraph,
    best: &[Option<(CF::Cost, Ein)>],
    slot: &dyn Fn(Id) -> Option<usize>,
    cost_function: &mut CF,
    class: Id,
) -> Option<(CF::Cost, Ein)> {
    let cost_of = |id: Id| {
        slot(id)
            .and_then(|i| best[i].as_ref())
            .map(|(c, _)| c.clone())
    };
    let mut chosen: Option<(Option<CF::Cost>, &Ein)> = None;
    for node in &egraph[class].nodes {
        let cost = if node.all(|c| cost_of(c).is_some()) {
            Some(cost_function.cost(node, |c| {
                // Every child has a cost (checked just above).
                cost_of(c).unwrap_or_else(|| unreachable!("child without a cost"))
            }))
        } else {
            None
        };
        let better = match &chosen {
            None => true,
            Some((current, _)) => compare(&cost, current) == Ordering::Less,
        };
        if better {
            chosen = Some((cost, node));
        }
    }
    let (cost, node) = chosen?;
    cost.map(|c| (c, node.clone()))
}

/// egg's order on optional costs: `None` is the largest; incomparable costs (NaN) are
/// equal here where egg would panic.
fn compare<T: PartialOrd>(a: &Option<T>, b: &Option<T>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::algebra::{self, FlopCost};
    use crate::rewrite::tree::TreeForm;
    use std::collections::HashSet;

    /// The saturated e-graph `optimize` extracts from, for every example.
    fn saturated_examples() -> Vec<(String, einattn_ir::Cascade, EinGraph)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .expect("examples")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ein"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(&p).expect("readable");
                let cascade = einattn_dsl::compile_source(&name, &text, &[]).expect("compiles");
                let form = TreeForm::build(&cascade);
                let (egraph, _) = form.egraph(false);
                let runner = egg::Runner::default()
                    .with_egraph(egraph)
                    .with_iter_limit(12)
                    .with_node_limit(6000)
                    .run(&algebra::rules());
                (name, cascade, runner.egraph)
            })
            .collect()
    }

    fn same_choices<CF: CostFunction<Ein>>(name: &str, egraph: &EinGraph, cost: impl Fn() -> CF)
    where
        CF::Cost: std::fmt::Debug + PartialEq,
    {
        let theirs = egg::Extractor::new(egraph, cost());
        let ours = Extractor::new(egraph, cost());
        for class in egraph.classes() {
            assert_eq!(
                ours.find_best_node(class.id),
                theirs.find_best_node(class.id),
                "{name}: class {}",
                class.id
            );
            assert_eq!(
                ours.find_best(class.id).0,
                theirs.find_best_cost(class.id),
                "{name}: class {}",
                class.id
            );
        }
    }

    #[test]
    fn chooses_what_egg_chooses_on_every_example() {
        for (name, cascade, egraph) in saturated_examples() {
            same_choices(&name, &egraph, || egg::AstSize);
            same_choices(&name, &egraph, || egg::AstDepth);
            let trusted = algebra::exp_arguments(&egraph);
            let original: HashSet<Ein> = egraph
                .classes()
                .flat_map(|c| c.nodes.iter().cloned())
                .collect();
            same_choices(&name, &egraph, || {
                FlopCost::new(&egraph, &cascade, &trusted, &original, &[])
            });
        }
    }
}
