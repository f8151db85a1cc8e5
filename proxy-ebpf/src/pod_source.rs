//! A local pod's Service traffic must carry the pod's own source. The kernel's reverse-path filter
//! cannot be relied on for it: translated packets that are redirected skip the input path, and a
//! packet whose source the datapath rewrites is judged by its new source. A pod with CAP_NET_RAW could
//! otherwise inject datagrams into another client's connection (a masqueraded flow to a node port
//! names only a backend and a port), or open connections — and write session affinity — in another
//! client's name. So on a registered pod interface (`POD_IFACES`):
//! - a new connection (or a REJECT answer) needs a source that routes back through the interface, as
//!   rp_filter's strict mode asks;
//! - a connection remembers the interfaces its first packet and its first reply came in on, and a
//!   pod's packets of that connection are accepted only on those.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use proxy_common::{CtEntry, STAT_DROP_POD_REPLY_SPOOFED, STAT_DROP_POD_SOURCE_SPOOFED};

use crate::{maps::POD_IFACES, packet::Packet};

const AF_INET: u8 = 2;

/// The interface the packet arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the program's context is a valid __sk_buff.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

/// For a packet that opens a connection or is answered by the datapath: from a pod interface, the
/// source must route back through it.
#[inline(always)]
pub fn check_new(ctx: &TcContext, pkt: &Packet) -> Result<(), u32> {
    let ifindex = ingress_ifindex(ctx);
    if POD_IFACES.get_ptr(&ifindex).is_none() || epx_routes_back(ctx.as_ptr().cast(), ifindex, pkt.saddr) == 1 {
        Ok(())
    } else {
        Err(STAT_DROP_POD_SOURCE_SPOOFED)
    }
}

/// For a packet in a connection's original direction: from a pod interface, only on the one the
/// connection came in on.
#[inline(always)]
pub fn check_orig(ctx: &TcContext, entry: &CtEntry) -> Result<(), u32> {
    let ifindex = ingress_ifindex(ctx);
    if entry.orig_ifindex == ifindex || POD_IFACES.get_ptr(&ifindex).is_none() {
        Ok(())
    } else {
        Err(STAT_DROP_POD_SOURCE_SPOOFED)
    }
}

/// For a reply: from a pod interface, only on the one the connection's replies come in on; the first
/// reply (which decides that interface) only from an address that routes back through it.
#[inline(always)]
pub fn check_reply(ctx: &TcContext, entry: &mut CtEntry, saddr: u32) -> Result<(), u32> {
    let ifindex = ingress_ifindex(ctx);
    if entry.reply_ifindex == ifindex {
        return Ok(());
    }
    let from_pod = POD_IFACES.get_ptr(&ifindex).is_some();
    if entry.reply_ifindex != 0 {
        return if from_pod { Err(STAT_DROP_POD_REPLY_SPOOFED) } else { Ok(()) };
    }
    if from_pod && epx_routes_back(ctx.as_ptr().cast(), ifindex, saddr) != 1 {
        return Err(STAT_DROP_POD_REPLY_SPOOFED);
    }
    entry.reply_ifindex = ifindex;
    Ok(())
}

/// Whether the route to `addr` leaves through the pod interface `ifindex`, or through the bridge it
/// is a port of: 1 if so. A global BPF function: the lookup's parameters live on its own stack.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_routes_back(skb: *mut __sk_buff, ifindex: u32, addr: u32) -> i32 {
    let Some(skb) = core::ptr::NonNull::new(skb) else { return 0 };
    let Some(iface) = POD_IFACES.get_ptr(&ifindex) else { return 0 };
    let master = unsafe { (*iface).master_ifindex };
    let ctx = TcContext::new(skb);
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ifindex;
    params.__bindgen_anon_4.ipv4_dst = addr;
    // The route as the input path would take it for a packet to `addr` arriving on the interface:
    // rp_filter's question. The neighbour does not matter.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    let out = params.ifindex;
    i32::from(rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && (out == ifindex || (master != 0 && out == master)))
}
