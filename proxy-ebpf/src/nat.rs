//! Address and port rewriting with incremental checksum updates (IPv4 header, TCP/UDP pseudo-header).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{PROTO_SCTP, PROTO_UDP, STAT_DROP_REWRITE};

use crate::packet::{FRAG_LATER, Packet};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `pkt` to `addr:port`.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, end: End, addr: u32, port: u16) -> Result<(), u32> {
    let end = match end {
        End::Source => 0,
        End::Destination => 1,
    };
    match epx_rewrite(ctx.as_ptr().cast(), pkt, end, addr, u32::from(port)) {
        0 => Ok(()),
        _ => Err(STAT_DROP_REWRITE),
    }
}

/// [`rewrite`] as a global BPF function: its branches (per protocol, per checksum) are verified once
/// rather than multiplied into every path that translates a packet. Returns 0, or 1 on failure.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_rewrite(skb: *mut __sk_buff, pkt: *const Packet, end: u32, addr: u32, port: u32) -> i32 {
    let (Some(skb), false) = (core::ptr::NonNull::new(skb), pkt.is_null()) else { return 1 };
    let end = if end == 0 { End::Source } else { End::Destination };
    // SAFETY: checked non-null; the caller's own stack value.
    match rewrite_in_place(&TcContext::new(skb), unsafe { &*pkt }, end, addr, port as u16) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[inline(always)]
fn rewrite_in_place(ctx: &TcContext, pkt: &Packet, end: End, addr: u32, port: u16) -> Result<(), u32> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (pkt.saddr, pkt.sport, pkt.ip_saddr_off(), pkt.l4_off),
        End::Destination => (pkt.daddr, pkt.dport, pkt.ip_daddr_off(), pkt.l4_off + 2),
    };
    // UDP: a zero checksum means "none" and must stay zero; a computed zero is sent as 0xffff.
    let mangled = if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if let Some(csum_off) = pkt.l4_csum_off() {
        if old_addr != addr {
            ctx.l4_csum_replace(csum_off, old_addr as u64, addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
                .map_err(|_| STAT_DROP_REWRITE)?;
        }
        if old_port != port {
            ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2).map_err(|_| STAT_DROP_REWRITE)?;
        }
    }
    if old_addr != addr {
        ctx.l3_csum_replace(pkt.ip_csum_off(), old_addr as u64, addr as u64, 4).map_err(|_| STAT_DROP_REWRITE)?;
        ctx.store(addr_off, &addr, 0).map_err(|_| STAT_DROP_REWRITE)?;
    }
    // A later fragment has no ports: its datagram's were rewritten in the first fragment.
    if old_port != port && pkt.frag != FRAG_LATER {
        ctx.store(port_off, &port, 0).map_err(|_| STAT_DROP_REWRITE)?;
        if pkt.proto == PROTO_SCTP {
            crate::sctp::update_checksum(ctx, pkt)?;
        }
    }
    Ok(())
}
