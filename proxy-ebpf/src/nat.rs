//! Address and port rewriting with incremental checksum updates (IPv4 header, TCP/UDP pseudo-header).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{PROTO_SCTP, PROTO_UDP, STAT_DROP_REWRITE};

use crate::packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `pkt` to `addr:port`.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, end: End, addr: u32, port: u16) -> Result<(), u32> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (pkt.saddr, pkt.sport, IP_SADDR_OFF, pkt.l4_off),
        End::Destination => (pkt.daddr, pkt.dport, IP_DADDR_OFF, pkt.l4_off + 2),
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
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, addr as u64, 4).map_err(|_| STAT_DROP_REWRITE)?;
        ctx.store(addr_off, &addr, 0).map_err(|_| STAT_DROP_REWRITE)?;
    }
    if old_port != port {
        ctx.store(port_off, &port, 0).map_err(|_| STAT_DROP_REWRITE)?;
        if pkt.proto == PROTO_SCTP {
            crate::sctp::update_checksum(ctx, pkt)?;
        }
    }
    Ok(())
}
