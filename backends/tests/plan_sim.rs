//! Lowered softmax plans run on the CPU the way the GPU executor runs them: every kernel
//! step binds its kernel through [`StepBinding`] (the executor's reading of a step), the
//! Tile kernels run on the Tile IR interpreter, the epilogue and the merge run their
//! kernels' loops, buffers hold values rounded to their dtype, and collectives copy. The
//! outputs equal the single-device interpreter for Ring, TokenRing (contiguous and zigzag)
//! and the all-gather of K/V, causal, windowed and non-causal, on P in {2, 3, 4, 8}.

use einattn_backends::abi::{Axis, Dtype, LaunchContract, Source};
use einattn_backends::family::elementwise::{lse_merge_model, LSE_MERGE};
use einattn_backends::family::{self, Compiled, KernelOptions, Request};
use einattn_backends::plan::bind::{Pointer, StepBinding};
use einattn_backends::plan::lower::lower;
use einattn_backends::plan::order::{order, Batch};
use einattn_backends::plan::{
    piece_runs, plan_cascade, stats, BufferInit, KernelStep, Plan, Region, Step,
};
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::{AbiRole, Elem, TileProgram};
use einattn_ir::interp::{self, TensorData};
use einattn_ir::{Cascade, Handle, Tensor};
use einattn_passes::analysis::GpuModel;
use einattn_passes::sp::SpOptions;
use std::collections::HashMap;
use std::path::PathBuf;

fn compiled(file: &str, defines: &[(&str, u64)]) -> (Cascade, Box<dyn Compiled>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example");
    let name = path.display().to_string();
    let defines: Vec<(String, u64)> = defines.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    let build = |d: &[(String, u64)]| {
        einattn_dsl::compile_source(&name, &text, d)
            .map_err(|e| family::CompileError::Source(e.items().to_vec()))
    };
    let cascade = build(&defines).expect("compiles");
    let k = family::compile(&Request {
        cascade: &cascade,
        options: &KernelOptions::default(),
        defines: &defines,
        instantiate: &build,
    })
    .unwrap_or_else(|e| panic!("{file}: {e}"));
    (cascade, k)
}

/// One rank's buffers: values (rounded to the dtype) and the dtype.
type Memory = HashMap<String, (Vec<f64>, Dtype)>;

fn round(dtype: Dtype, x: f64) -> f64 {
    match dtype {
        Dtype::Bf16 => Elem::Bf16.round(x),
        Dtype::F16 => Elem::F16.round(x),
        _ => Elem::F32.round(x),
    }
}

fn read<'m>(mem: &'m Memory, r: &Region) -> &'m [f64] {
    let (v, _) = &mem[&r.buffer];
    &v[r.offset as usize..(r.offset + r.count) as usize]
}

fn write(mem: &mut Memory, r: &Region, values: &[f64]) {
    let (v, dtype) = mem.get_mut(&r.buffer).expect("buffer");
    let at = r.offset as usize;
    for (d, s) in v[at..at + values.len()].iter_mut().zip(values) {
        *d = round(*dtype, *s);
    }
}

struct Sim<'a> {
    cascade: &'a Cascade,
    plan: &'a Plan,
    contracts: &'a [LaunchContract],
    programs: HashMap<String, TileProgram>,
    inputs: &'a HashMap<Handle<Tensor>, TensorData>,
    memory: Vec<Memory>,
}

impl Sim<'_> {
    fn contract(&self, entry: &str) -> &LaunchContract {
        self.contracts
            .iter()
            .find(|c| c.kernel == entry)
            .unwrap_or_else(|| panic!("no contract `{entry}`"))
    }

    fn scalar(&self, name: &str, default: Option<f64>) -> f64 {
        self.cascade
            .tensor_by_name(name)
            .and_then(|t| self.inputs.get(&t))
            .map(|d| d.values[0])
            .or(default)
            .unwrap_or_else(|| panic!("no value for `{name}`"))
    }

    fn region<'b>(b: &StepBinding<'b>, source: &Source) -> &'b Region {
        match b.pointer(source).expect("binds") {
            Pointer::Region(r) => r,
            other => panic!("{source:?} points at {other:?}"),
        }
    }

    fn kernel(&mut self, r: usize, k: &KernelStep) {
        let [entry] = k.launch.as_slice() else {
            panic!("{}: one kernel per step", k.kernel)
        };
        let contract = self.contract(entry).clone();
        let b = StepBinding::new(self.plan, k, &contract).expect("binds");
        if let Some(prog) = self.programs.get(entry).cloned() {
            return self.tile(r, &prog, &contract, &b);
        }
        // The epilogue kernel's loop over its parameters, by name.
        let mut ptr = HashMap::new();
        let mut num = HashMap::new();
        for p in &contract.params {
            match &p.from {
                Source::Tensor { .. } => {
                    ptr.insert(p.name.as_str(), Self::region(&b, &p.from).clone());
                }
                Source::Size { size } => {
                    num.insert(p.name.as_str(), b.size(size).expect("size"));
                }
                Source::Stride { tensor, axis } => {
                    num.insert(p.name.as_str(), b.stride(tensor, *axis).expect("stride"));
                }
                other => panic!("an epilogue parameter from {other:?}"),
            }
        }
        let n = |s: &str| num[s] as usize;
        let mem = &self.memory[r];
        let (numv, denv) = (
            read(mem, &ptr["num"]).to_vec(),
            read(mem, &ptr["den"]).to_vec(),
        );
        let mut out = read(mem, &ptr["out"]).to_vec();
        for bi in 0..n("batch") {
            for s in 0..n("seq") {
                for h in 0..n("heads") {
                    for c in 0..n("width") {
                        let at = |t: &str| {
                            bi * n(&format!("{t}_sb"))
                                + s * n(&format!("{t}_sn"))
                                + h * n(&format!("{t}_sh"))
                        };
                        let d = denv[at("den")];
                        let x = numv[at("num") + c];
                        out[at("out") + c] = if d == 0.0 {
                            0.0
                        } else {
                            (x as f32 / d as f32) as f64
                        };
                    }
                }
            }
        }
        write(&mut self.memory[r], &ptr["out"], &out);
    }

    /// A Tile kernel on the interpreter with every parameter from the binding.
    fn tile(&mut self, r: usize, prog: &TileProgram, contract: &LaunchContract, b: &StepBinding) {
        let abi = prog.abi();
        assert_eq!(abi.len(), contract.params.len(), "{}", contract.kernel);
        let size = |name: &str| b.size(name).expect("size") as usize;
        let problem = Problem {
            batch: size("batch"),
            heads: size("heads"),
            kv_group: size("kv_group"),
            n_q: size("n_q"),
            n_k: size("n_k"),
        };
        let mut io = Bindings {
            tensors: vec![
                HostTensor {
                    data: vec![],
                    stride_b: 0,
                    stride_n: 0,
                    stride_h: 0
                };
                prog.tensors.len()
            ],
            row_outputs: vec![vec![]; prog.row_outputs.len()],
            row_inputs: vec![],
            scalars: vec![0.0; prog.scalars.len()],
            head_params: vec![vec![]; prog.head_params.len()],
            states: vec![],
            chunk_base: 0,
            chunk_total: 0,
            q_offset: 0,
            tokens: vec![],
        };
        let mut tensor_regions = vec![None; prog.tensors.len()];
        let mut row_regions = vec![None; prog.row_outputs.len()];
        let mem = &self.memory[r];
        for (a, p) in abi.iter().zip(&contract.params) {
            match &a.role {
                AbiRole::TensorPtr(t) => {
                    let region = Self::region(b, &p.from).clone();
                    let Source::Tensor { tensor } = &p.from else {
                        panic!()
                    };
                    let stride = |axis| b.stride(tensor, axis).expect("stride") as usize;
                    io.tensors[t.index()] = HostTensor {
                        data: read(mem, &region).to_vec(),
                        stride_b: stride(Axis::Batch),
                        stride_n: stride(Axis::Seq),
                        stride_h: stride(Axis::Head),
                    };
                    tensor_regions[t.index()] = Some(region);
                }
                AbiRole::RowOutputPtr(o) => {
                    let region = Self::region(b, &p.from).clone();
                    io.row_outputs[o.index()] = read(mem, &region).to_vec();
                    row_regions[o.index()] = Some(region);
                }
                AbiRole::HeadParamPtr(h) => {
                    io.head_params[h.index()] = read(mem, Self::region(b, &p.from)).to_vec();
                }
                AbiRole::Scalar(s) => {
                    let Source::Scalar { param, default } = &p.from else {
                        panic!()
                    };
                    io.scalars[s.index()] = self.scalar(param, *default);
                }
                AbiRole::QueryOffset => io.q_offset = size("q_offset"),
                _ => {}
            }
        }
        run(prog, problem, &mut io).unwrap_or_else(|e| panic!("{}: {e}", contract.kernel));
        let mem = &mut self.memory[r];
        for (t, decl) in prog.tensors.iter().enumerate() {
            if let (true, Some(region)) = (decl.is_output, &tensor_regions[t]) {
                write(mem, region, &io.tensors[t].data);
            }
        }
        for (o, region) in row_regions.iter().enumerate() {
            if let Some(region) = region {
                write(mem, region, &io.row_outputs[o]);
            }
        }
    }

    fn local(&mut self, r: usize, step: &Step) {
        match step {
            Step::Kernel(k) => self.kernel(r, k),
            Step::Place {
                src,
                dst,
                shape,
                slices,
                ..
            } => {
                let from = read(&self.memory[r], src).to_vec();
                let mut to = read(&self.memory[r], dst).to_vec();
                for (at, off, len) in piece_runs(shape, slices) {
                    let (at, off, len) = (at as usize, off as usize, len as usize);
                    to[at..at + len].copy_from_slice(&from[off..off + len]);
                }
                write(&mut self.memory[r], dst, &to);
            }
            Step::LseMerge {
                into, from, stats, ..
            } => {
                assert!(
                    self.contracts.iter().any(|c| c.kernel == LSE_MERGE),
                    "a merge without the merge kernel"
                );
                let mut a = read(&self.memory[r], into).to_vec();
                let f = read(&self.memory[r], from).to_vec();
                for m in stats::merge_launches(into, from, stats).expect("lowers") {
                    let (o, n) = (m.offset as usize, m.count as usize);
                    let (am, fm) = match m.max_offset {
                        Some(x) => (a[x as usize..].to_vec(), f[x as usize..].to_vec()),
                        None => (vec![], vec![]),
                    };
                    lse_merge_model(
                        m.kind,
                        &mut a[o..o + n],
                        &f[o..o + n],
                        &am,
                        &fm,
                        m.width as usize,
                    );
                    // The kernel computes in f32.
                    for x in &mut a[o..o + n] {
                        *x = Elem::F32.round(*x);
                    }
                }
                write(&mut self.memory[r], into, &a);
            }
            other => panic!("the simulation runs softmax plans; got {}", other.op_name()),
        }
    }

    fn run(&mut self) {
        let steps: Vec<&[Step]> = self.plan.ranks.iter().map(|r| r.steps.as_slice()).collect();
        let ranks: Vec<usize> = (0..steps.len()).collect();
        for batch in order(&steps, &ranks).expect("an order") {
            match batch {
                Batch::Local(i, k) => self.local(i, &steps[i][k]),
                Batch::Collective(at) => {
                    let sends: Vec<Vec<f64>> = at
                        .iter()
                        .map(|&(i, k)| match &steps[i][k] {
                            Step::AllGather { send, .. } => read(&self.memory[i], send).to_vec(),
                            other => panic!("collective {}", other.op_name()),
                        })
                        .collect();
                    for &(i, k) in &at {
                        let Step::AllGather { recv, .. } = &steps[i][k] else {
                            unreachable!()
                        };
                        let all: Vec<f64> = sends.concat();
                        write(&mut self.memory[i], recv, &all);
                    }
                }
                Batch::PointToPoint(at) => {
                    // Every send reads before any receive writes (one NCCL group).
                    let mut sent = HashMap::new();
                    for &(i, k) in &at {
                        if let Step::SendRecv { send: Some(s), .. } = &steps[i][k] {
                            sent.insert(
                                (i, s.peer as usize),
                                read(&self.memory[i], &s.region).to_vec(),
                            );
                        }
                    }
                    for &(i, k) in &at {
                        if let Step::SendRecv { recv: Some(rv), .. } = &steps[i][k] {
                            let data = sent.remove(&(rv.peer as usize, i)).unwrap_or_else(|| {
                                panic!("rank {i} receives nothing from {}", rv.peer)
                            });
                            assert_eq!(data.len() as u64, rv.region.count);
                            write(&mut self.memory[i], &rv.region, &data);
                        }
                    }
                    assert!(sent.is_empty(), "a send nobody received");
                }
            }
        }
    }
}

/// Runs the lowered plan of `scheme` on `p` devices and returns the largest relative
/// error of an output against the single-device interpreter.
fn simulated_error(
    cascade: &Cascade,
    k: &dyn Compiled,
    scheme: &str,
    p: u64,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    want: &interp::Values,
) -> Option<f64> {
    let mut options = SpOptions::new(p);
    options.scheme = Some(scheme.to_string());
    let Ok((_, plan)) = plan_cascade(cascade, &options) else {
        return None;
    };
    let gpu = GpuModel::h200();
    let lowered = lower(&plan, k, &gpu).unwrap_or_else(|e| panic!("{scheme} P={p}: {e}"));
    let mut scratch = plan.clone();
    let programs: HashMap<String, TileProgram> = k
        .plan_modules(&mut scratch, &gpu)
        .expect("modules")
        .modules
        .into_iter()
        .filter_map(|m| Some((m.ptx.entry.clone(), m.program.tile()?.clone())))
        .collect();
    let mut memory = Vec::new();
    for rank in &lowered.plan.ranks {
        let mut mem = Memory::new();
        for b in &rank.buffers {
            let dtype = Dtype::from_name(&b.dtype).expect("dtype");
            let mut v = vec![f64::NAN; b.elements as usize];
            match &b.init {
                BufferInit::Uninit => {}
                BufferInit::Value { value } => v.iter_mut().for_each(|x| *x = *value),
                BufferInit::Pieces { pieces } => {
                    for piece in pieces {
                        let t = cascade.tensor_by_name(&piece.tensor).expect("tensor");
                        let g = lowered
                            .plan
                            .tensors
                            .iter()
                            .find(|g| g.name == piece.tensor)
                            .expect("global");
                        let data = inputs[&t].stored();
                        for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                            let (at, dst, len) =
                                (at as usize, (piece.offset + from) as usize, len as usize);
                            for x in 0..len {
                                v[dst + x] = round(dtype, data[at + x]);
                            }
                        }
                    }
                }
            }
            mem.insert(b.name.clone(), (v, dtype));
        }
        memory.push(mem);
    }
    let mut sim = Sim {
        cascade,
        plan: &lowered.plan,
        contracts: &lowered.kernels.manifest.kernels,
        programs,
        inputs,
        memory,
    };
    sim.run();
    // The outputs, assembled from every rank's pieces.
    let mut worst = 0.0f64;
    for h in cascade.outputs() {
        let name = &cascade.tensors[h].name;
        let g = lowered
            .plan
            .tensors
            .iter()
            .find(|g| &g.name == name)
            .expect("global");
        let mut got = vec![f64::NAN; g.shape.iter().product::<u64>() as usize];
        for (r, rank) in lowered.plan.ranks.iter().enumerate() {
            for piece in rank.outputs.iter().filter(|x| &x.tensor == name) {
                let (buf, _) = &sim.memory[r][&piece.buffer];
                for (at, from, len) in piece_runs(&g.shape, &piece.slices) {
                    let (at, src, len) =
                        (at as usize, (piece.offset + from) as usize, len as usize);
                    got[at..at + len].copy_from_slice(&buf[src..src + len]);
                }
            }
        }
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{scheme} P={p}: an output element unwritten or not finite"
        );
        let w = &want.tensors[&h];
        let e = TensorData::new(w.shape.clone(), got).relative_error(w);
        worst = worst.max(e);
    }
    Some(worst)
}

fn check(file: &str, defines: &[(&str, u64)], schemes: &[&str]) {
    let (cascade, k) = compiled(file, defines);
    let order = einattn_ir::validate::topological_order(&cascade);
    for p in [2u64, 3, 4, 8] {
        let inputs = interp::random_inputs(&cascade, 11 + p);
        let want = interp::evaluate_in_order(&cascade, &inputs, &order).expect("evaluates");
        for scheme in schemes {
            let Some(e) = simulated_error(&cascade, k.as_ref(), scheme, p, &inputs, &want) else {
                // Zigzag needs 2P chunks of whole tiles.
                assert!(
                    scheme.ends_with("zigzag"),
                    "{file} {scheme} P={p} does not plan"
                );
                continue;
            };
            // bf16 inputs and probabilities, f32 statistics: a wrong block, offset or merge
            // is off by far more.
            assert!(e < 1e-2, "{file} {scheme} P={p}: relative error {e}");
        }
    }
}

const SOFTMAX: &[&str] = &[
    "ring",
    "ring_zigzag",
    "tokenring",
    "tokenring_zigzag",
    "allgather_kv",
    "allgather_kv_zigzag",
];

#[test]
fn causal_plans_run_their_kernels_like_one_device() {
    check(
        "attention_causal.ein",
        &[("N", 384), ("D", 64), ("TILE", 8), ("H", 2)],
        SOFTMAX,
    );
}

#[test]
fn noncausal_plans_run_their_kernels_like_one_device() {
    check(
        "attention_1pass.ein",
        &[("M", 384), ("D", 64), ("TILE", 8)],
        SOFTMAX,
    );
}

/// A band mask leaves rows of a block with no visible key: their statistics are -inf and
/// weigh nothing in the merge.
#[test]
fn windowed_plans_run_their_kernels_like_one_device() {
    check(
        "attention_sliding_window.ein",
        &[("N", 384), ("D", 64), ("TILE", 8), ("W", 40)],
        &["ring", "tokenring_zigzag", "allgather_kv"],
    );
}
