//! The Services every benchmark programs: N ClusterIP Services × 10 endpoints, as API objects (for
//! ebpf-proxy) and as plain data (for the kube-proxy layouts in `kube_proxy.rs`).

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use proxy_common::{Backend, BackendSlotKey, Frontend, FrontendKey, PROTO_TCP, addr_to_map, port_to_map};
use serde_json::{Value, json};
use tests::testbed::NODE_NAME;

pub const ENDPOINTS: usize = 10;
pub const NAMESPACE: &str = "bench";
/// Services a client connects to, spread evenly over the table.
pub const HIT: usize = 20;
pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;

pub fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint `j` of Service `i` when no server stands behind it (an entry in the tables only).
pub fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * ENDPOINTS + j) as u32)
}

/// One Service with one TCP port and its endpoints.
#[derive(Clone, Debug)]
pub struct BenchService {
    pub index: usize,
    pub port_name: &'static str,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

impl BenchService {
    /// Service `i` on port 80 with endpoints no server stands behind.
    pub fn entry(i: usize) -> Self {
        let endpoints = (0..ENDPOINTS).map(|j| SocketAddrV4::new(endpoint_ip(i, j), HTTP_PORT)).collect();
        Self { index: i, port_name: "http", port: HTTP_PORT, endpoints }
    }

    pub fn name(&self) -> String {
        format!("svc-{}", self.index)
    }

    pub fn ip(&self) -> Ipv4Addr {
        service_ip(self.index)
    }

    pub fn frontend(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip(), self.port)
    }

    /// The port the endpoints listen on (all of a Service's endpoints use the same one here).
    pub fn target_port(&self) -> u16 {
        self.endpoints.first().map_or(self.port, SocketAddrV4::port)
    }

    pub fn service_json(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name(), "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "clusterIP": self.ip().to_string(),
                     "ports": [{"name": self.port_name, "port": self.port, "protocol": "TCP", "targetPort": self.target_port()}]}})
    }

    pub fn slice_json(&self) -> Value {
        let eps: Vec<Value> = self
            .endpoints
            .iter()
            .map(|a| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-1", self.name()), "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": self.name()}},
            "addressType": "IPv4",
            "ports": [{"name": self.port_name, "port": self.target_port(), "protocol": "TCP"}],
            "endpoints": eps})
    }
}

/// N Services: `HIT` of them, spread over the table, send to live nginx pods; one, in the middle,
/// sends to the iperf3 server; the rest are entries.
pub struct Table {
    pub services: Vec<BenchService>,
    pub hit: Vec<usize>,
    pub iperf: usize,
}

impl Table {
    pub fn new(n: usize, live: &[Ipv4Addr]) -> Self {
        let hit: Vec<usize> = (0..HIT.min(n)).map(|k| k * n / HIT.min(n) + n / (2 * HIT.min(n))).collect();
        let iperf = n / 2;
        assert!(!hit.contains(&iperf), "the iperf3 Service must not be one of the HTTP ones");
        let services = (0..n)
            .map(|i| {
                let mut s = BenchService::entry(i);
                if hit.contains(&i) {
                    s.endpoints = live.iter().map(|&a| SocketAddrV4::new(a, HTTP_PORT)).collect();
                } else if i == iperf {
                    // One endpoint: iperf3's control and data connections must meet the same server.
                    s.port_name = "iperf";
                    s.port = IPERF_PORT;
                    s.endpoints = vec![SocketAddrV4::new(live[0], IPERF_PORT)];
                }
                s
            })
            .collect();
        Self { services, hit, iperf }
    }

    /// The Services the HTTP clients connect to.
    pub fn hit_frontends(&self) -> Vec<SocketAddrV4> {
        self.hit.iter().map(|&i| self.services[i].frontend()).collect()
    }

    pub fn total_endpoints(&self) -> usize {
        self.services.iter().map(|s| s.endpoints.len()).sum()
    }
}

/// The pinned maps, read to see when a change has been programmed.
pub struct MapView {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub slots: HashMap<MapData, BackendSlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
}

impl MapView {
    pub fn open(bpffs: &std::path::Path) -> anyhow::Result<Self> {
        use ebpf_proxy::datapath::open_pinned_hash;
        Ok(Self {
            frontends: open_pinned_hash(bpffs, "FRONTENDS")?.0,
            slots: open_pinned_hash(bpffs, "BACKEND_SLOTS")?.0,
            backends: open_pinned_hash(bpffs, "BACKENDS")?.0,
        })
    }

    /// Whether the maps send `frontend` to `addr` (one of its slots holds a backend with that address).
    pub fn has_backend(&self, frontend: SocketAddrV4, addr: Ipv4Addr) -> bool {
        let key = FrontendKey {
            addr: addr_to_map(frontend.ip().octets()),
            port: port_to_map(frontend.port()),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let Ok(fe) = self.frontends.get(&key, 0) else { return false };
        (0..u32::from(fe.backend_count)).any(|slot| {
            self.slots
                .get(&BackendSlotKey { service_id: fe.service_id, slot }, 0)
                .and_then(|id| self.backends.get(&id, 0))
                .is_ok_and(|b| b.addr == addr_to_map(addr.octets()))
        })
    }

    /// Polls until `frontend` sends to `addr`; the time it took, from `since`.
    pub fn wait_for_backend(
        &self,
        frontend: SocketAddrV4,
        addr: Ipv4Addr,
        since: std::time::Instant,
    ) -> anyhow::Result<std::time::Duration> {
        while !self.has_backend(frontend, addr) {
            anyhow::ensure!(
                since.elapsed() < std::time::Duration::from_secs(60),
                "{frontend} → {addr} not programmed after 60 s"
            );
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(since.elapsed())
    }
}
