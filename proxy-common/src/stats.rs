//! Per-reason counters (`STATS`, a per-CPU array indexed by these numbers).
//!
//! Every outcome of a program other than "not Service traffic, passed untouched" has a counter, so an
//! operator can always tell why a packet was translated, dropped or passed unchanged.

/// Number of slots in `STATS`.
pub const STAT_MAX: u32 = 32;

/// tc: a packet to a Service address was translated to a backend.
pub const STAT_FORWARD_DNAT: u32 = 0;
/// tc: a reply from a backend had its source restored to the Service address.
pub const STAT_REVERSE_NAT: u32 = 1;
/// tc: a new conntrack entry was created (a new connection).
pub const STAT_CT_NEW: u32 = 2;
/// socket LB: connect() to a Service address was redirected to a backend.
pub const STAT_SOCK_CONNECT: u32 = 3;
/// socket LB: sendmsg() to a Service address was redirected to a backend.
pub const STAT_SOCK_SENDMSG: u32 = 4;
/// socket LB: recvmsg()/getpeername() reported the Service address instead of the backend's.
pub const STAT_SOCK_REV_NAT: u32 = 5;
/// A fragment that is not to a Service address passed untouched (not translatable, not ours).
pub const STAT_PASS_FRAGMENT: u32 = 6;
/// A truncated L4 header not to a Service address passed untouched (the kernel judges it).
pub const STAT_PASS_MALFORMED_L4: u32 = 7;
/// tc: a packet to a Service port without endpoints (or a wrong port on a ClusterIP) was answered
/// with a TCP RST or an ICMP port unreachable.
pub const STAT_REJECT: u32 = 8;
/// tc: a new connection's source was translated to the node address (masquerade, hairpin).
pub const STAT_SNAT: u32 = 9;
/// tc: an SNAT source port was in use by another connection; the next one was tried.
pub const STAT_SNAT_COLLISION: u32 = 10;
/// A new connection went to the backend its client is affine to (sessionAffinity ClientIP).
pub const STAT_AFFINITY_HIT: u32 = 11;
/// socket LB: connect()/sendmsg() to a Service port without endpoints was refused at once.
pub const STAT_SOCK_REJECT: u32 = 12;
/// A pod's connect() on a UDP socket to a Service address, left to the tc path (see
/// `NodeConfig::host_netns_cookie`).
pub const STAT_SOCK_UDP_CONNECT_TO_TC: u32 = 13;
/// tc: a new connection's (client address, port) was already paired with its backend's address and
/// port by another connection, live or closing (the backend may still hold it in TIME_WAIT), so its
/// source port was changed to a free one, as netfilter's NAT does on a tuple clash.
pub const STAT_SOURCE_PORT_REMAP: u32 = 14;

/// Drop: IPv4 header truncated or invalid (version, IHL, total length).
pub const STAT_DROP_MALFORMED_IPV4: u32 = 16;
/// Drop: TCP/UDP header truncated on a packet to a Service address.
pub const STAT_DROP_MALFORMED_L4: u32 = 17;
/// Drop: IP fragment to a Service address (ports unknown in later fragments; translating only the
/// first would deliver a broken datagram).
pub const STAT_DROP_FRAGMENT: u32 = 18;
/// Drop: the Service port has no usable endpoints and the packet cannot be answered (e.g. a TCP RST,
/// an ICMP error, or IP options in the way of the ICMP quote).
pub const STAT_DROP_NO_ENDPOINTS: u32 = 19;
/// Drop: a backend slot or backend was missing (userspace is between writes; retried by the client).
pub const STAT_DROP_NO_BACKEND: u32 = 20;
/// Drop: conntrack entry could not be written.
pub const STAT_DROP_CT_FULL: u32 = 21;
/// Drop: rewriting the packet failed (helper error).
pub const STAT_DROP_REWRITE: u32 = 22;
/// socket LB: the Service port has no usable endpoints; the address was left for the tc path.
pub const STAT_SOCK_NO_ENDPOINTS: u32 = 23;
/// Drop: traffic policy Local (external or internal) and no endpoint on this node.
pub const STAT_DROP_NO_LOCAL_ENDPOINTS: u32 = 24;
/// Drop: the source is outside the LoadBalancer's loadBalancerSourceRanges.
pub const STAT_DROP_SOURCE_RANGE: u32 = 25;
/// Drop: an address in the service CIDR that no Service has.
pub const STAT_DROP_UNALLOCATED_SERVICE_IP: u32 = 26;
/// Drop: no free SNAT source port after `SNAT_RETRIES` tries.
pub const STAT_DROP_SNAT_EXHAUSTED: u32 = 27;
/// Drop: the node configuration is not written yet (no masquerade address).
pub const STAT_DROP_NOT_CONFIGURED: u32 = 28;

/// Human-readable name of a counter, for metrics, `trace` and logs.
pub const fn stat_name(index: u32) -> Option<&'static str> {
    Some(match index {
        STAT_FORWARD_DNAT => "forward_dnat",
        STAT_REVERSE_NAT => "reverse_nat",
        STAT_CT_NEW => "conntrack_new",
        STAT_SOCK_CONNECT => "sock_connect",
        STAT_SOCK_SENDMSG => "sock_sendmsg",
        STAT_SOCK_REV_NAT => "sock_reverse_nat",
        STAT_PASS_FRAGMENT => "pass_fragment",
        STAT_PASS_MALFORMED_L4 => "pass_malformed_l4",
        STAT_REJECT => "reject",
        STAT_SNAT => "snat",
        STAT_SNAT_COLLISION => "snat_port_collision",
        STAT_AFFINITY_HIT => "affinity_hit",
        STAT_SOCK_REJECT => "sock_reject",
        STAT_SOCK_UDP_CONNECT_TO_TC => "sock_udp_connect_left_to_tc",
        STAT_SOURCE_PORT_REMAP => "source_port_remapped",
        STAT_DROP_MALFORMED_IPV4 => "drop_malformed_ipv4",
        STAT_DROP_MALFORMED_L4 => "drop_malformed_l4",
        STAT_DROP_FRAGMENT => "drop_fragment",
        STAT_DROP_NO_ENDPOINTS => "drop_no_endpoints",
        STAT_DROP_NO_BACKEND => "drop_no_backend",
        STAT_DROP_CT_FULL => "drop_conntrack_full",
        STAT_DROP_REWRITE => "drop_rewrite_failed",
        STAT_SOCK_NO_ENDPOINTS => "sock_no_endpoints",
        STAT_DROP_NO_LOCAL_ENDPOINTS => "drop_no_local_endpoints",
        STAT_DROP_SOURCE_RANGE => "drop_source_range",
        STAT_DROP_UNALLOCATED_SERVICE_IP => "drop_unallocated_service_ip",
        STAT_DROP_SNAT_EXHAUSTED => "drop_snat_exhausted",
        STAT_DROP_NOT_CONFIGURED => "drop_not_configured",
        _ => return None,
    })
}

/// Whether a counter records a drop.
pub const fn stat_is_drop(index: u32) -> bool {
    (index >= STAT_DROP_MALFORMED_IPV4 && index <= STAT_DROP_REWRITE)
        || (index >= STAT_DROP_NO_LOCAL_ENDPOINTS && index <= STAT_DROP_NOT_CONFIGURED)
}
