//! Per-packet Service handling, at tc ingress of pod and external interfaces and at tc egress for
//! the node's own sockets: replies of translated connections get their addresses restored; packets
//! to a Service frontend are checked against its policies and translated to a backend (destination
//! NAT, plus source NAT when the reply would not come back through this node otherwise); Service
//! traffic that cannot be served is rejected or dropped. Everything else passes untouched.
//!
//! The node's own connections (kubelet, hostNetwork pods, node agents) meet the datapath at egress,
//! as kube-proxy's OUTPUT chains see them: those the socket programs leave alone (frontends with
//! source ranges, an empty backend set, or no socket programs at all) are translated there, then
//! routed afresh for the backend; their replies, and the answers to them, reach the node's sockets
//! through the loopback device (see `fib`).

use core::ptr::NonNull;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK},
    programs::TcContext,
};
use proxy_common::{
    BACKEND_F_LOCAL, CT_F_FROM_NODE, CT_F_SNAT, CtEntry, CtKey, FRONTEND_F_ETP_LOCAL, FRONTEND_F_EXTERNAL,
    FRONTEND_F_HAS_ENDPOINTS, FRONTEND_F_SOURCE_RANGES, Frontend, NODE_F_MASQUERADE_ALL, NodeConfig, PROTO_ICMP,
    SERVICE_ADDR_F_CLUSTER_IP, STAT_CT_NEW, STAT_DROP_CT_FULL, STAT_DROP_FRAGMENT, STAT_DROP_NO_LOCAL_ENDPOINTS,
    STAT_DROP_REWRITE, STAT_DROP_SOURCE_RANGE, STAT_DROP_UNALLOCATED_SERVICE_IP, STAT_FORWARD_DNAT, STAT_FRAGMENT_NAT,
    STAT_REVERSE_NAT, STAT_SNAT, STAT_SOURCE_PORT_REMAP, ct_initial, ct_reply_key,
};

use crate::{
    conntrack::{self, Conn},
    fib::{self, Route},
    icmp, lb,
    maps::{CONNTRACK, SERVICE_ADDRS},
    nat::{self, End},
    node,
    packet::{self, FRAG_FIRST, FRAG_LATER, Packet},
    pod_source, reject, snat, stats, tcp, verdict,
};

/// Where the packet comes from, as the attach point tells.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Side {
    /// Host side of a local pod's interface: the packet comes from a pod on this node.
    Pod = 0,
    /// An external interface of the node: the packet comes from another node, a router or a client.
    Netdev = 1,
    /// tc egress, a packet of one of the node's own sockets.
    Node = 2,
}

impl Side {
    #[inline(always)]
    fn from_u32(v: u32) -> Self {
        match v {
            0 => Side::Pod,
            2 => Side::Node,
            _ => Side::Netdev,
        }
    }

    #[inline(always)]
    fn hook(self) -> Hook {
        if self == Side::Node { Hook::Egress } else { Hook::Ingress }
    }
}

/// What a connection's original-direction packets are rewritten to: the part of its entry that
/// forwarding needs (small enough to hand back from the new-connection step on the caller's stack).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Nat {
    nat_addr: u32,
    snat_addr: u32,
    nat_port: u16,
    snat_port: u16,
    flags: u16,
    _pad: u16,
}

impl Nat {
    #[inline(always)]
    fn of(entry: &CtEntry) -> Self {
        Self {
            nat_addr: entry.nat_addr,
            snat_addr: entry.snat_addr,
            nat_port: entry.nat_port,
            snat_port: entry.snat_port,
            flags: entry.flags,
            _pad: 0,
        }
    }
}

/// Where a packet meets the datapath.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Hook {
    /// tc ingress: packets arriving at the node.
    Ingress = 0,
    /// tc egress, for packets the node's own stack sends: its own connections, replies of its own
    /// sockets (hostNetwork backends) and its ICMP errors. They are the node's, trusted, and already
    /// routed — for their original destination.
    Egress = 1,
}

/// A packet arriving at the node, on a pod's interface (`Side::Pod`) or an external one. Inlined
/// into each entry point, as [`try_from_node`] is: a frame of its own would count against the
/// 512-byte stack of every call chain below it.
#[inline(always)]
pub fn try_handle(ctx: &TcContext, side: Side, l3_off: usize) -> Result<i32, u32> {
    handle(ctx, side, l3_off)
}

#[inline(always)]
fn handle(ctx: &TcContext, side: Side, l3_off: usize) -> Result<i32, u32> {
    let Some(pkt) = packet::parse(ctx, l3_off)? else {
        return Ok(TC_ACT_OK);
    };
    let hook = side.hook();
    if pkt.proto == PROTO_ICMP {
        return icmp::handle(ctx, &pkt, hook);
    }
    // Each step is a global BPF function: verified once, on its own, with its own stack frame, so
    // the paths of one do not multiply the paths of the next.
    let skb = ctx.as_ptr().cast();
    let reply = epx_reply(skb, &pkt, hook as u32);
    if reply != verdict::NEXT {
        if pkt.frag == FRAG_FIRST && reply >= 0 {
            packet::epx_remember_fragment(&pkt);
        }
        return verdict::decode(reply);
    }
    let mut fe = Frontend::default();
    let outcome = epx_service(skb, &pkt, hook as u32, &mut fe);
    // A first fragment translated (or answered) as a frontend's: its datagram's other fragments
    // follow it.
    if pkt.frag == FRAG_FIRST && outcome >= 0 && SERVICE_ADDRS.get_ptr(&pkt.daddr).is_some() {
        packet::epx_remember_fragment(&pkt);
    }
    if outcome != verdict::NEW_CONNECTION {
        return verdict::decode(outcome);
    }
    // Created from here rather than from within epx_service, so the two frames are not stacked
    // (epx_service handed back the frontend it found); then the packet is forwarded as its
    // connection says.
    let mut nat = Nat::default();
    let mut created = epx_new_connection(skb, &pkt, &fe, side as u32, &mut nat);
    // The table is full: make room by displacing a connection nobody answered, and try once more.
    if created == STAT_DROP_CT_FULL as i32 && conntrack::epx_early_drop() == 1 {
        created = epx_new_connection(skb, &pkt, &fe, side as u32, &mut nat);
    }
    match created {
        0 => {
            let outcome = epx_forward_new(skb, &pkt, hook as u32, &nat);
            if pkt.frag == FRAG_FIRST && outcome >= 0 {
                packet::epx_remember_fragment(&pkt);
            }
            verdict::decode(outcome)
        }
        reason => Err(reason as u32),
    }
}

/// The first packet of the connection just created for it, forwarded with the translation the
/// new connection got (it is accounted already: its state and time are the connection's initial
/// ones). A global BPF function, as [`epx_service`] is.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_forward_new(skb: *mut __sk_buff, pkt: *const Packet, hook: u32, nat: *const Nat) -> i32 {
    let (Some(skb), false, false) = (NonNull::new(skb), pkt.is_null(), nat.is_null()) else {
        return -(STAT_DROP_REWRITE as i32);
    };
    let hook = if hook == Hook::Egress as u32 { Hook::Egress } else { Hook::Ingress };
    // SAFETY: checked non-null; the caller's own stack values.
    verdict::encode(forward(&TcContext::new(skb), unsafe { &*pkt }, unsafe { &*nat }, hook))
}

/// Packets the node's own stack sends out of an interface (tc egress): the node's own connections
/// to Service frontends are translated (as kube-proxy's OUTPUT chains do), a reply of one of its
/// sockets to a translated connection (a hostNetwork backend's) gets the Service address back, and
/// an ICMP error it generates about a translated packet is translated. Forwarded packets (no socket)
/// were handled where they arrived, and so were the datapath's own redirects.
#[inline(always)]
pub fn try_from_node(ctx: &TcContext, l3_off: usize) -> Result<i32, u32> {
    // SAFETY: the program's context is a valid __sk_buff.
    if unsafe { (*(ctx.as_ptr() as *const __sk_buff)).__bindgen_anon_2.sk }.is_null() {
        return Ok(TC_ACT_OK);
    }
    handle(ctx, Side::Node, l3_off)
}

/// A reply of a tracked connection, reverse-translated; [`verdict::NEXT`] when the packet is none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_reply(skb: *mut __sk_buff, pkt: *const Packet, hook: u32) -> i32 {
    let (Some(skb), false) = (NonNull::new(skb), pkt.is_null()) else { return verdict::NEXT };
    let (ctx, pkt) = (TcContext::new(skb), unsafe { &*pkt });
    let hook = if hook == Hook::Egress as u32 { Hook::Egress } else { Hook::Ingress };
    match conntrack::lookup_reply(&ctx, pkt, hook == Hook::Egress) {
        Ok(Some(conn)) => verdict::encode(reverse(&ctx, pkt, &conn, hook)),
        Ok(None) => verdict::NEXT,
        Err(reason) => verdict::encode(Err(reason)),
    }
}

/// A packet that is not a reply: of a tracked connection to a Service frontend (translated), opening
/// one ([`verdict::NEW_CONNECTION`]), or rejected; to a Service address without that port; or not
/// Service traffic.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_service(skb: *mut __sk_buff, pkt: *const Packet, hook: u32, fe_out: *mut Frontend) -> i32 {
    let (Some(skb), false, Some(fe_out)) = (NonNull::new(skb), pkt.is_null(), NonNull::new(fe_out)) else {
        return verdict::NEXT;
    };
    let hook = if hook == Hook::Egress as u32 { Hook::Egress } else { Hook::Ingress };
    // SAFETY: checked non-null; the caller's own stack values.
    verdict::encode(to_service(&TcContext::new(skb), unsafe { &*pkt }, hook, unsafe { &mut *fe_out.as_ptr() }))
}

/// `fe_out`: the frontend, when the packet opens a new connection (the caller creates it).
#[inline(always)]
fn to_service(ctx: &TcContext, pkt: &Packet, hook: Hook, fe_out: &mut Frontend) -> Result<i32, u32> {
    let pkt = *pkt;
    let Some(fe) = lb::frontend(pkt.daddr, pkt.dport, pkt.proto) else {
        return not_a_frontend(ctx, &pkt, hook);
    };
    let conn = match conntrack::lookup_orig(ctx, &pkt)? {
        Some(conn) if conn.entry().service_id == fe.service_id => conn,
        other => {
            // The address and port now belong to another frontend: the old connection is over.
            if let Some(conn) = other {
                conntrack::remove(&conn.orig, conn.entry());
            }
            // The rest of a datagram never opens a connection (nor draws an answer).
            if pkt.frag == FRAG_LATER {
                return Err(STAT_DROP_FRAGMENT);
            }
            // Neither a connection nor an answer in a name a pod forged (checked here, in this
            // function's frame: the new connection's and the answer's frames are deep already).
            pod_source::check_new(ctx, &pkt)?;
            if fe.flags & FRONTEND_F_HAS_ENDPOINTS == 0 {
                return reject::reject(ctx, &pkt, hook);
            }
            *fe_out = fe;
            return Err(-verdict::NEW_CONNECTION as u32);
        }
    };
    forward(ctx, &pkt, &Nat::of(conn.entry()), hook)
}

/// A packet of a tracked connection in the original direction: to the backend, and from the SNAT
/// address if the connection has one.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Packet, entry: &Nat, hook: Hook) -> Result<i32, u32> {
    let snat = entry.flags & CT_F_SNAT != 0;
    // Masqueraded to a node address: forwarded by us, not the input path (no route: up the stack).
    // At egress the node routed the packet for the Service address: it is routed afresh for the
    // backend (a pod's interface, another node, or the node itself for a hostNetwork backend).
    let route = if hook == Hook::Egress && node::is_node_addr(entry.nat_addr) {
        Route::LOCAL
    } else if hook == Hook::Egress || (snat && node::is_node_addr(entry.snat_addr)) {
        fib::route(ctx, pkt.proto, if snat { entry.snat_addr } else { pkt.saddr }, entry.nat_addr)
    } else {
        Route::default()
    };
    if route.too_big_for_mtu != 0 {
        return reject::too_big(ctx, pkt, route.too_big_for_mtu, hook);
    }
    nat::rewrite(ctx, pkt, End::Destination, entry.nat_addr, entry.nat_port)?;
    stats::count(if pkt.frag == FRAG_LATER { STAT_FRAGMENT_NAT } else { STAT_FORWARD_DNAT });
    if snat {
        nat::rewrite(ctx, pkt, End::Source, entry.snat_addr, entry.snat_port)?;
    }
    Ok(fib::redirect(ctx, pkt.l3_off, &route))
}

/// A reply of a tracked connection: from the Service address the client used, and to the client's
/// own address and port if the connection's source was translated.
#[inline(always)]
fn reverse(ctx: &TcContext, pkt: &Packet, conn: &Conn, hook: Hook) -> Result<i32, u32> {
    let orig = &conn.orig;
    let snat = conn.entry().flags & CT_F_SNAT != 0;
    let daddr = if snat { orig.saddr } else { pkt.daddr };
    // Restored, the reply comes from the Service address, and the input path would judge it by that
    // source: strict rp_filter drops it when the Service address does not route back through the
    // interface it arrived on, and a Service address the node holds (a NodePort's, an LB IP
    // announced by kube-vip) makes it a martian. So it is forwarded by us, to the next hop for its
    // destination; one for the node itself (a connection of its own) goes to it through loopback. At
    // egress the node's own stack has routed it already.
    let route = if hook == Hook::Egress {
        Route::default()
    } else if conn.entry().flags & CT_F_FROM_NODE != 0 {
        Route::LOCAL
    } else {
        fib::route(ctx, pkt.proto, orig.daddr, daddr)
    };
    if route.too_big_for_mtu != 0 {
        return reject::too_big(ctx, pkt, route.too_big_for_mtu, hook);
    }
    nat::rewrite(ctx, pkt, End::Source, orig.daddr, orig.dport)?;
    if snat {
        nat::rewrite(ctx, pkt, End::Destination, orig.saddr, orig.sport)?;
    }
    stats::count(if pkt.frag == FRAG_LATER { STAT_FRAGMENT_NAT } else { STAT_REVERSE_NAT });
    Ok(fib::redirect(ctx, pkt.l3_off, &route))
}

/// A packet to no frontend: a wrong port on a ClusterIP is rejected and an unallocated address in the
/// service CIDR dropped (kube-proxy's nftables mode); anything else is not Service traffic.
#[inline(always)]
fn not_a_frontend(ctx: &TcContext, pkt: &Packet, hook: Hook) -> Result<i32, u32> {
    if let Some(sa) = SERVICE_ADDRS.get_ptr(&pkt.daddr) {
        if unsafe { (*sa).flags } & SERVICE_ADDR_F_CLUSTER_IP != 0 {
            pod_source::check_new(ctx, pkt)?;
            return reject::reject(ctx, pkt, hook);
        }
        return Ok(TC_ACT_OK);
    }
    if let Some(cfg) = node::config()
        && node::in_service_cidr(&cfg, pkt.daddr)
    {
        return Err(STAT_DROP_UNALLOCATED_SERVICE_IP);
    }
    Ok(TC_ACT_OK)
}

/// Whether the client counts as "from outside" for externalTrafficPolicy: not a pod (by
/// `--cluster-cidr`, wherever it runs) and not this node.
#[inline(always)]
fn from_outside(cfg: Option<&NodeConfig>, side: Side, saddr: u32) -> bool {
    if side != Side::Netdev || node::is_node_addr(saddr) || node::is_loopback(saddr) {
        return false;
    }
    !cfg.is_some_and(|c| node::in_cluster_cidr(c, saddr))
}

/// Whether the connection's source must be translated to the node address: whenever the backend's
/// reply would otherwise not come back through this node, or could not be routed at all; and, with
/// `--masquerade-all`, every Service connection, as kube-proxy marks every path then — except the
/// external path of an externalTrafficPolicy Local address for pods and outside clients, whose
/// source kube-proxy keeps even so.
#[inline(always)]
fn needs_snat(
    cfg: Option<&NodeConfig>,
    side: Side,
    pkt: &Packet,
    fe: &Frontend,
    backend_addr: u32,
    backend_flags: u8,
) -> bool {
    let keeps_source = fe.flags & FRONTEND_F_EXTERNAL != 0
        && fe.flags & FRONTEND_F_ETP_LOCAL != 0
        && !node::is_node_addr(pkt.saddr)
        && !node::is_loopback(pkt.saddr);
    (cfg.is_some_and(|c| c.flags & NODE_F_MASQUERADE_ALL != 0) && !keeps_source)
        // Hairpin: the pod would answer itself directly.
        || backend_addr == pkt.saddr
        || node::is_loopback(pkt.saddr)
        // The node's own connection from a local address that is not a node address (an LB IP or
        // externalIP it holds, the source the kernel picks for a destination it holds itself):
        // nothing routes the backend's reply to it.
        || (side == Side::Node && !node::is_node_addr(pkt.saddr))
        // From another node or outside to a backend elsewhere: it would answer the client directly.
        || (side == Side::Netdev && backend_flags & BACKEND_F_LOCAL == 0)
}

/// Claims the connection's reply tuple with the client's own address and port, unless the backend
/// already pairs them with another connection, live or closing (it may hold it in TIME_WAIT).
#[inline(always)]
fn claim_own_port(orig: &CtKey, entry: &CtEntry, now: u64) -> Result<bool, u32> {
    conntrack::claim_if_unheld(&ct_reply_key(orig, entry), orig, now)
}

/// [`new_connection`] as a global BPF function: the verifier checks it once, on its own, instead of
/// along every path that reaches it — the new-connection work (policies, backend choice, SNAT
/// search, conntrack) would otherwise multiply the paths of the whole program. Returns 0 with the
/// connection tracked, or the reason it was not.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn epx_new_connection(
    skb: *mut __sk_buff,
    pkt: *const Packet,
    fe: *const Frontend,
    side: u32,
    nat_out: *mut Nat,
) -> i32 {
    // The verifier hands a global function possibly-null pointers.
    let (Some(skb), false, false, Some(mut nat_out)) =
        (NonNull::new(skb), pkt.is_null(), fe.is_null(), NonNull::new(nat_out))
    else {
        return STAT_DROP_REWRITE as i32;
    };
    let side = Side::from_u32(side);
    // SAFETY: checked non-null; the caller passes its own stack values.
    match new_connection(&TcContext::new(skb), unsafe { &*pkt }, unsafe { &*fe }, side, conntrack::now_ns()) {
        Ok(nat) => {
            unsafe { *nat_out.as_mut() = nat };
            0
        }
        Err(reason) => reason as i32,
    }
}

/// Checks the frontend's policies, chooses a backend and tracks the new connection.
#[inline(always)]
fn new_connection(ctx: &TcContext, pkt: &Packet, fe: &Frontend, side: Side, now: u64) -> Result<Nat, u32> {
    // Unconfigured, every flag is clear: no cluster CIDR, no masquerade-all (and no SNAT below).
    let cfg = node::config_in_place();
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe, pkt.saddr) {
        return Err(STAT_DROP_SOURCE_RANGE);
    }
    let set = lb::backend_set(fe, from_outside(cfg, side, pkt.saddr));
    if set.count == 0 {
        return Err(STAT_DROP_NO_LOCAL_ENDPOINTS);
    }
    let (backend_id, be) = lb::select_backend(fe, set, lb::client_addr(pkt.saddr), now)?;
    let orig = conntrack::tuple(pkt);
    let mut entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: be.addr,
        nat_port: be.port,
        backend_id,
        service_id: fe.service_id,
        state: ct_initial(pkt.proto, pkt.tcp_flags),
        tcp_flags_orig: pkt.tcp_flags,
        orig_ifindex: pod_source::ingress_ifindex(ctx),
        flags: if side == Side::Node { CT_F_FROM_NODE } else { 0 },
        ..CtEntry::default()
    };
    if needs_snat(cfg, side, pkt, fe, be.addr, be.flags) {
        let cfg = node::configured(cfg)?;
        snat::allocate(&mut entry, &orig, tcp::segment_of(ctx, pkt), cfg.masq_addr, cfg, now)?;
        stats::count(STAT_SNAT);
    } else if !claim_own_port(&orig, &entry, now)? {
        // The client reuses a port that the backend still pairs with it for another connection (its
        // kernel chose the port for a different destination address, so nothing stopped it): the
        // backend would take the SYN for an old duplicate. A free port, as netfilter's NAT does.
        let cfg = node::configured(cfg)?;
        snat::allocate(&mut entry, &orig, tcp::segment_of(ctx, pkt), pkt.saddr, cfg, now)?;
        stats::count(STAT_SOURCE_PORT_REMAP);
    }
    match conntrack::create(&orig, &entry) {
        Ok(true) => {
            stats::count(STAT_CT_NEW);
            Ok(Nat::of(&entry))
        }
        // Another CPU tracked the same connection first (a retransmitted first packet): the packet
        // goes that connection's way.
        Ok(false) => {
            conntrack::release_reply(&ct_reply_key(&orig, &entry), &orig);
            // SAFETY: a map value, valid for this program run.
            CONNTRACK.get_ptr(&orig).map(|e| Nat::of(unsafe { &*e })).ok_or(STAT_DROP_CT_FULL)
        }
        Err(reason) => {
            conntrack::release_reply(&ct_reply_key(&orig, &entry), &orig);
            Err(reason)
        }
    }
}
