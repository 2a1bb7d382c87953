//! The cost model: per scheme, bytes each device receives, collectives, sequential
//! communication steps, compute time (FLOPs and bytes of each device's kernels from the
//! FuseMax analysis of its per-device cascade, over a GPU's rates), communication time
//! (bandwidth and latency per collective), how much of it hides behind compute, and the
//! total along the slowest device.

use super::classify::Classification;
use super::local::{self, Window};
use super::schemes::{self, PairAnalyzer, PairMask, Scheme, SchemeKind, TokenRange};
use super::SpError;
use crate::analysis::{GpuModel, Report};
use einattn_ir::{Cascade, DType, Handle, Tensor, TensorKind};
use serde::{Deserialize, Serialize};

/// `time(bytes) = max(floor, latency + bytes / bandwidth)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    /// Bytes per second the collective moves per device (bus bandwidth for all-gather).
    pub bandwidth: f64,
    pub latency_s: f64,
    /// The smallest time one call takes, whatever its size.
    pub floor_s: f64,
}

impl LinkModel {
    pub fn time(&self, bytes: f64) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        (self.latency_s + bytes / self.bandwidth).max(self.floor_s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostParams {
    /// Peak rates of one device (tensor-core FLOP/s, scalar FLOP/s, SFU op/s, HBM bytes/s).
    pub gpu_name: String,
    pub contraction_flops: f64,
    pub scalar_flops: f64,
    pub transcendental_ops: f64,
    pub memory_bandwidth: f64,
    /// Fractions of the peaks our kernels reach; calibrate against measured runs.
    pub contraction_efficiency: f64,
    pub scalar_efficiency: f64,
    pub memory_efficiency: f64,
    /// Fixed cost per kernel launch.
    pub launch_s: f64,
    /// All-gather: bytes are `(P - 1) x` the per-device buffer.
    pub all_gather: LinkModel,
    /// One send and one receive at once (a ring step): bytes are one message.
    pub p2p: LinkModel,
    /// All-to-all: bytes are `(P - 1) / P x` the per-device buffer.
    pub all_to_all: LinkModel,
    /// Element size of states and partial statistics moved between devices.
    pub state_bytes: u64,
}

impl Default for CostParams {
    /// H200 rates (the 2xH200 NVLink host the SP anchors were measured on). Links from
    /// `docs/anchors.md`: all-gather 0.072 ms at 4 MiB per rank, 0.365 ms at 64 MiB and
    /// 1.17 ms at 256 MiB (fit: 45 us + bytes / 240 GB/s, floor 70 us); ring send+recv
    /// 0.130 ms at 4 MiB, 1.07 ms at 256 MiB (fit: 110 us + bytes / 255 GB/s, floor
    /// 130 us). All-to-all is taken as the all-gather link.
    fn default() -> Self {
        CostParams::for_gpu(&GpuModel::h200())
    }
}

impl CostParams {
    /// Reads overrides: a JSON object with any of this struct's fields (the rest keep
    /// their defaults), e.g. `{"p2p": {"bandwidth": 4.0e11, "latency_s": 2e-5,
    /// "floor_s": 3e-5}, "contraction_efficiency": 0.7}`.
    pub fn from_json(text: &str) -> Result<CostParams, String> {
        let mut base = serde_json::to_value(CostParams::default()).map_err(|e| e.to_string())?;
        let overrides: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let (Some(base_map), Some(over_map)) = (base.as_object_mut(), overrides.as_object()) else {
            return Err("cost parameters must be a JSON object".to_string());
        };
        for (k, v) in over_map {
            if !base_map.contains_key(k) {
                return Err(format!("unknown cost parameter `{k}`"));
            }
            match (
                base_map.get_mut(k).and_then(|b| b.as_object_mut()),
                v.as_object(),
            ) {
                (Some(inner), Some(v_inner)) => {
                    for (ik, iv) in v_inner {
                        inner.insert(ik.clone(), iv.clone());
                    }
                }
                _ => {
                    base_map.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(base).map_err(|e| e.to_string())
    }

    pub fn for_gpu(gpu: &GpuModel) -> CostParams {
        let all_gather = LinkModel {
            bandwidth: 240e9,
            latency_s: 45e-6,
            floor_s: 70e-6,
        };
        CostParams {
            gpu_name: gpu.name.clone(),
            contraction_flops: gpu.contraction_flops,
            scalar_flops: gpu.scalar_flops,
            transcendental_ops: gpu.transcendental_ops,
            memory_bandwidth: gpu.memory_bandwidth,
            // Calibrated on one H200 from single-GPU benchmarks of our own kernels, not from
            // SP runs (bench/results/softmax_2026-11-29: causal softmax at d=128, N=16384
            // runs at 347 TFLOP/s = 0.45 of the 771 TFLOP/s this model once took as the
            // peak, 0.35 of the 989 TFLOP/s datasheet peak the machine table now holds;
            // bench/results/linear_2026-11-29: Lightning at d=128 streams Q, K, V and O at
            // 35-37% of the HBM rate). The SP predictions are then checked against SP runs.
            contraction_efficiency: 0.45 * 771.0 / 989.0,
            scalar_efficiency: 0.5,
            memory_efficiency: 0.36,
            launch_s: 5e-6,
            all_gather,
            p2p: LinkModel {
                bandwidth: 255e9,
                latency_s: 110e-6,
                floor_s: 130e-6,
            },
            all_to_all: all_gather,
            state_bytes: 4,
        }
    }

    /// The time of a kernel with this work.
    pub fn kernel_time(&self, work: &Work) -> f64 {
        let c = work.contraction_flops / (self.contraction_flops * self.contraction_efficiency);
        let s = work.scalar_flops / (self.scalar_flops * self.scalar_efficiency);
        let t = work.transcendental_ops / (self.transcendental_ops * self.scalar_efficiency);
        let m = work.bytes / (self.memory_bandwidth * self.memory_efficiency);
        self.launch_s + c.max(s).max(t).max(m)
    }

    /// A memory-bound local step (a combine, a merge, a copy) over `bytes`.
    pub fn memory_time(&self, bytes: f64) -> f64 {
        self.launch_s + bytes / (self.memory_bandwidth * self.memory_efficiency)
    }
}

/// What one kernel does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Work {
    pub contraction_flops: f64,
    pub scalar_flops: f64,
    pub transcendental_ops: f64,
    pub bytes: f64,
}

/// The predicted cost of one scheme.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub scheme: String,
    /// `None` when the scheme applies; otherwise why not.
    pub not_applicable: Option<String>,
    /// Bytes the busiest device receives.
    pub bytes_per_device: u64,
    /// NCCL calls per device (a grouped send+recv counts one).
    pub collectives: u64,
    /// Communication rounds one after another.
    pub steps: u64,
    /// Kernel and local-combine time on the slowest device.
    pub compute_s: f64,
    /// Communication time on the slowest device, as if nothing overlapped.
    pub comm_s: f64,
    /// Communication hidden behind compute.
    pub overlap_s: f64,
    /// `compute + comm - overlap` along the slowest device.
    pub total_s: f64,
    /// One line on how the total is formed.
    pub formula: String,
    /// What the GPU executor does with this scheme ([`SchemeKind::gpu_support`]).
    pub gpu: crate::sp::schemes::GpuSupport,
}

impl Estimate {
    fn not_applicable(scheme: &Scheme, why: String) -> Estimate {
        Estimate {
            scheme: scheme.name(),
            not_applicable: Some(why),
            bytes_per_device: 0,
            collectives: 0,
            steps: 0,
            compute_s: 0.0,
            comm_s: 0.0,
            overlap_s: 0.0,
            total_s: f64::INFINITY,
            formula: String::new(),
            gpu: scheme.kind.gpu_support(),
        }
    }
}

/// The work of the Einsums named `einsums` in `report`, reading and writing `tensors`
/// (names) at their storage size, plus `extra_bytes`.
fn work_of(report: &Report, einsums: &[String], tensors: &[String], extra_bytes: f64) -> Work {
    let mut w = Work::default();
    for e in report
        .einsums
        .iter()
        .filter(|e| einsums.contains(&e.einsum))
    {
        w.contraction_flops += e.contraction_flops as f64;
        w.scalar_flops += e.scalar_flops as f64;
        w.transcendental_ops += e.transcendental_ops as f64;
    }
    w.bytes = report
        .tensor_bytes
        .iter()
        .filter(|t| tensors.contains(&t.tensor))
        .map(|t| t.bytes as f64)
        .sum::<f64>()
        + extra_bytes;
    w
}

/// Names of the Einsums (by output tensor) and of the non-temporary tensors they touch.
fn phase_names(
    cascade: &Cascade,
    einsums: &[Handle<einattn_ir::Einsum>],
) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut tensors: Vec<String> = Vec::new();
    let mut touch = |t: Handle<Tensor>| {
        let tensor = &cascade.tensors[t];
        if tensor.kind != TensorKind::Temp && !tensors.contains(&tensor.name) {
            tensors.push(tensor.name.clone());
        }
    };
    for &h in einsums {
        let e = &cascade.einsums[h];
        names.push(cascade.tensors[e.output.tensor].name.clone());
        touch(e.output.tensor);
        e.expr.visit_accesses(&mut |a| touch(a.tensor));
    }
    (names, tensors)
}

/// Storage bytes per token of the sequence-carrying inputs on the key side (K and V).
pub fn key_bytes_per_token(cascade: &Cascade, cls: &Classification) -> u64 {
    let key = cls.seq.key.declared;
    cascade
        .tensors
        .iter()
        .filter(|(_, t)| {
            t.kind == TensorKind::Input
                && t.ranks.contains(&key)
                && (cls.seq.single_rank() || !t.ranks.contains(&cls.seq.query.declared))
        })
        .map(|(h, t)| {
            cascade.tensor_elements(h) / cls.seq.tokens.max(1)
                * t.dtype.unwrap_or(DType::F32).bytes()
        })
        .sum()
}

/// Storage bytes per token of the query-side inputs (Q).
pub fn query_bytes_per_token(cascade: &Cascade, cls: &Classification) -> u64 {
    let q = cls.seq.query.declared;
    cascade
        .tensors
        .iter()
        .filter(|(_, t)| {
            t.kind == TensorKind::Input
                && t.ranks.contains(&q)
                && !t.ranks.contains(&cls.seq.key.declared)
        })
        .map(|(h, t)| {
            cascade.tensor_elements(h) / cls.seq.tokens.max(1)
                * t.dtype.unwrap_or(DType::F32).bytes()
        })
        .sum()
}

/// Storage bytes per token of the outputs.
pub fn output_bytes_per_token(cascade: &Cascade, cls: &Classification) -> u64 {
    let q = cls.seq.query.declared;
    cascade
        .tensors
        .iter()
        .filter(|(_, t)| t.kind == TensorKind::Output && t.ranks.contains(&q))
        .map(|(h, t)| {
            cascade.tensor_elements(h) / cls.seq.tokens.max(1)
                * t.dtype.unwrap_or(DType::F32).bytes()
        })
        .sum()
}

/// Elements per query token of the carried per-query statistics (softmax: max, sum, numerator).
pub fn stats_elements_per_token(cls: &Classification) -> u64 {
    cls.states
        .iter()
        .filter(|s| s.per_query)
        .map(|s| s.elements / cls.seq.tokens.max(1))
        .sum()
}

/// Estimates `scheme` on `devices` devices.
pub fn estimate(
    analyzer: &mut PairAnalyzer,
    scheme: &Scheme,
    devices: u64,
    params: &CostParams,
) -> Result<Estimate, SpError> {
    let cascade = analyzer.cascade;
    let cls = analyzer.cls;
    if let Err(why) = schemes::applicability(cls, cascade, scheme, devices) {
        return Ok(Estimate::not_applicable(scheme, why));
    }
    let p = devices;
    let tokens = cls.seq.tokens;
    let chunk = tokens / p;
    let all: Vec<Handle<einattn_ir::Einsum>> = cascade.einsums.handles().collect();
    let (all_names, all_tensors) = phase_names(cascade, &all);
    let sb = params.state_bytes as f64;

    let mut e = Estimate {
        scheme: scheme.name(),
        not_applicable: None,
        bytes_per_device: 0,
        collectives: 0,
        steps: 0,
        compute_s: 0.0,
        comm_s: 0.0,
        overlap_s: 0.0,
        total_s: 0.0,
        formula: String::new(),
        gpu: scheme.kind.gpu_support(),
    };

    match scheme.kind {
        SchemeKind::Lasp2 | SchemeKind::Lasp1 => {
            let state_elems: u64 = cls.states.iter().map(|s| s.elements).sum();
            let state_einsums: Vec<_> = cls.states.iter().map(|s| s.einsum).collect();
            let slice = local::dependency_order(cascade, &state_einsums);
            let (state_names, state_tensors) = phase_names(cascade, &slice);
            let window = [Window {
                rank: cls.seq.query.declared,
                start: 0,
                len: chunk,
            }];
            let report = analyzer.report(&window)?;
            let state_bytes = state_elems as f64 * sb;
            let t_state =
                params.kernel_time(&work_of(report, &state_names, &state_tensors, state_bytes));
            let t_output =
                params.kernel_time(&work_of(report, &all_names, &all_tensors, state_bytes));
            // Decays are one value per head or so: count them as a fraction of the state.
            let message = state_bytes;
            let t_combine_one = params.memory_time(3.0 * state_bytes);
            if scheme.kind == SchemeKind::Lasp2 {
                let t_gather = params.all_gather.time((p - 1) as f64 * message);
                let t_combine = params.memory_time((p + 1) as f64 * state_bytes);
                e.bytes_per_device = ((p - 1) as f64 * message) as u64;
                e.collectives = 1;
                e.steps = 1;
                e.compute_s = t_state + t_combine + t_output;
                e.comm_s = t_gather;
                e.total_s = e.compute_s + e.comm_s;
                e.formula = format!(
                    "state {:.3} + all-gather {:.3} + combine {:.3} + output {:.3} ms",
                    t_state * 1e3,
                    t_gather * 1e3,
                    t_combine * 1e3,
                    t_output * 1e3
                );
            } else {
                let hop = params.p2p.time(message);
                e.bytes_per_device = message as u64;
                e.collectives = 2;
                e.steps = p - 1;
                e.compute_s = t_state + (p - 1) as f64 * t_combine_one + t_output;
                e.comm_s = (p - 1) as f64 * hop;
                e.total_s = e.compute_s + e.comm_s;
                e.formula = format!(
                    "state {:.3} + {} x (hop {:.3} + combine {:.3}) + output {:.3} ms",
                    t_state * 1e3,
                    p - 1,
                    hop * 1e3,
                    t_combine_one * 1e3,
                    t_output * 1e3
                );
            }
        }
        SchemeKind::AllGatherKv | SchemeKind::Ring | SchemeKind::TokenRing => {
            let (partial_names, partial_tensors) = phase_names(cascade, &cls.partial);
            let (epi_names, epi_tensors) = phase_names(cascade, &cls.epilogue);
            let stats_per_token = stats_elements_per_token(cls) as f64 * sb;
            let kv_per_token = key_bytes_per_token(cascade, cls) as f64;
            let q_per_token = query_bytes_per_token(cascade, cls) as f64;
            let mut worst = (0.0f64, 0.0f64, 0.0f64, 0.0f64); // total, compute, comm, overlap
            let mut max_bytes = 0u64;
            // Which device holds each key chunk: looked up per pair below, so built once
            // (scanning the devices per pair made the ring schemes cubic in P).
            let mut owner: std::collections::HashMap<TokenRange, u64> =
                std::collections::HashMap::new();
            for d in 0..p {
                for c in schemes::device_chunks(tokens, p, scheme.zigzag, d) {
                    owner.entry(c).or_insert(d);
                }
            }
            // A pair's kernel time depends only on its class: computed once per class.
            let mut times: schemes::PairMap<f64> = schemes::PairMap::default();
            for r in 0..p {
                let pairs = schemes::device_pairs(analyzer, p, scheme.zigzag, r)?;
                let mine = schemes::device_chunks(tokens, p, scheme.zigzag, r);
                let mut pair_time = |q: TokenRange,
                                     k: TokenRange,
                                     analyzer: &mut PairAnalyzer|
                 -> Result<f64, SpError> {
                    let class = analyzer.pair_class(q, k);
                    if let Some(t) = class.and_then(|c| times.get(&c)) {
                        return Ok(*t);
                    }
                    let report = analyzer.report(&schemes::pair_windows(cls, q, k))?;
                    let t = params.kernel_time(&work_of(
                        report,
                        &partial_names,
                        &partial_tensors,
                        2.0 * q.len as f64 * stats_per_token,
                    ));
                    if let Some(c) = class {
                        times.insert(c, t);
                    }
                    Ok(t)
                };
                let mut epilogue = 0.0;
                for q in &mine {
                    let report = analyzer.report(&schemes::pair_windows(cls, *q, *q))?;
                    epilogue += params.kernel_time(&work_of(
                        report,
                        &epi_names,
                        &epi_tensors,
                        q.len as f64 * stats_per_token,
                    ));
                }
                let merge_one =
                    |q: TokenRange| params.memory_time(3.0 * q.len as f64 * stats_per_token);
                match scheme.kind {
                    SchemeKind::AllGatherKv => {
                        let received = (tokens - tokens / p) as f64 * kv_per_token;
                        let t_gather = params.all_gather.time(received);
                        let mut local = 0.0;
                        let mut remote = 0.0;
                        for (q, k, _) in &pairs {
                            let t = pair_time(*q, *k, analyzer)?;
                            if mine.contains(k) {
                                local += t;
                            } else {
                                remote += t;
                            }
                        }
                        // The gathered chunks are placed into whole-sequence K and V
                        // (read and written once), then one kernel per query chunk runs
                        // after the gather: nothing overlaps it.
                        let place = params.memory_time(2.0 * tokens as f64 * kv_per_token);
                        let compute = local + remote + epilogue + place;
                        let overlap = 0.0;
                        let total = compute + t_gather - overlap;
                        max_bytes = max_bytes.max(received as u64);
                        if total > worst.0 {
                            worst = (total, compute, t_gather, overlap);
                        }
                        e.collectives = 1;
                        e.steps = 1;
                    }
                    SchemeKind::Ring | SchemeKind::TokenRing => {
                        // Step s: device r works with the chunks of device (r - s) mod P.
                        let mut compute = 0.0;
                        let mut comm = 0.0;
                        let mut overlap = 0.0;
                        let mut total = 0.0;
                        let mut received = 0.0;
                        // Ring: this device's pairs by the device holding their key chunk,
                        // in pair order (the order the step sums them in).
                        let mut by_owner: Vec<Vec<usize>> = vec![Vec::new(); p as usize];
                        if scheme.kind == SchemeKind::Ring {
                            for (i, (q, k, _)) in pairs.iter().enumerate() {
                                if let Some(&o) = owner.get(k) {
                                    if mine.contains(q) {
                                        by_owner[o as usize].push(i);
                                    }
                                }
                            }
                        }
                        let mut my_keys = mine.clone();
                        my_keys.sort();
                        for s in 0..p {
                            let src = (r + p - s) % p;
                            let mut step_compute = 0.0;
                            for &i in &by_owner[src as usize] {
                                let (q, k, _) = pairs[i];
                                step_compute += pair_time(q, k, analyzer)? + merge_one(q);
                            }
                            if scheme.kind == SchemeKind::TokenRing {
                                // This device computes its own keys against the queries of
                                // device (r - s): device src's pairs whose key chunk is
                                // one of this device's, in `device_pairs` order.
                                for q in schemes::device_chunks(tokens, p, scheme.zigzag, src) {
                                    for k in &my_keys {
                                        if analyzer.pair_mask(q, *k)? != PairMask::Empty {
                                            step_compute +=
                                                pair_time(q, *k, analyzer)? + merge_one(q);
                                        }
                                    }
                                }
                            }
                            let step_comm = if s + 1 < p {
                                let chunk_tokens: u64 = mine.iter().map(|c| c.len).sum();
                                let bytes = if scheme.kind == SchemeKind::Ring {
                                    chunk_tokens as f64 * kv_per_token
                                } else {
                                    // Queries out and statistics back travel at once.
                                    (chunk_tokens as f64 * q_per_token)
                                        .max(chunk_tokens as f64 * stats_per_token)
                                };
                                received += bytes;
                                params.p2p.time(bytes)
                            } else {
                                0.0
                            };
                            compute += step_compute;
                            comm += step_comm;
                            overlap += step_comm.min(step_compute);
                            total += step_compute.max(step_comm);
                        }
                        compute += epilogue;
                        total += epilogue;
                        max_bytes = max_bytes.max(received as u64);
                        if total > worst.0 {
                            worst = (total, compute, comm, overlap);
                        }
                        e.collectives = if scheme.kind == SchemeKind::Ring {
                            p - 1
                        } else {
                            2 * (p - 1)
                        };
                        e.steps = p - 1;
                    }
                    _ => {}
                }
            }
            e.total_s = worst.0;
            e.compute_s = worst.1;
            e.comm_s = worst.2;
            e.overlap_s = worst.3;
            e.bytes_per_device = max_bytes;
            e.formula = format!(
                "slowest device: compute {:.3} + comm {:.3} - overlap {:.3} ms",
                worst.1 * 1e3,
                worst.2 * 1e3,
                worst.3 * 1e3
            );
        }
        SchemeKind::Ulysses => {
            let Some(h) = scheme.head_rank.or_else(|| cls.head_ranks.first().copied()) else {
                return Ok(Estimate::not_applicable(scheme, "no head rank".to_string()));
            };
            let heads = cascade.ranks[h].extent;
            let window = [Window {
                rank: h,
                start: 0,
                len: heads / p,
            }];
            let report = analyzer.report(&window)?;
            let t_full = params.kernel_time(&work_of(report, &all_names, &all_tensors, 0.0));
            let per_token = if cls.seq.single_rank() {
                key_bytes_per_token(cascade, cls)
            } else {
                key_bytes_per_token(cascade, cls) + query_bytes_per_token(cascade, cls)
            } as f64;
            let out_per_token = output_bytes_per_token(cascade, cls) as f64;
            let frac = (p - 1) as f64 / p as f64;
            // One all-to-all per sequence input (each pays the latency), one for the output.
            let (q, k) = (cls.seq.query.declared, cls.seq.key.declared);
            let inputs = cascade
                .tensors
                .iter()
                .filter(|(_, t)| {
                    t.kind == TensorKind::Input && (t.ranks.contains(&q) || t.ranks.contains(&k))
                })
                .count()
                .max(1) as f64;
            let t_in = inputs
                * params
                    .all_to_all
                    .time(frac * chunk as f64 * per_token / inputs);
            let t_out = params.all_to_all.time(frac * chunk as f64 * out_per_token);
            // Each buffer is rearranged before and after its all-to-all, each time read and
            // written once.
            let t_pack = params.memory_time(4.0 * chunk as f64 * (per_token + out_per_token));
            e.bytes_per_device = (frac * chunk as f64 * (per_token + out_per_token)) as u64;
            e.collectives = inputs as u64 + 1;
            e.steps = 2;
            e.compute_s = t_full + t_pack;
            e.comm_s = t_in + t_out;
            e.total_s = e.compute_s + e.comm_s;
            e.formula = format!(
                "all-to-all in {:.3} + attention on {} of {} heads {:.3} + out {:.3} + packing {:.3} ms",
                t_in * 1e3,
                heads / p,
                heads,
                t_full * 1e3,
                t_out * 1e3,
                t_pack * 1e3
            );
        }
    }
    Ok(e)
}
