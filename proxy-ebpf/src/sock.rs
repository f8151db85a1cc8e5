//! Socket-level load balancing: Service addresses are translated once, at connect() / sendmsg(), so
//! packets of those sockets go to the backend directly and need no per-packet NAT.
//!
//! Return value of cgroup sock_addr programs: 1 lets the call proceed (with the rewritten address).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use proxy_common::{
    Backend, CT_LIFETIME_OTHER_NS, FRONTEND_F_HAS_ENDPOINTS, FRONTEND_F_SOURCE_RANGES, Frontend, NODE_F_MASQUERADE_ALL,
    PROTO_TCP, PROTO_UDP, RevNat, STAT_SOCK_CONNECT, STAT_SOCK_MASQUERADE_TO_TC, STAT_SOCK_NO_ENDPOINTS,
    STAT_SOCK_REJECT, STAT_SOCK_REV_NAT, STAT_SOCK_SENDMSG, STAT_SOCK_UDP_CONNECT_TO_TC, SockFlow, SockFlowKey,
    SockPeer, SockRevNatKey,
};

use crate::{
    lb,
    maps::{SOCK_FLOWS, SOCK_PEER, SOCK_REV_NAT},
    node, stats,
};

const ALLOW: i32 = 1;
/// The call fails with EPERM at once (kube-proxy's REJECT, seen from the socket).
const REFUSE: i32 = 0;

/// What the socket path does with a call to a Service frontend.
enum Choice {
    Backend(u32, Backend),
    /// No endpoints anywhere: refuse the call.
    Refuse,
    /// Leave the address alone; the tc path sees the packets and applies the policy that needs the
    /// packet's source (source ranges) or drops them (Local policy without local endpoints).
    Untranslated,
    /// Leave it to the tc path, which masquerades (`--masquerade-all`).
    Masquerade,
}

/// Chooses a backend for a call from this node (a pod or the node itself: the cluster-wide set unless
/// internalTrafficPolicy is Local; externalTrafficPolicy Local short-circuits for local clients).
#[inline(always)]
fn choose(ctx: &SockAddrContext, fe: &Frontend) -> Choice {
    if fe.flags & FRONTEND_F_HAS_ENDPOINTS == 0 {
        return Choice::Refuse;
    }
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 {
        return Choice::Untranslated;
    }
    // --masquerade-all: a pod's connection must reach its backend from the node's address, which only
    // the tc path can give it. (The node's own sockets already have a node address.)
    if node::config().is_some_and(|c| c.flags & NODE_F_MASQUERADE_ALL != 0) && !in_host_netns(ctx) {
        return Choice::Masquerade;
    }
    let set = lb::backend_set(fe, false);
    if set.count == 0 {
        return Choice::Untranslated;
    }
    let client = lb::client_netns(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) });
    match lb::select_backend(fe, set, client, unsafe { bpf_ktime_get_ns() }) {
        Ok((id, be)) => Choice::Backend(id, be),
        Err(_) => Choice::Untranslated,
    }
}

/// Counts a call left to the tc path or refused, and returns the program's answer.
#[inline(always)]
fn not_translated(choice: &Choice) -> i32 {
    match choice {
        Choice::Refuse => {
            stats::count(STAT_SOCK_REJECT);
            return REFUSE;
        }
        Choice::Masquerade => stats::count(STAT_SOCK_MASQUERADE_TO_TC),
        _ => stats::count(STAT_SOCK_NO_ENDPOINTS),
    }
    ALLOW
}

/// The destination of the call, if it is a TCP or UDP Service frontend.
#[inline(always)]
fn service_destination(sa: &bpf_sock_addr) -> Option<(u32, u16, u8, Frontend)> {
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // user_port holds the network-order port in its low 16 bits.
    let port = sa.user_port as u16;
    let fe = lb::frontend(sa.user_ip4, port, proto)?;
    Some((sa.user_ip4, port, proto, fe))
}

/// Whether the caller is in the node's own network namespace, where no tc program sees its packets.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    node::config().is_some_and(|c| c.host_netns_cookie == netns)
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Remembers which Service address a UDP socket's datagrams from `be` must appear to come from.
#[inline(always)]
fn record_rev_nat(cookie: u64, be: &Backend, addr: u32, port: u16) {
    let key = SockRevNatKey { cookie, addr: be.addr, port: be.port, _pad: 0 };
    let value = RevNat { addr, port, _pad: 0 };
    // Best effort: on failure replies show the backend address, as without socket LB.
    let _ = SOCK_REV_NAT.insert(&key, &value, BPF_ANY as u64);
}

#[inline(always)]
fn redirect(sa: &mut bpf_sock_addr, be: &Backend) {
    sa.user_ip4 = be.addr;
    sa.user_port = be.port as u32;
}

pub fn connect(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((addr, port, proto, fe)) = service_destination(sa) else {
        return ALLOW;
    };
    if proto == PROTO_UDP {
        // A connected UDP socket translated here would talk to its backend for as long as it
        // lives, even after the backend is gone. Left untranslated, its datagrams go through the tc
        // path — a pod's at its interface, the node's own at egress — whose conntrack entries are
        // purged with the backend (as kube-proxy flushes conntrack), so the next datagram finds a
        // live one.
        stats::count(STAT_SOCK_UDP_CONNECT_TO_TC);
        return ALLOW;
    }
    let be = match choose(ctx, &fe) {
        Choice::Backend(_, be) => be,
        other => return not_translated(&other),
    };
    if proto == PROTO_UDP {
        record_rev_nat(cookie(ctx), &be, addr, port);
    }
    // The socket's peer is now the backend; getpeername() must keep naming the Service. Kept with
    // the socket itself, so it lives exactly as long (a map keyed by cookie would need cleaning).
    let mut peer = SockPeer { backend_addr: be.addr, service_addr: addr, backend_port: be.port, service_port: port };
    let stored = SOCK_PEER.get_or_insert_ptr_mut(ctx, Some(&mut peer));
    if !stored.is_null() {
        // An existing storage (the socket connected before) gets the new translation.
        unsafe { *stored = peer };
    }
    redirect(sa, &be);
    stats::count(STAT_SOCK_CONNECT);
    ALLOW
}

pub fn sendmsg(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((addr, port, proto, fe)) = service_destination(sa) else {
        return ALLOW;
    };
    let cookie = cookie(ctx);
    let now = unsafe { bpf_ktime_get_ns() };
    let flow_key = SockFlowKey { cookie, addr, port, proto, _pad: 0 };
    // The datagrams of one socket to one Service port stick to one backend while the flow is active,
    // as conntrack pins a UDP 5-tuple in kube-proxy.
    let pinned = SOCK_FLOWS.get_ptr_mut(&flow_key).and_then(|flow| {
        let flow = unsafe { &mut *flow };
        if flow.service_id != fe.service_id || now.saturating_sub(flow.last_seen_ns) > CT_LIFETIME_OTHER_NS {
            return None;
        }
        let be = lb::backend(flow.backend_id)?;
        flow.last_seen_ns = now;
        Some(be)
    });
    let be = match pinned {
        Some(be) => be,
        None => {
            let (backend_id, be) = match choose(ctx, &fe) {
                Choice::Backend(id, be) => (id, be),
                other => return not_translated(&other),
            };
            let flow = SockFlow { last_seen_ns: now, backend_id, service_id: fe.service_id };
            let _ = SOCK_FLOWS.insert(&flow_key, &flow, BPF_ANY as u64);
            be
        }
    };
    record_rev_nat(cookie, &be, addr, port);
    redirect(sa, &be);
    stats::count(STAT_SOCK_SENDMSG);
    ALLOW
}

/// recvmsg4 / getpeername4: report the Service address instead of the backend's.
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = SOCK_PEER.get_ptr_mut(ctx);
    if !peer.is_null() {
        let peer = unsafe { *peer };
        if sa.user_ip4 == peer.backend_addr && sa.user_port as u16 == peer.backend_port {
            sa.user_ip4 = peer.service_addr;
            sa.user_port = peer.service_port as u32;
            stats::count(STAT_SOCK_REV_NAT);
            return ALLOW;
        }
    }
    let key = SockRevNatKey { cookie: cookie(ctx), addr: sa.user_ip4, port: sa.user_port as u16, _pad: 0 };
    if let Some(orig) = SOCK_REV_NAT.get_ptr(&key) {
        let orig = unsafe { *orig };
        sa.user_ip4 = orig.addr;
        sa.user_port = orig.port as u32;
        stats::count(STAT_SOCK_REV_NAT);
    }
    ALLOW
}
