//! Per-packet Service handling at tc ingress, for both attach points: replies of translated
//! connections get their addresses restored; packets to a Service frontend are checked against its
//! policies and translated to a backend (destination NAT, plus source NAT when the reply would not
//! come back through this node otherwise); Service traffic that cannot be served is rejected or
//! dropped. Everything else passes untouched.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{
    BACKEND_F_LOCAL, CT_DIR_REPLY, CT_F_SNAT, CtKey, FRONTEND_F_CLUSTER_IP, FRONTEND_F_HAS_ENDPOINTS,
    FRONTEND_F_SOURCE_RANGES, Frontend, NODE_F_MASQUERADE_ALL, NodeConfig, SERVICE_ADDR_F_CLUSTER_IP, STAT_CT_NEW,
    STAT_DROP_NO_LOCAL_ENDPOINTS, STAT_DROP_NOT_CONFIGURED, STAT_DROP_SOURCE_RANGE, STAT_DROP_UNALLOCATED_SERVICE_IP,
    STAT_FORWARD_DNAT, STAT_REVERSE_NAT, STAT_SNAT, STAT_SOURCE_PORT_REMAP,
};

use crate::{
    conntrack::{self, Translation},
    fib, lb,
    maps::SERVICE_ADDRS,
    nat::{self, End},
    node,
    packet::{self, Packet},
    reject, snat, stats,
};

/// Where the program is attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Host side of a local pod's interface: the packet comes from a pod on this node (or, in `trace`,
    /// from the node itself).
    Pod,
    /// An external interface of the node: the packet comes from another node, a router or a client.
    Netdev,
}

pub fn try_handle(ctx: &TcContext, side: Side) -> Result<i32, u32> {
    let Some(pkt) = packet::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let now = conntrack::now_ns();
    if let Some(reply) = conntrack::lookup_refresh(&conntrack::reply_key(&pkt), &pkt, now) {
        nat::rewrite(ctx, &pkt, End::Source, reply.nat_addr, reply.nat_port)?;
        let mut daddr = pkt.daddr;
        if reply.flags & CT_F_SNAT != 0 {
            nat::rewrite(ctx, &pkt, End::Destination, reply.snat_addr, reply.snat_port)?;
            daddr = reply.snat_addr;
        }
        stats::count(STAT_REVERSE_NAT);
        // A NodePort's reply now comes from a node address: forwarded by us, not the input path.
        if node::is_node_addr(reply.nat_addr) {
            return Ok(fib::redirect_as_node(ctx, pkt.proto, reply.nat_addr, daddr));
        }
        return Ok(TC_ACT_OK);
    }
    let Some(fe) = lb::frontend(pkt.daddr, pkt.dport, pkt.proto) else {
        return not_a_frontend(ctx, &pkt);
    };
    let t = match conntrack::lookup_refresh(&conntrack::service_key(&pkt), &pkt, now) {
        Some(ct) if ct.service_id == fe.service_id => {
            let t = Translation::of(&ct);
            // The reply entry can be evicted from the LRU on its own; without it replies would
            // reach the client from the backend's address and be reset.
            let (reply_key, restore) = reply_entry(&pkt, &t);
            if !conntrack::exists(&reply_key) {
                conntrack::create(&reply_key, now, ct.state, 0, &restore)?;
            }
            t
        }
        _ => {
            if fe.flags & FRONTEND_F_HAS_ENDPOINTS == 0 {
                return reject::reject(ctx, &pkt);
            }
            new_connection(&pkt, &fe, side, now)?
        }
    };
    nat::rewrite(ctx, &pkt, End::Destination, t.nat_addr, t.nat_port)?;
    stats::count(STAT_FORWARD_DNAT);
    if t.flags & CT_F_SNAT != 0 {
        nat::rewrite(ctx, &pkt, End::Source, t.snat_addr, t.snat_port)?;
        // Masqueraded to a node address: forwarded by us, not the input path.
        if node::is_node_addr(t.snat_addr) {
            return Ok(fib::redirect_as_node(ctx, pkt.proto, t.snat_addr, t.nat_addr));
        }
    }
    Ok(TC_ACT_OK)
}

/// A packet to no frontend: a wrong port on a ClusterIP is rejected and an unallocated address in the
/// service CIDR dropped (kube-proxy's nftables mode); anything else is not Service traffic.
#[inline(always)]
fn not_a_frontend(ctx: &TcContext, pkt: &Packet) -> Result<i32, u32> {
    if let Some(sa) = SERVICE_ADDRS.get_ptr(&pkt.daddr) {
        if unsafe { (*sa).flags } & SERVICE_ADDR_F_CLUSTER_IP != 0 {
            return reject::reject(ctx, pkt);
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
    if side == Side::Pod || node::is_node_addr(saddr) || node::is_loopback(saddr) {
        return false;
    }
    !cfg.is_some_and(|c| node::in_cluster_cidr(c, saddr))
}

/// Whether the connection's source must be translated to the node address: whenever the backend's
/// reply would otherwise not come back through this node, or could not be routed at all; and for
/// ClusterIP traffic with `--masquerade-all` (which, as in kube-proxy, marks only ClusterIP traffic).
#[inline(always)]
fn needs_snat(
    cfg: Option<&NodeConfig>,
    side: Side,
    pkt: &Packet,
    fe: &Frontend,
    backend_addr: u32,
    backend_flags: u8,
) -> bool {
    (fe.flags & FRONTEND_F_CLUSTER_IP != 0 && cfg.is_some_and(|c| c.flags & NODE_F_MASQUERADE_ALL != 0))
        // Hairpin: the pod would answer itself directly.
        || backend_addr == pkt.saddr
        || node::is_loopback(pkt.saddr)
        // From another node or outside to a backend elsewhere: it would answer the client directly.
        || (side == Side::Netdev && backend_flags & BACKEND_F_LOCAL == 0)
}

/// Checks the frontend's policies, chooses a backend and records both directions.
#[inline(always)]
fn new_connection(pkt: &Packet, fe: &Frontend, side: Side, now: u64) -> Result<Translation, u32> {
    let cfg = node::config();
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe, pkt.saddr) {
        return Err(STAT_DROP_SOURCE_RANGE);
    }
    let set = lb::backend_set(fe, from_outside(cfg.as_ref(), side, pkt.saddr));
    if set.count == 0 {
        return Err(STAT_DROP_NO_LOCAL_ENDPOINTS);
    }
    let (backend_id, be) = lb::select_backend(fe, set, lb::client_addr(pkt.saddr), now)?;
    let mut t = Translation {
        nat_addr: be.addr,
        nat_port: be.port,
        backend_id,
        service_id: fe.service_id,
        snat_addr: 0,
        snat_port: 0,
        flags: 0,
    };
    let state = conntrack::initial_state(pkt);
    if needs_snat(cfg.as_ref(), side, pkt, fe, be.addr, be.flags) {
        let cfg = cfg.ok_or(STAT_DROP_NOT_CONFIGURED)?;
        source_nat(&mut t, &cfg, cfg.masq_addr, pkt, now, state)?;
        stats::count(STAT_SNAT);
    } else {
        let (reply_key, restore) = reply_entry(pkt, &t);
        if conntrack::held_by_other(&reply_key, (pkt.saddr, pkt.sport), (pkt.daddr, pkt.dport), now) {
            // The client reuses a port that the backend still pairs with it for another Service (its
            // kernel chose the port for a different destination address, so nothing stopped it): the
            // backend would take the SYN for an old duplicate. A free port, as netfilter's NAT does.
            let cfg = cfg.ok_or(STAT_DROP_NOT_CONFIGURED)?;
            source_nat(&mut t, &cfg, pkt.saddr, pkt, now, state)?;
            stats::count(STAT_SOURCE_PORT_REMAP);
        } else {
            // Reply entry first: once the forward entry exists, packets are translated and replies must match.
            conntrack::create(&reply_key, now, state, 0, &restore)?;
        }
    }
    conntrack::create(&conntrack::service_key(pkt), now, state, pkt.tcp_flags, &t)?;
    stats::count(STAT_CT_NEW);
    Ok(t)
}

/// Translates the connection's source to `addr` and a free port, and writes the reply entry that
/// holds the port before anything is sent with it.
#[inline(always)]
fn source_nat(t: &mut Translation, cfg: &NodeConfig, addr: u32, pkt: &Packet, now: u64, state: u8) -> Result<(), u32> {
    let (port, reply_key) = snat::allocate(cfg, addr, t.nat_addr, t.nat_port, pkt.proto, now)?;
    t.snat_addr = addr;
    t.snat_port = port;
    t.flags = CT_F_SNAT;
    conntrack::create(&reply_key, now, state, 0, &reply_entry(pkt, t).1)
}

/// The reply direction of a translation: the key the backend's replies carry, and the entry that
/// restores the Service address as their source (and the client as their destination after SNAT).
#[inline(always)]
fn reply_entry(pkt: &Packet, t: &Translation) -> (CtKey, Translation) {
    let (daddr, dport) = if t.flags & CT_F_SNAT != 0 { (t.snat_addr, t.snat_port) } else { (pkt.saddr, pkt.sport) };
    let key = conntrack::key(t.nat_addr, daddr, t.nat_port, dport, pkt.proto, CT_DIR_REPLY);
    let restore = Translation {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        backend_id: t.backend_id,
        service_id: t.service_id,
        snat_addr: pkt.saddr,
        snat_port: pkt.sport,
        flags: t.flags,
    };
    (key, restore)
}
