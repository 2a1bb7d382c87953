//! LASP-2 and LASP-1 on one-rank cascades with fixed-size linear states: a state-only
//! pass per chunk, the states exchanged (one all-gather, or a ring of sends), a prefix
//! combine, then the outputs from the prefix.

use super::*;

/// LASP-2 (`gather`) or LASP-1 on a one-rank cascade with linear fixed-size states.
pub(super) fn emit_lasp(
    ctx: &Ctx,
    b: &mut RankBuilder,
    kind: SchemeKind,
    _: &mut PairAnalyzer,
) -> Result<(), PlanError> {
    // LASP-2 gathers every state at once; LASP-1 passes them along a ring.
    let gather = kind == SchemeKind::Lasp2;
    let cascade = ctx.cascade;
    let cls = ctx.cls;
    let r = b.rank;
    let p = ctx.devices;
    let chunk = ctx.chunks(r)[0];
    data_buffers(ctx, b, &[chunk], &[Side::Sequence], None);
    output_buffers(ctx, b, &[chunk]);

    // Slot layout: every state, then every state's decay, as the state-only kernel writes.
    let states: Vec<Handle<Tensor>> = cls.states.iter().map(|s| s.state).collect();
    let spec = LocalSpec {
        windows: vec![Window {
            rank: cls.seq.query.declared,
            start: chunk.start,
            len: chunk.len,
        }],
        inits: states.iter().map(|&s| (s, InitSource::Zero)).collect(),
        finals_from_input: Vec::new(),
        track_decay: states.clone(),
    };
    let local = local::localize(cascade, &spec)?;
    let mut combine_states = Vec::new();
    let mut state_args = Vec::new();
    let mut offset = 0u64;
    let mut out_offset = 0u64;
    for s in &cls.states {
        let shape = ctx.local_shape(s.state, chunk.len, chunk.len, None);
        let n = Ctx::elements(&shape);
        state_args.push((s.state, shape.clone(), offset, out_offset));
        offset += n;
        out_offset += n;
    }
    let state_total = out_offset;
    for (i, &(state, decay, _)) in local.decays.iter().enumerate() {
        let decay_tensor = &local.cascade.tensors[decay];
        let mut decay_shape: Vec<u64> = shape_of(&local.cascade, decay)
            .iter()
            .map(|&x| x as u64)
            .collect();
        if let Some(d) = decay_tensor.iterative {
            decay_shape.remove(d);
        }
        let state_ranks: Vec<Handle<Rank>> = {
            let t = &cascade.tensors[state];
            t.ranks
                .iter()
                .enumerate()
                .filter(|(d, _)| Some(*d) != t.iterative)
                .map(|(_, &r)| r)
                .collect()
        };
        let decay_dims: Vec<usize> = decay_tensor
            .ranks
            .iter()
            .enumerate()
            .filter(|(d, _)| Some(*d) != decay_tensor.iterative)
            .filter_map(|(_, r)| state_ranks.iter().position(|x| x == r))
            .collect();
        let (_, shape, state_offset, out_off) = &state_args[i];
        combine_states.push((
            CombineState {
                state: cascade.tensors[state].name.clone(),
                offset: *state_offset,
                shape: shape.clone(),
                decay_offset: offset,
                decay_dims,
                out_offset: *out_off,
            },
            decay_shape.clone(),
        ));
        offset += Ctx::elements(&decay_shape);
    }
    let slot = offset;
    let init_value = original_init_value(ctx, &states)?;

    b.buffer("state_local", "f32", slot, BufferInit::Uninit);
    b.buffer(
        "state_in",
        "f32",
        state_total,
        BufferInit::Value { value: init_value },
    );

    // 1. Local states from zero, and decays.
    let state_einsums: Vec<_> = cls.states.iter().map(|s| s.einsum).collect();
    let mut args = plain_args(ctx, &state_einsums, chunk, 0);
    for (cs, decay_shape) in &combine_states {
        args.push(KernelArg {
            tensor: cs.state.clone(),
            role: ArgRole::StateOut,
            key_chunk: None,
            shape: cs.shape.clone(),
            region: region("state_local", cs.offset, Ctx::elements(&cs.shape)),
        });
        args.push(KernelArg {
            tensor: format!("{}__decay", cs.state),
            role: ArgRole::DecayOut,
            key_chunk: None,
            shape: decay_shape.clone(),
            region: region("state_local", cs.decay_offset, Ctx::elements(decay_shape)),
        });
    }
    let states_ready = b.event();
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::StateOnly),
        phase: Phase::StateOnly,
        queries: chunk,
        keys: vec![chunk],
        masks: vec![PairMask::Partial],
        heads: None,
        args,
        grid: ctx.grid(chunk, None),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, Vec::new(), Some(states_ready.clone())),
    }));
    let plain_states: Vec<CombineState> = combine_states.iter().map(|(c, _)| c.clone()).collect();

    // 2. The prefix.
    let prefix_ready = if gather { b.event() } else { String::new() };
    if gather {
        b.buffer("state_gathered", "f32", slot * p, BufferInit::Uninit);
        let gathered = b.event();
        b.steps.push(Step::AllGather {
            send: region("state_local", 0, slot),
            recv: region("state_gathered", 0, slot * p),
            dtype: "f32".to_string(),
            exec: RankBuilder::exec(COMM, vec![states_ready], Some(gathered.clone())),
        });
        b.steps.push(Step::PrefixCombine {
            slots: region("state_gathered", 0, slot * p),
            slot_elements: slot,
            first: 0,
            count: r,
            init: None,
            init_value,
            states: plain_states,
            out: region("state_in", 0, state_total),
            exec: RankBuilder::exec(COMPUTE, vec![gathered], Some(prefix_ready.clone())),
        });
    } else {
        // LASP-1: receive the prefix from r-1, fold in this chunk, pass it on.
        let mut wait = vec![states_ready];
        if r > 0 {
            let received = b.event();
            b.steps.push(Step::SendRecv {
                send: None,
                recv: Some(PeerRegion {
                    peer: r - 1,
                    region: region("state_in", 0, state_total),
                }),
                dtype: "f32".to_string(),
                exec: RankBuilder::exec(COMM, Vec::new(), Some(received.clone())),
            });
            wait.push(received);
        }
        if r + 1 < p {
            b.buffer("state_out", "f32", state_total, BufferInit::Uninit);
            let folded = b.event();
            b.steps.push(Step::PrefixCombine {
                slots: region("state_local", 0, slot),
                slot_elements: slot,
                first: 0,
                count: 1,
                init: Some(region("state_in", 0, state_total)),
                init_value,
                states: plain_states,
                out: region("state_out", 0, state_total),
                exec: RankBuilder::exec(COMPUTE, wait.clone(), Some(folded.clone())),
            });
            b.steps.push(Step::SendRecv {
                send: Some(PeerRegion {
                    peer: r + 1,
                    region: region("state_out", 0, state_total),
                }),
                recv: None,
                dtype: "f32".to_string(),
                exec: RankBuilder::exec(COMM, vec![folded], None),
            });
        }
        // The output kernel waits for the received prefix (rank 0 starts from the init).
        return finish_lasp_output(ctx, b, chunk, &combine_states, wait);
    }
    finish_lasp_output(ctx, b, chunk, &combine_states, vec![prefix_ready])
}

pub(super) fn finish_lasp_output(
    ctx: &Ctx,
    b: &mut RankBuilder,
    chunk: TokenRange,
    combine_states: &[(CombineState, Vec<u64>)],
    wait: Vec<String>,
) -> Result<(), PlanError> {
    let all: Vec<_> = ctx.cascade.einsums.handles().collect();
    let mut args = plain_args(ctx, &all, chunk, 0);
    for (cs, _) in combine_states {
        args.push(KernelArg {
            tensor: cs.state.clone(),
            role: ArgRole::StateIn,
            key_chunk: None,
            shape: cs.shape.clone(),
            region: region("state_in", cs.out_offset, Ctx::elements(&cs.shape)),
        });
    }
    args.extend(output_args(ctx, chunk, 0));
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::OutputWithPrefix),
        phase: Phase::OutputWithPrefix,
        queries: chunk,
        keys: vec![chunk],
        masks: vec![PairMask::Partial],
        heads: None,
        args,
        grid: ctx.grid(chunk, None),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, wait, None),
    }));
    Ok(())
}

/// The carried states' original init when it is one literal for all of them (the prefix
/// combine starts there); a per-element init would need its own kernel.
pub(super) fn original_init_value(ctx: &Ctx, states: &[Handle<Tensor>]) -> Result<f64, PlanError> {
    let mut value = None;
    for &s in states {
        let e = ctx
            .cascade
            .producer(s)
            .map(|h| &ctx.cascade.einsums[h])
            .and_then(|e| e.recurrence.as_ref());
        let v = match e.map(|r| &r.init) {
            Some(einattn_ir::Expr::Literal(v)) => *v,
            _ => {
                return Err(PlanError::Unsupported(format!(
                    "the init of `{}` is not a literal",
                    ctx.cascade.tensors[s].name
                )))
            }
        };
        match value {
            None => value = Some(v),
            Some(w) if w == v => {}
            Some(_) => {
                return Err(PlanError::Unsupported(
                    "carried states start from different literals".to_string(),
                ))
            }
        }
    }
    Ok(value.unwrap_or(0.0))
}
