//! NCCL collectives across the GPUs of one process, through cudarc with `libnccl` loaded at
//! run time. One thread drives every GPU: kernels are enqueued on each GPU's stream and a
//! collective is issued as one NCCL group over all ranks.

use crate::{DeviceBuffer, Gpu, Result, RuntimeError};
use cudarc::nccl::{result as nccl, safe::Comm};

/// Whether `libnccl` can be opened on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> RuntimeError {
    RuntimeError::Nccl(format!("{what}: {e:?}"))
}

/// One communicator per GPU (`ncclCommInitAll`); rank `r` is `gpus[r]`.
pub struct NcclGroup {
    comms: Vec<Comm>,
}

impl NcclGroup {
    pub fn new(gpus: &[&Gpu]) -> Result<NcclGroup> {
        if !nccl_present() {
            return Err(RuntimeError::GpuUnavailable {
                reason: "the NCCL library (libnccl.so.2) was not found; add its folder to LD_LIBRARY_PATH".into(),
            });
        }
        let streams = gpus.iter().map(|g| g.stream.clone()).collect();
        let comms =
            Comm::from_devices(streams).map_err(|e| nccl_err("creating communicators", e))?;
        Ok(NcclGroup { comms })
    }

    pub fn size(&self) -> usize {
        self.comms.len()
    }

    /// One send and one receive buffer per rank, of at least these many elements.
    fn check_buffers(
        &self,
        send: impl ExactSizeIterator<Item = usize>,
        recv: impl ExactSizeIterator<Item = usize>,
        send_len: usize,
        recv_len: usize,
    ) -> Result<()> {
        let p = self.comms.len();
        if send.len() != p || recv.len() != p {
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
        self.check_buffers(
            send.iter().map(|b| b.len()),
            recv.iter().map(|b| b.len()),
            p * count,
            p * count,
        )?;
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (rank, (comm, (s, r))) in self
            .comms
            .iter()
            .zip(send.iter().zip(recv.iter_mut()))
            .enumerate()
        {
            let slot = s.slice.slice(rank * count..(rank + 1) * count);
            comm.all_gather(&slot, &mut r.slice)
                .map_err(|e| nccl_err("all-gather", e))?;
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
        self.check_buffers(
            send.iter().map(|b| b.len()),
            recv.iter().map(|b| b.len()),
            count,
            p * count,
        )?;
        nccl::group_start().map_err(|e| nccl_err("starting a group", e))?;
        for (comm, (s, r)) in self.comms.iter().zip(send.iter().zip(recv.iter_mut())) {
            // SAFETY: u16 data viewed as twice as many bytes; lengths checked above.
            let (src, mut dst) = unsafe {
                (
                    s.slice.transmute::<u8>(2 * count),
                    r.slice.transmute_mut::<u8>(2 * p * count),
                )
            };
            let (Some(src), Some(dst)) = (src.as_ref(), dst.as_mut()) else {
                return Err(RuntimeError::InvalidArgument(
                    "buffer views out of range".into(),
                ));
            };
            comm.all_gather(src, dst)
                .map_err(|e| nccl_err("all-gather", e))?;
        }
        nccl::group_end().map_err(|e| nccl_err("ending a group", e))?;
        Ok(())
    }
}
