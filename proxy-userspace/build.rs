//! Builds the eBPF object with aya-build and leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("proxy-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().context("proxy-ebpf has no directory")?.as_str().to_owned();
    // Build with the toolchain that runs this build (pinned by rust-toolchain.toml); it is a stable
    // toolchain, so `-Z build-std=core` for the bpfel target needs RUSTC_BOOTSTRAP.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.99.1".to_owned());
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    // The kernel programs are built with the same map layout as this side.
    let features: &[&str] =
        if std::env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() { &["layout-test"] } else { &[] };
    aya_build::build_ebpf(
        [Package { name: "proxy-ebpf", root_dir: &root_dir, features, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}
