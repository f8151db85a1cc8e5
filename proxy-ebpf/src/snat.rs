//! Source NAT: a source port from the reserved range that no live connection between the same source
//! address and backend holds — for masquerading to the node address, and for a client whose own port
//! clashes at the backend. The port is claimed by inserting the connection's reply tuple with
//! `BPF_NOEXIST` (atomic across CPUs; a claim lost to another CPU probes again) and held until the
//! connection is removed. When every port tried is held, one held by a connection that is already
//! over (TIME_WAIT, reset) is taken over — the longest idle — as netfilter lets a new connection
//! reuse a TIME_WAIT tuple; failing that, one held by a connection nobody has answered for seconds
//! (an unfinished handshake), so aborted and spoofed handshakes cannot lock a backend out.
//!
//! A backend that closed first holds the tuple in TIME_WAIT for a minute and takes a new SYN on it
//! only if the SYN's timestamp is newer, or its sequence number past the old connection's end; with
//! clients that randomize timestamps per connection half the tuples fail that, and the SYN is
//! answered with an ACK, reset by the client and retried a second later. So among closed holders,
//! those the backend will accept this very SYN over are taken first (the client's last timestamp and
//! sequence number are kept for this as the connection closes): reuse at a few seconds' interval
//! without the one-second stalls.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    CT_F_SNAT, CtEntry, CtKey, NodeConfig, SNAT_RETRIES, STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT_COLLISION,
    STAT_SNAT_REUSE_BACKEND_TIME_WAIT, STAT_SNAT_REUSE_CLOSED, STAT_SNAT_REUSE_UNANSWERED, ct_backend_accepts_syn,
};

use crate::{
    conntrack::{self, Holder},
    stats,
    tcp::Segment,
};

/// A search of the port range.
#[repr(C)]
pub struct Probe {
    now: u64,
    /// Last activity of the longest idle closed holder the backend would accept the SYN over
    /// (`u64::MAX`: none).
    reusable_seen: u64,
    /// The same among closed holders whose tuple the backend still holds against this SYN.
    risky_seen: u64,
    /// Creation of the oldest unanswered holder seen (`u64::MAX`: none).
    unanswered_created: u64,
    /// The new connection's first segment: sequence number and TSval (0: none, or not TCP).
    syn_seq: u32,
    syn_tsval: u32,
    backend_addr: u32,
    source_addr: u32,
    min: u32,
    span: u32,
    start: u32,
    collisions: u32,
    backend_port: u16,
    /// A port nobody live holds (network byte order; 0: none found).
    claimed: u16,
    reusable: u16,
    risky: u16,
    unanswered: u16,
    proto: u8,
    _pad: u8,
}

impl Probe {
    #[inline(always)]
    fn port(&self, i: u32) -> u16 {
        ((self.min + (self.start + i) % self.span) as u16).to_be()
    }

    #[inline(always)]
    fn reply(&self, port: u16) -> CtKey {
        CtKey::new(self.backend_addr, self.source_addr, self.backend_port, port, self.proto)
    }
}

/// Looks at port `i` of the search; 1 (stop) at the first one nobody live holds. Read-only. A global
/// function, called from a bounded loop rather than as a `bpf_loop` callback: the verifier checks it
/// once, on its own, and never tracks precision back through its map lookups — which, done inside a
/// callback, trips a verifier bug on some 6.18 kernels ("backtracking call unexpected regs").
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_probe_port(probe: *mut Probe, i: u32) -> i32 {
    // SAFETY: the search's context, a `Probe` on the caller's stack (checked non-null).
    let Some(probe) = (unsafe { probe.as_mut() }) else { return 1 };
    let port = probe.port(i);
    match conntrack::holder(&probe.reply(port), probe.now) {
        Holder::Free | Holder::Dead => {
            probe.claimed = port;
            return 1;
        }
        Holder::Live => probe.collisions += 1,
        Holder::Closed { last_seen_ns, end } => {
            let idle = probe.now.saturating_sub(last_seen_ns);
            if ct_backend_accepts_syn(end, probe.syn_seq, probe.syn_tsval, idle) {
                if last_seen_ns < probe.reusable_seen {
                    probe.reusable = port;
                    probe.reusable_seen = last_seen_ns;
                }
            } else if last_seen_ns < probe.risky_seen {
                probe.risky = port;
                probe.risky_seen = last_seen_ns;
            }
        }
        Holder::Unanswered { created_ns } => {
            probe.collisions += 1;
            if created_ns < probe.unanswered_created {
                probe.unanswered = port;
                probe.unanswered_created = created_ns;
            }
        }
    }
    0
}

/// Gives connection `orig` (whose backend is in `entry`, whose first segment is `syn`) the source
/// `source_addr` and a free port, claiming its reply tuple. On success `entry` carries the
/// translation.
#[inline(always)]
pub fn allocate(
    entry: &mut CtEntry,
    orig: &CtKey,
    syn: Segment,
    source_addr: u32,
    cfg: &NodeConfig,
    now: u64,
) -> Result<(), u32> {
    let min = cfg.snat_port_min as u32;
    let span = (cfg.snat_port_max as u32).saturating_sub(min) + 1;
    let mut probe = Probe {
        now,
        reusable_seen: u64::MAX,
        risky_seen: u64::MAX,
        unanswered_created: u64::MAX,
        syn_seq: syn.seq,
        syn_tsval: syn.tsval,
        backend_addr: entry.nat_addr,
        source_addr,
        min,
        span,
        start: 0,
        collisions: 0,
        backend_port: entry.nat_port,
        claimed: 0,
        reusable: 0,
        risky: 0,
        unanswered: 0,
        proto: orig.proto,
        _pad: 0,
    };
    // A claim lost to another CPU between the search and the insert searches once more.
    for _ in 0..2 {
        // A fresh window and fresh candidates: the port just lost to another CPU (and the ones seen
        // around it) are no candidates any more.
        probe.start = unsafe { bpf_get_prandom_u32() } % span;
        probe.claimed = 0;
        probe.reusable_seen = u64::MAX;
        probe.risky_seen = u64::MAX;
        probe.unanswered_created = u64::MAX;
        for i in 0..SNAT_RETRIES {
            if epx_probe_port(&raw mut probe, i) != 0 {
                break;
            }
        }
        // A free port; else the longest idle closed one the backend takes the SYN over; else the
        // oldest nobody answered; else a closed one the backend still holds (it answers the SYN with
        // an ACK, the client resets and retries a second later: slow, not lost).
        let (port, reused) = if probe.claimed != 0 {
            (probe.claimed, 0)
        } else if probe.reusable_seen != u64::MAX {
            (probe.reusable, STAT_SNAT_REUSE_CLOSED)
        } else if probe.unanswered_created != u64::MAX {
            (probe.unanswered, STAT_SNAT_REUSE_UNANSWERED)
        } else if probe.risky_seen != u64::MAX {
            (probe.risky, STAT_SNAT_REUSE_BACKEND_TIME_WAIT)
        } else {
            break;
        };
        if conntrack::claim(&probe.reply(port), orig, now)? {
            if reused != 0 {
                stats::count(reused);
            }
            entry.snat_addr = source_addr;
            entry.snat_port = port;
            entry.flags |= CT_F_SNAT;
            stats::add(STAT_SNAT_COLLISION, u64::from(probe.collisions));
            return Ok(());
        }
        probe.collisions += 1;
    }
    stats::add(STAT_SNAT_COLLISION, u64::from(probe.collisions));
    Err(STAT_DROP_SNAT_EXHAUSTED)
}
