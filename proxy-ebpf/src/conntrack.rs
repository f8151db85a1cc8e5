//! The datapath's conntrack: one entry per direction of a translated connection.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use proxy_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN_SENT, CtEntry, CtKey, PROTO_TCP,
    STAT_DROP_CT_FULL, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ct_alive,
};

use crate::{maps::CONNTRACK, packet::Packet};

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
    CtKey { saddr, daddr, sport, dport, proto, dir, _pad: 0 }
}

/// Key of the client → Service direction for this packet.
#[inline(always)]
pub fn service_key(pkt: &Packet) -> CtKey {
    key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, CT_DIR_SERVICE)
}

/// Key of the backend → client direction for this packet (as it arrives from the backend).
#[inline(always)]
pub fn reply_key(pkt: &Packet) -> CtKey {
    key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto, CT_DIR_REPLY)
}

/// The state a TCP entry moves to on a packet with `flags`; other protocols are always established.
#[inline(always)]
fn next_state(proto: u8, state: u8, flags: u8, dir: u8) -> u8 {
    if proto != PROTO_TCP {
        return CT_STATE_ESTABLISHED;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        CT_STATE_CLOSING
    } else if state == CT_STATE_CLOSING {
        state
    } else if dir == CT_DIR_REPLY || (flags & TCP_ACK != 0 && state != 0) {
        CT_STATE_ESTABLISHED
    } else if flags & TCP_SYN != 0 {
        CT_STATE_SYN_SENT
    } else {
        // Mid-stream packet of a connection we had not seen (e.g. after a restart): not a new handshake.
        CT_STATE_ESTABLISHED
    }
}

/// Looks up a live entry and refreshes it for this packet. A TCP SYN on an entry that is closing
/// starts a new connection on a reused port: the old entry does not count.
#[inline(always)]
pub fn lookup_refresh(key: &CtKey, pkt: &Packet, now: u64) -> Option<CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the map value stays valid for the duration of the program; concurrent updates of the
    // timestamps and flags from other CPUs are benign races on plain integers.
    let entry = unsafe { &mut *entry };
    if !ct_alive(entry, pkt.proto, now) {
        return None;
    }
    let new_syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if pkt.proto == PROTO_TCP && new_syn && entry.state == CT_STATE_CLOSING {
        return None;
    }
    // A SYN-ACK on the reply side of a finished connection belongs to a new one that reuses the
    // tuple without our translation — a client now talking to the pod directly (socket-level LB,
    // or a plain pod-to-pod connection) from a port an earlier Service connection used. The old
    // entry must not rewrite it, nor anything after it.
    let syn_ack = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    if pkt.proto == PROTO_TCP && syn_ack && key.dir == CT_DIR_REPLY && entry.state == CT_STATE_CLOSING {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    entry.last_seen_ns = now;
    entry.tcp_flags |= pkt.tcp_flags;
    entry.state = next_state(pkt.proto, entry.state, pkt.tcp_flags, key.dir);
    Some(*entry)
}

/// Where one direction of a connection is rewritten to.
#[derive(Clone, Copy)]
pub struct Translation {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// With `CT_F_SNAT` in `flags`: the other end's rewrite (see `CtEntry`).
    pub snat_addr: u32,
    pub snat_port: u16,
    pub flags: u16,
}

impl Translation {
    #[inline(always)]
    pub fn of(entry: &CtEntry) -> Self {
        Self {
            nat_addr: entry.nat_addr,
            nat_port: entry.nat_port,
            backend_id: entry.backend_id,
            service_id: entry.service_id,
            snat_addr: entry.snat_addr,
            snat_port: entry.snat_port,
            flags: entry.flags,
        }
    }
}

/// The state a new connection starts in, from its first packet.
#[inline(always)]
pub fn initial_state(pkt: &Packet) -> u8 {
    next_state(pkt.proto, 0, pkt.tcp_flags, CT_DIR_SERVICE)
}

/// Writes the entry for one direction. Both directions of a connection start in the same state.
#[inline(always)]
pub fn create(key: &CtKey, now: u64, state: u8, tcp_flags: u8, t: &Translation) -> Result<(), u32> {
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: t.nat_addr,
        backend_id: t.backend_id,
        service_id: t.service_id,
        nat_port: t.nat_port,
        tcp_flags,
        state,
        snat_addr: t.snat_addr,
        snat_port: t.snat_port,
        flags: t.flags,
    };
    CONNTRACK.insert(key, &entry, BPF_ANY as u64).map_err(|_| STAT_DROP_CT_FULL)
}

/// Whether an entry exists for `key` (alive or not; used to restore an evicted reply entry).
#[inline(always)]
pub fn exists(key: &CtKey) -> bool {
    CONNTRACK.get_ptr(key).is_some()
}

/// Whether a live reply entry holds `key` for a connection other than `client` → `frontend`: the
/// backend already pairs that client address and port with itself (for another frontend, or the
/// same one after source NAT), possibly still in TIME_WAIT.
#[inline(always)]
pub fn held_by_other(key: &CtKey, client: (u32, u16), frontend: (u32, u16), now: u64) -> bool {
    match CONNTRACK.get_ptr(key) {
        Some(e) => {
            let e = unsafe { &*e };
            ct_alive(e, key.proto, now)
                && (e.snat_addr, e.snat_port, e.nat_addr, e.nat_port) != (client.0, client.1, frontend.0, frontend.1)
        }
        None => false,
    }
}

/// Whether a live entry holds `key` (an SNAT port is taken).
#[inline(always)]
pub fn in_use(key: &CtKey, now: u64) -> bool {
    match CONNTRACK.get_ptr(key) {
        Some(e) => ct_alive(unsafe { &*e }, key.proto, now),
        None => false,
    }
}
