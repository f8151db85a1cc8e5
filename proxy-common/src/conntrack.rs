//! The datapath's own connection tracking.
//!
//! One connection, one state, as in the kernel's conntrack: `CONNTRACK` holds each connection once,
//! keyed by its *original* tuple (the client's packet as it arrived, before any translation), with
//! the translation, one state for both directions and the time of the last packet in either
//! direction. `CT_REPLY` maps the *reply* tuple (the backend's packet as it arrives: backend →
//! client, or backend → node address and SNAT port) to the original tuple, so a reply finds its
//! connection. The reply key is unique in the map: inserting it with `BPF_NOEXIST` is what claims an
//! SNAT port, atomically across CPUs.
//!
//! Both maps are plain hash maps, never LRU: nothing evicts a connection behind its back. A
//! connection leaves when it is dead (its state's lifetime has passed since its last packet), removed
//! by the datapath when it meets it or by the userspace garbage collector, both directions together.
//! When the table is full a new connection may take the place of a recent connection that is not
//! *assured* (no answer seen, or an unfinished handshake) — netfilter's early drop — and is otherwise
//! dropped and counted; an assured connection is never displaced.
//!
//! The state machine and lifetimes are plain functions here so the kernel programs, the garbage
//! collector, `conntrack` inspection and the unit tests all judge a connection the same way.

use crate::{PROTO_TCP, PROTO_UDP, assert_size};

const SEC: u64 = 1_000_000_000;

/// Key of `CONNTRACK` (an original tuple) and of `CT_REPLY` (a reply tuple), as the packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Padding as scalars: an array would be zeroed with a call to memset in the programs.
    pub _pad1: u8,
    pub _pad2: u16,
}
assert_size!(CtKey, 16);

impl CtKey {
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self { saddr, daddr, sport, dport, proto, _pad1: 0, _pad2: 0 }
    }
}

/// Value of `CT_REPLY`: the connection a reply tuple belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtReply {
    /// The connection's original tuple (its key in `CONNTRACK`).
    pub orig: CtKey,
    /// When the tuple was claimed. The connection is written just after its reply tuple: a tuple
    /// whose connection is missing is one being created, not a leftover, until it is
    /// `CT_CLAIM_GRACE_NS` old. For a retired tuple: when its connection was last active.
    pub claimed_ns: u64,
    /// With `CT_REPLY_F_RETIRED`: how the connection ended (what its backend, still holding the
    /// tuple in TIME_WAIT, will judge a new SYN by).
    pub end: CtClosedEnd,
    pub flags: u16,
    pub _pad: u16,
}
assert_size!(CtReply, 40);

/// How many reply tuples may be leased at once (`CT_LEASES`): a held tuple is changed — taken over,
/// retired, released, collected — only by whoever first inserts it into that map with
/// `BPF_NOEXIST` (one CPU, or the collector, wins), and only if the entry still reads as it did when
/// the change was decided; the lease is deleted right after. Leases last microseconds: at most one
/// per CPU and the collector's one.
pub const CT_LEASES_MAX: u32 = 1024;
/// A lease older than this (its value: `bpf_ktime_get_ns()` when taken) was left by a process that
/// died while holding it (the datapath never keeps one past its run): the collector removes it.
pub const CT_LEASE_STALE_NS: u64 = SEC;

/// The tuple's connection is gone (its original tuple was reused by a new connection), but its
/// backend closed first and may hold the tuple in TIME_WAIT for a while: the tuple is kept, as
/// closed, until `BACKEND_TIME_WAIT_NS` after its last packet.
pub const CT_REPLY_F_RETIRED: u16 = 1 << 0;

/// How long a claimed reply tuple waits for its connection before it counts as a leftover.
pub const CT_CLAIM_GRACE_NS: u64 = SEC;

/// An SNAT port held by a connection nobody answered (an unfinished handshake, a datagram without
/// reply) this long after it was created may be given to a new connection when no other port is
/// free: a burst of connections that are never completed must not lock a backend out for the
/// minute their handshakes live. A real handshake completes in a round trip.
pub const CT_UNANSWERED_TAKEOVER_NS: u64 = 2 * SEC;

/// Value of `CONNTRACK`: one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the connection was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in either direction.
    pub last_seen_ns: u64,
    /// Destination the original direction is rewritten to (the backend), network byte order.
    #[cfg(not(feature = "layout-test"))]
    pub nat_addr: u32,
    /// With `CT_F_SNAT`: the source the original direction is rewritten to (node address and an
    /// allocated port, or the client's address with a remapped port).
    pub snat_addr: u32,
    /// Only in the `layout-test` build: `nat_addr` after `snat_addr` — another layout of the same
    /// size, which every connection would be misread in without its conversion.
    #[cfg(feature = "layout-test")]
    pub nat_addr: u32,
    pub backend_id: u32,
    /// The frontend's `service_id`.
    pub service_id: u32,
    /// The interface the connection's first packet arrived on: a local pod's packets of this
    /// connection must arrive there too.
    pub orig_ifindex: u32,
    pub nat_port: u16,
    pub snat_port: u16,
    /// `CT_F_*` bits.
    pub flags: u16,
    /// `CT_STATE_*`.
    pub state: u8,
    /// TCP flags seen in each direction (OR of the flag bytes).
    pub tcp_flags_orig: u8,
    pub tcp_flags_reply: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    /// TCP, once the connection is closing: where the client's sequence space ended (after its FIN)
    /// and the last timestamp it sent (0: none). A backend still holding the connection in TIME_WAIT
    /// judges a new SYN on the same tuple by these.
    pub orig_end_seq: u32,
    pub orig_tsval: u32,
    /// The interface the connection's first reply arrived on (0: none yet). A reply from a local
    /// pod is accepted only there, and the first only when its source routes back through it.
    pub reply_ifindex: u32,
    pub _pad3: u32,
}
assert_size!(CtEntry, 64);

/// The connection's source is translated too (masquerade, hairpin, a remapped client port).
pub const CT_F_SNAT: u16 = 1 << 0;
/// A packet in the reply direction has been seen.
pub const CT_F_SEEN_REPLY: u16 = 1 << 1;
/// The connection is assured (netfilter's term): a TCP handshake completed, or an answer seen for
/// anything else. Only connections without it may be displaced by a new one when the table is full.
pub const CT_F_ASSURED: u16 = 1 << 2;
/// TCP: the original side sent a FIN.
pub const CT_F_FIN_ORIG: u16 = 1 << 3;
/// TCP: the reply side sent a FIN.
pub const CT_F_FIN_REPLY: u16 = 1 << 4;
/// TCP: the reply side was the first to send a FIN (the other side's ACK of the last FIN ends it).
pub const CT_F_REPLY_CLOSED_FIRST: u16 = 1 << 5;
/// TCP: the backend sent its FIN before it had the client's — it closed first, or both closed at
/// once — so it holds the tuple in TIME_WAIT for a minute after the connection ends.
pub const CT_F_BACKEND_TIME_WAIT: u16 = 1 << 6;
/// The client is one of the node's own sockets (the connection was opened at tc egress): its
/// replies, and errors about it, are for the node and reach it through the loopback device.
pub const CT_F_FROM_NODE: u16 = 1 << 7;

/// TCP states (as nf_conntrack_proto_tcp names them). UDP and other protocols use
/// `CT_STATE_UNREPLIED` and `CT_STATE_REPLIED`.
pub const CT_STATE_NONE: u8 = 0;
/// The client's SYN, no answer yet.
pub const CT_STATE_SYN_SENT: u8 = 1;
/// The backend's SYN-ACK seen; waiting for the client's ACK.
pub const CT_STATE_SYN_RECV: u8 = 2;
/// Handshake completed (or a connection picked up mid-stream).
pub const CT_STATE_ESTABLISHED: u8 = 3;
/// One side sent a FIN.
pub const CT_STATE_FIN_WAIT: u8 = 4;
/// One side sent a FIN and the other acknowledged it: half-closed.
pub const CT_STATE_CLOSE_WAIT: u8 = 5;
/// Both sides sent a FIN; the last ACK is outstanding.
pub const CT_STATE_LAST_ACK: u8 = 6;
/// Both FINs acknowledged.
pub const CT_STATE_TIME_WAIT: u8 = 7;
/// A RST was seen (from either side).
pub const CT_STATE_CLOSE: u8 = 8;
/// UDP, SCTP: no packet in the reply direction yet.
pub const CT_STATE_UNREPLIED: u8 = 9;
/// UDP, SCTP: both directions seen.
pub const CT_STATE_REPLIED: u8 = 10;

/// Direction of a packet within its connection.
pub const CT_DIR_ORIG: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// TCP header flag bits (13th byte of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// kube-proxy's default `conntrack.tcpEstablishedTimeout` (24h).
pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 86_400 * SEC;
/// An unanswered SYN, a handshake the client never finished, a connection picked up mid-stream
/// that nobody answered: about a minute (nf_conntrack_tcp_timeout_syn_recv).
pub const CT_LIFETIME_TCP_HANDSHAKE_NS: u64 = 60 * SEC;
/// nf_conntrack_tcp_timeout_fin_wait.
pub const CT_LIFETIME_TCP_FIN_WAIT_NS: u64 = 120 * SEC;
/// kube-proxy's default `conntrack.tcpCloseWaitTimeout` (1h): a half-closed connection may still
/// carry data one way.
pub const CT_LIFETIME_TCP_CLOSE_WAIT_NS: u64 = 3_600 * SEC;
/// nf_conntrack_tcp_timeout_last_ack.
pub const CT_LIFETIME_TCP_LAST_ACK_NS: u64 = 30 * SEC;
/// nf_conntrack_tcp_timeout_time_wait.
pub const CT_LIFETIME_TCP_TIME_WAIT_NS: u64 = 120 * SEC;
/// After a RST (nf_conntrack_tcp_timeout_close).
pub const CT_LIFETIME_TCP_CLOSE_NS: u64 = 10 * SEC;
/// UDP and others before an answer (nf_conntrack_udp_timeout).
pub const CT_LIFETIME_UNREPLIED_NS: u64 = 30 * SEC;
/// UDP after an answer (nf_conntrack_udp_timeout_stream).
pub const CT_LIFETIME_UDP_REPLIED_NS: u64 = 120 * SEC;
/// SCTP and others after an answer (nf_conntrack_sctp_timeout_established).
pub const CT_LIFETIME_OTHER_REPLIED_NS: u64 = 210 * SEC;
/// How long a socket-path UDP flow stays pinned to its backend after its last datagram.
pub const CT_LIFETIME_OTHER_NS: u64 = CT_LIFETIME_UDP_REPLIED_NS;

/// How long a connection in `state` stays alive after its last packet.
#[inline(always)]
pub const fn ct_lifetime_ns(proto: u8, state: u8, flags: u16) -> u64 {
    match state {
        CT_STATE_SYN_SENT | CT_STATE_SYN_RECV => CT_LIFETIME_TCP_HANDSHAKE_NS,
        // Picked up mid-stream and never answered: as short-lived as a handshake.
        CT_STATE_ESTABLISHED if flags & CT_F_ASSURED == 0 => CT_LIFETIME_TCP_HANDSHAKE_NS,
        CT_STATE_ESTABLISHED => CT_LIFETIME_TCP_ESTABLISHED_NS,
        CT_STATE_FIN_WAIT => CT_LIFETIME_TCP_FIN_WAIT_NS,
        CT_STATE_CLOSE_WAIT => CT_LIFETIME_TCP_CLOSE_WAIT_NS,
        CT_STATE_LAST_ACK => CT_LIFETIME_TCP_LAST_ACK_NS,
        CT_STATE_TIME_WAIT => CT_LIFETIME_TCP_TIME_WAIT_NS,
        CT_STATE_CLOSE => CT_LIFETIME_TCP_CLOSE_NS,
        CT_STATE_REPLIED if proto == PROTO_UDP => CT_LIFETIME_UDP_REPLIED_NS,
        CT_STATE_REPLIED => CT_LIFETIME_OTHER_REPLIED_NS,
        _ => CT_LIFETIME_UNREPLIED_NS,
    }
}

/// Nanoseconds a connection has left at `now_ns` (0: dead).
#[inline(always)]
pub const fn ct_remaining_ns(entry: &CtEntry, proto: u8, now_ns: u64) -> u64 {
    let deadline = entry.last_seen_ns.saturating_add(ct_lifetime_ns(proto, entry.state, entry.flags));
    deadline.saturating_sub(now_ns)
}

/// Whether a connection is still alive at `now_ns`.
#[inline(always)]
pub const fn ct_alive(entry: &CtEntry, proto: u8, now_ns: u64) -> bool {
    ct_remaining_ns(entry, proto, now_ns) > 0
}

/// Whether the connection is over on both sides (TIME_WAIT, or reset): a new connection may take
/// its tuple (a new SYN on it starts afresh; an SNAT port it holds may be given to another).
#[inline(always)]
pub const fn ct_closed(entry: &CtEntry) -> bool {
    entry.state == CT_STATE_TIME_WAIT || entry.state == CT_STATE_CLOSE
}

/// The state of a new connection from its first packet (in the original direction), and its flags.
#[inline(always)]
pub const fn ct_initial(proto: u8, tcp_flags: u8) -> u8 {
    if proto != PROTO_TCP {
        return CT_STATE_UNREPLIED;
    }
    if tcp_flags & TCP_RST != 0 {
        CT_STATE_CLOSE
    } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        CT_STATE_SYN_SENT
    } else {
        // Mid-stream: a connection we had not seen (e.g. its entry was lost). Picked up, as
        // netfilter does by default, but not assured until the other side answers.
        CT_STATE_ESTABLISHED
    }
}

/// Advances a connection's state and flags for a packet in direction `dir` (`CT_DIR_*`) with TCP
/// flags `tcp_flags`. Returns the new (state, flags).
#[inline(always)]
pub const fn ct_advance(proto: u8, state: u8, flags: u16, dir: u8, tcp_flags: u8) -> (u8, u16) {
    let reply = dir == CT_DIR_REPLY;
    let mut flags = flags;
    if reply {
        flags |= CT_F_SEEN_REPLY;
    }
    if proto != PROTO_TCP {
        if reply {
            return (CT_STATE_REPLIED, flags | CT_F_ASSURED);
        }
        return (state, flags);
    }
    if tcp_flags & TCP_RST != 0 {
        return (CT_STATE_CLOSE, flags);
    }
    let syn = tcp_flags & TCP_SYN != 0;
    let ack = tcp_flags & TCP_ACK != 0;
    let fin = tcp_flags & TCP_FIN != 0;
    let (my_fin, their_fin) = if reply { (CT_F_FIN_REPLY, CT_F_FIN_ORIG) } else { (CT_F_FIN_ORIG, CT_F_FIN_REPLY) };
    match state {
        CT_STATE_SYN_SENT if reply && syn && ack => (CT_STATE_SYN_RECV, flags),
        CT_STATE_SYN_RECV if !reply && ack && !syn => {
            let s = if fin { CT_STATE_FIN_WAIT } else { CT_STATE_ESTABLISHED };
            let f = if fin { flags | CT_F_FIN_ORIG } else { flags };
            (s, f | CT_F_ASSURED)
        }
        // A connection picked up mid-stream is assured once the other side answers.
        CT_STATE_ESTABLISHED if flags & CT_F_ASSURED == 0 && reply && !fin => (state, flags | CT_F_ASSURED),
        CT_STATE_ESTABLISHED if fin => {
            let first = if reply { CT_F_REPLY_CLOSED_FIRST } else { 0 };
            (CT_STATE_FIN_WAIT, flags | my_fin | first)
        }
        CT_STATE_FIN_WAIT | CT_STATE_CLOSE_WAIT if fin && flags & their_fin != 0 => (CT_STATE_LAST_ACK, flags | my_fin),
        // The other side acknowledged the FIN without closing its own half.
        CT_STATE_FIN_WAIT if ack && !fin && flags & their_fin != 0 => (CT_STATE_CLOSE_WAIT, flags),
        // The side that closed first acknowledges the last FIN.
        CT_STATE_LAST_ACK if ack && !fin && reply == (flags & CT_F_REPLY_CLOSED_FIRST != 0) => {
            (CT_STATE_TIME_WAIT, flags)
        }
        _ => (state, flags),
    }
}

/// Whether a SYN from the client starts a new connection on the tuple of `entry`: the old one is
/// closing or closed on the client's side (the kernel's conntrack reopens TIME_WAIT and closed
/// ones; a client that sends a new SYN has forgotten any half-closed one too).
#[inline(always)]
pub const fn ct_reopens(entry: &CtEntry, tcp_flags: u8) -> bool {
    tcp_opens(tcp_flags)
        && matches!(
            entry.state,
            CT_STATE_FIN_WAIT | CT_STATE_CLOSE_WAIT | CT_STATE_LAST_ACK | CT_STATE_TIME_WAIT | CT_STATE_CLOSE
        )
}

/// Whether a SYN-ACK from the backend belongs to another connection than `entry` (which is past its
/// handshake): a client now talking to the backend directly (socket-level LB, or a plain pod-to-pod
/// connection) from a port an earlier Service connection used. The old connection is over.
#[inline(always)]
pub const fn ct_superseded_by_reply(entry: &CtEntry, tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        && !matches!(entry.state, CT_STATE_SYN_SENT | CT_STATE_SYN_RECV)
}

/// Whether a TCP state is one of closing (a FIN seen) or closed.
#[inline(always)]
pub const fn ct_closing(state: u8) -> bool {
    matches!(state, CT_STATE_FIN_WAIT | CT_STATE_CLOSE_WAIT | CT_STATE_LAST_ACK | CT_STATE_TIME_WAIT)
}

/// How long a backend that closed first is taken to hold the tuple in TIME_WAIT: Linux's
/// TCP_TIMEWAIT_LEN (60 s), with a margin for the timer's slack and our own timestamps' coarseness.
pub const BACKEND_TIME_WAIT_NS: u64 = 65 * SEC;

/// How a closed connection ended, as far as a new SYN on its tuple is concerned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtClosedEnd {
    pub orig_end_seq: u32,
    pub orig_tsval: u32,
    /// The connection's `CT_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
}
assert_size!(CtClosedEnd, 12);

impl CtClosedEnd {
    #[inline(always)]
    pub const fn of(e: &CtEntry) -> Self {
        Self { flags: e.flags, orig_end_seq: e.orig_end_seq, orig_tsval: e.orig_tsval, _pad: 0 }
    }
}

/// Whether a backend that may hold the connection that ended as `old` in TIME_WAIT accepts a new
/// SYN with sequence number `seq` and TSval `tsval` (0: none) on the same tuple, `idle_ns` after its
/// last packet, as Linux's tcp_timewait_state_process decides: not PAWS-rejected, and a newer
/// timestamp or a sequence number past the old connection's end. A backend that did not close first
/// holds no TIME_WAIT.
#[inline(always)]
pub const fn ct_backend_accepts_syn(old: CtClosedEnd, seq: u32, tsval: u32, idle_ns: u64) -> bool {
    if old.flags & CT_F_BACKEND_TIME_WAIT == 0 || idle_ns > BACKEND_TIME_WAIT_NS {
        return true;
    }
    let both_ts = tsval != 0 && old.orig_tsval != 0;
    // tcp_paws_reject(), with the window of 0 TIME_WAIT uses: any older timestamp.
    let paws_reject = both_ts && (old.orig_tsval.wrapping_sub(tsval) as i32) > 0;
    let newer_ts = both_ts && (tsval.wrapping_sub(old.orig_tsval) as i32) > 0;
    let after_seq = (seq.wrapping_sub(old.orig_end_seq) as i32) > 0;
    !paws_reject && (newer_ts || after_seq)
}

/// Whether `tcp_flags` open a new connection (a SYN without ACK).
#[inline(always)]
pub const fn tcp_opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// A state's name, for inspection and logs.
pub const fn ct_state_name(state: u8) -> &'static str {
    match state {
        CT_STATE_SYN_SENT => "SYN_SENT",
        CT_STATE_SYN_RECV => "SYN_RECV",
        CT_STATE_ESTABLISHED => "ESTABLISHED",
        CT_STATE_FIN_WAIT => "FIN_WAIT",
        CT_STATE_CLOSE_WAIT => "CLOSE_WAIT",
        CT_STATE_LAST_ACK => "LAST_ACK",
        CT_STATE_TIME_WAIT => "TIME_WAIT",
        CT_STATE_CLOSE => "CLOSE",
        CT_STATE_UNREPLIED => "UNREPLIED",
        CT_STATE_REPLIED => "REPLIED",
        _ => "NONE",
    }
}

/// The reply tuple of a connection: what the backend's packets carry (backend → the client, or →
/// the SNAT address and port).
#[inline(always)]
pub const fn ct_reply_key(orig: &CtKey, entry: &CtEntry) -> CtKey {
    let (daddr, dport) =
        if entry.flags & CT_F_SNAT != 0 { (entry.snat_addr, entry.snat_port) } else { (orig.saddr, orig.sport) };
    CtKey::new(entry.nat_addr, daddr, entry.nat_port, dport, orig.proto)
}

/// Default `--conntrack-max`: kube-proxy's `conntrack.maxPerCore` (32768) per CPU, at least its
/// `conntrack.min` (131072).
pub const fn default_conntrack_max(cpus: u32) -> u32 {
    let per_core = 32_768u32.saturating_mul(cpus);
    if per_core > 131_072 { per_core } else { 131_072 }
}

/// Capacity compiled into `CONNTRACK` and `CT_REPLY`; `run` sets the real one (`--conntrack-max`).
pub const MAX_CONNTRACK: u32 = 131_072;

/// Slots in `CT_RECENT`, the ring of recently created connections the datapath may displace when the
/// table is full (netfilter's early drop).
pub const CT_RECENT_SLOTS: u32 = 16_384;

/// Value of `CT_RECENT_CURSOR`: where the ring is written next (`head`) and where the search for a
/// connection to displace goes on (`tail`); both count up forever, modulo `CT_RECENT_SLOTS` is the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtRecentCursor {
    pub head: u64,
    pub tail: u64,
}
assert_size!(CtRecentCursor, 16);
/// How many recent connections a new one may look at for one to displace (the search goes on from
/// there the next time, so assured connections are passed over once).
pub const CT_EARLY_DROP_TRIES: u32 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    const ORIG: u8 = CT_DIR_ORIG;
    const REPLY: u8 = CT_DIR_REPLY;

    fn run(steps: &[(u8, u8)]) -> (u8, u16) {
        let (first_dir, first_flags) = steps[0];
        assert_eq!(first_dir, ORIG);
        let mut s = (ct_initial(PROTO_TCP, first_flags), 0u16);
        for &(dir, f) in &steps[1..] {
            s = ct_advance(PROTO_TCP, s.0, s.1, dir, f);
        }
        s
    }

    #[test]
    fn the_handshake_is_established_only_by_the_clients_ack() {
        assert_eq!(run(&[(ORIG, TCP_SYN)]).0, CT_STATE_SYN_SENT);
        let syn_recv = run(&[(ORIG, TCP_SYN), (REPLY, TCP_SYN | TCP_ACK)]);
        assert_eq!(syn_recv.0, CT_STATE_SYN_RECV);
        assert_eq!(syn_recv.1 & CT_F_ASSURED, 0);
        assert_eq!(ct_lifetime_ns(PROTO_TCP, syn_recv.0, syn_recv.1), 60 * SEC);
        // The backend's retransmitted SYN-ACK or a stray ACK of its own does not complete it.
        let still = run(&[(ORIG, TCP_SYN), (REPLY, TCP_SYN | TCP_ACK), (REPLY, TCP_ACK)]);
        assert_eq!(still.0, CT_STATE_SYN_RECV);
        let est = run(&[(ORIG, TCP_SYN), (REPLY, TCP_SYN | TCP_ACK), (ORIG, TCP_ACK)]);
        assert_eq!(est.0, CT_STATE_ESTABLISHED);
        assert_ne!(est.1 & CT_F_ASSURED, 0);
        assert_eq!(ct_lifetime_ns(PROTO_TCP, est.0, est.1), 86_400 * SEC);
    }

    #[test]
    fn a_reset_from_either_side_closes_the_connection() {
        for dir in [ORIG, REPLY] {
            let s = run(&[(ORIG, TCP_SYN), (REPLY, TCP_SYN | TCP_ACK), (ORIG, TCP_ACK), (dir, TCP_RST | TCP_ACK)]);
            assert_eq!(s.0, CT_STATE_CLOSE);
            assert_eq!(ct_lifetime_ns(PROTO_TCP, s.0, s.1), 10 * SEC);
        }
        // A reset answering the SYN (a closed port) closes it too.
        assert_eq!(run(&[(ORIG, TCP_SYN), (REPLY, TCP_RST | TCP_ACK)]).0, CT_STATE_CLOSE);
    }

    #[test]
    fn an_orderly_close_goes_through_time_wait() {
        let open = [(ORIG, TCP_SYN), (REPLY, TCP_SYN | TCP_ACK), (ORIG, TCP_ACK)];
        // Client closes first.
        let mut steps = open.to_vec();
        steps.push((ORIG, TCP_FIN | TCP_ACK));
        assert_eq!(run(&steps).0, CT_STATE_FIN_WAIT);
        steps.push((REPLY, TCP_ACK));
        assert_eq!(run(&steps).0, CT_STATE_CLOSE_WAIT);
        steps.push((REPLY, TCP_FIN | TCP_ACK));
        assert_eq!(run(&steps).0, CT_STATE_LAST_ACK);
        steps.push((ORIG, TCP_ACK));
        assert_eq!(run(&steps).0, CT_STATE_TIME_WAIT);
        // Server closes first (HTTP with Connection: close), FIN answered by FIN directly.
        let mut steps = open.to_vec();
        steps.extend([(REPLY, TCP_FIN | TCP_ACK), (ORIG, TCP_FIN | TCP_ACK)]);
        assert_eq!(run(&steps).0, CT_STATE_LAST_ACK);
        // The client's own ACK again is not the last ACK; the server's is.
        steps.push((ORIG, TCP_ACK));
        assert_eq!(run(&steps).0, CT_STATE_LAST_ACK);
        steps.push((REPLY, TCP_ACK));
        let s = run(&steps);
        assert_eq!(s.0, CT_STATE_TIME_WAIT);
        assert!(ct_closed(&CtEntry { state: s.0, ..Default::default() }));
    }

    #[test]
    fn mid_stream_pickup_is_short_lived_until_answered() {
        let s = run(&[(ORIG, TCP_ACK)]);
        assert_eq!(s, (CT_STATE_ESTABLISHED, 0));
        assert_eq!(ct_lifetime_ns(PROTO_TCP, s.0, s.1), 60 * SEC);
        let s = run(&[(ORIG, TCP_ACK), (REPLY, TCP_ACK)]);
        assert_ne!(s.1 & CT_F_ASSURED, 0);
        assert_eq!(ct_lifetime_ns(PROTO_TCP, s.0, s.1), 86_400 * SEC);
    }

    #[test]
    fn udp_is_assured_by_an_answer_and_lives_longer_then() {
        let s = (ct_initial(PROTO_UDP, 0), 0);
        assert_eq!(ct_lifetime_ns(PROTO_UDP, s.0, s.1), 30 * SEC);
        let s = ct_advance(PROTO_UDP, s.0, s.1, ORIG, 0);
        assert_eq!(s.0, CT_STATE_UNREPLIED);
        let s = ct_advance(PROTO_UDP, s.0, s.1, REPLY, 0);
        assert_eq!(s.0, CT_STATE_REPLIED);
        assert_ne!(s.1 & CT_F_ASSURED, 0);
        assert_eq!(ct_lifetime_ns(PROTO_UDP, s.0, s.1), 120 * SEC);
    }

    #[test]
    fn liveness_counts_from_the_last_packet_in_either_direction() {
        let e = CtEntry { last_seen_ns: 100 * SEC, state: CT_STATE_CLOSE, ..Default::default() };
        assert!(ct_alive(&e, PROTO_TCP, 109 * SEC));
        assert!(!ct_alive(&e, PROTO_TCP, 111 * SEC));
        assert_eq!(ct_remaining_ns(&e, PROTO_TCP, 105 * SEC), 5 * SEC);
    }

    #[test]
    fn reply_key_follows_the_source_translation() {
        let orig = CtKey::new(1, 2, 10, 20, PROTO_TCP);
        let e = CtEntry { nat_addr: 3, nat_port: 30, ..Default::default() };
        assert_eq!(ct_reply_key(&orig, &e), CtKey::new(3, 1, 30, 10, PROTO_TCP));
        let e = CtEntry { snat_addr: 4, snat_port: 40, flags: CT_F_SNAT, ..e };
        assert_eq!(ct_reply_key(&orig, &e), CtKey::new(3, 4, 30, 40, PROTO_TCP));
    }

    #[test]
    fn a_backend_in_time_wait_accepts_a_syn_as_linux_does() {
        let old = CtClosedEnd { flags: CT_F_BACKEND_TIME_WAIT, orig_end_seq: 1000, orig_tsval: 500, _pad: 0 };
        // A newer timestamp is enough, whatever the sequence number.
        assert!(ct_backend_accepts_syn(old, 10, 501, 0));
        // An older one is PAWS-rejected, whatever the sequence number, even one tick older.
        assert!(!ct_backend_accepts_syn(old, 5000, 400, 0));
        assert!(!ct_backend_accepts_syn(old, 5000, 499, 0));
        // The same timestamp: only a sequence number past the end.
        assert!(!ct_backend_accepts_syn(old, 999, 500, 0));
        assert!(ct_backend_accepts_syn(old, 1001, 500, 0));
        // Without timestamps, the sequence number decides.
        assert!(ct_backend_accepts_syn(old, 1001, 0, 0));
        assert!(!ct_backend_accepts_syn(old, 900, 0, 0));
        // No TIME_WAIT at the backend: it closed after the client, or it has expired.
        let client_first = CtClosedEnd { flags: 0, ..old };
        assert!(ct_backend_accepts_syn(client_first, 900, 400, 0));
        assert!(ct_backend_accepts_syn(old, 900, 400, 66 * SEC));
    }

    #[test]
    fn default_size_is_kube_proxys() {
        assert_eq!(default_conntrack_max(2), 131_072);
        assert_eq!(default_conntrack_max(8), 262_144);
    }
}

/// Key of `FRAGMENTS`: one fragmented datagram as its fragments arrive (RFC 791's reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FragKey, 12);

/// Value of `FRAGMENTS`: the ports the datagram's first fragment carried (later fragments carry
/// none), network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}
assert_size!(FragPorts, 4);

/// Datagrams in flight in fragments whose translation is remembered (an LRU: a datagram whose entry
/// is displaced loses its later fragments, as one whose fragment is lost).
pub const MAX_FRAGMENTS: u32 = 8_192;
