//! Every example parses, lowers and validates; printing it gives text that parses back to
//! the same IR; the printed IR of each is snapshotted.

use einattn_ir::print::{print, without_spans};
use std::path::PathBuf;

fn examples() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ein"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn all_examples_compile() {
    let all = examples();
    assert!(
        all.len() >= 8,
        "expected the 8 examples, found {}",
        all.len()
    );
    for (name, source) in &all {
        if let Err(d) = einattn_dsl::compile_source(name, source, &[]) {
            panic!("{name} failed:\n{}", d.render(name, source));
        }
    }
}

#[test]
fn printed_examples_parse_back_to_the_same_ir() {
    for (name, source) in examples() {
        let first = einattn_dsl::compile_source(&name, &source, &[]).unwrap();
        let text = print(&first);
        let second = match einattn_dsl::compile_source(&name, &text, &[]) {
            Ok(c) => c,
            Err(d) => panic!(
                "printed {name} does not compile:\n{}\n{text}",
                d.render(&name, &text)
            ),
        };
        assert_eq!(
            without_spans(&first),
            without_spans(&second),
            "{name}:\n{text}"
        );
        // Printing is a fixed point after one round.
        assert_eq!(print(&second), text);
    }
}

#[test]
fn printed_ir_snapshots() {
    for (name, source) in examples() {
        let cascade = einattn_dsl::compile_source(&name, &source, &[]).unwrap();
        insta::assert_snapshot!(format!("ir_{name}"), print(&cascade));
    }
}
