//! The Tile IR attention program, run by the CPU interpreter, equals the naive formula for
//! random shapes, layouts, masks, score modifiers and tile sizes (ragged tails included).

use einattn_backends::family::softmax::{
    flash_attention, AttentionSchedule, AttentionSpec, Normalization,
};
use einattn_backends::reference::{alibi_slopes, attention, relative_error, AttentionInputs};
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::Elem;
use einattn_backends::tile::Loads;
use einattn_backends::tile::{
    HeadParamId, MmaUnit, ScalarExpr, ScalarId, Stmt, TileProgram, UnaryOp,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_tensor(
    rng: &mut ChaCha8Rng,
    elem: Elem,
    b: usize,
    n: usize,
    h: usize,
    d: usize,
    bhnd: bool,
) -> HostTensor {
    let data: Vec<f64> = (0..b * n * h * d)
        .map(|_| elem.round(rng.random_range(-1.0..1.0)))
        .collect();
    if bhnd {
        HostTensor::bhnd(data, n, h, d)
    } else {
        HostTensor::bnhd(data, n, h, d)
    }
}

#[derive(Debug, Clone)]
struct Case {
    spec: AttentionSpec,
    sched: AttentionSchedule,
    prob: Problem,
    bhnd: bool,
    seed: u64,
}

/// The case's inputs, and its program (after `rewrite`) run by the interpreter: the
/// output, the row outputs, and what the reference needs.
struct Ran {
    out: Vec<f64>,
    rows: Vec<Vec<f64>>,
    lse: Option<usize>,
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    scalars: Vec<f64>,
    head_params: Vec<Vec<f64>>,
}

fn run_case(case: &Case, rewrite: fn(&mut TileProgram)) -> Result<Ran, String> {
    let Case {
        spec,
        sched,
        prob,
        bhnd,
        seed,
    } = case.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let kvh = prob.kv_heads();
    let q = random_tensor(
        &mut rng, spec.elem, prob.batch, prob.n_q, prob.heads, d, bhnd,
    );
    let k = random_tensor(&mut rng, spec.elem, prob.batch, prob.n_k, kvh, d, bhnd);
    let v = random_tensor(&mut rng, spec.elem, prob.batch, prob.n_k, kvh, dv, bhnd);
    // Poison the output: every valid row must be written.
    let o = HostTensor::bnhd(
        vec![f64::NAN; prob.batch * prob.n_q * prob.heads * dv],
        prob.n_q,
        prob.heads,
        dv,
    );
    let scale = rng.random_range(0.5..2.0) / (d as f64).sqrt();
    let softcap = rng.random_range(0.5..3.0);
    let bias = rng.random_range(-3.0..1.0);
    let slopes = alibi_slopes(prob.heads);
    let (mut prog, bind) = flash_attention(&spec, &sched).map_err(|e| e.to_string())?;
    rewrite(&mut prog);
    prog.validate().map_err(|e| e.to_string())?;
    let scalars: Vec<f64> = spec
        .score
        .scalars
        .iter()
        .map(|n| match n.as_str() {
            "softcap" => softcap,
            "bias" => bias,
            _ => scale,
        })
        .collect();
    // A sink from well below the scores to well above them.
    let sinks: Vec<f64> = (0..prob.heads)
        .map(|_| rng.random_range(-3.0..4.0))
        .collect();
    let head_params: Vec<Vec<f64>> = prog
        .head_params
        .iter()
        .map(|p| {
            if p.name == "sink" {
                sinks.clone()
            } else {
                slopes.clone()
            }
        })
        .collect();
    let mut io = Bindings {
        tensors: vec![q.clone(), k.clone(), v.clone(), o],
        row_outputs: prog
            .row_outputs
            .iter()
            .map(|_| vec![f64::NAN; prob.batch * prob.heads * prob.n_q])
            .collect(),
        row_inputs: vec![],
        scalars: scalars.clone(),
        head_params: head_params.clone(),
        tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    run(&prog, prob, &mut io).map_err(|e| e.to_string())?;
    Ok(Ran {
        out: io.tensors[bind.o.index()].data.clone(),
        rows: io.row_outputs,
        lse: bind.lse.map(|l| l.index()),
        q,
        k,
        v,
        scalars,
        head_params,
    })
}

fn check(case: &Case) -> Result<(), String> {
    let ran = run_case(case, |_| {})?;
    let inputs = AttentionInputs {
        q: &ran.q,
        k: &ran.k,
        v: &ran.v,
        scalars: &ran.scalars,
        head_params: &ran.head_params,
        q_offset: 0,
        tokens: &[],
    };
    let (want, want_lse) = attention(&case.spec, case.prob, &inputs);
    let err = relative_error(&ran.out, &want);
    if err.is_nan() || err >= 1e-2 {
        return Err(format!("output error {err} for {case:?}"));
    }
    if let Some(l) = ran.lse {
        let got_lse = &ran.rows[l];
        for (i, (g, w)) in got_lse.iter().zip(&want_lse).enumerate() {
            let ok = (g.is_infinite() && w.is_infinite() && g.signum() == w.signum())
                || (g - w).abs() < 1e-2 * (1.0 + w.abs());
            if !ok {
                return Err(format!("lse[{i}] = {g}, want {w} for {case:?}"));
            }
        }
    }
    Ok(())
}

/// `check` of one fixed problem: one batch of `heads` heads (no grouping), BNHD layout.
fn check_fixed(
    spec: AttentionSpec,
    sched: AttentionSchedule,
    heads: usize,
    (n_q, n_k): (usize, usize),
    seed: u64,
) -> Result<(), String> {
    let prob = Problem {
        batch: 1,
        heads,
        kv_group: 1,
        n_q,
        n_k,
    };
    check(&Case {
        spec,
        sched,
        prob,
        bhnd: false,
        seed,
    })
}

/// Every `mask t; r = row_reduce(t)` becomes `r = row_reduce(map t) masked; mask t`: the
/// reduction masks the unmasked tile itself, and the tile is masked after it for the
/// statements that read it later. Returns how many it rewrote.
fn reduce_maps(body: &mut [Stmt]) -> usize {
    let mut n = 0;
    for i in 0..body.len() {
        if let Stmt::KeyLoop { body, .. } = &mut body[i] {
            n += reduce_maps(body);
            continue;
        }
        if i == 0 {
            continue;
        }
        let (Stmt::Mask { dst: masked, fill }, Stmt::RowReduce { dst, src, op }) =
            (&body[i - 1], &body[i])
        else {
            continue;
        };
        if masked != src {
            continue;
        }
        let reduce = Stmt::RowReduceMap {
            dst: *dst,
            op: *op,
            expr: ScalarExpr::Elem(*src),
            shape: *src,
            mask_fill: Some(*fill),
        };
        body[i] = body[i - 1].clone();
        body[i - 1] = reduce;
        n += 1;
    }
    n
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![Just(16u32), Just(32), Just(64)],
            any::<bool>(),
            any::<bool>(),
            prop::option::of(1u32..80),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            // The value dim: the head dim's, or one of its own (192 / 128 style).
            prop_oneof![
                Just(None),
                Just(Some(16u32)),
                Just(Some(48)),
                Just(Some(64))
            ],
            // No sink, a per-head sink logit, softmax1's `+1` (a sink of 0), or no
            // normalization (sigmoid weights).
            0usize..4,
        ),
        (0usize..3, 0usize..3, 0usize..5, 1usize..3),
        (
            1usize..3,
            1usize..3,
            1usize..140,
            1usize..140,
            any::<bool>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (d, f16, causal, window, alibi, softcap, lse, dv, sink),
                (bm_i, warps_i, bn_i, stages),
                (batch, kvg, n_q, n_k, bhnd, seed),
            )| {
                let mut spec = AttentionSpec::new(d, if f16 { Elem::F16 } else { Elem::Bf16 });
                spec.value_dim = dv.unwrap_or(d);
                spec.causal = causal;
                spec.window = window;
                if softcap {
                    spec.score = spec.score.with_softcap();
                }
                if alibi {
                    spec.score = spec.score.with_alibi();
                }
                spec.write_lse = lse;
                spec.sink = match sink {
                    0 => None,
                    1 => {
                        spec.score.head_params.push("sink".into());
                        let id = spec.score.head_params.len() as u32 - 1;
                        Some(ScalarExpr::Head(HeadParamId(id)))
                    }
                    2 => Some(ScalarExpr::Lit(0.0)),
                    _ => {
                        // w = sigmoid(logit + bias), summed without normalization.
                        use einattn_backends::tile::ex;
                        spec.score.scalars.push("bias".into());
                        let bias = ex::scalar(ScalarId(spec.score.scalars.len() as u32 - 1));
                        let logit = ex::add(spec.score.expr.clone(), bias);
                        spec.score.expr = ex::div(
                            ex::lit(1.0),
                            ex::add(
                                ex::lit(1.0),
                                ex::un(UnaryOp::Exp, ex::un(UnaryOp::Neg, logit)),
                            ),
                        );
                        spec.normalization = Normalization::None;
                        spec.write_lse = false;
                        None
                    }
                };
                let warps = [1u32, 2, 4][warps_i];
                let block_m = 16 * warps * [1u32, 2, 4][bm_i].min(4 / warps.min(4)).max(1);
                // Key tiles that are not powers of two (48, 80: FlashAttention-3 runs 176 at
                // d = 128) against the query tiles' edges, masks and ragged key tails.
                let block_n = [16u32, 32, 48, 64, 80][bn_i];
                let sched = AttentionSchedule {
                    block_m,
                    block_n,
                    warps,
                    stages: stages as u32 + 1,
                    q_in_registers: seed % 2 == 0,
                    skip_unit_rescale: seed % 3 == 0,
                    lazy_rescale: seed % 5 < 2,
                    store_tma: false,
                    // The probabilities through a shared tile (rounded as in registers).
                    p_in_shared: seed % 7 < 3,
                    pin_deferred_wait: false,
                    persistent: None,
                    mma: MmaUnit::Sync,
                    loads: Loads::Cooperative,
                };
                let prob = Problem {
                    batch,
                    heads: 2 * kvg,
                    kv_group: kvg,
                    n_q,
                    n_k,
                };
                Case {
                    spec,
                    sched,
                    prob,
                    bhnd,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]
    #[test]
    fn interpreter_matches_naive_attention(case in case_strategy()) {
        prop_assert!(check(&case).is_ok(), "{}", check(&case).err().unwrap_or_default());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// `RowReduceMap` is `Mask` and `RowReduce` of a mapped tile, without the tile: the
    /// softmax's row max rewritten to it gives the same bits, under causal and window masks
    /// and ragged tails.
    #[test]
    fn row_reduce_map_equals_map_mask_reduce(case in case_strategy()) {
        // Weights without normalization have no row reduction.
        prop_assume!(case.spec.normalization == Normalization::Softmax);
        let plain = run_case(&case, |_| {}).map_err(TestCaseError::fail)?;
        let fused = run_case(&case, |p| {
            assert!(reduce_maps(&mut p.body) > 0, "no map-mask-reduce in {}", p.name);
        })
        .map_err(TestCaseError::fail)?;
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same(&plain.out, &fused.out), "outputs differ for {case:?}");
        for (a, b) in plain.rows.iter().zip(&fused.rows) {
            prop_assert!(same(a, b), "row outputs differ for {case:?}");
        }
    }
}

#[test]
fn causal_window_ragged_fixed_cases() {
    // Hand-picked edges: tails of 1, windows smaller than a tile, N_q != N_k.
    for (n_q, n_k, causal, window) in [
        (1, 1, true, None),
        (17, 33, true, Some(5)),
        (130, 65, false, Some(3)),
        (64, 129, true, None),
        (100, 100, true, Some(1)),
    ] {
        let mut spec = AttentionSpec::new(64, Elem::Bf16);
        spec.causal = causal;
        spec.window = window;
        spec.write_lse = true;
        let sched = AttentionSchedule {
            block_m: 64,
            block_n: 32,
            warps: 4,
            stages: 2,
            q_in_registers: true,
            skip_unit_rescale: false,
            lazy_rescale: false,
            store_tma: false,
            p_in_shared: false,
            pin_deferred_wait: false,
            persistent: None,
            mma: MmaUnit::Sync,
            loads: Loads::Cooperative,
        };
        if let Err(e) = check_fixed(spec, sched, 2, (n_q, n_k), 7) {
            panic!("{e}");
        }
    }
}

#[test]
fn probabilities_through_shared_memory_in_the_producer_shapes() {
    // FlashAttention-3's 192 x 192 at d = 64 (three consumer warpgroups, P through shared
    // memory) and 192 x 128 at d = 128: the shared tile of P against the query tiles'
    // diagonal, ragged tails, a wider V, and the weights without normalization.
    for (d, dv, block_n, causal, sigmoid, n_q, n_k) in [
        (64u32, 64u32, 192u32, false, false, 400usize, 500usize),
        (64, 64, 192, true, false, 450, 450),
        (64, 128, 128, false, false, 200, 385),
        (128, 128, 128, true, false, 300, 300),
        (64, 64, 128, false, true, 250, 333),
    ] {
        let mut spec = AttentionSpec::new(d, Elem::Bf16);
        spec.value_dim = dv;
        spec.causal = causal;
        if sigmoid {
            use einattn_backends::tile::ex;
            spec.score.expr = ex::un(UnaryOp::Tanh, spec.score.expr.clone());
            spec.normalization = Normalization::None;
        } else {
            spec.write_lse = true;
        }
        let sched = AttentionSchedule {
            block_m: 192,
            block_n,
            warps: 12,
            stages: 2,
            q_in_registers: false,
            skip_unit_rescale: true,
            lazy_rescale: false,
            store_tma: false,
            p_in_shared: true,
            pin_deferred_wait: false,
            persistent: None,
            mma: MmaUnit::Warpgroup,
            loads: Loads::ProducerWarpgroup {
                pingpong: false,
                tma: true,
            },
        };
        if let Err(e) = check_fixed(spec, sched, 1, (n_q, n_k), 13) {
            panic!("{d}/{dv} x {block_n}: {e}");
        }
    }
}

#[test]
fn wide_key_tiles_of_the_producer_shapes() {
    // FlashAttention-3's shapes (128 x 176 at d = 128, 128 x 192 at d = 64) as the sm_90a
    // producer kernels run them: key tiles that straddle the query tiles' diagonal, a
    // ragged last key tile, both tails.
    for (d, block_n, causal, n_q, n_k) in [
        (128u32, 176u32, false, 300usize, 400usize),
        (128, 176, true, 400, 400),
        (64, 192, true, 333, 333),
        (64, 208, false, 129, 500),
    ] {
        let mut spec = AttentionSpec::new(d, Elem::Bf16);
        spec.causal = causal;
        spec.write_lse = true;
        let sched = AttentionSchedule {
            block_m: 128,
            block_n,
            warps: 8,
            stages: 2,
            q_in_registers: false,
            skip_unit_rescale: true,
            lazy_rescale: false,
            store_tma: false,
            p_in_shared: false,
            pin_deferred_wait: false,
            persistent: None,
            mma: MmaUnit::Warpgroup,
            loads: Loads::ProducerWarpgroup {
                pingpong: d >= 128,
                tma: true,
            },
        };
        if let Err(e) = check_fixed(spec, sched, 1, (n_q, n_k), 11) {
            panic!("{d} x {block_n}: {e}");
        }
    }
}

#[test]
fn lazy_rescale_is_exact_when_the_max_moves_late() {
    // Scores that climb along the keys (a term `ramp * m`) move a row's max past the lazy
    // threshold every few tiles, or at every tile, or (falling) only at the first: the
    // output and the log-sum-exp must match the reference either way.
    use einattn_backends::tile::{ex, SeqRank};
    for (ramp, causal, sink) in [
        (0.05, false, false),
        (0.3, true, false),
        (2.0, false, true),
        (-0.05, true, true),
    ] {
        let mut spec = AttentionSpec::new(32, Elem::Bf16);
        spec.causal = causal;
        spec.score.expr = ex::add(
            spec.score.expr.clone(),
            ex::mul(ex::lit(ramp), ScalarExpr::Index(SeqRank::Key)),
        );
        if sink {
            spec.score.head_params.push("sink".into());
            let id = spec.score.head_params.len() as u32 - 1;
            spec.sink = Some(ScalarExpr::Head(HeadParamId(id)));
        } else {
            spec.write_lse = true;
        }
        for lazy in [false, true] {
            let sched = AttentionSchedule {
                block_m: 32,
                block_n: 16,
                warps: 2,
                stages: 2,
                q_in_registers: false,
                skip_unit_rescale: true,
                lazy_rescale: lazy,
                store_tma: false,
                p_in_shared: false,
                pin_deferred_wait: false,
                persistent: None,
                mma: MmaUnit::Sync,
                loads: Loads::Cooperative,
            };
            if let Err(e) = check_fixed(spec.clone(), sched, 2, (70, 150), 5) {
                panic!("ramp {ramp} lazy {lazy}: {e}");
            }
        }
    }
}

#[test]
fn window_edges_sweep() {
    // Windows at and around tile sizes hit every off-by-one of the skip and mask rules.
    for window in [
        1u32, 2, 15, 16, 17, 18, 31, 32, 33, 34, 47, 48, 49, 63, 64, 65,
    ] {
        for causal in [false, true] {
            let mut spec = AttentionSpec::new(16, Elem::Bf16);
            spec.causal = causal;
            spec.window = Some(window);
            spec.write_lse = true;
            let sched = AttentionSchedule {
                block_m: 32,
                block_n: 16,
                warps: 2,
                stages: 2,
                q_in_registers: true,
                skip_unit_rescale: false,
                lazy_rescale: false,
                store_tma: false,
                p_in_shared: false,
                pin_deferred_wait: false,
                persistent: None,
                mma: MmaUnit::Sync,
                loads: Loads::Cooperative,
            };
            let prob = Problem {
                batch: 1,
                heads: 1,
                kv_group: 1,
                n_q: 97,
                n_k: 90,
            };
            let case = Case {
                spec,
                sched,
                prob,
                bhnd: false,
                seed: window as u64,
            };
            if let Err(e) = check(&case) {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn skipped_tiles_really_are_skipped() {
    use einattn_backends::tile::{key_tile_needs_mask, key_tile_range, BandMask};
    // Causal, query tile rows 128..255, key tiles of 64: tiles 0..4, only 2 and 3 masked.
    let m = [BandMask::causal()];
    let r = key_tile_range(&m, 128, 255, 4096, 64);
    assert_eq!((r.begin, r.end), (0, 4));
    let masked: Vec<i64> = (r.begin..r.end)
        .filter(|&t| key_tile_needs_mask(&m, t, 128, 255, 4096, 64))
        .collect();
    assert_eq!(masked, vec![2, 3]);
    // Window of 64 keys for the same rows: keys 65..255 -> tiles 1..4, all boundary but 2?
    let w = [BandMask::causal(), BandMask::window(64)];
    let r = key_tile_range(&w, 128, 255, 4096, 64);
    assert_eq!((r.begin, r.end), (1, 4));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// A slice of the queries at a position offset (one device's share under sequence
    /// parallelism, keys whole) gives exactly those rows of the full attention, with causal
    /// and window masks and ALiBi seeing global positions.
    #[test]
    fn query_offset_slices_equal_rows_of_the_full_attention(
        n in 2usize..150, split in 0.0f64..1.0, window in proptest::option::of(1u32..80),
        alibi in any::<bool>(), seed in any::<u64>())
    {
        let mut spec = AttentionSpec::new(16, Elem::Bf16);
        spec.causal = true;
        spec.window = window;
        if alibi {
            spec.score = spec.score.with_alibi();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let heads = 2;
        let q = random_tensor(&mut rng, spec.elem, 1, n, heads, 16, false);
        let k = random_tensor(&mut rng, spec.elem, 1, n, heads, 16, false);
        let v = random_tensor(&mut rng, spec.elem, 1, n, heads, 16, false);
        let scalars = [0.25];
        let slopes = vec![alibi_slopes(heads)];
        let head_params: Vec<Vec<f64>> = if alibi { slopes } else { vec![] };
        let full_prob = Problem { batch: 1, heads, kv_group: 1, n_q: n, n_k: n };
        let full_inputs = AttentionInputs {
            q: &q, k: &k, v: &v, scalars: &scalars, head_params: &head_params, q_offset: 0,
            tokens: &[],
        };
        let (want_full, _) = attention(&spec, full_prob, &full_inputs);
        // The device's queries: rows [off, n).
        let off = ((n as f64 * split) as usize).min(n - 1);
        let len = n - off;
        let row = heads * 16;
        let q_slice = HostTensor::bnhd(q.data[off * row..].to_vec(), len, heads, 16);
        let mut sliced = spec.clone();
        sliced.query_offset = true;
        let sched = AttentionSchedule {
            block_m: 32, block_n: 16, warps: 2, stages: 2, q_in_registers: false, lazy_rescale: false, store_tma: false, p_in_shared: false, pin_deferred_wait: false, skip_unit_rescale: false, mma: MmaUnit::Sync, loads: Loads::Cooperative, persistent: None,
        };
        let (prog, bind) = flash_attention(&sliced, &sched).expect("builds");
        let mut io = Bindings {
            tensors: vec![q_slice, k.clone(), v.clone(), HostTensor::bnhd(vec![f64::NAN; len * row], len, heads, 16)],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: scalars.to_vec(),
            head_params: head_params.clone(),
            tokens: vec![],
            chunk_base: 0,
            q_offset: off,
            chunk_total: 0,
            states: vec![],
        };
        let prob = Problem { batch: 1, heads, kv_group: 1, n_q: len, n_k: n };
        run(&prog, prob, &mut io).expect("runs");
        let err = relative_error(&io.tensors[bind.o.index()].data, &want_full[off * row..]);
        prop_assert!(err < 1e-2, "offset {}: relative error {}", off, err);
    }
}
