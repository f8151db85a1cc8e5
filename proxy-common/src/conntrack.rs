//! The datapath's own connection tracking, used by the tc programs.
//!
//! Every translated connection has two entries: one keyed by the client's 5-tuple towards the Service
//! address (`CT_DIR_SERVICE`, holds the chosen backend) and one keyed by the backend's reply 5-tuple
//! (`CT_DIR_REPLY`, holds the Service address to restore). Each entry carries the address it rewrites to,
//! so an established connection keeps working whatever happens to the Service's maps afterwards.

use crate::{PROTO_TCP, assert_size};

/// Key of `CONNTRACK`: the full 5-tuple as seen in the packet, plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: u16,
}
assert_size!(CtKey, 16);

/// Client → Service address: the entry's `nat_addr:nat_port` is the backend.
pub const CT_DIR_SERVICE: u8 = 1;
/// Backend → client: the entry's `nat_addr:nat_port` is the Service address to restore as source.
pub const CT_DIR_REPLY: u8 = 2;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the connection was first seen.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Address to rewrite to (destination for `CT_DIR_SERVICE`, source for `CT_DIR_REPLY`).
    pub nat_addr: u32,
    pub backend_id: u32,
    pub service_id: u32,
    pub nat_port: u16,
    /// TCP flags seen in this direction (OR of the flag bytes).
    pub tcp_flags: u8,
    /// `CT_STATE_*`.
    pub state: u8,
    /// With `CT_F_SNAT`: for `CT_DIR_SERVICE` the source the packet is rewritten to (node address and
    /// allocated port); for `CT_DIR_REPLY` the client address the reply's destination is restored to.
    pub snat_addr: u32,
    pub snat_port: u16,
    /// `CT_F_*` bits.
    pub flags: u16,
}
assert_size!(CtEntry, 40);

/// The connection's source is translated too (masquerade, hairpin).
pub const CT_F_SNAT: u16 = 1 << 0;

/// TCP: SYN seen, no answer yet.
pub const CT_STATE_SYN_SENT: u8 = 1;
/// TCP: both directions seen; UDP and others: always this state.
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// TCP: FIN or RST seen.
pub const CT_STATE_CLOSING: u8 = 3;

/// TCP header flag bits (13th byte of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;
/// kube-proxy's default `conntrack.tcpEstablishedTimeout` (24h).
pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 86_400 * SEC;
/// An unanswered SYN (as the kernel's nf_conntrack_tcp_timeout_syn_sent).
pub const CT_LIFETIME_TCP_SYN_NS: u64 = 120 * SEC;
/// After FIN or RST: long enough for the close handshake and retransmissions.
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 60 * SEC;
/// UDP and other protocols (as the kernel's nf_conntrack_udp_timeout_stream).
pub const CT_LIFETIME_OTHER_NS: u64 = 120 * SEC;

/// How long an entry stays valid after its last packet.
#[inline(always)]
pub const fn ct_lifetime_ns(proto: u8, state: u8) -> u64 {
    if proto != PROTO_TCP {
        return CT_LIFETIME_OTHER_NS;
    }
    match state {
        CT_STATE_SYN_SENT => CT_LIFETIME_TCP_SYN_NS,
        CT_STATE_CLOSING => CT_LIFETIME_TCP_CLOSING_NS,
        _ => CT_LIFETIME_TCP_ESTABLISHED_NS,
    }
}

/// Whether an entry last seen at `last_seen_ns` is still alive at `now_ns`.
#[inline(always)]
pub const fn ct_alive(entry: &CtEntry, proto: u8, now_ns: u64) -> bool {
    now_ns.saturating_sub(entry.last_seen_ns) <= ct_lifetime_ns(proto, entry.state)
}

/// `CONNTRACK` capacity (LRU: the oldest entries go first when it is full).
pub const MAX_CONNTRACK: u32 = 262_144;
