//! What a test measured, for RELIABILITY.md's generated results (hack/gen-reliability.py): one
//! `test<TAB>figure` line appended to `KATA_FIGURES_FILE` (set by hack/test.sh), also printed.

use std::io::Write;

/// Records `figure` as measured by `test` (a no-op file-wise without `KATA_FIGURES_FILE`).
pub fn record(test: &str, figure: impl std::fmt::Display) {
    let line = format!("{test}\t{figure}");
    eprintln!("figure: {line}");
    let Some(path) = std::env::var_os("KATA_FIGURES_FILE") else {
        return;
    };
    // One write of one line with O_APPEND: lines of parallel tests never interleave.
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "could not record the figure in {}: {e}",
            path.to_string_lossy()
        );
    }
}
