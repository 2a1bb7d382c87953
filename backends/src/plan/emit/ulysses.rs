//! Ulysses: an all-to-all trades the sequence split for a head split, each rank runs the
//! whole cascade on its heads, and a second all-to-all brings the outputs back.

use super::*;

/// The transposition that moves axis `from` to position `to`.
pub(super) fn move_axis(rank: usize, from: usize, to: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rank).filter(|&a| a != from).collect();
    order.insert(to, from);
    order
}

/// Ulysses: per sequence tensor, pack head groups, all-to-all, unpack to the full
/// sequence; the full cascade on this rank's heads; the output back the same way.
pub(super) fn emit_ulysses(
    ctx: &Ctx,
    b: &mut RankBuilder,
    _: SchemeKind,
    _: &mut PairAnalyzer,
) -> Result<(), PlanError> {
    let cascade = ctx.cascade;
    let r = b.rank;
    let p = ctx.devices;
    let Some(head) = ctx.head_rank else {
        return Err(PlanError::Unsupported(
            "Ulysses needs a head rank".to_string(),
        ));
    };
    let heads_total = cascade.ranks[head].extent;
    let hl = heads_total / p;
    let my_heads = TokenRange {
        start: r * hl,
        len: hl,
    };
    let tokens = ctx.cls.seq.tokens;
    let chunk = ctx.chunks(r)[0];
    let sides: Vec<Side> = if ctx.cls.seq.single_rank() {
        vec![Side::Sequence]
    } else {
        vec![Side::Query, Side::Key]
    };
    // Natural-layout inputs of this rank's chunk, all heads.
    data_buffers(ctx, b, &[chunk], &sides, None);
    // Parameters: this rank's heads only (replace the whole-parameter buffers).
    b.buffers.retain(|buf| {
        !ctx.params()
            .iter()
            .any(|&t| cascade.tensors[t].name == buf.name)
    });
    for t in ctx.params() {
        let tensor = &cascade.tensors[t];
        let shape = ctx.local_shape(t, 0, 0, Some(hl));
        b.buffer(
            &tensor.name,
            &dtype_name(tensor),
            Ctx::elements(&shape),
            BufferInit::Pieces {
                pieces: vec![Piece {
                    tensor: tensor.name.clone(),
                    buffer: tensor.name.clone(),
                    offset: 0,
                    slices: piece_slices(ctx, t, chunk, Some(my_heads))
                        .into_iter()
                        .filter(|s| Some(s.dim) == ctx.dim_of(t, head))
                        .collect(),
                }],
            },
        );
    }
    let mut args = Vec::new();
    let mut ready = Vec::new();
    let seq_tensors: Vec<Handle<Tensor>> = sides.iter().flat_map(|s| ctx.seq_inputs(*s)).collect();
    for &t in &seq_tensors {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let (Some(sd), Some(hd)) = (ctx.seq_dim(t), ctx.dim_of(t, head)) else {
            return Err(PlanError::Unsupported(format!(
                "`{}` lacks the sequence or head rank",
                tensor.name
            )));
        };
        let natural = ctx.local_shape(t, chunk.len, chunk.len, None);
        let n = Ctx::elements(&natural);
        // View [.., H, ..] as [.., P, Hl, ..] and bring the head group to the front.
        let mut view = natural.clone();
        view[hd] = hl;
        view.insert(hd, p);
        let pack = move_axis(view.len(), hd, 0);
        let packed = format!("{}_packed", tensor.name);
        let exchanged = format!("{}_exchanged", tensor.name);
        let full = format!("{}_full", tensor.name);
        b.buffer(&packed, &dtype, n, BufferInit::Uninit);
        b.buffer(&exchanged, &dtype, n, BufferInit::Uninit);
        b.buffer(&full, &dtype, n, BufferInit::Uninit);
        b.steps.push(Step::Rearrange {
            src: region(&tensor.name, 0, n),
            dst: region(&packed, 0, n),
            shape: view,
            perm: pack,
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        let ev = b.event();
        b.steps.push(Step::AllToAll {
            send: region(&packed, 0, n),
            recv: region(&exchanged, 0, n),
            count_per_peer: n / p,
            dtype: dtype.clone(),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), Some(ev.clone())),
        });
        ready.push(ev);
        // Received [P (sequence chunk), .., C, .., Hl, ..]: put the chunk index before
        // the sequence dimension, giving [.., N, .., Hl, ..].
        let mut recv_shape = natural.clone();
        recv_shape[hd] = hl;
        recv_shape.insert(0, p);
        b.steps.push(Step::Rearrange {
            src: region(&exchanged, 0, n),
            dst: region(&full, 0, n),
            shape: recv_shape.clone(),
            perm: move_axis(recv_shape.len(), 0, sd),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        let mut shape = natural.clone();
        shape[sd] = tokens;
        shape[hd] = hl;
        let keyish = ctx.side(t) == Side::Key;
        args.push(KernelArg {
            tensor: tensor.name.clone(),
            role: ArgRole::Input,
            key_chunk: keyish.then_some(0),
            shape,
            region: region(&full, 0, n),
        });
    }
    for t in ctx.params() {
        let shape = ctx.local_shape(t, 0, 0, Some(hl));
        let n = Ctx::elements(&shape);
        args.push(KernelArg {
            tensor: cascade.tensors[t].name.clone(),
            role: ArgRole::Param,
            key_chunk: None,
            shape,
            region: region(&cascade.tensors[t].name, 0, n),
        });
    }
    // Outputs: full sequence, this rank's heads.
    let mut back = Vec::new();
    for t in ctx.outputs() {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let (Some(sd), Some(hd)) = (ctx.seq_dim(t), ctx.dim_of(t, head)) else {
            return Err(PlanError::Unsupported(format!(
                "`{}` lacks the sequence or head rank",
                tensor.name
            )));
        };
        let mut full_shape = ctx.local_shape(t, tokens, tokens, None);
        full_shape[hd] = hl;
        let n = Ctx::elements(&full_shape);
        let full = format!("{}_full", tensor.name);
        b.buffer(&full, &dtype, n, BufferInit::Uninit);
        args.push(KernelArg {
            tensor: tensor.name.clone(),
            role: ArgRole::Output,
            key_chunk: None,
            shape: full_shape.clone(),
            region: region(&full, 0, n),
        });
        back.push((t, sd, hd, full_shape, n));
    }
    let all_tokens = TokenRange {
        start: 0,
        len: tokens,
    };
    let computed = b.event();
    b.steps.push(Step::Kernel(KernelStep {
        kernel: kernel_name(ctx, Phase::Full),
        phase: Phase::Full,
        queries: all_tokens,
        keys: vec![all_tokens],
        masks: vec![PairMask::Partial],
        heads: Some(my_heads),
        args,
        grid: ctx.grid(all_tokens, Some(hl)),
        launch: Vec::new(),
        chunks: None,
        exec: RankBuilder::exec(COMPUTE, ready, Some(computed)),
    }));
    output_buffers(ctx, b, &[chunk]);
    for (t, sd, hd, full_shape, n) in back {
        let tensor = &cascade.tensors[t];
        let dtype = dtype_name(tensor);
        let packed = format!("{}_packed", tensor.name);
        let exchanged = format!("{}_exchanged", tensor.name);
        b.buffer(&packed, &dtype, n, BufferInit::Uninit);
        b.buffer(&exchanged, &dtype, n, BufferInit::Uninit);
        // View [.., N, ..] as [.., P, C, ..] and bring the chunk index to the front.
        let mut view = full_shape.clone();
        view[sd] = chunk.len;
        view.insert(sd, p);
        b.steps.push(Step::Rearrange {
            src: region(&format!("{}_full", tensor.name), 0, n),
            dst: region(&packed, 0, n),
            shape: view.clone(),
            perm: move_axis(view.len(), sd, 0),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        b.steps.push(Step::AllToAll {
            send: region(&packed, 0, n),
            recv: region(&exchanged, 0, n),
            count_per_peer: n / p,
            dtype: dtype.clone(),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
        // Received [P (head group), .., C, .., Hl, ..]: the group goes before the head dim.
        let mut recv_shape = full_shape.clone();
        recv_shape[sd] = chunk.len;
        recv_shape.insert(0, p);
        b.steps.push(Step::Rearrange {
            src: region(&exchanged, 0, n),
            dst: region(&tensor.name, 0, n),
            shape: recv_shape.clone(),
            perm: move_axis(recv_shape.len(), 0, hd),
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        });
    }
    Ok(())
}
