fn main() {
    // Generates the LR(1) parser for src/grammar.lalrpop into OUT_DIR (and prints the
    // rerun-if-changed line for it).
    if let Err(err) = lalrpop::Configuration::new()
        .use_cargo_dir_conventions()
        .emit_rerun_directives(true)
        .process()
    {
        panic!("the grammar failed to compile: {err}");
    }
}
