//! Passes over a rank (FuseMax; docs/algorithms.md section 3), made precise.
//!
//! Fix a leaf rank `r`. An Einsum *iterates* `r` when `r` is in its iteration space. Walking
//! the Einsums in dependency order, every tensor gets two facts:
//!
//! - `pass`: the pass over `r` in which (the last of) it is produced; user inputs are pass 1;
//! - `ready`: the first pass over `r` in which an Einsum iterating `r` may read it point by
//!   point. For a tensor produced by an Einsum iterating `r` this is decided per access (a
//!   *full dependency* needs the whole fiber, so it is ready only in the next pass); for one
//!   produced outside `r` it is carried through: `max(input pass + 1 if full, else pass)`.
//!
//! An access of tensor `T` produced by `P` is a *full dependency* when `P` iterates `r` and
//! either `T` has no `r` dimension (`P` reduced `r` away) or the access indexes `T`'s `r`
//! dimension without mentioning `r` (reading the final state `RNV[M1, p, f]`); when `P` does
//! not iterate `r` it is full iff `T` inherits a full dependency. An Einsum iterating `r`
//! runs in pass `max(1, max over inputs of (producer pass + 1 if full, else producer pass))`.
//! Einsums that do not iterate `r` start no pass. A recurrence reading its own state at the
//! current step is not a dependency. The passes over `r` are the largest pass of an Einsum
//! iterating `r`.
//!
//! This matches the (pass, after_full) formulation with one refinement: for an Einsum
//! outside `r` that mixes a full input from pass 1 with a plain input from pass 2, the
//! (pass, after_full) pair would say "pass 2, full" and push its consumers to pass 3, while
//! `ready` = `max(1 + 1, 2)` = 2 is what they actually need.

use super::normalize::{LeafAccess, LeafCascade};
use einattn_ir::{Einsum, Handle, Rank, TensorKind};
use std::rc::Rc;

/// Why a tensor carries a full dependency: the full dependency itself, or an Einsum that
/// reads a tensor that carries one. Kept as a shared chain and rendered on use, so a chain
/// of `n` Einsums costs `n` links, not `n` sentences each as long as the chain.
#[derive(Debug)]
enum Why {
    Source(String),
    Via { einsum: String, from: Rc<Why> },
}

/// Links rendered in full; longer chains keep both ends and count the middle.
const WHY_LINKS_SHOWN: usize = 16;

impl Why {
    /// "E2, which depends on E1, which depends on GM, a max over all of m".
    fn render(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        let mut cur = self;
        let source = loop {
            match cur {
                Why::Source(s) => break s.as_str(),
                Why::Via { einsum, from } => {
                    names.push(einsum);
                    cur = from;
                }
            }
        };
        let mut out = String::new();
        let mut push = |name: &str| {
            out.push_str(name);
            out.push_str(", which depends on ");
        };
        if names.len() <= WHY_LINKS_SHOWN {
            names.iter().for_each(|n| push(n));
        } else {
            let half = WHY_LINKS_SHOWN / 2;
            names[..half].iter().for_each(|n| push(n));
            push(&format!(
                "... ({} more Einsums) ...",
                names.len() - 2 * half
            ));
            names[names.len() - half..].iter().for_each(|n| push(n));
        }
        out.push_str(source);
        out
    }
}

/// The pass structure over one leaf rank.
#[derive(Clone, Debug)]
pub(crate) struct RankPasses {
    pub rank: Handle<Rank>,
    /// The largest pass of an Einsum iterating the rank (1 when only inputs are read).
    pub passes: u32,
    /// Per Einsum (by handle index): its pass if it iterates the rank.
    pub einsum_pass: Vec<Option<u32>>,
    /// Per Einsum: why it was pushed into a later pass, if it was.
    pub einsum_cause: Vec<Option<String>>,
    /// Per tensor: the pass in which it is produced (inputs: 1).
    pub tensor_pass: Vec<u32>,
    /// Per tensor: whether it carries a full dependency on the rank (for tensors produced
    /// outside the rank) or is a reduction over it.
    pub tensor_after_full: Vec<bool>,
    /// One sentence per new pass: "pass 2 over m starts at SN: it needs GM, a max over all of m".
    pub reasons: Vec<String>,
}

/// How one access depends on the rank.
struct Dependency {
    /// The pass in which the producer makes the tensor.
    pass: u32,
    /// The pass in which the consumer may read the access point by point.
    ready: u32,
    full: bool,
    /// Words for a full dependency, reused in the consumer's cause and downstream.
    why: Option<Rc<Why>>,
}

pub(crate) fn count_passes(lc: &LeafCascade, rank: Handle<Rank>, report_name: &str) -> RankPasses {
    let n_tensors = lc.cascade.tensors.len();
    let n_einsums = lc.einsums.len();
    let mut tensor_pass = vec![1u32; n_tensors];
    let mut tensor_ready = vec![1u32; n_tensors];
    let mut tensor_after_full = vec![false; n_tensors];
    let mut tensor_why: Vec<Option<Rc<Why>>> = vec![None; n_tensors];
    let mut einsum_pass = vec![None; n_einsums];
    let mut einsum_cause = vec![None; n_einsums];
    let mut reasons = Vec::new();
    let mut passes_so_far = 1u32;
    // Per pass that holds a recurrence over the rank: whether it runs the rank downward.
    // One traversal runs one way, so a recurrence the other way starts a new pass.
    let mut direction: Vec<(u32, bool)> = Vec::new();
    let rank_name = lc.rank_name(rank);
    let display = |s: &str| describe_rank(rank_name, report_name, s);

    for &h in &lc.order {
        let e = lc.einsum(h);
        let deps: Vec<Dependency> = e
            .accesses
            .iter()
            .filter(|a| !a.self_read)
            .map(|a| {
                dependency(
                    lc,
                    rank,
                    a,
                    &tensor_pass,
                    &tensor_ready,
                    &tensor_after_full,
                    &tensor_why,
                    &display,
                )
            })
            .collect();
        let out = e.output_tensor.index();
        let max_pass_in = deps.iter().map(|d| d.pass).max().unwrap_or(1);
        let mut ready = deps.iter().map(|d| d.ready).max().unwrap_or(1).max(1);
        let mut turned = false;
        let down = e.steps.filter(|&(r, _)| r == rank).map(|(_, down)| down);
        if let Some(down) = down {
            while direction.iter().any(|&(p, d)| p == ready && d != down) {
                ready += 1;
                turned = true;
            }
            if !direction.contains(&(ready, down)) {
                direction.push((ready, down));
            }
        }
        if e.iterates(rank) {
            einsum_pass[h.index()] = Some(ready);
            tensor_pass[out] = ready;
            tensor_ready[out] = ready;
            tensor_after_full[out] = e.reduces(rank);
            tensor_why[out] = None;
            // The dependency that set the pass, when a full one did.
            let cause = deps
                .iter()
                .filter(|d| d.full && d.ready == ready && ready > 1)
                .find_map(|d| d.why.as_ref().map(|w| w.render()));
            let cause = cause.or_else(|| {
                turned.then(|| {
                    format!(
                        "a traversal of {report_name} {}, opposite to the recurrence before it",
                        if down == Some(true) {
                            "downward"
                        } else {
                            "upward"
                        }
                    )
                })
            });
            if let Some(why) = &cause {
                if ready > passes_so_far {
                    reasons.push(format!(
                        "pass {ready} over {report_name} starts at {}: it needs {why}",
                        e.name
                    ));
                }
                einsum_cause[h.index()] = Some(format!("it needs {why}"));
            }
            passes_so_far = passes_so_far.max(ready);
        } else {
            tensor_pass[out] = max_pass_in.max(1);
            tensor_ready[out] = ready;
            let full = deps.iter().any(|d| d.full);
            tensor_after_full[out] = full;
            tensor_why[out] = deps
                .iter()
                .filter(|d| d.full && d.ready == ready)
                .find_map(|d| d.why.clone())
                .map(|from| {
                    Rc::new(Why::Via {
                        einsum: e.name.clone(),
                        from,
                    })
                });
        }
    }

    let passes = einsum_pass.iter().flatten().copied().max().unwrap_or(1);
    RankPasses {
        rank,
        passes,
        einsum_pass,
        einsum_cause,
        tensor_pass,
        tensor_after_full,
        reasons,
    }
}

/// "all of m" for the outer child reported under the parent, "all of m0" otherwise.
fn describe_rank(rank_name: &str, report_name: &str, what: &str) -> String {
    if rank_name == report_name {
        format!("{what} {rank_name}")
    } else {
        format!("{what} {report_name} (outer rank {rank_name})")
    }
}

#[allow(clippy::too_many_arguments)]
fn dependency(
    lc: &LeafCascade,
    rank: Handle<Rank>,
    access: &LeafAccess,
    tensor_pass: &[u32],
    tensor_ready: &[u32],
    tensor_after_full: &[bool],
    tensor_why: &[Option<Rc<Why>>],
    display: &dyn Fn(&str) -> String,
) -> Dependency {
    let t = access.tensor;
    let producer: Option<Handle<Einsum>> = lc.producer[t.index()];
    let is_user_data = matches!(
        lc.cascade.tensors[t].kind,
        TensorKind::Input | TensorKind::Param
    );
    let Some(p) = producer.filter(|_| !is_user_data) else {
        return Dependency {
            pass: 1,
            ready: 1,
            full: false,
            why: None,
        };
    };
    let pe = lc.einsum(p);
    let name = lc.tensor_name(t);
    if pe.iterates(rank) {
        let pass = tensor_pass[t.index()];
        if !lc.tensor_has_rank(t, rank) {
            let op = pe
                .reduction_op(rank)
                .map(|op| op.name().to_string())
                .unwrap_or_else(|| "reduction".to_string());
            return Dependency {
                pass,
                ready: pass + 1,
                full: true,
                why: Some(Rc::new(Why::Source(format!(
                    "{name}, a {op} over {}",
                    display("all of")
                )))),
            };
        }
        // The dimensions of T spanning the rank must be indexed by it, else the access
        // reads one fixed position, which exists only once the whole fiber has been seen.
        let dims = &lc.tensor_dims[t.index()];
        let fixed = dims
            .iter()
            .zip(&access.indices)
            .any(|(leaves, idx)| leaves.contains(&rank) && !idx.mentions(rank));
        if fixed {
            let what = if lc.iterative_leaf(t) == Some(rank) {
                "the final state"
            } else {
                "a fixed position"
            };
            return Dependency {
                pass,
                ready: pass + 1,
                full: true,
                why: Some(Rc::new(Why::Source(format!(
                    "{}, {what} of a traversal of {}",
                    lc.format_access(access),
                    display("all of")
                )))),
            };
        }
        Dependency {
            pass,
            ready: pass,
            full: false,
            why: None,
        }
    } else {
        Dependency {
            pass: tensor_pass[t.index()],
            ready: tensor_ready[t.index()].max(tensor_pass[t.index()]),
            full: tensor_after_full[t.index()],
            why: tensor_why[t.index()].clone(),
        }
    }
}
