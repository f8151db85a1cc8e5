//! `/healthz` and `/livez`, answered as kube-proxy's `pkg/proxy/healthcheck/proxy_health.go` does:
//! the proxy is unhealthy when a change has been waiting to be programmed for longer than the health
//! timeout (twice `--sync-period`), i.e. when syncs stall or keep failing. `/healthz` is also 503 while
//! this node is being deleted (so load balancers drain it first); `/livez` ignores that.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

#[derive(Debug, Default)]
struct Inner {
    /// When the oldest change not yet programmed arrived.
    oldest_pending: Option<Instant>,
    /// When the datapath was last brought up to date.
    last_updated: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's own health, shared by the sync loop and the HTTP server.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

impl ProxyHealth {
    /// Starts with a change pending (the initial sync), so a proxy that never syncs turns unhealthy.
    pub fn new(timeout: Duration) -> Self {
        let inner = Inner { oldest_pending: Some(Instant::now()), last_updated: None, node_eligible: true };
        Self { inner: Arc::new(Mutex::new(inner)), timeout }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A change arrived; it is pending until the next successful sync.
    pub fn queued(&self) {
        self.with(|i| {
            i.oldest_pending.get_or_insert_with(Instant::now);
        });
    }

    /// A sync succeeded: nothing is pending.
    pub fn updated(&self) {
        self.with(|i| {
            i.oldest_pending = None;
            i.last_updated = Some(SystemTime::now());
        });
    }

    /// Whether this node may receive traffic (false while its Node object is being deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.with(|i| i.node_eligible = eligible);
    }

    /// Healthy unless a change has been pending for longer than the timeout.
    pub fn is_healthy_at(&self, now: Instant) -> bool {
        self.with(|i| i.oldest_pending.is_none_or(|t| now.saturating_duration_since(t) < self.timeout))
    }

    pub fn is_healthy(&self) -> bool {
        self.is_healthy_at(Instant::now())
    }

    fn answer(&self, with_node: bool) -> Response {
        let healthy = self.is_healthy();
        let (last, eligible) = self.with(|i| (i.last_updated, i.node_eligible));
        let ok = healthy && (!with_node || eligible);
        let body = if with_node {
            serde_json::json!({"lastUpdated": rfc3339(last), "currentTime": rfc3339(Some(SystemTime::now())), "nodeEligible": eligible})
        } else {
            serde_json::json!({"lastUpdated": rfc3339(last), "currentTime": rfc3339(Some(SystemTime::now()))})
        };
        let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut resp = (status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        resp
    }

    /// Serves `/healthz` and `/livez` on `addr` until the task is dropped.
    pub async fn serve(self, addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
        let app = Router::new()
            .route("/healthz", get(|State(h): State<ProxyHealth>| async move { h.answer(true) }))
            .route("/livez", get(|State(h): State<ProxyHealth>| async move { h.answer(false) }))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("healthz on {addr}"))?;
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::error!("healthz server on {addr}: {e}");
            }
        }))
    }
}

/// A timestamp as Go's time.Time prints in JSON-ish form (RFC 3339, UTC); empty when unset.
fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_millis(t).to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_only_when_a_change_waits_longer_than_the_timeout() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(h.is_healthy_at(start + Duration::from_secs(59)), "initial sync still within the timeout");
        assert!(!h.is_healthy_at(start + Duration::from_secs(61)), "never synced");
        h.updated();
        assert!(h.is_healthy_at(start + Duration::from_secs(3600)), "nothing pending: healthy however long");
        h.queued();
        let queued = Instant::now();
        h.queued(); // a later change does not reset the oldest
        assert!(h.is_healthy_at(queued + Duration::from_secs(30)));
        assert!(!h.is_healthy_at(queued + Duration::from_secs(61)));
        h.updated();
        assert!(h.is_healthy_at(queued + Duration::from_secs(61)));
    }
}
