//! Writes random valid cascades (`einattn_backends::family::general::random`) as `.ein`
//! files, for checking kernels on a GPU: `random_cascades DIR FIRST COUNT`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), first, count) = (
        args.get(1),
        args.get(2).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0),
        args.get(3)
            .and_then(|a| a.parse::<u64>().ok())
            .unwrap_or(200),
    ) else {
        eprintln!("usage: random_cascades DIR [FIRST] [COUNT]");
        std::process::exit(2);
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("error: cannot create `{dir}`: {e}");
        std::process::exit(1);
    }
    for seed in first..first.saturating_add(count) {
        let path = std::path::Path::new(dir).join(format!("random_{seed}.ein"));
        if let Err(e) = std::fs::write(
            &path,
            einattn_backends::family::general::random::random_cascade(seed),
        ) {
            eprintln!("error: cannot write `{}`: {e}", path.display());
            std::process::exit(1);
        }
    }
}
