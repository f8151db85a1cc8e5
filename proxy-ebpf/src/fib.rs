//! Forwarding a translated packet ourselves when the stack would refuse it. After source NAT, and
//! after restoring a NodePort reply, the packet's source is one of this node's addresses; arriving on
//! an interface with a local source it is a "martian" and the kernel drops it (unless accept_local is
//! set, which we do not want to require of a node). So such packets skip the input path: a FIB lookup
//! for the rewritten addresses, then `bpf_redirect_neigh` to the next hop, which resolves the
//! neighbour as the stack's own output would.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

const AF_INET: u8 = 2;

/// Sends the packet (already rewritten to `saddr` → `daddr`) towards `daddr` from the egress side.
/// When the FIB has no forwarding answer (local destination, no route), the packet goes up the
/// stack as usual.
#[inline(always)]
pub fn redirect_as_node(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32) -> i32 {
    epx_redirect_as_node(ctx.as_ptr().cast(), u32::from(proto), saddr, daddr)
}

/// [`redirect_as_node`] as a global BPF function: verified once, and the lookup's parameters live on
/// its own stack, not on the caller's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_redirect_as_node(skb: *mut __sk_buff, proto: u32, saddr: u32, daddr: u32) -> i32 {
    let Some(skb) = core::ptr::NonNull::new(skb) else { return TC_ACT_OK };
    lookup_and_redirect(&TcContext::new(skb), proto as u8, saddr, daddr)
}

#[inline(always)]
fn lookup_and_redirect(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32) -> i32 {
    // SAFETY: both are plain C structs for which all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // No flags: a plain route lookup (no source validation), MTU not checked (tot_len 0).
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &raw mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    // The lookup left the next hop (the gateway, or the destination itself) in ipv4_dst.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
    unsafe { bpf_redirect_neigh(params.ifindex, &raw mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
}
