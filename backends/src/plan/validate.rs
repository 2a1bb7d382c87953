//! Checks a plan on the CPU before anything runs it: a `plan.json` and its manifest may be
//! edited by hand, so every count, offset, name and peer the executors index with is
//! checked here, with arithmetic that cannot overflow, and nothing is allocated in
//! proportion to a number read from the file.
//!
//! What holds after [`validate`] succeeds:
//! - the ranks are `0..world_size`, in order, and their collectives line up (same calls,
//!   same counts, same dtypes) so that [`order`] finds an order in which every rank
//!   progresses, whether one process drives every rank or each rank runs alone;
//! - every buffer has a known dtype and every region, piece and placement lies inside its
//!   buffer and its tensor; every peer is another rank;
//! - every kernel step names kernels of the manifest, with the arguments their contracts
//!   read, and the global tensors agree with the contracts in shape and dtype;
//! - every pair of a rank's steps that touch the same memory (one writing) is ordered by
//!   its stream or its events ([`super::races`]).

use super::order::order;
use super::*;
use crate::abi::{Dtype, KernelSet};
use crate::family::elementwise::{self, plan_rearrange};

/// Elements a plan may declare for one tensor or buffer (2^40: far past any GPU, small
/// enough that sums of a few of them cannot overflow).
const MAX_ELEMENTS: u64 = 1 << 40;

/// The dtypes of plan buffers.
fn buffer_dtype(dtype: &str) -> Result<Dtype, String> {
    match Dtype::from_name(dtype) {
        Some(d @ (Dtype::Bf16 | Dtype::F16 | Dtype::F32)) => Ok(d),
        _ => Err(format!("dtype `{dtype}` is not one of bf16, f16, f32")),
    }
}

/// The product of `shape`, if it stays under [`MAX_ELEMENTS`].
fn elements(shape: &[u64]) -> Result<u64, String> {
    shape
        .iter()
        .try_fold(1u64, |acc, &x| {
            acc.checked_mul(x).filter(|&n| n <= MAX_ELEMENTS)
        })
        .ok_or_else(|| format!("shape {shape:?} has more than 2^40 elements"))
}

/// The end of `offset + count`, if it stays under [`MAX_ELEMENTS`].
fn end(offset: u64, count: u64) -> Option<u64> {
    offset.checked_add(count).filter(|&e| e <= MAX_ELEMENTS)
}

struct RankCheck<'p> {
    plan: &'p Plan,
    rank: &'p RankPlan,
}

impl RankCheck<'_> {
    fn fail(&self, what: String) -> String {
        format!("rank {}: {what}", self.rank.rank)
    }

    fn buffer(&self, name: &str) -> Result<&Buffer, String> {
        self.rank
            .buffers
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| self.fail(format!("no buffer `{name}`")))
    }

    /// A region inside its buffer; returns the buffer's dtype.
    fn region(&self, r: &Region) -> Result<Dtype, String> {
        let b = self.buffer(&r.buffer)?;
        if end(r.offset, r.count).is_none_or(|e| e > b.elements) {
            return Err(self.fail(format!(
                "region [{}, +{}) is outside buffer `{}` of {} elements",
                r.offset, r.count, r.buffer, b.elements
            )));
        }
        buffer_dtype(&b.dtype)
    }

    fn tensor(&self, name: &str) -> Result<&GlobalTensor, String> {
        self.plan
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| self.fail(format!("no global tensor `{name}`")))
    }

    /// Slices of a tensor of `shape` inside it; returns the packed elements they select.
    fn slices(&self, shape: &[u64], slices: &[DimSlice]) -> Result<u64, String> {
        let mut dims = shape.to_vec();
        for s in slices {
            let extent = shape.get(s.dim).copied().ok_or_else(|| {
                self.fail(format!(
                    "a slice of dim {} of a {}-dim tensor",
                    s.dim,
                    shape.len()
                ))
            })?;
            if end(s.start, s.len).is_none_or(|e| e > extent) {
                return Err(self.fail(format!(
                    "slice [{}, +{}) of dim {} is outside its extent {extent}",
                    s.start, s.len, s.dim
                )));
            }
            dims[s.dim] = s.len;
        }
        elements(&dims).map_err(|e| self.fail(e))
    }

    fn peer(&self, peer: u64) -> Result<(), String> {
        if peer >= self.plan.world_size || peer == self.rank.rank {
            return Err(self.fail(format!("peer {peer} is not another rank")));
        }
        Ok(())
    }

    /// The largest end of every region, piece and argument on this rank, by buffer: a
    /// buffer is exactly as large as its uses (an edit that grows one past them would only
    /// allocate memory nothing reads).
    fn uses(&self) -> std::collections::HashMap<&str, u64> {
        let mut used: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        let mut note = |b: &'_ str, e: Option<u64>| {
            let slot = used.entry(self.intern(b)).or_insert(0);
            *slot = (*slot).max(e.unwrap_or(u64::MAX));
        };
        for r in self.rank.steps.iter().flat_map(|s| s.regions()) {
            note(&r.buffer, end(r.offset, r.count));
        }
        used
    }

    /// A buffer name of this rank as a `&str` of the plan (for [`RankCheck::uses`]).
    fn intern<'s>(&'s self, name: &str) -> &'s str {
        self.rank
            .buffers
            .iter()
            .find(|b| b.name == name)
            .map_or("", |b| b.name.as_str())
    }

    fn buffers(&self) -> Result<(), String> {
        for (i, b) in self.rank.buffers.iter().enumerate() {
            buffer_dtype(&b.dtype).map_err(|e| self.fail(format!("buffer `{}`: {e}", b.name)))?;
            if b.elements > MAX_ELEMENTS {
                return Err(self.fail(format!("buffer `{}` has more than 2^40 elements", b.name)));
            }
            if self.rank.buffers[..i].iter().any(|o| o.name == b.name) {
                return Err(self.fail(format!("buffer `{}` is declared twice", b.name)));
            }
            if let BufferInit::Value { value } = &b.init {
                if !value.is_finite() {
                    return Err(self.fail(format!("buffer `{}` starts at {value}", b.name)));
                }
            }
            if let BufferInit::Pieces { pieces } = &b.init {
                for p in pieces {
                    if p.buffer != b.name {
                        return Err(self.fail(format!(
                            "a piece of buffer `{}` names buffer `{}`",
                            b.name, p.buffer
                        )));
                    }
                    self.piece(p)?;
                }
            }
        }
        for p in &self.rank.outputs {
            self.piece(p)?;
        }
        let uses = self.uses();
        for b in &self.rank.buffers {
            let pieces = match &b.init {
                BufferInit::Pieces { pieces } => pieces
                    .iter()
                    .filter_map(|p| {
                        let t = self.plan.tensors.iter().find(|t| t.name == p.tensor)?;
                        end(p.offset, self.slices(&t.shape, &p.slices).ok()?)
                    })
                    .max(),
                _ => None,
            };
            let outputs = self
                .rank
                .outputs
                .iter()
                .filter(|p| p.buffer == b.name)
                .filter_map(|p| {
                    let t = self.plan.tensors.iter().find(|t| t.name == p.tensor)?;
                    end(p.offset, self.slices(&t.shape, &p.slices).ok()?)
                })
                .max();
            let needed = [uses.get(b.name.as_str()).copied(), pieces, outputs]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            if b.elements > needed {
                return Err(self.fail(format!(
                    "buffer `{}` has {} elements, its uses reach {needed}",
                    b.name, b.elements
                )));
            }
        }
        Ok(())
    }

    fn piece(&self, p: &Piece) -> Result<(), String> {
        let t = self.tensor(&p.tensor)?;
        let packed = self.slices(&t.shape, &p.slices)?;
        let b = self.buffer(&p.buffer)?;
        if end(p.offset, packed).is_none_or(|e| e > b.elements) {
            return Err(self.fail(format!(
                "a piece of `{}` reaches outside the tensor or buffer `{}`",
                p.tensor, p.buffer
            )));
        }
        if buffer_dtype(&b.dtype)? != buffer_dtype(&t.dtype)? {
            return Err(self.fail(format!(
                "a piece of `{}` ({}) is stored in `{}` ({})",
                p.tensor, t.dtype, b.name, b.dtype
            )));
        }
        Ok(())
    }

    fn step(&self, step: &Step, kernels: &KernelSet) -> Result<(), String> {
        let same = |a: Dtype, b: Dtype, what: &str| {
            if a == b {
                Ok(())
            } else {
                Err(self.fail(format!("{what} between {} and {}", a.name(), b.name())))
            }
        };
        match step {
            Step::Kernel(k) => self.kernel(k, kernels),
            Step::AllGather {
                send, recv, dtype, ..
            } => {
                let (a, b) = (self.region(send)?, self.region(recv)?);
                same(a, b, "an all-gather")?;
                same(a, buffer_dtype(dtype)?, "an all-gather")?;
                if send.count.checked_mul(self.plan.world_size) != Some(recv.count) {
                    return Err(self.fail(format!(
                        "an all-gather of {} elements into {} (world size {})",
                        send.count, recv.count, self.plan.world_size
                    )));
                }
                Ok(())
            }
            Step::AllToAll {
                send,
                recv,
                count_per_peer,
                dtype,
                ..
            } => {
                let (a, b) = (self.region(send)?, self.region(recv)?);
                same(a, b, "an all-to-all")?;
                same(a, buffer_dtype(dtype)?, "an all-to-all")?;
                let total = count_per_peer.checked_mul(self.plan.world_size);
                if total.is_none_or(|t| t > send.count || t > recv.count) {
                    return Err(self.fail("an all-to-all larger than its regions".into()));
                }
                Ok(())
            }
            Step::AllReduce { .. } | Step::ReduceScatter { .. } => {
                Err(self.fail(format!("`{}` steps have no GPU lowering", step.op_name())))
            }
            Step::LseMerge {
                into, from, stats, ..
            } => {
                for r in [into, from] {
                    if self.region(r)? != Dtype::F32 {
                        return Err(self.fail("a merge of non-f32 statistics".into()));
                    }
                }
                if into.buffer == from.buffer
                    && into.offset < from.offset.saturating_add(from.count)
                    && from.offset < into.offset.saturating_add(into.count)
                {
                    return Err(self.fail("a merge of overlapping regions".into()));
                }
                stats::merge_launches(into, from, stats).map_err(|e| self.fail(e))?;
                if !kernels
                    .manifest
                    .kernels
                    .iter()
                    .any(|c| c.kernel == elementwise::LSE_MERGE)
                {
                    return Err(self.fail(format!(
                        "a merge, and the manifest lacks `{}`",
                        elementwise::LSE_MERGE
                    )));
                }
                Ok(())
            }
            Step::SendRecv {
                send, recv, dtype, ..
            } => {
                let dtype = buffer_dtype(dtype)?;
                for r in send.iter().chain(recv) {
                    self.peer(r.peer)?;
                    same(self.region(&r.region)?, dtype, "a send or receive")?;
                }
                if send.is_none() && recv.is_none() {
                    return Err(self.fail("a send/receive step with neither".into()));
                }
                Ok(())
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
                for r in [Some(slots), init.as_ref(), Some(out)]
                    .into_iter()
                    .flatten()
                {
                    if self.region(r)? != Dtype::F32 {
                        return Err(self.fail("a prefix combine of non-f32 states".into()));
                    }
                }
                if !init_value.is_finite() {
                    return Err(self.fail(format!("a prefix combine starting at {init_value}")));
                }
                let slots_end = first
                    .checked_add(*count)
                    .and_then(|n| n.checked_mul(*slot_elements));
                if slots_end.is_none_or(|e| e > slots.count) {
                    return Err(self.fail("a prefix combine reads past its slots".into()));
                }
                for st in states {
                    let n = elements(&st.shape).map_err(|e| self.fail(e))?;
                    let decay = decay_extent(&st.shape, &st.decay_dims).ok_or_else(|| {
                        self.fail(format!("decay dims {:?} of `{}`", st.decay_dims, st.state))
                    })?;
                    let fits = end(st.offset, n).is_some_and(|e| e <= *slot_elements)
                        && end(st.decay_offset, decay).is_some_and(|e| e <= *slot_elements)
                        && end(st.out_offset, n).is_some_and(|e| e <= out.count)
                        && init
                            .as_ref()
                            .is_none_or(|r| end(st.out_offset, n).is_some_and(|e| e <= r.count));
                    if !fits {
                        return Err(self.fail(format!(
                            "prefix_combine of `{}` reaches outside its regions",
                            st.state
                        )));
                    }
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
                let (a, b) = (self.region(src)?, self.region(dst)?);
                same(a, b, "a rearrange")?;
                let n = elements(shape).map_err(|e| self.fail(e))?;
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                if src.count != n
                    || dst.count != n
                    || sorted != (0..shape.len()).collect::<Vec<_>>()
                {
                    return Err(self.fail(format!(
                        "a rearrange of {shape:?} by {perm:?} between regions of {} and {} elements",
                        src.count, dst.count
                    )));
                }
                if plan_rearrange(shape, perm).is_none() {
                    return Err(self.fail(format!(
                        "a rearrange of {shape:?} by {perm:?} keeps too many dims apart"
                    )));
                }
                Ok(())
            }
            Step::Place {
                src,
                dst,
                shape,
                slices,
                dtype,
                ..
            } => {
                let (a, b) = (self.region(src)?, self.region(dst)?);
                same(a, b, "a placement")?;
                same(a, buffer_dtype(dtype)?, "a placement")?;
                let whole = elements(shape).map_err(|e| self.fail(e))?;
                let packed = self.slices(shape, slices)?;
                if packed > src.count || whole > dst.count {
                    return Err(self.fail(format!(
                        "a placement of {packed} of {whole} elements from {} into {}",
                        src.count, dst.count
                    )));
                }
                Ok(())
            }
        }
    }

    fn kernel(&self, k: &KernelStep, kernels: &KernelSet) -> Result<(), String> {
        let contracts = k
            .launch
            .iter()
            .map(|e| {
                kernels.manifest.kernel(e).ok_or_else(|| {
                    self.fail(format!(
                        "{} launches `{e}`, which the manifest lacks",
                        k.kernel
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let wanted = match k.phase {
            Phase::Full | Phase::Partial | Phase::Epilogue => 1,
            Phase::StateOnly | Phase::OutputWithPrefix => 2,
        };
        if contracts.len() != wanted {
            return Err(self.fail(format!(
                "{} launches {} kernels; a `{:?}` step launches {wanted}",
                k.kernel,
                contracts.len(),
                k.phase
            )));
        }
        for a in &k.args {
            let t = self.tensor_or_state(&a.tensor, a.role)?;
            let n = elements(&a.shape).map_err(|e| self.fail(e))?;
            self.region(&a.region)?;
            if n > a.region.count {
                return Err(self.fail(format!(
                    "argument `{}` of shape {:?} in a region of {} elements",
                    a.tensor, a.shape, a.region.count
                )));
            }
            if let Some(t) = t {
                if t.shape.len() != a.shape.len()
                    || t.shape.iter().zip(&a.shape).any(|(g, l)| l > g)
                {
                    return Err(self.fail(format!(
                        "argument `{}` of shape {:?} is not a piece of {:?}",
                        a.tensor, a.shape, t.shape
                    )));
                }
            }
        }
        if end(k.queries.start, k.queries.len).is_none_or(|e| e > self.plan.sequence.tokens) {
            return Err(self.fail(format!("{} computes queries past the sequence", k.kernel)));
        }
        if let Some(h) = &k.heads {
            for c in &contracts {
                let heads = c.sizes.get("heads").copied().unwrap_or(0);
                if h.len == 0 || end(h.start, h.len).is_none_or(|e| e > heads) {
                    return Err(self.fail(format!(
                        "{} computes heads [{}, +{}) of `{}`'s {heads}",
                        k.kernel, h.start, h.len, c.kernel
                    )));
                }
            }
        }
        for r in &k.keys {
            if end(r.start, r.len).is_none_or(|e| e > self.plan.sequence.tokens) {
                return Err(self.fail(format!("{} reads keys past the sequence", k.kernel)));
            }
        }
        // A full, partial or epilogue step runs its kernel on every tensor the kernel reads
        // (a partial's row outputs are statistics it writes); the chunked state kernels get
        // null pointers for the tensors their phase does not touch (Q and O of the
        // chunk-state pass).
        if matches!(k.phase, Phase::Full | Phase::Partial | Phase::Epilogue) {
            for c in &contracts {
                for t in &c.tensors {
                    let arg = k.args.iter().find(|a| a.tensor == t.name);
                    let Some(arg) = arg else {
                        return Err(self.fail(format!(
                            "{} binds no argument for `{}`, which `{}` reads",
                            k.kernel, t.name, c.kernel
                        )));
                    };
                    if k.phase != Phase::Full {
                        self.fits_contract(k, arg, t)?;
                    }
                }
            }
        }
        if k.phase == Phase::Partial {
            for c in &contracts {
                for s in &c.scratch {
                    let arg = k
                        .args
                        .iter()
                        .find(|a| a.tensor == s.name && a.role == ArgRole::StatsOut)
                        .ok_or_else(|| {
                            self.fail(format!(
                                "{} binds no statistic `{}`, which `{}` writes",
                                k.kernel, s.name, c.kernel
                            ))
                        })?;
                    // Row outputs are [B, H, N_q] at the step's query count.
                    let rows = elements(&arg.shape).map_err(|e| self.fail(e))?;
                    let b_h = c.compiled_size("batch").unwrap_or(0)
                        * c.compiled_size("heads").unwrap_or(0);
                    if self.region(&arg.region)? != Dtype::F32
                        || b_h.checked_mul(k.queries.len) != Some(rows)
                    {
                        return Err(self.fail(format!(
                            "{}: statistic `{}` of shape {:?} is not [B, H, {}] f32",
                            k.kernel, s.name, arg.shape, k.queries.len
                        )));
                    }
                }
                stats::partial_offset(k, c).map_err(|e| self.fail(e))?;
                let keys: u64 = k.keys.iter().map(|r| r.len).sum();
                if keys == 0 || k.queries.len == 0 {
                    return Err(self.fail(format!("{}: an empty partial", k.kernel)));
                }
            }
        }
        if wanted == 2 {
            let chunks = k.chunks.filter(|&c| c >= 1 && c <= k.queries.len.max(1));
            let Some(chunks) = chunks else {
                return Err(self.fail(format!("{} needs a chunk count", k.kernel)));
            };
            // The chunk kernels cover the window in `chunks` chunks of their own length.
            let per_chunk = contracts[0].grid_formula[2].divide_by;
            let covered = per_chunk.checked_mul(chunks);
            if covered.is_none_or(|c| c < k.queries.len || c - k.queries.len >= per_chunk) {
                return Err(self.fail(format!(
                    "{}: {chunks} chunks of {per_chunk} tokens do not cover a window of {}",
                    k.kernel, k.queries.len
                )));
            }
        }
        Ok(())
    }

    /// A statistic argument of a partial or epilogue step against the contract tensor that
    /// stands for it: f32, of the contract's rank, no extent past the contract's. (Plan
    /// tensors are checked as pieces of their global shape.)
    fn fits_contract(
        &self,
        k: &KernelStep,
        arg: &crate::plan::KernelArg,
        t: &crate::abi::ContractTensor,
    ) -> Result<(), String> {
        if self.plan.tensors.iter().any(|g| g.name == t.name) {
            return Ok(());
        }
        let dtype = self.region(&arg.region)?;
        if dtype != t.dtype
            || arg.shape.len() != t.shape.len()
            || arg.shape.iter().zip(&t.shape).any(|(l, g)| l > g)
        {
            return Err(self.fail(format!(
                "{}: statistic `{}` is {} {:?}; `{}` takes {} pieces of {:?}",
                k.kernel,
                arg.tensor,
                dtype.name(),
                arg.shape,
                t.name,
                t.dtype.name(),
                t.shape
            )));
        }
        Ok(())
    }

    /// A kernel argument's global tensor (`None` for a state, which has no global form).
    fn tensor_or_state(&self, name: &str, role: ArgRole) -> Result<Option<&GlobalTensor>, String> {
        match role {
            ArgRole::Input | ArgRole::Output | ArgRole::Param => self.tensor(name).map(Some),
            _ => Ok(None),
        }
    }
}

/// Values the decay of a state spans (the product of its decay dims' extents), if the dims
/// are adjacent and inside the state.
fn decay_extent(shape: &[u64], dims: &[usize]) -> Option<u64> {
    let (Some(&lo), Some(&hi)) = (dims.iter().min(), dims.iter().max()) else {
        return Some(1);
    };
    if hi - lo + 1 != dims.len() || hi >= shape.len() {
        return None;
    }
    elements(&shape[lo..=hi]).ok()
}

/// The collectives of a rank as comparable signatures.
fn collectives(rank: &RankPlan) -> Vec<String> {
    rank.steps
        .iter()
        .filter(|s| s.is_collective())
        .map(|s| match s {
            Step::AllGather { send, dtype, .. } => format!("all_gather {} {dtype}", send.count),
            Step::AllToAll {
                count_per_peer,
                dtype,
                ..
            } => format!("all_to_all {count_per_peer} {dtype}"),
            other => other.op_name().to_string(),
        })
        .collect()
}

/// Checks `plan` and the kernels it launches (see the module docs).
pub fn validate(plan: &Plan, kernels: &KernelSet) -> Result<(), String> {
    if plan.format != FORMAT {
        return Err(format!("format `{}` is not `{FORMAT}`", plan.format));
    }
    // Compared as counts before anything is built per rank: a world size read from the
    // file allocates nothing.
    if plan.world_size == 0 || plan.ranks.len() as u64 != plan.world_size {
        return Err(format!(
            "a plan for {} devices must list that many ranks (it lists {})",
            plan.world_size,
            plan.ranks.len()
        ));
    }
    for (i, r) in plan.ranks.iter().enumerate() {
        if r.rank != i as u64 {
            return Err(format!("rank {i} is listed as rank {}", r.rank));
        }
    }
    for (i, t) in plan.tensors.iter().enumerate() {
        buffer_dtype(&t.dtype).map_err(|e| format!("tensor `{}`: {e}", t.name))?;
        elements(&t.shape).map_err(|e| format!("tensor `{}`: {e}", t.name))?;
        if t.dims.len() != t.shape.len() {
            return Err(format!(
                "tensor `{}` names {} dims for a shape of {}",
                t.name,
                t.dims.len(),
                t.shape.len()
            ));
        }
        if plan.tensors[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("tensor `{}` is declared twice", t.name));
        }
    }
    for c in &kernels.manifest.kernels {
        for t in &c.tensors {
            let Some(g) = plan.tensors.iter().find(|g| g.name == t.name) else {
                continue;
            };
            if g.shape != t.shape || buffer_dtype(&g.dtype)? != t.dtype {
                return Err(format!(
                    "`{}` is {} {:?} in the plan and {} {:?} in kernel `{}`",
                    t.name,
                    g.dtype,
                    g.shape,
                    t.dtype.name(),
                    t.shape,
                    c.kernel
                ));
            }
        }
    }
    for rank in &plan.ranks {
        let check = RankCheck { plan, rank };
        check.buffers()?;
        for step in &rank.steps {
            check.step(step, kernels)?;
        }
    }
    let first = collectives(&plan.ranks[0]);
    for r in &plan.ranks[1..] {
        if collectives(r) != first {
            return Err(format!(
                "rank {}'s collectives differ from rank 0's",
                r.rank
            ));
        }
    }
    let steps: Vec<&[Step]> = plan.ranks.iter().map(|r| r.steps.as_slice()).collect();
    let ranks: Vec<usize> = (0..plan.ranks.len()).collect();
    order(&steps, &ranks)?;
    // An executor may run a rank's streams concurrently: the events must order them.
    super::races::check_races(plan)?;
    Ok(())
}

/// Checks a plan folder's plan against the source it was compiled from (the folder's
/// `source.ein` may have been edited since): every tensor a step or the plan names exists
/// there, with the plan's shape.
pub fn matches_source(plan: &Plan, cascade: &einattn_ir::Cascade) -> Result<(), String> {
    for rank in &plan.ranks {
        for step in &rank.steps {
            let names: Vec<&str> = match step {
                // A decay output is named after its state.
                Step::Kernel(k) => k
                    .args
                    .iter()
                    .map(|a| a.tensor.strip_suffix("__decay").unwrap_or(&a.tensor))
                    .collect(),
                Step::PrefixCombine { states, .. } => {
                    states.iter().map(|s| s.state.as_str()).collect()
                }
                _ => Vec::new(),
            };
            if let Some(n) = names.iter().find(|n| cascade.tensor_by_name(n).is_none()) {
                return Err(format!(
                    "rank {}: a step names `{n}`, which is not a tensor of the source",
                    rank.rank
                ));
            }
        }
    }
    for g in &plan.tensors {
        let t = cascade
            .tensor_by_name(&g.name)
            .ok_or_else(|| format!("`{}` is not a tensor of the source", g.name))?;
        let want: Vec<u64> = cascade.tensors[t]
            .ranks
            .iter()
            .map(|&r| cascade.ranks[r].extent)
            .collect();
        if want != g.shape {
            return Err(format!(
                "`{}` has shape {:?} in the plan and {want:?} in the source",
                g.name, g.shape
            ));
        }
    }
    Ok(())
}
