//! One GPU standing in for the ranks of a group: every rank's buffers live on the same
//! device and collectives are device copies in rank order, so a plan for P GPUs runs (and
//! is checked) on a machine with one. Same interface as [`crate::NcclGroup`].

use crate::nccl::{GatherPart, P2pPart};
use crate::{Gpu, Result, RuntimeError};

/// `size` ranks on one GPU.
pub struct StandInGroup {
    size: usize,
}

impl StandInGroup {
    pub fn new(size: usize) -> StandInGroup {
        StandInGroup { size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// All-gather over element ranges, one part per rank in rank order: rank `r`'s `count`
    /// elements land at `recv_offset + r * count` in every rank's `recv`.
    pub fn all_gather_regions<T: crate::Element>(
        &self,
        gpu: &Gpu,
        parts: Vec<GatherPart<'_, T>>,
        count: usize,
    ) -> Result<()> {
        if parts.len() != self.size {
            return Err(RuntimeError::InvalidArgument(
                "one all-gather part per rank".into(),
            ));
        }
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for (send, send_offset, recv, recv_offset) in parts {
            sends.push((send, send_offset));
            recvs.push((recv, recv_offset));
        }
        for (recv, recv_offset) in recvs {
            for (r, (send, send_offset)) in sends.iter().enumerate() {
                gpu.copy_within(
                    send,
                    *send_offset..*send_offset + count,
                    recv,
                    recv_offset + r * count,
                )?;
            }
        }
        Ok(())
    }

    /// Sends and receives of ranks (`(rank, part)`): the `k`-th block a rank receives from
    /// a peer is the `k`-th block that peer sends to it.
    pub fn send_recv<T: crate::Element>(
        &self,
        gpu: &Gpu,
        parts: Vec<(usize, P2pPart<'_, T>)>,
    ) -> Result<()> {
        // (from, to, buffer, offset, count) of every send, in order.
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for (rank, part) in parts {
            if rank >= self.size {
                return Err(RuntimeError::InvalidArgument(format!("no rank {rank}")));
            }
            if let Some((buf, blocks)) = part.send {
                for (offset, count, peer) in blocks {
                    sends.push((rank, peer, buf, offset, count));
                }
            }
            if let Some((buf, blocks)) = part.recv {
                recvs.push((rank, buf, blocks));
            }
        }
        let mut used = vec![false; sends.len()];
        for (rank, buf, blocks) in recvs {
            for (offset, count, peer) in blocks {
                let k = (0..sends.len())
                    .find(|&k| !used[k] && sends[k].0 == peer && sends[k].1 == rank)
                    .ok_or_else(|| {
                        RuntimeError::InvalidArgument(format!(
                            "rank {rank} receives from rank {peer}, which sends it nothing"
                        ))
                    })?;
                used[k] = true;
                let (_, _, src, src_offset, src_count) = sends[k];
                if src_count != count {
                    return Err(RuntimeError::InvalidArgument(format!(
                        "rank {peer} sends {src_count} elements, rank {rank} receives {count}"
                    )));
                }
                gpu.copy_within(src, src_offset..src_offset + count, buf, offset)?;
            }
        }
        if used.iter().any(|u| !u) {
            return Err(RuntimeError::InvalidArgument(
                "a send that no rank receives".into(),
            ));
        }
        Ok(())
    }
}
