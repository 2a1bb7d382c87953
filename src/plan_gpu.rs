//! The GPU plan executor: runs an SP plan (`plan.json`, docs/sp.md) step by step on the
//! GPUs of [`Ranks`], lowering each step to kernels einattn generates and NCCL calls.
//!
//! - buffers are allocated per rank with the plan's dtype and filled from the pieces of the
//!   global inputs (uninitialized ones are poisoned with NaN, so a read before a write
//!   shows in the check);
//! - `state_only` on linear attention: the chunk-state kernel over `sub` chunks of the
//!   window (into a per-window scratch array), an element-wise combine into `state_out`
//!   and the chunk's cumulative decay into `decay_out`;
//! - `output_with_prefix`: `state_in` goes to slot 0 of the window's scratch array and the
//!   chunk-output kernel starts each of its chunks from the decayed sum of the slots before
//!   it (the prefix, then the window's own earlier chunks);
//! - `full` on softmax attention: the attention kernel with a query offset, so masks see
//!   global positions while memory stays local;
//! - `prefix_combine`: the element-wise combine kernel; `place`: device copies; `all_gather`:
//!   one NCCL all-gather over the regions; `send_recv`: NCCL sends and receives.
//!
//! Steps of a rank run in plan order on its GPU's one stream, which satisfies every event
//! of the plan (plan order is a topological order); what the plan would overlap runs one
//! after another. Sends and receives (LASP-1) go as NCCL groups of matched pairs
//! ([`schedule`]). Schemes whose steps have no lowering (Ring, TokenRing and their merges,
//! Ulysses' rearranges) are refused before anything runs.

use crate::cli::CliError;
use crate::gpu::{error_parts, from_bits, gpu_error, to_bits, Inputs, Ranks};
use einattn_backends::compile::{CompiledKernel, CompiledLinear};
use einattn_backends::plan::{
    piece_runs, ArgRole, BufferInit, KernelArg as PlanArg, KernelStep, PeerRegion, Phase, Plan,
    Region, Step,
};
use einattn_backends::ptx::elementwise::{
    chunk_decay_ptx, plan_rearrange, prefix_combine_ptx, rearrange_ptx, ELEMENTWISE_THREADS,
    REARRANGE_DIMS,
};
use einattn_backends::schedule::Layout;
use einattn_backends::tile::linear::{lightning_part, Part};
use einattn_backends::tile::{AbiRole, Elem};
use einattn_backends::{print_ptx, PtxKernel};
use einattn_ir::cascade::Cascade;
use einattn_runtime::nccl::P2pPart;
use einattn_runtime::{DeviceBuffer, Gpu, Kernel, KernelArg, LaunchDims};
use std::collections::HashMap;

/// What the plan's kernel steps lower to.
pub enum Lowering<'k> {
    Linear(&'k CompiledLinear),
    Attention(&'k CompiledKernel),
}

fn plan_error(message: impl Into<String>) -> CliError {
    CliError::input(format!("error: plan: {}", message.into()))
}

/// Refuses plans with steps that have no GPU lowering, before any GPU work.
pub fn check_lowerable(plan: &Plan, lowering: &Lowering) -> Result<(), CliError> {
    let ranks: Vec<u64> = plan.ranks.iter().map(|r| r.rank).collect();
    if plan.world_size == 0 || ranks != (0..plan.world_size).collect::<Vec<_>>() {
        return Err(plan_error(format!(
            "a plan for {} devices must list ranks 0..{} in order (it lists {ranks:?})",
            plan.world_size, plan.world_size
        )));
    }
    for rank in &plan.ranks {
        for step in &rank.steps {
            let what = match step {
                Step::Kernel(k) => match (k.phase, lowering) {
                    (
                        Phase::StateOnly | Phase::OutputWithPrefix | Phase::Full,
                        Lowering::Linear(_),
                    ) => None,
                    (Phase::Full, Lowering::Attention(_)) => None,
                    (phase, _) => Some(format!("a `{phase:?}` kernel of this family")),
                },
                Step::AllGather { .. } | Step::PrefixCombine { .. } | Step::Place { .. } => None,
                Step::SendRecv { .. } | Step::AllToAll { .. } => None,
                Step::Rearrange { shape, perm, .. } => plan_rearrange(shape, perm)
                    .is_none()
                    .then(|| format!("a rearrange of {shape:?} by {perm:?} (too many dims apart)")),
                Step::AllReduce { .. } | Step::ReduceScatter { .. } => {
                    Some("reductions".to_string())
                }
                Step::LseMerge { .. } => Some("merges of softmax statistics".to_string()),
            };
            if let Some(what) = what {
                return Err(plan_error(format!(
                    "scheme `{}` needs {what}, which the GPU executor does not lower yet \
                     (it runs lasp2, lasp1, allgather_kv[_zigzag] and ulysses; choose one with --scheme)",
                    plan.scheme
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a plan (a `plan.json` may be edited by hand) whose global tensors differ from
/// the cascade's or whose pieces reach outside them or their buffers, before any copy
/// indexes with them.
fn check_shapes(plan: &Plan, cascade: &Cascade) -> Result<(), CliError> {
    for g in &plan.tensors {
        let t = cascade
            .tensor_by_name(&g.name)
            .ok_or_else(|| plan_error(format!("`{}` is not a tensor of the cascade", g.name)))?;
        let want: Vec<u64> = einattn_ir::interp::shape_of(cascade, t)
            .into_iter()
            .map(|x| x as u64)
            .collect();
        if want != g.shape {
            return Err(plan_error(format!(
                "`{}` has shape {:?} in the plan and {want:?} in the cascade",
                g.name, g.shape
            )));
        }
    }
    for rank in &plan.ranks {
        let pieces = rank
            .outputs
            .iter()
            .map(|p| (p, None))
            .chain(rank.buffers.iter().flat_map(|b| match &b.init {
                BufferInit::Pieces { pieces } => pieces.iter().map(|p| (p, Some(b))).collect(),
                _ => Vec::new(),
            }));
        for (piece, buffer) in pieces {
            let g = plan
                .tensors
                .iter()
                .find(|t| t.name == piece.tensor)
                .ok_or_else(|| plan_error(format!("no tensor `{}`", piece.tensor)))?;
            let inside = piece.slices.iter().all(|sl| {
                g.shape
                    .get(sl.dim)
                    .is_some_and(|&extent| sl.start + sl.len <= extent)
            });
            let packed: u64 = piece_runs(&g.shape, &piece.slices)
                .iter()
                .map(|r| r.2)
                .sum();
            let elements = match buffer {
                Some(b) => Some(b.elements),
                None => rank
                    .buffers
                    .iter()
                    .find(|b| b.name == piece.buffer)
                    .map(|b| b.elements),
            };
            if !inside || elements.is_none_or(|n| piece.offset + packed > n) {
                return Err(plan_error(format!(
                    "rank {}: a piece of `{}` reaches outside the tensor or buffer `{}`",
                    rank.rank, piece.tensor, piece.buffer
                )));
            }
        }
    }
    Ok(())
}

/// A plan buffer on a GPU: 16-bit floats as bits, or f32.
enum Buf {
    Half(DeviceBuffer<u16>),
    Float(DeviceBuffer<f32>),
}

impl Buf {
    fn address(&self, gpu: &Gpu, offset: u64) -> u64 {
        match self {
            Buf::Half(b) => b.device_address(gpu) + 2 * offset,
            Buf::Float(b) => b.device_address(gpu) + 4 * offset,
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::Half(b) => b.len(),
            Buf::Float(b) => b.len(),
        }
    }

    fn half(&self) -> Option<&DeviceBuffer<u16>> {
        match self {
            Buf::Half(b) => Some(b),
            Buf::Float(_) => None,
        }
    }

    fn half_mut(&mut self) -> Option<&mut DeviceBuffer<u16>> {
        match self {
            Buf::Half(b) => Some(b),
            Buf::Float(_) => None,
        }
    }

    fn float(&self) -> Option<&DeviceBuffer<f32>> {
        match self {
            Buf::Float(b) => Some(b),
            Buf::Half(_) => None,
        }
    }

    fn float_mut(&mut self) -> Option<&mut DeviceBuffer<f32>> {
        match self {
            Buf::Float(b) => Some(b),
            Buf::Half(_) => None,
        }
    }
}

/// The kernels of one GPU, loaded once.
struct Loaded {
    combine: Kernel,
    decay: Kernel,
    rearrange16: Kernel,
    rearrange32: Kernel,
    /// The single-pass linear kernel (Ulysses' `full` steps).
    linear_whole: Option<(PtxKernel, Kernel)>,
    /// Per chunk length (tiles): the linear chunk-state and chunk-output kernels.
    linear: HashMap<u32, (PtxKernel, Kernel, PtxKernel, Kernel)>,
    attention: Option<(PtxKernel, Kernel)>,
}

/// What the launches of one linear step need, resolved from the plan.
struct LinearLaunch {
    chunk_tiles: u32,
    addrs: [u64; 4],
    strides: [[u64; 3]; 4],
    rate_addr: Option<u64>,
    len: u64,
    d: u64,
    e_dim: u64,
    b_n: u64,
    h_n: u64,
    grid_x: u32,
}

/// Per window of a linear kernel: the chunking and the scratch array of chunk states
/// (slot 0 the prefix, slots `1..=sub` the window's chunks).
struct Window {
    chunk_tiles: u32,
    sub: usize,
    slots: DeviceBuffer<f32>,
    /// The per-chunk decay (one value per head) the combine uses.
    chunk_decay: DeviceBuffer<f32>,
    has_states: bool,
}

struct RankExec {
    rank: usize,
    buffers: HashMap<String, Buf>,
    windows: HashMap<(u64, u64), Window>,
    loaded: Loaded,
}

/// A plan loaded onto the GPUs of `ranks`, ready to run (repeatedly, for timing).
pub(crate) struct PlanExec<'a, 'k> {
    plan: &'a Plan,
    ranks: &'a Ranks,
    lowering: Lowering<'k>,
    host: &'a Inputs,
    cascade: &'a Cascade,
    execs: Vec<RankExec>,
}

fn elem_of(dtype: &str) -> Result<Option<Elem>, CliError> {
    Ok(match dtype {
        "bf16" => Some(Elem::Bf16),
        "f16" => Some(Elem::F16),
        "f32" => None,
        other => {
            return Err(plan_error(format!(
                "buffers of `{other}` are not supported"
            )))
        }
    })
}

/// Strides (batch, sequence, head) of a row-major piece of `local` shape of a tensor whose
/// whole is `global` and is stored like `layout`: each stride of the whole names the dim
/// it steps over (the product of the extents after it), and the piece's stride is the
/// same product over its own extents. (Where extents of 1 make two dims step alike, both
/// readings give the same stride.)
fn local_strides(layout: &Layout, global: &[u64], local: &[u64]) -> Result<[u64; 3], CliError> {
    let after = |shape: &[u64], k: usize| shape[k + 1..].iter().product::<u64>();
    let mut out = [0u64; 3];
    for (o, s) in out
        .iter_mut()
        .zip([layout.stride_batch, layout.stride_seq, layout.stride_head])
    {
        if s == 0 {
            continue;
        }
        let k = (0..global.len())
            .find(|&k| after(global, k) == s)
            .ok_or_else(|| plan_error(format!("stride {s} is not a dim of {global:?}")))?;
        *o = after(local, k);
    }
    Ok(out)
}

const LOG2_E: f64 = std::f64::consts::LOG2_E;

impl<'a, 'k> PlanExec<'a, 'k> {
    pub fn new(
        plan: &'a Plan,
        ranks: &'a Ranks,
        lowering: Lowering<'k>,
        cascade: &'a Cascade,
        host: &'a Inputs,
    ) -> Result<Self, CliError> {
        check_lowerable(plan, &lowering)?;
        check_shapes(plan, cascade)?;
        if plan.world_size as usize != ranks.world_size() {
            return Err(plan_error(format!(
                "the plan is for {} devices, this run has {}",
                plan.world_size,
                ranks.world_size()
            )));
        }
        let target = match &lowering {
            Lowering::Linear(k) => k.target,
            Lowering::Attention(k) => k.ptx.target,
        };
        let mut execs = Vec::new();
        for (r, gpu) in ranks.gpus() {
            let rp = plan
                .ranks
                .iter()
                .find(|x| x.rank as usize == r)
                .ok_or_else(|| plan_error(format!("no steps for rank {r}")))?;
            let loaded = Loaded {
                combine: gpu
                    .load_ptx(&prefix_combine_ptx(target), "einattn_prefix_combine")
                    .map_err(gpu_error)?,
                decay: gpu
                    .load_ptx(&chunk_decay_ptx(target), "einattn_chunk_decay")
                    .map_err(gpu_error)?,
                rearrange16: gpu
                    .load_ptx(&rearrange_ptx(target, 16), "einattn_rearrange_b16")
                    .map_err(gpu_error)?,
                rearrange32: gpu
                    .load_ptx(&rearrange_ptx(target, 32), "einattn_rearrange_b32")
                    .map_err(gpu_error)?,
                linear: HashMap::new(),
                linear_whole: match &lowering {
                    Lowering::Linear(lin) => {
                        let (prog, _) =
                            lightning_part(&lin.matched.spec, &lin.schedule, Part::Whole)
                                .map_err(|e| plan_error(e.to_string()))?;
                        let ptx =
                            print_ptx(&prog, target).map_err(|e| plan_error(e.to_string()))?;
                        let kernel = gpu.load_ptx(&ptx.text, &ptx.entry).map_err(gpu_error)?;
                        Some((ptx, kernel))
                    }
                    Lowering::Attention(_) => None,
                },
                attention: match &lowering {
                    Lowering::Attention(k) => {
                        let mut spec = k.schedule.matched.spec.clone();
                        spec.query_offset = true;
                        let (prog, _) =
                            einattn_backends::flash_attention(&spec, &k.schedule.kernel)
                                .map_err(|e| plan_error(e.to_string()))?;
                        let ptx =
                            print_ptx(&prog, target).map_err(|e| plan_error(e.to_string()))?;
                        let kernel = gpu.load_ptx(&ptx.text, &ptx.entry).map_err(gpu_error)?;
                        Some((ptx, kernel))
                    }
                    Lowering::Linear(_) => None,
                },
            };
            let mut buffers = HashMap::new();
            for (bi, b) in rp.buffers.iter().enumerate() {
                let n = b.elements as usize;
                let elem = elem_of(&b.dtype)?;
                // Constant buffers fill on the device; pieces are assembled on the host.
                let constant = match &b.init {
                    BufferInit::Uninit => Some(f64::NAN),
                    BufferInit::Value { value } => Some(*value),
                    BufferInit::Pieces { .. } => None,
                };
                if let Some(v) = constant {
                    let buf = match elem {
                        Some(e) => Buf::Half(gpu.filled(n, to_bits(e, v)).map_err(gpu_error)?),
                        None => Buf::Float(gpu.filled(n, v as f32).map_err(gpu_error)?),
                    };
                    buffers.insert(b.name.clone(), buf);
                    continue;
                }
                // `bench --sp` leaves the sequence inputs out of `host`: a rank draws its
                // pieces itself (uniform in [-1, 1)), so no host holds the whole problem.
                let absent = |name: &str| {
                    cascade.tensor_by_name(name).is_some_and(|t| {
                        !host.contains_key(&t) && cascade.tensors[t].default.is_none()
                    })
                };
                if let BufferInit::Pieces { pieces } = &b.init {
                    if let (Some(e), true) = (elem, pieces.iter().all(|p| absent(&p.tensor))) {
                        let bits = drawn_bits(e, n, ((r as u64) << 32) | bi as u64);
                        buffers.insert(
                            b.name.clone(),
                            Buf::Half(gpu.upload(&bits).map_err(gpu_error)?),
                        );
                        continue;
                    }
                }
                let mut values = vec![f64::NAN; n];
                if let BufferInit::Pieces { pieces } = &b.init {
                    for piece in pieces {
                        let (t, g) = plan
                            .tensors
                            .iter()
                            .find(|t| t.name == piece.tensor)
                            .and_then(|g| cascade.tensor_by_name(&g.name).map(|t| (t, g)))
                            .ok_or_else(|| plan_error(format!("no tensor `{}`", piece.tensor)))?;
                        let data = host_values(cascade, host, t)?;
                        for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                            let (at, from, len) = (at as usize, from as usize, len as usize);
                            let dst = piece.offset as usize + from;
                            values
                                .get_mut(dst..dst + len)
                                .ok_or_else(|| plan_error(format!("piece outside `{}`", b.name)))?
                                .copy_from_slice(&data[at..at + len]);
                        }
                    }
                }
                let buf = match elem {
                    Some(e) => Buf::Half(
                        gpu.upload(&values.iter().map(|&x| to_bits(e, x)).collect::<Vec<_>>())
                            .map_err(gpu_error)?,
                    ),
                    None => Buf::Float(
                        gpu.upload(&values.iter().map(|&x| x as f32).collect::<Vec<_>>())
                            .map_err(gpu_error)?,
                    ),
                };
                buffers.insert(b.name.clone(), buf);
            }
            execs.push(RankExec {
                rank: r,
                buffers,
                windows: HashMap::new(),
                loaded,
            });
        }
        Ok(PlanExec {
            plan,
            ranks,
            lowering,
            host,
            cascade,
            execs,
        })
    }

    /// Runs every rank's steps once, in the order [`schedule`] gives.
    pub fn run(&mut self) -> Result<(), CliError> {
        let steps: Vec<&[Step]> = self
            .execs
            .iter()
            .map(|e| {
                self.plan
                    .ranks
                    .iter()
                    .find(|x| x.rank as usize == e.rank)
                    .map(|x| x.steps.as_slice())
                    .ok_or_else(|| plan_error(format!("no steps for rank {}", e.rank)))
            })
            .collect::<Result<_, _>>()?;
        let ranks: Vec<usize> = self.execs.iter().map(|e| e.rank).collect();
        for batch in schedule(&steps, &ranks)? {
            match batch {
                Batch::Local(i, k) => self.local_step(i, &steps[i][k])?,
                Batch::Collective(at) => match &steps[at[0].0][at[0].1] {
                    Step::AllToAll { .. } => self.all_to_all(&steps, &at)?,
                    _ => {
                        let group: Vec<&Step> = at.iter().map(|&(i, k)| &steps[i][k]).collect();
                        self.all_gather(&group)?
                    }
                },
                Batch::PointToPoint(at) => self.send_recv(&steps, &at)?,
            }
        }
        Ok(())
    }

    fn send_recv(&mut self, steps: &[&[Step]], at: &[(usize, usize)]) -> Result<(), CliError> {
        // Receive buffers leave their maps while borrowed mutably next to the sends.
        let mut taken: Vec<Option<(String, Buf)>> = Vec::new();
        for &(i, k) in at {
            let Step::SendRecv { recv, .. } = &steps[i][k] else {
                return Err(plan_error("not a send/receive step"));
            };
            taken.push(match recv {
                Some(r) => {
                    let buf = self.execs[i]
                        .buffers
                        .remove(&r.region.buffer)
                        .ok_or_else(|| plan_error(format!("no buffer `{}`", r.region.buffer)))?;
                    Some((r.region.buffer.clone(), buf))
                }
                None => None,
            });
        }
        let result = (|| {
            let mut floats = Vec::new();
            let mut halves = Vec::new();
            let block = |r: &PeerRegion| {
                vec![(
                    r.region.offset as usize,
                    r.region.count as usize,
                    r.peer as usize,
                )]
            };
            for (&(i, k), slot) in at.iter().zip(taken.iter_mut()) {
                let Step::SendRecv { send, recv, .. } = &steps[i][k] else {
                    return Err(plan_error("not a send/receive step"));
                };
                let send_buf = match send {
                    Some(s) => Some((
                        self.execs[i].buffers.get(&s.region.buffer).ok_or_else(|| {
                            plan_error(format!("no buffer `{}`", s.region.buffer))
                        })?,
                        block(s),
                    )),
                    None => None,
                };
                let recv_buf = slot.as_mut().map(|(_, b)| b).zip(recv.as_ref().map(block));
                let half = matches!(send_buf, Some((Buf::Half(_), _)))
                    || matches!(recv_buf, Some((Buf::Half(_), _)));
                let mismatch = || plan_error("send and receive of different dtypes");
                if half {
                    halves.push((
                        i,
                        P2pPart {
                            send: send_buf
                                .map(|(b, x)| b.half().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                            recv: recv_buf
                                .map(|(b, x)| b.half_mut().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                        },
                    ));
                } else {
                    floats.push((
                        i,
                        P2pPart {
                            send: send_buf
                                .map(|(b, x)| b.float().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                            recv: recv_buf
                                .map(|(b, x)| b.float_mut().map(|b| (b, x)).ok_or_else(mismatch))
                                .transpose()?,
                        },
                    ));
                }
            }
            if !halves.is_empty() && !floats.is_empty() {
                return Err(plan_error("one point-to-point group of two dtypes"));
            }
            if halves.is_empty() {
                self.ranks.send_recv(floats)
            } else {
                self.ranks.send_recv(halves)
            }
        })();
        for (&(i, _), slot) in at.iter().zip(taken) {
            if let Some((name, buf)) = slot {
                self.execs[i].buffers.insert(name, buf);
            }
        }
        result
    }

    /// All-to-all as one group of sends and receives (block `q` of `send` to rank `q`,
    /// block `q` of `recv` from rank `q`); a rank's own block is a device copy.
    fn all_to_all(&mut self, steps: &[&[Step]], at: &[(usize, usize)]) -> Result<(), CliError> {
        let world = self.plan.world_size as usize;
        let mut taken = Vec::new();
        for &(i, k) in at {
            let Step::AllToAll { recv, .. } = &steps[i][k] else {
                return Err(plan_error("ranks disagree on their collectives"));
            };
            let buf = self.execs[i]
                .buffers
                .remove(&recv.buffer)
                .ok_or_else(|| plan_error(format!("no buffer `{}`", recv.buffer)))?;
            taken.push((recv.buffer.clone(), buf));
        }
        let result = (|| {
            let mut floats = Vec::new();
            let mut halves = Vec::new();
            for (&(i, k), (_, recv_buf)) in at.iter().zip(taken.iter_mut()) {
                let Step::AllToAll {
                    send,
                    recv,
                    count_per_peer,
                    ..
                } = &steps[i][k]
                else {
                    return Err(plan_error("ranks disagree on their collectives"));
                };
                let (r, cpp) = (self.execs[i].rank, *count_per_peer as usize);
                let gpu = self.ranks.gpu_of(i);
                let send_buf = self.execs[i]
                    .buffers
                    .get(&send.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", send.buffer)))?;
                let blocks = |base: u64| -> Vec<(usize, usize, usize)> {
                    (0..world)
                        .filter(|&q| q != r)
                        .map(|q| (base as usize + q * cpp, cpp, q))
                        .collect()
                };
                let own = (
                    send.offset as usize + r * cpp,
                    recv.offset as usize + r * cpp,
                );
                match (send_buf, recv_buf) {
                    (Buf::Half(a), Buf::Half(b)) => {
                        gpu.copy_within(a, own.0..own.0 + cpp, b, own.1)
                            .map_err(gpu_error)?;
                        halves.push((
                            i,
                            P2pPart {
                                send: Some((a, blocks(send.offset))),
                                recv: Some((b, blocks(recv.offset))),
                            },
                        ));
                    }
                    (Buf::Float(a), Buf::Float(b)) => {
                        gpu.copy_within(a, own.0..own.0 + cpp, b, own.1)
                            .map_err(gpu_error)?;
                        floats.push((
                            i,
                            P2pPart {
                                send: Some((a, blocks(send.offset))),
                                recv: Some((b, blocks(recv.offset))),
                            },
                        ));
                    }
                    _ => return Err(plan_error("all-to-all between different dtypes")),
                }
            }
            if !halves.is_empty() && !floats.is_empty() {
                return Err(plan_error("one all-to-all of two dtypes"));
            }
            if halves.is_empty() {
                self.ranks.send_recv(floats)
            } else {
                self.ranks.send_recv(halves)
            }
        })();
        for (&(i, _), (name, buf)) in at.iter().zip(taken) {
            self.execs[i].buffers.insert(name, buf);
        }
        result
    }

    fn all_gather(&mut self, steps: &[&Step]) -> Result<(), CliError> {
        let mut regions = Vec::new();
        for s in steps {
            match s {
                Step::AllGather { send, recv, .. } => regions.push((send.clone(), recv.clone())),
                other => {
                    return Err(plan_error(format!(
                        "collective {other:?} has no GPU lowering"
                    )))
                }
            }
        }
        let count = regions[0].0.count as usize;
        if regions.iter().any(|(s, _)| s.count as usize != count) {
            return Err(plan_error("all-gather counts differ across ranks"));
        }
        // The receive buffers leave their maps while borrowed mutably next to the sends.
        let mut taken = Vec::new();
        for (e, (_, recv)) in self.execs.iter_mut().zip(&regions) {
            let buf = e
                .buffers
                .remove(&recv.buffer)
                .ok_or_else(|| plan_error(format!("no buffer `{}`", recv.buffer)))?;
            taken.push(buf);
        }
        let result = {
            let mut halves = Vec::new();
            let mut floats = Vec::new();
            for ((e, (send, recv)), buf) in self.execs.iter().zip(&regions).zip(taken.iter_mut()) {
                let src = e
                    .buffers
                    .get(&send.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", send.buffer)))?;
                match (src, buf) {
                    (Buf::Half(s), Buf::Half(r)) => {
                        halves.push((s, send.offset as usize, r, recv.offset as usize))
                    }
                    (Buf::Float(s), Buf::Float(r)) => {
                        floats.push((s, send.offset as usize, r, recv.offset as usize))
                    }
                    _ => return Err(plan_error("all-gather between different dtypes")),
                }
            }
            if !halves.is_empty() {
                self.ranks.all_gather_regions(halves, count)
            } else {
                self.ranks.all_gather_regions(floats, count)
            }
        };
        for ((e, (_, recv)), buf) in self.execs.iter_mut().zip(&regions).zip(taken) {
            e.buffers.insert(recv.buffer.clone(), buf);
        }
        result
    }

    fn local_step(&mut self, i: usize, step: &Step) -> Result<(), CliError> {
        let gpu = self.ranks.gpu_of(i);
        match step {
            Step::Kernel(k) => match self.lowering {
                Lowering::Linear(lin) => self.linear_kernel(i, gpu, lin, k),
                Lowering::Attention(att) => self.attention_kernel(i, gpu, att, k),
            },
            Step::Place {
                src,
                dst,
                shape,
                slices,
                ..
            } => {
                let e = &mut self.execs[i];
                let mut to = e
                    .buffers
                    .remove(&dst.buffer)
                    .ok_or_else(|| plan_error(format!("no buffer `{}`", dst.buffer)))?;
                let result = (|| {
                    let from = e
                        .buffers
                        .get(&src.buffer)
                        .ok_or_else(|| plan_error(format!("no buffer `{}`", src.buffer)))?;
                    for (at, off, len) in piece_runs(shape, slices) {
                        let (s, d) = ((src.offset + off) as usize, (dst.offset + at) as usize);
                        let len = len as usize;
                        match (from, &mut to) {
                            (Buf::Half(a), Buf::Half(b)) => gpu.copy_within(a, s..s + len, b, d),
                            (Buf::Float(a), Buf::Float(b)) => gpu.copy_within(a, s..s + len, b, d),
                            _ => return Err(plan_error("place between different dtypes")),
                        }
                        .map_err(gpu_error)?;
                    }
                    Ok(())
                })();
                e.buffers.insert(dst.buffer.clone(), to);
                result
            }
            Step::PrefixCombine {
                slots,
                slot_elements,
                first,
                count,
                init,
                init_value,
                states,
                out,
                ..
            } => {
                let e = &self.execs[i];
                for st in states {
                    let n: u64 = st.shape.iter().product();
                    let (div, modulo) = decay_indexing(&st.shape, &st.decay_dims)?;
                    // The kernel reads every slot's state and decay and writes `n` values:
                    // all of them must lie inside the regions.
                    let fits = (first + count) * slot_elements <= slots.count
                        && st.offset + n <= *slot_elements
                        && st.decay_offset + modulo <= *slot_elements
                        && st.out_offset + n <= out.count
                        && init.as_ref().is_none_or(|r| st.out_offset + n <= r.count);
                    if !fits {
                        return Err(plan_error(format!(
                            "prefix_combine of `{}` reaches outside its regions",
                            st.state
                        )));
                    }
                    let init_addr = match init {
                        Some(r) => self.address(i, gpu, r, st.out_offset)?,
                        None => 0,
                    };
                    let args = [
                        KernelArg::Ptr(self.address(i, gpu, slots, st.offset)?),
                        KernelArg::U64(*slot_elements),
                        KernelArg::U32(*first as u32),
                        KernelArg::U32(*count as u32),
                        KernelArg::Ptr(self.address(i, gpu, slots, st.decay_offset)?),
                        KernelArg::U64(*slot_elements),
                        KernelArg::U64(div),
                        KernelArg::U64(modulo),
                        KernelArg::Ptr(init_addr),
                        KernelArg::F32(*init_value as f32),
                        KernelArg::Ptr(self.address(i, gpu, out, st.out_offset)?),
                        KernelArg::U64(n),
                    ];
                    gpu.launch(&e.loaded.combine, elementwise_dims(n), &args)
                        .map_err(gpu_error)?;
                }
                Ok(())
            }
            Step::Rearrange {
                src,
                dst,
                shape,
                perm,
                ..
            } => {
                let n: u64 = shape.iter().product();
                if src.count != n || dst.count != n || perm.len() != shape.len() {
                    return Err(plan_error("a rearrange between regions of other sizes"));
                }
                let plan = plan_rearrange(shape, perm).ok_or_else(|| {
                    plan_error(format!(
                        "a rearrange of {shape:?} by {perm:?} keeps more than {REARRANGE_DIMS} dims apart"
                    ))
                })?;
                let pad = REARRANGE_DIMS - plan.outer_shape.len();
                let e = &self.execs[i];
                let half = matches!(e.buffers.get(&src.buffer), Some(Buf::Half(_)));
                let kernel = if half {
                    &e.loaded.rearrange16
                } else {
                    &e.loaded.rearrange32
                };
                let mut args = vec![
                    KernelArg::Ptr(self.address(i, gpu, src, 0)?),
                    KernelArg::Ptr(self.address(i, gpu, dst, 0)?),
                    KernelArg::U64(plan.runs()),
                    KernelArg::U64(plan.run_len),
                ];
                args.extend(
                    std::iter::repeat_n(1, pad)
                        .chain(plan.outer_shape.iter().copied())
                        .map(KernelArg::U64),
                );
                args.extend(
                    std::iter::repeat_n(0, pad)
                        .chain(plan.outer_stride.iter().copied())
                        .map(KernelArg::U64),
                );
                // One warp per run.
                gpu.launch(kernel, elementwise_dims(32 * plan.runs()), &args)
                    .map_err(gpu_error)
            }
            other => Err(plan_error(format!("no GPU lowering for {other:?}"))),
        }
    }

    /// The whole shape of a global tensor of the plan.
    fn global_shape(&self, tensor: &str) -> Result<Vec<u64>, CliError> {
        self.plan
            .tensors
            .iter()
            .find(|t| t.name == tensor)
            .map(|t| t.shape.clone())
            .ok_or_else(|| plan_error(format!("no tensor `{tensor}` in the plan")))
    }

    /// The device address of `region` plus `extra` elements, checked against its buffer.
    fn address(&self, i: usize, gpu: &Gpu, region: &Region, extra: u64) -> Result<u64, CliError> {
        let buf = self.execs[i]
            .buffers
            .get(&region.buffer)
            .ok_or_else(|| plan_error(format!("no buffer `{}`", region.buffer)))?;
        if region.offset + region.count > buf.len() as u64 || extra > region.count {
            return Err(plan_error(format!(
                "region [{}, +{}) is outside `{}`",
                region.offset, region.count, region.buffer
            )));
        }
        Ok(buf.address(gpu, region.offset + extra))
    }

    fn arg<'s>(k: &'s KernelStep, tensor: &str, roles: &[ArgRole]) -> Option<&'s PlanArg> {
        k.args
            .iter()
            .find(|a| a.tensor == tensor && roles.contains(&a.role))
    }

    fn linear_kernel(
        &mut self,
        i: usize,
        gpu: &Gpu,
        lin: &CompiledLinear,
        k: &KernelStep,
    ) -> Result<(), CliError> {
        let m = &lin.matched;
        let name = |l: &Layout| self.cascade.tensors[l.tensor].name.clone();
        let (d, e_dim) = (m.spec.head_dim as u64, m.spec.value_dim as u64);
        let len = k.queries.len;
        let (b_n, h_n) = (m.batch, m.heads);
        let slot = (b_n * h_n * d * e_dim) as usize;
        let decay_param = m.decay_param.map(|p| self.cascade.tensors[p].name.clone());
        let rate_addr = match &decay_param {
            Some(p) => {
                let a = Self::arg(k, p, &[ArgRole::Param])
                    .ok_or_else(|| plan_error(format!("no argument `{p}`")))?;
                Some(self.address(i, gpu, &a.region, 0)?)
            }
            None => None,
        };
        let tensor_addr = |l: &Layout, roles: &[ArgRole]| -> Result<u64, CliError> {
            match Self::arg(k, &name(l), roles) {
                Some(a) => self.address(i, gpu, &a.region, 0),
                None => Ok(0),
            }
        };
        let addrs = [
            tensor_addr(&m.q, &[ArgRole::Input])?,
            tensor_addr(&m.k, &[ArgRole::Input])?,
            tensor_addr(&m.v, &[ArgRole::Input])?,
            tensor_addr(&m.o, &[ArgRole::Output])?,
        ];
        let mut strides = [[0u64; 3]; 4];
        for (st, (l, roles)) in strides.iter_mut().zip([
            (&m.q, &[ArgRole::Input][..]),
            (&m.k, &[ArgRole::Input][..]),
            (&m.v, &[ArgRole::Input][..]),
            (&m.o, &[ArgRole::Output][..]),
        ]) {
            if let Some(a) = Self::arg(k, &name(l), roles) {
                *st = local_strides(l, &self.global_shape(&name(l))?, &a.shape)?;
            }
        }
        if k.phase == Phase::Full {
            // Ulysses: the single-pass kernel over the whole sequence on this rank's heads.
            let heads = k.heads.map_or(h_n, |h| h.len);
            let e = &self.execs[i];
            let (ptx, kernel) = e
                .loaded
                .linear_whole
                .as_ref()
                .ok_or_else(|| plan_error("no single-pass linear kernel loaded"))?;
            let args: Vec<KernelArg> = ptx
                .abi
                .iter()
                .map(|p| match &p.role {
                    AbiRole::TensorPtr(t) => KernelArg::Ptr(addrs[t.index()]),
                    AbiRole::HeadParamPtr(_) => KernelArg::Ptr(rate_addr.unwrap_or(0)),
                    AbiRole::QueryLen | AbiRole::KeyLen => KernelArg::U32(len as u32),
                    AbiRole::Heads => KernelArg::U32(heads as u32),
                    AbiRole::KvGroup => KernelArg::U32(1),
                    AbiRole::StrideBatch(t) => KernelArg::U64(strides[t.index()][0]),
                    AbiRole::StrideSeq(t) => KernelArg::U64(strides[t.index()][1]),
                    AbiRole::StrideHead(t) => KernelArg::U64(strides[t.index()][2]),
                    _ => KernelArg::U64(0),
                })
                .collect();
            let dims = LaunchDims {
                grid: ptx.grid(b_n as u32, heads as u32, len as u32),
                block: (ptx.threads, 1, 1),
                dynamic_smem_bytes: ptx.dynamic_smem_bytes,
            };
            return gpu.launch(kernel, dims, &args).map_err(gpu_error);
        }
        let window_key = (k.queries.start, len);
        if let std::collections::hash_map::Entry::Vacant(v) =
            self.execs[i].windows.entry(window_key)
        {
            let (sub, chunk_tiles) = window_chunking(lin, len);
            v.insert(Window {
                chunk_tiles,
                sub: sub as usize,
                slots: gpu
                    .filled((sub as usize + 1) * slot, f32::NAN)
                    .map_err(gpu_error)?,
                chunk_decay: gpu.filled(h_n as usize, 1f32).map_err(gpu_error)?,
                has_states: false,
            });
        }
        let chunk_tiles = self.execs[i].windows[&window_key].chunk_tiles;
        if let std::collections::hash_map::Entry::Vacant(v) =
            self.execs[i].loaded.linear.entry(chunk_tiles)
        {
            let build = |part| -> Result<PtxKernel, CliError> {
                let (prog, _) = lightning_part(&m.spec, &lin.schedule, part)
                    .map_err(|e| plan_error(e.to_string()))?;
                print_ptx(&prog, lin.target).map_err(|e| plan_error(e.to_string()))
            };
            let states = build(Part::ChunkStates { chunk_tiles })?;
            let outputs = build(Part::ChunkOutputs { chunk_tiles })?;
            let ks = gpu
                .load_ptx(&states.text, &states.entry)
                .map_err(gpu_error)?;
            let ko = gpu
                .load_ptx(&outputs.text, &outputs.entry)
                .map_err(gpu_error)?;
            v.insert((states, ks, outputs, ko));
        }
        // The window's scratch leaves its map while this step writes it.
        let mut w = self.execs[i]
            .windows
            .remove(&window_key)
            .ok_or_else(|| plan_error("window scratch missing"))?;
        let result = self.linear_launches(
            i,
            gpu,
            k,
            &mut w,
            LinearLaunch {
                chunk_tiles,
                addrs,
                strides,
                rate_addr,
                len,
                d,
                e_dim,
                b_n,
                h_n,
                grid_x: m.spec.value_dim / lin.schedule.value_block,
            },
        );
        self.execs[i].windows.insert(window_key, w);
        result
    }

    fn linear_launches(
        &self,
        i: usize,
        gpu: &Gpu,
        k: &KernelStep,
        w: &mut Window,
        l: LinearLaunch,
    ) -> Result<(), CliError> {
        let exec = &self.execs[i];
        let slot = (l.b_n * l.h_n * l.d * l.e_dim) as usize;
        let (states_ptx, states_k, outputs_ptx, outputs_k) = &exec.loaded.linear[&l.chunk_tiles];
        let grid = (l.grid_x, (l.b_n * l.h_n) as u32, w.sub as u32);
        let slots_addr = w.slots.device_address(gpu);
        let (sub, len, h_n) = (w.sub as u32, l.len, l.h_n);
        let args = |ptx: &PtxKernel| -> Vec<KernelArg> {
            ptx.abi
                .iter()
                .map(|p| match &p.role {
                    AbiRole::TensorPtr(t) => KernelArg::Ptr(l.addrs[t.index()]),
                    AbiRole::HeadParamPtr(_) => KernelArg::Ptr(l.rate_addr.unwrap_or(0)),
                    AbiRole::StatePtr(_) => KernelArg::Ptr(slots_addr),
                    AbiRole::ChunkBase => KernelArg::U32(1),
                    AbiRole::ChunkTotal => KernelArg::U32(1 + sub),
                    AbiRole::QueryLen | AbiRole::KeyLen => KernelArg::U32(len as u32),
                    AbiRole::Heads => KernelArg::U32(h_n as u32),
                    AbiRole::KvGroup => KernelArg::U32(1),
                    AbiRole::StrideBatch(t) => KernelArg::U64(l.strides[t.index()][0]),
                    AbiRole::StrideSeq(t) => KernelArg::U64(l.strides[t.index()][1]),
                    AbiRole::StrideHead(t) => KernelArg::U64(l.strides[t.index()][2]),
                    _ => KernelArg::U64(0),
                })
                .collect()
        };
        let dims = |ptx: &PtxKernel| LaunchDims {
            grid,
            block: (ptx.threads, 1, 1),
            dynamic_smem_bytes: ptx.dynamic_smem_bytes,
        };
        let state_name = k
            .args
            .iter()
            .find(|a| matches!(a.role, ArgRole::StateOut | ArgRole::StateIn))
            .map(|a| a.tensor.clone())
            .ok_or_else(|| plan_error(format!("{} has no state argument", k.kernel)))?;
        let decay_scale = |tokens: u64| (-LOG2_E * tokens as f64) as f32;
        match k.phase {
            Phase::StateOnly => {
                gpu.launch(states_k, dims(states_ptx), &args(states_ptx))
                    .map_err(gpu_error)?;
                // Each chunk's decay, then the window's state as the decayed sum of chunks.
                let chunk_tokens = l.chunk_tiles as u64 * l.d;
                let decay_addr = w.chunk_decay.device_address(gpu);
                if let Some(rate) = l.rate_addr {
                    launch_decay(
                        gpu,
                        &exec.loaded.decay,
                        rate,
                        decay_addr,
                        h_n,
                        decay_scale(chunk_tokens),
                    )?;
                }
                let out = Self::arg(k, &state_name, &[ArgRole::StateOut])
                    .ok_or_else(|| plan_error("state_only writes no state"))?;
                let combine = [
                    KernelArg::Ptr(slots_addr + 4 * slot as u64),
                    KernelArg::U64(slot as u64),
                    KernelArg::U32(0),
                    KernelArg::U32(sub),
                    KernelArg::Ptr(decay_addr),
                    KernelArg::U64(0),
                    KernelArg::U64(l.d * l.e_dim),
                    KernelArg::U64(h_n),
                    KernelArg::Ptr(0),
                    KernelArg::F32(0.0),
                    KernelArg::Ptr(self.address(i, gpu, &out.region, 0)?),
                    KernelArg::U64(slot as u64),
                ];
                gpu.launch(
                    &exec.loaded.combine,
                    elementwise_dims(slot as u64),
                    &combine,
                )
                .map_err(gpu_error)?;
                if let Some(a) = k.args.iter().find(|a| a.role == ArgRole::DecayOut) {
                    let out = self.address(i, gpu, &a.region, 0)?;
                    let rate = l
                        .rate_addr
                        .ok_or_else(|| plan_error("a decay output without a decay rate"))?;
                    launch_decay(
                        gpu,
                        &exec.loaded.decay,
                        rate,
                        out,
                        a.region.count,
                        decay_scale(len),
                    )?;
                }
                w.has_states = true;
                Ok(())
            }
            Phase::OutputWithPrefix => {
                if !w.has_states && w.sub > 1 {
                    return Err(plan_error(
                        "output_with_prefix on a window whose chunk states were not computed",
                    ));
                }
                let prefix = Self::arg(k, &state_name, &[ArgRole::StateIn])
                    .ok_or_else(|| plan_error("output_with_prefix reads no state"))?;
                let Some(Buf::Float(src)) = exec.buffers.get(&prefix.region.buffer) else {
                    return Err(plan_error(format!(
                        "no f32 buffer `{}`",
                        prefix.region.buffer
                    )));
                };
                // The prefix goes to slot 0, where the output kernel's combine starts.
                let start = prefix.region.offset as usize;
                gpu.copy_within(src, start..start + slot, &mut w.slots, 0)
                    .map_err(gpu_error)?;
                gpu.launch(outputs_k, dims(outputs_ptx), &args(outputs_ptx))
                    .map_err(gpu_error)
            }
            other => Err(plan_error(format!("no linear lowering for {other:?}"))),
        }
    }

    fn attention_kernel(
        &mut self,
        i: usize,
        gpu: &Gpu,
        att: &CompiledKernel,
        k: &KernelStep,
    ) -> Result<(), CliError> {
        let m = &att.schedule.matched;
        let name = |l: &Layout| self.cascade.tensors[l.tensor].name.clone();
        let keys: u64 = k.keys.iter().map(|r| r.len).sum();
        if k.keys.first().map(|r| r.start) != Some(0) || keys != m.n_k {
            return Err(plan_error(
                "the attention kernel runs over every key (a full kernel after the gather)",
            ));
        }
        let (ptx, kernel) = self.execs[i]
            .loaded
            .attention
            .as_ref()
            .ok_or_else(|| plan_error("no attention kernel loaded"))?;
        let region_of = |l: &Layout, role: ArgRole| -> Result<u64, CliError> {
            let a = Self::arg(k, &name(l), &[role])
                .ok_or_else(|| plan_error(format!("{} has no `{}`", k.kernel, name(l))))?;
            self.address(i, gpu, &a.region, 0)
        };
        let addrs = [
            region_of(&m.q, ArgRole::Input)?,
            region_of(&m.k, ArgRole::Input)?,
            region_of(&m.v, ArgRole::Input)?,
            region_of(&m.o, ArgRole::Output)?,
        ];
        let q_len = k.queries.len;
        let heads = k.heads.map_or(m.heads, |h| h.len);
        let mut strides = [[0u64; 3]; 4];
        for (st, (l, role)) in strides.iter_mut().zip([
            (&m.q, ArgRole::Input),
            (&m.k, ArgRole::Input),
            (&m.v, ArgRole::Input),
            (&m.o, ArgRole::Output),
        ]) {
            let a = Self::arg(k, &name(l), &[role])
                .ok_or_else(|| plan_error(format!("{} has no `{}`", k.kernel, name(l))))?;
            *st = local_strides(l, &self.global_shape(&name(l))?, &a.shape)?;
        }
        let mut head_params = Vec::new();
        for &t in &m.head_params {
            let a = Self::arg(k, &self.cascade.tensors[t].name, &[ArgRole::Param])
                .ok_or_else(|| plan_error("a head parameter is not an argument"))?;
            head_params.push(self.address(i, gpu, &a.region, 0)?);
        }
        let scalars: Vec<f32> = m
            .scalar_params
            .iter()
            .map(|t| host_values(self.cascade, self.host, *t).map(|v| v[0] as f32))
            .collect::<Result<_, _>>()?;
        let args: Vec<KernelArg> = ptx
            .abi
            .iter()
            .map(|p| match &p.role {
                AbiRole::TensorPtr(t) => KernelArg::Ptr(addrs[t.index()]),
                AbiRole::HeadParamPtr(h) => KernelArg::Ptr(head_params[h.index()]),
                AbiRole::QueryOffset => KernelArg::U32(k.queries.start as u32),
                AbiRole::QueryLen => KernelArg::U32(q_len as u32),
                AbiRole::KeyLen => KernelArg::U32(m.n_k as u32),
                AbiRole::Heads => KernelArg::U32(heads as u32),
                AbiRole::KvGroup => KernelArg::U32(1),
                AbiRole::StrideBatch(t) => KernelArg::U64(strides[t.index()][0]),
                AbiRole::StrideSeq(t) => KernelArg::U64(strides[t.index()][1]),
                AbiRole::StrideHead(t) => KernelArg::U64(strides[t.index()][2]),
                AbiRole::Scalar(s) => KernelArg::F32(scalars[s.index()]),
                _ => KernelArg::U64(0),
            })
            .collect();
        let dims = LaunchDims {
            grid: ptx.grid(m.batch as u32, heads as u32, q_len as u32),
            block: (ptx.threads, 1, 1),
            dynamic_smem_bytes: ptx.dynamic_smem_bytes,
        };
        gpu.launch(kernel, dims, &args).map_err(gpu_error)
    }

    /// Error parts of this process's output pieces against `want` (the global output `O`
    /// in its own layout), summed over the ranks driven here.
    pub fn compare(&self, output: &str, want: &[f64]) -> Result<[f64; 2], CliError> {
        let g = self
            .plan
            .tensors
            .iter()
            .find(|t| t.name == output)
            .ok_or_else(|| plan_error(format!("no output `{output}`")))?;
        let mut parts = [0.0, 0.0];
        for (i, e) in self.execs.iter().enumerate() {
            let gpu = self.ranks.gpu_of(i);
            let rp = self
                .plan
                .ranks
                .iter()
                .find(|x| x.rank as usize == e.rank)
                .ok_or_else(|| plan_error("rank missing"))?;
            for piece in rp.outputs.iter().filter(|p| p.tensor == output) {
                let Some(Buf::Half(buf)) = e.buffers.get(&piece.buffer) else {
                    return Err(plan_error("outputs are 16-bit"));
                };
                let elem = elem_of(&g.dtype)?.ok_or_else(|| plan_error("outputs are 16-bit"))?;
                gpu.synchronize().map_err(gpu_error)?;
                let got = gpu.download(buf).map_err(gpu_error)?;
                for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                    let (at, from) = (at as usize, (piece.offset + from) as usize);
                    let [a, b] = error_parts(
                        (0..len as usize).map(|x| (from_bits(elem, got[from + x]), want[at + x])),
                    );
                    parts[0] += a;
                    parts[1] += b;
                }
            }
        }
        Ok(parts)
    }
}

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
pub fn schedule(steps: &[&[Step]], ranks: &[usize]) -> Result<Vec<Batch>, CliError> {
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
            return Err(plan_error(format!(
                "the ranks cannot progress: {}",
                where_.join(", ")
            )));
        }
        out.push(Batch::PointToPoint(
            ready.iter().map(|&i| (i, pc[i])).collect(),
        ));
        for i in ready {
            pc[i] += 1;
        }
    }
}

/// How a linear kernel's window of `len` tokens is cut: `(chunks, tiles per chunk)`.
/// Enough chunks that the state pass has about two CTAs per SM to stream K and V; a count
/// that divides the window's tiles, since the combine uses one decay for every chunk (so a
/// window that ends inside a tile, whose last chunk would be shorter, stays one chunk).
fn window_chunking(lin: &CompiledLinear, len: u64) -> (u64, u32) {
    const SMS: u64 = 132;
    let m = &lin.matched;
    let ctas = m.batch * m.heads * (m.spec.value_dim / lin.schedule.value_block) as u64;
    let tiles = len.div_ceil(m.spec.head_dim as u64).max(1);
    if !len.is_multiple_of(m.spec.head_dim as u64) {
        return (1, tiles as u32);
    }
    let mut sub = (2 * SMS).div_ceil(ctas).clamp(2, 16).min(tiles);
    while sub > 1 && !tiles.is_multiple_of(sub) {
        sub -= 1;
    }
    (sub, (tiles / sub) as u32)
}

/// The PTX modules the executor runs for `plan` (entry name, text): what
/// `compile --sp P -o DIR` writes next to `plan.json`.
pub fn lowered_ptx(plan: &Plan, lowering: &Lowering) -> Result<Vec<(String, String)>, CliError> {
    check_lowerable(plan, lowering)?;
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |entry: String, text: String| {
        if !out.iter().any(|(e, _)| *e == entry) {
            out.push((entry, text));
        }
    };
    let target = match lowering {
        Lowering::Linear(k) => k.target,
        Lowering::Attention(k) => k.ptx.target,
    };
    for rank in &plan.ranks {
        for step in &rank.steps {
            match (step, lowering) {
                (Step::Kernel(k), Lowering::Linear(lin)) => {
                    let (_, chunk_tiles) = window_chunking(lin, k.queries.len);
                    let parts = if k.phase == Phase::Full {
                        vec![Part::Whole]
                    } else {
                        vec![
                            Part::ChunkStates { chunk_tiles },
                            Part::ChunkOutputs { chunk_tiles },
                        ]
                    };
                    for part in parts {
                        let (prog, _) = lightning_part(&lin.matched.spec, &lin.schedule, part)
                            .map_err(|e| plan_error(e.to_string()))?;
                        let ptx =
                            print_ptx(&prog, target).map_err(|e| plan_error(e.to_string()))?;
                        push(ptx.entry, ptx.text);
                    }
                }
                (Step::Kernel(_), Lowering::Attention(att)) => {
                    let mut spec = att.schedule.matched.spec.clone();
                    spec.query_offset = true;
                    let (prog, _) = einattn_backends::flash_attention(&spec, &att.schedule.kernel)
                        .map_err(|e| plan_error(e.to_string()))?;
                    let ptx = print_ptx(&prog, target).map_err(|e| plan_error(e.to_string()))?;
                    push(ptx.entry, ptx.text);
                }
                _ => {}
            }
        }
    }
    push("einattn_prefix_combine".into(), prefix_combine_ptx(target));
    push("einattn_chunk_decay".into(), chunk_decay_ptx(target));
    if plan
        .ranks
        .iter()
        .flat_map(|r| &r.steps)
        .any(|s| matches!(s, Step::Rearrange { .. }))
    {
        push("einattn_rearrange_b16".into(), rearrange_ptx(target, 16));
        push("einattn_rearrange_b32".into(), rearrange_ptx(target, 32));
    }
    Ok(out)
}

/// `n` values uniform in [-1, 1) as 16-bit bits, drawn on every core from `seed`.
fn drawn_bits(elem: Elem, n: usize, seed: u64) -> Vec<u16> {
    use rand::{Rng, SeedableRng};
    const BLOCK: usize = 1 << 16;
    let mut out = vec![0u16; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = n.div_ceil(BLOCK).div_ceil(threads).max(1) * BLOCK;
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(t as u64 + 1);
                for x in chunk {
                    *x = to_bits(elem, rng.random_range(-1.0..1.0));
                }
            });
        }
    });
    out
}

fn launch_decay(
    gpu: &Gpu,
    kernel: &Kernel,
    rate: u64,
    out: u64,
    n: u64,
    scale: f32,
) -> Result<(), CliError> {
    let args = [
        KernelArg::Ptr(rate),
        KernelArg::Ptr(out),
        KernelArg::U32(n as u32),
        KernelArg::F32(scale),
    ];
    gpu.launch(kernel, elementwise_dims(n), &args)
        .map_err(gpu_error)
}

fn elementwise_dims(n: u64) -> LaunchDims {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as u64).clamp(1, 4096) as u32;
    LaunchDims {
        grid: (blocks, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
        dynamic_smem_bytes: 0,
    }
}

/// `(div, mod)` such that element `i` of a row-major state of `shape` reads decay
/// `(i / div) % mod`: the decay dims must be adjacent.
fn decay_indexing(shape: &[u64], dims: &[usize]) -> Result<(u64, u64), CliError> {
    let (Some(&lo), Some(&hi)) = (dims.iter().min(), dims.iter().max()) else {
        return Ok((1, 1));
    };
    if hi - lo + 1 != dims.len() || hi >= shape.len() {
        return Err(plan_error(format!(
            "decay over dims {dims:?} of a state {shape:?}: only adjacent dims are lowered"
        )));
    }
    let div = shape[hi + 1..].iter().product();
    let modulo = shape[lo..=hi].iter().product();
    Ok((div, modulo))
}

/// The host values of an input or parameter, stored (absent entries as 0).
fn host_values<'h>(
    cascade: &Cascade,
    host: &'h Inputs,
    t: einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>,
) -> Result<std::borrow::Cow<'h, [f64]>, CliError> {
    match host.get(&t) {
        Some(d) => Ok(d.stored()),
        None => match cascade.tensors[t].default {
            Some(v) => Ok(vec![v; cascade.tensor_elements(t) as usize].into()),
            None => Err(plan_error(format!(
                "no values for `{}`",
                cascade.tensors[t].name
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{build_kernel, Kernel, KernelArgs, SourceFile};
    use einattn_backends::plan::plan_cascade;
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_passes::sp::SpOptions;

    fn layout(sb: u64, ss: u64, sh: u64) -> Layout {
        Layout {
            tensor: einattn_ir::arena::Handle::new(0),
            stride_batch: sb,
            stride_seq: ss,
            stride_head: sh,
            elements: 0,
        }
    }

    #[test]
    fn local_strides_follow_the_piece_shape() {
        // [B, N, H, d] = [2, 64, 4, 8]: a 16-token window shrinks the batch stride.
        let bnhd = layout(64 * 32, 32, 8);
        let strides = local_strides(&bnhd, &[2, 64, 4, 8], &[2, 16, 4, 8]).ok();
        assert_eq!(strides, Some([16 * 32, 32, 8]));
        // Half the heads (Ulysses): the sequence stride shrinks too.
        let strides = local_strides(&bnhd, &[2, 64, 4, 8], &[2, 64, 2, 8]).ok();
        assert_eq!(strides, Some([64 * 16, 16, 8]));
        // [B, H, N, d]: batch and head are outside the sequence.
        let bhnd = layout(4 * 64 * 8, 8, 64 * 8);
        let strides = local_strides(&bhnd, &[2, 4, 64, 8], &[2, 4, 16, 8]).ok();
        assert_eq!(strides, Some([4 * 16 * 8, 8, 16 * 8]));
        // One head: head and sequence strides coincide in the whole and in the piece.
        let one = layout(64 * 8, 8, 8);
        assert_eq!(
            local_strides(&one, &[1, 64, 1, 8], &[1, 16, 1, 8]).ok(),
            Some([16 * 8, 8, 8])
        );
        assert!(local_strides(&layout(7, 1, 1), &[2, 3], &[2, 3]).is_err());
    }

    #[test]
    fn decay_indexing_reads_the_decay_dims_of_a_state() {
        // KV [b, h, d, e] = [2, 3, 4, 5] with a per-head decay: (i / 20) % 3.
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[1]).ok(), Some((20, 3)));
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[0, 1]).ok(), Some((20, 6)));
        assert_eq!(decay_indexing(&[2, 3, 4, 5], &[]).ok(), Some((1, 1)));
        assert!(decay_indexing(&[2, 3, 4, 5], &[0, 2]).is_err());
    }

    fn compiled(file: &str, defines: &[(&str, u64)]) -> (Cascade, Kernel) {
        let source = SourceFile::load(std::path::Path::new(file)).expect("example loads");
        let defines: Vec<(String, u64)> =
            defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        build_kernel(&source, &defines, &KernelArgs::default())
            .map_err(|e| e.message)
            .expect("compiles")
    }

    #[test]
    fn window_chunks_divide_the_window_and_fill_the_gpu() {
        let (_, kernel) = compiled(
            "examples/lightning.ein",
            &[("B", 4), ("H", 16), ("D", 128), ("N", 262144)],
        );
        let Kernel::Linear(lin) = kernel else {
            panic!("lightning is linear attention")
        };
        for len in [131072u64, 65536, 1024, 128] {
            let (sub, tiles) = window_chunking(&lin, len);
            assert_eq!(sub * tiles as u64 * 128, len.max(128), "len {len}");
            assert!(sub >= 1);
        }
        // 128 CTAs per chunk: two chunks give about two CTAs per SM.
        assert_eq!(window_chunking(&lin, 131072).0, 2);
        // A window ending inside a tile is one chunk (its last chunk would decay less).
        assert_eq!(window_chunking(&lin, 131072 - 64), (1, 1024));
    }

    /// Every module `compile --sp` writes for the two lowered schemes assembles.
    #[test]
    fn lowered_kernels_assemble() {
        let Some(ptxas) = ptxas_for_test("lowered_kernels_assemble") else {
            return;
        };
        for (file, defines, scheme) in [
            (
                "examples/lightning.ein",
                vec![("N", 4096), ("D", 128)],
                "lasp2",
            ),
            (
                "examples/attention_causal.ein",
                vec![("N", 4096), ("D", 128)],
                "allgather_kv_zigzag",
            ),
            (
                "examples/lightning.ein",
                vec![("N", 4096), ("D", 128)],
                "ulysses",
            ),
            (
                "examples/attention_causal.ein",
                vec![("N", 4096), ("D", 128)],
                "ulysses",
            ),
        ] {
            let (cascade, kernel) = compiled(file, &defines);
            let mut options = SpOptions::new(2);
            options.scheme = Some(scheme.to_string());
            let (_, plan) = plan_cascade(&cascade, &options).expect("plans");
            let lowering = match &kernel {
                Kernel::Linear(k) => Lowering::Linear(k),
                Kernel::Attention(k) => Lowering::Attention(k),
            };
            let modules = lowered_ptx(&plan, &lowering)
                .map_err(|e| e.message)
                .expect("lowers");
            assert!(
                modules.len() >= 3,
                "{file}: {:?}",
                modules.iter().map(|m| &m.0).collect::<Vec<_>>()
            );
            for (entry, text) in modules {
                let report = assemble(&ptxas, &text, "sm_80")
                    .unwrap_or_else(|e| panic!("{file} {entry}: {e}"));
                assert!(!report.spills(), "{file} {entry}: {report:?}");
            }
        }
    }

    /// Every step once, collectives together, every send with its receive, for the
    /// lowered schemes at several device counts, driven from one process or one rank each.
    #[test]
    fn schedules_cover_every_step_and_pair_every_send() {
        for (file, n, schemes) in [
            (
                "examples/lightning.ein",
                3072u64,
                vec!["lasp2", "lasp1", "ulysses"],
            ),
            (
                "examples/attention_causal.ein",
                4096,
                vec!["allgather_kv_zigzag", "allgather_kv", "ulysses"],
            ),
        ] {
            let (cascade, _) = compiled(file, &[("N", n)]);
            for scheme in schemes {
                for p in [2u64, 3, 4, 8] {
                    let mut options = SpOptions::new(p);
                    options.scheme = Some(scheme.to_string());
                    let Ok((_, plan)) = plan_cascade(&cascade, &options) else {
                        // Zigzag needs 2P chunks; Ulysses needs P to divide the heads (2 here).
                        assert!(
                            p == 3 || p == 8 || scheme == "ulysses",
                            "{file} {scheme} P={p}"
                        );
                        continue;
                    };
                    let steps: Vec<&[Step]> =
                        plan.ranks.iter().map(|r| r.steps.as_slice()).collect();
                    let ranks: Vec<usize> = plan.ranks.iter().map(|r| r.rank as usize).collect();
                    let order = schedule(&steps, &ranks)
                        .map_err(|e| e.message)
                        .unwrap_or_else(|e| panic!("{file} {scheme} P={p}: {e}"));
                    let mut seen: Vec<Vec<bool>> =
                        steps.iter().map(|s| vec![false; s.len()]).collect();
                    let mut next = vec![0usize; steps.len()];
                    for batch in &order {
                        let at: Vec<(usize, usize)> = match batch {
                            Batch::Local(i, k) => vec![(*i, *k)],
                            Batch::Collective(at) => {
                                assert_eq!(at.len(), steps.len(), "a collective on every rank");
                                at.clone()
                            }
                            Batch::PointToPoint(at) => {
                                // Each send in the group meets a receive from its sender.
                                for &(i, k) in at {
                                    if let Step::SendRecv { send: Some(s), .. } = &steps[i][k] {
                                        let j = s.peer as usize;
                                        assert!(at.iter().any(|&(x, y)| x == j
                                            && matches!(&steps[x][y], Step::SendRecv { recv: Some(r), .. } if r.peer as usize == ranks[i])));
                                    }
                                }
                                at.clone()
                            }
                        };
                        for (i, k) in at {
                            assert_eq!(k, next[i], "{scheme} P={p}: rank {i} out of order");
                            seen[i][k] = true;
                            next[i] += 1;
                        }
                    }
                    assert!(
                        seen.iter().flatten().all(|&x| x),
                        "{scheme} P={p}: steps left"
                    );
                    // One process per GPU: each rank alone schedules all its steps.
                    for (i, s) in steps.iter().enumerate() {
                        let alone = schedule(&[s], &[ranks[i]])
                            .map_err(|e| e.message)
                            .expect("alone");
                        assert_eq!(alone.len(), s.len());
                    }
                }
            }
        }
    }

    #[test]
    fn edited_plans_that_reach_outside_their_tensors_are_refused() {
        let (cascade, _) = compiled("examples/lightning.ein", &[("N", 2048)]);
        let (_, plan) = plan_cascade(&cascade, &SpOptions::new(2)).expect("plans");
        assert!(check_shapes(&plan, &cascade).is_ok());
        let mut wrong_shape = plan.clone();
        wrong_shape.tensors[0].shape[1] += 1;
        assert!(check_shapes(&wrong_shape, &cascade).is_err());
        let mut outside = plan.clone();
        let BufferInit::Pieces { pieces } = &mut outside.ranks[1].buffers[0].init else {
            panic!("the first buffer holds pieces of an input")
        };
        pieces[0].slices[0].start += 1;
        let err = check_shapes(&outside, &cascade).err().map(|e| e.message);
        assert!(err.is_some_and(|m| m.contains("outside")));
        let mut no_ranks = plan.clone();
        no_ranks.ranks.clear();
        let (_, kernel) = compiled("examples/lightning.ein", &[("N", 2048)]);
        let Kernel::Linear(lin) = &kernel else {
            panic!("linear attention")
        };
        assert!(check_lowerable(&no_ranks, &Lowering::Linear(lin)).is_err());
        let mut past_buffer = plan;
        past_buffer.ranks[0].buffers[0].elements -= 1;
        assert!(check_shapes(&past_buffer, &cascade).is_err());
    }

    #[test]
    fn plans_without_a_lowering_are_refused_before_gpu_work() {
        let (cascade, kernel) = compiled("examples/attention_causal.ein", &[]);
        let Kernel::Attention(att) = &kernel else {
            panic!("softmax attention")
        };
        let mut refused = 0;
        for scheme in ["ring", "ring_zigzag", "tokenring", "tokenring_zigzag"] {
            let mut options = SpOptions::new(2);
            options.scheme = Some(scheme.to_string());
            let Ok((_, plan)) = plan_cascade(&cascade, &options) else {
                continue;
            };
            refused += 1;
            let err = check_lowerable(&plan, &Lowering::Attention(att))
                .err()
                .unwrap_or_else(|| panic!("{scheme} was accepted"));
            assert!(err.message.contains("does not lower"), "{}", err.message);
        }
        assert!(refused >= 2, "only {refused} schemes planned");
        for scheme in ["allgather_kv_zigzag", "ulysses"] {
            let mut options = SpOptions::new(2);
            options.scheme = Some(scheme.to_string());
            let (_, plan) = plan_cascade(&cascade, &options).expect("plans");
            assert!(
                check_lowerable(&plan, &Lowering::Attention(att)).is_ok(),
                "{scheme}"
            );
        }
    }
}
