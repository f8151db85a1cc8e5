//! Test support for ebpf-proxy: the network-namespace testbed and packet helpers.

pub mod apiserver;
pub mod client;
pub mod cluster;
pub mod deploy;
pub mod fuzz;
pub mod k8s;
pub mod packets;
pub mod progbed;
pub mod testbed;
pub mod tools;

use std::path::PathBuf;

/// The `ebpf-proxy` binary of this build (next to the test executable's `deps/` directory).
pub fn proxy_binary() -> PathBuf {
    built_binary("ebpf-proxy", "cargo build -p proxy-userspace")
}

/// The test-only build with another map layout (proxy-common's `layout-test`), for the upgrade test.
pub fn proxy_binary_layout_test() -> PathBuf {
    built_binary("ebpf-proxy-layout-test", "cargo xtask test builds it")
}

fn built_binary(name: &str, how: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    let bin = dir.join(name);
    assert!(bin.is_file(), "{} is missing: build it first ({how}, done by `cargo xtask test`)", bin.display());
    bin
}

/// Moves the calling thread into a new, empty network namespace (freed when the thread ends).
/// BPF_PROG_TEST_RUN runs a tc program as if the packet arrived on the caller's loopback, so the
/// programs' FIB lookups would see the host's routes and forwarding setting; in an empty namespace
/// they find nothing to forward to, and every run gives the same answer on every machine.
pub fn isolate_thread_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) for the test thread");
}
