//! What a build is (its commit and the commit's date, for `edgesync version`), and link-time
//! settings of the `edgesync` binary (release builds on Linux with glibc).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    describe_commit();
    println!("cargo:rerun-if-changed=link/edge-symbols.order");
    println!("cargo:rerun-if-env-changed=EDGESYNC_PLAIN_LINK");
    let var = |name| std::env::var(name).unwrap_or_default();
    let gnu_linux = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if !gnu_linux || var("PROFILE") != "release" || !var("EDGESYNC_PLAIN_LINK").is_empty() {
        return;
    }
    // Relative relocations packed as a bitmap (DT_RELR, glibc 2.36 and later): the
    // loader reads a few KiB at start instead of about 600 KiB of relocation entries,
    // which would stay resident for the life of every edge process.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // The functions an edge runs, placed together (see scripts/edge-symbol-order): the
    // kernel maps code in 64 KiB blocks around every page touched, so scattered code
    // keeps nearly the whole binary resident. LLD, Rust's default linker here, reads it.
    if var("TARGET") == "x86_64-unknown-linux-gnu" {
        let order = format!("{}/link/edge-symbols.order", var("CARGO_MANIFEST_DIR"));
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Sets `EDGESYNC_COMMIT` and `EDGESYNC_COMMIT_DATE` from the checkout's HEAD ("unknown"
/// outside a git checkout). The date is the commit's, so a build is reproducible.
fn describe_commit() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&dir)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let unknown = || "unknown".to_string();
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(unknown);
    let date = git(&["show", "-s", "--format=%cI", "HEAD"]).unwrap_or_else(unknown);
    println!("cargo:rustc-env=EDGESYNC_COMMIT={commit}");
    println!("cargo:rustc-env=EDGESYNC_COMMIT_DATE={date}");
    // Described again when HEAD moves: a commit, a checkout, a fetch.
    let dirs = ["--git-dir", "--git-common-dir"]
        .map(|which| git(&["rev-parse", "--path-format=absolute", which]));
    for dir in dirs.into_iter().flatten() {
        for name in ["HEAD", "refs/heads", "packed-refs"] {
            let path = std::path::Path::new(&dir).join(name);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
