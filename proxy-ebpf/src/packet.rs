//! Parsing of the headers the datapath looks at. Reads go through bpf_skb_load_bytes so non-linear
//! skbs and odd lengths are handled by the kernel, never by pointer arithmetic the verifier must trust.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use proxy_common::{
    FragKey, FragPorts, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, STAT_DROP_FRAGMENT, STAT_DROP_MALFORMED_IPV4,
    STAT_DROP_MALFORMED_L4, STAT_PASS_FRAGMENT, STAT_PASS_MALFORMED_L4,
};

use crate::maps::{FRAGMENTS, SERVICE_ADDRS};

/// Where the IP header starts: after an Ethernet header, or at once on an L3 device (ipip,
/// WireGuard, tun: no link-layer header).
pub const ETH_HLEN: usize = 14;
pub const L3_DEVICE: usize = 0;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SCTP_COMMON_HLEN: usize = 12;

/// The fixed part of the IPv4 header, as on the wire (also what `reject` writes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// What the datapath needs to know about an IPv4 TCP/UDP/SCTP packet, or an ICMP message (`proto`
/// `PROTO_ICMP`, no ports: see `icmp`). Addresses and ports in network byte order.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flag byte (0 for other protocols, and for a later fragment).
    pub tcp_flags: u8,
    /// `FRAG_*`: whether the packet is a fragment, and which.
    pub frag: u8,
    /// Offset of the IP header from the start of the frame: `ETH_HLEN`, or 0 on an L3 device.
    pub l3_off: u8,
    /// The IP identification (network byte order): with the addresses and protocol, what ties a
    /// datagram's fragments together.
    pub ip_id: u16,
    /// Offset of the L4 header from the start of the frame (of the payload, in a later fragment,
    /// which has no L4 header).
    pub l4_off: usize,
    /// Offset of the end of the IP packet: the frame may be longer (a NIC pads short frames to 60
    /// bytes), and nothing after this is part of the packet.
    pub l4_end: usize,
}

/// Not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram: it carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: payload only; its ports are the first fragment's (`FRAGMENTS`).
pub const FRAG_LATER: u8 = 2;

impl Packet {
    /// Offsets of IPv4 header fields in the frame.
    #[inline(always)]
    pub fn ip_csum_off(&self) -> usize {
        self.l3_off as usize + 10
    }
    #[inline(always)]
    pub fn ip_saddr_off(&self) -> usize {
        self.l3_off as usize + 12
    }
    #[inline(always)]
    pub fn ip_daddr_off(&self) -> usize {
        self.l3_off as usize + 16
    }

    /// Offset of the L4 checksum, if the protocol has one that covers addresses and ports and the
    /// packet carries it (a later fragment does not: the first fragment's covers the datagram).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        if self.frag == FRAG_LATER {
            return None;
        }
        match self.proto {
            PROTO_TCP => Some(self.l4_off + 16),
            PROTO_UDP => Some(self.l4_off + 6),
            _ => None,
        }
    }
}

/// The skb's GSO segment size (0 when it is not a GSO packet).
#[inline(always)]
fn gso_size(ctx: &TcContext) -> u32 {
    // SAFETY: the program's context is a valid __sk_buff.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size }
}

#[inline(always)]
fn is_service_addr(addr: u32) -> bool {
    SERVICE_ADDRS.get_ptr(&addr).is_some()
}

/// Parses an IPv4 + L4 header at `l3_off` (after an Ethernet header, or at once on an L3 device).
///
/// `Ok(None)`: not something the datapath handles (not IPv4, another protocol, or a malformed or
/// fragmented packet that is not to a Service address) — to be passed untouched.
/// `Err(reason)`: a malformed IPv4 packet, or Service traffic that cannot be translated — dropped.
#[inline(always)]
pub fn parse(ctx: &TcContext, l3_off: usize) -> Result<Option<Packet>, u32> {
    if l3_off == ETH_HLEN {
        // BPF_PROG_TEST_RUN and the stack guarantee the 14-byte Ethernet header on such a device.
        let h_proto: u16 = match ctx.load::<u16>(12) {
            Ok(p) => u16::from_be(p),
            Err(_) => return Ok(None),
        };
        if h_proto != ETH_P_IP {
            return Ok(None);
        }
    } else if unsafe { (*(ctx.as_ptr() as *const __sk_buff)).protocol } != u32::from(ETH_P_IP.to_be()) {
        // The skb's protocol (network byte order, in the low half): an L3 device carries IPv6 too.
        return Ok(None);
    }
    let ip: Ipv4Hdr = ctx.load(l3_off).map_err(|_| STAT_DROP_MALFORMED_IPV4)?;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let mut tot_len = u16::from_be(ip.tot_len) as usize;
    if tot_len == 0 && ip.proto == PROTO_TCP && gso_size(ctx) != 0 {
        // IPv4 BIG TCP: a GSO packet over 64 KiB carries no total length; the skb's is the packet's
        // (the kernel's iph_totlen()).
        tot_len = (ctx.len() as usize).saturating_sub(l3_off);
    }
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl || (ctx.len() as usize) < l3_off + tot_len {
        return Err(STAT_DROP_MALFORMED_IPV4);
    }
    let frag_off = u16::from_be(ip.frag_off);
    if ip.proto == PROTO_ICMP {
        // An ICMP message is looked at whole (an error quotes the packet it is about); a fragment of
        // one is not an error (errors are short) and passes.
        if frag_off & (IP_MF | IP_OFFSET_MASK) != 0 {
            return Ok(None);
        }
        return Ok(Some(Packet {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: 0,
            dport: 0,
            proto: PROTO_ICMP,
            tcp_flags: 0,
            frag: FRAG_NONE,
            l3_off: l3_off as u8,
            ip_id: ip.id,
            l4_off: l3_off + ihl,
            l4_end: l3_off + tot_len,
        }));
    }
    if !matches!(ip.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return Ok(None);
    }
    let l4_off = l3_off + ihl;
    if frag_off & IP_OFFSET_MASK != 0 {
        return later_fragment(&ip, l3_off, l4_off, l3_off + tot_len);
    }
    let frag = if frag_off & IP_MF != 0 { FRAG_FIRST } else { FRAG_NONE };
    // SCTP's CRC32c covers the whole datagram: a first fragment's cannot be updated alone.
    if frag == FRAG_FIRST && ip.proto == PROTO_SCTP {
        let dport: u16 = ctx.load(l4_off + 2).unwrap_or(0);
        return if is_service_addr(ip.daddr) || crate::lb::frontend(ip.daddr, dport, ip.proto).is_some() {
            Err(STAT_DROP_FRAGMENT)
        } else {
            crate::stats::count(STAT_PASS_FRAGMENT);
            Ok(None)
        };
    }
    let l4_len = tot_len - ihl;
    let min_len = match ip.proto {
        PROTO_TCP => TCP_MIN_HLEN,
        PROTO_UDP => UDP_HLEN,
        _ => SCTP_COMMON_HLEN,
    };
    let ports: Result<[u16; 2], _> = ctx.load(l4_off);
    let (ports, tcp_flags) = match ports {
        Ok(ports) if l4_len >= min_len => {
            let flags = if ip.proto == PROTO_TCP { ctx.load::<u8>(l4_off + 13).unwrap_or(0) } else { 0 };
            (ports, flags)
        }
        _ => {
            return if is_service_addr(ip.daddr) {
                Err(STAT_DROP_MALFORMED_L4)
            } else {
                crate::stats::count(STAT_PASS_MALFORMED_L4);
                Ok(None)
            };
        }
    };
    Ok(Some(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        tcp_flags,
        frag,
        l3_off: l3_off as u8,
        ip_id: ip.id,
        l4_off,
        l4_end: l3_off + tot_len,
    }))
}

/// A later fragment: it carries no ports, so it takes those its datagram's first fragment had, if
/// that one was translated (`FRAGMENTS`); otherwise it is not the datapath's — unless it is to a
/// Service address, which only a translation may reach.
#[inline(always)]
fn later_fragment(ip: &Ipv4Hdr, l3_off: usize, l4_off: usize, l4_end: usize) -> Result<Option<Packet>, u32> {
    let key = FragKey { saddr: ip.saddr, daddr: ip.daddr, id: ip.id, proto: ip.proto, _pad: 0 };
    let Some(ports) = FRAGMENTS.get_ptr(&key) else {
        return if is_service_addr(ip.daddr) {
            Err(STAT_DROP_FRAGMENT)
        } else {
            crate::stats::count(STAT_PASS_FRAGMENT);
            Ok(None)
        };
    };
    // SAFETY: a map value, valid for this program run.
    let ports = unsafe { *ports };
    Ok(Some(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: ip.proto,
        tcp_flags: 0,
        frag: FRAG_LATER,
        l3_off: l3_off as u8,
        ip_id: ip.id,
        l4_off,
        l4_end,
    }))
}

/// Remembers a translated first fragment's ports for the rest of its datagram. A global BPF function:
/// the key lives on its own stack, not on the program's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_remember_fragment(pkt: *const Packet) -> i32 {
    let Some(pkt) = (unsafe { pkt.as_ref() }) else { return 0 };
    let key = FragKey { saddr: pkt.saddr, daddr: pkt.daddr, id: pkt.ip_id, proto: pkt.proto, _pad: 0 };
    i32::from(FRAGMENTS.insert(&key, &FragPorts { sport: pkt.sport, dport: pkt.dport }, 0).is_ok())
}
