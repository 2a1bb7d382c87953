//! What a kernel step of a lowered plan binds, by meaning: the sizes of its launch, the
//! region behind each pointer its contract asks for, and the local strides of each piece.
//! Pure, so the GPU executor (which turns regions into device addresses) and the CPU
//! simulation of lowered plans (which runs the kernels' Tile programs and the helpers'
//! loops) read a step the same way.

use super::{stats, ArgRole, KernelArg, KernelStep, Phase, Plan, Region};
use crate::abi::{Axis, BindError, LaunchContract, Source, Strides};

/// Where a pointer parameter of a step's kernel points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointer<'a> {
    /// The start of a region of the rank's buffers.
    Region(&'a Region),
    /// A tensor the kernel's phase does not touch (the chunk-state kernel's `Q` and `O`).
    Null,
    /// A scratch array the launcher owns (chunk states of a window).
    Scratch,
}

/// One launch of a kernel step's kernel.
#[derive(Debug, Clone)]
pub struct StepBinding<'a> {
    pub plan: &'a Plan,
    pub step: &'a KernelStep,
    pub contract: &'a LaunchContract,
    /// Sizes of this launch; the others are the contract's compiled sizes.
    pub sizes: Vec<(&'static str, u64)>,
}

fn err(message: String) -> BindError {
    BindError(message)
}

impl<'a> StepBinding<'a> {
    /// The binding of a `full`, `partial` or `epilogue` step (the one kernel it launches,
    /// `contract`): a full kernel over every key at the queries' global offset, a partial
    /// over its key block at the queries' offset relative to it, an epilogue over its
    /// queries.
    pub fn new(
        plan: &'a Plan,
        step: &'a KernelStep,
        contract: &'a LaunchContract,
    ) -> Result<Self, String> {
        let keys: u64 = step.keys.iter().map(|r| r.len).sum();
        let sizes = match step.phase {
            Phase::Full => {
                let n_k = contract.compiled_size("n_k").map_err(|e| e.0)?;
                if step.keys.first().map(|r| r.start) != Some(0) || keys != n_k {
                    return Err("a full kernel runs over every key (after the gather)".into());
                }
                let heads = match step.heads {
                    Some(h) => h.len,
                    None => contract.compiled_size("heads").map_err(|e| e.0)?,
                };
                vec![
                    ("n_q", step.queries.len),
                    ("n_k", keys),
                    ("q_offset", step.queries.start),
                    ("heads", heads),
                ]
            }
            Phase::Partial => vec![
                ("n_q", step.queries.len),
                ("n_k", keys),
                ("q_offset", stats::partial_offset(step, contract)?),
            ],
            Phase::Epilogue => vec![("n_q", step.queries.len)],
            other => return Err(format!("a `{other:?}` step binds its chunks itself")),
        };
        Ok(StepBinding {
            plan,
            step,
            contract,
            sizes,
        })
    }

    /// The argument standing for contract tensor `tensor`: an input, output or parameter,
    /// or the statistic a partial writes or an epilogue reads.
    pub fn arg(&self, tensor: &str) -> Option<&'a KernelArg> {
        let stats = match self.step.phase {
            Phase::Partial => Some(ArgRole::StatsOut),
            Phase::Epilogue => Some(ArgRole::StatsIn),
            _ => None,
        };
        self.step.args.iter().find(|a| {
            a.tensor == tensor
                && (matches!(a.role, ArgRole::Input | ArgRole::Output | ArgRole::Param)
                    || Some(a.role) == stats)
        })
    }

    /// Where a pointer parameter points.
    pub fn pointer(&self, source: &Source) -> Result<Pointer<'a>, BindError> {
        match source {
            Source::Tensor { tensor } => Ok(self
                .arg(tensor)
                .map_or(Pointer::Null, |a| Pointer::Region(&a.region))),
            // A partial's row outputs are its max and sum statistics.
            Source::Scratch { scratch } if self.step.phase == Phase::Partial => self
                .step
                .args
                .iter()
                .find(|a| &a.tensor == scratch && a.role == ArgRole::StatsOut)
                .map(|a| Pointer::Region(&a.region))
                .ok_or_else(|| err(format!("no statistic `{scratch}` to write"))),
            Source::Scratch { .. } => Ok(Pointer::Scratch),
            other => Err(err(format!("{other:?} is not a pointer"))),
        }
    }

    pub fn size(&self, name: &str) -> Result<u64, BindError> {
        match self.sizes.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => Ok(*v),
            None => self.contract.compiled_size(name),
        }
    }

    /// The element stride of `tensor`'s piece along `axis` (0 for a tensor the step does
    /// not bind).
    pub fn stride(&self, tensor: &str, axis: Axis) -> Result<u64, BindError> {
        let Some(a) = self.arg(tensor) else {
            return Ok(0);
        };
        let strides = self
            .contract
            .tensor(tensor)
            .and_then(|t| t.strides)
            .ok_or_else(|| err(format!("`{tensor}` has no strides in the contract")))?;
        let local = local_strides(strides, &self.whole_shape(tensor)?, &a.shape).map_err(err)?;
        Ok(match axis {
            Axis::Batch => local[0],
            Axis::Seq => local[1],
            Axis::Head => local[2],
        })
    }

    /// The whole shape `tensor`'s pieces come from: the plan's global tensor, or for a
    /// statistic (no global form) the contract's shape at the compiled sizes.
    fn whole_shape(&self, tensor: &str) -> Result<Vec<u64>, BindError> {
        self.plan
            .tensors
            .iter()
            .find(|t| t.name == tensor)
            .map(|t| t.shape.clone())
            .or_else(|| self.contract.tensor(tensor).map(|t| t.shape.clone()))
            .ok_or_else(|| err(format!("no tensor `{tensor}` in the plan or the contract")))
    }
}

/// Strides (batch, sequence, head) of a row-major piece of `local` shape of a tensor whose
/// whole is `global` and is stored like `strides`: each stride of the whole names the dim
/// it steps over (the product of the extents after it), and the piece's stride is the
/// same product over its own extents. (Where extents of 1 make two dims step alike, both
/// readings give the same stride.)
pub fn local_strides(strides: Strides, global: &[u64], local: &[u64]) -> Result<[u64; 3], String> {
    if global.len() != local.len() {
        return Err(format!(
            "plan: a piece of shape {local:?} of a tensor of shape {global:?}"
        ));
    }
    let after = |shape: &[u64], k: usize| shape[k + 1..].iter().product::<u64>();
    let mut out = [0u64; 3];
    for (o, s) in out
        .iter_mut()
        .zip([strides.batch, strides.seq, strides.head])
    {
        if s == 0 {
            continue;
        }
        let k = (0..global.len())
            .find(|&k| after(global, k) == s)
            .ok_or_else(|| format!("plan: stride {s} is not a dim of {global:?}"))?;
        *o = after(local, k);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_strides_follow_the_piece_shape() {
        let s = |batch, seq, head| Strides { batch, seq, head };
        // [B, N, H, d] = [2, 64, 4, 8]: a 16-token window shrinks the batch stride.
        let bnhd = s(64 * 32, 32, 8);
        assert_eq!(
            local_strides(bnhd, &[2, 64, 4, 8], &[2, 16, 4, 8]).ok(),
            Some([16 * 32, 32, 8])
        );
        // Half the heads (Ulysses): the sequence stride shrinks too.
        assert_eq!(
            local_strides(bnhd, &[2, 64, 4, 8], &[2, 64, 2, 8]).ok(),
            Some([64 * 16, 16, 8])
        );
        // [B, H, N, d]: batch and head are outside the sequence.
        let bhnd = s(4 * 64 * 8, 8, 64 * 8);
        assert_eq!(
            local_strides(bhnd, &[2, 4, 64, 8], &[2, 4, 16, 8]).ok(),
            Some([4 * 16 * 8, 8, 16 * 8])
        );
        assert!(local_strides(s(7, 1, 1), &[2, 3], &[2, 3]).is_err());
        assert!(local_strides(bnhd, &[2, 64, 4, 8], &[2, 64]).is_err());
    }
}
