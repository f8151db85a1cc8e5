//! Forwarding a translated packet ourselves when the stack would refuse it. After source NAT, and
//! after restoring a NodePort reply, the packet's source is one of this node's addresses; arriving on
//! an interface with a local source it is a "martian" and the kernel drops it (unless accept_local is
//! set, which we do not want to require of a node). So such packets skip the input path: a FIB lookup
//! for the rewritten addresses, then `bpf_redirect_neigh` to the next hop, which resolves the
//! neighbour as the stack's own output would. Skipping the stack also skips its MTU check, so the
//! route tells whether the packet fits the egress device (GSO segments included).
//!
//! A translated packet for the node itself (a reply to one of the node's own connections, restored
//! to come from a Service address; a REJECT answering the node) must not meet the input path either:
//! strict rp_filter drops a ClusterIP source arriving on a pod's interface, and a source that is one
//! of the node's addresses (its own NodePort) is a martian anywhere. It is delivered through the
//! loopback device instead, by `bpf_redirect_neigh` without a next hop: the kernel routes it (a local
//! route) and the loopback device hands it to the input path with that route attached, so no route
//! lookup and no source validation happen on the way in — as for any packet the node sends itself.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};

use crate::packet::ETH_HLEN;

const AF_INET: u8 = 2;
const ETH_P_IP: u16 = 0x0800;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Where a packet leaving as `saddr → daddr` is forwarded.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Route {
    /// 0: not forwarded by us — no forwarding answer (a local destination, no route) or not asked:
    /// the packet goes up the stack.
    pub ifindex: u32,
    /// The next hop (the gateway, or the destination itself).
    pub nexthop: u32,
    /// The egress device's MTU when the packet does not fit it; 0 when it fits.
    pub too_big_for_mtu: u32,
    /// 1: the destination is the node itself (delivered through the loopback device). Set by the
    /// caller, who knows it (the FIB's "not forwarded" is also its answer for no route at all).
    pub local: u32,
}

impl Route {
    /// The route of a packet for the node itself.
    pub const LOCAL: Route = Route { ifindex: 0, nexthop: 0, too_big_for_mtu: 0, local: 1 };
}

/// The route for the packet, once rewritten to `saddr → daddr`.
#[inline(always)]
pub fn route(ctx: &TcContext, proto: u8, saddr: u32, daddr: u32) -> Route {
    let mut route = Route::default();
    epx_route(ctx.as_ptr().cast(), u32::from(proto), saddr, daddr, &mut route);
    route
}

/// Sends the packet (already rewritten; its IP header at `l3_off`) along `route`: to the next hop,
/// to the node's own input path through loopback when it is for the node, or on its way unchanged
/// (up the stack at ingress, out of the device at egress) when there is no route.
#[inline(always)]
pub fn redirect(ctx: &TcContext, l3_off: u8, route: &Route) -> i32 {
    if route.local != 0 {
        return deliver_local(ctx, l3_off);
    }
    if route.ifindex == 0 {
        return TC_ACT_OK;
    }
    epx_redirect(ctx.as_ptr().cast(), route.ifindex, route.nexthop, u32::from(l3_off))
}

/// Hands a packet for the node itself to its input path through the loopback device, with its
/// local route attached (see the module header). Inline, not through [`epx_redirect`]: it is the
/// last step of the answer paths, whose frames are deep already.
#[inline(always)]
pub fn deliver_local(ctx: &TcContext, l3_off: u8) -> i32 {
    if l3_off == 0 && push_blank_link_header(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    unsafe { bpf_redirect_neigh(LOOPBACK_IFINDEX, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Puts a blank Ethernet header (addresses zero, type IPv4) in front of a packet from an L3 device:
/// the redirect helper works on frames with a link-layer header, and fills in the addresses (or
/// strips it again for an L3 egress device).
#[inline(always)]
fn push_blank_link_header(ctx: &TcContext) -> Result<(), i64> {
    if unsafe { bpf_skb_change_head(ctx.as_ptr().cast(), ETH_HLEN as u32, 0) } != 0 {
        return Err(-1);
    }
    let mut eth = [0u8; ETH_HLEN];
    eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    ctx.store(0, &eth, 0)
}

/// Sends a packet (already rewritten to `saddr` → `daddr`) towards `daddr` from the egress side,
/// whatever its size (for the datapath's own small ICMP errors).
#[inline(always)]
pub fn redirect_as_node(ctx: &TcContext, l3_off: u8, proto: u8, saddr: u32, daddr: u32) -> i32 {
    redirect(ctx, l3_off, &route(ctx, proto, saddr, daddr))
}

/// [`route`] as a global BPF function: verified once, and the lookup's parameters live on its own
/// stack, not on the caller's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_route(skb: *mut __sk_buff, proto: u32, saddr: u32, daddr: u32, out: *mut Route) -> i32 {
    let (Some(skb), Some(mut out)) = (core::ptr::NonNull::new(skb), core::ptr::NonNull::new(out)) else { return 0 };
    // SAFETY: checked non-null; the caller's own stack value.
    let out = unsafe { out.as_mut() };
    let ctx = TcContext::new(skb);
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto as u8;
    params.ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // A plain route lookup (no source validation); the MTU is checked below, GSO-aware.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &raw mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return 0;
    }
    out.ifindex = params.ifindex;
    // The lookup left the next hop in ipv4_dst.
    out.nexthop = unsafe { params.__bindgen_anon_4.ipv4_dst };
    let mut mtu: u32 = 0;
    let fits = unsafe { bpf_check_mtu(ctx.as_ptr(), params.ifindex, &raw mut mtu, 0, BPF_MTU_CHK_SEGS as u64) };
    if fits != BPF_MTU_CHK_RET_SUCCESS as i64 {
        out.too_big_for_mtu = mtu.max(1);
    }
    1
}

/// `bpf_redirect_neigh` to `nexthop` on `ifindex`, as a global function (its parameters on its own
/// stack). A packet from an L3 device (`l3_off` 0) first gets a blank Ethernet header.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_redirect(skb: *mut __sk_buff, ifindex: u32, nexthop: u32, l3_off: u32) -> i32 {
    let Some(skb) = core::ptr::NonNull::new(skb) else { return TC_ACT_OK };
    if l3_off == 0 && push_blank_link_header(&TcContext::new(skb)).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = nexthop;
    unsafe { bpf_redirect_neigh(ifindex, &raw mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
}
