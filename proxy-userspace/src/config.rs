//! Flags shared by `run` and `trace`, named like kube-proxy's where they mean the same.

use std::net::Ipv4Addr;

use clap::Args;
use ipnet::Ipv4Net;

/// What the proxy needs to know about the node it runs on.
#[derive(Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// This node's name, as in EndpointSlices' `nodeName` (kube-proxy: --hostname-override).
    #[arg(long, alias = "hostname-override", env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// An address of this node (repeatable). Sources from these addresses are the node itself.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod network: sources inside it are pods (kube-proxy: --cluster-cidr, detect-local-mode ClusterCIDR).
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Net>,
    /// The Service ClusterIP range.
    #[arg(long)]
    pub service_cidr: Option<Ipv4Net>,
    /// Node addresses NodePorts are served on (kube-proxy: --nodeport-addresses); default: all node addresses.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<Ipv4Net>,
    /// Masquerade all traffic to Service addresses (kube-proxy: --masquerade-all).
    #[arg(long)]
    pub masquerade_all: bool,
}

/// Where a packet comes from, from the node's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A pod on this node (inside --cluster-cidr).
    LocalPod,
    /// The node itself (a node address or loopback).
    Node,
    /// Anything else: arrives on an external interface.
    External,
}

impl NodeArgs {
    pub fn origin(&self, src: Ipv4Addr) -> Origin {
        if self.node_ips.contains(&src) || src.is_loopback() {
            Origin::Node
        } else if self.cluster_cidr.is_some_and(|c| c.contains(&src)) {
            Origin::LocalPod
        } else {
            Origin::External
        }
    }
}
