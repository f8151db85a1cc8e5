//! The datapath's conntrack (see proxy-common's `conntrack` for the model): finding a packet's
//! connection in either direction and advancing its one state, creating connections (the reply
//! tuple claimed atomically first), displacing recent unassured ones when the table is full, and
//! removing dead ones as they are met.
//!
//! A reply tuple is what makes an SNAT port (or a client's port at a backend) one connection's, so
//! two CPUs must never both take one. A free tuple is claimed by inserting it with `BPF_NOEXIST`;
//! a held one is changed (taken over, retired, released) only under its lease (`CT_LEASES`, taken
//! with `BPF_NOEXIST` too), and only if it still reads as it did when the change was decided.
//! Deleting and re-inserting instead would let a CPU acting on what it read a moment earlier delete
//! another's fresh claim (two connections on one port), and a tuple briefly absent looks free.

use core::ptr::NonNull;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_loop},
    programs::TcContext,
};
use proxy_common::{
    BACKEND_TIME_WAIT_NS, CT_CLAIM_GRACE_NS, CT_DIR_ORIG, CT_DIR_REPLY, CT_EARLY_DROP_TRIES, CT_F_ASSURED,
    CT_F_BACKEND_TIME_WAIT, CT_F_FIN_ORIG, CT_RECENT_SLOTS, CT_REPLY_F_RETIRED, CT_UNANSWERED_TAKEOVER_NS, CtClosedEnd,
    CtEntry, CtKey, CtRecentCursor, CtReply, PROTO_TCP, STAT_CT_EARLY_DROP, STAT_CT_REOPEN, STAT_DROP_CT_FULL, TCP_FIN,
    ct_advance, ct_alive, ct_closed, ct_closing, ct_reopens, ct_reply_key, ct_superseded_by_reply,
};

use crate::{
    maps::{CONNTRACK, CT_LEASES, CT_RECENT, CT_RECENT_CURSOR, CT_REPLY},
    packet::{FRAG_LATER, Packet},
    pod_source, stats, tcp,
};

const EEXIST: i32 = -17;
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

/// Accounts a packet in direction `dir` to a connection: state, flags, last activity; and for the
/// client's segments once the connection closes, where its sequence space ends and its timestamp
/// (what a backend in TIME_WAIT will hold a new SYN on the tuple to).
#[inline(always)]
fn account(ctx: &TcContext, entry: &mut CtEntry, pkt: &Packet, dir: u8, now: u64) {
    let (state, flags) = ct_advance(pkt.proto, entry.state, entry.flags, dir, pkt.tcp_flags);
    // SAFETY of the races: other CPUs may account packets of the same connection at the same time;
    // each field is a plain integer and the next packet repeats any lost transition.
    if state != entry.state || flags != entry.flags {
        entry.state = state;
        entry.flags = flags;
    }
    if pkt.proto == PROTO_TCP
        && pkt.frag != FRAG_LATER
        && ((dir == CT_DIR_ORIG && ct_closing(state)) || (dir == CT_DIR_REPLY && pkt.tcp_flags & TCP_FIN != 0))
    {
        epx_note_close(ctx.as_ptr().cast(), pkt, entry, u32::from(dir));
    }
    let seen = if dir == CT_DIR_ORIG { &mut entry.tcp_flags_orig } else { &mut entry.tcp_flags_reply };
    if *seen & pkt.tcp_flags != pkt.tcp_flags {
        *seen |= pkt.tcp_flags;
    }
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// What a closing connection leaves at its backend: for the client's segments, where its sequence
/// space ends and its last timestamp; for the backend's FIN, whether it was sent before the client's
/// FIN reached the backend (it acknowledges less than the client sent), in which case the backend
/// goes through TIME_WAIT. A global BPF function: the option walk is verified once, not along every
/// path that accounts a packet.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_note_close(skb: *mut __sk_buff, pkt: *const Packet, entry: *mut CtEntry, dir: u32) -> i32 {
    let (Some(skb), false, false) = (NonNull::new(skb), pkt.is_null(), entry.is_null()) else { return 0 };
    // SAFETY: checked non-null: the caller's packet and the connection's map value.
    let (pkt, entry) = unsafe { (&*pkt, &mut *entry) };
    let seg = tcp::segment_of(&TcContext::new(skb), pkt);
    if seg.end_seq == 0 && seg.tsval == 0 {
        return 0;
    }
    if dir == u32::from(CT_DIR_ORIG) {
        entry.orig_end_seq = seg.end_seq;
        entry.orig_tsval = seg.tsval;
    } else {
        let client_fin_acked =
            entry.flags & CT_F_FIN_ORIG != 0 && (seg.ack.wrapping_sub(entry.orig_end_seq) as i32) >= 0;
        if !client_fin_acked {
            entry.flags |= CT_F_BACKEND_TIME_WAIT;
        }
    }
    0
}

/// Removes a connection: its reply key (if it still names this connection) and its entry. A closed
/// connection whose backend closed first and may still hold the tuple in TIME_WAIT leaves its reply
/// tuple retired instead, with how it ended: an SNAT port is not handed out as free while a backend
/// would refuse a new SYN on it.
#[inline(always)]
pub fn remove(orig: &CtKey, entry: &CtEntry) {
    epx_remove_connection(orig, entry);
}

/// [`remove`] as a global BPF function: called from many paths, each of which would otherwise carry
/// its frame (the lease and the entry read) on a stack that is deep already.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_remove_connection(orig: *const CtKey, entry: *const CtEntry) -> i32 {
    // SAFETY: checked non-null; the caller's own values.
    let (Some(orig), Some(entry)) = (unsafe { orig.as_ref() }, unsafe { entry.as_ref() }) else { return 0 };
    remove_now(orig, entry);
    0
}

#[inline(always)]
fn remove_now(orig: &CtKey, entry: &CtEntry) {
    let reply = ct_reply_key(orig, entry);
    if let Some(held) = CT_REPLY.get_ptr(&reply) {
        // SAFETY: a map value, valid for this program run.
        let seen = unsafe { *held };
        let now = now_ns();
        // Still this connection's; and nobody else is changing it (or it is theirs now).
        if seen.orig == *orig
            && let Some(held) = lease(&reply, &seen, now)
        {
            let in_time_wait = ct_closed(entry)
                && entry.flags & CT_F_BACKEND_TIME_WAIT != 0
                && now.saturating_sub(entry.last_seen_ns) < BACKEND_TIME_WAIT_NS;
            if in_time_wait {
                // SAFETY: leased to us.
                unsafe {
                    *held = CtReply {
                        claimed_ns: entry.last_seen_ns,
                        end: CtClosedEnd::of(entry),
                        flags: CT_REPLY_F_RETIRED,
                        ..seen
                    }
                };
            } else {
                let _ = CT_REPLY.remove(&reply);
            }
            unlease(&reply);
        }
    }
    let _ = CONNTRACK.remove(orig);
}

/// Takes the lease on reply tuple `reply` (see the module header), if nobody holds it and the
/// entry still reads as `seen`, what the change was decided on: the entry, ours to change until
/// [`unlease`].
#[inline(always)]
fn lease(reply: &CtKey, seen: &CtReply, now: u64) -> Option<*mut CtReply> {
    if CT_LEASES.insert(reply, &now, BPF_NOEXIST as u64).is_err() {
        return None;
    }
    match CT_REPLY.get_ptr_mut(reply) {
        // SAFETY: a map value, valid for this program run (compared in place, not copied).
        Some(held) if unsafe { &*held } == seen => Some(held),
        _ => {
            unlease(reply);
            None
        }
    }
}

#[inline(always)]
fn unlease(reply: &CtKey) {
    let _ = CT_LEASES.remove(reply);
}

/// The connection a packet in the original direction belongs to. A dead connection is removed; a
/// SYN on a closed one (TIME_WAIT, reset) starts a new connection on the same tuple, as the
/// kernel's conntrack reopens it. A pod's packet that is not the pod's own is an error (see
/// `pod_source`), found before it could move the connection's state.
#[inline(always)]
pub fn lookup_orig(ctx: &TcContext, pkt: &Packet) -> Result<Option<Conn>, u32> {
    let orig = tuple(pkt);
    let Some(ptr) = CONNTRACK.get_ptr_mut(&orig) else { return Ok(None) };
    // The clock is read only once there is a connection: a packet of none should not pay for it.
    let now = now_ns();
    // SAFETY: a map value, valid for this program run.
    let entry = unsafe { &mut *ptr };
    if !ct_alive(entry, pkt.proto, now) {
        remove(&orig, entry);
        return Ok(None);
    }
    pod_source::check_orig(ctx, entry)?;
    if pkt.proto == PROTO_TCP && ct_reopens(entry, pkt.tcp_flags) {
        remove(&orig, entry);
        stats::count(STAT_CT_REOPEN);
        return Ok(None);
    }
    account(ctx, entry, pkt, CT_DIR_ORIG, now);
    Ok(Some(Conn { orig, entry: ptr }))
}

/// The connection a packet is a reply of (its tuple is a connection's reply tuple). A pod's packet
/// that is not the pod's own is an error, as in [`lookup_orig`]; the node's own (`from_node`) are
/// trusted.
#[inline(always)]
pub fn lookup_reply(ctx: &TcContext, pkt: &Packet, from_node: bool) -> Result<Option<Conn>, u32> {
    let reply = tuple(pkt);
    let Some(held) = CT_REPLY.get_ptr(&reply) else { return Ok(None) };
    let now = now_ns();
    let orig = unsafe { (*held).orig };
    // Missing, or holding another reply tuple: a connection being created, or a leftover (which
    // the collector or the next claim removes).
    let Some(ptr) = CONNTRACK.get_ptr_mut(&orig) else { return Ok(None) };
    let entry = unsafe { &mut *ptr };
    if ct_reply_key(&orig, entry) != reply {
        return Ok(None);
    }
    if !ct_alive(entry, pkt.proto, now) || (pkt.proto == PROTO_TCP && ct_superseded_by_reply(entry, pkt.tcp_flags)) {
        remove(&orig, entry);
        return Ok(None);
    }
    if !from_node {
        pod_source::check_reply(ctx, entry, pkt.saddr)?;
    }
    account(ctx, entry, pkt, CT_DIR_REPLY, now);
    Ok(Some(Conn { orig, entry: ptr }))
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
    Closed { last_seen_ns: u64, end: CtClosedEnd },
    /// A live connection nobody has answered since `created_ns`, long enough ago that it may be
    /// displaced (`CT_UNANSWERED_TAKEOVER_NS`).
    Unanswered { created_ns: u64 },
}

/// Who holds `reply` now (a read-only look).
#[inline(always)]
pub fn holder(reply: &CtKey, now: u64) -> Holder {
    let Some(held) = CT_REPLY.get_ptr(reply) else { return Holder::Free };
    // SAFETY: a map value, valid for this program run.
    match holder_of(reply, &unsafe { *held }, now) {
        // Another CPU is taking it over (or retiring, releasing it) right now: what we read may be
        // half its, and it will be the other CPU's.
        Holder::Dead | Holder::Closed { .. } | Holder::Unanswered { .. } if CT_LEASES.get_ptr(reply).is_some() => {
            Holder::Live
        }
        other => other,
    }
}

/// Who holds `reply`, whose entry reads `held`.
#[inline(always)]
fn holder_of(reply: &CtKey, held: &CtReply, now: u64) -> Holder {
    // By reference, not copied: this runs deep in the new-connection path's stack.
    // SAFETY: a map value, valid for this program run.
    let connection = CONNTRACK.get_ptr(&held.orig).map(|e| unsafe { &*e });
    let Some(e) = connection.filter(|e| ct_reply_key(&held.orig, e) == *reply) else {
        let idle = now.saturating_sub(held.claimed_ns);
        // A retired tuple whose backend may still hold it in TIME_WAIT.
        if held.flags & CT_REPLY_F_RETIRED != 0 && idle < BACKEND_TIME_WAIT_NS {
            return Holder::Closed { last_seen_ns: held.claimed_ns, end: held.end };
        }
        // Claimed for a connection another CPU is writing right now, or a leftover.
        return if held.flags & CT_REPLY_F_RETIRED == 0 && idle < CT_CLAIM_GRACE_NS {
            Holder::Live
        } else {
            Holder::Dead
        };
    };
    if !ct_alive(e, held.orig.proto, now) {
        Holder::Dead
    } else if ct_closed(e) {
        Holder::Closed { last_seen_ns: e.last_seen_ns, end: CtClosedEnd::of(e) }
    } else if e.flags & CT_F_ASSURED == 0 && now.saturating_sub(e.created_ns) > CT_UNANSWERED_TAKEOVER_NS {
        Holder::Unanswered { created_ns: e.created_ns }
    } else {
        Holder::Live
    }
}

/// Claims `reply` for the connection `orig`, atomically across CPUs, so two new connections never
/// share an SNAT port or a tuple at the backend: a free tuple by inserting it with `BPF_NOEXIST`; one
/// held by a dead, closed or unanswered connection (the caller decided it may go) under its lease,
/// the old holder removed and the tuple rewritten in place. `Ok(false)`: another connection holds
/// it, or another CPU got to it first.
#[inline(always)]
pub fn claim(reply: &CtKey, orig: &CtKey, now: u64) -> Result<bool, u32> {
    claim_as(reply, orig, now, CLAIM_TAKE_OVER)
}

/// [`claim`], but only if the tuple is free or its holder dead — never one a connection that is
/// over, or unanswered, still holds (a client's own port at a backend that may hold it).
#[inline(always)]
pub fn claim_if_unheld(reply: &CtKey, orig: &CtKey, now: u64) -> Result<bool, u32> {
    claim_as(reply, orig, now, CLAIM_UNHELD)
}

/// How far a claim may go: also over closed and unanswered holders, or only over dead ones.
const CLAIM_TAKE_OVER: u32 = 0;
const CLAIM_UNHELD: u32 = 1;

#[inline(always)]
fn claim_as(reply: &CtKey, orig: &CtKey, now: u64, mode: u32) -> Result<bool, u32> {
    match epx_claim_reply(reply, orig, now, mode) {
        1 => Ok(true),
        0 => Ok(false),
        reason => Err(-reason as u32),
    }
}

/// [`claim`] as a global BPF function (verified once): 1 claimed, 0 held by another, or minus the
/// drop reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_claim_reply(reply: *const CtKey, orig: *const CtKey, now: u64, mode: u32) -> i32 {
    if reply.is_null() || orig.is_null() {
        return -(STAT_DROP_CT_FULL as i32);
    }
    // SAFETY: checked non-null; the caller's own stack values.
    match claim_now(unsafe { &*reply }, unsafe { &*orig }, now, mode) {
        Ok(claimed) => i32::from(claimed),
        Err(reason) => -(reason as i32),
    }
}

#[inline(always)]
fn claim_now(reply: &CtKey, orig: &CtKey, now: u64, mode: u32) -> Result<bool, u32> {
    // A free tuple is the common case: the insert claims it at once (and is what decides a race).
    let value = CtReply { orig: *orig, claimed_ns: now, ..CtReply::default() };
    if insert_new(|| CT_REPLY.insert(reply, &value, BPF_NOEXIST as u64))? {
        return Ok(true);
    }
    let Some(held) = CT_REPLY.get_ptr(reply) else {
        // Deleted since the insert found it: free again, for whoever inserts first.
        return insert_new(|| CT_REPLY.insert(reply, &value, BPF_NOEXIST as u64));
    };
    // SAFETY: a map value, valid for this program run.
    let seen = unsafe { *held };
    match holder_of(reply, &seen, now) {
        Holder::Free | Holder::Live => return Ok(false),
        Holder::Closed { .. } | Holder::Unanswered { .. } if mode == CLAIM_UNHELD => return Ok(false),
        _ => {}
    }
    let Some(held) = lease(reply, &seen, now) else { return Ok(false) };
    // The connection that held it goes (if the tuple is still its).
    if let Some(e) = CONNTRACK.get_ptr(&seen.orig)
        && ct_reply_key(&seen.orig, unsafe { &*e }) == *reply
    {
        let _ = CONNTRACK.remove(&seen.orig);
    }
    // SAFETY: leased to us.
    unsafe {
        (*held).orig = *orig;
        (*held).claimed_ns = now;
        (*held).end = CtClosedEnd::default();
        (*held).flags = 0;
    }
    unlease(reply);
    Ok(true)
}

/// Gives up a claimed reply tuple (the connection could not be created after all).
#[inline(always)]
pub fn release_reply(reply: &CtKey, orig: &CtKey) {
    if let Some(held) = CT_REPLY.get_ptr(reply) {
        // SAFETY: a map value, valid for this program run.
        let seen = unsafe { *held };
        if seen.orig == *orig && lease(reply, &seen, now_ns()).is_some() {
            let _ = CT_REPLY.remove(reply);
            unlease(reply);
        }
    }
}

/// Writes a new connection whose reply tuple is already claimed. `Ok(false)`: another CPU created the
/// same connection first (the caller uses that one).
#[inline(always)]
pub fn create(orig: &CtKey, entry: &CtEntry) -> Result<bool, u32> {
    let created = insert_new(|| CONNTRACK.insert(orig, entry, BPF_NOEXIST as u64))?;
    if created && entry.flags & CT_F_ASSURED == 0 {
        remember_recent(orig);
    }
    Ok(created)
}

/// Runs an insert. `Ok(false)` when the key exists; `Err` when the table is full (the caller makes
/// room with [`epx_early_drop`] and tries the whole connection again: done from the program's entry,
/// the search's frames are not stacked on the connection's).
#[inline(always)]
fn insert_new(insert: impl Fn() -> Result<(), i32>) -> Result<bool, u32> {
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

/// netfilter's early drop: removes the oldest recent connection that is still not assured. An
/// assured connection is never displaced. Returns 1 when one was removed.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_early_drop() -> i32 {
    i32::from(early_drop())
}

#[inline(always)]
fn early_drop() -> bool {
    let Some(cursor) = CT_RECENT_CURSOR.get_ptr_mut(0) else { return false };
    let mut search = EarlyDrop { cursor, done: 0 };
    unsafe { bpf_loop(CT_EARLY_DROP_TRIES, early_drop_step as *mut c_void, (&raw mut search).cast(), 0) };
    search.done != 0
}
