//! Source NAT: a source port from the reserved range that no live connection between the same source
//! address and backend uses — for masquerading to the node address, and for a client whose own port
//! clashes at the backend. The port is held by the connection's reply entry in `CONNTRACK`, so it is
//! freed when that entry expires.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{CT_DIR_REPLY, CtKey, NodeConfig, SNAT_RETRIES, STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT_COLLISION};

use crate::{conntrack, stats};

/// Finds a free source port for a connection from `source_addr` to `backend_addr:backend_port`, and
/// returns it (network byte order) with the reply key that reserves it. The caller writes that key
/// before the packet leaves.
#[inline(always)]
pub fn allocate(
    cfg: &NodeConfig,
    source_addr: u32,
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
        let key = conntrack::key(backend_addr, source_addr, backend_port, port, proto, CT_DIR_REPLY);
        if conntrack::in_use(&key, now) {
            stats::count(STAT_SNAT_COLLISION);
            continue;
        }
        return Ok((port, key));
    }
    Err(STAT_DROP_SNAT_EXHAUSTED)
}
