//! Validation of a Cascade: the checks that make a cascade meaningful (every tensor
//! assigned once, indices in range, recurrences well formed, no cycles), run by the
//! front end after lowering and callable on any IR a pass builds.
//!
//! Nothing here panics on malformed IR (out-of-range handles included): a pass that
//! builds a broken cascade gets diagnostics, not a crash.

use crate::arena::Handle;
use crate::cascade::*;
use std::collections::{BTreeSet, HashMap};

/// The largest extent validation accepts: element counts and index arithmetic of
/// anything below cannot overflow 64 bits.
pub const MAX_EXTENT: u64 = 1 << 40;

/// What kind of problem a diagnostic reports; tests and tools match on this rather than
/// on message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiagnosticKind {
    /// The text does not follow the grammar (or has a character no token starts with).
    Syntax,
    /// A tensor, rank, size symbol, function or reduction name that is not declared.
    UnknownName,
    /// A name declared twice, or a statement that may appear once given twice.
    Duplicate,
    /// Wrong number of indices, or an index over a rank unrelated to the dimension.
    RankMismatch,
    /// An index that is not affine, or an output index of a form the language forbids.
    BadIndex,
    /// Two Einsums assign the same tensor.
    AssignedTwice,
    /// An Einsum assigns an input or a parameter.
    AssignsInput,
    /// An output no Einsum assigns.
    OutputNeverAssigned,
    /// A temporary that is read but that no Einsum assigns.
    ReadNeverAssigned,
    /// A dependency cycle not made only of recurrences reading their current state.
    Cycle,
    /// A recurrence reading its own state other than at the current step.
    RecurrenceReadsAhead,
    /// An `init` with no recurrence, a recurrence with no `init`, or a malformed one.
    Recurrence,
    /// A split whose tile does not divide the parent's extent (or is zero).
    SplitDoesNotDivide,
    /// A reduction operator with no identity (only sum, prod, max and min have one).
    NoIdentity,
    /// A size symbol used but neither declared with `size` nor given with `-D`.
    UndefinedSize,
    /// A `-D NAME=VALUE` for a name the program does not use.
    UnknownDefine,
    /// A term added to the rest of an Einsum's expression that does not depend on a rank
    /// the Einsum sums over: it is added once per point of that rank (a warning).
    SummedConstant,
    /// An index whose range (by interval arithmetic) leaves the dimension.
    OutOfRange,
    /// A valid cascade that a backend cannot map onto its kernels.
    NotMappable,
    /// A cascade a backend maps, but not with these sizes or options (no tile shape fits,
    /// a head dimension the kernel does not take).
    UnsupportedShape,
    /// A rank iterated by an Einsum but neither an output index nor reduced, a rank
    /// reduced twice, a type or value that makes no sense: everything else.
    Invalid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem, with the source text it is about. Rendering (file:line:col, the line,
/// a caret) is the front end's job; this is plain data so passes can produce it too.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub kind: DiagnosticKind,
    pub severity: Severity,
    pub message: String,
    /// The offending text; `None` for IR built by passes, or a problem outside the source
    /// (a `-D` on the command line).
    pub span: Option<Span>,
    /// Said next to the caret.
    pub label: String,
    /// Other places that explain the problem (the first assignment of a tensor assigned
    /// twice, the other Einsums of a cycle).
    pub related: Vec<(Span, String)>,
    pub help: Option<String>,
    /// For a problem with one index of an access whose span is `span`: which index. The
    /// front end narrows the span to that index's text.
    pub index_position: Option<usize>,
}

impl Diagnostic {
    pub fn error(kind: DiagnosticKind, message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic {
            kind,
            severity: Severity::Error,
            message: message.into(),
            span: if span.is_unknown() { None } else { Some(span) },
            label: String::new(),
            related: Vec::new(),
            help: None,
            index_position: None,
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        if !span.is_unknown() {
            self.related.push((span, label.into()));
        }
        self
    }

    pub fn at_index(mut self, position: usize) -> Diagnostic {
        self.index_position = Some(position);
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo: at most
/// one edit for short names, a third of the length for longer ones. A candidate that
/// differs only in case always qualifies (`k` for `K`).
pub fn closest_name<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| {
            let d = if c.eq_ignore_ascii_case(name) {
                0
            } else {
                edit_distance(name, c)
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= limit)
        // Ties go to the first name in byte order: callers pass names from hash sets, and
        // the same input must always get the same suggestion.
        .min_by_key(|&(d, c)| (d, c))
        .map(|(_, c)| c)
}

/// A "did you mean `x`?" help line, when a candidate is close.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest_name(name, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// Whether an access of a recurrence's own state reads the current step: the iterative
/// index is exactly the iterative rank (`r + 1` for a reverse recurrence).
fn reads_current_step(cascade: &Cascade, einsum: &Einsum, access: &Access) -> bool {
    let Some(rec) = &einsum.recurrence else {
        return false;
    };
    let dim = cascade.tensors.get(access.tensor).and_then(|t| t.iterative);
    match dim.and_then(|d| access.indices.get(d)) {
        Some(index) => *index == rec.current_index(),
        None => false,
    }
}

/// The Einsums each Einsum depends on: the producers of the tensors it reads, in its
/// body or its init. A recurrence's reads of its own state are left out: at the current
/// step they read the previous iteration, not a cycle, and any other self-read is
/// reported by validation as a recurrence error rather than as a cycle.
pub fn dependencies(cascade: &Cascade) -> Vec<Vec<Handle<Einsum>>> {
    let mut producer: HashMap<Handle<Tensor>, Handle<Einsum>> = HashMap::new();
    for (h, e) in cascade.einsums.iter() {
        producer.entry(e.output.tensor).or_insert(h);
    }
    cascade
        .einsums
        .iter()
        .map(|(_, e)| {
            let mut deps: Vec<Handle<Einsum>> = Vec::new();
            let mut add = |access: &Access| {
                if e.recurrence.is_some() && access.tensor == e.output.tensor {
                    return;
                }
                if let Some(&p) = producer.get(&access.tensor) {
                    if !deps.contains(&p) {
                        deps.push(p);
                    }
                }
            };
            e.visit_reads(&mut add);
            deps
        })
        .collect()
}

/// An evaluation order of the Einsums: every Einsum after the producers of what it reads,
/// and otherwise in program order (the ready group with the smallest handle goes first).
/// The Einsums of a step body ([`step_bodies`]) are consecutive, in the order one step
/// evaluates them; Einsums caught in any other cycle (which `validate` reports) are
/// consecutive too, in program order.
pub fn topological_order(cascade: &Cascade) -> Vec<Handle<Einsum>> {
    let deps = dependencies(cascade);
    let n = deps.len();
    let groups = components(&deps);
    let mut group_of = vec![0usize; n];
    for (g, members) in groups.iter().enumerate() {
        for &m in members {
            group_of[m] = g;
        }
    }
    // Each group's members in evaluation order.
    let ordered: Vec<Vec<usize>> = groups
        .iter()
        .map(|members| match step_body_of(cascade, &deps, members) {
            Some(Ok(body)) => body.einsums.iter().map(|h| h.index()).collect(),
            _ => members.clone(),
        })
        .collect();
    let mut waiting = vec![0usize; groups.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    for (g, members) in groups.iter().enumerate() {
        let mut needs: Vec<usize> = Vec::new();
        for &m in members {
            for d in &deps[m] {
                let dg = group_of[d.index()];
                if dg != g && !needs.contains(&dg) {
                    needs.push(dg);
                }
            }
        }
        waiting[g] = needs.len();
        for dg in needs {
            users[dg].push(g);
        }
    }
    let first = |g: usize| groups[g].iter().copied().min().unwrap_or(usize::MAX);
    let mut ready: BTreeSet<(usize, usize)> = (0..groups.len())
        .filter(|&g| waiting[g] == 0)
        .map(|g| (first(g), g))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some((_, g)) = ready.pop_first() {
        order.extend(ordered[g].iter().map(|&e| Handle::new(e)));
        for &u in &users[g] {
            waiting[u] -= 1;
            if waiting[u] == 0 {
                ready.insert((first(u), u));
            }
        }
    }
    // Every group is placed: the condensation of a graph is acyclic.
    order
}

/// Einsums that advance together along one iterative rank, one step at a time: a
/// dependency cycle that runs only through reads of recurrence states (the delta rule's
/// `KS[t] = k[t] . S[t]` and `S[t+1] = f(S[t], KS[t])`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepBody {
    /// The iterative rank every member advances along.
    pub rank: Handle<Rank>,
    /// The members, in the order one step evaluates them.
    pub einsums: Vec<Handle<Einsum>>,
}

/// The step bodies of a cascade: every dependency cycle that satisfies the rules of a
/// step body (docs/language.md, *Recurrences*). Cycles that do not are errors of
/// [`validate`] and are not listed.
pub fn step_bodies(cascade: &Cascade) -> Vec<StepBody> {
    let deps = dependencies(cascade);
    components(&deps)
        .iter()
        .filter_map(|members| step_body_of(cascade, &deps, members))
        .filter_map(Result::ok)
        .collect()
}

/// Strongly connected components of the dependency graph (Tarjan), each sorted, in an
/// order where a component follows the components it depends on.
fn components(deps: &[Vec<Handle<Einsum>>]) -> Vec<Vec<usize>> {
    let n = deps.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut next = 0usize;
    let mut out: Vec<Vec<usize>> = Vec::new();
    // Iterative Tarjan: (node, position in its dependency list).
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut pos)) = work.last_mut() {
            if let Some(w) = deps[v].get(*pos).map(|h| h.index()) {
                *pos += 1;
                if w >= n {
                    continue;
                }
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                component.sort_unstable();
                out.push(component);
            }
        }
    }
    out
}

/// For a component that is a cycle (two or more Einsums, or one reading itself): the step
/// body it forms, or why it is not one. `None` for a component without a cycle.
fn step_body_of(
    cascade: &Cascade,
    deps: &[Vec<Handle<Einsum>>],
    members: &[usize],
) -> Option<Result<StepBody, String>> {
    let cyclic = members.len() > 1
        || members
            .first()
            .is_some_and(|&m| deps[m].iter().any(|d| d.index() == m));
    if !cyclic {
        return None;
    }
    Some(step_body_rules(cascade, members))
}

fn step_body_rules(cascade: &Cascade, members: &[usize]) -> Result<StepBody, String> {
    let c = cascade;
    let handles: Vec<Handle<Einsum>> = members.iter().map(|&m| Handle::new(m)).collect();
    let in_body = |t: Handle<Tensor>| {
        handles
            .iter()
            .find(|&&h| c.einsums.get(h).is_some_and(|e| e.output.tensor == t))
            .copied()
    };
    let mut rank: Option<(Handle<Rank>, bool)> = None;
    for &h in &handles {
        let Some(rec) = c.einsums.get(h).and_then(|e| e.recurrence.as_ref()) else {
            continue;
        };
        match rank {
            None => rank = Some((rec.rank, rec.reverse)),
            Some((r, _)) if r != rec.rank => {
                return Err("its recurrences advance along different ranks".into())
            }
            Some((_, reverse)) if reverse != rec.reverse => {
                return Err("its recurrences advance in opposite directions".into())
            }
            Some(_) => {}
        }
    }
    let Some((r, reverse)) = rank else {
        return Err("no recurrence is part of it".into());
    };
    let rank_name = c.ranks.get(r).map_or("?", |x| x.name.as_str()).to_string();
    let plain = IndexExpr::rank(r);
    let shifted = IndexExpr {
        terms: vec![(1, r)],
        constant: 1,
    };
    // A state read at `current` holds the previous step's result; at `next`, this step's.
    let (current, next) = if reverse {
        (shifted, plain.clone())
    } else {
        (plain.clone(), shifted)
    };
    let step = plain;
    // The dimension of a member's output that holds the step.
    let mut step_dim: HashMap<Handle<Tensor>, usize> = HashMap::new();
    for &h in &handles {
        let e = &c.einsums[h];
        let t = e.output.tensor;
        let name = c.tensors.get(t).map_or("?", |t| t.name.as_str());
        if e.recurrence.is_some() {
            match c.tensors.get(t).and_then(|t| t.iterative) {
                Some(d) => step_dim.insert(t, d),
                None => return Err(format!("`{name}` is not a state")),
            };
            continue;
        }
        if e.is_reduced(r) {
            return Err(format!("`{name}` reduces the step rank `{rank_name}`"));
        }
        match e.output.indices.iter().position(|i| *i == step) {
            Some(d) => step_dim.insert(t, d),
            None => {
                return Err(format!(
                    "`{name}` does not index its output by the step rank `{rank_name}`"
                ))
            }
        };
    }
    // Edges inside one step: a member reading another member's plain tensor at the current
    // step, or a state at the next step, runs after its producer.
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); handles.len()];
    for (k, &h) in handles.iter().enumerate() {
        let e = &c.einsums[h];
        let name = c
            .tensors
            .get(e.output.tensor)
            .map_or("?", |t| t.name.as_str());
        if let Some(rec) = &e.recurrence {
            let mut bad = None;
            rec.init.visit_accesses(&mut |a| {
                if in_body(a.tensor).is_some() {
                    bad = Some(a.tensor);
                }
            });
            if let Some(t) = bad {
                let read = c.tensors.get(t).map_or("?", |t| t.name.as_str());
                return Err(format!(
                    "the init of `{name}` reads `{read}`, which the steps compute"
                ));
            }
        }
        let mut problem: Option<String> = None;
        let mut reads: Vec<&Access> = Vec::new();
        e.expr.visit_accesses(&mut |a| reads.push(a));
        for v in &e.value_mask {
            v.visit_accesses(&mut |a| reads.push(a));
        }
        for a in reads {
            let Some(p) = in_body(a.tensor) else { continue };
            if p == h && e.recurrence.is_some() {
                continue;
            }
            let read = c.tensors.get(a.tensor).map_or("?", |t| t.name.as_str());
            let Some(&d) = step_dim.get(&a.tensor) else {
                continue;
            };
            let at = a.indices.get(d);
            let is_state = c.einsums[p].recurrence.is_some();
            let pk = handles.iter().position(|&x| x == p).unwrap_or(k);
            if is_state && at == Some(&current) {
                // The state at the current step: written by the previous step.
            } else if (is_state && at == Some(&next)) || (!is_state && at == Some(&step)) {
                if !after[k].contains(&pk) {
                    after[k].push(pk);
                }
            } else {
                problem = Some(format!(
                    "`{name}` reads `{read}` at a step other than `{rank_name}`{}",
                    if is_state {
                        format!(" or `{rank_name} + 1`")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if let Some(p) = problem {
            return Err(p);
        }
    }
    // Order one step: Kahn over the edges, program order among the ready.
    let n = handles.len();
    let mut done = vec![false; n];
    let mut einsums = Vec::with_capacity(n);
    while einsums.len() < n {
        let Some(k) = (0..n).find(|&k| !done[k] && after[k].iter().all(|&d| done[d])) else {
            return Err(format!(
                "inside one step of `{rank_name}` its Einsums read each other's results in a circle"
            ));
        };
        done[k] = true;
        einsums.push(handles[k]);
    }
    Ok(StepBody { rank: r, einsums })
}

/// Checks `cascade`; `Ok` when it has no errors.
pub fn validate(cascade: &Cascade) -> Result<(), Vec<Diagnostic>> {
    let diagnostics = check(cascade);
    if diagnostics.iter().any(Diagnostic::is_error) {
        Err(diagnostics)
    } else {
        Ok(())
    }
}

/// Every problem found in `cascade`, in the order of the checks.
pub fn check(cascade: &Cascade) -> Vec<Diagnostic> {
    let mut checker = Checker {
        cascade,
        out: Vec::new(),
    };
    if !checker.ranks() {
        // Extents so large that element counts overflow: nothing below is meaningful.
        return checker.out;
    }
    if !checker.tensors() {
        return checker.out;
    }
    if !checker.handles_valid() {
        // Later checks index the arenas; with dangling handles they would report nonsense.
        return checker.out;
    }
    checker.assignments();
    for (h, _) in cascade.einsums.iter() {
        checker.einsum(h);
    }
    checker.cycles();
    checker.out
}

/// A cycle through the strongly connected `component` (sorted, at least two Einsums),
/// starting at its first Einsum: each element reads the next, the last reads the first.
fn cycle_path(deps: &[Vec<Handle<Einsum>>], component: &[usize]) -> Vec<usize> {
    let start = component[0];
    // Breadth-first search inside the component for the shortest way back to `start`.
    let mut came_from: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in deps[v].iter().map(|h| h.index()) {
            if !component.contains(&w) {
                continue;
            }
            if w == start {
                let mut path = vec![v];
                let mut x = v;
                while x != start {
                    let Some(&previous) = came_from.get(&x) else {
                        break;
                    };
                    x = previous;
                    path.push(x);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = came_from.entry(w) {
                slot.insert(v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

struct Checker<'a> {
    cascade: &'a Cascade,
    out: Vec<Diagnostic>,
}

/// What names the sequence a rank walks: the size symbol (or extent expression) it was
/// declared with, followed through extent names (`rank j: I` is the sequence of `i`);
/// the rank itself for a split child; `None` for a literal extent, whose equality with
/// another literal is a coincidence rather than a declaration.
pub fn sequence_key(cascade: &Cascade, rank: Handle<Rank>) -> Option<String> {
    let mut r = rank;
    for _ in 0..cascade.ranks.len().max(1) {
        let x = cascade.ranks.get(r)?;
        match &x.source {
            ExtentSource::Symbol(s) => {
                if cascade.sizes.iter().any(|(n, _)| n == s) {
                    return Some(s.clone());
                }
                match cascade
                    .ranks
                    .iter()
                    .find(|(h, q)| *h != r && q.name.to_uppercase() == *s)
                {
                    Some((h, _)) => r = h,
                    None => return Some(s.clone()),
                }
            }
            ExtentSource::SplitOuter | ExtentSource::SplitTile => {
                return Some(format!("#{}", r.index()))
            }
            ExtentSource::Literal => return None,
        }
    }
    None
}

/// A closed interval of integers, for index range checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Interval {
    lo: i64,
    hi: i64,
}

/// A combination of ranks `sum(coef * rank)`, as [`canonical_form`] writes it.
type Form = Vec<(i128, Handle<Rank>)>;

/// What a mask allows inside one Einsum: an interval per rank, and one per combination of
/// several ranks that a condition bounds (keyed by [`canonical_form`]).
struct Ranges {
    intervals: HashMap<Handle<Rank>, Interval>,
    forms: HashMap<Form, Interval>,
}

/// A rank combination `sum(coef * rank)` as a key: terms merged, zeros dropped, sorted by
/// rank, divided by the gcd of the coefficients and signed so the first is positive.
/// Returns the key and the factor (`+-gcd`) the combination is of it; `None` when empty.
fn canonical_form(terms: Vec<(i128, Handle<Rank>)>) -> Option<(Form, i128)> {
    let mut merged: Vec<(i128, Handle<Rank>)> = Vec::new();
    for (c, r) in terms {
        match merged.iter_mut().find(|(_, x)| *x == r) {
            Some(t) => t.0 += c,
            None => merged.push((c, r)),
        }
    }
    merged.retain(|(c, _)| *c != 0);
    merged.sort_by_key(|&(_, r)| r);
    let first = merged.first()?.0;
    fn gcd(a: i128, b: i128) -> i128 {
        if b == 0 {
            a.abs()
        } else {
            gcd(b, a % b)
        }
    }
    let g = merged.iter().fold(0i128, |g, (c, _)| gcd(g, *c)).max(1);
    let factor = if first < 0 { -g } else { g };
    Some((
        merged.into_iter().map(|(c, r)| (c / factor, r)).collect(),
        factor,
    ))
}

impl<'a> Checker<'a> {
    fn push(&mut self, d: Diagnostic) {
        self.out.push(d);
    }

    fn rank_name(&self, r: Handle<Rank>) -> &str {
        self.cascade.ranks.get(r).map_or("?", |r| r.name.as_str())
    }

    fn tensor_name(&self, t: Handle<Tensor>) -> &str {
        self.cascade.tensors.get(t).map_or("?", |t| t.name.as_str())
    }

    /// Checks extents and splits; false when an extent is too large to check further.
    fn ranks(&mut self) -> bool {
        let c = self.cascade;
        let mut sane = true;
        for (_, rank) in c.ranks.iter() {
            if rank.extent > MAX_EXTENT {
                sane = false;
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::Invalid,
                        format!(
                            "rank `{}` has extent {}, above the limit 2^40",
                            rank.name, rank.extent
                        ),
                        rank.span,
                    )
                    .with_label("too large"),
                );
                continue;
            }
            if rank.extent == 0 {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::Invalid,
                        format!("rank `{}` has extent 0", rank.name),
                        rank.span,
                    )
                    .with_label("every rank needs at least one position"),
                );
            }
            let Some(split) = &rank.split else { continue };
            let (Some(outer), Some(inner)) = (c.ranks.get(split.outer), c.ranks.get(split.inner))
            else {
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!("split of `{}` names a rank that does not exist", rank.name),
                    rank.span,
                ));
                continue;
            };
            if outer.extent.checked_mul(inner.extent) != Some(rank.extent) {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::SplitDoesNotDivide,
                        format!(
                            "split of `{}` ({}) into `{}` ({}) x `{}` ({}) does not cover it",
                            rank.name,
                            rank.extent,
                            outer.name,
                            outer.extent,
                            inner.name,
                            inner.extent
                        ),
                        inner.span,
                    )
                    .with_label("the tile must divide the parent's extent"),
                );
            }
        }
        sane
    }

    /// Checks tensors; false when one is too large (or names a missing rank) to check further.
    fn tensors(&mut self) -> bool {
        let c = self.cascade;
        let mut sane = true;
        for (_, t) in c.tensors.iter() {
            let mut elements: Option<u64> = Some(1);
            for (d, r) in t.ranks.iter().enumerate() {
                let extent = c
                    .ranks
                    .get(*r)
                    .map(|r| r.extent + u64::from(t.iterative == Some(d)));
                elements = elements.zip(extent).and_then(|(n, e)| n.checked_mul(e));
            }
            if elements.is_none() {
                sane = false;
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!("`{}` has more elements than fit in 64 bits, or a dimension over a missing rank", t.name),
                    t.span,
                ));
            }
            if let Some(d) = t.iterative {
                if d >= t.ranks.len() {
                    self.push(Diagnostic::error(
                        DiagnosticKind::Invalid,
                        format!(
                            "`{}` has iterative dimension {d} but only {} ranks",
                            t.name,
                            t.ranks.len()
                        ),
                        t.span,
                    ));
                }
            }
            if t.kind != TensorKind::Temp && t.dtype.is_none() {
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!("`{}` is stored but has no element type", t.name),
                    t.span,
                ));
            }
        }
        sane
    }

    /// Every handle in range, so the remaining checks may index the arenas directly.
    fn handles_valid(&mut self) -> bool {
        let c = self.cascade;
        let rank_ok = |r: &Handle<Rank>| r.index() < c.ranks.len();
        let index_ok = |i: &IndexExpr| i.terms.iter().all(|(_, r)| rank_ok(r));
        let access_ok =
            |a: &Access| a.tensor.index() < c.tensors.len() && a.indices.iter().all(index_ok);
        fn expr_ok(
            e: &Expr,
            access_ok: &dyn Fn(&Access) -> bool,
            index_ok: &dyn Fn(&IndexExpr) -> bool,
        ) -> bool {
            match e {
                Expr::Literal(_) => true,
                Expr::Index(i) => index_ok(i),
                Expr::Access(a) => access_ok(a),
                Expr::Unary(_, a) => expr_ok(a, access_ok, index_ok),
                Expr::Binary(_, a, b) => {
                    expr_ok(a, access_ok, index_ok) && expr_ok(b, access_ok, index_ok)
                }
            }
        }
        let ranks_ok = c.ranks.iter().all(|(_, r)| {
            r.parent.as_ref().is_none_or(rank_ok)
                && r.split
                    .as_ref()
                    .is_none_or(|s| rank_ok(&s.outer) && rank_ok(&s.inner))
        }) && c.tensors.iter().all(|(_, t)| t.ranks.iter().all(rank_ok));
        let mut ok = ranks_ok;
        for (_, e) in c.einsums.iter() {
            let good = access_ok(&e.output)
                && expr_ok(&e.expr, &access_ok, &index_ok)
                && e.reductions.iter().all(|r| rank_ok(&r.rank))
                && e.mask.iter().all(|m| index_ok(&m.lhs) && index_ok(&m.rhs))
                && e.value_mask.iter().all(|v| {
                    expr_ok(&v.lhs, &access_ok, &index_ok) && expr_ok(&v.rhs, &access_ok, &index_ok)
                })
                && e.recurrence.as_ref().is_none_or(|rec| {
                    rank_ok(&rec.rank) && expr_ok(&rec.init, &access_ok, &index_ok)
                });
            if !good {
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    "Einsum refers to a rank or tensor that does not exist",
                    e.span,
                ));
                ok = false;
            }
        }
        if !ranks_ok {
            self.push(Diagnostic::error(
                DiagnosticKind::Invalid,
                "a rank or tensor refers to a rank that does not exist",
                Span::UNKNOWN,
            ));
        }
        ok
    }

    fn assignments(&mut self) {
        let c = self.cascade;
        let mut first: HashMap<Handle<Tensor>, Handle<Einsum>> = HashMap::new();
        for (h, e) in c.einsums.iter() {
            let t = &c.tensors[e.output.tensor];
            if let Some(&prev) = first.get(&e.output.tensor) {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::AssignedTwice,
                        format!("tensor `{}` is assigned twice", t.name),
                        e.output.span,
                    )
                    .with_label("second assignment")
                    .with_related(c.einsums[prev].output.span, "first assigned here")
                    .with_help("every tensor is assigned by exactly one Einsum; give the second one a new name"),
                );
            } else {
                first.insert(e.output.tensor, h);
            }
            if matches!(t.kind, TensorKind::Input | TensorKind::Param) {
                let what = if t.kind == TensorKind::Input {
                    "input"
                } else {
                    "parameter"
                };
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::AssignsInput,
                        format!("{what} `{}` is assigned", t.name),
                        e.output.span,
                    )
                    .with_label(format!("`{}` is supplied by the caller", t.name))
                    .with_related(t.span, "declared here")
                    .with_help("assign a new temporary, or declare the tensor as an `output`"),
                );
            }
        }
        for (h, t) in c.tensors.iter() {
            if t.kind == TensorKind::Output && !first.contains_key(&h) {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::OutputNeverAssigned,
                        format!("output `{}` is never assigned", t.name),
                        t.span,
                    )
                    .with_label("declared here")
                    .with_help(format!("add an Einsum `{}[...] = ...`", t.name)),
                );
            }
        }
        // A temporary read but never assigned (the front end reports an unknown name
        // instead; passes can get here by dropping an Einsum).
        let mut reported: BTreeSet<usize> = BTreeSet::new();
        for (_, e) in c.einsums.iter() {
            let mut reads: Vec<&Access> = Vec::new();
            e.visit_reads(&mut |a| reads.push(a));
            for a in reads {
                let t = &c.tensors[a.tensor];
                if t.kind == TensorKind::Temp
                    && !first.contains_key(&a.tensor)
                    && reported.insert(a.tensor.index())
                {
                    self.push(
                        Diagnostic::error(
                            DiagnosticKind::ReadNeverAssigned,
                            format!("`{}` is read but never assigned", t.name),
                            a.span,
                        )
                        .with_label("read here")
                        .with_help(format!("add an Einsum `{}[...] = ...`", t.name)),
                    );
                }
            }
        }
    }

    /// Whether two ranks walk the same sequence: both declared with the same size symbol
    /// (`rank m: N` and `rank p: N`), or one declared with the other's extent (`rank j: I`
    /// for the tile `i`). Such ranks have equal extents under every binding of the sizes,
    /// so a tensor over one may be read at the other.
    fn same_sequence(&self, a: Handle<Rank>, b: Handle<Rank>) -> bool {
        match (sequence_key(self.cascade, a), sequence_key(self.cascade, b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }

    /// The ranks related to `rank` by splitting: itself, its ancestors and its descendants.
    fn family(&self, rank: Handle<Rank>) -> Vec<Handle<Rank>> {
        let c = self.cascade;
        let mut family = vec![rank];
        // Ancestors; the step bound guards against malformed parent loops.
        let mut r = rank;
        for _ in 0..c.ranks.len() {
            match c.ranks[r].parent {
                Some(p) if !family.contains(&p) => {
                    family.push(p);
                    r = p;
                }
                _ => break,
            }
        }
        let mut stack = vec![rank];
        while let Some(r) = stack.pop() {
            if let Some(s) = &c.ranks[r].split {
                for child in [s.outer, s.inner] {
                    if !family.contains(&child) {
                        family.push(child);
                        stack.push(child);
                    }
                }
            }
        }
        family
    }

    /// The range of each rank inside an Einsum: its full extent, narrowed by mask
    /// conditions that compare the rank alone with a constant; and the bounds that
    /// conditions over several ranks put on their rank combination (`m <= p` bounds
    /// `p - m` below by 0), which narrow any index over the same combination.
    fn rank_intervals(&self, einsum: &Einsum) -> Ranges {
        let c = self.cascade;
        let mut intervals: HashMap<Handle<Rank>, Interval> = c
            .ranks
            .iter()
            .map(|(h, r)| {
                let hi = i64::try_from(r.extent)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(1);
                (h, Interval { lo: 0, hi })
            })
            .collect();
        let mut forms: HashMap<Form, Interval> = HashMap::new();
        let clamp = |v: i128| v.clamp(i64::MIN as i128 / 2, i64::MAX as i128 / 2) as i64;
        for cond in &einsum.mask {
            // Bring to `form + k  op  0`, in i128 so no user constant can overflow.
            let mut terms: Vec<(i128, Handle<Rank>)> = Vec::new();
            let mut add = |c: i128, r: Handle<Rank>| match terms.iter_mut().find(|(_, x)| *x == r) {
                Some(t) => t.0 += c,
                None => terms.push((c, r)),
            };
            cond.lhs.terms.iter().for_each(|(c, r)| add(*c as i128, *r));
            cond.rhs
                .terms
                .iter()
                .for_each(|(c, r)| add(-(*c as i128), *r));
            let k = cond.lhs.constant as i128 - cond.rhs.constant as i128;
            let Some((form, sign)) = canonical_form(terms) else {
                continue;
            };
            if sign.abs() != 1 {
                // `2*m <= 7` would need rounding; such conditions only narrow nothing.
                continue;
            }
            // `sign * form + k op 0`: normalize to `form op' bound`.
            let (op, bound) = if sign == 1 {
                (cond.op, -k)
            } else {
                let flipped = match cond.op {
                    CmpOp::Lt => CmpOp::Gt,
                    CmpOp::Le => CmpOp::Ge,
                    CmpOp::Gt => CmpOp::Lt,
                    CmpOp::Ge => CmpOp::Le,
                    other => other,
                };
                (flipped, k)
            };
            let unbounded = Interval {
                lo: i64::MIN / 2,
                hi: i64::MAX / 2,
            };
            let iv = match form.as_slice() {
                [(1, r)] => match intervals.get_mut(r) {
                    Some(iv) => iv,
                    None => continue,
                },
                _ => forms.entry(form).or_insert(unbounded),
            };
            match op {
                CmpOp::Lt => iv.hi = iv.hi.min(clamp(bound - 1)),
                CmpOp::Le => iv.hi = iv.hi.min(clamp(bound)),
                CmpOp::Gt => iv.lo = iv.lo.max(clamp(bound + 1)),
                CmpOp::Ge => iv.lo = iv.lo.max(clamp(bound)),
                CmpOp::Eq => {
                    iv.lo = iv.lo.max(clamp(bound));
                    iv.hi = iv.hi.min(clamp(bound));
                }
                CmpOp::Ne => {}
            }
        }
        Ranges { intervals, forms }
    }

    /// An interval holding every value `index` takes where the mask holds: the box of its
    /// ranks' intervals, intersected with what conditions over its rank combination allow.
    fn index_range(ranges: &Ranges, index: &IndexExpr) -> Interval {
        let mut lo = 0i128;
        let mut hi = 0i128;
        let mut terms: Vec<(i128, Handle<Rank>)> = Vec::new();
        for (coef, r) in &index.terms {
            let iv = ranges
                .intervals
                .get(r)
                .copied()
                .unwrap_or(Interval { lo: 0, hi: 0 });
            let (a, b) = (*coef as i128 * iv.lo as i128, *coef as i128 * iv.hi as i128);
            lo += a.min(b);
            hi += a.max(b);
            terms.push((*coef as i128, *r));
        }
        if let Some((form, sign)) = canonical_form(terms) {
            if let Some(bound) = ranges.forms.get(&form) {
                // The index's combination is `sign` times the bounded one.
                let (a, b) = (sign * bound.lo as i128, sign * bound.hi as i128);
                let (blo, bhi) = (a.min(b), a.max(b));
                lo = lo.max(blo);
                hi = hi.min(bhi);
            }
        }
        let clamp = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        Interval {
            lo: clamp(lo + index.constant as i128),
            hi: clamp(hi + index.constant as i128),
        }
    }

    fn describe_index(&self, index: &IndexExpr) -> String {
        crate::print::index_to_string(self.cascade, index)
    }

    /// Number of indices, rank families and ranges of one access.
    fn access(&mut self, access: &Access, intervals: &Ranges, empty: bool) {
        let c = self.cascade;
        let t = &c.tensors[access.tensor];
        if access.indices.len() != t.ranks.len() {
            let declared: Vec<&str> = t.ranks.iter().map(|&r| self.rank_name(r)).collect();
            self.push(
                Diagnostic::error(
                    DiagnosticKind::RankMismatch,
                    format!(
                        "`{}` has {} rank{} but is indexed with {}",
                        t.name,
                        t.ranks.len(),
                        if t.ranks.len() == 1 { "" } else { "s" },
                        access.indices.len()
                    ),
                    access.span,
                )
                .with_label(format!("expected `{}[{}]`", t.name, declared.join(", ")))
                .with_related(t.span, "declared here"),
            );
            return;
        }
        for (d, (index, &dim_rank)) in access.indices.iter().zip(&t.ranks).enumerate() {
            // A plain rank must be the dimension's own (or related to it by splitting, or
            // range over the same sequence); an index that computes a position from ranks
            // (`p - m + N - 1`, `t*I + j`) is a deliberate address and only has to stay in
            // range, which is checked below.
            if let Some(r) = index.as_rank() {
                let related = self.family(dim_rank).contains(&r) || self.same_sequence(r, dim_rank);
                if !related {
                    let mentioned = [r];
                    let names: Vec<&str> = mentioned.iter().map(|&r| self.rank_name(r)).collect();
                    self.push(
                        Diagnostic::error(
                            DiagnosticKind::RankMismatch,
                            format!(
                                "index {} of `{}` is over rank `{}`, but that dimension is `{}`",
                                d + 1,
                                t.name,
                                names.join("`, `"),
                                self.rank_name(dim_rank)
                            ),
                            access.span,
                        )
                        .at_index(d)
                        .with_label(format!(
                            "expected `{}`, a rank split from it, or a rank declared over the same size",
                            self.rank_name(dim_rank)
                        ))
                        .with_related(t.span, "declared here"),
                    );
                    continue;
                }
            }
            if empty {
                continue;
            }
            let extent = i64::try_from(c.dim_extent(access.tensor, d)).unwrap_or(i64::MAX);
            let range = Self::index_range(intervals, index);
            if range.lo < 0 || range.hi >= extent {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::OutOfRange,
                        format!("index {} of `{}` is out of range", d + 1, t.name),
                        access.span,
                    )
                    .at_index(d)
                    .with_label(format!(
                        "`{}` takes values {}..={}, but the dimension has positions 0..={}",
                        self.describe_index(index),
                        range.lo,
                        range.hi,
                        extent - 1
                    ))
                    .with_help("add a `where` condition that keeps the index in range, or change the index"),
                );
            }
        }
    }

    fn einsum(&mut self, h: Handle<Einsum>) {
        let c = self.cascade;
        let e = &c.einsums[h];
        let intervals = self.rank_intervals(e);
        // A mask that no point satisfies makes every access vacuous.
        let empty = intervals.intervals.values().any(|iv| iv.lo > iv.hi)
            || intervals.forms.values().any(|iv| iv.lo > iv.hi);
        let out_tensor = &c.tensors[e.output.tensor];

        // The output: plain ranks (or split compositions), each once, plus the next-step
        // index of a recurrence.
        self.access(&e.output, &intervals, empty);
        let mut output_ranks: Vec<Handle<Rank>> = Vec::new();
        for index in &e.output.indices {
            for r in index.ranks() {
                if output_ranks.contains(&r) {
                    self.push(
                        Diagnostic::error(
                            DiagnosticKind::BadIndex,
                            format!(
                                "rank `{}` indexes the output `{}` twice",
                                self.rank_name(r),
                                out_tensor.name
                            ),
                            e.output.span,
                        )
                        .with_label("each output index must be a different rank"),
                    );
                } else {
                    output_ranks.push(r);
                }
            }
        }
        let mut reads: Vec<&Access> = Vec::new();
        e.expr.visit_accesses(&mut |a| reads.push(a));
        for v in &e.value_mask {
            v.visit_accesses(&mut |a| reads.push(a));
        }
        for a in &reads {
            self.access(a, &intervals, empty);
        }

        // Reductions: each reduced rank once, none of them an output index, and every
        // iterated rank either an output index or reduced.
        let mut reduced: Vec<Handle<Rank>> = Vec::new();
        for red in &e.reductions {
            if reduced.contains(&red.rank) {
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!("rank `{}` is reduced twice", self.rank_name(red.rank)),
                    e.span,
                ));
            }
            reduced.push(red.rank);
            if output_ranks.contains(&red.rank) {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::Invalid,
                        format!(
                            "rank `{}` is reduced but also indexes the output `{}`",
                            self.rank_name(red.rank),
                            out_tensor.name
                        ),
                        e.span,
                    )
                    .with_label("a reduced rank disappears from the output"),
                );
            }
        }
        let rec_rank = e.recurrence.as_ref().map(|r| r.rank);
        for r in c.iteration_ranks(h) {
            if !output_ranks.contains(&r) && !reduced.contains(&r) && Some(r) != rec_rank {
                self.push(Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!(
                        "rank `{}` is iterated but neither indexes the output nor is reduced",
                        self.rank_name(r)
                    ),
                    e.span,
                ));
            }
        }

        match &e.recurrence {
            Some(rec) => self.recurrence(e, rec, &reads),
            None => {
                if out_tensor.iterative.is_some() {
                    self.push(
                        Diagnostic::error(
                            DiagnosticKind::Recurrence,
                            format!(
                                "`{}` is a recurrence state but this Einsum is not a recurrence",
                                out_tensor.name
                            ),
                            e.output.span,
                        )
                        .with_label("expected the next step `r + 1` of the iterative rank"),
                    );
                }
            }
        }
    }

    fn recurrence(&mut self, e: &Einsum, rec: &Recurrence, reads: &[&Access]) {
        let c = self.cascade;
        let t = &c.tensors[e.output.tensor];
        let rank = self.rank_name(rec.rank).to_string();
        let next = rec.write_index();
        let (next_text, current_text) = if rec.reverse {
            (rank.clone(), format!("{rank} + 1"))
        } else {
            (format!("{rank} + 1"), rank.clone())
        };
        match t.iterative {
            Some(d) if e.output.indices.get(d) == Some(&next) => {}
            _ => {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::Recurrence,
                        format!(
                            "recurrence over `{rank}` must assign the next step of `{}`",
                            t.name
                        ),
                        e.output.span,
                    )
                    .with_label(format!(
                        "expected an index `{next_text}` along `{}`'s iterative dimension",
                        t.name
                    )),
                );
                return;
            }
        }
        for a in reads {
            if a.tensor == e.output.tensor && !reads_current_step(c, e, a) {
                let d = t.iterative.unwrap_or(0);
                let ahead = a.indices.get(d).is_some_and(|i| {
                    i.mentions(rec.rank)
                        && if rec.reverse {
                            i.constant < 1
                        } else {
                            i.constant > 0
                        }
                });
                let message = if ahead {
                    format!("recurrence `{}` reads its own next step", t.name)
                } else {
                    format!(
                        "recurrence `{}` reads its own state at a step other than the current one",
                        t.name
                    )
                };
                self.push(
                    Diagnostic::error(DiagnosticKind::RecurrenceReadsAhead, message, a.span)
                        .at_index(d)
                        .with_label(format!(
                            "a recurrence may read `{}` only at step `{current_text}`",
                            t.name
                        ))
                        .with_help(format!(
                            "the step being computed is `{next_text}`; read the current state `{}` at `{current_text}`",
                            t.name
                        )),
                );
            }
        }
        let mut init_reads: Vec<&Access> = Vec::new();
        rec.init.visit_accesses(&mut |a| init_reads.push(a));
        let mut mentions_rank = false;
        rec.init
            .visit_indices(&mut |i| mentions_rank |= i.mentions(rec.rank));
        if mentions_rank {
            self.push(
                Diagnostic::error(
                    DiagnosticKind::Recurrence,
                    format!(
                        "the init of `{}` depends on the iterative rank `{rank}`",
                        t.name
                    ),
                    rec.init_span,
                )
                .with_label("the init is step 0: it cannot depend on the step"),
            );
        }
        let intervals = self.rank_intervals(e);
        for a in init_reads {
            if a.tensor == e.output.tensor {
                self.push(
                    Diagnostic::error(
                        DiagnosticKind::Cycle,
                        format!("the init of `{}` reads `{}` itself", t.name, t.name),
                        a.span,
                    )
                    .with_label("step 0 cannot depend on the state"),
                );
            } else {
                self.access(a, &intervals, false);
            }
        }
    }

    /// Dependency cycles, found as strongly connected components, that are not step bodies.
    fn cycles(&mut self) {
        let c = self.cascade;
        let deps = dependencies(c);
        let mut why_not: HashMap<usize, String> = HashMap::new();
        let components: Vec<Vec<usize>> = components(&deps)
            .into_iter()
            .filter(|members| match step_body_of(c, &deps, members) {
                Some(Ok(_)) | None => false,
                Some(Err(reason)) => {
                    why_not.insert(members[0], reason);
                    true
                }
            })
            .collect();
        for mut component in components {
            let self_loop = component.len() == 1
                && deps[component[0]].iter().any(|d| d.index() == component[0]);
            if component.len() < 2 && !self_loop {
                continue;
            }
            component.sort_unstable();
            let first = &c.einsums[Handle::new(component[0])];
            let name_of =
                |i: usize| self.tensor_name(c.einsums[Handle::<Einsum>::new(i)].output.tensor);
            let mut d = if self_loop {
                let name = name_of(component[0]);
                Diagnostic::error(
                    DiagnosticKind::Cycle,
                    format!("`{name}` is computed from itself"),
                    first.span,
                )
                .with_label("reads its own output")
                .with_help(format!(
                    "to advance a state along a rank `r`, assign `{name}[.., r + 1, ..]` from \
                     `{name}[.., r, ..]` and give it an `init`"
                ))
            } else {
                let path = cycle_path(&deps, &component);
                let mut message = format!(
                    "dependency cycle: `{}` reads `{}`",
                    name_of(path[0]),
                    name_of(path[1])
                );
                for &i in &path[2..] {
                    message.push_str(&format!(", which reads `{}`", name_of(i)));
                }
                message.push_str(&format!(", which reads `{}`", name_of(path[0])));
                let has_recurrence = component
                    .iter()
                    .any(|&i| c.einsums[Handle::<Einsum>::new(i)].recurrence.is_some());
                let help = match why_not.get(&component[0]) {
                    Some(reason) if has_recurrence => format!(
                        "Einsums may depend on each other in a cycle only as the steps of a \
                         recurrence, reading its state at the current step; here {reason}"
                    ),
                    _ => "Einsums may depend on each other in a cycle only through a recurrence \
                          reading its current state"
                        .to_string(),
                };
                Diagnostic::error(DiagnosticKind::Cycle, message, first.span)
                    .with_label("this Einsum is part of a cycle")
                    .with_help(help)
            };
            for &i in &component[1..] {
                d = d.with_related(
                    c.einsums[Handle::<Einsum>::new(i)].span,
                    "also in the cycle",
                );
            }
            self.push(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(c: &mut Cascade, name: &str, extent: u64) -> Handle<Rank> {
        c.ranks.append(Rank {
            name: name.into(),
            extent,
            source: ExtentSource::Literal,
            split: None,
            parent: None,
            span: Span::UNKNOWN,
        })
    }

    fn tensor(
        c: &mut Cascade,
        name: &str,
        ranks: Vec<Handle<Rank>>,
        kind: TensorKind,
    ) -> Handle<Tensor> {
        c.tensors.append(Tensor {
            name: name.into(),
            ranks,
            kind,
            dtype: (kind != TensorKind::Temp).then_some(DType::F32),
            iterative: None,
            default: None,
            span: Span::UNKNOWN,
        })
    }

    fn copy(c: &mut Cascade, from: Handle<Tensor>, to: Handle<Tensor>, r: Handle<Rank>) {
        c.einsums.append(Einsum {
            output: Access {
                tensor: to,
                indices: vec![IndexExpr::rank(r)],
                span: Span::UNKNOWN,
            },
            expr: Expr::Access(Access {
                tensor: from,
                indices: vec![IndexExpr::rank(r)],
                span: Span::UNKNOWN,
            }),
            reductions: Vec::new(),
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        });
    }

    #[test]
    fn topological_order_puts_producers_first_and_keeps_program_order() {
        let mut c = Cascade::default();
        let i = rank(&mut c, "i", 3);
        let a = tensor(&mut c, "A", vec![i], TensorKind::Input);
        let t = tensor(&mut c, "T", vec![i], TensorKind::Temp);
        let u = tensor(&mut c, "U", vec![i], TensorKind::Temp);
        let o = tensor(&mut c, "O", vec![i], TensorKind::Output);
        copy(&mut c, u, o, i); // 0: O = U
        copy(&mut c, a, t, i); // 1: T = A
        copy(&mut c, t, u, i); // 2: U = T
        let order: Vec<usize> = topological_order(&c)
            .into_iter()
            .map(|h| h.index())
            .collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert!(validate(&c).is_ok(), "{:?}", check(&c));
    }

    #[test]
    fn dangling_handles_are_reported_not_followed() {
        let mut c = Cascade::default();
        let i = rank(&mut c, "i", 3);
        let a = tensor(&mut c, "A", vec![i], TensorKind::Input);
        let o = tensor(&mut c, "O", vec![i], TensorKind::Output);
        copy(&mut c, a, o, Handle::new(7));
        copy(&mut c, Handle::new(9), o, i);
        let found = validate(&c).unwrap_err();
        assert!(found
            .iter()
            .all(|d| d.kind == DiagnosticKind::Invalid && d.span.is_none()));
        assert_eq!(topological_order(&c).len(), 2);
    }

    #[test]
    fn closest_name_prefers_small_edits_and_case() {
        assert_eq!(closest_name("Kx", ["K", "Q", "V"]), Some("K"));
        assert_eq!(closest_name("k", ["K", "Q"]), Some("K"));
        assert_eq!(closest_name("scale", ["Q", "K"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
