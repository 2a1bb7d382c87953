//! The front end never panics: random bytes, random token sequences and random edits of
//! the examples all give either a cascade or diagnostics whose spans lie in the source.

use einattn_dsl::{compile_source, Diagnostics};
use proptest::prelude::*;

const VOCABULARY: &[&str] = &[
    "kernel",
    "size",
    "rank",
    "split",
    "input",
    "output",
    "param",
    "init",
    "where",
    "and",
    "inf",
    "m",
    "m1",
    "m0",
    "p",
    "e",
    "M",
    "M1",
    "N",
    "Q",
    "K",
    "O",
    "RM",
    "max",
    "sum",
    "sub",
    "exp",
    "neg",
    "f32",
    "bf16",
    "0",
    "1",
    "2",
    "64",
    "1.5",
    "1e30",
    "99999999999999999999",
    "9223372036854775807",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    "=",
    "->",
    "+",
    "-",
    "*",
    "/",
    "<",
    "<=",
    ">",
    ">=",
    "==",
    "!=",
    ";",
    "\n",
    "#",
    "@",
];

fn examples() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "ein"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Compiles, and checks the result is well formed either way.
fn check(source: &str, defines: &[(String, u64)]) {
    match compile_source("fuzz.ein", source, defines) {
        Ok(cascade) => {
            // A valid cascade prints to text that compiles again.
            let text = einattn_ir::print::print(&cascade);
            if let Err(d) = compile_source("printed.ein", &text, &[]) {
                panic!(
                    "printed cascade does not compile:\n{}\n{text}\nfrom:\n{source}",
                    d.render("printed.ein", &text)
                );
            }
        }
        Err(diagnostics) => check_diagnostics(source, &diagnostics),
    }
}

fn check_diagnostics(source: &str, diagnostics: &Diagnostics) {
    assert!(!diagnostics.is_empty());
    for d in diagnostics.iter() {
        if let Some(span) = d.span {
            assert!(span.start <= span.end, "{d:?}");
            assert!(span.end as usize <= source.len(), "{d:?} in {source:?}");
        }
        for (span, _) in &d.related {
            assert!(span.end as usize <= source.len(), "{d:?}");
        }
    }
    let rendered = diagnostics.render("fuzz.ein", source);
    assert!(rendered.contains("error"), "{rendered}");
    let _ = diagnostics.locations(source);
}

fn tokens() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(VOCABULARY), 0..60).prop_map(|t| t.join(" "))
}

proptest! {
    // 256 cases by default; set PROPTEST_CASES to search longer.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let source = String::from_utf8_lossy(&bytes).to_string();
        check(&source, &[]);
    }

    #[test]
    fn random_token_sequences_never_panic(body in tokens()) {
        check(&body, &[]);
        check(&format!("kernel k\nrank m: 4\nrank p: 4\ninput Q[p, m]: f32\n{body}"), &[]);
    }

    #[test]
    fn edited_examples_never_panic(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop::sample::select(VOCABULARY), 0u8..3),
            1..4,
        ),
    ) {
        let all = examples();
        prop_assume!(!all.is_empty());
        let source = which.get(&all);
        let mut pieces: Vec<String> = source.split(' ').map(str::to_string).collect();
        for (at, token, action) in edits {
            let i = at.index(pieces.len());
            match action {
                0 => pieces[i] = token.to_string(),
                1 => { pieces.remove(i); }
                _ => pieces.insert(i, token.to_string()),
            }
            if pieces.is_empty() {
                pieces.push(String::new());
            }
        }
        check(&pieces.join(" "), &[]);
    }

    #[test]
    fn any_define_values_never_panic(
        which in any::<prop::sample::Index>(),
        value in prop_oneof![Just(0u64), Just(1), Just(3), Just(1000), Just(u64::MAX), Just(1 << 41), any::<u64>()],
        name in prop::sample::select(&["M", "N", "D", "TILE", "BLOCK", "W", "H", "X"][..]),
    ) {
        let all = examples();
        prop_assume!(!all.is_empty());
        let source = which.get(&all);
        match compile_source("fuzz.ein", source, &[(name.to_string(), value)]) {
            Ok(_) => {}
            Err(d) => check_diagnostics(source, &d),
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!(
        "kernel k\nrank m: 4\ninput A[m]: f32\noutput O[m]: f32\nO[m] = {}A[m]{}\n",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    assert!(compile_source("deep.ein", &deep, &[]).is_err());
    let long = format!(
        "kernel k\nrank m: 4\ninput A[m]: f32\noutput O[m]: f32\nO[m] = A[m]{}\n",
        " + A[m]".repeat(3000)
    );
    assert!(compile_source("long.ein", &long, &[]).is_err());
    let minus = format!(
        "kernel k\nrank m: 4\ninput A[m]: f32\noutput O[m]: f32\nO[m] = {}A[m]\n",
        "-".repeat(5000)
    );
    assert!(compile_source("minus.ein", &minus, &[]).is_err());
}
