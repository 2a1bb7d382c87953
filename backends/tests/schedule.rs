//! The scheduler reads every softmax example as attention, and the kernel it builds
//! computes what the cascade says: the Tile IR interpreter (running the exact tiling,
//! masking and skipping the GPU runs) is compared with the reference interpreter.

use einattn_backends::family::softmax::AttentionSchedule;
use einattn_backends::family::softmax::{compile_softmax, flash_attention, SoftmaxKernels};
use einattn_backends::family::softmax::{recognize, schedule, AttentionMatch, ScheduleOptions};
use einattn_backends::family::{Compiled, KernelOptions};
use einattn_backends::reference::relative_error;
use einattn_backends::tile::interp::{run, Bindings};
use einattn_backends::tile::Elem;
use einattn_backends::tile::Loads;
use einattn_backends::tile::MmaUnit;
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{evaluate_in_order, random_inputs};
use einattn_ir::validate::topological_order;
use proptest::prelude::*;

const SOFTMAX_EXAMPLES: [&str; 17] = [
    "attention_1pass",
    "relative_bias",
    "sigmoid_attention",
    "attention_mla",
    "sink_attention",
    "softmax_plus_one",
    "attention_alibi",
    "cross_attention",
    "document_mask",
    "attention_mha",
    "attention_softcap",
    "attention_2pass",
    "attention_3pass",
    "attention_causal",
    "attention_sliding_window",
    "flash_decoding",
    "gqa_sink_decoding",
];

fn load(name: &str, defines: &[(&str, u64)]) -> Cascade {
    let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example exists");
    let defines: Vec<(String, u64)> = defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    einattn_dsl::compile_source(&path, &src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render(&path, &src)))
}

/// A tile shape for the Tile interpreter: `mma.sync`, every thread loading, Q re-read from
/// shared memory, the unit rescale skipped.
fn cooperative(block_m: u32, block_n: u32, warps: u32, stages: u32) -> AttentionSchedule {
    AttentionSchedule {
        block_m,
        block_n,
        warps,
        stages,
        q_in_registers: false,
        skip_unit_rescale: true,
        lazy_rescale: false,
        store_tma: false,
        p_in_shared: false,
        pin_deferred_wait: false,
        persistent: None,
        mma: MmaUnit::Sync,
        loads: Loads::Cooperative,
    }
}

/// Runs the matched kernel's tile program on the cascade's random inputs and compares its
/// output with the reference interpreter's. Returns the relative error.
fn tile_vs_interpreter(c: &Cascade, kernel: AttentionSchedule, seed: u64) -> f64 {
    tile_vs_interpreter_on(c, kernel, random_inputs(c, seed))
}

type Inputs = std::collections::HashMap<
    einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>,
    einattn_ir::interp::TensorData,
>;

fn tile_vs_interpreter_on(c: &Cascade, kernel: AttentionSchedule, inputs: Inputs) -> f64 {
    let m: AttentionMatch = recognize(c).unwrap_or_else(|d| panic!("{}: {}", c.name, d.message));
    tile_vs_interpreter_of(c, &m, kernel, inputs)
}

/// As [`tile_vs_interpreter_on`], for a match the scheduler may have changed (packed query
/// heads).
fn tile_vs_interpreter_of(
    c: &Cascade,
    m: &AttentionMatch,
    kernel: AttentionSchedule,
    inputs: Inputs,
) -> f64 {
    let values = evaluate_in_order(c, &inputs, &topological_order(c)).expect("interpreter runs");
    let (prog, bind) = flash_attention(&m.spec, &kernel).expect("tile program builds");
    let host = |l: &einattn_backends::family::Layout, data: Vec<f64>| l.host(data);
    // The kernel sees what the GPU would: inputs rounded to the storage type.
    let rounded = |t| {
        inputs[&t]
            .stored()
            .iter()
            .map(|&x| m.spec.elem.round(x))
            .collect::<Vec<f64>>()
    };
    let mut io = Bindings {
        tensors: vec![
            host(&m.q, rounded(m.q.tensor)),
            host(&m.k, rounded(m.k.tensor)),
            host(&m.v, rounded(m.v.tensor)),
            host(&m.o, vec![f64::NAN; m.o.elements as usize]),
        ],
        row_outputs: vec![],
        row_inputs: vec![],
        scalars: m
            .scalar_params
            .iter()
            .map(|t| inputs[t].stored()[0])
            .collect(),
        head_params: m
            .head_params
            .iter()
            .map(|t| inputs[t].stored().into_owned())
            .collect(),
        tokens: m
            .tokens
            .iter()
            .map(|l| {
                let values = inputs[&l.tensor].stored().into_owned();
                let s = |x: u64| x as usize;
                (values, s(l.stride_batch), s(l.stride_seq), s(l.stride_head))
            })
            .collect(),
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    let prob = m.problem();
    run(&prog, prob, &mut io).expect("tile interpreter runs");
    let want = values.get(m.o.tensor).expect("output computed").stored();
    relative_error(&io.tensors[bind.o.index()].data, &want)
}

/// The attention formula of `m` (the reference past the interpreter's reach) against the
/// cascade interpreter's output, on `inputs`.
fn formula_error(c: &Cascade, m: &AttentionMatch, inputs: &Inputs) -> f64 {
    relative_error(&m.reference_output(inputs), &interpreted_output(c, inputs))
}

/// The cascade's output `O` by the reference interpreter on `inputs`.
fn interpreted_output(c: &Cascade, inputs: &Inputs) -> Vec<f64> {
    let values = evaluate_in_order(c, inputs, &topological_order(c)).expect("interpreter");
    let o = c.tensor_by_name("O").expect("an output O");
    values.get(o).expect("computed").stored().into_owned()
}

#[test]
fn every_softmax_example_is_recognized() {
    for name in SOFTMAX_EXAMPLES {
        let c = load(name, &[]);
        let m = recognize(&c).unwrap_or_else(|d| panic!("{name}: {}", d.message));
        assert_eq!(m.spec.head_dim as u64, c.ranks[m.roles.head_dim].extent);
        assert_eq!(m.n_k, c.ranks[m.roles.key].extent);
        assert!(!m.reading.is_empty());
    }
    let causal = recognize(&load("attention_causal", &[])).expect("recognized");
    assert!(causal.spec.causal && causal.spec.window.is_none());
    let sw = recognize(&load("attention_sliding_window", &[])).expect("recognized");
    assert!(sw.spec.causal);
    assert_eq!(sw.spec.window, Some(256));
    assert_eq!(sw.spec.score.head_params, vec!["slope".to_string()]);
    assert!(sw.spec.modifies_score());
    let dec = recognize(&load("flash_decoding", &[])).expect("recognized");
    assert_eq!((dec.n_q, dec.heads, dec.n_k), (1, 8, 16384));
}

#[test]
fn non_attention_cascades_are_refused_with_a_reason() {
    for name in ["lightning", "linear_attention", "lm_head_entropy"] {
        let c = load(name, &[]);
        let err = recognize(&c).expect_err("not softmax attention");
        assert!(!err.message.is_empty(), "{name}");
    }
}

#[test]
fn tile_program_matches_the_interpreter_on_every_example() {
    // Small sizes keep the f64 interpreter fast; tails and several tiles are exercised.
    let cases: [(&str, &[(&str, u64)]); 16] = [
        ("relative_bias", &[("N", 90), ("D", 16), ("H", 3)]),
        ("sigmoid_attention", &[("N", 90), ("D", 16), ("H", 3)]),
        ("sink_attention", &[("N", 90), ("D", 16), ("H", 3)]),
        (
            "softmax_plus_one",
            &[("N", 100), ("D", 16), ("TILE", 20), ("H", 2)],
        ),
        (
            "attention_mla",
            &[("N", 70), ("D", 48), ("DV", 16), ("TILE", 14), ("H", 2)],
        ),
        (
            "attention_alibi",
            &[("N", 90), ("D", 16), ("TILE", 30), ("H", 3)],
        ),
        (
            "cross_attention",
            &[("N", 45), ("M", 77), ("D", 16), ("TILE", 7), ("H", 2)],
        ),
        // Random documents (one to five per sequence) per batch; several tiles per document.
        (
            "document_mask",
            &[("N", 150), ("D", 16), ("TILE", 10), ("B", 3)],
        ),
        (
            "attention_mha",
            &[("N", 48), ("D", 16), ("TILE", 16), ("B", 2), ("H", 2)],
        ),
        ("attention_softcap", &[("N", 70), ("D", 16), ("H", 2)]),
        ("attention_1pass", &[("M", 96), ("D", 32), ("TILE", 32)]),
        ("attention_2pass", &[("M", 80), ("D", 16)]),
        ("attention_3pass", &[("M", 72), ("D", 32)]),
        (
            "attention_causal",
            &[("N", 100), ("D", 16), ("TILE", 20), ("H", 3)],
        ),
        (
            "attention_sliding_window",
            &[("N", 120), ("D", 16), ("TILE", 8), ("W", 37), ("B", 2)],
        ),
        ("flash_decoding", &[("N", 200), ("D", 32), ("H", 3)]),
    ];
    for (name, defines) in cases {
        let c = load(name, defines);
        for kernel in [
            cooperative(64, 32, 4, 2),
            AttentionSchedule {
                q_in_registers: true,
                skip_unit_rescale: false,
                ..cooperative(32, 16, 2, 3)
            },
            // Lazy rescaling, and a key tile that is not a power of two.
            AttentionSchedule {
                lazy_rescale: true,
                ..cooperative(64, 48, 4, 2)
            },
        ] {
            let err = tile_vs_interpreter(&c, kernel, 11);
            assert!(err < 1e-2, "{name} {kernel:?}: relative error {err}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Document masks over random shapes and tiles: packed documents (the key loop narrows
    /// to a query tile's documents, whose inner tiles skip the mask), ids in no order
    /// (documents interleaved: the narrowed range keeps keys of other documents between,
    /// masked per element), and one document with a single key of another inside it (a
    /// one-valued query tile whose range is not all one value).
    #[test]
    fn document_mask_random_shapes(n in 1u64..120, tile_i in 0usize..3, bn_i in 0usize..3,
                                   bm_i in 0usize..2, layout in 0usize..3,
                                   seed in any::<u64>()) {
        let tile = [1u64, 2, 5][tile_i];
        let n = n.div_ceil(tile) * tile;
        let c = load("document_mask", &[("N", n), ("D", 16), ("TILE", tile), ("B", 2)]);
        let mut inputs = random_inputs(&c, seed);
        let seg = c.tensor_by_name("SEG").expect("SEG");
        let data = inputs.get_mut(&seg).expect("drawn");
        let len = data.values.len();
        match layout {
            1 => {
                for (i, v) in data.values.iter_mut().enumerate() {
                    *v = ((i as u64).wrapping_mul(seed | 1) >> 3) as f64 % 3.0;
                }
            }
            2 => {
                data.values.iter_mut().for_each(|v| *v = 0.0);
                data.values[(seed as usize) % len] = 1.0;
            }
            _ => {}
        }
        let kernel = AttentionSchedule {
            skip_unit_rescale: seed % 2 == 0,
            persistent: None,
            ..cooperative([32, 64][bm_i], [16, 32, 64][bn_i], 2, 2)
        };
        let err = tile_vs_interpreter_on(&c, kernel, inputs);
        prop_assert!(err < 1e-2, "relative error {}", err);
    }

    /// Scores that read tensors, over random sizes and tiles: the causal relative-position
    /// bias table of the example (`TB[h, p - m]`), and a bidirectional one
    /// (`TB[h, p - m + N - 1]`, no mask) beside a per-key input and a per-query input
    /// subtracted; every table read is within the table, and tiles past either end clamp.
    #[test]
    fn score_operands_random_shapes(n in 1u64..100, bidirectional in any::<bool>(),
                                    bm_i in 0usize..2, bn_i in 0usize..3, seed in any::<u64>()) {
        let path = format!("{}/../examples/relative_bias.ein", env!("CARGO_MANIFEST_DIR"));
        let mut src = std::fs::read_to_string(&path).expect("example exists");
        if bidirectional {
            src = src
                .replace("rank z: N ", "rank z: 2*N - 1 ")
                .replace(
                    "TB[h, p - m] where m <= p",
                    "TB[h, p - m + N - 1] + KB[b, m, h] - QB[b, p, h]",
                )
                .replace(" where m <= p\n", "\n")
                .replace(
                    "input  V[b, m, h, f]: bf16",
                    "input  V[b, m, h, f]: bf16\ninput  KB[b, m, h]: f32\ninput  QB[b, p, h]: f32",
                );
            prop_assert!(src.contains("QB[b, p, h]:") && !src.contains(" where m <= p\n"));
        }
        let defines: Vec<(String, u64)> =
            [("N", n), ("D", 16), ("H", 2)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let c = einattn_dsl::compile_source(&path, &src, &defines)
            .unwrap_or_else(|d| panic!("{}", d.render(&path, &src)));
        let m = recognize(&c).expect("recognized");
        prop_assert_eq!(m.spec.tokens.len(), if bidirectional { 3 } else { 1 });
        let kernel = AttentionSchedule {
            skip_unit_rescale: seed % 2 == 0,
            persistent: None,
            ..cooperative([32, 64][bm_i], [16, 32, 64][bn_i], 2, 2)
        };
        let err = tile_vs_interpreter(&c, kernel, seed);
        prop_assert!(err < 1e-2, "relative error {}", err);
    }

    /// Random sizes, tiles and windows: the schedule's kernel agrees with the cascade.
    #[test]
    fn sliding_window_random_shapes(n in 1u64..90, w in 1u64..60, tile_i in 0usize..3,
                                    bn_i in 0usize..3, seed in any::<u64>()) {
        let tile = [1u64, 2, 4][tile_i];
        let n = n.div_ceil(tile) * tile;
        let c = load("attention_sliding_window",
                     &[("N", n), ("D", 16), ("TILE", tile), ("W", w), ("H", 2)]);
        let kernel = AttentionSchedule {
            skip_unit_rescale: seed % 2 == 0,
            persistent: None,
            ..cooperative(32, [16, 32, 64][bn_i], 2, 2)
        };
        let err = tile_vs_interpreter(&c, kernel, seed);
        prop_assert!(err < 1e-2, "relative error {}", err);
    }
}

#[test]
fn default_schedules_follow_the_cost_model() {
    for (d, bn) in [(64u64, 128u32), (128, 64)] {
        let c = load(
            "attention_causal",
            &[("N", 4096), ("D", d), ("H", 16), ("B", 4)],
        );
        let s = schedule(&c, &ScheduleOptions::default()).expect("schedules");
        assert_eq!(
            (s.kernel.block_m, s.kernel.block_n, s.kernel.warps),
            (128, bn, 4),
            "d={d}\n{}",
            s.explain()
        );
        assert!(s.explain().contains("why:"));
    }
    let c = load("attention_1pass", &[]);
    let forced = ScheduleOptions {
        block_m: Some(64),
        block_n: Some(32),
        stages: Some(3),
        ..ScheduleOptions::default()
    };
    let s = schedule(&c, &forced).expect("schedules");
    assert_eq!(
        (s.kernel.block_m, s.kernel.block_n, s.kernel.stages),
        (64, 32, 3)
    );
    let too_big = ScheduleOptions {
        block_n: Some(128),
        elem: Some(Elem::F16),
        ..ScheduleOptions::default()
    };
    let c128 = load("attention_1pass", &[("D", 128)]);
    let ok = schedule(&c128, &too_big).expect("block_m 64 still fits");
    assert_eq!(ok.kernel.block_m, 64);
    assert_eq!(ok.spec().elem, Elem::F16);
}

#[test]
fn a_persistent_grid_is_chosen_only_where_it_applies() {
    use einattn_backends::Target;
    let asked = |target, loads| ScheduleOptions {
        target,
        loads,
        persistent: Some(true),
        ..ScheduleOptions::default()
    };
    let big = [("N", 4096), ("D", 128), ("H", 16), ("B", 4)];
    // Warp-specialized on sm_90a: persistent, one CTA per SM, and said so.
    let c = load("attention_causal", &big);
    let s = schedule(&c, &asked(Target::Sm90a, None)).expect("schedules");
    assert_eq!(s.kernel.persistent, Some(132));
    assert!(
        s.explain().contains("persistent (asked): at most 132 CTAs"),
        "{}",
        s.explain()
    );
    let k = compile_kernel(
        &c,
        &KernelOptions {
            target: Target::Sm90a,
            persistent: Some(true),
            ..KernelOptions::default()
        },
    );
    let m = &k.modules()[0];
    // The grid is capped at the SM count; the kernel reads the batch to count its tiles.
    assert_eq!(m.contract.compiled_grid(), Ok([132, 1, 1]));
    assert!(m.ptx.abi.iter().any(|p| p.name == "batch"));
    // Not asked: one CTA per work tile.
    let s = schedule(
        &c,
        &ScheduleOptions {
            target: Target::Sm90a,
            ..ScheduleOptions::default()
        },
    )
    .expect("schedules");
    assert_eq!(s.kernel.persistent, None);
    assert!(s.explain().contains("not persistent"));
    // Refused, each with its reason: no producer warpgroup (cooperative loads, sm_80), a
    // key loop narrowed by a document mask, keys split across CTAs (decoding).
    let refused = |c: &Cascade, o: &ScheduleOptions, why: &str| {
        let e = schedule(c, o).expect_err("refused");
        assert!(e.message.contains(why), "{}", e.message);
    };
    refused(
        &c,
        &asked(Target::Sm90a, Some(Loads::Cooperative)),
        "producer warpgroup",
    );
    refused(&c, &asked(Target::Sm80, None), "producer warpgroup");
    let docs = load("document_mask", &big);
    refused(&docs, &asked(Target::Sm90a, None), "value mask");
    let decode = load("flash_decoding", &[("N", 131072), ("D", 128)]);
    refused(&decode, &asked(Target::Sm90a, None), "split");
}

#[test]
fn the_copy_engine_stores_the_output_where_asked_and_applies() {
    use einattn_backends::abi::Source;
    use einattn_backends::Target;
    let big = [("N", 4096), ("D", 128), ("H", 16), ("B", 4)];
    let c = load("attention_causal", &big);
    let k = compile_kernel(
        &c,
        &KernelOptions {
            target: Target::Sm90a,
            store_tma: Some(true),
            ..KernelOptions::default()
        },
    );
    let m = &k.modules()[0];
    // A map of the output with boxes of one warpgroup's 64 rows, 64 columns wide.
    let o_map = m.contract.params.iter().find_map(|p| match &p.from {
        Source::TensorMap {
            tensor,
            box_rows,
            box_cols,
            ..
        } if tensor == "O" => Some((*box_rows, *box_cols)),
        _ => None,
    });
    assert_eq!(o_map, Some((64, 64)));
    assert!(m.ptx.text.contains("cp.async.bulk.wait_group.read 0;"));
    // Refused, each with its reason.
    let asked = |loads, persistent| ScheduleOptions {
        target: Target::Sm90a,
        loads,
        persistent,
        store_tma: Some(true),
        ..ScheduleOptions::default()
    };
    let refused = |c: &Cascade, o: &ScheduleOptions, why: &str| {
        let e = schedule(c, o).expect_err("refused");
        assert!(e.message.contains(why), "{}", e.message);
    };
    refused(
        &c,
        &asked(Some(Loads::Cooperative), None),
        "producer copies with it",
    );
    refused(&c, &asked(None, Some(true)), "persistent producer refills");
    // One head: too few query tiles for the GPU, so the keys split across CTAs.
    let one_head = load(
        "attention_mha",
        &[("N", 8192), ("D", 128), ("H", 1), ("B", 1)],
    );
    refused(&one_head, &asked(None, None), "whole output tiles");
    // V (and the output) 128 wide against Q's 64.
    let wide_v = load(
        "attention_mla",
        &[("N", 4096), ("D", 64), ("DV", 128), ("H", 16), ("B", 4)],
    );
    refused(&wide_v, &asked(None, None), "narrower");
}

#[test]
fn lazy_rescaling_is_the_wgmma_default_except_for_partial_kernels() {
    use einattn_backends::Target;
    let lazy = ScheduleOptions {
        target: Target::Sm90a,
        lazy_rescale: Some(true),
        ..ScheduleOptions::default()
    };
    let big = [("N", 4096), ("D", 128), ("H", 16), ("B", 4)];
    let s = schedule(&load("attention_causal", &big), &lazy).expect("schedules");
    assert!(s.kernel.lazy_rescale && s.kernel.skip_unit_rescale);
    assert!(
        s.explain().contains("rescale: lazy (asked)"),
        "{}",
        s.explain()
    );
    // Not asked: lazy with wgmma (measured faster), eager with mma.sync (not measured).
    let default = ScheduleOptions {
        lazy_rescale: None,
        ..lazy.clone()
    };
    let s = schedule(&load("attention_causal", &big), &default).expect("schedules");
    assert!(s.kernel.lazy_rescale);
    assert!(s
        .explain()
        .contains("rescale: lazy (the default with wgmma"));
    let sync = ScheduleOptions {
        target: Target::Sm80,
        ..default.clone()
    };
    let s = schedule(&load("attention_causal", &big), &sync).expect("schedules");
    assert!(!s.kernel.lazy_rescale);
    // Asked eager: eager.
    let eager = ScheduleOptions {
        lazy_rescale: Some(false),
        ..lazy.clone()
    };
    let s = schedule(&load("attention_causal", &big), &eager).expect("schedules");
    assert!(!s.kernel.lazy_rescale);
    // Split decoding's kernels write a max the merge reads: eager, and said so when lazy
    // was asked (silently when it is only the default).
    let decode = load("flash_decoding", &[("N", 131072), ("D", 128)]);
    let s = schedule(&decode, &lazy).expect("schedules");
    assert!(s.estimate.splits > 1);
    assert!(!s.kernel.lazy_rescale);
    assert!(s
        .explain()
        .contains("rescale: eager although lazy was asked"));
    let s = schedule(&decode, &default).expect("schedules");
    assert!(!s.kernel.lazy_rescale && !s.explain().contains("rescale:"));
}

#[test]
fn the_store_by_the_copy_engine_is_the_default_where_it_applies() {
    use einattn_backends::Target;
    let default = ScheduleOptions {
        target: Target::Sm90a,
        ..ScheduleOptions::default()
    };
    let big = [("N", 4096), ("D", 128), ("H", 16), ("B", 4)];
    let s = schedule(&load("attention_causal", &big), &default).expect("schedules");
    assert!(s.kernel.store_tma && !s.store_asked);
    assert!(s.explain().contains("store: the copy engine (the default"));
    // Asked direct: direct.
    let direct = ScheduleOptions {
        store_tma: Some(false),
        ..default.clone()
    };
    let s = schedule(&load("attention_causal", &big), &direct).expect("schedules");
    assert!(!s.kernel.store_tma);
    // Where it does not apply, the default stores directly without an error: a persistent
    // grid, an output in scratch, split decoding, mma.sync.
    for (name, sizes, options) in [
        (
            "attention_causal",
            &big[..],
            ScheduleOptions {
                persistent: Some(true),
                ..default.clone()
            },
        ),
        (
            "attention_causal",
            &big[..],
            ScheduleOptions {
                output_in_scratch: true,
                ..default.clone()
            },
        ),
        (
            "flash_decoding",
            &[("N", 131072), ("D", 128)][..],
            default.clone(),
        ),
        (
            "attention_causal",
            &big[..],
            ScheduleOptions {
                target: Target::Sm80,
                ..default.clone()
            },
        ),
    ] {
        let s = schedule(&load(name, sizes), &options).expect("schedules");
        assert!(!s.kernel.store_tma, "{name} {options:?}");
    }
}

#[test]
fn compile_produces_a_contract_that_matches_the_ptx() {
    use einattn_backends::abi::Source;
    let c = load("attention_sliding_window", &[]);
    let k = compile_kernel(&c, &KernelOptions::default());
    let m = &k.modules()[0];
    assert_eq!(m.contract.kernel, m.ptx.entry);
    assert!(m.ptx.text.contains(&format!(".entry {}", m.ptx.entry)));
    let params = &m.contract.params;
    assert_eq!(params.len(), m.ptx.abi.len());
    let reads = |t: &str| {
        params
            .iter()
            .any(|p| p.from == Source::Tensor { tensor: t.into() })
    };
    assert!(reads("slope") && reads("Q") && reads("O"));
    assert_eq!(m.contract.check(), Ok(()));
}

fn compile_kernel(c: &einattn_ir::Cascade, options: &KernelOptions) -> SoftmaxKernels {
    compile_softmax(c, options).unwrap_or_else(|e| panic!("{}", e.message()))
}

/// Every softmax example compiles to PTX that ptxas assembles for sm_80 and sm_90a without
/// local-memory spills, at head dims 64 and 128 and both 16-bit types, with the default
/// (cost-model) schedule.
#[test]
fn every_example_assembles_without_spills() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("every_example_assembles_without_spills") else {
        return;
    };
    for name in SOFTMAX_EXAMPLES {
        // The latent-attention example at its own widths too (Q.K 192 against V 128).
        let dims: &[u64] = if name == "attention_mla" {
            &[64, 128, 192]
        } else {
            &[64, 128]
        };
        for &d in dims {
            for elem in [Elem::Bf16, Elem::F16] {
                let c = load(name, &[("D", d)]);
                for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
                    let options = KernelOptions {
                        target,
                        elem: Some(elem),
                        ..KernelOptions::default()
                    };
                    let k = compile_kernel(&c, &options);
                    // Every kernel: a split decoding's merge too.
                    for module in k.modules() {
                        let ptx = &module.ptx;
                        let r = assemble(&ptxas, &ptx.text, arch)
                            .unwrap_or_else(|e| panic!("{name} d={d} {arch}: {e}"));
                        eprintln!(
                            "{name} d={d} {} {arch}: {} ({}x{}) {} registers, {} spill stores, {} B stack",
                            elem.name(),
                            ptx.entry,
                            k.schedule.kernel.block_m,
                            k.schedule.kernel.block_n,
                            r.registers,
                            r.spill_stores,
                            r.stack_frame
                        );
                        assert!(r.registers > 0, "no register report:\n{}", r.log);
                        assert!(!r.spills(), "{name} d={d} {arch} spills:\n{}", r.log);
                    }
                }
            }
        }
    }
}

/// A band other than causal or a window (`m <= p + 3`, `p - m <= 20`) maps to the kernel's
/// general band masks and computes what the cascade says.
#[test]
fn offset_bands_map_and_match_the_interpreter() {
    let path = format!(
        "{}/../examples/attention_causal.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path)
        .expect("example exists")
        .replace("where m <= p", "where m <= p + 3 and p - m <= 20")
        // Leading key tiles are fully masked for late queries: a finite start keeps the
        // cascade's exp(RM - RM') defined there (as in the sliding-window example).
        .replace(
            "init RM[b, h, 0, p]   = -inf",
            "init RM[b, h, 0, p]   = -1e30",
        );
    let defines: Vec<(String, u64)> = [("N", 90u64), ("D", 16), ("TILE", 10)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let c = einattn_dsl::compile_source("offset.ein", &src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render("offset.ein", &src)));
    // The same cascade starting its running max at -inf is refused with the reason.
    let neg_inf = src.replace("= -1e30", "= -inf");
    let c_inf = einattn_dsl::compile_source("offset.ein", &neg_inf, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render("offset.ein", &neg_inf)));
    let err = recognize(&c_inf).expect_err("NaN rows in the cascade");
    assert!(err.message.contains("-inf"), "{}", err.message);
    let m = recognize(&c).expect("recognized");
    assert!(!m.spec.causal, "an offset band is not the causal mask");
    assert_eq!(m.spec.masks().len(), 2);
    for kernel in [
        AttentionSchedule {
            skip_unit_rescale: false,
            ..cooperative(32, 16, 2, 2)
        },
        cooperative(64, 32, 4, 2),
    ] {
        let err = tile_vs_interpreter(&c, kernel, 5);
        assert!(err < 1e-2, "{kernel:?}: relative error {err}");
    }
}

/// Grouped-query attention (`examples/gqa.ein`: `split h -> g, r: GROUP`, K and V over the
/// K/V head `g`) reads as softmax attention with `GROUP` query heads per K/V head; GROUP = 1
/// is multi-head and GROUP = H multi-query attention. The schedule says so.
#[test]
fn grouped_query_attention_is_recognized_with_its_group() {
    for (h, group) in [(8u64, 4u64), (8, 2), (4, 1), (4, 4), (1, 1)] {
        let c = load("gqa", &[("H", h), ("GROUP", group), ("D", 16)]);
        let m = recognize(&c).unwrap_or_else(|d| panic!("H={h} GROUP={group}: {}", d.message));
        assert_eq!((m.heads, m.kv_group), (h, group), "H={h} GROUP={group}");
        assert!(m.spec.causal);
        let (g, r, size) = m.roles.kv_split.expect("a grouped head split");
        assert_eq!(
            (c.ranks[g].name.as_str(), c.ranks[r].name.as_str(), size),
            ("g", "r", group)
        );
        assert_eq!(c.ranks[m.roles.head.expect("head rank")].name, "h");
        // K and V step over the K/V heads (H / GROUP of them), Q and O over the query heads.
        assert_eq!(m.k.stride_head, 16);
        assert_eq!(m.k.stride_seq, 16 * (h / group));
        assert_eq!(m.v.stride_seq, 16 * (h / group));
        assert_eq!(m.q.stride_seq, 16 * h);
        assert_eq!(m.problem().kv_heads() as u64, h / group);
        let s = schedule(&c, &ScheduleOptions::default()).expect("schedules");
        let explain = s.explain();
        assert!(
            explain.contains(&format!("query head h reads K/V head h / {group}")),
            "{explain}"
        );
        assert_eq!(explain.contains("(multi-query)"), h == group, "{explain}");
    }
    // The other softmax examples are not grouped.
    for name in SOFTMAX_EXAMPLES.iter().filter(|n| !n.starts_with("gqa")) {
        let m = recognize(&load(name, &[])).expect("recognized");
        assert_eq!((m.kv_group, m.roles.kv_split), (1, None), "{name}");
    }
}

/// The GQA kernel's Tile IR program, run by the Tile interpreter (the CTA of query head h
/// reading K/V head h / GROUP), computes what the cascade interpreter (f64) computes, at
/// GROUP 1, 2 and 4, multi-query (GROUP = H), two batches, ragged sequence ends and the
/// causal mask; and the f64 formula `check` falls back to agrees.
#[test]
fn grouped_query_attention_tile_program_matches_the_interpreter() {
    let kernels = [
        cooperative(64, 32, 4, 2),
        AttentionSchedule {
            q_in_registers: true,
            skip_unit_rescale: false,
            ..cooperative(32, 16, 2, 3)
        },
    ];
    // (H, GROUP, N, TILE): N = 70 and 100 end mid-tile for both kernels.
    for (h, group, n, tile) in [
        (4u64, 1u64, 48u64, 16u64),
        (4, 2, 70, 10),
        (8, 4, 100, 20),
        (4, 4, 70, 14),
        (1, 1, 33, 11),
    ] {
        let c = load(
            "gqa",
            &[
                ("H", h),
                ("GROUP", group),
                ("N", n),
                ("TILE", tile),
                ("D", 16),
                ("B", 2),
            ],
        );
        for (i, kernel) in kernels.iter().enumerate() {
            let seed = 5 + i as u64;
            let err = tile_vs_interpreter(&c, *kernel, seed);
            assert!(
                err < 1e-2,
                "H={h} GROUP={group} N={n} {kernel:?}: relative error {err}"
            );
        }
        let m = recognize(&c).expect("recognized");
        let inputs = random_inputs(&c, 3);
        let values =
            evaluate_in_order(&c, &inputs, &topological_order(&c)).expect("interpreter runs");
        let want = values.get(m.o.tensor).expect("output").stored();
        let err = relative_error(&m.reference_output(&inputs), &want);
        assert!(err < 1e-9, "formula H={h} GROUP={group}: {err}");
    }
}

/// A per-query-head parameter (an ALiBi slope over `h`, read as `slope[h]` where the
/// Einsums iterate `g, r`) is indexed by the query head, K and V by the K/V head.
#[test]
fn grouped_query_attention_with_per_head_slopes_matches_the_interpreter() {
    let path = format!("{}/../examples/gqa.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path)
        .expect("example exists")
        .replace(
            "param  scale: f32 = 0.125\n",
            "param  scale: f32 = 0.125\nparam  slope[h]: f32\n",
        )
        .replace(
            "S[b, g, r, m1, m0, p]    = scale * Q[b, p, h, e] * K[b, m, g, e] where m <= p",
            "QK[b, g, r, m1, m0, p] = Q[b, p, h, e] * K[b, m, g, e] where m <= p\n\
             S[b, g, r, m1, m0, p] = scale * QK[b, g, r, m1, m0, p] - slope[h] * (p - m)",
        );
    for (h, group) in [(4u64, 2u64), (4, 4)] {
        let defines: Vec<(String, u64)> = [
            ("H", h),
            ("GROUP", group),
            ("N", 60),
            ("TILE", 20),
            ("D", 16),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        let c = einattn_dsl::compile_source(&path, &src, &defines)
            .unwrap_or_else(|d| panic!("{}", d.render(&path, &src)));
        let m = recognize(&c).unwrap_or_else(|d| panic!("{}", d.message));
        assert_eq!((m.kv_group, m.spec.score.head_params.len()), (group, 1));
        let kernel = cooperative(32, 16, 2, 2);
        let err = tile_vs_interpreter(&c, kernel, 9);
        assert!(err < 1e-2, "H={h} GROUP={group}: relative error {err}");
    }
}

/// The mapping matters: run as if every query head had its own K/V head (kv_group 1 over
/// K/V tensors that hold H / GROUP heads), the program reads the wrong heads (or past K).
#[test]
fn grouped_query_attention_needs_its_kv_head_mapping() {
    let c = load(
        "gqa",
        &[("H", 4), ("GROUP", 2), ("N", 32), ("TILE", 16), ("D", 16)],
    );
    let m = recognize(&c).expect("recognized");
    let kernel = cooperative(32, 16, 2, 2);
    let (prog, _) = flash_attention(&m.spec, &kernel).expect("tile program builds");
    let inputs = random_inputs(&c, 1);
    let host =
        |l: &einattn_backends::family::Layout| l.host(inputs[&l.tensor].stored().into_owned());
    let mut io = Bindings {
        tensors: vec![
            host(&m.q),
            host(&m.k),
            host(&m.v),
            m.o.host(vec![0.0; m.o.elements as usize]),
        ],
        row_outputs: vec![],
        row_inputs: vec![],
        scalars: vec![0.125],
        head_params: vec![],
        tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    let mut prob = m.problem();
    assert_eq!(prob.kv_group, 2);
    run(&prog, prob, &mut io).expect("runs with its group");
    prob.kv_group = 1;
    let err = run(&prog, prob, &mut io).expect_err("K holds 2 heads, not 4");
    assert!(err.to_string().contains("too small"), "{err}");
}

/// `text` (an example's source, edited) compiles and the recognizer refuses it with a
/// message containing `want`.
fn refused_with(path: &str, text: &str, want: &str) {
    let c = einattn_dsl::compile_source(path, text, &[])
        .unwrap_or_else(|d| panic!("{}", d.render(path, text)));
    let err = recognize(&c).expect_err("refused");
    assert!(err.message.contains(want), "{}", err.message);
}

/// Head splits the kernel cannot index are refused with the reason, not mis-read.
#[test]
fn grouped_heads_the_kernel_cannot_index_are_refused() {
    let path = format!("{}/../examples/gqa.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example exists");
    let refused = |text: String, want: &str| refused_with(&path, &text, want);
    // K indexed by the query head within the group.
    refused(
        src.replace("input  K[b, m, g, e]", "input  K[b, m, r, e]")
            .replace("K[b, m, g, e] where", "K[b, m, r, e] where"),
        "not by `r`",
    );
    // V over the query heads while K is grouped: V then shares `h` with Q alone.
    refused(
        src.replace("input  V[b, m, g, f]", "input  V[b, m, h, f]")
            .replace("V[b, m, g, f]\n", "V[b, m, h, f]\n"),
        "cannot tell Q from K",
    );
    // Q and O over both halves of the split.
    refused(
        src.replace("input  Q[b, p, h, e]", "input  Q[b, p, g, r, e]")
            .replace("Q[b, p, h, e] *", "Q[b, p, g, r, e] *"),
        "declare Q and O over the query head rank `h`",
    );
}

/// The GQA kernel's contract: grid y = batch * query heads, K and V with H / GROUP heads
/// (their manifest shapes, which `check` and `bench` upload), `kv_group` = GROUP. The kernel
/// does not depend on the group (a launch size), so its PTX is the causal kernel's.
#[test]
fn grouped_query_attention_contract_has_the_kv_heads() {
    let c = load("gqa", &[("B", 2), ("H", 8), ("GROUP", 4), ("N", 256)]);
    let k = compile_kernel(&c, &KernelOptions::default());
    let module = &k.modules()[0];
    let contract = &module.contract;
    assert_eq!(contract.check(), Ok(()));
    assert_eq!(contract.grid[1], 2 * 8);
    assert_eq!(contract.sizes["kv_group"], 4);
    assert_eq!(contract.sizes["heads"], 8);
    let shape = |name: &str| {
        let t = contract
            .tensors
            .iter()
            .find(|t| t.name == name)
            .expect("tensor");
        (
            t.shape.clone(),
            t.strides
                .map(|s| s.along(einattn_backends::abi::Axis::Head)),
        )
    };
    assert_eq!(shape("Q"), (vec![2, 256, 8, 64], Some(64)));
    assert_eq!(shape("K"), (vec![2, 256, 2, 64], Some(64)));
    assert_eq!(shape("V"), (vec![2, 256, 2, 64], Some(64)));
    assert_eq!(shape("O"), (vec![2, 256, 8, 64], Some(64)));
    assert_eq!(contract.family["problem"]["kv_group"], 4);
    let mha = load("attention_causal", &[("B", 2), ("H", 8), ("N", 256)]);
    let mha = compile_kernel(&mha, &KernelOptions::default());
    assert_eq!(mha.schedule.kernel, k.schedule.kernel);
    assert_eq!(mha.modules()[0].ptx.text, module.ptx.text);
    assert!(mha.modules()[0].contract.family["problem"]
        .get("kv_group")
        .is_none());
}

/// The GQA kernels assemble for sm_80 and sm_90a without spills at head dims 64 and 128,
/// both 16-bit types, grouped and multi-query.
#[test]
fn grouped_query_attention_assembles_without_spills() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::Target;
    let Some(ptxas) = ptxas_for_test("grouped_query_attention_assembles_without_spills") else {
        return;
    };
    for (h, group) in [(8u64, 4u64), (8, 8)] {
        for d in [64u64, 128] {
            for elem in [Elem::Bf16, Elem::F16] {
                let c = load("gqa", &[("D", d), ("H", h), ("GROUP", group), ("N", 1024)]);
                for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
                    let options = KernelOptions {
                        target,
                        elem: Some(elem),
                        ..KernelOptions::default()
                    };
                    let k = compile_kernel(&c, &options);
                    let ptx = &k.modules()[0].ptx;
                    let r = assemble(&ptxas, &ptx.text, arch)
                        .unwrap_or_else(|e| panic!("gqa GROUP={group} d={d} {arch}: {e}"));
                    assert!(r.registers > 0, "no register report:\n{}", r.log);
                    assert!(
                        !r.spills(),
                        "gqa GROUP={group} d={d} {arch} spills:\n{}",
                        r.log
                    );
                }
            }
        }
    }
}

/// Value masks the kernel cannot read are refused with the reason (the cascade then takes
/// the general lowering).
#[test]
fn value_masks_the_kernel_cannot_read_are_refused() {
    let path = format!(
        "{}/../examples/document_mask.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("example exists");
    let mask = "where m <= p and SEG[b, p] == SEG[b, m]";
    assert!(src.contains(mask));
    let refused = |text: String, want: &str| refused_with(&path, &text, want);
    // Ids stored in bf16: the kernel reads per-token values as f32.
    refused(
        src.replace("input  SEG[b, p]: f32", "input  SEG[b, p]: bf16"),
        "must be f32",
    );
    // A comparison with a constant rather than with another token's value.
    refused(
        src.replace(mask, "where m <= p and SEG[b, p] == 1"),
        "compares two per-token inputs",
    );
    // The ids also scale the score: then the score reads three inputs.
    refused(
        src.replace(
            "scale * Q[b, p, h, e] * K[b, m, h, e] where",
            "scale * SEG[b, p] * Q[b, p, h, e] * K[b, m, h, e] where",
        ),
        "contracts two inputs",
    );
    // The recognized mask: one token input read at both positions.
    let m = recognize(
        &einattn_dsl::compile_source(&path, &src, &[])
            .unwrap_or_else(|d| panic!("{}", d.render(&path, &src))),
    )
    .expect("recognized");
    assert_eq!(m.spec.tokens.len(), 1);
    assert_eq!(
        (m.spec.tokens[0].name.as_str(), m.spec.tokens[0].extent),
        ("SEG", None)
    );
    assert_eq!(m.spec.value_masks.len(), 1);
    assert_eq!(m.tokens[0].stride_seq, 1);
}

/// A sink logit is read where it joins the max and the denominator, as the same uniform
/// value; anything else is refused with the reason. A sink in the max alone is the plain
/// softmax (the max's value does not change the output).
#[test]
fn sink_logits_are_read_or_refused_with_a_reason() {
    let path = format!(
        "{}/../examples/sink_attention.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("example exists");
    let denominator = "O[b, p, h, f]  = EV[b, h, p, f] / (L[b, h, p] + exp(sink[h] - G[b, h, p]))";
    assert!(src.contains(denominator));
    let refused = |text: String, want: &str| refused_with(&path, &text, want);
    // The max and the denominator name different sinks.
    refused(
        src.replace(
            denominator,
            "O[b, p, h, f]  = EV[b, h, p, f] / (L[b, h, p] + exp(2 * sink[h] - G[b, h, p]))",
        ),
        "same sink logit",
    );
    // A sink that varies along the row (with the query position) is not one logit.
    refused(
        src.replace(
            "G[b, h, p]     = max(GS[b, h, p], sink[h])",
            "G[b, h, p]     = max(GS[b, h, p], sink[h] * p)",
        ),
        "uniform along a row",
    );
    // The sink in the max only: plain softmax.
    let c = einattn_dsl::compile_source(
        &path,
        &src.replace(denominator, "O[b, p, h, f]  = EV[b, h, p, f] / L[b, h, p]"),
        &[],
    )
    .expect("valid");
    let m = recognize(&c).expect("recognized");
    assert_eq!(m.spec.sink, None);
    // As written, the per-head parameter.
    let m = recognize(&load("sink_attention", &[])).expect("recognized");
    assert_eq!(
        m.spec.sink,
        Some(einattn_backends::tile::ScalarExpr::Head(
            einattn_backends::tile::HeadParamId(0)
        ))
    );
    assert_eq!(m.spec.score.head_params, vec!["sink".to_string()]);
}

/// Weights without normalization: a decay quadratic in the distance (which the linear
/// family refuses) read as `w = q.k * exp(-s[h] (p - m)^2)`; its tile program computes what
/// the cascade interpreter computes, under the causal mask and ragged tails.
#[test]
fn unnormalized_weights_match_the_interpreter() {
    let path = format!(
        "{}/../tests/filetests/linear_forms/decay_quadratic.ein",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("case exists");
    let defines = vec![("N".to_string(), 70), ("D".to_string(), 16)];
    let c = einattn_dsl::compile_source(&path, &src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render(&path, &src)));
    let m = recognize(&c).expect("recognized");
    assert_eq!(
        m.spec.normalization,
        einattn_backends::family::softmax::Normalization::None
    );
    let kernel = AttentionSchedule {
        skip_unit_rescale: false,
        persistent: None,
        ..cooperative(32, 16, 2, 2)
    };
    let err = tile_vs_interpreter(&c, kernel, 3);
    assert!(err < 1e-2, "relative error {err}");
}

/// QK-norm: the per-token Einsums before the score become pre-kernels (the general
/// lowering) and the kernel reads their Q and K. The attention formula on the prologue's
/// values is the cascade's output, and the tile program on them computes what the core
/// cascade computes.
#[test]
fn qk_norm_runs_its_prologue_then_the_attention_kernel() {
    let c = load("qk_norm", &[("N", 70), ("D", 64)]);
    let k = compile_kernel(&c, &KernelOptions::default());
    let (core, prologue) = k.core();
    let prologue = prologue.expect("a prologue");
    assert_eq!(prologue.written, vec!["QN".to_string(), "KN".to_string()]);
    // Four pre-kernels (QS, QN, KS, KN), then the attention kernel, which reads QN and KN
    // from scratch.
    assert_eq!(k.modules().len(), 5);
    let attention = &k.modules()[4].contract;
    for name in ["QN", "KN"] {
        assert!(attention.scratch.iter().any(|s| s.name == name), "{name}");
        assert!(!attention.tensors.iter().any(|t| t.name == name), "{name}");
    }
    let inputs = random_inputs(&c, 9);
    let want = interpreted_output(&c, &inputs);
    let (formula, _) = k.formula(&inputs);
    let err = relative_error(&formula, &want);
    assert!(err < 1e-9, "formula: relative difference {err}");
    let core_inputs = prologue
        .core_inputs(&c, core, &inputs)
        .expect("the prologue runs");
    let kernel = cooperative(32, 16, 2, 2);
    let err = tile_vs_interpreter_on(core, kernel, core_inputs);
    assert!(err < 1e-2, "tile program: relative error {err}");
}

/// Grouped-query decoding: the scheduler packs the query heads of a K/V head as one tile's
/// rows (the head stride as the row stride); the tile program over the packed problem
/// computes what the cascade computes, at GROUP 2, 4 and 8 (multi-query), and the kernel's
/// heads are the K/V heads. Packing is refused where something varies per query head.
#[test]
fn grouped_query_decoding_packs_a_group_into_one_tile() {
    use einattn_backends::family::softmax::schedule::pack_query_heads;
    for group in [2u64, 4, 8] {
        let c = load(
            "gqa_decoding",
            &[("H", 8), ("GROUP", group), ("N", 300), ("D", 32), ("B", 2)],
        );
        let mut m = recognize(&c).expect("recognized");
        assert_eq!(pack_query_heads(&mut m), Some(group));
        assert_eq!((m.n_q, m.heads, m.kv_group), (group, 8 / group, 1));
        for kernel in [
            cooperative(32, 32, 2, 2),
            AttentionSchedule {
                q_in_registers: true,
                skip_unit_rescale: false,
                persistent: None,
                ..cooperative(16, 64, 1, 3)
            },
        ] {
            let err = tile_vs_interpreter_of(&c, &m, kernel, random_inputs(&c, group));
            assert!(err < 1e-2, "GROUP={group} {kernel:?}: relative error {err}");
        }
        let explain = schedule(&c, &ScheduleOptions::default())
            .expect("scheduled")
            .explain();
        assert!(explain.contains("grouped-query decoding"), "{explain}");
    }
    // Prefill (a query rank with N queries, causal) is not packed.
    let mut m = recognize(&load("gqa", &[])).expect("recognized");
    assert_eq!(pack_query_heads(&mut m), None);
}

/// Packs `c`'s query heads (GROUP `group`), its one per-head array becoming a row token;
/// the tile program over the packed problem and the attention formula compute what the
/// cascade computes on `inputs`.
fn assert_packed_decoding_matches(c: &Cascade, group: u64, inputs: &Inputs, what: &str) {
    use einattn_backends::family::softmax::schedule::pack_query_heads;
    let mut m = recognize(c).expect("recognized");
    assert_eq!(pack_query_heads(&mut m), Some(group), "{what}");
    assert!(m.head_params.is_empty() && m.tokens.len() == 1, "{what}");
    let kernel = cooperative(16, 64, 1, 3);
    let err = tile_vs_interpreter_of(c, &m, kernel, inputs.clone());
    assert!(err < 1e-2, "{what}: tile program: relative error {err}");
    let err = formula_error(c, &m, inputs);
    assert!(err < 1e-9, "{what}: formula: relative difference {err}");
}

/// Grouped-query decoding with a per-query-head sink logit (gpt-oss): the packed rows are
/// query heads, so each reads its own sink as a token (`sink[g * GROUP + r]`).
#[test]
fn grouped_query_decoding_packs_with_a_sink_per_query_head() {
    for group in [2u64, 4] {
        let c = load(
            "gqa_sink_decoding",
            &[("H", 8), ("GROUP", group), ("N", 300), ("D", 32), ("B", 2)],
        );
        assert!(recognize(&c).expect("recognized").spec.sink.is_some());
        let inputs = random_inputs(&c, group + 7);
        assert_packed_decoding_matches(&c, group, &inputs, &format!("GROUP={group}"));
    }
}

/// Grouped-query decoding with ALiBi slopes per query head: each packed row reads its own
/// slope as a token, and the one query's position (0) stays 0 although the packed rows are
/// numbered 0..GROUP (softmax1's `+1` in the denominator keeps the row's own term from
/// cancelling, so a wrong position shows). With and without a query rank of one position.
#[test]
fn grouped_query_decoding_packs_with_alibi_slopes_per_query_head() {
    const SOURCE: &str = "kernel gqa_alibi_decoding
size B = 2
size H = 8
size GROUP = 4
size N = 16
size D = 32
rank b: B
rank h: H
rank e: D
rank f: D
rank m: N
RANK_P
split h -> g, r: GROUP
input Q[b, hP, e]: bf16
input K[b, m, g, e]: bf16
input V[b, m, g, f]: bf16
param slope[h]: f32
param scale: f32 = 0.17
output O[b, hP, f]: bf16
QK[b, g, rP, m] = Q[b, hP, e] * K[b, m, g, e]
S[b, g, rP, m] = scale * QK[b, g, rP, m] + slope[h] * (m POS)
G[b, g, rP] = max[m] S[b, g, rP, m]
P[b, g, rP, m] = exp(S[b, g, rP, m] - G[b, g, rP])
L[b, g, rP] = P[b, g, rP, m]
O[b, hP, f] = P[b, g, rP, m] / (L[b, g, rP] + exp(-G[b, g, rP])) * V[b, m, g, f]
";
    for query_rank in [false, true] {
        let (rank_p, index_p, pos) = if query_rank {
            ("rank p: 1", ", p", "- p")
        } else {
            ("", "", "")
        };
        let text = SOURCE
            .replace("RANK_P", rank_p)
            .replace("P,", &format!("{index_p},"))
            .replace("P]", &format!("{index_p}]"))
            .replace("POS", pos);
        let c = einattn_dsl::compile_source("gqa_alibi_decoding.ein", &text, &[])
            .unwrap_or_else(|d| panic!("{}", d.render("gqa_alibi_decoding.ein", &text)));
        let mut inputs = random_inputs(&c, 11);
        // ALiBi's slopes (negative, one per query head): with 16 keys the `+1` weighs as
        // much as a key, so a row's own term would show.
        let slope = c
            .tensors
            .iter()
            .find(|(_, t)| t.name == "slope")
            .map(|(h, _)| h)
            .expect("a slope array");
        let slopes = (0..8).map(|h| -(h as f64 + 1.0) / 8.0).collect();
        inputs.insert(slope, einattn_ir::interp::TensorData::new(vec![8], slopes));
        assert_packed_decoding_matches(&c, 4, &inputs, &format!("query rank {query_rank}"));
    }
}

/// Gated attention: the Einsums after the attention output become post-kernels (the
/// general lowering) reading it from scratch. The attention formula, then the epilogue,
/// is the cascade's output; the tile program computes what the core cascade computes.
#[test]
fn gated_attention_runs_the_attention_kernel_then_its_epilogue() {
    let c = load("gated_attention", &[("N", 70), ("D", 64), ("TILE", 10)]);
    let k = compile_kernel(&c, &KernelOptions::default());
    let epilogue = k.epilogue().expect("an epilogue");
    assert_eq!(epilogue.attentions, vec!["A".to_string()]);
    let (core, prologue) = k.core();
    assert!(prologue.is_none());
    assert_eq!(k.modules().len(), 2);
    for module in k.modules() {
        let contract = &module.contract;
        assert!(contract.scratch.iter().any(|s| s.name == "A"));
        assert!(!contract.tensors.iter().any(|t| t.name == "A"));
    }
    let inputs = random_inputs(&c, 4);
    let want = interpreted_output(&c, &inputs);
    let (formula, _) = k.formula(&inputs);
    let err = relative_error(&formula, &want);
    assert!(err < 1e-9, "formula: relative difference {err}");
    let core_inputs = einattn_backends::family::subcascade::inputs_by_name(&c, core, &inputs);
    let kernel = cooperative(32, 16, 2, 2);
    let err = tile_vs_interpreter_on(core, kernel, core_inputs);
    assert!(err < 1e-2, "tile program: relative error {err}");
}

/// Differential attention: V distributed over the difference of its two softmax maps;
/// each term's Einsums read as attention whose tile program computes what they compute.
#[test]
fn differential_attention_terms_match_the_interpreter() {
    use einattn_backends::family::softmax::combination::distribute;
    let c = load("differential_attention", &[("N", 70)]);
    let (cores, epilogue) = distribute(&c)
        .and_then(|d| d.split())
        .expect("distributes into terms");
    assert_eq!(
        epilogue.attentions,
        vec!["O_t1".to_string(), "O_t2".to_string()]
    );
    for (k, core) in cores.iter().enumerate() {
        let err = tile_vs_interpreter(core, cooperative(32, 16, 2, 2), k as u64);
        assert!(err < 1e-2, "{}: relative error {err}", core.name);
    }
}

/// The online form with the running max starting at a per-head sink logit and the running
/// sum at 1 (how gpt-oss writes it) reads as attention with a sink: with grouped query
/// heads, causal, and with a window that hides a row's first keys (the sink keeps the max
/// finite there). The tile program and the formula compute what the cascade computes; a
/// running sum left at 0 beside such a max is refused with the reason.
#[test]
fn a_running_max_that_starts_at_a_sink_is_a_sink_logit() {
    let path = format!("{}/../examples/gqa.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example exists");
    let sink = src
        .replace("param  scale", "param  sink[h]: f32\nparam  scale")
        .replace(
            "init RM[b, g, r, 0, p]   = -inf",
            "init RM[b, g, r, 0, p]   = sink[h]",
        )
        .replace(
            "init RD[b, g, r, 0, p]   = 0",
            "init RD[b, g, r, 0, p]   = 1",
        );
    assert_eq!(sink.matches("sink[h]").count(), 2, "{sink}");
    let windowed = sink.replace("where m <= p", "where m <= p and p - m < 20");
    assert_ne!(windowed, sink);
    let defines: Vec<(String, u64)> = [("N", 70), ("D", 16), ("TILE", 14), ("H", 4), ("GROUP", 2)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    for (name, text) in [("causal", &sink), ("window", &windowed)] {
        let c = einattn_dsl::compile_source(name, text, &defines)
            .unwrap_or_else(|d| panic!("{}", d.render(name, text)));
        let m = recognize(&c).unwrap_or_else(|d| panic!("{name}: {}", d.message));
        assert!(
            matches!(
                m.spec.sink,
                Some(einattn_backends::tile::ScalarExpr::Head(_))
            ),
            "{name}: {:?}",
            m.spec.sink
        );
        let inputs = random_inputs(&c, 5);
        let err = tile_vs_interpreter_on(&c, cooperative(32, 16, 2, 2), inputs.clone());
        assert!(err < 1e-2, "{name}: tile program: relative error {err}");
        let err = formula_error(&c, &m, &inputs);
        assert!(err < 1e-9, "{name}: formula: relative difference {err}");
    }
    let no_sink_term = sink.replace(
        "init RD[b, g, r, 0, p]   = 1",
        "init RD[b, g, r, 0, p]   = 0",
    );
    let c = einattn_dsl::compile_source("no_sink_term", &no_sink_term, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render("no_sink_term", &no_sink_term)));
    let err = recognize(&c).expect_err("a sum without the sink's term");
    assert!(err.message.contains("starts at 1"), "{}", err.message);
}
