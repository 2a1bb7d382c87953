//! NCCL collectives through cudarc, with `libnccl` loaded at run time, in two arrangements:
//! [`NcclGroup`] drives every GPU of one process from one thread (each collective is one NCCL
//! group over all ranks); [`NcclRank`] is one rank of a job with one process per GPU, possibly
//! across hosts ([`crate::rendezvous`]).

use std::ffi::c_char;

use crate::rendezvous::{share_bytes, LaunchEnv, PAYLOAD_BYTES};
use crate::{drv, DeviceBuffer, Gpu, Result, RuntimeError};
use cudarc::nccl::{
    result as nccl,
    safe::{Comm, Id, ReduceOp},
};

/// Whether `libnccl` can be opened on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// cudarc's loader panics when the library is missing, so every constructor asks first.
fn require_nccl() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(RuntimeError::GpuUnavailable {
            // cudarc 0.19 tries `libnccl.so` but not the `libnccl.so.2` that runtime-only
            // installs (the nvidia-nccl wheels, libnccl2 without -dev) ship.
            reason: "the NCCL library was not found: cudarc opens `libnccl.so`, so put a folder \
                     holding it (or a `libnccl.so` link to `libnccl.so.2`) on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> RuntimeError {
    // `NcclError`'s own Debug prints only its type name; the result code says what went wrong.
    RuntimeError::Nccl(format!("{what}: {:?}", e.0))
}

/// Checks one rank's part of an all-gather over element ranges (before any NCCL call, so a
/// refusal leaves no group half open and the ranks in step).
fn check_region<T: crate::Element>(
    p: usize,
    (send, send_offset, recv, recv_offset): &GatherPart<'_, T>,
    count: usize,
) -> Result<()> {
    if send_offset + count > send.len() || recv_offset + p * count > recv.len() {
        return Err(RuntimeError::InvalidArgument(format!(
            "all-gather of {count} elements from {send_offset} of {} into {recv_offset} of {}",
            send.len(),
            recv.len()
        )));
    }
    Ok(())
}

/// Enqueues one rank's part of an all-gather over element ranges (checked by
/// [`check_region`]): `count` elements of `send` from `send_offset` land at
/// `recv_offset + rank * count` in every rank's `recv`. Moved as bytes, so any element type
/// goes.
fn gather_region<T: crate::Element>(
    comm: &Comm,
    (send, send_offset, recv, recv_offset): GatherPart<'_, T>,
    count: usize,
) -> Result<()> {
    let p = comm.world_size();
    let size = std::mem::size_of::<T::Repr>();
    let src = send.slice.slice(send_offset..send_offset + count);
    let mut dst = recv.slice.slice_mut(recv_offset..recv_offset + p * count);
    // SAFETY: plain element data viewed as its bytes; the ranges were checked.
    let (src, dst) = unsafe {
        (
            src.transmute::<u8>(count * size),
            dst.transmute_mut::<u8>(p * count * size),
        )
    };
    let (Some(src), Some(mut dst)) = (src, dst) else {
        return Err(RuntimeError::InvalidArgument(
            "buffer views out of range".into(),
        ));
    };
    comm.all_gather(&src, &mut dst)
        .map_err(|e| nccl_err("all-gather", e))?;
    Ok(())
}

/// Blocks of a buffer that go to or come from peers: `(offset, count, peer)` in elements.
pub type PeerBlocks = Vec<(usize, usize, usize)>;

/// One rank's part of a point-to-point exchange: blocks of one buffer to send, and blocks
/// of one buffer to receive into.
pub struct P2pPart<'a, T: crate::Element> {
    pub send: Option<(&'a DeviceBuffer<T>, PeerBlocks)>,
    pub recv: Option<(&'a mut DeviceBuffer<T>, PeerBlocks)>,
}

fn check_p2p<T: crate::Element>(p: usize, part: &P2pPart<'_, T>) -> Result<()> {
    let bad = |len: usize, blocks: &[(usize, usize, usize)]| {
        blocks
            .iter()
            .any(|&(offset, count, peer)| offset + count > len || peer >= p)
    };
    if part
        .send
        .as_ref()
        .is_some_and(|(b, blocks)| bad(b.len(), blocks))
        || part
            .recv
            .as_ref()
            .is_some_and(|(b, blocks)| bad(b.len(), blocks))
    {
        return Err(RuntimeError::InvalidArgument(
            "a send or receive outside its buffer or to a rank that does not exist".into(),
        ));
    }
    Ok(())
}

/// Enqueues one rank's sends and receives (checked by [`check_p2p`]), as bytes.
fn enqueue_p2p<T: crate::Element>(comm: &Comm, part: P2pPart<'_, T>) -> Result<()> {
    let size = std::mem::size_of::<T::Repr>();
    let out_of_range = || RuntimeError::InvalidArgument("buffer views out of range".into());
    if let Some((buf, blocks)) = part.send {
        for (offset, count, peer) in blocks {
            let view = buf.slice.slice(offset..offset + count);
            // SAFETY: plain element data viewed as its bytes; the range was checked.
            let bytes = unsafe { view.transmute::<u8>(count * size) }.ok_or_else(out_of_range)?;
            comm.send(&bytes, peer as i32)
                .map_err(|e| nccl_err("send", e))?;
        }
    }
    if let Some((buf, blocks)) = part.recv {
        for (offset, count, peer) in blocks {
            let mut view = buf.slice.slice_mut(offset..offset + count);
            // SAFETY: as above.
            let mut bytes =
                unsafe { view.transmute_mut::<u8>(count * size) }.ok_or_else(out_of_range)?;
            comm.recv(&mut bytes, peer as i32)
                .map_err(|e| nccl_err("receive", e))?;
        }
    }
    Ok(())
}

/// One rank's buffers of an all-gather over element ranges: `(send, send_offset, recv,
/// recv_offset)`.
pub type GatherPart<'a, T> = (&'a DeviceBuffer<T>, usize, &'a mut DeviceBuffer<T>, usize);

/// One communicator per GPU (`ncclCommInitAll`); rank `r` is `gpus[r]`.
pub struct NcclGroup {
    comms: Vec<Comm>,
}

impl NcclGroup {
    pub fn new(gpus: &[&Gpu]) -> Result<NcclGroup> {
        require_nccl()?;
        let streams = gpus.iter().map(|g| g.stream.clone()).collect();
        let comms =
            Comm::from_devices(streams).map_err(|e| nccl_err("creating communicators", e))?;
        Ok(NcclGroup { comms })
    }

    pub fn size(&self) -> usize {
        self.comms.len()
    }

    /// All-gather over element ranges, one part per rank in rank order (see
    /// [`GatherPart`]): rank `r`'s `count` elements land at `recv_offset + r * count`.
    pub fn all_gather_regions<T: crate::Element>(
        &self,
        parts: Vec<GatherPart<'_, T>>,
        count: usize,
    ) -> Result<()> {
        if parts.len() != self.comms.len() {
            return Err(RuntimeError::InvalidArgument(
                "one all-gather part per rank".into(),
            ));
        }
        for part in &parts {
            check_region(self.comms.len(), part, count)?;
        }
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (comm, part) in self.comms.iter().zip(parts) {
            gather_region(comm, part, count)?;
        }
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        Ok(())
    }

    /// Sends and receives of some ranks (`(rank, part)`), in one NCCL group so that every
    /// send meets its receive.
    pub fn send_recv<T: crate::Element>(&self, parts: Vec<(usize, P2pPart<'_, T>)>) -> Result<()> {
        let p = self.comms.len();
        for (r, part) in &parts {
            if *r >= p {
                return Err(RuntimeError::InvalidArgument(format!("no rank {r}")));
            }
            check_p2p(p, part)?;
        }
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (r, part) in parts {
            enqueue_p2p(&self.comms[r], part)?;
        }
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        Ok(())
    }
}

/// This process's rank of a job with one process per GPU (`ncclCommInitRank`).
///
/// Collectives are enqueued on the GPU's stream and return at once; every rank must issue the
/// same collectives, in the same order, with the same `count`, or NCCL waits forever.
pub struct NcclRank {
    comm: Comm,
}

impl NcclRank {
    /// Joins the job that `env` describes on `gpu` (normally `Gpu::open(env.local_rank)`).
    /// Blocks until every rank has joined: first in the rendezvous that hands out rank 0's
    /// NCCL id ([`share_bytes`]), then inside NCCL.
    pub fn new(gpu: &Gpu, env: &LaunchEnv) -> Result<NcclRank> {
        require_nccl()?;
        // cudarc panics on counts beyond a C int; validation refuses them first.
        env.validate()?;
        let mine = if env.rank == 0 {
            let id =
                Id::new().map_err(|e| nccl_err("drawing the unique id (ncclGetUniqueId)", e))?;
            Some(id.internal().map(|c| c.to_ne_bytes()[0]))
        } else {
            None
        };
        let bytes: [u8; PAYLOAD_BYTES] = share_bytes(env, mine)?;
        let id = Id::uninit(bytes.map(|b| c_char::from_ne_bytes([b])));
        // ncclCommInitRank takes its device from the calling thread's current context.
        drv("making the GPU's context current", gpu.ctx.bind_to_thread())?;
        let comm =
            Comm::from_rank(gpu.stream.clone(), env.rank, env.world_size, id).map_err(|e| {
                nccl_err(
                    &format!(
                        "joining as rank {} of {} (ncclCommInitRank, rendezvous at {})",
                        env.rank,
                        env.world_size,
                        env.master()
                    ),
                    e,
                )
            })?;
        Ok(NcclRank { comm })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// All-gather over element ranges: this rank's `count` elements of `send` from
    /// `send_offset` land at `recv_offset + rank * count` in every rank's `recv`.
    pub fn all_gather_region<T: crate::Element>(
        &self,
        part: GatherPart<'_, T>,
        count: usize,
    ) -> Result<()> {
        check_region(self.world_size(), &part, count)?;
        gather_region(&self.comm, part, count)
    }

    /// This rank's sends and receives, in one NCCL group.
    pub fn send_recv<T: crate::Element>(&self, part: P2pPart<'_, T>) -> Result<()> {
        check_p2p(self.world_size(), &part)?;
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        let result = enqueue_p2p(&self.comm, part);
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        result
    }

    /// Element-wise sum of `values` over all ranks, on the host: for combining per-rank error
    /// norms and counts. Every rank must pass as many values. `gpu` must be the GPU this rank
    /// was built on, since the data goes through its stream.
    pub fn all_reduce_sum_f64_host(&self, gpu: &Gpu, values: &[f64]) -> Result<Vec<f64>> {
        if !std::sync::Arc::ptr_eq(&gpu.stream, &self.comm.stream()) {
            return Err(RuntimeError::InvalidArgument(
                "all_reduce_sum_f64_host needs the GPU this NCCL rank was built on".into(),
            ));
        }
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = gpu.upload(values)?;
        self.comm
            .all_reduce_in_place(&mut buf.slice, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce (sum of f64)", e))?;
        // Same stream: the download orders after the reduction.
        gpu.download(&buf)
    }
}
