//! What of a TCP segment a SYN on a reused tuple depends on: its sequence numbers and its timestamp
//! (RFC 7323 TSval). A backend holding the old connection in TIME_WAIT accepts a new SYN on the same
//! tuple only if its timestamp is newer than the last one it saw from the client, or, without
//! timestamps, its sequence number is past the old connection's end (Linux's
//! tcp_timewait_state_process); see snat.rs for how that picks the port to reuse.

use core::ptr::NonNull;

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, cty::c_void, helpers::bpf_loop, programs::TcContext};

use crate::packet::Packet;

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_TIMESTAMP: u8 = 10;
/// Options looked at before giving up (NOPs count): enough for every stack's SYN and data segments.
const MAX_OPTIONS: u32 = 12;

/// A segment's sequence span and timestamp.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Segment {
    pub seq: u32,
    /// The sequence number after it (payload, and one for SYN and FIN).
    pub end_seq: u32,
    /// TSval, 0 when the segment carries no timestamp.
    pub tsval: u32,
    /// The acknowledgment number.
    pub ack: u32,
}

/// The segment of a TCP packet, all zero when unreadable or not TCP. A global BPF function, so each
/// place that needs it costs a call, not another copy of the option walk to verify.
#[inline(always)]
pub fn segment_of(ctx: &TcContext, pkt: &Packet) -> Segment {
    let mut seg = Segment::default();
    epx_tcp_segment(ctx.as_ptr().cast(), pkt, &mut seg);
    seg
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_tcp_segment(skb: *mut __sk_buff, pkt: *const Packet, out: *mut Segment) -> i32 {
    let (Some(skb), false, false) = (NonNull::new(skb), pkt.is_null(), out.is_null()) else { return 0 };
    // SAFETY: checked non-null; the caller's own stack values.
    let pkt = unsafe { &*pkt };
    if pkt.proto != proxy_common::PROTO_TCP {
        return 0;
    }
    if let Some(seg) = segment(&TcContext::new(skb), pkt) {
        unsafe { *out = seg };
    }
    0
}

/// Reads the segment of a TCP packet.
#[inline(always)]
fn segment(ctx: &TcContext, pkt: &Packet) -> Option<Segment> {
    let [seq, ack] = ctx.load::<[u32; 2]>(pkt.l4_off + 4).ok()?.map(u32::from_be);
    let hlen = ((ctx.load::<u8>(pkt.l4_off + 12).ok()? >> 4) as usize) * 4;
    let payload = pkt.l4_end.saturating_sub(pkt.l4_off + hlen) as u32;
    let flags = (pkt.tcp_flags & 0x01 != 0) as u32 + (pkt.tcp_flags & 0x02 != 0) as u32;
    Some(Segment { seq, end_seq: seq.wrapping_add(payload + flags), tsval: tsval(ctx, pkt.l4_off, hlen), ack })
}

/// A walk over TCP options (the `bpf_loop` callback's context).
#[repr(C)]
struct OptionWalk {
    skb: *mut __sk_buff,
    /// Offset of the next option from the frame start, and of the end of the options.
    off: u32,
    end: u32,
    tsval: u32,
}

/// One option of the walk: stops at the timestamp, the end of the options or anything malformed.
/// Verified once, however many options there are.
extern "C" fn option_step(_: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the context given to it, an `OptionWalk` on the caller's stack.
    let walk = unsafe { &mut *(ctx as *mut OptionWalk) };
    let Some(skb) = NonNull::new(walk.skb) else { return 1 };
    let ctx = TcContext::new(skb);
    if walk.off >= walk.end {
        return 1;
    }
    let Ok([kind, len]) = ctx.load::<[u8; 2]>(walk.off as usize) else { return 1 };
    match kind {
        TCPOPT_EOL => 1,
        TCPOPT_NOP => {
            walk.off += 1;
            0
        }
        TCPOPT_TIMESTAMP if len == TCPOLEN_TIMESTAMP => {
            walk.tsval = ctx.load::<u32>(walk.off as usize + 2).map_or(0, u32::from_be);
            1
        }
        _ if len < 2 => 1,
        _ => {
            walk.off += u32::from(len);
            0
        }
    }
}

/// The TSval in the options of the TCP header at `l4_off` (`hlen` bytes long), or 0.
#[inline(always)]
fn tsval(ctx: &TcContext, l4_off: usize, hlen: usize) -> u32 {
    let mut walk =
        OptionWalk { skb: ctx.as_ptr().cast(), off: l4_off as u32 + 20, end: (l4_off + hlen.min(60)) as u32, tsval: 0 };
    unsafe { bpf_loop(MAX_OPTIONS, option_step as *mut c_void, (&raw mut walk).cast(), 0) };
    walk.tsval
}
