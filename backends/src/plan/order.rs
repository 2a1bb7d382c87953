//! The order the executor runs the steps of the ranks it drives: each rank's local steps
//! as far as they go, a collective once every driven rank has reached it, and sends and
//! receives in groups where every send meets its peer's receive.

use super::Step;

/// One unit of the executor's order: a local step of one driven rank (index, step), a
/// collective every driven rank reaches together, or a group of matched sends and
/// receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    Local(usize, usize),
    Collective(Vec<(usize, usize)>),
    PointToPoint(Vec<(usize, usize)>),
}

/// The order the executor runs the steps of the driven ranks (`ranks[i]` is the rank of
/// `steps[i]`) in: each rank's local steps as far as they go; a collective once every
/// driven rank has reached one; sends and receives in groups where every send meets its
/// peer's receive (all of them at once when one process drives a single rank, as NCCL
/// matches them across processes). A plan whose ranks cannot all progress is refused.
pub fn order(steps: &[&[Step]], ranks: &[usize]) -> Result<Vec<Batch>, String> {
    let n = steps.len();
    let mut pc = vec![0usize; n];
    let mut out = Vec::new();
    let blocking = |s: &Step| s.is_collective() || matches!(s, Step::SendRecv { .. });
    loop {
        for i in 0..n {
            while let Some(step) = steps[i].get(pc[i]).filter(|s| !blocking(s)) {
                let _ = step;
                out.push(Batch::Local(i, pc[i]));
                pc[i] += 1;
            }
        }
        let at: Vec<Option<&Step>> = (0..n).map(|i| steps[i].get(pc[i])).collect();
        if at.iter().all(Option::is_none) {
            return Ok(out);
        }
        if at.iter().all(|s| s.is_some_and(Step::is_collective)) {
            out.push(Batch::Collective((0..n).map(|i| (i, pc[i])).collect()));
            pc.iter_mut().for_each(|p| *p += 1);
            continue;
        }
        // Pending point-to-point steps: (driven index, peer it sends to, peer it receives from).
        let pending: Vec<(usize, Option<usize>, Option<usize>)> = (0..n)
            .filter_map(|i| match at[i] {
                Some(Step::SendRecv { send, recv, .. }) => Some((
                    i,
                    send.as_ref().map(|s| s.peer as usize),
                    recv.as_ref().map(|r| r.peer as usize),
                )),
                _ => None,
            })
            .collect();
        let index_of = |rank: usize| ranks.iter().position(|&r| r == rank);
        let ready: Vec<usize> = if n == 1 {
            pending.iter().map(|p| p.0).collect()
        } else {
            pending
                .iter()
                .filter(|&&(i, to, from)| {
                    let meets = |peer: usize, sending: bool| {
                        index_of(peer).is_some_and(|j| {
                            pending.iter().any(|&(k, t, f)| {
                                k == j
                                    && if sending {
                                        f == Some(ranks[i])
                                    } else {
                                        t == Some(ranks[i])
                                    }
                            })
                        })
                    };
                    to.is_none_or(|p| meets(p, true)) && from.is_none_or(|p| meets(p, false))
                })
                .map(|p| p.0)
                .collect()
        };
        if ready.is_empty() {
            let where_: Vec<String> = (0..n)
                .map(|i| format!("rank {} at step {}", ranks[i], pc[i]))
                .collect();
            return Err(format!("the ranks cannot progress: {}", where_.join(", ")));
        }
        out.push(Batch::PointToPoint(
            ready.iter().map(|&i| (i, pc[i])).collect(),
        ));
        for i in ready {
            pc[i] += 1;
        }
    }
}
