//! A test API server that speaks the real Kubernetes HTTP API for what ebpf-proxy watches — v1
//! Services and Nodes, discovery.k8s.io/v1 EndpointSlices — so kube-rs runs against it unchanged
//! through a kubeconfig. No kube-apiserver binary comes from the package registries here.
//!
//! What it implements, as the real server does: lists carrying the collection's resourceVersion;
//! label selectors (`k`, `!k`, `k=v`, `k==v`, `k!=v`) and field selectors (`metadata.name`,
//! `metadata.namespace`); watches from a resourceVersion replaying what happened since, then live
//! events, with BOOKMARK events when asked for (`allowWatchBookmarks`), ended after `timeoutSeconds`;
//! a watch from a resourceVersion older than the compacted history gets an ERROR event with a
//! `410 Expired` Status. Tests drive it: create, update and delete objects, compact the history,
//! and cut every open watch.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn of(obj: &Value) -> Result<Self> {
        match (obj["apiVersion"].as_str(), obj["kind"].as_str()) {
            (Some("v1"), Some("Service")) => Ok(Self::Service),
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => Ok(Self::EndpointSlice),
            (Some("v1"), Some("Node")) => Ok(Self::Node),
            (a, k) => bail!("the test API server does not serve {a:?} {k:?}"),
        }
    }

    fn api_version(self) -> &'static str {
        if self == Self::EndpointSlice { "discovery.k8s.io/v1" } else { "v1" }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

type Key = (Kind, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Db {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change since `floor`; a watch from before `floor` has expired.
    history: VecDeque<Change>,
    floor: u64,
}

struct Shared {
    db: Mutex<Db>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch (a dropped connection, as clients see it).
    cut: watch::Sender<u64>,
    /// Requests served, by path and whether they were watches: (path, watch) → count.
    requests: Mutex<BTreeMap<(String, bool), usize>>,
}

/// The server: runs on its own thread and runtime inside a network namespace; stops on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    let m = &obj["metadata"];
    (kind, m["namespace"].as_str().unwrap_or("").to_owned(), m["name"].as_str().unwrap_or("").to_owned())
}

/// One requirement of a label selector.
fn label_matches(selector: &str, labels: &serde_json::Map<String, Value>) -> bool {
    selector.split(',').map(str::trim).filter(|r| !r.is_empty()).all(|req| {
        let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
        if let Some(k) = req.strip_prefix('!') {
            get(k).is_none()
        } else if let Some((k, v)) = req.split_once("!=") {
            get(k) != Some(v.trim())
        } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            get(k) == Some(v.trim())
        } else {
            get(req).is_some()
        }
    })
}

fn field_matches(selector: &str, obj: &Value) -> bool {
    selector.split(',').map(str::trim).filter(|r| !r.is_empty()).all(|req| {
        let (k, v, eq) = match req.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match req.split_once("==").or_else(|| req.split_once('=')) {
                Some((k, v)) => (k, v, true),
                None => return false,
            },
        };
        let actual = match k.trim() {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            _ => return false,
        };
        (actual == Some(v.trim())) == eq
    })
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    label_selector: Option<String>,
    field_selector: Option<String>,
    resource_version: Option<String>,
    watch: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
}

impl Params {
    fn selects(&self, obj: &Value) -> bool {
        let empty = serde_json::Map::new();
        let labels = obj["metadata"]["labels"].as_object().unwrap_or(&empty);
        self.label_selector.as_deref().is_none_or(|s| label_matches(s, labels))
            && self.field_selector.as_deref().is_none_or(|s| field_matches(s, obj))
    }
    fn is_watch(&self) -> bool {
        matches!(self.watch.as_deref(), Some("true" | "1"))
    }
}

fn status_410(rv: u64) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410}})
}

async fn serve(kind: Kind, State(shared): State<Arc<Shared>>, Query(p): Query<Params>) -> Response {
    *shared.requests.lock().unwrap().entry((kind.name().to_owned(), p.is_watch())).or_default() += 1;
    if p.is_watch() {
        return watch_stream(kind, shared, p);
    }
    let db = shared.db.lock().unwrap();
    let items: Vec<Value> = db
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && p.selects(o))
        .map(|(_, o)| {
            // As the real server: list items carry neither kind nor apiVersion.
            let mut o = o.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": db.rv.to_string()}, "items": items});
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn event_line(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

fn watch_stream(kind: Kind, shared: Arc<Shared>, p: Params) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut live = shared.changes.subscribe();
    let mut cut = shared.cut.subscribe();
    let (backlog, mut last_rv, expired) = {
        let db = shared.db.lock().unwrap();
        let from: u64 = p.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        if from == 0 {
            // No resourceVersion: the current objects as ADDED, then what follows.
            let added: Vec<Change> = db
                .objects
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|(_, o)| Change { rv: db.rv, kind, kind_of_event: "ADDED", object: o.clone() })
                .collect();
            (added, db.rv, false)
        } else if from < db.floor {
            (Vec::new(), from, true)
        } else {
            let since: Vec<Change> = db.history.iter().filter(|c| c.rv > from && c.kind == kind).cloned().collect();
            (since, from, false)
        }
    };
    tokio::spawn(async move {
        if expired {
            let _ = tx.send(event_line(&status_410(last_rv))).await;
            return;
        }
        let send = |c: &Change| json!({"type": c.kind_of_event, "object": c.object});
        for c in backlog.iter().filter(|c| p.selects(&c.object)) {
            if tx.send(event_line(&send(c))).await.is_err() {
                return;
            }
            last_rv = last_rv.max(c.rv);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(p.timeout_seconds.unwrap_or(1800));
        let mut bookmarks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = cut.changed() => return,
                change = live.recv() => match change {
                    Ok(c) if c.kind == kind && c.rv > last_rv => {
                        last_rv = c.rv;
                        if p.selects(&c.object) && tx.send(event_line(&send(&c))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind: end the watch; the client resumes from its last resourceVersion.
                    Err(_) => return,
                },
                _ = bookmarks.tick(), if p.allow_watch_bookmarks == Some(true) => {
                    let rv = shared.db.lock().unwrap().rv;
                    let mark = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(event_line(&mark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}

async fn not_found() -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], status.to_string()).into_response()
}

impl ApiServer {
    /// Starts the server on 127.0.0.1 (a free port) inside network namespace `netns`.
    pub fn start(netns: &str) -> Result<Self> {
        Self::start_at(netns, std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0))
    }

    /// Starts the server listening on `listen` inside network namespace `netns`.
    pub fn start_at(netns: &str, listen: std::net::SocketAddrV4) -> Result<Self> {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            db: Mutex::new(Db { rv: 1, ..Default::default() }),
            changes,
            cut: watch::channel(0).0,
            requests: Mutex::new(BTreeMap::new()),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/api/v1/services", get(|s, q| serve(Kind::Service, s, q)))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(|s, q| serve(Kind::EndpointSlice, s, q)))
            .route("/api/v1/nodes", get(|s, q| serve(Kind::Node, s, q)))
            .fallback(not_found)
            .with_state(shared.clone());
        let path = format!("/run/netns/{netns}");
        let thread = std::thread::spawn(move || {
            let run = || -> Result<()> {
                let f = std::fs::File::open(&path)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(listen).await?;
                    addr_tx.send(listener.local_addr()?).ok();
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await?;
                    Ok(())
                })
            };
            if let Err(e) = run() {
                eprintln!("test API server: {e:#}");
            }
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(5)).context("test API server did not start")?;
        Ok(Self { shared, addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\ncontexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n\
             current-context: test\n",
            self.addr
        )
    }

    fn record(&self, db: &mut Db, kind: Kind, kind_of_event: &'static str, object: Value) {
        let change = Change { rv: db.rv, kind, kind_of_event, object };
        db.history.push_back(change.clone());
        let _ = self.shared.changes.send(change);
    }

    /// Creates or replaces every object in a multi-document YAML text (ADDED or MODIFIED events).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        use serde::Deserialize as _;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let obj: Value = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
            if !obj.is_null() {
                self.apply_object(obj)?;
            }
        }
        Ok(())
    }

    /// Creates or replaces one object (an ADDED or MODIFIED event).
    pub fn apply_object(&self, mut obj: Value) -> Result<()> {
        let kind = Kind::of(&obj)?;
        let key = key_of(kind, &obj);
        let mut db = self.shared.db.lock().unwrap();
        db.rv += 1;
        let rv = db.rv;
        let previous = db.objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().context("metadata")?;
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = previous.as_ref().map_or_else(|| json!(format!("uid-{rv}")), |p| p["metadata"]["uid"].clone());
        meta.insert("uid".into(), uid);
        meta.entry("creationTimestamp").or_insert(json!("2026-01-01T00:00:00Z"));
        db.objects.insert(key, obj.clone());
        let event = if previous.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut db, kind, event, obj);
        Ok(())
    }

    /// Deletes an object (a DELETED event carrying its last state).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut db = self.shared.db.lock().unwrap();
        let mut obj = db
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
            .with_context(|| format!("no {kind:?} {namespace}/{name}"))?;
        db.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        self.record(&mut db, kind, "DELETED", obj);
        Ok(())
    }

    /// Forgets the history: watches from any resourceVersion issued so far now get 410 Gone.
    pub fn compact(&self) {
        let mut db = self.shared.db.lock().unwrap();
        db.rv += 1;
        db.floor = db.rv;
        db.history.clear();
    }

    /// Ends every open watch, as a dropped connection or a restarted API server would.
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// How many list (`watch == false`) or watch requests a kind has received.
    pub fn requests(&self, kind: Kind, watch: bool) -> usize {
        self.shared.requests.lock().unwrap().get(&(kind.name().to_owned(), watch)).copied().unwrap_or(0)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.cut_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
