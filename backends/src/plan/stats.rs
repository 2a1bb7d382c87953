//! How the GPU lowering runs the statistics steps of Ring Attention and TokenRing: the
//! launches of an `lse_merge` step and the position offset of a `partial` kernel. Pure
//! functions over the plan, shared by validation, the GPU executor and the CPU simulation
//! of lowered plans, so all three read a plan the same way.

use super::{KernelStep, MergeKind, MergeStat, Region};
use crate::abi::LaunchContract;

/// One launch of the merge kernel (`einattn_lse_merge`): `count` elements at `offset` of
/// both regions, merged by `kind`; a rescaled sum reads its max at `max_offset`, one value
/// per `width` elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeLaunch {
    pub stat: String,
    pub kind: MergeKind,
    pub offset: u64,
    pub count: u64,
    pub max_offset: Option<u64>,
    pub width: u64,
}

/// The launches of an `lse_merge` of `from` into `into`, in the order they must run:
/// rescaled sums and sums first (they read the maxes before the maxes merge), extrema
/// last. A rescaled sum's max must index its leading dims (`max_dims` = `0..k`, the max's
/// shape the stat's first `k` extents); every stat must lie inside both regions.
pub fn merge_launches(
    into: &Region,
    from: &Region,
    stats: &[MergeStat],
) -> Result<Vec<MergeLaunch>, String> {
    let mut first = Vec::new();
    let mut last = Vec::new();
    for s in stats {
        let count = s
            .shape
            .iter()
            .try_fold(1u64, |a, &b| a.checked_mul(b))
            .ok_or_else(|| format!("statistic `{}` is too large", s.name))?;
        let end = s.offset.checked_add(count);
        if end.is_none_or(|e| e > into.count || e > from.count) {
            return Err(format!(
                "statistic `{}` ([{}, +{count})) reaches outside the merged regions",
                s.name, s.offset
            ));
        }
        let (max_offset, width) = match s.kind {
            MergeKind::RescaledSum => {
                let name = s.max_stat.as_deref().unwrap_or("");
                let m = stats
                    .iter()
                    .find(|x| x.name == name && x.kind == MergeKind::Max)
                    .ok_or_else(|| {
                        format!(
                            "`{}` rescales by `{name}`, which is no max of the merge",
                            s.name
                        )
                    })?;
                let k = s.max_dims.len();
                let leading = s.max_dims.iter().enumerate().all(|(i, &d)| i == d);
                if !leading || k > s.shape.len() || m.shape != s.shape[..k] {
                    return Err(format!(
                        "`{}` {:?} reads its max `{name}` {:?} through dims {:?}; the merge \
                         kernel reads it through leading dims",
                        s.name, s.shape, m.shape, s.max_dims
                    ));
                }
                (Some(m.offset), s.shape[k..].iter().product::<u64>().max(1))
            }
            _ => (None, 1),
        };
        let launch = MergeLaunch {
            stat: s.name.clone(),
            kind: s.kind,
            offset: s.offset,
            count,
            max_offset,
            width,
        };
        match s.kind {
            MergeKind::Max | MergeKind::Min => last.push(launch),
            MergeKind::Sum | MergeKind::RescaledSum => first.push(launch),
        }
    }
    first.extend(last);
    Ok(first)
}

/// The query offset a `partial` kernel runs at: its queries' start relative to its key
/// block's (masks and position scores see `p + offset` against `m`). A block of keys that
/// starts after its queries would need a negative offset: allowed only when the kernel's
/// contract says positions do not matter to it (no masks, no position in the score).
pub fn partial_offset(step: &KernelStep, contract: &LaunchContract) -> Result<u64, String> {
    let [keys] = step.keys.as_slice() else {
        return Err(format!(
            "{}: a partial kernel runs over one key block, not {}",
            step.kernel,
            step.keys.len()
        ));
    };
    if let Some(d) = step.queries.start.checked_sub(keys.start) {
        return Ok(d);
    }
    let positions = contract
        .family
        .get("positions")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    if positions {
        return Err(format!(
            "{}: keys [{}, +{}) start after queries [{}, +{}) and `{}` depends on positions",
            step.kernel,
            keys.start,
            keys.len,
            step.queries.start,
            step.queries.len,
            contract.kernel
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(name: &str, kind: MergeKind, offset: u64, shape: &[u64]) -> MergeStat {
        MergeStat {
            name: name.into(),
            kind,
            offset,
            shape: shape.to_vec(),
            max_stat: (kind == MergeKind::RescaledSum).then(|| "RM".to_string()),
            max_dims: if kind == MergeKind::RescaledSum {
                vec![0, 1, 2]
            } else {
                vec![]
            },
        }
    }

    fn region(count: u64) -> Region {
        Region {
            buffer: "b".into(),
            offset: 0,
            count,
        }
    }

    #[test]
    fn sums_merge_before_their_max() {
        let stats = vec![
            stat("RM", MergeKind::Max, 0, &[1, 2, 8]),
            stat("RD", MergeKind::RescaledSum, 16, &[1, 2, 8]),
            stat("RNV", MergeKind::RescaledSum, 32, &[1, 2, 8, 4]),
        ];
        let l = merge_launches(&region(96), &region(96), &stats).expect("lowers");
        let order: Vec<&str> = l.iter().map(|x| x.stat.as_str()).collect();
        assert_eq!(order, ["RD", "RNV", "RM"]);
        assert_eq!((l[1].width, l[1].max_offset, l[1].count), (4, Some(0), 64));
        assert_eq!((l[0].width, l[0].count), (1, 16));
        // Past the region, through other dims, or by an unknown max: refused.
        assert!(merge_launches(&region(95), &region(96), &stats).is_err());
        let mut odd = stats.clone();
        odd[2].max_dims = vec![0, 1, 3];
        assert!(merge_launches(&region(96), &region(96), &odd).is_err());
        let mut unknown = stats;
        unknown[1].max_stat = Some("RX".into());
        assert!(merge_launches(&region(96), &region(96), &unknown).is_err());
    }
}
