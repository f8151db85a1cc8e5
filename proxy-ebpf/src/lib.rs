//! The kernel programs live in the `proxy-ebpf` binary (src/main.rs); this empty library only lets
//! proxy-userspace's build script depend on the crate so cargo rebuilds the object when it changes.
#![no_std]
