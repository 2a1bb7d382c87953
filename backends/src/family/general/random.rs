//! Random valid cascades, as `.ein` text, for testing lowerings: small ranks (one may be
//! split into tiles), inputs of one to three ranks, parameters, Einsums with element-wise
//! maps, contractions and `sum`/`max`/`min` reductions, masks that never hide a whole
//! reduction, and recurrences along a rank, forward or reverse (read at their final step or
//! step by step).
//!
//! Values stay bounded (maps such as `exp(tanh(x) * 2)`, `x / (1 + x * x)`, `tanh`, `sqrt(x * x +
//! 1)`), so a kernel's f32 arithmetic agrees with the f64 interpreter to well within the
//! checks' tolerance. Every generated text is meant to validate; the tests that use it
//! fail when one does not.

/// A deterministic generator (SplitMix64): the same seed gives the same cascade on every
/// machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A tensor the generator may read: its name and ranks (in declaration order).
#[derive(Clone)]
struct Known {
    name: String,
    ranks: Vec<&'static str>,
}

fn access(t: &Known) -> String {
    format!("{}{}", t.name, bracket(&t.ranks))
}

/// A bounded map of `x`.
fn map(rng: &mut Rng, x: &str) -> String {
    match rng.below(7) {
        // exp of a bounded argument: sums of a few dozen terms stay far inside f32 (an
        // unbounded `exp(x / 4)` of a sum of sums reached 5e59, past f32, on seed 1172).
        0 => format!("exp(tanh({x}) * 2)"),
        1 => format!("tanh({x})"),
        2 => format!("{x} / (1 + {x} * {x})"),
        3 => format!("sqrt({x} * {x} + 1)"),
        4 => format!("log({x} * {x} + 1)"),
        5 => format!("(-{x})"),
        _ => x.to_string(),
    }
}

/// The `.ein` text of random cascade number `seed`.
pub fn random_cascade(seed: u64) -> String {
    let mut rng = Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0x5851_F42D);
    // Ranks: `n` is the sequence (maybe split, maybe a recurrence's rank), the others small.
    let n_tile = *rng.pick(&[2u64, 4]);
    let n = n_tile * (2 + rng.below(4) as u64);
    let split = rng.chance(30);
    let sizes: [(&str, u64); 3] = [
        ("a", 2 + rng.below(5) as u64),
        ("b", 3 + rng.below(6) as u64),
        ("c", 2 + rng.below(4) as u64),
    ];
    let mut text = format!("kernel random_{seed}\n\nsize N = {n}\nrank n: N\n");
    for (r, e) in sizes {
        text.push_str(&format!("rank {r}: {e}\n"));
    }
    if split {
        text.push_str(&format!("split n -> n1, n0: {n_tile}\n"));
    }
    text.push('\n');
    let all: [&'static str; 4] = ["n", "a", "b", "c"];
    let mut known: Vec<Known> = Vec::new();
    for k in 0..1 + rng.below(3) {
        let mut ranks: Vec<&'static str> = all.iter().copied().filter(|_| rng.chance(50)).collect();
        if ranks.is_empty() {
            ranks.push(*rng.pick(&all));
        }
        let name = format!("X{k}");
        let dtype = if rng.chance(60) { "bf16" } else { "f32" };
        text.push_str(&format!("input  {name}[{}]: {dtype}\n", ranks.join(", ")));
        known.push(Known { name, ranks });
    }
    if rng.chance(50) {
        let r = *rng.pick(&["a", "b", "c"]);
        text.push_str(&format!("param  G[{r}]: f32\n"));
        known.push(Known {
            name: "G".into(),
            ranks: vec![r],
        });
    }
    let scale = rng.chance(40);
    if scale {
        text.push_str("param  w: f32 = 0.5\n");
    }
    let mut body = String::new();
    let einsums = 2 + rng.below(3);
    for k in 0..einsums {
        let last = k + 1 == einsums;
        // One or two operands; their ranks are the Einsum's iteration space.
        // The last Einsum mostly reads what came just before, so the output depends on it.
        let x = if last && rng.chance(70) {
            known[known.len() - 1].clone()
        } else {
            rng.pick(&known).clone()
        };
        let y = if rng.chance(60) {
            Some(rng.pick(&known).clone())
        } else {
            None
        };
        let mut space: Vec<&'static str> = x.ranks.clone();
        if let Some(y) = &y {
            for r in &y.ranks {
                if !space.contains(r) {
                    space.push(r);
                }
            }
        }
        // Keep some ranks, reduce the others.
        let mut out: Vec<&'static str> = space.iter().copied().filter(|_| rng.chance(60)).collect();
        if last && out.is_empty() && !space.is_empty() && rng.chance(50) {
            out.push(space[0]);
        }
        let mut reduced: Vec<&'static str> =
            space.iter().copied().filter(|r| !out.contains(r)).collect();
        let mut expr = map(&mut rng, &access(&x));
        if let Some(y) = &y {
            let op = *rng.pick(&["*", "+", "-", "max", "min"]);
            let b = access(y);
            expr = match op {
                "max" | "min" => format!("{op}({expr}, {b})"),
                _ => format!("{expr} {op} {b}"),
            };
        }
        if scale && rng.chance(50) {
            expr = format!("w * ({expr})");
        }
        if rng.chance(20) && space.contains(&"n") {
            // A rank index as a value.
            expr = format!("{expr} + n / N");
        }
        // The last Einsum may reduce the tiles of a split sequence: over `n0`, keeping `n1`.
        if last && split && out.contains(&"n") && rng.chance(50) {
            out.retain(|r| *r != "n");
            out.insert(0, "n1");
            reduced.insert(0, "n0");
        }
        let reduction: String = reduced
            .iter()
            .map(|r| format!("{}[{r}] ", rng.pick(&["sum", "sum", "max", "min"])))
            .collect();
        // A mask that never hides a whole reduction: it keeps index 0 of a reduced rank.
        let mask = match reduced.first() {
            Some(&r) if rng.chance(35) => match out.iter().find(|&&o| o != r && o != "n1") {
                Some(&o) if rng.chance(50) => format!(" where {r} <= {o}"),
                _ => format!(
                    " where {r} < {}",
                    1 + rng.below(sizes_of(&sizes, r, n, n_tile) as usize)
                ),
            },
            _ => String::new(),
        };
        let name = if last {
            "O".to_string()
        } else {
            format!("T{k}")
        };
        let target = if out.is_empty() {
            name.clone()
        } else {
            format!("{name}[{}]", out.join(", "))
        };
        if last {
            let decl = if out.is_empty() {
                "O".to_string()
            } else {
                format!("O[{}]", out.join(", "))
            };
            text.push_str(&format!("output {decl}: f32\n"));
        }
        body.push_str(&format!("{target} = {reduction}({expr}){mask}\n"));
        if !last {
            known.push(Known { name, ranks: out });
        }
        // Sometimes a recurrence along `n` over a tensor that has `n`.
        if !last && rng.chance(35) {
            if let Some(src) = known
                .iter()
                .rev()
                .find(|t| t.ranks.contains(&"n") && t.ranks.len() <= 2)
                .cloned()
            {
                let others: Vec<&'static str> =
                    src.ranks.iter().copied().filter(|r| *r != "n").collect();
                let st = format!("S{k}");
                let idx = |step: &str| {
                    let mut v = vec![step.to_string()];
                    v.extend(others.iter().map(|r| r.to_string()));
                    v.join(", ")
                };
                let decay = *rng.pick(&["0.5", "0.9", "0.25"]);
                // A forward state writes step n + 1 from step n; a reverse one (the adjoint
                // form `einattn grad` writes) writes step n from step n + 1, from `init` at N.
                let reverse = rng.chance(30);
                let (read, write, first, last) = if reverse {
                    ("n + 1", "n", "N", "0")
                } else {
                    ("n", "n + 1", "0", "N")
                };
                let update = match rng.below(3) {
                    0 => format!("{decay} * {st}[{}] + {}", idx(read), access(&src)),
                    1 => format!("max({st}[{}], {})", idx(read), access(&src)),
                    _ => format!("{decay} * tanh({st}[{}]) + {}", idx(read), access(&src)),
                };
                body.push_str(&format!("{st}[{}] = {update}\n", idx(write)));
                body.push_str(&format!("init {st}[{}] = 0\n", idx(first)));
                // Read at the final step, or step by step.
                if rng.chance(50) {
                    let fin = format!("F{k}");
                    body.push_str(&format!(
                        "{fin}{} = {st}[{}]\n",
                        bracket(&others),
                        idx(last)
                    ));
                    known.push(Known {
                        name: fin,
                        ranks: others.clone(),
                    });
                } else {
                    let every = format!("E{k}");
                    let mut ranks = vec!["n"];
                    ranks.extend(others.iter().copied());
                    body.push_str(&format!(
                        "{every}[{}] = {st}[{}]\n",
                        ranks.join(", "),
                        idx(write)
                    ));
                    known.push(Known { name: every, ranks });
                }
            }
        }
    }
    text.push('\n');
    text.push_str(&body);
    text
}

fn bracket(ranks: &[&str]) -> String {
    if ranks.is_empty() {
        String::new()
    } else {
        format!("[{}]", ranks.join(", "))
    }
}

fn sizes_of(sizes: &[(&str, u64); 3], r: &str, n: u64, tile: u64) -> u64 {
    match r {
        "n" => n,
        "n0" => tile,
        "n1" => n / tile,
        _ => sizes
            .iter()
            .find(|(name, _)| *name == r)
            .map_or(n, |(_, e)| *e),
    }
}
