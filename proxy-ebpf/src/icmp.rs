//! ICMP errors of translated connections, as netfilter's `nf_nat_icmp_reply_translation` handles
//! them. An error quotes the packet it is about as that packet was on the wire where it failed —
//! translated — so without this a client never learns of it: a path MTU drop behind a Service is a
//! black hole, and a connected UDP client never sees ECONNREFUSED from a closed backend port.
//!
//! The quoted packet, reversed, is one of a connection's two tuples:
//! - its *reply* tuple: the quote is an original-direction packet after translation (client or SNAT
//!   address → backend), and the error comes from the backend's side. The quote gets the client's
//!   own tuple back (client → Service address), the error goes to the client, from the Service
//!   address.
//! - its *original* tuple: the quote is a reply after reverse translation (Service address →
//!   client), and the error comes from the client's side. The quote becomes the reply as the backend
//!   sent it, the error goes to the backend (from the SNAT address if the connection has one).
//!
//! Checksums: the outer IP header's is updated for its addresses; inside the ICMP message, the
//! quoted IP header's, the quoted TCP/UDP checksum (when the quote holds it) and the ICMP checksum
//! are updated incrementally for every word changed, so the message stays valid whatever the skb's
//! checksum state.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK},
    programs::TcContext,
};
use proxy_common::{
    CT_F_FROM_NODE, CT_F_SNAT, CtEntry, CtKey, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, STAT_DROP_REWRITE,
    STAT_ICMP_ERROR_NAT, ct_alive, ct_reply_key,
};

use crate::{
    conntrack, fib,
    maps::{CONNTRACK, CT_REPLY},
    node,
    packet::{Ipv4Hdr, Packet},
    pod_source,
    service::Hook,
    stats, verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
pub const ICMP_HLEN: usize = 8;
const IPV4_MIN_HLEN: usize = 20;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Where the quoted packet lies in the frame, and its tuple as quoted.
#[derive(Clone, Copy)]
struct Quote {
    icmp_off: usize,
    ip_off: usize,
    l4_off: usize,
    /// End of the ICMP message (the quote may be cut anywhere after its first 8 L4 bytes).
    end: usize,
    key: CtKey,
}

/// An ICMP message (`pkt.proto` is `PROTO_ICMP`): translated if it is an error about a tracked
/// connection, otherwise passed untouched.
#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet, hook: Hook) -> Result<i32, u32> {
    verdict::decode(epx_icmp_error(ctx.as_ptr().cast(), pkt, hook as u32))
}

/// [`handle`] as a global BPF function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_icmp_error(skb: *mut __sk_buff, pkt: *const Packet, hook: u32) -> i32 {
    let (Some(skb), false) = (core::ptr::NonNull::new(skb), pkt.is_null()) else {
        return TC_ACT_OK;
    };
    let hook = if hook == Hook::Egress as u32 { Hook::Egress } else { Hook::Ingress };
    // SAFETY: checked non-null; the caller's own stack value.
    verdict::encode(translate(&TcContext::new(skb), unsafe { &*pkt }, hook))
}

#[inline(always)]
fn translate(ctx: &TcContext, outer: &Packet, hook: Hook) -> Result<i32, u32> {
    const PASS: Result<i32, u32> = Ok(TC_ACT_OK);
    let Some(quote) = quote_of(ctx, outer) else { return PASS };
    let now = conntrack::now_ns();
    // The quote reversed is the backend's tuple: it is about a packet we sent to a backend.
    if let Some(held) = CT_REPLY.get_ptr(&quote.key) {
        let orig = unsafe { (*held).orig };
        if let Some(entry) = CONNTRACK.get_ptr_mut(&orig) {
            // SAFETY: a map value, valid for this program run.
            let entry = unsafe { &mut *entry };
            if ct_reply_key(&orig, entry) == quote.key && ct_alive(entry, orig.proto, now) {
                if hook == Hook::Ingress {
                    pod_source::check_reply(ctx, entry, outer.saddr)?;
                }
                return towards_client(ctx, outer, &quote, &orig, entry.flags, hook);
            }
        }
    }
    // The quote reversed is the client's tuple: it is about a reply we restored.
    if let Some(entry) = CONNTRACK.get_ptr(&quote.key) {
        let entry = unsafe { &*entry };
        if ct_alive(entry, quote.key.proto, now) {
            if hook == Hook::Ingress {
                pod_source::check_orig(ctx, entry)?;
            }
            return towards_backend(ctx, outer, &quote, entry, hook);
        }
    }
    PASS
}

/// The error's quote, if it is an error about a TCP, UDP or SCTP packet whose ports it holds.
#[inline(always)]
fn quote_of(ctx: &TcContext, outer: &Packet) -> Option<Quote> {
    let kind: u8 = ctx.load(outer.l4_off).ok()?;
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB) {
        return None;
    }
    let ip_off = outer.l4_off + ICMP_HLEN;
    let ip: Ipv4Hdr = ctx.load(ip_off).ok()?;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || u16::from_be(ip.frag_off) & IP_OFFSET_MASK != 0 {
        return None;
    }
    if !matches!(ip.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return None;
    }
    let l4_off = ip_off + ihl;
    // RFC 792: at least the first 8 bytes of the datagram's payload — the ports and more.
    if l4_off + 8 > outer.l4_end {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4_off).ok()?;
    Some(Quote {
        icmp_off: outer.l4_off,
        ip_off,
        l4_off,
        end: outer.l4_end,
        key: CtKey::new(ip.daddr, ip.saddr, ports[1], ports[0], ip.proto),
    })
}

/// An error about an original-direction packet, from the backend's side: back to the client as if
/// its own packet (to the Service address) had failed there.
#[inline(always)]
fn towards_client(
    ctx: &TcContext,
    outer: &Packet,
    q: &Quote,
    orig: &CtKey,
    flags: u16,
    hook: Hook,
) -> Result<i32, u32> {
    rewrite_quote(ctx, q, (orig.saddr, orig.sport), (orig.daddr, orig.dport))?;
    rewrite_outer(ctx, outer, orig.daddr, orig.saddr)?;
    stats::count(STAT_ICMP_ERROR_NAT);
    // From the Service address: forwarded by us, as the connection's replies are — to the node's
    // own input path for a connection of its own.
    if hook == Hook::Ingress && flags & CT_F_FROM_NODE != 0 {
        return Ok(fib::deliver_local(ctx, outer.l3_off));
    }
    if hook == Hook::Ingress {
        return Ok(fib::redirect_as_node(ctx, outer.l3_off, PROTO_ICMP, orig.daddr, orig.saddr));
    }
    Ok(TC_ACT_OK)
}

/// An error about a restored reply, from the client's side: to the backend, about the reply as it
/// sent it.
#[inline(always)]
fn towards_backend(ctx: &TcContext, outer: &Packet, q: &Quote, entry: &CtEntry, hook: Hook) -> Result<i32, u32> {
    let orig = &q.key;
    let snat = entry.flags & CT_F_SNAT != 0;
    let client = if snat { (entry.snat_addr, entry.snat_port) } else { (orig.saddr, orig.sport) };
    rewrite_quote(ctx, q, (entry.nat_addr, entry.nat_port), client)?;
    let saddr = if snat { entry.snat_addr } else { outer.saddr };
    rewrite_outer(ctx, outer, saddr, entry.nat_addr)?;
    stats::count(STAT_ICMP_ERROR_NAT);
    if hook == Hook::Ingress && snat && node::is_node_addr(entry.snat_addr) {
        return Ok(fib::redirect_as_node(ctx, outer.l3_off, PROTO_ICMP, entry.snat_addr, entry.nat_addr));
    }
    Ok(TC_ACT_OK)
}

/// Sets the outer header's addresses.
#[inline(always)]
fn rewrite_outer(ctx: &TcContext, outer: &Packet, saddr: u32, daddr: u32) -> Result<(), u32> {
    for (off, old, new) in [(outer.ip_saddr_off(), outer.saddr, saddr), (outer.ip_daddr_off(), outer.daddr, daddr)] {
        if old != new {
            ctx.l3_csum_replace(outer.ip_csum_off(), old as u64, new as u64, 4).map_err(|_| STAT_DROP_REWRITE)?;
            ctx.store(off, &new, 0).map_err(|_| STAT_DROP_REWRITE)?;
        }
    }
    Ok(())
}

/// Sets the quoted packet's source and destination (address, port), with its checksums and the
/// ICMP checksum.
#[inline(always)]
fn rewrite_quote(ctx: &TcContext, q: &Quote, src: (u32, u16), dst: (u32, u16)) -> Result<(), u32> {
    let err = |_| STAT_DROP_REWRITE;
    // As quoted: the key is the quote reversed.
    let (old_src, old_dst) = ((q.key.daddr, q.key.dport), (q.key.saddr, q.key.sport));
    let icmp_csum_off = q.icmp_off + 2;
    let mut icmp_sum: u16 = ctx.load(icmp_csum_off).map_err(err)?;
    let old_ip_sum: u16 = ctx.load(q.ip_off + 10).map_err(err)?;
    let ip_sum = csum_replace4(csum_replace4(old_ip_sum, old_src.0, src.0), old_dst.0, dst.0);
    icmp_sum = csum_replace4(csum_replace4(icmp_sum, old_src.0, src.0), old_dst.0, dst.0);
    icmp_sum = csum_replace2(icmp_sum, old_ip_sum, ip_sum);
    icmp_sum = csum_replace2(csum_replace2(icmp_sum, old_src.1, src.1), old_dst.1, dst.1);
    // The quoted L4 checksum, when the quote is long enough to hold it (netfilter's rule too).
    let l4_csum_off = match q.key.proto {
        PROTO_TCP if q.l4_off + 18 <= q.end => Some(q.l4_off + 16),
        PROTO_UDP => Some(q.l4_off + 6),
        _ => None,
    };
    if let Some(off) = l4_csum_off {
        let old: u16 = ctx.load(off).map_err(err)?;
        // UDP without a checksum stays without one.
        if !(q.key.proto == PROTO_UDP && old == 0) {
            let mut sum = csum_replace4(csum_replace4(old, old_src.0, src.0), old_dst.0, dst.0);
            sum = csum_replace2(csum_replace2(sum, old_src.1, src.1), old_dst.1, dst.1);
            if q.key.proto == PROTO_UDP && sum == 0 {
                sum = 0xffff;
            }
            icmp_sum = csum_replace2(icmp_sum, old, sum);
            ctx.store(off, &sum, 0).map_err(err)?;
        }
    }
    ctx.store(q.ip_off + 12, &src.0, 0).map_err(err)?;
    ctx.store(q.ip_off + 16, &dst.0, 0).map_err(err)?;
    ctx.store(q.ip_off + 10, &ip_sum, 0).map_err(err)?;
    ctx.store(q.l4_off, &src.1, 0).map_err(err)?;
    ctx.store(q.l4_off + 2, &dst.1, 0).map_err(err)?;
    ctx.store(icmp_csum_off, &icmp_sum, 0).map_err(err)
}

/// Folds a sum of 16-bit words into 16 bits (one's complement).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// A checksum after one 16-bit word changed from `old` to `new` (RFC 1624, eqn. 3). Words are taken
/// as they lie in memory: one's-complement sums do not depend on byte order.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// As [`csum_replace2`], for a 32-bit field (two words).
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let (o, n) = (old.to_ne_bytes(), new.to_ne_bytes());
    let w = |b: [u8; 4], i: usize| u32::from(u16::from_ne_bytes([b[i], b[i + 1]]));
    !fold(u32::from(!check) + (0xffff - w(o, 0)) + (0xffff - w(o, 2)) + w(n, 0) + w(n, 2))
}
