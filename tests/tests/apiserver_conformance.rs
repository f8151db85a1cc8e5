//! The test API server (tests/src/apiserver.rs) against a real kube-apiserver v1.20.2 (built offline
//! by scripts/setup.sh from Debian's source package, with etcd from PyPI), both inside a test network
//! namespace: the same requests for Services and Nodes — lists, label and field selectors, watches
//! from a resourceVersion, and a watch from an expired resourceVersion — must give answers of the same
//! shape and content. (1.20 serves EndpointSlices only as v1beta1, so they are left out.)
//! Needs root; fails (never skips) without the binaries.

use std::{
    io::Read as _,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    apiserver::ApiServer,
    testbed::{Netns, WorkDir, require_privileges, run, unique_id},
    tools,
};

/// One API server as the test talks to it: base URL and curl options.
struct Endpoint {
    base: String,
    curl_opts: Vec<String>,
}

impl Endpoint {
    fn get(&self, ns: &Netns, path: &str) -> Value {
        let out =
            run(ns.command("curl").args(["-sS", "-m", "10"]).args(&self.curl_opts).arg(format!("{}{path}", self.base)))
                .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("GET {path}: {e}: {out}"))
    }

    /// A watch request read until the server ends it; its events.
    fn watch(&self, ns: &Netns, path: &str) -> std::process::Child {
        ns.command("curl")
            .args(["-sS", "-N", "-m", "15"])
            .args(&self.curl_opts)
            .arg(format!("{}{path}", self.base))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn send(&self, ns: &Netns, method: &str, path: &str, body: &Value, content_type: &str) {
        run(ns
            .command("curl")
            .args(["-sS", "--fail", "-m", "10", "-X", method, "-H", &format!("Content-Type: {content_type}")])
            .args(&self.curl_opts)
            .arg("--data-binary")
            .arg(body.to_string())
            .arg(format!("{}{path}", self.base)))
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    }
}

fn events(mut child: std::process::Child) -> Vec<Value> {
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let _ = child.wait();
    out.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A real kube-apiserver with its etcd, in `ns`, and how the test talks to it.
struct RealApiServer {
    _server: tools::RealApiServer,
    endpoint: Endpoint,
}

fn start_real(ns: &Netns, dir: &std::path::Path) -> RealApiServer {
    let server = tools::RealApiServer::start(ns, dir).unwrap_or_else(|e| panic!("{e:#}"));
    let endpoint = Endpoint {
        base: server.base.clone(),
        curl_opts: vec!["-k".into(), "-H".into(), format!("Authorization: Bearer {}", server.token)],
    };
    RealApiServer { _server: server, endpoint }
}

const NS: &str = "conf";

fn service(name: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}

/// What both servers are compared on: the names in a list (of our namespace, for Services), its kind
/// and apiVersion, whether items carry kind/apiVersion, and the resourceVersion's form.
fn list_shape(list: &Value) -> Value {
    let items = list["items"].as_array().unwrap();
    let mut names: Vec<&str> = items
        .iter()
        .filter(|i| i["metadata"]["namespace"].as_str().is_none_or(|n| n == NS))
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    json!({
        "kind": list["kind"], "apiVersion": list["apiVersion"], "names": names,
        "numericResourceVersion": list["metadata"]["resourceVersion"].as_str().is_some_and(|v| v.parse::<u64>().is_ok()),
        "itemsCarryKind": items.iter().any(|i| i.get("kind").is_some()),
    })
}

/// The events of a watch, reduced to type, kind, apiVersion and name (ours only), and whether the
/// resourceVersions grow.
fn watch_shape(events: &[Value]) -> Value {
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .filter(|e| e["object"]["metadata"]["namespace"].as_str().is_none_or(|n| n == NS))
        .collect();
    let rvs: Vec<u64> =
        ours.iter().filter_map(|e| e["object"]["metadata"]["resourceVersion"].as_str()?.parse().ok()).collect();
    json!({
        "events": ours.iter().map(|e| json!([e["type"], e["object"]["kind"], e["object"]["apiVersion"], e["object"]["metadata"]["name"]])).collect::<Vec<_>>(),
        "increasing": rvs.windows(2).all(|w| w[0] < w[1]),
    })
}

fn expired_shape(events: &[Value]) -> Value {
    let e = events.first().cloned().unwrap_or(Value::Null);
    json!({"count": events.len(), "type": e["type"], "kind": e["object"]["kind"], "code": e["object"]["code"], "reason": e["object"]["reason"]})
}

#[test]
fn the_test_api_server_answers_like_kube_apiserver_for_services_and_nodes() {
    require_privileges().unwrap();
    let id = unique_id();
    let ns = Netns::new(format!("epx-{id}-api")).unwrap();
    let dir = WorkDir(std::env::temp_dir().join(format!("epx-{id}")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let real = start_real(&ns, &dir.0);
    let ours_server = ApiServer::start(&ns.name).unwrap();
    let ours = Endpoint { base: format!("http://{}", ours_server.addr), curl_opts: Vec::new() };

    // The same objects in both.
    real.endpoint.send(
        &ns,
        "POST",
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        "application/json",
    );
    let objects = [
        service("web", "10.96.0.10", json!({"app": "web"})),
        service("foreign", "10.96.0.11", json!({"service.kubernetes.io/service-proxy-name": "other"})),
        service("gone", "10.96.0.12", json!({"app": "gone"})),
    ];
    for s in &objects {
        real.endpoint.send(&ns, "POST", &format!("/api/v1/namespaces/{NS}/services"), s, "application/json");
        ours_server.apply_object(s.clone()).unwrap();
    }
    for n in [node("node-a"), node("node-b")] {
        real.endpoint.send(&ns, "POST", "/api/v1/nodes", &n, "application/json");
        ours_server.apply_object(n).unwrap();
    }

    let selector = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
    // Sets the label `changed` on one of `objects`: a merge patch to kube-apiserver, a replacement in
    // the test server (what a PATCH amounts to there).
    let relabel = |who: &str, index: usize, value: &str| {
        let name = objects[index]["metadata"]["name"].as_str().unwrap();
        if who == "kube-apiserver" {
            let patch = json!({"metadata": {"labels": {"changed": value}}});
            let path = format!("/api/v1/namespaces/{NS}/services/{name}");
            real.endpoint.send(&ns, "PATCH", &path, &patch, "application/merge-patch+json");
        } else {
            let mut obj = objects[index].clone();
            obj["metadata"]["labels"]["changed"] = json!(value);
            ours_server.apply_object(obj).unwrap();
        }
    };
    let mut shapes = Vec::new();
    for (who, ep) in [("kube-apiserver", &real.endpoint), ("test server", &ours)] {
        let services = ep.get(&ns, &format!("/api/v1/services?{selector}"));
        let nodes = ep.get(&ns, "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a");
        let rv = services["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        // A watch from the list's resourceVersion, with kube-proxy's selector, while one Service is
        // changed, one deleted and the other proxy's Service changed (not selected: no event).
        let watch = ep.watch(
            &ns,
            &format!(
                "/api/v1/services?watch=true&{selector}&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3"
            ),
        );
        std::thread::sleep(Duration::from_millis(500));
        relabel(who, 0, "yes");
        relabel(who, 1, "yes");
        if who == "kube-apiserver" {
            ep.send(&ns, "DELETE", &format!("/api/v1/namespaces/{NS}/services/gone"), &json!({}), "application/json");
        } else {
            ours_server.delete(tests::apiserver::Kind::Service, NS, "gone").unwrap();
        }
        let started = Instant::now();
        let watched = events(watch);
        assert!(started.elapsed() < Duration::from_secs(10), "{who}: the watch did not end at timeoutSeconds");
        // A watch from a resourceVersion the server no longer has the history for: 20 changes and a
        // compaction later.
        let before = ep.get(&ns, "/api/v1/services")["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        for n in 0..20 {
            relabel(who, 0, &format!("n{n}"));
        }
        if who == "test server" {
            ours_server.compact();
        } else {
            // Two compaction rounds: the first records a revision, the next compacts to it.
            std::thread::sleep(Duration::from_secs(5));
        }
        let expired =
            events(ep.watch(&ns, &format!("/api/v1/services?watch=true&resourceVersion={before}&timeoutSeconds=3")));
        let shape = json!({
            "services": list_shape(&services),
            "nodes": list_shape(&nodes),
            "watch": watch_shape(&watched),
            "expired": expired_shape(&expired),
        });
        println!("{who}: {shape:#}");
        shapes.push(shape);
    }
    assert_eq!(shapes[0], shapes[1], "the test server differs from kube-apiserver");
}
