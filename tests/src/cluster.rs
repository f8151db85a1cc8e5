//! A multi-node cluster in network namespaces: nodes on a shared network behind a router, an
//! external client, each node running its own ebpf-proxy on its uplink (found by its addresses). Reusable by the live tests
//! and the benchmarks. Same safety rules as [`crate::testbed`]: nothing in the root namespace, every
//! namespace, cgroup, pin and process removed on drop.
//!
//! ```text
//!              [ext] eth0 203.0.113.2 (+ .3)            external client, default route via the router
//!                |
//!              [rtr] ext0 203.0.113.1, br0 192.168.0.1 + 172.16.9.1, ip_forward=1,
//!             /    \      routes 10.244.<k+1>.0/24 via node k, LoadBalancer IPs via the node chosen
//!   [node 0] eth0 192.168.0.2 + 172.16.9.2 (secondary)   [node 1] eth0 192.168.0.3 + 172.16.9.3  ...
//!    pods 10.244.1.x                                       pods 10.244.2.x
//! ```
//! Nodes reach each other's pods directly over br0 (routes via the peer node, as host-gw networking).

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};

use crate::testbed::{LbMode, Netns, Node, run, unique_id};

pub const ROUTER_NODE_NET: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const ROUTER_SECONDARY: Ipv4Addr = Ipv4Addr::new(172, 16, 9, 1);
pub const ROUTER_EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The external client's two addresses (two clients, for source ranges).
pub const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const EXT_CLIENT_2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// The Service CIDR every proxy is told about.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Node k's primary address.
pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, 2 + k as u8)
}

/// Node k's secondary address (another subnet on the same uplink).
pub fn secondary_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 9, 2 + k as u8)
}

/// Node names: node-a, node-b, …
pub fn node_name(k: usize) -> String {
    format!("node-{}", (b'a' + k as u8) as char)
}

/// The cluster. Field order is drop order: nodes (proxies, pods) first, then the client and router.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub ext: Netns,
    pub router: Netns,
}

impl Cluster {
    /// `nodes` nodes with `pods_per_node` pods each (`pod-0`, … on every node; pod IPs differ).
    pub fn new(nodes: usize, pods_per_node: usize) -> Result<Self> {
        let id = unique_id();
        let router = Netns::new(format!("epx-{id}-rtr"))?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        for key in ["all", "default"] {
            router.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
        }
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["addr", "add", &format!("{ROUTER_NODE_NET}/24"), "dev", "br0"])?;
        router.ip(&["addr", "add", &format!("{ROUTER_SECONDARY}/24"), "dev", "br0"])?;
        router.ip(&["link", "set", "br0", "up"])?;

        let ext = Netns::new(format!("epx-{id}-ext"))?;
        // Made in the router namespace with the peer straight in the client's: nothing in the root one.
        router.ip(&["link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &ext.name])?;
        router.ip(&["addr", "add", &format!("{ROUTER_EXT}/24"), "dev", "ext0"])?;
        router.ip(&["link", "set", "ext0", "up"])?;
        for a in [EXT_CLIENT, EXT_CLIENT_2] {
            ext.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        ext.ip(&["link", "set", "eth0", "up"])?;
        ext.ip(&["route", "add", "default", "via", &ROUTER_EXT.to_string()])?;

        let mut cluster = Self { nodes: Vec::new(), ext, router };
        for k in 0..nodes {
            let node = Node::bare(&node_name(k), k as u8, node_ip(k))?;
            let port = format!("n{k}");
            node.ns.ip(&[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &cluster.router.name,
            ])?;
            cluster.router.ip(&["link", "set", &port, "master", "br0", "up"])?;
            node.ns.ip(&["addr", "add", &format!("{}/24", node_ip(k)), "dev", "eth0"])?;
            node.ns.ip(&["addr", "add", &format!("{}/24", secondary_ip(k)), "dev", "eth0"])?;
            node.ns.ip(&["link", "set", "eth0", "up"])?;
            node.ns.ip(&["route", "add", "default", "via", &ROUTER_NODE_NET.to_string()])?;
            cluster.router.ip(&["route", "add", &node.pod_cidr(), "via", &node_ip(k).to_string()])?;
            cluster.nodes.push(node.with_pods(pods_per_node)?);
        }
        for (k, node) in cluster.nodes.iter().enumerate() {
            for (j, other) in cluster.nodes.iter().enumerate().filter(|(j, _)| *j != k) {
                node.ns.ip(&["route", "add", &other.pod_cidr(), "via", &node_ip(j).to_string()])?;
            }
        }
        Ok(cluster)
    }

    /// Starts every node's proxy with both node addresses and the Service CIDR (`extra` appended);
    /// the proxy finds its external interface itself, as the one carrying the node addresses.
    pub fn start_proxies(&mut self, binary: &std::path::Path, mode: LbMode, extra: &[&str]) -> Result<()> {
        for (k, node) in self.nodes.iter_mut().enumerate() {
            node.uplink = true;
            node.proxy_args = ["--node-ip", &secondary_ip(k).to_string()]
                .iter()
                .chain(&["--service-cidr", SERVICE_CIDR])
                .chain(extra)
                .map(|s| s.to_string())
                .collect();
            node.start_proxy(binary, mode).with_context(|| format!("proxy on {}", node.name))?;
        }
        Ok(())
    }

    /// Writes one objects file on every node (each proxy reads the same API objects).
    pub fn write_objects(&self, file: &str, yaml: &str) -> Result<()> {
        self.nodes.iter().try_for_each(|n| n.write_objects(file, yaml))
    }

    /// Waits until every proxy has applied `n` syncs.
    pub fn wait_for_syncs(&self, n: usize) -> Result<()> {
        self.nodes.iter().try_for_each(|node| node.wait_for_syncs(n))
    }

    /// Routes a LoadBalancer IP to node `k` on the router (as a BGP or L2 announcement would).
    pub fn route_to_node(&self, ip: Ipv4Addr, k: usize) -> Result<()> {
        self.router.ip(&["route", "replace", &format!("{ip}/32"), "via", &node_ip(k).to_string()])?;
        Ok(())
    }

    /// `curl` from the external client, from address `from`; returns the body.
    pub fn ext_curl(&self, from: Ipv4Addr, url: &str, timeout_s: &str) -> Result<String> {
        run(self.ext.command("curl").args(["-sS", "--fail", "-m", timeout_s, "--interface", &from.to_string(), url]))
    }

    /// Node `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }
}

/// A flag a background client loop polls to stop (the loops are bounded on their own as well).
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How the two nodes of [`Cluster::tunnel_pods`] carry pod traffic between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// A VXLAN device per node (`vx0`, VNI 42 over eth0): Ethernet frames inside UDP.
    Vxlan,
    /// A TUN device per node (`tn0`) with no link-layer header, joined by a relay thread of the test
    /// process that moves each packet from one device to the other, as a userspace VPN (wireguard-go,
    /// boringtun) does between its TUN device and the network.
    Tun,
}

/// The relay behind [`Tunnel::Tun`]: stops when dropped.
pub struct TunRelay {
    stop: StopFlag,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Cluster {
    /// Routes the pod traffic between nodes 0 and 1 over a tunnel instead of the shared network; the
    /// tunnel device is named in the returned string (for `--interfaces`). A relay, if any, runs as
    /// long as the returned value lives.
    pub fn tunnel_pods(&self, kind: Tunnel) -> Result<(&'static str, Option<TunRelay>)> {
        let relay = match kind {
            Tunnel::Vxlan => {
                for (k, j) in [(0, 1), (1, 0)] {
                    let ns = &self.nodes[k].ns;
                    let (local, remote) = (node_ip(k).to_string(), node_ip(j).to_string());
                    ns.ip(&["link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", &local])?;
                    ns.ip(&["link", "set", "vx0", "up"])?;
                    // Head-end replication to the one peer (no multicast on the test network).
                    run(ns.command("bridge").args([
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        "vx0",
                        "dst",
                        &remote,
                    ]))?;
                    let _ = ns.ip(&["route", "del", &self.nodes[j].pod_cidr()]);
                    ns.ip(&["addr", "add", &format!("10.250.0.{}/24", k + 1), "dev", "vx0"])?;
                    ns.ip(&[
                        "route",
                        "add",
                        &self.nodes[j].pod_cidr(),
                        "via",
                        &format!("10.250.0.{}", j + 1),
                        "dev",
                        "vx0",
                    ])?;
                }
                None
            }
            Tunnel::Tun => {
                let a = open_tun(&self.nodes[0].ns.name).map_err(anyhow::Error::msg)?;
                let b = open_tun(&self.nodes[1].ns.name).map_err(anyhow::Error::msg)?;
                for (k, j) in [(0, 1), (1, 0)] {
                    let ns = &self.nodes[k].ns;
                    ns.ip(&["link", "set", "tn0", "up"])?;
                    let _ = ns.ip(&["route", "del", &self.nodes[j].pod_cidr()]);
                    ns.ip(&["route", "add", &self.nodes[j].pod_cidr(), "dev", "tn0"])?;
                }
                let stop = StopFlag::default();
                let threads = [(a.try_clone()?, b.try_clone()?), (b.try_clone()?, a.try_clone()?)]
                    .into_iter()
                    .map(|(from, to)| {
                        let stop = stop.clone();
                        std::thread::spawn(move || relay(&from, &to, &stop))
                    })
                    .collect();
                Some(TunRelay { stop, threads })
            }
        };
        Ok((if kind == Tunnel::Vxlan { "vx0" } else { "tn0" }, relay))
    }
}

/// Creates TUN device `tn0` (IFF_TUN | IFF_NO_PI: bare IP packets) in namespace `ns`, non-blocking.
fn open_tun(ns: &str) -> std::result::Result<std::fs::File, String> {
    let ns = ns.to_owned();
    crate::client::in_netns(&ns, || -> std::result::Result<std::fs::File, String> {
        use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        // struct ifreq: the name, then ifr_flags.
        let mut ifr = [0u8; 40];
        ifr[..3].copy_from_slice(b"tn0");
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF with a struct ifreq-sized buffer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
        }
        Ok(file)
    })
    .join()
    .map_err(|_| "the TUN thread panicked".to_owned())?
}

/// Moves packets from one TUN device to the other until stopped.
fn relay(from: &std::fs::File, to: &std::fs::File, stop: &StopFlag) {
    use std::io::{Read as _, Write as _};
    let mut buf = vec![0u8; 65_536];
    let (mut from, mut to) = (from, to);
    while !stop.stopped() {
        match from.read(&mut buf) {
            Ok(n) => {
                let _ = to.write(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Err(_) => return,
        }
    }
}
