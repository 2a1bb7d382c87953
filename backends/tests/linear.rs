//! The sequential linear-attention tile program against the f64 recurrence, and its PTX
//! through ptxas.

use einattn_backends::family::linear::program::{
    lightning, lightning_part, Decay, LinearSchedule, LinearSpec, Part,
};
use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
use einattn_backends::reference::{linear_attention, relative_error};
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::Elem;
use einattn_backends::{print_ptx, Target};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random Q, K, V in `[-1, 1)` (rounded to the spec's type) and a NaN-poisoned O, `BNHD`.
fn random_qkvo(
    spec: &LinearSpec,
    prob: Problem,
    seed: u64,
) -> (HostTensor, HostTensor, HostTensor, HostTensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (d, e) = (spec.head_dim as usize, spec.value_dim as usize);
    let mut tensor = |cols: usize| {
        let data: Vec<f64> = (0..prob.batch * prob.n_q * prob.heads * cols)
            .map(|_| spec.elem.round(rng.random_range(-1.0..1.0)))
            .collect();
        HostTensor::bnhd(data, prob.n_q, prob.heads, cols)
    };
    let (q, k, v) = (tensor(d), tensor(d), tensor(e));
    let o = HostTensor::bnhd(
        vec![f64::NAN; prob.batch * prob.n_q * prob.heads * e],
        prob.n_q,
        prob.heads,
        e,
    );
    (q, k, v, o)
}

fn check(spec: &LinearSpec, sched: &LinearSchedule, prob: Problem, seed: u64) -> f64 {
    let (q, k, v, o) = random_qkvo(spec, prob, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let decay: Vec<f64> = (0..prob.heads)
        .map(|_| rng.random_range(0.01..0.5))
        .collect();
    let (prog, bind) = lightning(spec, sched).expect("builds");
    let mut io = Bindings {
        tensors: vec![q.clone(), k.clone(), v.clone(), o],
        row_outputs: vec![],
        row_inputs: vec![],
        scalars: vec![],
        head_params: bind.decay.map(|_| vec![decay.clone()]).unwrap_or_default(),
        tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![],
    };
    run(&prog, prob, &mut io).expect("runs");
    let has_decay = matches!(spec.decay, Decay::PerHead(_));
    let want = linear_attention(
        spec,
        prob,
        &q,
        &k,
        &v,
        has_decay.then_some(decay.as_slice()),
        None,
    );
    relative_error(&io.tensors[bind.o.index()].data, &want)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]
    #[test]
    fn interpreter_matches_the_recurrence(n in 1usize..150, heads in 1usize..3, decay in any::<bool>(),
                                          split in any::<bool>(), f16 in any::<bool>(), causal in any::<bool>(),
                                          seed in any::<u64>()) {
        let spec = LinearSpec {
            head_dim: 32,
            value_dim: 32,
            elem: if f16 { Elem::F16 } else { Elem::Bf16 },
            decay: if decay && causal { Decay::PerHead("s".into()) } else { Decay::None },
            causal,
        };
        let sched = LinearSchedule { strategy: einattn_backends::family::linear::Strategy::SinglePass, value_block: if split { 16 } else { 32 }, warps: 2, stages: 2, mma: einattn_backends::tile::MmaUnit::Sync };
        let prob = Problem { batch: 1, heads, kv_group: 1, n_q: n, n_k: n };
        let err = check(&spec, &sched, prob, seed);
        prop_assert!(err < 2e-2, "relative error {}", err);
    }
}

#[test]
fn default_schedules_assemble_without_spills() {
    let Some(ptxas) = ptxas_for_test("linear default_schedules_assemble_without_spills") else {
        return;
    };
    for d in [64u32, 128] {
        for elem in [Elem::Bf16, Elem::F16] {
            for (decay, causal) in [
                (Decay::None, true),
                (Decay::PerHead("s".into()), true),
                (Decay::None, false),
                (Decay::Gate("G".into()), true),
            ] {
                let spec = LinearSpec {
                    head_dim: d,
                    value_dim: d,
                    elem,
                    decay,
                    causal,
                };
                let sched = LinearSchedule::default_for(&spec);
                // The wgmma schedule the compiler picks on sm_90a, assembled for sm_90a only.
                let wgmma = LinearSchedule {
                    mma: sched.default_mma(d, Target::Sm90a),
                    ..sched
                };
                assert_eq!(wgmma.mma, einattn_backends::tile::MmaUnit::Warpgroup);
                let mut progs = Vec::new();
                for (sched, targets) in [
                    (
                        sched,
                        &[(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")][..],
                    ),
                    (wgmma, &[(Target::Sm90a, "sm_90a")][..]),
                ] {
                    progs.push((lightning(&spec, &sched).expect("builds").0, targets));
                    if causal && !matches!(spec.decay, Decay::Gate(_)) {
                        for part in [
                            Part::ChunkStates { chunk_tiles: 4 },
                            Part::ChunkOutputs { chunk_tiles: 4 },
                            Part::LookBack,
                        ] {
                            let p = lightning_part(&spec, &sched, part).expect("builds").0;
                            progs.push((p, targets));
                        }
                    }
                }
                for (prog, &(target, arch)) in progs
                    .iter()
                    .flat_map(|(p, targets)| targets.iter().map(move |t| (p, t)))
                {
                    let k = print_ptx(prog, target).expect("prints");
                    let r = assemble(&ptxas, &k.text, arch)
                        .unwrap_or_else(|e| panic!("{}: {e}", k.entry));
                    eprintln!(
                        "{} {arch}: {} registers, {} B stack",
                        k.entry, r.registers, r.stack_frame
                    );
                    assert!(!r.spills(), "{} spills on {arch}:\n{}", k.entry, r.log);
                }
            }
        }
    }
}

fn load(name: &str, defines: &[(&str, u64)]) -> einattn_ir::cascade::Cascade {
    let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example exists");
    let defines: Vec<(String, u64)> = defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    einattn_dsl::compile_source(&path, &src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render(&path, &src)))
}

/// Every linear example compiles to the kernel (the reading confirmed on a small instance),
/// and the kernel's Tile program computes what the cascade says.
#[test]
fn linear_examples_compile_and_match_the_interpreter() {
    use einattn_backends::family::linear::compile_linear;
    use einattn_backends::family::{Compiled, KernelOptions};
    use einattn_ir::interp::{evaluate_in_order, random_inputs};
    use einattn_ir::validate::topological_order;
    for (name, sizes) in [
        ("lightning", &[("N", 200u64), ("BLOCK", 8), ("D", 64)][..]),
        ("lightning_naive", &[("N", 130), ("D", 64)][..]),
        ("linear_causal", &[("N", 70), ("D", 64)][..]),
        ("linear_attention", &[("N", 90), ("D", 64)][..]),
        ("gated_linear", &[("N", 192), ("BLOCK", 8), ("D", 64)][..]),
    ] {
        let c = load(name, sizes);
        // The same source at small sizes: the recognizer's reading is confirmed there.
        let small = if name == "lightning" || name == "gated_linear" {
            load(name, &[("N", 24), ("BLOCK", 8), ("D", 16)])
        } else {
            load(name, &[("N", 24), ("D", 16)])
        };
        let k = compile_linear(&c, &small, &KernelOptions::default(), None, None)
            .unwrap_or_else(|e| panic!("{name}: {}", e.message()));
        assert_eq!(k.matched.spec.causal, name != "linear_attention", "{name}");
        let m = &k.matched;
        let inputs = random_inputs(&c, 3);
        let want = evaluate_in_order(&c, &inputs, &topological_order(&c))
            .expect("interpreter")
            .get(m.o.tensor)
            .expect("output")
            .stored()
            .into_owned();
        let host = |l: &einattn_backends::family::Layout, data: Vec<f64>| l.host(data);
        let rounded = |t| -> Vec<f64> {
            inputs[&t]
                .stored()
                .iter()
                .map(|&x| m.spec.elem.round(x))
                .collect()
        };
        let gate_tokens: Vec<(Vec<f64>, usize, usize, usize)> = m
            .gate
            .iter()
            .map(|g| {
                (
                    inputs[&g.tensor].stored().into_owned(),
                    g.stride_batch as usize,
                    g.stride_seq as usize,
                    g.stride_head as usize,
                )
            })
            .collect();
        let mut io = Bindings {
            tensors: vec![
                host(&m.q, rounded(m.q.tensor)),
                host(&m.k, rounded(m.k.tensor)),
                host(&m.v, rounded(m.v.tensor)),
                host(&m.o, vec![f64::NAN; m.o.elements as usize]),
            ],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: m
                .decay_param
                .map(|p| vec![inputs[&p].stored().into_owned()])
                .unwrap_or_default(),
            tokens: gate_tokens,
            chunk_base: 0,
            q_offset: 0,
            chunk_total: 0,
            states: vec![],
        };
        let prob = m.problem();
        let program = k
            .modules()
            .last()
            .and_then(|m| m.program.tile())
            .expect("a Tile program");
        run(program, prob, &mut io).expect("tile interpreter runs");
        // The contract's tensors are Q, K, V, O in the program's order.
        let err = relative_error(&io.tensors[3].data, &want);
        assert!(err < 2e-2, "{name}: relative error {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]
    /// The chunked strategy (chunk states, then outputs from the decayed prefix of earlier
    /// chunks) computes the same as the recurrence, for any chunk size and ragged tails.
    #[test]
    fn chunked_strategy_matches_the_recurrence(n in 1usize..200, chunk_tiles in 1u32..4, decay in any::<bool>(),
                                               split in any::<bool>(), seed in any::<u64>()) {
        use einattn_backends::tile::interp::chunk_count;
        use einattn_backends::family::linear::program::{lightning_part, Part};
        let spec = LinearSpec {
            head_dim: 32,
            value_dim: 32,
            elem: Elem::Bf16,
            decay: if decay { Decay::PerHead("s".into()) } else { Decay::None },
            causal: true,
        };
        let sched = LinearSchedule { strategy: einattn_backends::family::linear::Strategy::SinglePass, value_block: if split { 16 } else { 32 }, warps: 2, stages: 2, mma: einattn_backends::tile::MmaUnit::Sync };
        let prob = Problem { batch: 2, heads: 2, kv_group: 1, n_q: n, n_k: n };
        let (states, bind) = lightning_part(&spec, &sched, Part::ChunkStates { chunk_tiles }).expect("builds");
        let (outputs, _) = lightning_part(&spec, &sched, Part::ChunkOutputs { chunk_tiles }).expect("builds");
        let (q, k, v, o) = random_qkvo(&spec, prob, seed);
        let s: Vec<f64> = (0..prob.heads).map(|h| 0.05 + 0.2 * h as f64).collect();
        let chunks = chunk_count(&states, prob);
        let mut io = Bindings {
            tensors: vec![q.clone(), k.clone(), v.clone(), o],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: bind.decay.map(|_| vec![s.clone()]).unwrap_or_default(),
            tokens: vec![],
        chunk_base: 0,
        q_offset: 0,
        chunk_total: 0,
        states: vec![vec![f64::NAN; prob.batch * prob.heads * chunks * 32 * 32]],
        };
        run(&states, prob, &mut io).expect("states run");
        run(&outputs, prob, &mut io).expect("outputs run");
        let want = linear_attention(&spec, prob, &q, &k, &v, decay.then_some(s.as_slice()), None);
        let err = relative_error(&io.tensors[bind.o.index()].data, &want);
        prop_assert!(err < 2e-2, "relative error {} (chunks {})", err, chunks);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]
    /// The look-back strategy (one block per CTA: intra-block outputs and the block's own
    /// state, the entering state by look-back, then the inter-block part) computes the same
    /// as the recurrence, with ragged tails and split value columns; its inclusive prefixes
    /// are the states after each block.
    #[test]
    fn look_back_strategy_matches_the_recurrence(n in 1usize..200, decay in any::<bool>(),
                                                 split in any::<bool>(), seed in any::<u64>()) {
        use einattn_backends::tile::interp::chunk_count;
        let spec = LinearSpec {
            head_dim: 32,
            value_dim: 32,
            elem: Elem::Bf16,
            decay: if decay { Decay::PerHead("s".into()) } else { Decay::None },
            causal: true,
        };
        let sched = LinearSchedule { strategy: einattn_backends::family::linear::Strategy::LookBack, value_block: if split { 16 } else { 32 }, warps: 2, stages: 2, mma: einattn_backends::tile::MmaUnit::Sync };
        let prob = Problem { batch: 2, heads: 2, kv_group: 1, n_q: n, n_k: n };
        let (prog, bind) = lightning_part(&spec, &sched, Part::LookBack).expect("builds");
        prop_assert!(prog.look_back && prog.chunk_tiles == 1);
        let (q, k, v, o) = random_qkvo(&spec, prob, seed);
        let s: Vec<f64> = (0..prob.heads).map(|h| 0.05 + 0.2 * h as f64).collect();
        let chunks = chunk_count(&prog, prob);
        prop_assert_eq!(chunks, n.div_ceil(32));
        let state_len = prob.batch * prob.heads * chunks * 32 * 32;
        let mut io = Bindings {
            tensors: vec![q.clone(), k.clone(), v.clone(), o],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: bind.decay.map(|_| vec![s.clone()]).unwrap_or_default(),
            tokens: vec![],
            chunk_base: 0,
            q_offset: 0,
            chunk_total: 0,
            states: vec![vec![f64::NAN; state_len], vec![f64::NAN; state_len]],
        };
        run(&prog, prob, &mut io).expect("runs");
        let want = linear_attention(&spec, prob, &q, &k, &v, decay.then_some(s.as_slice()), None);
        let err = relative_error(&io.tensors[bind.o.index()].data, &want);
        prop_assert!(err < 2e-2, "relative error {} (chunks {})", err, chunks);
        // The last block's inclusive prefix is the state after the whole sequence:
        // S = sum_j lam^(n_pad - 1 - j) k_j^T v_j over the padded length.
        let (b, h) = (1usize, 1usize);
        let lam = if decay { (-s[h]).exp() } else { 1.0 };
        let padded = chunks * 32;
        let slot = ((chunks - 1) * prob.batch + b) * prob.heads + h;
        let mut max_err: f64 = 0.0;
        let mut max_ref: f64 = 0.0;
        for r in 0..32 {
            for c in 0..32 {
                let mut want = 0.0;
                for j in 0..n {
                    want += lam.powi((padded - 1 - j) as i32)
                        * k.data[k.offset(b, j, h) + r]
                        * v.data[v.offset(b, j, h) + c];
                }
                let got = io.states[1][(slot * 32 + r) * 32 + c];
                max_err = max_err.max((got - want).abs());
                max_ref = max_ref.max(want.abs());
            }
        }
        prop_assert!(max_err <= 2e-2 * max_ref.max(1.0), "inclusive state off by {} (max {})", max_err, max_ref);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    /// LASP-2 with the chunk kernels: P devices each hold a slice of the sequence; each runs
    /// the state-only kernel on its slice (writing its slot of the chunk-major state array,
    /// which is what an all-gather of the per-device states produces), then the output
    /// kernel with `chunk_base = rank`, which starts from the decayed prefix of the earlier
    /// devices' states. The concatenated outputs equal the single-device recurrence.
    #[test]
    fn lasp2_with_the_chunk_kernels_matches_one_device(p in 2usize..5, blocks_per_rank in 1usize..4,
                                                      tail in 0usize..32, decay in any::<bool>(), seed in any::<u64>()) {
        use einattn_backends::family::linear::program::{lightning_part, Part};
        let d = 32usize;
        let spec = LinearSpec {
            head_dim: d as u32,
            value_dim: d as u32,
            elem: Elem::Bf16,
            decay: if decay { Decay::PerHead("s".into()) } else { Decay::None },
            causal: true,
        };
        let sched = LinearSchedule { strategy: einattn_backends::family::linear::Strategy::SinglePass, value_block: 32, warps: 2, stages: 2, mma: einattn_backends::tile::MmaUnit::Sync };
        let local = blocks_per_rank * d;
        // Every rank holds `local` tokens but the last, which may be shorter.
        let n = local * (p - 1) + (local - tail.min(local - 1));
        let heads = 2;
        let chunk_tiles = blocks_per_rank as u32;
        let (states_prog, bind) = lightning_part(&spec, &sched, Part::ChunkStates { chunk_tiles }).expect("builds");
        let (outputs_prog, _) = lightning_part(&spec, &sched, Part::ChunkOutputs { chunk_tiles }).expect("builds");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut full = |cols: usize| -> Vec<f64> {
            (0..n * heads * cols).map(|_| spec.elem.round(rng.random_range(-1.0..1.0))).collect()
        };
        let (qf, kf, vf) = (full(d), full(d), full(d));
        let s: Vec<f64> = (0..heads).map(|h| 0.05 + 0.3 * h as f64).collect();
        // The gathered state array of all ranks: [P, B, H, d, e].
        let mut gathered = vec![f64::NAN; p * heads * d * d];
        let slice = |x: &Vec<f64>, r: usize, len: usize| {
            HostTensor::bnhd(x[r * local * heads * d..(r * local + len) * heads * d].to_vec(), len, heads, d)
        };
        let lens: Vec<usize> = (0..p).map(|r| if r + 1 == p { n - r * local } else { local }).collect();
        let bindings = |r: usize, states: Vec<f64>| Bindings {
            tensors: vec![
                slice(&qf, r, lens[r]),
                slice(&kf, r, lens[r]),
                slice(&vf, r, lens[r]),
                HostTensor::bnhd(vec![f64::NAN; lens[r] * heads * d], lens[r], heads, d),
            ],
            row_outputs: vec![],
            row_inputs: vec![],
            scalars: vec![],
            head_params: bind.decay.map(|_| vec![s.clone()]).unwrap_or_default(),
            tokens: vec![],
            chunk_base: r,
            q_offset: 0,
        chunk_total: p,
            states: vec![states],
        };
        // Phase 1 on every device; each writes only its own slot, so running them over one
        // shared array is the all-gather.
        for (r, &len) in lens.iter().enumerate() {
            let prob = Problem { batch: 1, heads, kv_group: 1, n_q: len, n_k: len };
            let mut io = bindings(r, gathered.clone());
            run(&states_prog, prob, &mut io).expect("state pass");
            let slot = heads * d * d;
            gathered[r * slot..(r + 1) * slot].copy_from_slice(&io.states[0][r * slot..(r + 1) * slot]);
        }
        // Phase 2 on every device.
        let mut out = Vec::new();
        for (r, &len) in lens.iter().enumerate() {
            let prob = Problem { batch: 1, heads, kv_group: 1, n_q: len, n_k: len };
            let mut io = bindings(r, gathered.clone());
            run(&outputs_prog, prob, &mut io).expect("output pass");
            out.extend_from_slice(&io.tensors[bind.o.index()].data);
        }
        let prob = Problem { batch: 1, heads, kv_group: 1, n_q: n, n_k: n };
        let host = |x: &Vec<f64>| HostTensor::bnhd(x.clone(), n, heads, d);
        let want = linear_attention(&spec, prob, &host(&qf), &host(&kf), &host(&vf), decay.then_some(s.as_slice()), None);
        let err = relative_error(&out, &want);
        prop_assert!(err < 2e-2, "P = {}: relative error {}", p, err);
    }
}
