//! What the programs know about the node: its configuration and addresses.

use proxy_common::{NODE_F_CLUSTER_CIDR, NODE_F_CONFIGURED, NODE_F_SERVICE_CIDR, NodeConfig};

use crate::maps::{NODE_ADDRS, NODE_CONFIG};

/// The node configuration, once userspace has written it.
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    let cfg = NODE_CONFIG.get_ptr(0).map(|c| unsafe { *c })?;
    (cfg.flags & NODE_F_CONFIGURED != 0).then_some(cfg)
}

/// The node configuration in place, not copied (for paths whose stack is deep already), configured
/// or not: its flags are all clear until userspace has written it (see [`configured`]).
#[inline(always)]
pub fn config_in_place() -> Option<&'static NodeConfig> {
    // SAFETY: an array map's value, valid for the program run (userspace rewrites it whole).
    NODE_CONFIG.get_ptr(0).map(|c| unsafe { &*c })
}

/// A configuration from [`config_in_place`] that userspace has written.
#[inline(always)]
pub fn configured(cfg: Option<&NodeConfig>) -> Result<&NodeConfig, u32> {
    match cfg {
        Some(c) if c.flags & NODE_F_CONFIGURED != 0 => Ok(c),
        _ => Err(proxy_common::STAT_DROP_NOT_CONFIGURED),
    }
}

#[inline(always)]
pub fn is_node_addr(addr: u32) -> bool {
    NODE_ADDRS.get_ptr(&addr).is_some()
}

/// 127.0.0.0/8 (the address is in network byte order, so its first octet is the lowest byte).
#[inline(always)]
pub fn is_loopback(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127
}

#[inline(always)]
pub fn in_cluster_cidr(cfg: &NodeConfig, addr: u32) -> bool {
    cfg.flags & NODE_F_CLUSTER_CIDR != 0 && addr & cfg.cluster_cidr_mask == cfg.cluster_cidr
}

#[inline(always)]
pub fn in_service_cidr(cfg: &NodeConfig, addr: u32) -> bool {
    cfg.flags & NODE_F_SERVICE_CIDR != 0 && addr & cfg.service_cidr_mask == cfg.service_cidr
}
