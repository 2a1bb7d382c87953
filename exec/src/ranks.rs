//! The GPUs of an SP run and how they talk: every GPU of the host driven from one process
//! (`ncclCommInitAll`), one GPU per process under a launcher (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; rank 0 hands out the NCCL id), or one GPU
//! standing in for every rank (collectives as device copies), which checks a plan's
//! kernels and steps on a machine with one GPU. Also the timing of a multi-GPU run and the
//! error sums processes add up.

use crate::{ExecError, Result};
use einattn_runtime::{Gpu, RuntimeError};

/// The GPUs this process drives in an SP run and how they talk: every GPU of the host from
/// one thread (`ncclCommInitAll`), or one GPU per process when a launcher set `WORLD_SIZE`
/// (`RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; rank 0 hands out the NCCL id).
pub struct Ranks {
    /// (rank, index into `devices`) for each rank this process drives.
    gpus: Vec<(usize, usize)>,
    /// The GPUs opened (one for all ranks when one stands in for every rank).
    devices: Vec<Gpu>,
    /// With [`RankMode::overlap`]: a second stream of each device, where transfers run
    /// (NCCL communicators are built on it, a stand-in copies on it).
    comm_streams: Vec<Gpu>,
    comm: Comm,
    /// The device ordinal of this process's first GPU (for the single-GPU reference).
    pub ordinal: usize,
}

enum Comm {
    Group(einattn_runtime::nccl::NcclGroup),
    Process(einattn_runtime::nccl::NcclRank),
    StandIn(einattn_runtime::StandInGroup),
}

/// How the ranks of an SP run map to GPUs and streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankMode {
    pub mapping: RankMapping,
    /// Run every rank's transfers on a second stream of its GPU, ordered against compute by
    /// the plan's events, so they overlap compute (else one stream per GPU runs all).
    pub overlap: bool,
}

impl From<RankMapping> for RankMode {
    fn from(mapping: RankMapping) -> RankMode {
        RankMode {
            mapping,
            overlap: false,
        }
    }
}

/// How the ranks of an SP run map to GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankMapping {
    /// One GPU per rank (this host's, or one per process under a launcher).
    OneGpuEach,
    /// Every rank on GPU 0, collectives as device copies.
    OneGpuForAll,
}

impl Ranks {
    pub fn open(devices: usize, mode: impl Into<RankMode>) -> Result<Ranks> {
        use einattn_runtime::nccl::{NcclGroup, NcclRank};
        use einattn_runtime::rendezvous::LaunchEnv;
        let RankMode { mapping, overlap } = mode.into();
        let second = |gpus: &[Gpu]| -> Result<Vec<Gpu>> {
            if !overlap {
                return Ok(Vec::new());
            }
            gpus.iter()
                .map(|g| g.second_stream().map_err(ExecError::from))
                .collect()
        };
        if mapping == RankMapping::OneGpuForAll {
            let opened = vec![Gpu::open(0)?];
            return Ok(Ranks {
                gpus: (0..devices).map(|r| (r, 0)).collect(),
                comm_streams: second(&opened)?,
                devices: opened,
                comm: Comm::StandIn(einattn_runtime::StandInGroup::new(devices)),
                ordinal: 0,
            });
        }
        match LaunchEnv::from_env().map_err(|e| ExecError::Usage(e.to_string()))? {
            Some(env) => {
                if env.world_size != devices {
                    return Err(ExecError::Usage(format!(
                        "`--sp {devices}` under a launcher with WORLD_SIZE={}",
                        env.world_size
                    )));
                }
                let opened = vec![Gpu::open(env.local_rank)?];
                let comm_streams = second(&opened)?;
                let comm = NcclRank::new(comm_streams.first().unwrap_or(&opened[0]), &env)?;
                Ok(Ranks {
                    gpus: vec![(env.rank, 0)],
                    devices: opened,
                    comm_streams,
                    comm: Comm::Process(comm),
                    ordinal: env.local_rank,
                })
            }
            None => {
                let mut opened = Vec::new();
                for r in 0..devices {
                    opened.push(Gpu::open(r)?);
                }
                let comm_streams = second(&opened)?;
                let on = if overlap { &comm_streams } else { &opened };
                let group = NcclGroup::new(&on.iter().collect::<Vec<_>>())?;
                Ok(Ranks {
                    gpus: (0..devices).map(|r| (r, r)).collect(),
                    devices: opened,
                    comm_streams,
                    comm: Comm::Group(group),
                    ordinal: 0,
                })
            }
        }
    }

    /// (rank, GPU) of each rank this process drives.
    pub fn gpus(&self) -> impl Iterator<Item = (usize, &Gpu)> {
        self.gpus.iter().map(|&(r, d)| (r, &self.devices[d]))
    }

    /// The GPU of the `i`-th rank this process drives.
    pub fn gpu_of(&self, i: usize) -> &Gpu {
        &self.devices[self.gpus[i].1]
    }

    /// Whether transfers run on a second stream ([`RankMode::overlap`]).
    pub fn overlap(&self) -> bool {
        !self.comm_streams.is_empty()
    }

    /// The stream the `i`-th driven rank's transfers run on: its second stream when
    /// overlapping, else its GPU's one stream.
    pub fn comm_of(&self, i: usize) -> &Gpu {
        self.comm_streams
            .get(self.gpus[i].1)
            .unwrap_or_else(|| self.gpu_of(i))
    }

    /// Every device's (compute, transfer) streams (the same one twice without overlap).
    pub fn streams(&self) -> impl Iterator<Item = (&Gpu, &Gpu)> {
        self.devices
            .iter()
            .enumerate()
            .map(|(d, g)| (g, self.comm_streams.get(d).unwrap_or(g)))
    }

    /// Ranks of the whole job (all of them, across processes).
    pub fn world_size(&self) -> usize {
        match &self.comm {
            Comm::Group(g) => g.size(),
            Comm::Process(c) => c.world_size(),
            Comm::StandIn(g) => g.size(),
        }
    }

    /// All-gather over element ranges, one part per driven rank (in driven order).
    pub fn all_gather_regions<T: einattn_runtime::Element>(
        &self,
        mut parts: Vec<einattn_runtime::nccl::GatherPart<'_, T>>,
        count: usize,
    ) -> Result<()> {
        match &self.comm {
            Comm::Group(g) => g.all_gather_regions(parts, count),
            Comm::StandIn(g) => g.all_gather_regions(self.comm_of(0), parts, count),
            Comm::Process(c) => match parts.pop() {
                Some(part) if parts.is_empty() => c.all_gather_region(part, count),
                _ => Err(RuntimeError::InvalidArgument(
                    "one all-gather part per process".into(),
                )),
            },
        }
        .map_err(ExecError::from)
    }

    /// Sends and receives of driven ranks (`(driven index, part)`), as one NCCL group.
    pub fn send_recv<T: einattn_runtime::Element>(
        &self,
        parts: Vec<(usize, einattn_runtime::nccl::P2pPart<'_, T>)>,
    ) -> Result<()> {
        match &self.comm {
            Comm::Group(g) => g.send_recv(
                parts
                    .into_iter()
                    .map(|(i, part)| (self.gpus[i].0, part))
                    .collect(),
            ),
            Comm::StandIn(g) => g.send_recv(
                self.comm_of(0),
                parts
                    .into_iter()
                    .map(|(i, part)| (self.gpus[i].0, part))
                    .collect(),
            ),
            Comm::Process(c) => {
                let mut parts = parts;
                match parts.pop() {
                    Some((_, part)) if parts.is_empty() => c.send_recv(part),
                    _ => Err(RuntimeError::InvalidArgument(
                        "one point-to-point part per process".into(),
                    )),
                }
            }
        }
        .map_err(ExecError::from)
    }

    /// The GPU of this process that runs the single-GPU reference.
    pub fn first(&self) -> &Gpu {
        &self.devices[0]
    }

    /// Whether this process prints the report (rank 0, or the only process).
    pub fn leader(&self) -> bool {
        self.gpus[0].0 == 0
    }

    pub fn launcher(&self) -> &'static str {
        match (&self.comm, self.overlap()) {
            (Comm::Group(_), false) => "one process driving every GPU",
            (Comm::Group(_), true) => "one process driving every GPU, transfers on a second stream",
            (Comm::Process(_), false) => "one process per GPU (launcher)",
            (Comm::Process(_), true) => {
                "one process per GPU (launcher), transfers on a second stream"
            }
            (Comm::StandIn(_), false) => "one GPU standing in for every rank",
            (Comm::StandIn(_), true) => {
                "one GPU standing in for every rank, transfers on a second stream"
            }
        }
    }

    /// Rank 0's `seed` on every process.
    pub fn shared_seed(&self, seed: u64) -> Result<u64> {
        let mine = if self.leader() { seed } else { 0 };
        // Two 32-bit halves: exact in f64 sums.
        let sum = self.sum(&[(mine >> 32) as f64, (mine & 0xffff_ffff) as f64])?;
        Ok(((sum[0] as u64) << 32) | sum[1] as u64)
    }

    /// Sums over every process (per-rank error norms); the identity in one process.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        match &self.comm {
            Comm::Group(_) | Comm::StandIn(_) => Ok(values.to_vec()),
            // The communicator's own stream (the second one when overlapping).
            Comm::Process(c) => Ok(c.all_reduce_sum_f64_host(self.comm_of(0), values)?),
        }
    }

    pub fn time(&self, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        time_plan_reps(self, run, 20)
    }
}

/// Squared error and squared reference summed over `pairs` of (got, want): the parts of a
/// relative error that processes add up. A NaN anywhere makes the error NaN.
pub fn error_parts(pairs: impl Iterator<Item = (f64, f64)>) -> [f64; 2] {
    pairs.fold([0.0, 0.0], |[num, den], (g, w)| {
        [num + (g - w) * (g - w), den + w * w]
    })
}

pub fn time_plan_reps(
    ranks: &Ranks,
    run: &mut dyn FnMut() -> Result<()>,
    reps: usize,
) -> Result<f64> {
    let gpus: Vec<&Gpu> = ranks.devices.iter().chain(&ranks.comm_streams).collect();
    time_plan(&gpus, run, reps)
}

/// Median wall time of a multi-GPU plan over `reps` runs: every GPU synchronized before and
/// after each run.
pub fn time_plan(gpus: &[&Gpu], run: &mut dyn FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    let sync = || -> Result<()> {
        for g in gpus {
            g.synchronize()?;
        }
        Ok(())
    };
    for _ in 0..3 {
        run()?;
    }
    let mut ms = Vec::new();
    for _ in 0..reps.max(1) {
        sync()?;
        let t0 = std::time::Instant::now();
        run()?;
        sync()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}
