//! A split key loop and its merge (decoding), run by the Tile interpreter, equal the naive
//! attention formula: any number of splits (more than the key tiles included, so some
//! splits see no key), causal and window masks, ragged tails, few and many queries, and a
//! sink logit (per head, or softmax1's `+1`), which only the merge counts.

use einattn_backends::family::softmax::split::{split_attention, split_count};
use einattn_backends::family::softmax::{AttentionSchedule, AttentionSpec};
use einattn_backends::reference::{alibi_slopes, attention, relative_error, AttentionInputs};
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::Loads;
use einattn_backends::tile::{Elem, HeadParamId, MmaUnit, ScalarExpr};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
struct Case {
    spec: AttentionSpec,
    sched: AttentionSchedule,
    prob: Problem,
    splits: u32,
    seed: u64,
}

fn tensor(rng: &mut ChaCha8Rng, elem: Elem, b: usize, n: usize, h: usize, d: usize) -> HostTensor {
    let data = (0..b * n * h * d)
        .map(|_| elem.round(rng.random_range(-1.0..1.0)))
        .collect();
    HostTensor::bnhd(data, n, h, d)
}

/// The relative error of the split program and its merge against the formula.
fn split_error(case: &Case) -> Result<f64, String> {
    let Case {
        spec,
        sched,
        prob,
        splits,
        seed,
    } = case.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = spec.head_dim as usize;
    let (b, h, kvh) = (prob.batch, prob.heads, prob.kv_heads());
    let q = tensor(&mut rng, spec.elem, b, prob.n_q, h, d);
    let k = tensor(&mut rng, spec.elem, b, prob.n_k, kvh, d);
    let v = tensor(&mut rng, spec.elem, b, prob.n_k, kvh, d);
    let scale = rng.random_range(0.5..2.0) / (d as f64).sqrt();
    let slopes = alibi_slopes(h);
    // A sink from well below the scores to well above them.
    let sinks: Vec<f64> = (0..h).map(|_| rng.random_range(-3.0..4.0)).collect();
    let (main, merge, bind) = split_attention(&spec, &sched, splits).map_err(|e| e.to_string())?;
    let s = splits as usize;
    let rows = b * h * prob.n_q;
    // The numerator's copies are stacked along the batch rank: poisoned, every row of
    // every copy must be written.
    let num = HostTensor::bhnd(vec![f64::NAN; s * rows * d], prob.n_q, h, d);
    let scalars = vec![scale; spec.score.scalars.len()];
    let head_params: Vec<Vec<f64>> = main
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
        tensors: vec![q.clone(), k.clone(), v.clone(), num],
        row_outputs: vec![vec![f64::NAN; s * rows]; 2],
        row_inputs: vec![],
        scalars: scalars.clone(),
        head_params: head_params.clone(),
        tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    run(&main, prob, &mut io).map_err(|e| e.to_string())?;
    let o = HostTensor::bnhd(vec![f64::NAN; rows * d], prob.n_q, h, d);
    let mut merged = Bindings {
        tensors: vec![io.tensors[bind.o.index()].clone(), o],
        row_outputs: vec![],
        row_inputs: io.row_outputs.clone(),
        // The merge reads the score's parameters when it adds a sink.
        scalars: if merge.scalars.is_empty() {
            vec![]
        } else {
            scalars.clone()
        },
        head_params: if merge.head_params.is_empty() {
            vec![]
        } else {
            head_params.clone()
        },
        tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    run(&merge, prob, &mut merged).map_err(|e| e.to_string())?;
    let inputs = AttentionInputs {
        q: &q,
        k: &k,
        v: &v,
        scalars: &scalars,
        head_params: &head_params,
        q_offset: 0,
        tokens: &[],
    };
    let (want, _) = attention(&spec, prob, &inputs);
    Ok(relative_error(&merged.tensors[1].data, &want))
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![Just(16u32), Just(32), Just(64)],
            any::<bool>(),
            prop::option::of(1u32..60),
            any::<bool>(),
        ),
        (0usize..3, 0usize..3, 1u32..7, 0u8..3),
        (1usize..3, 1usize..3, 1usize..40, 1usize..300, any::<u64>()),
    )
        .prop_map(
            |(
                (d, causal, window, alibi),
                (warps_i, bn_i, splits, sink),
                (batch, kvg, n_q, n_k, seed),
            )| {
                let mut spec = AttentionSpec::new(d, Elem::Bf16);
                spec.causal = causal;
                spec.window = window;
                if alibi {
                    spec.score = spec.score.with_alibi();
                }
                spec.sink = match sink {
                    0 => None,
                    1 => {
                        spec.score.head_params.push("sink".into());
                        let id = spec.score.head_params.len() as u32 - 1;
                        Some(ScalarExpr::Head(HeadParamId(id)))
                    }
                    _ => Some(ScalarExpr::Lit(0.0)),
                };
                let warps = [1u32, 2, 4][warps_i];
                let sched = AttentionSchedule {
                    block_m: 16 * warps,
                    block_n: [16u32, 32, 64][bn_i],
                    warps,
                    stages: 2,
                    q_in_registers: seed % 2 == 0,
                    skip_unit_rescale: seed % 3 == 0,
                    lazy_rescale: false,
                    store_tma: false,
                    p_in_shared: false,
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
                    splits,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn split_and_merge_equal_the_formula(case in case_strategy()) {
        let err = split_error(&case).map_err(TestCaseError::fail)?;
        prop_assert!(err < 1e-2, "error {err} for {case:?}");
    }
}

#[test]
fn decoding_splits_fill_the_gpu_and_no_more() {
    // One query per head, 32 heads, 131072 keys, 132 resident CTAs.
    assert_eq!(split_count(32, 131_072, 132, 128), 4);
    // Enough CTAs already: no split.
    assert_eq!(split_count(256, 32_768, 132, 128), 1);
    // A short sequence keeps one kernel; each split walks at least 2048 keys.
    assert_eq!(split_count(16, 1024, 132, 128), 1);
    assert_eq!(split_count(1, 4096, 132, 128), 2);
    // Capped, lower where the merge's accumulator is wide.
    assert_eq!(split_count(1, 1 << 20, 264, 128), 32);
    assert_eq!(split_count(1, 1 << 20, 264, 256), 8);
}

/// The split kernel and its merge assemble without spills at head dims 64, 128 and 256, for
/// as many splits as the scheduler takes (a long cache over few heads: the most splits),
/// on both targets: the merge's registers must not grow with the split count.
#[test]
fn decoding_kernels_assemble_without_spills_at_any_split_count() {
    use einattn_backends::family::softmax::compile_softmax;
    use einattn_backends::family::{Compiled, KernelOptions};
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("decoding_kernels_assemble_without_spills_at_any_split_count")
    else {
        return;
    };
    let path = format!(
        "{}/../examples/flash_decoding.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("example exists");
    for d in [64u64, 128, 256] {
        for n in [16_384u64, 131_072] {
            let defines = vec![("D".to_string(), d), ("N".to_string(), n)];
            let c = einattn_dsl::compile_source(&path, &src, &defines)
                .unwrap_or_else(|e| panic!("{}", e.render(&path, &src)));
            for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
                let options = KernelOptions {
                    target,
                    ..KernelOptions::default()
                };
                let k = compile_softmax(&c, &options).unwrap_or_else(|e| panic!("{}", e.message()));
                assert!(k.modules().len() == 2, "d={d} N={n}: not split");
                for m in k.modules() {
                    let r = assemble(&ptxas, &m.ptx.text, arch).expect("ptxas assembles");
                    assert!(
                        !r.spills(),
                        "{} d={d} N={n} {arch} spills:\n{}",
                        m.ptx.entry,
                        r.log
                    );
                }
            }
        }
    }
}
