//! Attention whose weights are a linear combination of attention maps, as one attention
//! kernel per term and a post-kernel that combines their outputs.
//!
//! Differential attention (`examples/differential_attention.ein`, Ye et al. 2024) weighs V
//! by `softmax(s1) - lam[h] softmax(s2)`: no one softmax reads as that, but V distributes
//! over the difference, `(W1 - lam W2) V = W1 V - lam (W2 V)` (a factor free of the key
//! rank leaves the sum over it), and each product is attention of its own. [`distribute`]
//! rewrites the cascade that way; each term's Einsums then compile as attention (with its
//! own pre-kernels, if it has some) writing its output into scratch, and the combination
//! `O = O_t1 - lam[h] * O_t2` runs after them as a post-kernel (the general lowering). This
//! is how the paper's own implementation runs it (two FlashAttention calls, then the
//! difference), reached from the cascade rather than written by hand.
//!
//! The rewrite is exact only where every term sees the same keys: the cascade's sum skips
//! a key that any term masks (a map over an absent value is absent), a term's own sum only
//! the keys it masks. So the terms' readings must have the same masks, or the cascade is
//! left to the general lowering.

use super::epilogue::{split_off, Epilogue};
use super::{compile_softmax, visible_flops, with_general_kernels, written_by, SoftmaxKernels};
use crate::family::subcascade::{extract, inputs_by_name, with_split_relatives};
use crate::family::{
    backend_error, CompileError, Compiled, FamilyError, Inputs, KernelOptions, KernelProgram,
    Module, PlanKernels, Rate,
};
use crate::plan::Plan;
use crate::print_ptx;
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{
    Access, BinaryOp, Cascade, Einsum, Expr, Rank, ReduceOp, Tensor, TensorKind, UnaryOp,
};
use einattn_ir::print::einsum_to_string;
use einattn_ir::validate::{topological_order, Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use std::collections::{BTreeSet, HashMap};

/// A cascade with V distributed over a linear combination of attention weights.
#[derive(Debug, Clone)]
pub struct Distributed {
    /// The rewritten cascade: one contraction per term (`O_t1 = A_t1 * V`, ...), and in
    /// place of the original contraction the combination of their outputs.
    pub cascade: Cascade,
    /// The terms' outputs in `cascade`, in order.
    pub terms: Vec<Handle<Tensor>>,
    /// The Einsums the rewrite wrote (the terms' weights, if the combination was a tensor
    /// of its own, the terms' contractions and the combination), for `--emit schedule`.
    pub written: Vec<Handle<Einsum>>,
}

impl Distributed {
    /// The terms' Einsums as cascades of their own (`NAME_t1`, ..., each writing its term's
    /// output) and the epilogue that combines them (and computes whatever follows).
    pub fn split(&self) -> Option<(Vec<Cascade>, Epilogue)> {
        let names: Vec<String> = (1..=self.terms.len())
            .map(|k| format!("{}_t{k}", self.cascade.name))
            .collect();
        split_off(&self.cascade, &self.terms, &names)
    }
}

/// Rewrites the last contraction of `c` whose weights are a linear combination of two or
/// more terms with key-dependent factors (`sum_m (W1 - lam W2) V`) as one contraction per
/// term and their combination. `None` when no contraction has that form.
pub fn distribute(c: &Cascade) -> Option<Distributed> {
    topological_order(c)
        .iter()
        .rev()
        .find_map(|&x| distribute_at(c, x))
}

/// Where a contraction's combination of weights is written.
enum Weights<'a> {
    /// Inline, as one operand of the product.
    Inline(&'a Expr),
    /// A temporary written by Einsum `writer` with no reductions, read by the contraction
    /// alone (through `access`, at the indices it is written at).
    Temp {
        writer: Handle<Einsum>,
        access: &'a Access,
    },
}

/// A signed term: `sign * coefficient * weight`, each a product of factors (`true`: the
/// factor divides).
struct Term {
    negative: bool,
    /// The factors free of the key ranks: they leave the sum over keys.
    coefficient: Vec<(bool, Expr)>,
    /// The factors that depend on a key: the term's attention weights.
    weight: Vec<(bool, Expr)>,
}

fn distribute_at(c: &Cascade, x: Handle<Einsum>) -> Option<Distributed> {
    let einsum = &c.einsums[x];
    if einsum.recurrence.is_some()
        || einsum.reductions.is_empty()
        || einsum.reductions.iter().any(|r| r.op != ReduceOp::Sum)
    {
        return None;
    }
    let Expr::Binary(BinaryOp::Mul, left, right) = &einsum.expr else {
        return None;
    };
    let keys = key_ranks(c, einsum);
    let free: BTreeSet<Handle<Rank>> = einsum
        .output
        .indices
        .iter()
        .flat_map(|i| i.ranks())
        .collect();
    for (weights_left, side, other) in [(true, left, right), (false, right, left)] {
        let weights = match side.as_ref() {
            Expr::Access(a) => match temp_weights(c, x, a) {
                Some(w) => w,
                None => continue,
            },
            e => Weights::Inline(e),
        };
        let combination = match &weights {
            Weights::Inline(e) => *e,
            Weights::Temp { writer, .. } => &c.einsums[*writer].expr,
        };
        let Some(terms) = split_terms(c, combination, &keys, &free) else {
            continue;
        };
        return rewrite(c, x, &weights, weights_left, other, terms);
    }
    None
}

/// The ranks a contraction sums over, with their split parents and parts: a factor that
/// mentions any of them depends on the key.
fn key_ranks(c: &Cascade, einsum: &Einsum) -> BTreeSet<Handle<Rank>> {
    let mut keys: BTreeSet<Handle<Rank>> = einsum.reductions.iter().map(|r| r.rank).collect();
    with_split_relatives(c, &mut keys);
    keys
}

/// `access` as a temporary combination of weights: written by one Einsum with no
/// reductions or recurrence, at the indices it is read at, and read nowhere else.
fn temp_weights<'a>(c: &Cascade, x: Handle<Einsum>, access: &'a Access) -> Option<Weights<'a>> {
    let t = access.tensor;
    if c.tensors[t].kind != TensorKind::Temp {
        return None;
    }
    let writer = c.producer(t)?;
    let w = &c.einsums[writer];
    if !w.reductions.is_empty() || w.recurrence.is_some() || w.output.indices != access.indices {
        return None;
    }
    let mut reads = 0;
    for (h, e) in c.einsums.iter() {
        e.visit_reads(&mut |a| {
            if a.tensor == t {
                reads += if h == x { 1 } else { 2 };
            }
        });
    }
    (reads == 1).then_some(Weights::Temp { writer, access })
}

/// The signed terms of `e` (two or more), each split into a coefficient free of `keys`
/// (mentioning only the contraction's `free` ranks) and key-dependent weights.
fn split_terms(
    c: &Cascade,
    e: &Expr,
    keys: &BTreeSet<Handle<Rank>>,
    free: &BTreeSet<Handle<Rank>>,
) -> Option<Vec<Term>> {
    let mut signed = Vec::new();
    signed_terms(e, false, &mut signed);
    if signed.len() < 2 {
        return None;
    }
    let mut terms = Vec::new();
    for (mut negative, term) in signed {
        let mut all = Vec::new();
        factors(term, false, &mut negative, &mut all);
        let (coefficient, weight): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(_, f)| key_free(c, f, keys, &mut BTreeSet::new()));
        let mut mentioned = BTreeSet::new();
        for (_, f) in &coefficient {
            f.visit_indices(&mut |i| mentioned.extend(i.ranks()));
        }
        if weight.is_empty() || !mentioned.is_subset(free) {
            return None;
        }
        terms.push(Term {
            negative,
            coefficient,
            weight,
        });
    }
    Some(terms)
}

/// The operands of a sum or difference, with their signs.
fn signed_terms<'a>(e: &'a Expr, negative: bool, out: &mut Vec<(bool, &'a Expr)>) {
    match e {
        Expr::Binary(BinaryOp::Add, a, b) => {
            signed_terms(a, negative, out);
            signed_terms(b, negative, out);
        }
        Expr::Binary(BinaryOp::Sub, a, b) => {
            signed_terms(a, negative, out);
            signed_terms(b, !negative, out);
        }
        Expr::Unary(UnaryOp::Neg, a) => signed_terms(a, !negative, out),
        _ => out.push((negative, e)),
    }
}

/// The factors of a product or quotient (`true`: divides); a negation flips `negative`.
fn factors(e: &Expr, divides: bool, negative: &mut bool, out: &mut Vec<(bool, Expr)>) {
    match e {
        Expr::Binary(BinaryOp::Mul, a, b) => {
            factors(a, divides, negative, out);
            factors(b, divides, negative, out);
        }
        Expr::Binary(BinaryOp::Div, a, b) => {
            factors(a, divides, negative, out);
            factors(b, !divides, negative, out);
        }
        Expr::Unary(UnaryOp::Neg, a) => {
            *negative = !*negative;
            factors(a, divides, negative, out);
        }
        _ => out.push((divides, e.clone())),
    }
}

/// Whether `e` is the same for every key: it mentions no rank of `keys`, and no temporary
/// it reads depends on one anywhere in its computation (a row sum over the keys does).
fn key_free(
    c: &Cascade,
    e: &Expr,
    keys: &BTreeSet<Handle<Rank>>,
    seen: &mut BTreeSet<Handle<Tensor>>,
) -> bool {
    let mut mentions = false;
    e.visit_indices(&mut |i| mentions |= i.ranks().any(|r| keys.contains(&r)));
    let mut temps = Vec::new();
    e.visit_accesses(&mut |a| {
        if c.tensors[a.tensor].kind == TensorKind::Temp {
            temps.push(a.tensor)
        }
    });
    !mentions
        && temps.into_iter().all(|t| {
            if !seen.insert(t) {
                return true;
            }
            let Some(w) = c.producer(t) else { return true };
            let w = &c.einsums[w];
            let mut reads_free = true;
            let mut reads = Vec::new();
            w.visit_reads(&mut |a| reads.push(Expr::Access(a.clone())));
            if let Some(r) = &w.recurrence {
                reads.push(r.init.clone());
            }
            for r in &reads {
                reads_free &= key_free(c, r, keys, seen);
            }
            reads_free && !w.mentioned_ranks().iter().any(|r| keys.contains(r))
        })
}

/// The product of `factors` (divisions last), 1 when there are none.
fn product(factors: &[(bool, Expr)]) -> Expr {
    let mut acc: Option<Expr> = None;
    for (_, f) in factors.iter().filter(|(divides, _)| !divides) {
        acc = Some(match acc {
            None => f.clone(),
            Some(a) => Expr::binary(BinaryOp::Mul, a, f.clone()),
        });
    }
    let mut acc = acc.unwrap_or(Expr::Literal(1.0));
    for (_, f) in factors.iter().filter(|(divides, _)| *divides) {
        acc = Expr::binary(BinaryOp::Div, acc, f.clone());
    }
    acc
}

/// A name like `stem` that no tensor of `c` has.
fn fresh_name(c: &Cascade, stem: String) -> String {
    let mut name = stem;
    while c.tensor_by_name(&name).is_some() {
        name.push('_');
    }
    name
}

/// The cascade with contraction `x` (over `weights` times `other`) replaced by one
/// contraction per term and their combination.
fn rewrite(
    c: &Cascade,
    x: Handle<Einsum>,
    weights: &Weights,
    weights_left: bool,
    other: &Expr,
    terms: Vec<Term>,
) -> Option<Distributed> {
    let einsum = &c.einsums[x];
    let out = einsum.output.tensor;
    let mut base = c.clone();
    let mut weight_einsums = Vec::new();
    let mut term_einsums = Vec::new();
    let mut term_names = Vec::new();
    let mut combined: Option<Expr> = None;
    let temp = |base: &mut Cascade, like: Handle<Tensor>, stem: String| {
        let mut t = c.tensors[like].clone();
        t.name = fresh_name(base, stem);
        t.kind = TensorKind::Temp;
        t.dtype = None;
        t.default = None;
        t.iterative = None;
        (t.name.clone(), base.tensors.append(t))
    };
    for (k, term) in terms.iter().enumerate() {
        let weight = product(&term.weight);
        let weight = match weights {
            Weights::Inline(_) => weight,
            Weights::Temp { writer, access } => {
                let w = &c.einsums[*writer];
                let stem = format!("{}_t{}", c.tensors[access.tensor].name, k + 1);
                let (_, h) = temp(&mut base, access.tensor, stem);
                weight_einsums.push(Einsum {
                    output: Access {
                        tensor: h,
                        ..w.output.clone()
                    },
                    expr: weight,
                    reductions: Vec::new(),
                    mask: w.mask.clone(),
                    value_mask: w.value_mask.clone(),
                    recurrence: None,
                    span: w.span,
                });
                Expr::Access(Access {
                    tensor: h,
                    ..(*access).clone()
                })
            }
        };
        let (name, h) = temp(
            &mut base,
            out,
            format!("{}_t{}", c.tensors[out].name, k + 1),
        );
        let expr = if weights_left {
            Expr::binary(BinaryOp::Mul, weight, other.clone())
        } else {
            Expr::binary(BinaryOp::Mul, other.clone(), weight)
        };
        let output = Access {
            tensor: h,
            ..einsum.output.clone()
        };
        term_einsums.push(Einsum {
            output: output.clone(),
            expr,
            reductions: einsum.reductions.clone(),
            mask: einsum.mask.clone(),
            value_mask: einsum.value_mask.clone(),
            recurrence: None,
            span: einsum.span,
        });
        term_names.push(name);
        let read = Expr::Access(output);
        let piece = if term.coefficient.is_empty() {
            read
        } else {
            Expr::binary(BinaryOp::Mul, product(&term.coefficient), read)
        };
        combined = Some(match (combined, term.negative) {
            (None, false) => piece,
            (None, true) => Expr::unary(UnaryOp::Neg, piece),
            (Some(a), false) => Expr::binary(BinaryOp::Add, a, piece),
            (Some(a), true) => Expr::binary(BinaryOp::Sub, a, piece),
        });
    }
    let combination = Einsum {
        output: einsum.output.clone(),
        expr: combined?,
        reductions: Vec::new(),
        mask: Vec::new(),
        value_mask: Vec::new(),
        recurrence: None,
        span: einsum.span,
    };
    let writer = match weights {
        Weights::Temp { writer, .. } => Some(*writer),
        Weights::Inline(_) => None,
    };
    let mut einsums = Vec::new();
    for (h, e) in c.einsums.iter() {
        if Some(h) == writer {
            einsums.append(&mut weight_einsums);
        } else if h == x {
            einsums.append(&mut term_einsums);
            einsums.push(combination.clone());
        } else {
            einsums.push(e.clone());
        }
    }
    let kinds: HashMap<_, _> = base
        .tensors
        .iter()
        .map(|(h, t)| (h, (t.kind, t.dtype)))
        .collect();
    let cascade = extract(&base, &c.name, &einsums, &kinds).ok()?;
    let terms: Vec<Handle<Tensor>> = term_names
        .iter()
        .map(|n| cascade.tensor_by_name(n))
        .collect::<Option<_>>()?;
    // The rewrite's Einsums in the new cascade, by what they write.
    let new_names: BTreeSet<String> = base
        .tensors
        .iter()
        .skip(c.tensors.len())
        .map(|(_, t)| t.name.clone())
        .chain([c.tensors[out].name.clone()])
        .collect();
    let written = cascade
        .einsums
        .iter()
        .filter(|(_, e)| new_names.contains(&cascade.tensors[e.output.tensor].name))
        .map(|(h, _)| h)
        .collect();
    Some(Distributed {
        cascade,
        terms,
        written,
    })
}

/// The kernels of a cascade distributed over attention terms.
pub struct CombinedKernels {
    /// The cascade as written (its inputs are the check's).
    cascade: Cascade,
    /// What the kernels compute: the cascade with V distributed over the terms.
    pub distributed: Distributed,
    /// Each term's attention kernels (and pre-kernels), over the term's Einsums.
    pub terms: Vec<SoftmaxKernels>,
    /// The combination of the terms' outputs, and whatever follows it.
    pub epilogue: Epilogue,
    post_kernels: usize,
    modules: Vec<Module>,
}

/// Compiles `c` as a linear combination of attention terms: `None` when no contraction
/// distributes into terms that each read as attention (the softmax family's first reason
/// stands), an error when a term reads as attention but cannot be compiled as asked.
pub fn compile_combination(
    c: &Cascade,
    options: &KernelOptions,
) -> Option<Result<CombinedKernels, FamilyError>> {
    let distributed = distribute(c)?;
    let (cores, epilogue) = distributed.split()?;
    if options.store_tma == Some(true) {
        // Each term's output goes to scratch for the combination, and a launcher makes
        // tensor maps of the cascade's tensors only.
        let d = Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            format!(
                "`{}` reads as {} attention terms whose outputs go to scratch for their combination: the copy engine stores only a cascade's own output",
                c.name,
                cores.len()
            ),
            einattn_ir::cascade::Span::UNKNOWN,
        )
        .with_help("leave out `--store tma`");
        return Some(Err(FamilyError::Failed(CompileError::Refused(Box::new(d)))));
    }
    // The terms' outputs go to scratch: each stores from registers.
    let term_options = KernelOptions {
        store_tma: Some(false),
        ..options.clone()
    };
    let mut terms = Vec::new();
    for (k, core) in cores.iter().enumerate() {
        match compile_softmax(core, &term_options) {
            Ok(kernels) => terms.push(kernels),
            Err(FamilyError::NotMine(_)) => return None,
            Err(FamilyError::Failed(CompileError::Refused(mut d))) => {
                d.message = format!(
                    "`{}` reads as {} attention terms (V distributed over their combination), but term {}: {}",
                    c.name,
                    cores.len(),
                    k + 1,
                    d.message
                );
                return Some(Err(FamilyError::Failed(CompileError::Refused(d))));
            }
            Err(e) => return Some(Err(e)),
        }
    }
    if let Err(why) = same_keys(&terms) {
        // The combination (the last Einsum the rewrite wrote) carries the contraction's span.
        let span = distributed
            .written
            .last()
            .map_or(einattn_ir::cascade::Span::UNKNOWN, |&e| {
                distributed.cascade.einsums[e].span
            });
        let d = Diagnostic::error(
            DiagnosticKind::NotMappable,
            format!(
                "`{}` weighs V by a combination of attention maps that see different keys ({why}); V distributes over it only when every term masks the same keys",
                c.name
            ),
            span,
        );
        return Some(Err(FamilyError::NotMine(vec![d])));
    }
    Some(assemble(c, distributed, terms, epilogue, options).map_err(FamilyError::Failed))
}

/// Whether every term's reading masks the same keys of the same problem: `Err` says how
/// they differ.
fn same_keys(terms: &[SoftmaxKernels]) -> Result<(), String> {
    let first = &terms[0].schedule.matched;
    let tokens = |k: &SoftmaxKernels| -> Vec<String> {
        let m = &k.schedule.matched;
        let c = k.cascade();
        m.tokens
            .iter()
            .map(|l| c.tensors[l.tensor].name.clone())
            .collect()
    };
    for (k, term) in terms.iter().enumerate().skip(1) {
        let m = &term.schedule.matched;
        let shape = |m: &super::AttentionMatch| (m.batch, m.heads, m.n_q, m.n_k);
        if shape(m) != shape(first) {
            return Err(format!("term {} has another problem shape", k + 1));
        }
        if m.spec.masks() != first.spec.masks() {
            return Err(format!("term {}'s band masks differ from term 1's", k + 1));
        }
        if m.spec.value_masks != first.spec.value_masks || tokens(term) != tokens(&terms[0]) {
            return Err(format!("term {}'s value masks differ from term 1's", k + 1));
        }
    }
    Ok(())
}

/// The terms' kernels in order (each attention kernel's entry suffixed with its term, so
/// no two kernels of the manifest share one), their outputs in scratch, then the
/// epilogue's post-kernels.
fn assemble(
    c: &Cascade,
    distributed: Distributed,
    terms: Vec<SoftmaxKernels>,
    epilogue: Epilogue,
    options: &KernelOptions,
) -> Result<CombinedKernels, CompileError> {
    let mut modules = Vec::new();
    for (k, term) in terms.iter().enumerate() {
        for module in term.modules() {
            let mut module = module.clone();
            if let KernelProgram::Tile(program) = &mut module.program {
                program.name = term_entry(&program.name, k);
                module.ptx = print_ptx(program, options.target).map_err(backend_error)?;
                module.contract.kernel = module.ptx.entry.clone();
                module.contract.ptx = format!("{}.ptx", module.ptx.entry);
            }
            modules.push(module);
        }
    }
    let attention_kernels = modules.len();
    let elem = terms[0].schedule.spec().elem;
    // The combination is the last Einsum the rewrite wrote.
    let combined = distributed
        .written
        .last()
        .map(|&e| {
            let d = &distributed.cascade;
            d.tensors[d.einsums[e].output.tensor].name.clone()
        })
        .unwrap_or_default();
    let what = |n: &str| {
        format!(
            "`{n}`, a term of `{combined}`, written by its attention kernel and read by the post-kernels ({})",
            epilogue.cascade.name
        )
    };
    let modules = with_general_kernels(
        &epilogue.cascade,
        &epilogue.attentions,
        &what,
        false,
        elem,
        options,
        modules,
    )?;
    Ok(CombinedKernels {
        cascade: c.clone(),
        post_kernels: modules.len() - attention_kernels,
        distributed,
        terms,
        epilogue,
        modules,
    })
}

/// The entry of term `k`'s (from 0) attention kernel `entry`: two terms of one shape would
/// otherwise compile to kernels of one name.
fn term_entry(entry: &str, k: usize) -> String {
    format!("{entry}_t{}", k + 1)
}

impl Compiled for CombinedKernels {
    fn family(&self) -> &'static str {
        "softmax"
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        let d = &self.distributed;
        let mut text = format!(
            "V distributed over a combination of {} attention terms, each its own attention kernel, then the combination:\n",
            self.terms.len()
        );
        for &e in &d.written {
            text.push_str(&format!(
                "  {}\n",
                einsum_to_string(&d.cascade, e).trim_end()
            ));
        }
        for (k, term) in self.terms.iter().enumerate() {
            text.push_str(&format!(
                "term {} (`{}`, the Einsums of `{}`):\n",
                k + 1,
                self.epilogue.attentions[k],
                term.cascade().name
            ));
            for line in term.explain().lines() {
                let mut line = line.to_string();
                if line.starts_with("kernel: ") {
                    for m in term.modules() {
                        if let KernelProgram::Tile(p) = &m.program {
                            line = line.replace(&p.name, &term_entry(&p.name, k));
                        }
                    }
                }
                text.push_str(&format!("  {line}\n"));
            }
        }
        text.push_str(&format!(
            "post-kernels: {} (the general lowering of `{}`: {}) read the terms' outputs {} from scratch, in {}\n",
            self.post_kernels,
            self.epilogue.cascade.name,
            written_by(&self.epilogue.cascade),
            self.epilogue.attentions.join(", "),
            self.terms[0].schedule.spec().elem.name()
        ));
        text
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        let outputs: Vec<Vec<f64>> = self
            .terms
            .iter()
            .map(|term| {
                term.formula(&inputs_by_name(&self.cascade, term.cascade(), inputs))
                    .0
            })
            .collect();
        match self.epilogue.output(&self.cascade, outputs, inputs) {
            Ok(out) => (
                out,
                "the f64 attention formula of each term, then the post-kernels' cascade",
            ),
            // A reference that fails compares as NaN, which never passes.
            Err(_) => (vec![f64::NAN], "the post-kernels' cascade (failed)"),
        }
    }

    fn interpreter_work(&self) -> u64 {
        self.terms.iter().map(|t| t.interpreter_work()).sum()
    }

    fn formula_work(&self) -> Option<u64> {
        self.terms.iter().map(|t| t.formula_work()).sum()
    }

    fn rate(&self) -> Rate {
        let (mut flops, mut predicted_ms, mut at_most) = (0.0, 0.0, false);
        for term in &self.terms {
            let m = &term.schedule.matched;
            flops += visible_flops(m);
            predicted_ms += term.schedule.estimate.seconds * 1e3;
            at_most |= !m.spec.value_masks.is_empty();
        }
        Rate::Flops {
            flops,
            predicted_ms,
            at_most,
        }
    }

    fn plan_modules(&self, _plan: &mut Plan, _gpu: &GpuModel) -> Result<PlanKernels, String> {
        Err("plan kernels of a combination of attention terms (differential attention)".into())
    }
}
