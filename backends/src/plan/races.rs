//! Whether a plan's streams and events order every pair of steps that touch the same
//! memory: the condition under which an executor may run each stream of a rank on its own
//! device stream (transfers overlapping compute) and still compute what plan order
//! computes. Within a rank, step `a` happens before step `b` when both are on one stream
//! and `a` comes first, or `b` waits for an event that `a` (or a step after `a` on its
//! stream) records, transitively. Two steps race when they are on different streams,
//! their regions overlap, one of them writes, and neither happens before the other.

use super::{ArgRole, Plan, RankPlan, Region, Step};
use std::collections::HashMap;

/// What a step reads and writes.
fn accesses(step: &Step) -> (Vec<&Region>, Vec<&Region>) {
    match step {
        Step::Kernel(k) => {
            let (mut r, mut w) = (Vec::new(), Vec::new());
            for a in &k.args {
                match a.role {
                    ArgRole::Input | ArgRole::Param | ArgRole::StateIn | ArgRole::StatsIn => {
                        r.push(&a.region)
                    }
                    ArgRole::Output | ArgRole::StateOut | ArgRole::DecayOut | ArgRole::StatsOut => {
                        w.push(&a.region)
                    }
                }
            }
            (r, w)
        }
        Step::AllGather { send, recv, .. }
        | Step::AllToAll { send, recv, .. }
        | Step::AllReduce { send, recv, .. }
        | Step::ReduceScatter { send, recv, .. }
        | Step::Rearrange {
            src: send,
            dst: recv,
            ..
        }
        | Step::Place {
            src: send,
            dst: recv,
            ..
        } => (vec![send], vec![recv]),
        Step::SendRecv { send, recv, .. } => (
            send.iter().map(|s| &s.region).collect(),
            recv.iter().map(|s| &s.region).collect(),
        ),
        Step::PrefixCombine {
            slots, init, out, ..
        } => {
            let mut r = vec![slots];
            r.extend(init.iter());
            (r, vec![out])
        }
        Step::LseMerge { into, from, .. } => (vec![into, from], vec![into]),
    }
}

fn overlap(a: &Region, b: &Region) -> bool {
    a.buffer == b.buffer
        && a.offset < b.offset.saturating_add(b.count)
        && b.offset < a.offset.saturating_add(a.count)
}

/// For every step of `rank`, the steps that happen before it (as a bit set), or why the
/// events cannot be read (a wait on an event no earlier step records).
fn happens_before(rank: &RankPlan) -> Result<Vec<Vec<u64>>, String> {
    let n = rank.steps.len();
    let words = n.div_ceil(64);
    let mut before: Vec<Vec<u64>> = Vec::with_capacity(n);
    let mut last_on: HashMap<&str, usize> = HashMap::new();
    let mut recorded: HashMap<&str, usize> = HashMap::new();
    for (j, step) in rank.steps.iter().enumerate() {
        let exec = step.exec();
        let mut set = vec![0u64; words];
        let join = |i: usize, set: &mut Vec<u64>| {
            set[i / 64] |= 1 << (i % 64);
            for (w, x) in set.iter_mut().zip(&before[i]) {
                *w |= x;
            }
        };
        if let Some(&i) = last_on.get(exec.stream.as_str()) {
            join(i, &mut set);
        }
        for e in &exec.wait {
            let &i = recorded.get(e.as_str()).ok_or_else(|| {
                format!(
                    "rank {}: step {j} waits for event `{e}`, which no earlier step records",
                    rank.rank
                )
            })?;
            join(i, &mut set);
        }
        before.push(set);
        last_on.insert(exec.stream.as_str(), j);
        if let Some(e) = &exec.record {
            recorded.insert(e.as_str(), j);
        }
    }
    Ok(before)
}

/// Checks that the streams and events of every rank order each pair of steps that touch
/// overlapping memory where one writes; the first unordered pair is the error.
pub fn check_races(plan: &Plan) -> Result<(), String> {
    for rank in &plan.ranks {
        let before = happens_before(rank)?;
        let acc: Vec<_> = rank.steps.iter().map(accesses).collect();
        for j in 0..rank.steps.len() {
            for i in 0..j {
                if before[j][i / 64] & (1 << (i % 64)) != 0 {
                    continue;
                }
                let (ri, wi) = &acc[i];
                let (rj, wj) = &acc[j];
                let clash = wi
                    .iter()
                    .find_map(|a| rj.iter().chain(wj).find(|b| overlap(a, b)).map(|b| (a, b)));
                let clash = clash.or_else(|| {
                    wj.iter()
                        .find_map(|b| ri.iter().find(|a| overlap(a, b)).map(|a| (a, b)))
                });
                if let Some((a, _)) = clash {
                    let name = |k: usize| {
                        let s = &rank.steps[k];
                        format!("step {k} ({} on `{}`)", s.op_name(), s.exec().stream)
                    };
                    return Err(format!(
                        "rank {}: {} and {} both touch `{}` with no event ordering them",
                        rank.rank,
                        name(i),
                        name(j),
                        a.buffer
                    ));
                }
            }
        }
    }
    Ok(())
}
