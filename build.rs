//! Link-time settings of the `edgesync` binary (release builds on Linux with glibc).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
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
