//! Executes a [`Plan`] on the CPU: every rank's buffers in f64, kernels evaluated by the
//! reference interpreter on per-device cascades, collectives and sends simulated.
//!
//! Ranks run in program order; a step that needs other ranks (a collective, a receive)
//! blocks until they arrive, so a plan whose collectives do not line up or whose receives
//! have no matching send fails with a deadlock report rather than hanging. Buffers start
//! as NaN unless the plan initializes them, so a step that reads what nothing wrote
//! poisons the result. This is how CI checks SP plans without GPUs.

use super::emit::PlanError;
use super::format::*;
use einattn_ir::interp::{shape_of, TensorData};
use einattn_ir::{Cascade, Einsum, Handle, Rank, Tensor, TensorKind};
use einattn_passes::sp::local::{self, InitSource, LocalSpec, Window};
use einattn_passes::sp::{classify, Classification, SequenceRanks};
use std::collections::{HashMap, HashSet, VecDeque};

fn err(m: impl Into<String>) -> PlanError {
    PlanError::Execution(m.into())
}

type Memory = HashMap<String, Vec<f64>>;

fn read(mem: &Memory, r: &Region) -> Result<Vec<f64>, PlanError> {
    let buf = mem
        .get(&r.buffer)
        .ok_or_else(|| err(format!("no buffer `{}`", r.buffer)))?;
    let (a, b) = (r.offset as usize, (r.offset + r.count) as usize);
    buf.get(a..b).map(|s| s.to_vec()).ok_or_else(|| {
        err(format!(
            "region [{a}, {b}) is outside `{}` ({} elements)",
            r.buffer,
            buf.len()
        ))
    })
}

fn write(mem: &mut Memory, r: &Region, values: &[f64]) -> Result<(), PlanError> {
    if values.len() as u64 != r.count {
        return Err(err(format!(
            "writing {} values into a region of {} in `{}`",
            values.len(),
            r.count,
            r.buffer
        )));
    }
    let buf = mem
        .get_mut(&r.buffer)
        .ok_or_else(|| err(format!("no buffer `{}`", r.buffer)))?;
    let (a, b) = (r.offset as usize, (r.offset + r.count) as usize);
    let len = buf.len();
    buf.get_mut(a..b)
        .ok_or_else(|| {
            err(format!(
                "region [{a}, {b}) is outside `{}` ({len} elements)",
                r.buffer
            ))
        })?
        .copy_from_slice(values);
    Ok(())
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Calls `f(offset_in_global, index_in_box)` for every point of the box `slices` selects.
fn for_box(
    shape: &[usize],
    slices: &[DimSlice],
    mut f: impl FnMut(usize, usize),
) -> Result<usize, PlanError> {
    let mut lo = vec![0usize; shape.len()];
    let mut len = shape.to_vec();
    for s in slices {
        if s.dim >= shape.len() || (s.start + s.len) as usize > shape[s.dim] {
            return Err(err(format!("slice {s:?} does not fit shape {shape:?}")));
        }
        lo[s.dim] = s.start as usize;
        len[s.dim] = s.len as usize;
    }
    let total: usize = len.iter().product();
    let gs = strides(shape);
    let bs = strides(&len);
    for i in 0..total {
        let mut off = 0;
        for d in 0..shape.len() {
            off += (lo[d] + (i / bs[d]) % len[d]) * gs[d];
        }
        f(off, i);
    }
    Ok(total)
}

/// Simulated devices running one plan.
struct Machine<'a> {
    cascade: &'a Cascade,
    plan: &'a Plan,
    cls: Classification,
    head_rank: Option<Handle<Rank>>,
    memory: Vec<Memory>,
    /// (from, to) -> messages in send order.
    mailbox: HashMap<(u64, u64), VecDeque<Vec<f64>>>,
}

/// Runs `plan` and returns the global outputs it assembles.
pub fn execute_plan(
    cascade: &Cascade,
    plan: &Plan,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
) -> Result<HashMap<Handle<Tensor>, TensorData>, PlanError> {
    if plan.format != FORMAT {
        return Err(err(format!(
            "format `{}`, expected `{FORMAT}`",
            plan.format
        )));
    }
    let seq = SequenceRanks::by_names(cascade, &plan.sequence.query_rank, &plan.sequence.key_rank)?;
    let cls = classify(cascade, seq);
    let head_rank = match &plan.sequence.head_rank {
        Some(name) => Some(
            cascade
                .rank_by_name(name)
                .ok_or_else(|| err(format!("no rank `{name}`")))?,
        ),
        None => None,
    };
    let p = plan.world_size as usize;
    if plan.ranks.len() != p {
        return Err(err(format!(
            "{} rank plans for world size {p}",
            plan.ranks.len()
        )));
    }
    let by_name: HashMap<String, Handle<Tensor>> = cascade
        .tensors
        .iter()
        .map(|(h, t)| (t.name.clone(), h))
        .collect();
    let mut memory = Vec::with_capacity(p);
    for rp in &plan.ranks {
        let mut mem = Memory::new();
        for b in &rp.buffers {
            let mut values = vec![f64::NAN; b.elements as usize];
            match &b.init {
                BufferInit::Uninit => {}
                BufferInit::Value { value } => values.iter_mut().for_each(|v| *v = *value),
                BufferInit::Pieces { pieces } => {
                    for piece in pieces {
                        let t = by_name
                            .get(&piece.tensor)
                            .ok_or_else(|| err(format!("no tensor `{}`", piece.tensor)))?;
                        let data = inputs
                            .get(t)
                            .map(|d| d.stored().into_owned())
                            .unwrap_or_else(|| {
                                // A parameter with a default need not be supplied.
                                let n = cascade.tensor_elements(*t) as usize;
                                vec![cascade.tensors[*t].default.unwrap_or(f64::NAN); n]
                            });
                        let shape = shape_of(cascade, *t);
                        let base = piece.offset as usize;
                        let mut overflow = false;
                        for_box(&shape, &piece.slices, |g, i| {
                            match values.get_mut(base + i) {
                                Some(v) => *v = data[g],
                                None => overflow = true,
                            }
                        })?;
                        if overflow {
                            return Err(err(format!(
                                "piece of `{}` overflows buffer `{}`",
                                piece.tensor, b.name
                            )));
                        }
                    }
                }
            }
            mem.insert(b.name.clone(), values);
        }
        memory.push(mem);
    }
    let mut m = Machine {
        cascade,
        plan,
        cls,
        head_rank,
        memory,
        mailbox: HashMap::new(),
    };
    m.run()?;

    // Assemble the outputs.
    let mut out = HashMap::new();
    for (h, t) in cascade.tensors.iter() {
        if t.kind != TensorKind::Output {
            continue;
        }
        let shape = shape_of(cascade, h);
        let n: usize = shape.iter().product();
        let mut values = vec![f64::NAN; n];
        let mut covered = vec![false; n];
        for (r, rp) in plan.ranks.iter().enumerate() {
            for piece in rp.outputs.iter().filter(|pc| pc.tensor == t.name) {
                let buf = m.memory[r]
                    .get(&piece.buffer)
                    .ok_or_else(|| err(format!("rank {r}: no buffer `{}`", piece.buffer)))?;
                let base = piece.offset as usize;
                let mut overflow = false;
                for_box(&shape, &piece.slices, |g, i| match buf.get(base + i) {
                    Some(v) => {
                        values[g] = *v;
                        covered[g] = true;
                    }
                    None => overflow = true,
                })?;
                if overflow {
                    return Err(err(format!(
                        "rank {r}: output piece overflows `{}`",
                        piece.buffer
                    )));
                }
            }
        }
        if let Some(i) = covered.iter().position(|c| !c) {
            return Err(err(format!("no rank writes element {i} of `{}`", t.name)));
        }
        out.insert(h, TensorData::new(shape, values));
    }
    Ok(out)
}

impl Machine<'_> {
    fn run(&mut self) -> Result<(), PlanError> {
        let p = self.plan.world_size as usize;
        let mut pc = vec![0usize; p];
        let mut recorded: Vec<HashSet<String>> = vec![HashSet::new(); p];
        let mut sent = vec![false; p];
        loop {
            let mut progress = false;
            for r in 0..p {
                while let Some(step) = self.plan.ranks[r].steps.get(pc[r]) {
                    for w in &step.exec().wait {
                        if !recorded[r].contains(w) {
                            return Err(err(format!(
                                "rank {r} step {}: waits for event `{w}`, which no earlier step records",
                                pc[r]
                            )));
                        }
                    }
                    if step.is_collective() {
                        break;
                    }
                    let done = match step {
                        Step::SendRecv { send, recv, .. } => {
                            if !sent[r] {
                                if let Some(s) = send {
                                    let data = read(&self.memory[r], &s.region)?;
                                    self.mailbox
                                        .entry((r as u64, s.peer))
                                        .or_default()
                                        .push_back(data);
                                }
                                sent[r] = true;
                                progress = true;
                            }
                            match recv {
                                None => true,
                                Some(rv) => match self
                                    .mailbox
                                    .get_mut(&(rv.peer, r as u64))
                                    .and_then(|q| q.pop_front())
                                {
                                    Some(data) => {
                                        write(&mut self.memory[r], &rv.region, &data)?;
                                        true
                                    }
                                    None => false,
                                },
                            }
                        }
                        _ => {
                            self.local_step(r, step)?;
                            true
                        }
                    };
                    if !done {
                        break;
                    }
                    sent[r] = false;
                    if let Some(e) = &step.exec().record {
                        recorded[r].insert(e.clone());
                    }
                    pc[r] += 1;
                    progress = true;
                }
            }
            // Collectives: run when every rank has reached one.
            let at: Vec<Option<&Step>> = (0..p)
                .map(|r| self.plan.ranks[r].steps.get(pc[r]))
                .collect();
            if at.iter().all(|s| s.is_some_and(|s| s.is_collective())) {
                let steps: Vec<&Step> = at.into_iter().flatten().collect();
                self.collective(&steps)?;
                for r in 0..p {
                    if let Some(e) = &steps[r].exec().record {
                        recorded[r].insert(e.clone());
                    }
                    pc[r] += 1;
                }
                progress = true;
            }
            if (0..p).all(|r| pc[r] == self.plan.ranks[r].steps.len()) {
                return Ok(());
            }
            if !progress {
                let where_: Vec<String> = (0..p)
                    .map(|r| format!("rank {r} at step {}", pc[r]))
                    .collect();
                return Err(err(format!("deadlock: {}", where_.join(", "))));
            }
        }
    }

    fn collective(&mut self, steps: &[&Step]) -> Result<(), PlanError> {
        let p = steps.len();
        let kind = std::mem::discriminant(steps[0]);
        if steps.iter().any(|s| std::mem::discriminant(*s) != kind) {
            return Err(err("ranks reached different collectives"));
        }
        let sends: Vec<Vec<f64>> = steps
            .iter()
            .enumerate()
            .map(|(r, s)| match s {
                Step::AllGather { send, .. }
                | Step::AllToAll { send, .. }
                | Step::AllReduce { send, .. }
                | Step::ReduceScatter { send, .. } => read(&self.memory[r], send),
                _ => Err(err("not a collective")),
            })
            .collect::<Result<_, _>>()?;
        for (r, s) in steps.iter().enumerate() {
            let (recv, data) = match s {
                Step::AllGather { recv, .. } => (recv, sends.concat()),
                Step::AllToAll {
                    recv,
                    count_per_peer,
                    ..
                } => {
                    let c = *count_per_peer as usize;
                    let mut data = Vec::with_capacity(c * p);
                    for src in &sends {
                        data.extend_from_slice(
                            src.get(r * c..(r + 1) * c)
                                .ok_or_else(|| err("all_to_all block out of range"))?,
                        );
                    }
                    (recv, data)
                }
                Step::AllReduce { recv, .. } | Step::ReduceScatter { recv, .. } => {
                    let n = sends[0].len();
                    let sum: Vec<f64> = (0..n).map(|i| sends.iter().map(|v| v[i]).sum()).collect();
                    if matches!(s, Step::ReduceScatter { .. }) {
                        let c = recv.count as usize;
                        (
                            recv,
                            sum.get(r * c..(r + 1) * c)
                                .ok_or_else(|| err("reduce_scatter block out of range"))?
                                .to_vec(),
                        )
                    } else {
                        (recv, sum)
                    }
                }
                _ => return Err(err("not a collective")),
            };
            write(&mut self.memory[r], recv, &data)?;
        }
        Ok(())
    }

    fn local_step(&mut self, r: usize, step: &Step) -> Result<(), PlanError> {
        match step {
            Step::Kernel(k) => self.kernel(r, k),
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
                let mem = &self.memory[r];
                let all = read(mem, slots)?;
                let start_values = match init {
                    Some(i) => Some(read(mem, i)?),
                    None => None,
                };
                let mut result = vec![f64::NAN; out.count as usize];
                for cs in states {
                    let shape: Vec<usize> = cs.shape.iter().map(|&x| x as usize).collect();
                    let n: usize = shape.iter().product();
                    let st = strides(&shape);
                    let decay_shape: Vec<usize> = cs.decay_dims.iter().map(|&d| shape[d]).collect();
                    let dst = strides(&decay_shape);
                    let decay_index = |i: usize| -> usize {
                        cs.decay_dims
                            .iter()
                            .enumerate()
                            .map(|(k, &d)| ((i / st[d]) % shape[d]) * dst[k])
                            .sum()
                    };
                    let oo = cs.out_offset as usize;
                    let mut acc: Vec<f64> = match &start_values {
                        Some(v) => v
                            .get(oo..oo + n)
                            .ok_or_else(|| err("combine init out of range"))?
                            .to_vec(),
                        None => vec![*init_value; n],
                    };
                    for s in *first..*first + *count {
                        let base = (s * slot_elements) as usize;
                        let so = base + cs.offset as usize;
                        let dof = base + cs.decay_offset as usize;
                        let state = all
                            .get(so..so + n)
                            .ok_or_else(|| err("combine slot out of range"))?;
                        for i in 0..n {
                            let decay = *all
                                .get(dof + decay_index(i))
                                .ok_or_else(|| err("decay out of range"))?;
                            acc[i] = decay * acc[i] + state[i];
                        }
                    }
                    result
                        .get_mut(oo..oo + n)
                        .ok_or_else(|| err("combine output out of range"))?
                        .copy_from_slice(&acc);
                }
                write(&mut self.memory[r], out, &result)
            }
            Step::LseMerge {
                into, from, stats, ..
            } => {
                let a = read(&self.memory[r], into)?;
                let b = read(&self.memory[r], from)?;
                let mut merged = a.clone();
                let slice = |v: &[f64], s: &MergeStat| -> Result<Vec<f64>, PlanError> {
                    let n: u64 = s.shape.iter().product();
                    v.get(s.offset as usize..(s.offset + n) as usize)
                        .map(|x| x.to_vec())
                        .ok_or_else(|| err(format!("statistic `{}` out of range", s.name)))
                };
                for s in stats {
                    let (sa, sb) = (slice(&a, s)?, slice(&b, s)?);
                    let out: Vec<f64> = match s.kind {
                        MergeKind::Max => sa.iter().zip(&sb).map(|(x, y)| x.max(*y)).collect(),
                        MergeKind::Min => sa.iter().zip(&sb).map(|(x, y)| x.min(*y)).collect(),
                        MergeKind::Sum => sa.iter().zip(&sb).map(|(x, y)| x + y).collect(),
                        MergeKind::RescaledSum => {
                            let name = s.max_stat.as_deref().unwrap_or("");
                            let m = stats.iter().find(|x| x.name == name).ok_or_else(|| {
                                err(format!("`{}` rescales by unknown `{name}`", s.name))
                            })?;
                            let (ma, mb) = (slice(&a, m)?, slice(&b, m)?);
                            let shape: Vec<usize> = s.shape.iter().map(|&x| x as usize).collect();
                            let st = strides(&shape);
                            let mshape: Vec<usize> = s.max_dims.iter().map(|&d| shape[d]).collect();
                            let mst = strides(&mshape);
                            // A side whose max is -inf contributed nothing: weight 0, not NaN.
                            let weight = |x: f64, m: f64| {
                                if x == f64::NEG_INFINITY {
                                    0.0
                                } else {
                                    (x - m).exp()
                                }
                            };
                            (0..sa.len())
                                .map(|i| {
                                    let mi: usize = s
                                        .max_dims
                                        .iter()
                                        .enumerate()
                                        .map(|(k, &d)| ((i / st[d]) % shape[d]) * mst[k])
                                        .sum();
                                    let mm = ma[mi].max(mb[mi]);
                                    sa[i] * weight(ma[mi], mm) + sb[i] * weight(mb[mi], mm)
                                })
                                .collect()
                        }
                    };
                    let o = s.offset as usize;
                    merged[o..o + out.len()].copy_from_slice(&out);
                }
                write(&mut self.memory[r], into, &merged)
            }
            Step::Rearrange {
                src,
                dst,
                shape,
                perm,
                ..
            } => {
                let data = read(&self.memory[r], src)?;
                let shape: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
                if perm.len() != shape.len() || data.len() != shape.iter().product::<usize>() {
                    return Err(err("rearrange shape does not match its source"));
                }
                let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
                let ss = strides(&shape);
                let os = strides(&out_shape);
                let mut out = vec![0.0; data.len()];
                for (i, o) in out.iter_mut().enumerate() {
                    let src_off: usize = (0..perm.len())
                        .map(|a| ((i / os[a]) % out_shape[a]) * ss[perm[a]])
                        .sum();
                    *o = data[src_off];
                }
                write(&mut self.memory[r], dst, &out)
            }
            Step::Place {
                src,
                dst,
                shape,
                slices,
                ..
            } => {
                let piece = read(&self.memory[r], src)?;
                let mut whole = read(&self.memory[r], dst)?;
                let runs = crate::plan::format::piece_runs(shape, slices);
                let needed: u64 = runs.iter().map(|&(_, _, n)| n).sum();
                if needed != src.count || whole.len() as u64 != shape.iter().product::<u64>() {
                    return Err(err(format!(
                        "placing {} values of `{}` into `{}`: the slices need {needed} and a whole of {:?}",
                        src.count, src.buffer, dst.buffer, shape
                    )));
                }
                for (at, from, n) in runs {
                    let (at, from, n) = (at as usize, from as usize, n as usize);
                    whole[at..at + n].copy_from_slice(&piece[from..from + n]);
                }
                write(&mut self.memory[r], dst, &whole)
            }
            _ => Err(err("not a local step")),
        }
    }

    /// Evaluates a kernel launch on the per-device cascade its windows describe.
    fn kernel(&mut self, r: usize, k: &KernelStep) -> Result<(), PlanError> {
        let cascade = self.cascade;
        let cls = &self.cls;
        let seq = cls.seq;
        let has_arg =
            |name: &str, role: ArgRole| k.args.iter().any(|a| a.tensor == name && a.role == role);

        let mut windows = vec![Window {
            rank: seq.query.declared,
            start: k.queries.start,
            len: k.queries.len,
        }];
        if !seq.single_rank() {
            let key_window = match (k.keys.first(), k.keys.last()) {
                (Some(first), Some(last)) => {
                    if k.keys.windows(2).any(|w| w[0].end() != w[1].start) {
                        return Err(err(
                            "a kernel's key ranges must be contiguous and ascending",
                        ));
                    }
                    (first.start, last.end() - first.start)
                }
                // The epilogue iterates no key: any small window keeps the derived cascade small.
                _ => (0, seq.granule().max(1)),
            };
            windows.push(Window {
                rank: seq.key.declared,
                start: key_window.0,
                len: key_window.1,
            });
        }
        if let (Some(h), Some(rank)) = (k.heads, self.head_rank) {
            windows.push(Window {
                rank,
                start: h.start,
                len: h.len,
            });
        }
        let states: Vec<Handle<Tensor>> = cls.states.iter().map(|s| s.state).collect();
        let name = |t: Handle<Tensor>| cascade.tensors[t].name.clone();
        let mut spec = LocalSpec {
            windows: windows.clone(),
            ..LocalSpec::default()
        };
        let all: Vec<Handle<Einsum>> = cascade.einsums.handles().collect();
        let mut wanted: Vec<Handle<Einsum>> = match k.phase {
            Phase::Full => all.clone(),
            Phase::StateOnly => {
                spec.inits = states.iter().map(|&s| (s, InitSource::Zero)).collect();
                spec.track_decay = states.clone();
                cls.states.iter().map(|s| s.einsum).collect()
            }
            Phase::OutputWithPrefix => {
                spec.inits = states
                    .iter()
                    .filter(|&&s| has_arg(&name(s), ArgRole::StateIn))
                    .map(|&s| (s, InitSource::Input))
                    .collect();
                all.clone()
            }
            Phase::Partial => {
                spec.inits = states
                    .iter()
                    .filter(|&&s| has_arg(&name(s), ArgRole::StatsIn))
                    .map(|&s| (s, InitSource::Input))
                    .collect();
                cls.partial.clone()
            }
            Phase::Epilogue => {
                spec.finals_from_input = states.clone();
                cls.epilogue.clone()
            }
        };
        let local = local::localize(cascade, &spec)?;
        wanted.extend(local.decays.iter().map(|&(_, _, e)| e));

        // Inputs of the derived cascade, from the arguments (zeros for what it does not read).
        let mem = &self.memory[r];
        let mut inputs: HashMap<Handle<Tensor>, TensorData> = HashMap::new();
        for (h, t) in local.cascade.tensors.iter() {
            if !matches!(t.kind, TensorKind::Input | TensorKind::Param) {
                continue;
            }
            let shape = shape_of(&local.cascade, h);
            let n: usize = shape.iter().product();
            let source_state = local
                .init_inputs
                .iter()
                .chain(local.final_inputs.iter())
                .find(|(_, input)| *input == h)
                .map(|(s, _)| *s);
            let (arg_name, roles): (String, &[ArgRole]) = match source_state {
                Some(s) => (name(s), &[ArgRole::StateIn, ArgRole::StatsIn]),
                None => (t.name.clone(), &[ArgRole::Input, ArgRole::Param]),
            };
            let mut args: Vec<&KernelArg> = k
                .args
                .iter()
                .filter(|a| a.tensor == arg_name && roles.contains(&a.role))
                .collect();
            args.sort_by_key(|a| a.key_chunk.unwrap_or(0));
            let values = if args.is_empty() {
                if t.kind == TensorKind::Param && t.default.is_some() {
                    vec![t.default.unwrap_or(0.0); n]
                } else {
                    vec![0.0; n]
                }
            } else if args.len() == 1 {
                read(mem, &args[0].region)?
            } else {
                // Several key chunks: concatenate along the key dimension.
                let dim = t
                    .ranks
                    .iter()
                    .position(|&x| x == seq.key.declared)
                    .ok_or_else(|| {
                        err(format!(
                            "`{}` has several chunks but no key dimension",
                            t.name
                        ))
                    })?;
                let parts: Vec<TensorData> = args
                    .iter()
                    .map(|a| {
                        Ok(TensorData::new(
                            a.shape.iter().map(|&x| x as usize).collect(),
                            read(mem, &a.region)?,
                        ))
                    })
                    .collect::<Result<_, PlanError>>()?;
                local::concat_dim(&parts, dim)
                    .map(|d| d.values)
                    .unwrap_or_default()
            };
            if values.len() != n {
                return Err(err(format!(
                    "rank {r} {}: `{}` has {} values, the window needs {n}",
                    k.kernel,
                    t.name,
                    values.len()
                )));
            }
            if values.iter().any(|v| v.is_nan()) {
                return Err(err(format!(
                    "rank {r} {}: `{}` reads unwritten data",
                    k.kernel, t.name
                )));
            }
            inputs.insert(h, TensorData::new(shape, values));
        }
        let values = local::evaluate(&local.cascade, &inputs, &wanted)?;

        // Results to their regions.
        for a in &k.args {
            let data = match a.role {
                ArgRole::Output => {
                    let h = local
                        .cascade
                        .tensor_by_name(&a.tensor)
                        .ok_or_else(|| err(format!("no output `{}`", a.tensor)))?;
                    values.get(h).map(|d| d.stored().into_owned())
                }
                ArgRole::StateOut | ArgRole::StatsOut => {
                    let h = cascade
                        .tensor_by_name(&a.tensor)
                        .ok_or_else(|| err(format!("no state `{}`", a.tensor)))?;
                    values
                        .get(h)
                        .and_then(|d| local::final_step(&local.cascade, h, d))
                        .map(|d| d.values)
                }
                ArgRole::DecayOut => {
                    let h = local
                        .cascade
                        .tensor_by_name(&a.tensor)
                        .ok_or_else(|| err(format!("no decay `{}`", a.tensor)))?;
                    values
                        .get(h)
                        .and_then(|d| local::final_step(&local.cascade, h, d))
                        .map(|d| d.values)
                }
                _ => continue,
            };
            let data = data.ok_or_else(|| {
                err(format!(
                    "rank {r} {}: `{}` was not computed",
                    k.kernel, a.tensor
                ))
            })?;
            write(&mut self.memory[r], &a.region, &data)?;
        }
        Ok(())
    }
}
