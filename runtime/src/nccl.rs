//! NCCL collectives through cudarc, with `libnccl` loaded at run time, in two arrangements:
//! [`NcclGroup`] drives every GPU of one process from one thread (each collective is one NCCL
//! group over all ranks); [`NcclRank`] is one rank of a job with one process per GPU, possibly
//! across hosts ([`crate::launch`]).

use std::ffi::c_char;

use crate::launch::{share_bytes, LaunchEnv, PAYLOAD_BYTES};
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

/// `buffers` send and receive buffers, each of at least `send_len` / `recv_len` elements.
fn check_buffers(
    buffers: usize,
    send: impl ExactSizeIterator<Item = usize>,
    recv: impl ExactSizeIterator<Item = usize>,
    send_len: usize,
    recv_len: usize,
) -> Result<()> {
    if send.len() != buffers || recv.len() != buffers {
        return Err(RuntimeError::InvalidArgument(
            "one send and one receive buffer per rank".into(),
        ));
    }
    if send.zip(recv).any(|(s, r)| s < send_len || r < recv_len) {
        return Err(RuntimeError::InvalidArgument(format!(
            "send buffers need {send_len} and receive buffers {recv_len} elements"
        )));
    }
    Ok(())
}

/// Enqueues one rank's part of [`NcclGroup::all_gather_slots`] / [`NcclRank::all_gather_slots`]
/// (buffers already checked).
fn gather_slot(
    comm: &Comm,
    send: &DeviceBuffer<f32>,
    recv: &mut DeviceBuffer<f32>,
    count: usize,
) -> Result<()> {
    let rank = comm.rank();
    let slot = send.slice.slice(rank * count..(rank + 1) * count);
    comm.all_gather(&slot, &mut recv.slice)
        .map_err(|e| nccl_err("all-gather", e))?;
    Ok(())
}

/// Enqueues one rank's part of an all-gather over element ranges: `count` elements of `send`
/// from `send_offset` land at `recv_offset + rank * count` in every rank's `recv`. Moved as
/// bytes, so any element type goes.
fn gather_region<T: crate::Element>(
    comm: &Comm,
    send: &DeviceBuffer<T>,
    send_offset: usize,
    recv: &mut DeviceBuffer<T>,
    recv_offset: usize,
    count: usize,
) -> Result<()> {
    let p = comm.world_size();
    if send_offset + count > send.len() || recv_offset + p * count > recv.len() {
        return Err(RuntimeError::InvalidArgument(format!(
            "all-gather of {count} elements from {send_offset} of {} into {recv_offset} of {}",
            send.len(),
            recv.len()
        )));
    }
    let size = std::mem::size_of::<T::Repr>();
    let src = send.slice.slice(send_offset..send_offset + count);
    let mut dst = recv.slice.slice_mut(recv_offset..recv_offset + p * count);
    // SAFETY: plain element data viewed as its bytes; the ranges were checked above.
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

/// One rank's buffers of an all-gather over element ranges: `(send, send_offset, recv,
/// recv_offset)`.
pub type GatherPart<'a, T> = (&'a DeviceBuffer<T>, usize, &'a mut DeviceBuffer<T>, usize);

/// Enqueues one rank's part of an all-gather of 16-bit data (buffers already checked).
fn gather_u16(
    comm: &Comm,
    send: &DeviceBuffer<u16>,
    recv: &mut DeviceBuffer<u16>,
    count: usize,
) -> Result<()> {
    let p = comm.world_size();
    // SAFETY: u16 data viewed as twice as many bytes; lengths checked by the caller.
    let (src, mut dst) = unsafe {
        (
            send.slice.transmute::<u8>(2 * count),
            recv.slice.transmute_mut::<u8>(2 * p * count),
        )
    };
    let (Some(src), Some(dst)) = (src.as_ref(), dst.as_mut()) else {
        return Err(RuntimeError::InvalidArgument(
            "buffer views out of range".into(),
        ));
    };
    comm.all_gather(src, dst)
        .map_err(|e| nccl_err("all-gather", e))?;
    Ok(())
}

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
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (comm, (send, so, recv, ro)) in self.comms.iter().zip(parts) {
            gather_region(comm, send, so, recv, ro, count)?;
        }
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        Ok(())
    }

    /// All-gather of equal slots: rank `r` contributes `send[r][r * count .. (r + 1) * count]`
    /// and every rank receives all the slots in `recv[r]`, slot `q` at `q * count` (so a
    /// chunk-major array filled slot by slot comes back whole on every rank).
    pub fn all_gather_slots(
        &self,
        send: &[DeviceBuffer<f32>],
        recv: &mut [DeviceBuffer<f32>],
        count: usize,
    ) -> Result<()> {
        let p = self.comms.len();
        check_buffers(
            p,
            send.iter().map(|b| b.len()),
            recv.iter().map(|b| b.len()),
            p * count,
            p * count,
        )?;
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (comm, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter_mut())) {
            gather_slot(comm, s, r, count)?;
        }
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        Ok(())
    }

    /// All-gather of 16-bit data (bf16/f16 bit patterns, sent as bytes): rank `r`'s
    /// `send[r]` (`count` elements) lands at `r * count` in every `recv`.
    pub fn all_gather_u16(
        &self,
        send: &[DeviceBuffer<u16>],
        recv: &mut [DeviceBuffer<u16>],
        count: usize,
    ) -> Result<()> {
        let p = self.comms.len();
        check_buffers(
            p,
            send.iter().map(|b| b.len()),
            recv.iter().map(|b| b.len()),
            count,
            p * count,
        )?;
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (comm, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter_mut())) {
            gather_u16(comm, s, r, count)?;
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
        (send, send_offset, recv, recv_offset): GatherPart<'_, T>,
        count: usize,
    ) -> Result<()> {
        gather_region(&self.comm, send, send_offset, recv, recv_offset, count)
    }

    /// All-gather of equal slots: this rank contributes `send[rank * count .. (rank + 1) *
    /// count]` and receives every rank's slot `q` at `recv[q * count ..]`, as
    /// [`NcclGroup::all_gather_slots`] does for each of its ranks.
    pub fn all_gather_slots(
        &self,
        send: &DeviceBuffer<f32>,
        recv: &mut DeviceBuffer<f32>,
        count: usize,
    ) -> Result<()> {
        let p = self.world_size();
        check_buffers(
            1,
            std::iter::once(send.len()),
            std::iter::once(recv.len()),
            p * count,
            p * count,
        )?;
        gather_slot(&self.comm, send, recv, count)
    }

    /// All-gather of 16-bit data (bf16/f16 bit patterns, sent as bytes): `send[..count]` of
    /// rank `r` lands at `r * count` in every rank's `recv`.
    pub fn all_gather_u16(
        &self,
        send: &DeviceBuffer<u16>,
        recv: &mut DeviceBuffer<u16>,
        count: usize,
    ) -> Result<()> {
        let p = self.world_size();
        check_buffers(
            1,
            std::iter::once(send.len()),
            std::iter::once(recv.len()),
            count,
            p * count,
        )?;
        gather_u16(&self.comm, send, recv, count)
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
