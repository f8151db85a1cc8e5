//! Per-reason counters (`STATS`, a per-CPU array indexed by these numbers).
//!
//! Every outcome of a program other than "not Service traffic, passed untouched" has a counter, so an
//! operator can always tell why a packet was translated, dropped or passed unchanged. Indexes below
//! [`STAT_DROP_BASE`] count events; from it on, drops. Each counter is defined once, with its name,
//! in the table below.

/// Number of slots in `STATS`.
pub const STAT_MAX: u32 = 64;
/// First drop counter.
pub const STAT_DROP_BASE: u32 = 32;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $index:expr => $label:literal; )*) => {
        $( $(#[$doc])* pub const $name: u32 = $index; )*

        /// Human-readable name of a counter, for metrics, `trace` and logs.
        pub const fn stat_name(index: u32) -> Option<&'static str> {
            match index {
                $( $index => Some($label), )*
                _ => None,
            }
        }

        /// Every counter that has a name.
        pub const STAT_ALL: &[u32] = &[$( $name ),*];
    };
}

counters! {
    /// tc: a packet to a Service address was translated to a backend.
    STAT_FORWARD_DNAT = 0 => "forward_dnat";
    /// tc: a reply from a backend had its source restored to the Service address.
    STAT_REVERSE_NAT = 1 => "reverse_nat";
    /// tc: a new connection was tracked.
    STAT_CT_NEW = 2 => "conntrack_new";
    /// socket LB: connect() to a Service address was redirected to a backend.
    STAT_SOCK_CONNECT = 3 => "sock_connect";
    /// socket LB: sendmsg() to a Service address was redirected to a backend.
    STAT_SOCK_SENDMSG = 4 => "sock_sendmsg";
    /// socket LB: recvmsg()/getpeername() reported the Service address instead of the backend's.
    STAT_SOCK_REV_NAT = 5 => "sock_reverse_nat";
    /// A later fragment of a datagram the datapath did not translate passed untouched (not ours).
    STAT_PASS_FRAGMENT = 6 => "pass_fragment";
    /// A truncated L4 header not to a Service address passed untouched (the kernel judges it).
    STAT_PASS_MALFORMED_L4 = 7 => "pass_malformed_l4";
    /// tc: a packet to a Service port without endpoints (or a wrong port on a ClusterIP) was answered
    /// with a TCP RST or an ICMP port unreachable.
    STAT_REJECT = 8 => "reject";
    /// tc: a new connection's source was translated to the node address (masquerade, hairpin).
    STAT_SNAT = 9 => "snat";
    /// tc: an SNAT source port was held by another live connection; another one was tried.
    STAT_SNAT_COLLISION = 10 => "snat_port_collision";
    /// A new connection went to the backend its client is affine to (sessionAffinity ClientIP).
    STAT_AFFINITY_HIT = 11 => "affinity_hit";
    /// socket LB: connect()/sendmsg() to a Service port without endpoints was refused at once.
    STAT_SOCK_REJECT = 12 => "sock_reject";
    /// A pod's connect() on a UDP socket to a Service address, left to the tc path (see
    /// `NodeConfig::host_netns_cookie`).
    STAT_SOCK_UDP_CONNECT_TO_TC = 13 => "sock_udp_connect_left_to_tc";
    /// tc: a new connection's (client address, port) was already paired with its backend's address and
    /// port by another connection, live or closing (the backend may still hold it in TIME_WAIT), so its
    /// source port was changed to a free one, as netfilter's NAT does on a tuple clash.
    STAT_SOURCE_PORT_REMAP = 14 => "source_port_remapped";
    /// tc: the table was full and a new connection took the place of a recent one that was not yet
    /// assured (no answer, or an unfinished handshake): netfilter's early drop.
    STAT_CT_EARLY_DROP = 15 => "conntrack_early_drop";
    /// tc: an SNAT port was taken over from a connection already closed (TIME_WAIT or reset), as
    /// netfilter reuses TIME_WAIT tuples, because no unused port was found.
    STAT_SNAT_REUSE_CLOSED = 16 => "snat_port_reused_from_closed";
    /// tc: a new SYN on a tuple whose connection was closed started a new connection.
    STAT_CT_REOPEN = 17 => "conntrack_reopened";
    /// socket LB: the Service port has no usable endpoints; the address was left for the tc path.
    STAT_SOCK_NO_ENDPOINTS = 18 => "sock_no_endpoints";
    /// tc: no SNAT port was free or closed, and one was taken from a connection nobody had answered
    /// for `CT_UNANSWERED_TAKEOVER_NS` (an unfinished handshake).
    STAT_SNAT_REUSE_UNANSWERED = 19 => "snat_port_taken_from_unanswered";
    /// tc: the only SNAT port left was one whose backend still holds it in TIME_WAIT against this
    /// SYN: the backend answers with an ACK, the client resets and retries (a second's delay).
    STAT_SNAT_REUSE_BACKEND_TIME_WAIT = 20 => "snat_port_reused_in_backend_time_wait";
    /// socket LB: `--masquerade-all` and a pod's call: left to the tc path, which masquerades it.
    STAT_SOCK_MASQUERADE_TO_TC = 21 => "sock_left_to_tc_to_masquerade";
    /// An ICMP error about a packet of a translated connection, translated back (quote, addresses,
    /// checksums) for the end it goes to.
    STAT_ICMP_ERROR_NAT = 22 => "icmp_error_translated";
    /// A packet the datapath forwards itself did not fit the next hop's MTU: answered with ICMP
    /// fragmentation needed (its DF bit set), as a router does.
    STAT_FRAG_NEEDED = 23 => "frag_needed_sent";
    /// A later fragment of a translated datagram, translated as its first fragment was.
    STAT_FRAGMENT_NAT = 24 => "fragment_translated";

    /// Drop: IPv4 header truncated or invalid (version, IHL, total length).
    STAT_DROP_MALFORMED_IPV4 = 32 => "drop_malformed_ipv4";
    /// Drop: TCP/UDP header truncated on a packet to a Service address.
    STAT_DROP_MALFORMED_L4 = 33 => "drop_malformed_l4";
    /// Drop: an IP fragment to a Service address that cannot be translated: a later fragment whose
    /// first was not seen (lost, reordered, or its entry displaced), one opening no connection, or
    /// SCTP (its checksum covers the whole datagram).
    STAT_DROP_FRAGMENT = 34 => "drop_fragment";
    /// Drop: the Service port has no usable endpoints and the packet cannot be answered (e.g. a TCP RST,
    /// an ICMP error, or IP options in the way of the ICMP quote).
    STAT_DROP_NO_ENDPOINTS = 35 => "drop_no_endpoints";
    /// Drop: a backend slot or backend was missing (userspace is between writes; retried by the client).
    STAT_DROP_NO_BACKEND = 36 => "drop_no_backend";
    /// Drop: the connection table is full of assured connections (or of connections being created on
    /// other CPUs): the new connection is not tracked, and so not translated.
    STAT_DROP_CT_FULL = 37 => "drop_conntrack_full";
    /// Drop: rewriting the packet failed (helper error).
    STAT_DROP_REWRITE = 38 => "drop_rewrite_failed";
    /// Drop: traffic policy Local (external or internal) and no endpoint on this node.
    STAT_DROP_NO_LOCAL_ENDPOINTS = 39 => "drop_no_local_endpoints";
    /// Drop: the source is outside the LoadBalancer's loadBalancerSourceRanges.
    STAT_DROP_SOURCE_RANGE = 40 => "drop_source_range";
    /// Drop: an address in the service CIDR that no Service has.
    STAT_DROP_UNALLOCATED_SERVICE_IP = 41 => "drop_unallocated_service_ip";
    /// Drop: no free SNAT source port after `SNAT_RETRIES` tries.
    STAT_DROP_SNAT_EXHAUSTED = 42 => "drop_snat_exhausted";
    /// Drop: the node configuration is not written yet (no masquerade address).
    STAT_DROP_NOT_CONFIGURED = 43 => "drop_not_configured";
    /// Drop: a REJECT answer over the node's budget (`REJECT_PER_SEC`, burst `REJECT_BURST`): the packet
    /// is dropped unanswered, as the kernel rate-limits its own ICMP errors.
    STAT_DROP_REJECT_RATE_LIMITED = 44 => "drop_reject_rate_limited";
    /// Drop: Service traffic from a local pod with a source that is not the pod's: the address does not
    /// route back through the interface it came from, or the connection it belongs to came in
    /// elsewhere (a pod forging another client's address or connection).
    STAT_DROP_POD_SOURCE_SPOOFED = 45 => "drop_pod_source_spoofed";
    /// Drop: a packet from a local pod claiming to be a backend's reply, from an address that is not
    /// the pod's, or on another interface than the connection's replies come in on (a pod injecting
    /// into another connection, e.g. a masqueraded flow to a node port).
    STAT_DROP_POD_REPLY_SPOOFED = 46 => "drop_pod_reply_spoofed";
    /// Drop: a packet the datapath forwards itself does not fit the next hop's MTU and may not be
    /// answered with fragmentation needed (DF clear: it would have to be fragmented, which the
    /// datapath does not do after translation).
    STAT_DROP_TOO_BIG = 47 => "drop_too_big";
}

/// Whether a counter records a drop.
pub const fn stat_is_drop(index: u32) -> bool {
    index >= STAT_DROP_BASE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_unique_name_and_fits() {
        let mut names: Vec<&str> = STAT_ALL.iter().map(|&i| stat_name(i).unwrap()).collect();
        assert!(STAT_ALL.iter().all(|&i| i < STAT_MAX));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), STAT_ALL.len());
        assert!(STAT_ALL.iter().all(|&i| stat_is_drop(i) == stat_name(i).unwrap().starts_with("drop_")));
    }
}
