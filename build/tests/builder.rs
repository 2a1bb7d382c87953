//! einattn-build as a build script uses it: errors a person can act on, the files it writes
//! and announces, and generated modules that are Rust.
//!
//! The golden module (`tests/generated/attention_causal.rs`) is rewritten by
//! `EINATTN_BLESS=1 cargo test -p einattn-build`.

use einattn_build::{Builder, Error, Kernel, Target};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    // build/ -> the repository.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn example(name: &str) -> PathBuf {
    root().join("examples").join(name)
}

/// A fresh folder under the target directory for one test's output.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_broken_source_fails_with_its_file_line_column_and_a_caret() {
    let broken = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/broken.ein");
    let err = Builder::new()
        .kernel(&broken)
        .out_dir(scratch_dir("broken"))
        .cargo_metadata(false)
        .compile()
        .err();
    let Some(Error::Compile { path, message }) = err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert_eq!(path, broken);
    // What the CLI prints for the same file: the location, the line, a caret, the hint.
    let location = format!("{}:13:19", broken.display());
    assert!(message.contains("error: unknown tensor `QK2`"), "{message}");
    assert!(
        message.contains(&location),
        "no `{location}` in:\n{message}"
    );
    assert!(message.contains("O[p]     = max[m] QK2[m, p]"), "{message}");
    assert!(message.contains("^^^"), "{message}");
    assert!(message.contains("did you mean `QK`?"), "{message}");
    // Nothing was written for a failed build.
    assert!(!scratch_dir("broken").join("einattn_kernels.rs").exists());
}

#[test]
fn a_refused_cascade_fails_the_build_at_the_line_that_cannot_be_kept() {
    // Every valid cascade compiles (the general lowering is the last family), but not at
    // every size: at these sizes rmsnorm_gemm's normalized activations alone take 256 GiB.
    let err = Builder::new()
        .kernel(example("rmsnorm_gemm.ein"))
        .define("T", 1 << 20)
        .define("D", 1 << 16)
        .cargo_metadata(false)
        .render()
        .err();
    let Some(Error::Compile { message, .. }) = err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert!(message.contains("rmsnorm_gemm.ein:19:1"), "{message}");
    assert!(message.contains("over its 32 GiB limit"), "{message}");
}

#[test]
fn a_missing_file_and_a_bad_setup_are_errors_not_panics() {
    let missing = Builder::new()
        .kernel("no/such/file.ein")
        .cargo_metadata(false)
        .render();
    assert!(
        matches!(&missing, Err(Error::Io { what: "read", .. })),
        "{missing:?}"
    );
    assert!(missing
        .err()
        .is_some_and(|e| e.to_string().contains("no/such/file.ein")));
    assert!(matches!(Builder::new().render(), Err(Error::Config(_))));
    let twice = Builder::new()
        .kernel(example("lightning.ein"))
        .kernel(example("lightning.ein"))
        .cargo_metadata(false)
        .render();
    assert!(
        twice
            .as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("both generate the type `Lightning`")),
        "{twice:?}"
    );
    let bad_name = Builder::new()
        .add_kernel(Kernel::new(example("lightning.ein")).name("lightning"))
        .cargo_metadata(false)
        .render();
    assert!(matches!(bad_name, Err(Error::Config(_))));
    let bad_strategy = Builder::new()
        .add_kernel(Kernel::new(example("lightning.ein")).strategy("sideways"))
        .cargo_metadata(false)
        .render();
    assert!(
        matches!(bad_strategy, Err(Error::Compile { .. })),
        "{bad_strategy:?}"
    );
}

#[test]
fn compile_writes_the_module_and_every_ptx_it_embeds() {
    let dir = scratch_dir("written");
    let generated = Builder::new()
        .add_kernel(
            Kernel::new(example("lightning.ein"))
                .name("LightningChunked")
                .define("N", 2048)
                .strategy("chunked"),
        )
        .kernel(example("attention_causal.ein"))
        .define("D", 128)
        .target(Target::Sm90a)
        .out_dir(&dir)
        .cargo_metadata(false)
        .compile()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(generated.module, dir.join("einattn_kernels.rs"));
    assert_eq!(
        generated.types,
        vec![
            "LightningChunked".to_string(),
            "AttentionCausal".to_string()
        ]
    );
    assert_eq!(
        generated.files_read,
        vec![example("lightning.ein"), example("attention_causal.ein")]
    );
    // Two kernels for the chunked strategy, one for softmax attention.
    assert_eq!(generated.ptx.len(), 3);
    let module = std::fs::read_to_string(&generated.module).unwrap_or_default();
    for ptx in &generated.ptx {
        let name = ptx.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            module.contains(&format!("include_str!(\"{name}\")")),
            "the module does not embed {name}"
        );
        let text = std::fs::read_to_string(ptx).unwrap_or_default();
        assert!(text.contains(".target sm_90a"), "{name} is not sm_90a");
    }
    // The builder's define reached both kernels; the kernel's own N only lightning.
    assert!(module.contains(
        "pub const DEFINES: &'static [(&'static str, u64)] = &[(\"D\", 128), (\"N\", 2048)];"
    ));
    assert!(module.contains("pub const DEFINES: &'static [(&'static str, u64)] = &[(\"D\", 128)];"));
    // sm_90a PTX runs on compute capability 9.0 only, and `load` says so.
    assert!(module.contains("if (major, minor) != (9, 0) {"));
    syn::parse_file(&module).unwrap_or_else(|e| panic!("not Rust: {e}"));
}

/// Every example that compiles at its default sizes gets a module that parses as Rust and
/// takes one device slice per tensor its contracts name.
#[test]
fn every_example_that_compiles_generates_rust() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "ein"))
                .collect()
        })
        .unwrap_or_default();
    examples.sort();
    let mut generated = Vec::new();
    for path in &examples {
        let rendered = match Builder::new().kernel(path).cargo_metadata(false).render() {
            Ok(r) => r,
            // A cascade no family reads is refused with diagnostics, which other tests
            // cover; here only what compiles matters.
            Err(Error::Compile { .. }) => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let file = syn::parse_file(&rendered.module)
            .unwrap_or_else(|e| panic!("{}: the module is not Rust: {e}", path.display()));
        let type_name = &rendered.types[0];
        let has_type = file
            .items
            .iter()
            .any(|item| matches!(item, syn::Item::Struct(s) if s.ident == type_name.as_str()));
        assert!(has_type, "{}: no `struct {type_name}`", path.display());
        assert!(rendered.module.contains("pub fn launch("));
        generated.push(path.file_name().map(|n| n.to_string_lossy().into_owned()));
    }
    // The softmax and linear families each read several examples.
    for must in [
        "attention_causal.ein",
        "attention_1pass.ein",
        "lightning.ein",
        "gated_linear.ein",
    ] {
        assert!(
            generated.iter().flatten().any(|g| g == must),
            "{must} did not generate: {generated:?}"
        );
    }
}

/// One generated module as text: what a user reads in `OUT_DIR`.
#[test]
fn the_attention_causal_module_reads_as_blessed() {
    let rendered = Builder::new()
        .kernel("../examples/attention_causal.ein")
        .define("D", 128)
        .define("N", 512)
        .cargo_metadata(false)
        .render()
        .unwrap_or_else(|e| panic!("{e}"));
    let expected =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/generated/attention_causal.rs");
    if std::env::var_os("EINATTN_BLESS").is_some() {
        let _ = std::fs::create_dir_all(expected.parent().unwrap_or(Path::new(".")));
        std::fs::write(&expected, &rendered.module).unwrap_or_else(|e| panic!("{e}"));
        return;
    }
    let want = std::fs::read_to_string(&expected).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); bless it with EINATTN_BLESS=1",
            expected.display()
        )
    });
    if rendered.module != want {
        let at = rendered
            .module
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(0);
        panic!(
            "the generated module differs from {} at line {} (EINATTN_BLESS=1 rewrites it):\n  expected: {}\n  got:      {}",
            expected.display(),
            at + 1,
            want.lines().nth(at).unwrap_or("<end>"),
            rendered.module.lines().nth(at).unwrap_or("<end>")
        );
    }
}
