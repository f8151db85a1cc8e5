//! Building test packets and checking what the programs made of them.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice, UdpHeader};

pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Ethernet + IPv4 + TCP with the given flags (`syn`, `ack`).
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, ack: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
        src.port(),
        dst.port(),
        1000,
        64_240,
    );
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build tcp");
    out
}

/// Ethernet + IPv4 + UDP.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("build udp");
    out
}

/// Offsets in a frame without IP options.
pub const IP_OFF: usize = 14;
pub const L4_OFF: usize = 34;

/// Recomputes the IPv4 header checksum of a frame (after a test edited the header); leaves a frame
/// whose header (by its IHL) is not all there as it is.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = frame.get(IP_OFF).map_or(0, |b| usize::from(b & 0x0f) * 4);
    if ihl < 20 || frame.len() < IP_OFF + ihl {
        return;
    }
    frame[IP_OFF + 10..IP_OFF + 12].fill(0);
    let mut sum: u32 = frame[IP_OFF..IP_OFF + ihl].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[IP_OFF + 10..IP_OFF + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// A parsed frame's addresses, ports and checksum validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ip_checksum_ok: bool,
    /// L4 checksum valid (`None`: UDP without checksum).
    pub l4_checksum_ok: Option<bool>,
    pub udp_checksum: Option<u16>,
}

/// Parses a frame and verifies its IPv4 and TCP/UDP checksums from scratch.
pub fn inspect(frame: &[u8]) -> Seen {
    seen(SlicedPacket::from_ethernet(frame).expect("parse frame"))
}

/// As [`inspect`], for an IP packet without Ethernet header (an ICMP error's quote).
pub fn inspect_ip(packet: &[u8]) -> Seen {
    seen(SlicedPacket::from_ip(packet).expect("parse packet"))
}

/// An ICMP error frame from `src` to `dst`, quoting `quoted` (an IP packet; see [`ip_of`]).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(kind)
        .write(&mut out, quoted)
        .expect("build icmp");
    out
}

/// The IP packet inside a frame (what an ICMP error quotes).
pub fn ip_of(frame: &[u8]) -> &[u8] {
    &frame[IP_OFF..]
}

/// An ICMP error as parsed from a frame: its addresses, whether its checksums (outer IP, ICMP) are
/// valid, and its quote with the quote's own checksums checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: etherparse::Icmpv4Type,
    pub checksums_ok: bool,
    pub quote: Seen,
}

pub fn inspect_icmp(frame: &[u8]) -> IcmpSeen {
    let sliced = SlicedPacket::from_ethernet(frame).expect("parse frame");
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { panic!("not IPv4") };
    let header = ip.header().to_header();
    let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else { panic!("not ICMP: {:?}", sliced.transport) };
    let icmp_type = icmp.icmp_type();
    let checksums_ok = header.calc_header_checksum() == header.header_checksum
        && icmp_type.calc_checksum(icmp.payload()) == icmp.checksum();
    IcmpSeen {
        src: Ipv4Addr::from(header.source),
        dst: Ipv4Addr::from(header.destination),
        icmp_type,
        checksums_ok,
        quote: inspect_ip(icmp.payload()),
    }
}

fn seen(sliced: SlicedPacket<'_>) -> Seen {
    let Some(NetSlice::Ipv4(ip)) = sliced.net else { panic!("not IPv4") };
    let header = ip.header().to_header();
    let ip_checksum_ok = header.calc_header_checksum() == header.header_checksum;
    let payload = ip.payload().payload;
    let (s, d) = (header.source, header.destination);
    let (sp, dp, l4_checksum_ok, udp_checksum) = match sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h: TcpHeader = t.to_header();
            let ok = h.calc_checksum_ipv4(&header, t.payload()).expect("tcp checksum") == h.checksum;
            (h.source_port, h.destination_port, Some(ok), None)
        }
        Some(TransportSlice::Udp(u)) => {
            let h: UdpHeader = u.to_header();
            let ok = if h.checksum == 0 {
                None
            } else {
                Some(h.calc_checksum_ipv4(&header, u.payload()).expect("udp checksum") == h.checksum)
            };
            (h.source_port, h.destination_port, ok, Some(h.checksum))
        }
        _ => panic!("no TCP/UDP in {payload:?}"),
    };
    Seen {
        src: SocketAddrV4::new(Ipv4Addr::from(s), sp),
        dst: SocketAddrV4::new(Ipv4Addr::from(d), dp),
        ip_checksum_ok,
        l4_checksum_ok,
        udp_checksum,
    }
}

/// Ethernet + IPv4 + TCP with the given flag byte, sequence and acknowledgment numbers and a
/// timestamp option (TSval `tsval`, as Linux lays it out: NOP, NOP, TS).
pub fn tcp_ts(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32, ack: u32, tsval: u32) -> Vec<u8> {
    use etherparse::TcpOptionElement::{Noop, Timestamp};
    let mut tcp = TcpHeader::new(src.port(), dst.port(), seq, 64_240);
    tcp.acknowledgment_number = ack;
    tcp.fin = flags & 0x01 != 0;
    tcp.syn = flags & 0x02 != 0;
    tcp.rst = flags & 0x04 != 0;
    tcp.psh = flags & 0x08 != 0;
    tcp.ack = flags & 0x10 != 0;
    tcp.set_options(&[Noop, Noop, Timestamp(tsval, 0)]).expect("options");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp_header(tcp)
        .write(&mut out, &[])
        .expect("build tcp");
    out
}

/// Splits a frame's IP datagram into fragments of at most `max_payload` payload bytes each (a
/// multiple of 8), as a sender's IP layer does: MF on all but the last, offsets in 8-byte units,
/// the identification `id`, valid header checksums.
pub fn fragments(frame: &[u8], max_payload: usize, id: u16) -> Vec<Vec<u8>> {
    assert_eq!(max_payload % 8, 0);
    let ihl = usize::from(frame[IP_OFF] & 0x0f) * 4;
    let (head, payload) = frame.split_at(IP_OFF + ihl);
    let chunks: Vec<&[u8]> = payload.chunks(max_payload).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = [head, chunk].concat();
            let tot_len = (ihl + chunk.len()) as u16;
            f[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&tot_len.to_be_bytes());
            f[IP_OFF + 4..IP_OFF + 6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
            let flags = more | (i * max_payload / 8) as u16;
            f[IP_OFF + 6..IP_OFF + 8].copy_from_slice(&flags.to_be_bytes());
            fix_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// Reassembles fragments (as [`fragments`] made them, translated or not) into one frame whose
/// checksums [`inspect`] can verify over the whole datagram. Every fragment must carry the first's
/// addresses.
pub fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let ihl = usize::from(frags[0][IP_OFF] & 0x0f) * 4;
    let mut sorted: Vec<&Vec<u8>> = frags.iter().collect();
    sorted.sort_by_key(|f| u16::from_be_bytes([f[IP_OFF + 6], f[IP_OFF + 7]]) & 0x1fff);
    for f in &sorted {
        assert_eq!(f[IP_OFF + 12..IP_OFF + 20], sorted[0][IP_OFF + 12..IP_OFF + 20], "fragments' addresses differ");
    }
    let mut out = sorted[0][..IP_OFF + ihl].to_vec();
    for f in &sorted {
        out.extend_from_slice(&f[IP_OFF + ihl..]);
    }
    let tot_len = (out.len() - IP_OFF) as u16;
    out[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&tot_len.to_be_bytes());
    out[IP_OFF + 6..IP_OFF + 8].fill(0);
    fix_ip_checksum(&mut out);
    out
}
