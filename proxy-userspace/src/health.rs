//! healthCheckNodePort: for each `externalTrafficPolicy: Local` Service with a health check port, an
//! HTTP server that tells load balancers whether this node has endpoints for it — as kube-proxy's
//! `pkg/proxy/healthcheck/service_health.go`: 200 with the count of local ready endpoints, 503 when
//! there are none (or the proxy itself is unhealthy), on every path.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::model::Model;

/// A Service, as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// What the health check servers should serve: port and local ready endpoint count per Service.
pub type Wanted = BTreeMap<ServiceName, (u16, usize)>;

/// The health check port and local ready endpoints of every eTP=Local Service that has one. Endpoints
/// are counted as kube-proxy does: distinct address:port pairs, ready, on this node, over all ports.
pub fn wanted(model: &Model, node_name: &str) -> Wanted {
    let mut ports: BTreeMap<ServiceName, u16> = BTreeMap::new();
    let mut local: BTreeMap<ServiceName, BTreeSet<(Ipv4Addr, u16)>> = BTreeMap::new();
    for sp in model.ports.values() {
        let name = ServiceName { namespace: sp.name.namespace.clone(), name: sp.name.name.clone() };
        if sp.policy.external_policy_local
            && let Some(port) = sp.policy.health_check_node_port
        {
            ports.insert(name.clone(), port);
        }
        let eps = sp.endpoints.iter().filter(|e| e.ready && e.is_local(node_name)).map(|e| (e.addr, e.port));
        local.entry(name).or_default().extend(eps);
    }
    ports
        .into_iter()
        .map(|(name, port)| {
            let n = local.get(&name).map_or(0, BTreeSet::len);
            (name, (port, n))
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    service: &'a ServiceName,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

/// Shared with the servers: endpoint counts and the proxy's own health.
#[derive(Default)]
struct Shared {
    counts: RwLock<BTreeMap<ServiceName, usize>>,
    proxy_healthy: AtomicBool,
}

struct Instance {
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Aborting the accept loop closes the listening socket.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The running health check servers.
pub struct ServiceHealth {
    /// Addresses to listen on: the node addresses NodePorts are served on, or every address.
    bind: Vec<Ipv4Addr>,
    shared: Arc<Shared>,
    servers: BTreeMap<ServiceName, Instance>,
}

async fn answer(State((shared, name)): State<(Arc<Shared>, ServiceName)>) -> Response {
    let count = shared.counts.read().map(|c| c.get(&name).copied().unwrap_or(0)).unwrap_or(0);
    let healthy = shared.proxy_healthy.load(Ordering::Relaxed);
    let status = if count > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Answer { service: &name, local_endpoints: count, service_proxy_healthy: healthy };
    let mut resp = (status, serde_json::to_string_pretty(&body).unwrap_or_default()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

impl ServiceHealth {
    /// `bind`: the addresses to listen on (`0.0.0.0` when NodePorts are served on every address).
    pub fn new(bind: Vec<Ipv4Addr>) -> Self {
        Self { bind, shared: Arc::default(), servers: BTreeMap::new() }
    }

    /// Opens servers for new Services, closes those of Services gone or moved to another port, and
    /// updates the counts. A port that cannot be bound is logged and tried again on the next sync.
    pub async fn sync(&mut self, wanted: &Wanted, proxy_healthy: bool) {
        self.shared.proxy_healthy.store(proxy_healthy, Ordering::Relaxed);
        if let Ok(mut counts) = self.shared.counts.write() {
            *counts = wanted.iter().map(|(n, (_, c))| (n.clone(), *c)).collect();
        }
        self.servers.retain(|name, inst| {
            let keep = wanted.get(name).is_some_and(|(port, _)| *port == inst.port);
            if !keep {
                log::info!("closing health check of {}/{} on port {}", name.namespace, name.name, inst.port);
            }
            keep
        });
        for (name, (port, _)) in wanted {
            if self.servers.contains_key(name) {
                continue;
            }
            match self.open(name, *port).await {
                Ok(inst) => {
                    log::info!("serving health check of {}/{} on port {port}", name.namespace, name.name);
                    self.servers.insert(name.clone(), inst);
                }
                Err(e) => log::error!("health check of {}/{} on port {port}: {e:#}", name.namespace, name.name),
            }
        }
    }

    async fn open(&self, name: &ServiceName, port: u16) -> anyhow::Result<Instance> {
        let app = Router::new().fallback(answer).with_state((self.shared.clone(), name.clone()));
        let mut tasks = Vec::new();
        for ip in &self.bind {
            let addr = SocketAddr::from((*ip, port));
            // On failure `tasks` is dropped with the instance not built: abort what was started.
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    return Err(anyhow::Error::new(e).context(format!("listening on {addr}")));
                }
            };
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    log::error!("health check server on {addr}: {e}");
                }
            }));
        }
        Ok(Instance { port, tasks })
    }
}
