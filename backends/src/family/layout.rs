//! Where a kernel tensor lives in the cascade's storage: the strides of its batch,
//! sequence and head ranks. Storage order is the declared rank order, row-major.

use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, Rank, Tensor};
use serde::Serialize;

/// Where a kernel tensor lives in the cascade's storage order: element strides of its batch,
/// sequence and head ranks (0 for a rank the tensor does not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    #[serde(skip)]
    pub tensor: Handle<Tensor>,
    pub stride_batch: u64,
    pub stride_seq: u64,
    pub stride_head: u64,
    /// Elements in the whole tensor.
    pub elements: u64,
}

impl Layout {
    /// The row-major storage of `t` seen through its batch, sequence and head ranks
    /// (stride 0 for a rank the tensor lacks).
    pub fn of(
        c: &Cascade,
        t: Handle<Tensor>,
        batch: Option<Handle<Rank>>,
        seq: Option<Handle<Rank>>,
        head: Option<Handle<Rank>>,
    ) -> Layout {
        let tensor = &c.tensors[t];
        let mut stride = 1u64;
        let mut strides = vec![0u64; tensor.ranks.len()];
        for (d, &r) in tensor.ranks.iter().enumerate().rev() {
            strides[d] = stride;
            stride *= c.ranks[r].extent;
        }
        let stride_of = |r: Option<Handle<Rank>>| {
            r.and_then(|r| tensor.ranks.iter().position(|&x| x == r))
                .map_or(0, |d| strides[d])
        };
        Layout {
            tensor: t,
            stride_batch: stride_of(batch),
            stride_seq: stride_of(seq),
            stride_head: stride_of(head),
            elements: stride,
        }
    }

    /// Element offset of the row at (batch `b`, position `n`, head `h`).
    pub fn offset(&self, b: usize, n: usize, h: usize) -> usize {
        b * self.stride_batch as usize
            + n * self.stride_seq as usize
            + h * self.stride_head as usize
    }

    /// `data`, this tensor's storage, as a host tensor with these strides.
    pub fn host(&self, data: Vec<f64>) -> crate::tile::interp::HostTensor {
        crate::tile::interp::HostTensor {
            data,
            stride_b: self.stride_batch as usize,
            stride_n: self.stride_seq as usize,
            stride_h: self.stride_head as usize,
        }
    }

    /// A contiguous `[batch, n, heads, cols]` array laid out as this tensor's storage.
    pub fn from_bnhd(
        &self,
        bnhd: &[f64],
        batch: usize,
        n: usize,
        heads: usize,
        cols: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0; self.elements as usize];
        for b in 0..batch {
            for t in 0..n {
                for h in 0..heads {
                    let src = ((b * n + t) * heads + h) * cols;
                    let dst = self.offset(b, t, h);
                    out[dst..dst + cols].copy_from_slice(&bnhd[src..src + cols]);
                }
            }
        }
        out
    }
}

impl Layout {
    /// The strides as the launch contract records them.
    pub fn strides(&self) -> crate::abi::Strides {
        crate::abi::Strides {
            batch: self.stride_batch,
            seq: self.stride_seq,
            head: self.stride_head,
        }
    }
}
