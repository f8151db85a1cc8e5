//! Test support for ebpf-proxy: the network-namespace testbed and packet helpers.

pub mod packets;
pub mod testbed;

use std::path::PathBuf;

/// The `ebpf-proxy` binary of this build (next to the test executable's `deps/` directory).
pub fn proxy_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    let bin = dir.join("ebpf-proxy");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p proxy-userspace`, done by `cargo xtask test`)",
        bin.display()
    );
    bin
}
