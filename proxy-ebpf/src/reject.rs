//! REJECT, as kube-proxy does it for Service ports without endpoints: the packet is turned into the
//! answer in place — a TCP RST, or an ICMP port unreachable for UDP and SCTP — and sent back out of
//! the interface it came in on (or, for a packet of the node's own, to the node's input path), so
//! the client fails at once instead of timing out. The same answer
//! path sends ICMP fragmentation needed for packets too big for the next hop the datapath forwards
//! them to.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_REDIRECT},
    helpers::{bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{
    PROTO_TCP, REJECT_BURST, REJECT_PER_SEC, STAT_DROP_NO_ENDPOINTS, STAT_DROP_REJECT_RATE_LIMITED, STAT_DROP_TOO_BIG,
    STAT_FRAG_NEEDED, STAT_REJECT, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    fib,
    maps::REJECT_BUDGET,
    packet::{ETH_HLEN, Ipv4Hdr, Packet},
    service::Hook,
    stats, verdict,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const IP_DF: u16 = 0x4000;
const IP_DF_BE: u16 = 0x4000u16.to_be();
const REPLY_TTL: u8 = 64;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg: u16,
}

/// The TCP pseudo-header followed by the header, summed together for the checksum.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TcpWithPseudo {
    saddr: u32,
    daddr: u32,
    zero: u8,
    proto: u8,
    len: u16,
    tcp: TcpHdr,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IcmpUnreach {
    kind: u8,
    code: u8,
    check: u16,
    unused: u32,
    /// The offending datagram's IP header and first 8 bytes of payload (RFC 792).
    quote_ip: Ipv4Hdr,
    quote_l4: [u8; 8],
}

/// Folds a 32-bit one's-complement sum into the checksum field value.
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn checksum<T>(v: &mut T) -> u16 {
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, v as *mut T as *mut u32, size_of::<T>() as u32, 0) };
    fold(sum)
}

#[inline(always)]
fn ipv4_reply(pkt: &Packet, proto: u8, payload_len: usize) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tot_len: ((size_of::<Ipv4Hdr>() + payload_len) as u16).to_be(),
        frag_off: IP_DF_BE,
        ttl: REPLY_TTL,
        proto,
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        ..Default::default()
    };
    ip.check = checksum(&mut ip);
    ip
}

/// Swaps the Ethernet addresses so the frame goes back to where it came from (an L3 device's
/// packets have none).
#[inline(always)]
fn reply_link_header(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    if pkt.l3_off as usize != ETH_HLEN {
        return Ok(());
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 14];
    swapped[..6].copy_from_slice(&macs[6..12]);
    swapped[6..12].copy_from_slice(&macs[..6]);
    swapped[12..14].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());
    ctx.store(0, &swapped, 0)
}

/// A TCP RST answering `pkt` (RFC 9293 3.10.7.1: take the peer's ACK as our sequence number, or
/// acknowledge everything it sent).
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    let seq: u32 = u32::from_be(ctx.load(pkt.l4_off + 4)?);
    let ack: u32 = u32::from_be(ctx.load(pkt.l4_off + 8)?);
    let doff = ((ctx.load::<u8>(pkt.l4_off + 12)? >> 4) as usize) * 4;
    let data_len = pkt.l4_end.saturating_sub(pkt.l4_off + doff) as u32;
    let mut tcp = TcpHdr { sport: pkt.dport, dport: pkt.sport, doff: 5 << 4, ..Default::default() };
    if pkt.tcp_flags & TCP_ACK != 0 {
        tcp.seq = ack.to_be();
        tcp.flags = TCP_RST;
    } else {
        let syn_fin = (pkt.tcp_flags & TCP_SYN != 0) as u32 + (pkt.tcp_flags & TCP_FIN != 0) as u32;
        tcp.ack = seq.wrapping_add(data_len + syn_fin).to_be();
        tcp.flags = TCP_RST | TCP_ACK;
    }
    let mut sum = TcpWithPseudo {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        proto: PROTO_TCP,
        len: (size_of::<TcpHdr>() as u16).to_be(),
        tcp,
        ..Default::default()
    };
    tcp.check = checksum(&mut sum);
    let ip = ipv4_reply(pkt, PROTO_TCP, size_of::<TcpHdr>());
    let l3 = pkt.l3_off as usize;
    ctx.change_tail((l3 + size_of::<Ipv4Hdr>() + size_of::<TcpHdr>()) as u32, 0)?;
    reply_link_header(ctx, pkt)?;
    ctx.store(l3, &ip, 0)?;
    ctx.store(l3 + size_of::<Ipv4Hdr>(), &tcp, 0)
}

/// An ICMP destination unreachable (`code`; `mtu` for fragmentation needed) quoting `pkt`'s IP
/// header (without options) and first 8 L4 bytes.
#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<(), i64> {
    let mut icmp = IcmpUnreach {
        kind: ICMP_DEST_UNREACH,
        code,
        // RFC 1191: the next-hop MTU in the low half of the unused word.
        unused: u32::from(mtu).to_be(),
        quote_ip: ctx.load(pkt.l3_off as usize)?,
        quote_l4: ctx.load(pkt.l4_off)?,
        ..Default::default()
    };
    icmp.check = checksum(&mut icmp);
    let ip = ipv4_reply(pkt, IPPROTO_ICMP, size_of::<IcmpUnreach>());
    let l3 = pkt.l3_off as usize;
    ctx.change_tail((l3 + size_of::<Ipv4Hdr>() + size_of::<IcmpUnreach>()) as u32, 0)?;
    reply_link_header(ctx, pkt)?;
    ctx.store(l3, &ip, 0)?;
    ctx.store(l3 + size_of::<Ipv4Hdr>(), &icmp, 0)
}

/// Answers `pkt` with a RST or ICMP error and sends the answer back out of the ingress interface.
/// Packets that must not be answered (a RST; IP options, which the fixed-size quote would cut) are
/// dropped under `drop_no_endpoints`.
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Packet, hook: Hook) -> Result<i32, u32> {
    verdict::decode(epx_reject(ctx.as_ptr().cast(), pkt, hook as u32))
}

/// [`reject_in_place`] as a global BPF function (verified once, on its own: the answer's headers
/// live on its own stack, not on the caller's). Returns the tc action, or minus the drop reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_reject(skb: *mut __sk_buff, pkt: *const Packet, hook: u32) -> i32 {
    let (Some(skb), false) = (core::ptr::NonNull::new(skb), pkt.is_null()) else {
        return -(STAT_DROP_NO_ENDPOINTS as i32);
    };
    let ctx = TcContext::new(skb);
    // SAFETY: checked non-null; the caller's own stack value.
    verdict::encode(reject_in_place(&ctx, unsafe { &*pkt }, hook))
}

/// Sends an answer built in place back to the packet's sender: out of the interface it came in
/// on, or — for a packet of the node's own, met at egress — to the node's input path.
#[inline(always)]
fn send_back(ctx: &TcContext, pkt: &Packet, hook: u32) -> i32 {
    if hook == Hook::Egress as u32 {
        return fib::deliver_local(ctx, pkt.l3_off);
    }
    unsafe { bpf_redirect(crate::pod_source::ingress_ifindex(ctx), 0) };
    TC_ACT_REDIRECT
}

/// Takes one answer from the node's budget; `false` when it is spent. Updated without atomics: CPUs
/// racing may let a few more through than the rate, never unboundedly many.
#[inline(always)]
fn within_budget() -> bool {
    let Some(budget) = REJECT_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: the array's one value, valid for the program run.
    let budget = unsafe { &mut *budget };
    let now = unsafe { bpf_ktime_get_ns() };
    let cost = 1_000_000_000 / REJECT_PER_SEC;
    let credit = budget.credit_ns.saturating_add(now.saturating_sub(budget.last_ns)).min(REJECT_BURST * cost);
    budget.last_ns = now;
    if credit < cost {
        budget.credit_ns = credit;
        return false;
    }
    budget.credit_ns = credit - cost;
    true
}

#[inline(always)]
fn reject_in_place(ctx: &TcContext, pkt: &Packet, hook: u32) -> Result<i32, u32> {
    if !within_budget() {
        return Err(STAT_DROP_REJECT_RATE_LIMITED);
    }
    let built = if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            return Err(STAT_DROP_NO_ENDPOINTS);
        }
        tcp_reset(ctx, pkt)
    } else {
        if pkt.l4_off != pkt.l3_off as usize + size_of::<Ipv4Hdr>() {
            return Err(STAT_DROP_NO_ENDPOINTS);
        }
        icmp_unreachable(ctx, pkt, ICMP_PORT_UNREACH, 0)
    };
    built.map_err(|_| STAT_DROP_NO_ENDPOINTS)?;
    stats::count(STAT_REJECT);
    Ok(send_back(ctx, pkt, hook))
}

/// A packet the datapath forwards itself does not fit the next hop's `mtu`: with DF set it is
/// answered with ICMP fragmentation needed (from the address it was sent to, quoting it as its
/// sender sent it) back out of the interface it came in on, within the node's answer budget;
/// otherwise dropped (it would need fragmenting).
#[inline(always)]
pub fn too_big(ctx: &TcContext, pkt: &Packet, mtu: u32, hook: Hook) -> Result<i32, u32> {
    verdict::decode(epx_too_big(ctx.as_ptr().cast(), pkt, mtu, hook as u32))
}

/// [`too_big`] as a global BPF function (verified once; the answer lives on its own stack).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_too_big(skb: *mut __sk_buff, pkt: *const Packet, mtu: u32, hook: u32) -> i32 {
    let (Some(skb), false) = (core::ptr::NonNull::new(skb), pkt.is_null()) else {
        return -(STAT_DROP_TOO_BIG as i32);
    };
    let ctx = TcContext::new(skb);
    // SAFETY: checked non-null; the caller's own stack value.
    verdict::encode(frag_needed(&ctx, unsafe { &*pkt }, mtu, hook))
}

#[inline(always)]
fn frag_needed(ctx: &TcContext, pkt: &Packet, mtu: u32, hook: u32) -> Result<i32, u32> {
    let frag_off: u16 = ctx.load(pkt.l3_off as usize + 6).map_err(|_| STAT_DROP_TOO_BIG)?;
    if u16::from_be(frag_off) & IP_DF == 0 || pkt.l4_off != pkt.l3_off as usize + size_of::<Ipv4Hdr>() {
        return Err(STAT_DROP_TOO_BIG);
    }
    if !within_budget() {
        return Err(STAT_DROP_REJECT_RATE_LIMITED);
    }
    icmp_unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu.min(u32::from(u16::MAX)) as u16).map_err(|_| STAT_DROP_TOO_BIG)?;
    stats::count(STAT_FRAG_NEEDED);
    Ok(send_back(ctx, pkt, hook))
}
