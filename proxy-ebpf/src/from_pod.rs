//! tc ingress on pod-facing interfaces: DNAT of packets from local pods to Service addresses, and
//! reverse NAT of backend replies going back to the client.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{CT_DIR_REPLY, CtKey, Frontend, STAT_CT_NEW, STAT_FORWARD_DNAT, STAT_REVERSE_NAT};

use crate::{
    conntrack::{self, Translation},
    lb,
    nat::{self, End},
    packet::{self, Packet},
    stats,
};

pub fn try_from_pod(ctx: &TcContext) -> Result<i32, u32> {
    let Some(pkt) = packet::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let now = conntrack::now_ns();
    if let Some(reply) = conntrack::lookup_refresh(&conntrack::reply_key(&pkt), &pkt, now) {
        nat::rewrite(ctx, &pkt, End::Source, reply.nat_addr, reply.nat_port)?;
        stats::count(STAT_REVERSE_NAT);
        return Ok(TC_ACT_OK);
    }
    let Some(fe) = lb::frontend(pkt.daddr, pkt.dport, pkt.proto) else {
        return Ok(TC_ACT_OK);
    };
    let t = match conntrack::lookup_refresh(&conntrack::service_key(&pkt), &pkt, now) {
        Some(ct) if ct.service_id == fe.service_id => {
            let t = Translation {
                nat_addr: ct.nat_addr,
                nat_port: ct.nat_port,
                backend_id: ct.backend_id,
                service_id: ct.service_id,
            };
            // The reply entry can be evicted from the LRU on its own; without it replies would
            // reach the client from the backend's address and be reset.
            let reply_key = reply_key_for(&pkt, &t);
            if !conntrack::exists(&reply_key) {
                create_reply(&reply_key, &pkt, &t, now, ct.state)?;
            }
            t
        }
        _ => new_connection(&pkt, &fe, now)?,
    };
    nat::rewrite(ctx, &pkt, End::Destination, t.nat_addr, t.nat_port)?;
    stats::count(STAT_FORWARD_DNAT);
    Ok(TC_ACT_OK)
}

/// Chooses a backend for a new connection and records both directions.
#[inline(always)]
fn new_connection(pkt: &Packet, fe: &Frontend, now: u64) -> Result<Translation, u32> {
    let (backend_id, be) = lb::select_backend(fe)?;
    let t = Translation { nat_addr: be.addr, nat_port: be.port, backend_id, service_id: fe.service_id };
    let state = conntrack::initial_state(pkt);
    // Reply entry first: once the forward entry exists, packets are translated and replies must match.
    create_reply(&reply_key_for(pkt, &t), pkt, &t, now, state)?;
    conntrack::create(&conntrack::service_key(pkt), now, state, pkt.tcp_flags, &t)?;
    stats::count(STAT_CT_NEW);
    Ok(t)
}

/// The key replies from the chosen backend will carry.
#[inline(always)]
fn reply_key_for(pkt: &Packet, t: &Translation) -> CtKey {
    conntrack::key(t.nat_addr, pkt.saddr, t.nat_port, pkt.sport, pkt.proto, CT_DIR_REPLY)
}

/// Records that replies of this connection must appear to come from the Service address.
#[inline(always)]
fn create_reply(key: &CtKey, pkt: &Packet, t: &Translation, now: u64, state: u8) -> Result<(), u32> {
    let restore =
        Translation { nat_addr: pkt.daddr, nat_port: pkt.dport, backend_id: t.backend_id, service_id: t.service_id };
    conntrack::create(key, now, state, 0, &restore)
}
