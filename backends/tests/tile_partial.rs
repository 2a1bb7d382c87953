//! The partial attention program (Ring Attention's per-block kernel) run by the Tile IR
//! interpreter equals the reference statistics of attention over one key block, with the
//! query block at any position relative to the key block (masks and ALiBi see relative
//! positions), rows that see no key included; and partials over the blocks of a split
//! key range, merged by the plan's merge and finished by its epilogue (the helper kernels'
//! loops), equal attention over the whole range.

use einattn_backends::family::elementwise::{lse_epilogue_model, lse_merge_model, MergeKind};
use einattn_backends::family::softmax::{flash_attention, AttentionSchedule, AttentionSpec};
use einattn_backends::reference::{
    alibi_slopes, attention, attention_partial, relative_error, AttentionInputs,
};
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::Elem;
use einattn_backends::tile::Loads;
use einattn_backends::tile::MmaUnit;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, elem: Elem, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| elem.round(rng.random_range(-1.0..1.0)))
        .collect()
}

/// Relative error that also requires `-inf` exactly where the reference has it.
fn stats_error(got: &[f64], want: &[f64]) -> f64 {
    let mut g = Vec::new();
    let mut w = Vec::new();
    for (a, b) in got.iter().zip(want) {
        if *b == f64::NEG_INFINITY {
            if *a != f64::NEG_INFINITY {
                return f64::INFINITY;
            }
            continue;
        }
        g.push(*a);
        w.push(*b);
    }
    if got.len() != want.len() {
        return f64::NAN;
    }
    relative_error(&g, &w)
}

struct Block {
    spec: AttentionSpec,
    batch: usize,
    heads: usize,
    d: usize,
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    scalars: Vec<f64>,
    head_params: Vec<Vec<f64>>,
}

/// The partial program on (queries, keys) with the query block at `q_offset` relative to
/// the key block: `(max, sum, numerator)` as `[B, H, N_q]`, `[B, H, N_q]`, `[B, H, N_q, d]`.
fn run_partial(x: &Block, n_q: usize, n_k: usize, q_offset: usize) -> [Vec<f64>; 3] {
    let mut spec = x.spec.clone();
    spec.partial = true;
    spec.query_offset = true;
    let sched = AttentionSchedule {
        block_m: 32,
        block_n: 16,
        warps: 2,
        stages: 2,
        q_in_registers: false,
        skip_unit_rescale: false,
        lazy_rescale: false,
        store_tma: false,
        p_in_shared: false,
        pin_deferred_wait: false,
        persistent: None,
        mma: MmaUnit::Sync,
        loads: Loads::Cooperative,
    };
    let (prog, bind) = flash_attention(&spec, &sched).expect("builds");
    let (b, h, d) = (x.batch, x.heads, x.d);
    let rows = b * h * n_q;
    let mut io = Bindings {
        tensors: vec![
            x.q.clone(),
            x.k.clone(),
            x.v.clone(),
            HostTensor::bhnd(vec![f64::NAN; rows * d], n_q, h, d),
        ],
        row_outputs: vec![vec![f64::NAN; rows]; 2],
        row_inputs: vec![],
        scalars: x.scalars.clone(),
        head_params: x.head_params.clone(),
        states: vec![],
        chunk_base: 0,
        chunk_total: 0,
        q_offset,
        tokens: vec![],
    };
    let prob = Problem {
        batch: b,
        heads: h,
        kv_group: 1,
        n_q,
        n_k,
    };
    run(&prog, prob, &mut io).expect("runs");
    let (mx, sum) = bind.stats.expect("a partial program has statistics");
    [
        io.row_outputs[mx.index()].clone(),
        io.row_outputs[sum.index()].clone(),
        io.tensors[bind.o.index()].data.clone(),
    ]
}

fn block(
    seed: u64,
    causal: bool,
    window: Option<u32>,
    alibi: bool,
    softcap: bool,
    n_q: usize,
    n_k: usize,
) -> Block {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (batch, heads, d) = (2, 2, 16);
    let mut spec = AttentionSpec::new(d as u32, Elem::Bf16);
    spec.causal = causal;
    spec.window = window;
    if softcap {
        spec.score = spec.score.with_softcap();
    }
    if alibi {
        spec.score = spec.score.with_alibi();
    }
    let tensor = |rng: &mut ChaCha8Rng, n: usize| {
        HostTensor::bnhd(random(rng, spec.elem, batch * n * heads * d), n, heads, d)
    };
    let q = tensor(&mut rng, n_q);
    let k = tensor(&mut rng, n_k);
    let v = tensor(&mut rng, n_k);
    let scalars: Vec<f64> = spec
        .score
        .scalars
        .iter()
        .map(|n| if n == "softcap" { 2.0 } else { 0.3 })
        .collect();
    let head_params = if alibi {
        vec![alibi_slopes(heads)]
    } else {
        vec![]
    };
    Block {
        spec,
        batch,
        heads,
        d,
        q,
        k,
        v,
        scalars,
        head_params,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// One (query block, key block) pair at any relative position.
    #[test]
    fn partial_statistics_match_the_reference(
        seed in 0u64..1000,
        n_q in 1usize..70,
        n_k in 1usize..70,
        q_offset in 0usize..120,
        causal in any::<bool>(),
        window in prop::option::of(1u32..40),
        alibi in any::<bool>(),
        softcap in any::<bool>(),
    ) {
        let x = block(seed, causal, window, alibi, softcap, n_q, n_k);
        let [mx, sum, num] = run_partial(&x, n_q, n_k, q_offset);
        let want = attention_partial(
            &x.spec,
            Problem { batch: x.batch, heads: x.heads, kv_group: 1, n_q, n_k },
            &AttentionInputs {
                q: &x.q, k: &x.k, v: &x.v, scalars: &x.scalars,
                head_params: &x.head_params, q_offset, tokens: &[],
            },
        );
        // The max is exact up to f32; the sums see bf16 probabilities in the numerator.
        prop_assert!(stats_error(&mx, &want.max) < 1e-6, "max {:?} vs {:?}", mx, want.max);
        prop_assert!(stats_error(&sum, &want.sum) < 1e-5, "sum");
        prop_assert!(stats_error(&num, &want.num) < 1e-2, "numerator");
        // A row that saw nothing has max -inf, sum 0 and a zero numerator (no NaN).
        for (r, m) in mx.iter().enumerate() {
            if *m == f64::NEG_INFINITY {
                prop_assert_eq!(sum[r], 0.0);
                prop_assert!(num[r * x.d..(r + 1) * x.d].iter().all(|v| *v == 0.0));
            }
        }
    }

    /// Keys split into blocks, one partial per block, merged and finished as a ring plan
    /// does it: attention over every key.
    #[test]
    fn merged_partials_are_attention(
        seed in 0u64..1000,
        n in 2usize..90,
        cuts in prop::collection::vec(1usize..89, 1..4),
        causal in any::<bool>(),
        window in prop::option::of(1u32..40),
    ) {
        // Without the causal mask a window could reach keys after the queries, which the
        // plan's pairs never ask of the kernel; unmasked, positions do not matter.
        let window = if causal { window } else { None };
        let x = block(seed, causal, window, false, false, n, n);
        let mut edges: Vec<usize> = cuts.into_iter().filter(|&c| c < n).collect();
        edges.push(0);
        edges.push(n);
        edges.sort_unstable();
        edges.dedup();
        let (b, h, d) = (x.batch, x.heads, x.d);
        let rows = b * h * n;
        let mut acc: Option<[Vec<f64>; 3]> = None;
        for w in edges.windows(2) {
            let (k0, len) = (w[0], w[1] - w[0]);
            let slice = |t: &HostTensor| {
                let row = h * d;
                let mut data = Vec::new();
                for bi in 0..b {
                    let base = bi * n * row;
                    data.extend_from_slice(&t.data[base + k0 * row..base + (k0 + len) * row]);
                }
                HostTensor::bnhd(data, len, h, d)
            };
            let part = Block { k: slice(&x.k), v: slice(&x.v), ..block(seed, causal, window, false, false, n, n) };
            // Under a causal mask a key block at k0 sees query rows from k0 on: those run at
            // relative offset 0 (rows before k0 see nothing and keep -inf).
            let stats = if k0 == 0 || !causal {
                run_partial(&part, n, len, 0)
            } else {
                let rows_after = n - k0;
                let qs = {
                    let row = h * d;
                    let mut data = Vec::new();
                    for bi in 0..b {
                        let base = bi * n * row;
                        data.extend_from_slice(&x.q.data[base + k0 * row..base + n * row]);
                    }
                    HostTensor::bnhd(data, rows_after, h, d)
                };
                let shifted = Block { q: qs, ..part };
                let [m, s, v] = run_partial(&shifted, rows_after, len, 0);
                // Scatter rows [k0, n) back into the full query range.
                let mut full = [vec![f64::NEG_INFINITY; rows], vec![0.0; rows], vec![0.0; rows * d]];
                for bh in 0..b * h {
                    for p in 0..rows_after {
                        let (src, dst) = (bh * rows_after + p, bh * n + k0 + p);
                        full[0][dst] = m[src];
                        full[1][dst] = s[src];
                        full[2][dst * d..(dst + 1) * d].copy_from_slice(&v[src * d..(src + 1) * d]);
                    }
                }
                full
            };
            acc = Some(match acc {
                None => stats,
                Some(mut into) => {
                    // The merge order of the plan: sums (reading both maxes), then the max.
                    let [im, is, iv] = &mut into;
                    lse_merge_model(MergeKind::RescaledSum, iv, &stats[2], im, &stats[0], d);
                    lse_merge_model(MergeKind::RescaledSum, is, &stats[1], im, &stats[0], 1);
                    lse_merge_model(MergeKind::Max, im, &stats[0], &[], &[], 1);
                    into
                }
            });
        }
        let [_, sum, num] = acc.expect("one block at least");
        let out = lse_epilogue_model(&num, &sum, d);
        let (want, _) = attention(
            &x.spec,
            Problem { batch: b, heads: h, kv_group: 1, n_q: n, n_k: n },
            &AttentionInputs {
                q: &x.q, k: &x.k, v: &x.v, scalars: &x.scalars,
                head_params: &x.head_params, q_offset: 0, tokens: &[],
            },
        );
        // `want` is [B, N, H, d]; `out` is [B, H, N, d].
        let mut got = vec![0.0; want.len()];
        for bi in 0..b {
            for hi in 0..h {
                for p in 0..n {
                    let src = ((bi * h + hi) * n + p) * d;
                    let dst = ((bi * n + p) * h + hi) * d;
                    got[dst..dst + d].copy_from_slice(&out[src..src + d]);
                }
            }
        }
        prop_assert!(relative_error(&got, &want) < 1e-2, "error {}", relative_error(&got, &want));
    }
}
