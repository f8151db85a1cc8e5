//! The eBPF object is linked by bpf-linker; say so clearly instead of failing deep inside rustc.
fn main() {
    println!("cargo::rerun-if-env-changed=PATH");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") && which::which("bpf-linker").is_err() {
        panic!(
            "bpf-linker is not on PATH: run scripts/setup.sh (it builds bpf-linker against the pinned toolchain's LLVM)"
        );
    }
}
