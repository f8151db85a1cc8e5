//! The datapath's conntrack (see proxy-common's `conntrack` for the model): finding a packet's
//! connection in either direction and advancing its one state, creating connections (the reply
//! tuple claimed atomically first), displacing recent unassured ones when the table is full, and
//! removing dead ones as they are met.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_loop},
};
use proxy_common::{
    CT_CLAIM_GRACE_NS, CT_DIR_ORIG, CT_DIR_REPLY, CT_EARLY_DROP_TRIES, CT_F_ASSURED, CT_RECENT_SLOTS,
    CT_UNANSWERED_TAKEOVER_NS, CtEntry, CtKey, CtRecentCursor, CtReply, PROTO_TCP, STAT_CT_EARLY_DROP, STAT_CT_REOPEN,
    STAT_DROP_CT_FULL, ct_advance, ct_alive, ct_closed, ct_reopens, ct_reply_key, ct_superseded_by_reply,
};

use crate::{
    maps::{CONNTRACK, CT_RECENT, CT_RECENT_CURSOR, CT_REPLY},
    packet::Packet,
    stats,
};

const EEXIST: i32 = -17;
const E2BIG: i32 = -7;
/// Timestamps are refreshed at most this often: a write per packet to a line every CPU reads would
/// cost more than the precision is worth.
const REFRESH_NS: u64 = 100_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The packet's own tuple: the original key when it is a client's, the reply key when a backend's.
#[inline(always)]
pub fn tuple(pkt: &Packet) -> CtKey {
    CtKey::new(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
}

/// A live connection found for a packet: its original tuple and its entry in the map (this packet
/// already accounted). A pointer, not a copy: the programs' stack is small.
#[derive(Clone, Copy)]
pub struct Conn {
    pub orig: CtKey,
    entry: *mut CtEntry,
}

impl Conn {
    #[inline(always)]
    pub fn entry(&self) -> &CtEntry {
        // SAFETY: a map value stays valid for the program run, even if the element is deleted.
        unsafe { &*self.entry }
    }
}

/// Accounts a packet in direction `dir` to a connection: state, flags, last activity.
#[inline(always)]
fn account(entry: &mut CtEntry, pkt: &Packet, dir: u8, now: u64) {
    let (state, flags) = ct_advance(pkt.proto, entry.state, entry.flags, dir, pkt.tcp_flags);
    // SAFETY of the races: other CPUs may account packets of the same connection at the same time;
    // each field is a plain integer and the next packet repeats any lost transition.
    if state != entry.state || flags != entry.flags {
        entry.state = state;
        entry.flags = flags;
    }
    let seen = if dir == CT_DIR_ORIG { &mut entry.tcp_flags_orig } else { &mut entry.tcp_flags_reply };
    if *seen & pkt.tcp_flags != pkt.tcp_flags {
        *seen |= pkt.tcp_flags;
    }
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// Removes a connection: its reply key (if it still names this connection) and its entry.
#[inline(always)]
pub fn remove(orig: &CtKey, entry: &CtEntry) {
    let reply = ct_reply_key(orig, entry);
    if let Some(held) = CT_REPLY.get_ptr(&reply)
        && unsafe { (*held).orig } == *orig
    {
        let _ = CT_REPLY.remove(&reply);
    }
    let _ = CONNTRACK.remove(orig);
}

/// The connection a packet in the original direction belongs to. A dead connection is removed; a
/// SYN on a closed one (TIME_WAIT, reset) starts a new connection on the same tuple, as the
/// kernel's conntrack reopens it.
#[inline(always)]
pub fn lookup_orig(pkt: &Packet, now: u64) -> Option<Conn> {
    let orig = tuple(pkt);
    let ptr = CONNTRACK.get_ptr_mut(&orig)?;
    // SAFETY: a map value, valid for this program run.
    let entry = unsafe { &mut *ptr };
    if !ct_alive(entry, pkt.proto, now) {
        remove(&orig, entry);
        return None;
    }
    if pkt.proto == PROTO_TCP && ct_reopens(entry, pkt.tcp_flags) {
        remove(&orig, entry);
        stats::count(STAT_CT_REOPEN);
        return None;
    }
    account(entry, pkt, CT_DIR_ORIG, now);
    Some(Conn { orig, entry: ptr })
}

/// The connection a packet is a reply of (its tuple is a connection's reply tuple).
#[inline(always)]
pub fn lookup_reply(pkt: &Packet, now: u64) -> Option<Conn> {
    let reply = tuple(pkt);
    let orig = unsafe { (*CT_REPLY.get_ptr(&reply)?).orig };
    // Missing, or holding another reply tuple: a connection being created, or a leftover (which
    // the collector or the next claim removes).
    let ptr = CONNTRACK.get_ptr_mut(&orig)?;
    let entry = unsafe { &mut *ptr };
    if ct_reply_key(&orig, entry) != reply {
        return None;
    }
    if !ct_alive(entry, pkt.proto, now) || (pkt.proto == PROTO_TCP && ct_superseded_by_reply(entry, pkt.tcp_flags)) {
        remove(&orig, entry);
        return None;
    }
    account(entry, pkt, CT_DIR_REPLY, now);
    Some(Conn { orig, entry: ptr })
}

/// Who holds a reply tuple.
#[derive(Clone, Copy)]
pub enum Holder {
    /// Nobody.
    Free,
    /// A connection that is dead, or a leftover that names no connection: may be cleared.
    Dead,
    /// A live connection that has not finished.
    Live,
    /// A connection that is over on both sides (TIME_WAIT, reset), idle since `last_seen_ns`.
    Closed { last_seen_ns: u64 },
    /// A live connection nobody has answered since `created_ns`, long enough ago that it may be
    /// displaced (`CT_UNANSWERED_TAKEOVER_NS`).
    Unanswered { created_ns: u64 },
}

/// Who holds `reply` now (a read-only look).
#[inline(always)]
pub fn holder(reply: &CtKey, now: u64) -> Holder {
    let Some(held) = CT_REPLY.get_ptr(reply) else { return Holder::Free };
    let held = unsafe { *held };
    let connection = CONNTRACK.get_ptr(&held.orig).map(|e| unsafe { *e });
    let Some(e) = connection.filter(|e| ct_reply_key(&held.orig, e) == *reply) else {
        // Claimed for a connection another CPU is writing right now, or a leftover.
        return if now.saturating_sub(held.claimed_ns) < CT_CLAIM_GRACE_NS { Holder::Live } else { Holder::Dead };
    };
    if !ct_alive(&e, held.orig.proto, now) {
        Holder::Dead
    } else if ct_closed(&e) {
        Holder::Closed { last_seen_ns: e.last_seen_ns }
    } else if e.flags & CT_F_ASSURED == 0 && now.saturating_sub(e.created_ns) > CT_UNANSWERED_TAKEOVER_NS {
        Holder::Unanswered { created_ns: e.created_ns }
    } else {
        Holder::Live
    }
}

/// Claims `reply` for the connection `orig` with `BPF_NOEXIST` — atomic across CPUs, so two new
/// connections never share an SNAT port or a tuple at the backend. A dead, closed or unanswered
/// holder (the caller decided it may go) is removed first. `Ok(false)`: another connection holds it.
#[inline(always)]
pub fn claim(reply: &CtKey, orig: &CtKey, now: u64) -> Result<bool, u32> {
    match holder(reply, now) {
        Holder::Free => {}
        Holder::Live => return Ok(false),
        Holder::Dead | Holder::Closed { .. } | Holder::Unanswered { .. } => {
            if let Some(held) = CT_REPLY.get_ptr(reply) {
                let holder = unsafe { (*held).orig };
                if let Some(e) = CONNTRACK.get_ptr(&holder) {
                    let e = unsafe { *e };
                    if ct_reply_key(&holder, &e) == *reply {
                        let _ = CONNTRACK.remove(&holder);
                    }
                }
                let _ = CT_REPLY.remove(reply);
            }
        }
    }
    let value = CtReply { orig: *orig, claimed_ns: now };
    insert_or_early_drop(|| CT_REPLY.insert(reply, &value, BPF_NOEXIST as u64))
}

/// Gives up a claimed reply tuple (the connection could not be created after all).
#[inline(always)]
pub fn release_reply(reply: &CtKey, orig: &CtKey) {
    if let Some(held) = CT_REPLY.get_ptr(reply)
        && unsafe { (*held).orig } == *orig
    {
        let _ = CT_REPLY.remove(reply);
    }
}

/// Writes a new connection whose reply tuple is already claimed. `Ok(false)`: another CPU created the
/// same connection first (the caller uses that one).
#[inline(always)]
pub fn create(orig: &CtKey, entry: &CtEntry) -> Result<bool, u32> {
    let created = insert_or_early_drop(|| CONNTRACK.insert(orig, entry, BPF_NOEXIST as u64))?;
    if created && entry.flags & CT_F_ASSURED == 0 {
        remember_recent(orig);
    }
    Ok(created)
}

/// Runs an insert; when the table is full, displaces a recent unassured connection and tries once
/// more. `Ok(false)` when the key exists; `Err` when there is no room.
#[inline(always)]
fn insert_or_early_drop(insert: impl Fn() -> Result<(), i32>) -> Result<bool, u32> {
    match insert() {
        Ok(()) => return Ok(true),
        Err(EEXIST) => return Ok(false),
        Err(E2BIG) => {}
        Err(_) => return Err(STAT_DROP_CT_FULL),
    }
    if !early_drop() {
        return Err(STAT_DROP_CT_FULL);
    }
    match insert() {
        Ok(()) => Ok(true),
        Err(EEXIST) => Ok(false),
        Err(_) => Err(STAT_DROP_CT_FULL),
    }
}

/// Records a new, unassured connection in the ring of recent ones (overwriting the oldest). CPUs
/// race for slots without locks: at worst a connection is not recorded and cannot be displaced.
#[inline(always)]
fn remember_recent(orig: &CtKey) {
    let Some(cursor) = CT_RECENT_CURSOR.get_ptr_mut(0) else { return };
    // SAFETY: the array's one value, valid for the program run. The increment is not atomic (the
    // target has no fetch-and-add): two CPUs may take one slot, and one of the two connections is
    // then not recorded.
    let cursor = unsafe { &mut *cursor };
    let head = cursor.head;
    cursor.head = head.wrapping_add(1);
    let _ = CT_RECENT.set((head % u64::from(CT_RECENT_SLOTS)) as u32, orig, BPF_ANY as u64);
}

/// State of an early-drop search (the `bpf_loop` callback's context).
#[repr(C)]
struct EarlyDrop {
    cursor: *mut CtRecentCursor,
    done: u32,
}

/// One step of the search: the oldest recent connection not yet looked at, removed if it is still
/// not assured. Verified once, however many steps run.
extern "C" fn early_drop_step(_: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the context given to it, an `EarlyDrop` on the caller's stack whose
    // cursor points at the array's value.
    let search = unsafe { &mut *(ctx as *mut EarlyDrop) };
    let cursor = unsafe { &mut *search.cursor };
    let (head, tail) = (cursor.head, cursor.tail);
    if head == tail {
        return 1;
    }
    // Slots older than a full ring were overwritten: skip ahead to the oldest still there.
    let slots = u64::from(CT_RECENT_SLOTS);
    let tail = if head.wrapping_sub(tail) > slots { head.wrapping_sub(slots) } else { tail };
    cursor.tail = tail.wrapping_add(1);
    let Some(victim) = CT_RECENT.get_ptr((tail % slots) as u32) else { return 0 };
    let victim = unsafe { *victim };
    let Some(e) = CONNTRACK.get_ptr(&victim) else { return 0 };
    let e = unsafe { *e };
    if e.flags & CT_F_ASSURED != 0 {
        return 0;
    }
    remove(&victim, &e);
    stats::count(STAT_CT_EARLY_DROP);
    search.done = 1;
    1
}

/// netfilter's early drop: removes the oldest recent connection of this CPU that is still not
/// assured. An assured connection is never displaced.
#[inline(never)]
fn early_drop() -> bool {
    let Some(cursor) = CT_RECENT_CURSOR.get_ptr_mut(0) else { return false };
    let mut search = EarlyDrop { cursor, done: 0 };
    unsafe { bpf_loop(CT_EARLY_DROP_TRIES, early_drop_step as *mut c_void, (&raw mut search).cast(), 0) };
    search.done != 0
}
