//! ebpf-proxy's kernel programs. One entry point per attach point; each is a thin wrapper around a
//! `try_*` function whose error is a counted drop reason.
#![no_std]
#![no_main]
// Program entry points and global BPF functions take raw pointers from the kernel, which the
// verifier checks (and the functions check for null where it asks them to).
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod conntrack;
mod fib;
mod icmp;
mod lb;
mod maps;
mod nat;
mod node;
mod packet;
mod pod_source;
mod reject;
mod sctp;
mod service;
mod snat;
mod sock;
mod stats;
mod tcp;
mod verdict;

use packet::{ETH_HLEN, L3_DEVICE};

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

/// tc ingress on the host side of every pod-facing interface: packets leaving a local pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    tc_action(service::try_handle(&ctx, service::Side::Pod, ETH_HLEN))
}

/// tc ingress on the node's external interfaces: Service traffic arriving from outside, and replies
/// from backends on other nodes.
#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    tc_action(service::try_handle(&ctx, service::Side::Netdev, ETH_HLEN))
}

/// [`from_netdev`] for an external interface without a link-layer header (ipip, WireGuard, tun):
/// replies from backends on other nodes arriving decapsulated, Service traffic through a tunnel.
#[classifier]
pub fn from_l3dev(ctx: TcContext) -> i32 {
    tc_action(service::try_handle(&ctx, service::Side::Netdev, L3_DEVICE))
}

/// tc egress on every interface the ingress programs are on: what the node's own stack sends
/// (replies of hostNetwork backends, the kernel's ICMP errors about translated packets).
#[classifier]
pub fn from_node(ctx: TcContext) -> i32 {
    tc_action(service::try_from_node(&ctx, ETH_HLEN))
}

/// [`from_node`] for an interface without a link-layer header.
#[classifier]
pub fn from_node_l3(ctx: TcContext) -> i32 {
    tc_action(service::try_from_node(&ctx, L3_DEVICE))
}

/// The benchmarks' baseline: the same packet parsing as the Service programs, then pass. What a
/// packet costs in `from_pod` beyond this is the cost of the Service datapath itself. Never attached.
#[classifier]
pub fn parse_only(ctx: TcContext) -> i32 {
    tc_action(packet::parse(&ctx, ETH_HLEN).map(|_| aya_ebpf::bindings::TC_ACT_OK))
}

/// A tc program's return value: the action, or a drop counted under its reason.
#[inline(always)]
fn tc_action(result: Result<i32, u32>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            TC_ACT_SHOT
        }
    }
}

/// cgroup connect4: TCP connect() and UDP connect() to a Service address go straight to a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    sock::connect(&ctx)
}

/// cgroup sendmsg4: unconnected UDP sendmsg() to a Service address.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::sendmsg(&ctx)
}

/// cgroup recvmsg4: UDP replies appear to come from the Service address.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup getpeername4: a connected UDP socket's peer is the Service address.
#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}
