//! Source NAT to the node address: a source port from the reserved range that no live connection to
//! the same backend uses. The port is held by the connection's reply entry in `CONNTRACK`, so it is
//! freed when that entry expires.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    CT_DIR_REPLY, CtKey, NodeConfig, SNAT_RETRIES, STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT, STAT_SNAT_COLLISION,
};

use crate::{conntrack, stats};

/// Finds a free source port for a connection to `backend_addr:backend_port` masqueraded to the node
/// address, and returns it (network byte order) with the reply key that reserves it. The caller writes
/// that key before the packet leaves.
#[inline(always)]
pub fn allocate(
    cfg: &NodeConfig,
    backend_addr: u32,
    backend_port: u16,
    proto: u8,
    now: u64,
) -> Result<(u16, CtKey), u32> {
    let min = cfg.snat_port_min as u32;
    let span = (cfg.snat_port_max as u32).saturating_sub(min) + 1;
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT_RETRIES {
        let port = ((min + (start + i) % span) as u16).to_be();
        let key = conntrack::key(backend_addr, cfg.masq_addr, backend_port, port, proto, CT_DIR_REPLY);
        if conntrack::in_use(&key, now) {
            stats::count(STAT_SNAT_COLLISION);
            continue;
        }
        stats::count(STAT_SNAT);
        return Ok((port, key));
    }
    Err(STAT_DROP_SNAT_EXHAUSTED)
}
