//! The model and its translation to map entries, without root: Kubernetes YAML in, map entries out.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use ebpf_proxy::{
    config::NodeArgs,
    health, inspect,
    model::{self, ModelOptions},
    objects::{self, Objects, SkippedKind},
    reconcile::{Reconciler, Table, Tables},
    stale,
    translate::{self, DesiredMaps, Ids, NodeContext},
};
use proxy_common::{FrontendKey, PROTO_TCP, PROTO_UDP, addr_to_map, port_to_map};

fn objects(yaml: &str) -> Objects {
    let mut o = Objects::default();
    objects::parse_into(yaml, "test", &mut o);
    o
}

fn svc(name: &str, ip: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  clusterIP: {ip}\n  ports: {ports}\n---\n"
    )
}

fn slice(name: &str, svc: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n---\n"
    )
}

/// The node the tests translate for: two addresses, pods in 10.0.0.0/8.
fn node(m: &model::Model) -> NodeContext {
    let args = NodeArgs {
        node_name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 1, 2)],
        cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
        ..Default::default()
    };
    NodeContext::new(&args, m)
}

fn fe(ip: [u8; 4], port: u16, proto: u8) -> FrontendKey {
    FrontendKey { addr: addr_to_map(ip), port: port_to_map(port), proto, _pad: 0 }
}

fn build(yaml: &str) -> (model::Model, DesiredMaps) {
    let m = model::build(&objects(yaml), &ModelOptions::default());
    let (d, _) = translate::translate(&m, &node(&m), &mut Ids::default());
    (m, d)
}

#[test]
fn malformed_and_foreign_services_are_skipped_and_the_rest_kept() {
    let yaml = [
        svc("good", "10.96.0.1", "[{name: a, port: 80}]"),
        svc("headless", "None", "[{port: 80}]"),
        svc("badip", "10.96.0.999", "[{port: 80}]"),
        svc("v6", "fd00::1", "[{port: 80}]"),
        svc("port0", "10.96.0.3", "[{port: 0}]"),
        svc("dup", "10.96.0.4", "[{name: a, port: 80}, {name: b, port: 80}]"),
        svc("proto", "10.96.0.5", "[{port: 80, protocol: ICMP}]"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: ns}\nspec: {type: ExternalName, externalName: x.example}\n---\n".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: foo}}\nspec: {clusterIP: 10.96.0.6, ports: [{port: 80}]}\n---\n".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: ns}\nspec: {clusterIP: 10.96.0.7, ports: [{port: eighty}]}\n---\n".into(),
        "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: web}\n".into(),
    ]
    .concat();
    let (m, d) = build(&yaml);
    assert_eq!(m.ports.len(), 1, "{:?}", m.ports.keys().collect::<Vec<_>>());
    assert!(d.frontends.contains_key(&fe([10, 96, 0, 1], 80, PROTO_TCP)));
    // One clear line per malformed object, naming it.
    for name in ["badip", "v6", "port0", "dup", "proto", "broken"] {
        assert!(m.errors.iter().any(|e| e.to_string().contains(name)), "no error for {name}: {:?}", m.errors);
    }
    assert_eq!(m.errors.len(), 6, "{:?}", m.errors);
    // Typed records: what metrics count by, without reading the text.
    let broken = m.errors.iter().find(|e| e.object == "ns/broken").expect("the undecodable Service");
    assert_eq!((broken.kind, broken.whole), (SkippedKind::Service, true));
    assert!(broken.origin.as_deref().is_some_and(|o| o.contains("document")), "{broken:?}");
    assert!(broken.to_string().starts_with("Service ns/broken skipped ("), "{broken}");
}

#[test]
fn slices_join_by_label_and_port_name_and_merge() {
    let yaml = [
        svc("web", "10.96.0.1", "[{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]"),
        slice(
            "web-a",
            "web",
            "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
            "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2], conditions: {ready: false}}]",
        ),
        slice("web-b", "web", "[{name: http, port: 8080}]", "[{addresses: [10.0.0.3]}, {addresses: [10.0.0.1]}]"),
        slice("other", "nope", "[{name: http, port: 1}]", "[{addresses: [10.9.9.9]}]"),
    ]
    .concat();
    let (m, d) = build(&yaml);
    let http = m.ports.values().find(|p| p.name.port == "http").unwrap();
    let addrs: Vec<_> = http.endpoints.iter().map(|e| (e.addr, e.port, e.ready)).collect();
    assert_eq!(
        addrs,
        vec![
            (Ipv4Addr::new(10, 0, 0, 1), 8080, true),
            (Ipv4Addr::new(10, 0, 0, 2), 8080, false),
            (Ipv4Addr::new(10, 0, 0, 3), 8080, true)
        ]
    );
    let f = d.frontends[&fe([10, 96, 0, 1], 80, PROTO_TCP)];
    assert_eq!(f.backend_count, 2, "not-ready endpoint excluded");
    let u = d.frontends[&fe([10, 96, 0, 1], 53, PROTO_UDP)];
    assert_eq!(u.backend_count, 1);
    assert_eq!(d.slots.len(), 3);
    // Each backend of the frontend is recorded as a member of its cluster-wide set.
    let members: Vec<_> = d.members.iter().filter(|(k, _)| k.service_id == f.service_id).collect();
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|(_, m)| **m == proxy_common::MEMBER_F_CLUSTER));
    assert_eq!(d.service_addrs.len(), 1);
    assert_eq!(d.service_addrs[&addr_to_map([10, 96, 0, 1])].frontends, 2);
}

#[test]
fn terminating_endpoints_are_used_only_when_none_is_ready() {
    let yaml = [
        svc("web", "10.96.0.1", "[{port: 80}]"),
        slice(
            "web-a",
            "web",
            "[{port: 80}]",
            "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}]",
        ),
    ]
    .concat();
    let (_, d) = build(&yaml);
    assert_eq!(d.frontends[&fe([10, 96, 0, 1], 80, PROTO_TCP)].backend_count, 1);
    assert_eq!(d.backends.values().next().unwrap().addr, addr_to_map([10, 0, 0, 1]));
}

/// A table that records every write and delete, in order, into a shared log.
struct Recorder<K, V> {
    name: &'static str,
    inner: std::collections::BTreeMap<K, V>,
    log: Arc<Mutex<Vec<String>>>,
}

impl<K: Ord + Clone, V: Clone> Table<K, V> for Recorder<K, V> {
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()> {
        self.log.lock().unwrap().push(format!("put {}", self.name));
        self.inner.put(k, v)
    }
    fn del(&mut self, k: &K) -> anyhow::Result<()> {
        self.log.lock().unwrap().push(format!("del {}", self.name));
        self.inner.del(k)
    }
    fn entries(&self) -> anyhow::Result<std::collections::BTreeMap<K, V>> {
        self.inner.entries()
    }
}

fn recording_tables(log: &Arc<Mutex<Vec<String>>>) -> Tables {
    fn r<K, V>(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Box<Recorder<K, V>> {
        Box::new(Recorder { name, inner: Default::default(), log: log.clone() })
    }
    Tables {
        frontends: r("frontend", log),
        slots: r("slot", log),
        backends: r("backend", log),
        members: r("member", log),
        service_addrs: r("addr", log),
        source_ranges: r("range", log),
        node_config: r("config", log),
        node_addrs: r("nodeaddr", log),
    }
}

fn web(endpoints: &[&str]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("{{addresses: [{a}]}}")).collect();
    [
        svc("web", "10.96.0.1", "[{port: 80}]"),
        slice("web-a", "web", "[{port: 80}]", &format!("[{}]", eps.join(", "))),
        svc("api", "10.96.0.2", "[{port: 443}]"),
        slice("api-a", "api", "[{port: 443}]", "[{addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]"),
    ]
    .concat()
}

#[test]
fn reconciler_writes_references_first_deletes_in_reverse_and_touches_only_changes() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut tables = recording_tables(&log);
    let mut rec = Reconciler::new(&tables).unwrap();
    let mut ids = Ids::default();
    let sync = |yaml: &str, ids: &mut Ids, rec: &mut Reconciler, tables: &mut Tables| {
        let m = model::build(&objects(yaml), &ModelOptions::default());
        let (d, _) = translate::translate(&m, &node(&m), ids);
        let s = rec.sync(&d, tables).unwrap();
        assert_eq!(&tables.dump().unwrap(), &d, "maps equal the desired state");
        s
    };
    sync(&web(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), &mut ids, &mut rec, &mut tables);
    let first: Vec<String> = log.lock().unwrap().drain(..).collect();
    let last_backend = first.iter().rposition(|l| l == "put backend").unwrap();
    let first_frontend = first.iter().position(|l| l == "put frontend").unwrap();
    assert!(last_backend < first_frontend, "{first:?}");
    let api_id = tables.dump().unwrap().frontends[&fe([10, 96, 0, 2], 443, PROTO_TCP)].service_id;

    // Remove the first web endpoint: only web's entries change, api is not touched.
    let s = sync(&web(&["10.0.0.2", "10.0.0.3"]), &mut ids, &mut rec, &mut tables);
    let second: Vec<String> = log.lock().unwrap().drain(..).collect();
    // Slots 0 and 1 rewritten, frontend count updated, slot 2, the removed backend's membership and
    // the backend deleted; the remaining backends' memberships are untouched (affinity follows them).
    assert_eq!(second, ["put slot", "put slot", "put frontend", "del slot", "del member", "del backend"], "{second:?}");
    assert_eq!((s.written, s.deleted), (3, 3));
    assert_eq!(tables.dump().unwrap().frontends[&fe([10, 96, 0, 2], 443, PROTO_TCP)].service_id, api_id);

    // Nothing changed: nothing written.
    let s = sync(&web(&["10.0.0.2", "10.0.0.3"]), &mut ids, &mut rec, &mut tables);
    assert_eq!((s.written, s.deleted), (0, 0));

    // Removing the Service deletes the frontend before what it referenced.
    let only_api = web(&["10.0.0.2"]).split("---\n").skip(2).collect::<Vec<_>>().join("---\n");
    sync(&only_api, &mut ids, &mut rec, &mut tables);
    let third: Vec<String> = log.lock().unwrap().drain(..).collect();
    assert_eq!(third.first().map(String::as_str), Some("del frontend"), "{third:?}");
    assert_eq!(third.last().map(String::as_str), Some("del backend"), "{third:?}");
}

#[test]
fn a_full_sync_repairs_and_reports_what_changed_behind_the_reconcilers_back() {
    let mut tables = Tables::in_memory();
    let mut rec = Reconciler::new(&tables).unwrap();
    let m = model::build(&objects(&web(&["10.0.0.1", "10.0.0.2"])), &ModelOptions::default());
    let (d, _) = translate::translate(&m, &node(&m), &mut Ids::default());
    rec.sync(&d, &mut tables).unwrap();
    // Nothing changed: a full sync finds no drift and writes nothing.
    let drift = rec.refresh(&tables).unwrap();
    assert!(drift.is_empty(), "{drift}");
    assert_eq!(rec.sync(&d, &mut tables).unwrap(), Default::default());
    // Behind its back: one frontend's value changed, one backend deleted, one frontend added.
    let web_fe = fe([10, 96, 0, 1], 80, PROTO_TCP);
    let mut changed = d.frontends[&web_fe];
    changed.backend_count += 5;
    tables.frontends.put(&web_fe, &changed).unwrap();
    let (backend_id, _) = d.backends.iter().next().unwrap();
    tables.backends.del(backend_id).unwrap();
    tables.frontends.put(&fe([10, 96, 9, 9], 9, PROTO_TCP), &changed).unwrap();
    // An incremental sync trusts its mirror and sees nothing to do; the full one finds all three.
    assert_eq!(rec.sync(&d, &mut tables).unwrap(), Default::default());
    let drift = rec.refresh(&tables).unwrap();
    assert_eq!(drift.maps, [("frontends", 1, 0, 1), ("backends", 0, 1, 0)], "{drift}");
    assert_eq!(drift.total(), 3);
    let s = rec.sync(&d, &mut tables).unwrap();
    assert_eq!((s.written, s.deleted), (2, 1));
    assert_eq!(tables.dump().unwrap(), d, "repaired");
    assert!(rec.refresh(&tables).unwrap().is_empty());
}

#[test]
fn ids_are_stable_and_restored_from_the_maps() {
    let yaml = web(&["10.0.0.1", "10.0.0.2"]);
    let m = model::build(&objects(&yaml), &ModelOptions::default());
    let mut ids = Ids::default();
    let (d1, _) = translate::translate(&m, &node(&m), &mut ids);
    let (d2, _) = translate::translate(&m, &node(&m), &mut ids);
    assert_eq!(d1, d2);
    // A restarted proxy reads the IDs back and computes exactly what the maps already hold.
    let mut restored = Ids::restore(&d1.frontends, &d1.backends);
    let (d3, _) = translate::translate(&m, &node(&m), &mut restored);
    assert_eq!(d1, d3);
}

fn endpoint(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool, extra: &str) -> String {
    format!(
        "{{addresses: [{addr}], nodeName: {node}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}{extra}}}"
    )
}

#[test]
fn cluster_and_local_sets_fall_back_to_terminating_endpoints_separately() {
    let eps = [
        endpoint("10.0.1.1", "node-a", false, true, true, ""),
        endpoint("10.0.2.1", "node-b", true, true, false, ""),
        endpoint("10.0.2.2", "node-b", false, false, true, ""),
    ];
    let yaml = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}\n---\n".to_string(),
        slice("web-a", "web", "[{port: 8080}]", &format!("[{}]", eps.join(", "))),
    ]
    .concat();
    let m = model::build(&objects(&yaml), &ModelOptions::default());
    let sp = m.ports.values().next().unwrap();
    let cat = sp.categorize("node-a", None);
    let addrs = |v: &Vec<&model::Endpoint>| v.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>();
    // Cluster-wide: the ready remote endpoint. Local: no ready one here, so the serving terminating one.
    assert_eq!(addrs(&cat.cluster), ["10.0.2.1"]);
    assert_eq!(addrs(&cat.local), ["10.0.1.1"]);
    assert!(cat.has_any);
    let (d, _) = translate::translate(&m, &node(&m), &mut Ids::default());
    // ClusterIP + NodePort on both node addresses.
    assert_eq!(d.frontends.len(), 3);
    let np = d.frontends[&fe([192, 168, 1, 2], 30080, PROTO_TCP)];
    assert_eq!((np.backend_count, np.local_count), (1, 1));
    assert_ne!(np.flags & proxy_common::FRONTEND_F_ETP_LOCAL, 0);
    // Node addresses are not Service addresses (other traffic to them is the node's own).
    assert!(!d.service_addrs.contains_key(&addr_to_map([192, 168, 1, 2])));
}

#[test]
fn topology_hints_limit_the_cluster_set_only_when_every_ready_endpoint_has_them() {
    let hinted = |zone: &str| format!(", hints: {{forZones: [{{name: {zone}}}]}}");
    let mk = |third: String| {
        let eps = [
            endpoint("10.0.1.1", "node-a", true, true, false, &hinted("zone-a")),
            endpoint("10.0.2.1", "node-b", true, true, false, &hinted("zone-b")),
            third,
        ];
        [
            svc("web", "10.96.0.1", "[{port: 80}]"),
            slice("web-a", "web", "[{port: 80}]", &format!("[{}]", eps.join(", "))),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n"
                .into(),
        ]
        .concat()
    };
    let m = model::build(
        &objects(&mk(endpoint("10.0.1.2", "node-a", true, true, false, &hinted("zone-a")))),
        &ModelOptions::default(),
    );
    let n = node(&m);
    assert_eq!(n.zone.as_deref(), Some("zone-a"));
    let cat = m.ports.values().next().unwrap().categorize(&n.name, n.zone.as_deref());
    assert_eq!(cat.topology, Some("PreferSameZone"));
    assert_eq!(cat.cluster.len(), 2);
    // One ready endpoint without hints: topology is ignored, every ready endpoint is used.
    let m =
        model::build(&objects(&mk(endpoint("10.0.1.2", "node-a", true, true, false, ""))), &ModelOptions::default());
    let cat = m.ports.values().next().unwrap().categorize("node-a", Some("zone-a"));
    assert_eq!((cat.topology, cat.cluster.len()), (None, 3));
}

#[test]
fn load_balancer_ips_source_ranges_and_proxy_mode_ingress() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: ns}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  loadBalancerSourceRanges: [203.0.113.0/25, \" 192.168.0.0/24\"]\n  ports: [{port: 80, nodePort: 30009}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.9}, {ip: 198.51.100.10, ipMode: Proxy}]\n";
    let m = model::build(&objects(yaml), &ModelOptions::default());
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let (d, _) = translate::translate(&m, &node(&m), &mut Ids::default());
    assert!(d.frontends.contains_key(&fe([198, 51, 100, 9], 80, PROTO_TCP)));
    assert!(!d.frontends.contains_key(&fe([198, 51, 100, 10], 80, PROTO_TCP)), "ipMode Proxy is the LB's job");
    let lb = d.frontends[&fe([198, 51, 100, 9], 80, PROTO_TCP)];
    assert_ne!(lb.flags & proxy_common::FRONTEND_F_SOURCE_RANGES, 0);
    assert_eq!(lb.flags & proxy_common::FRONTEND_F_HAS_ENDPOINTS, 0, "no endpoints: rejected");
    let ranges: Vec<(u32, [u8; 4])> = d
        .source_ranges
        .keys()
        .filter(|(_, k)| u32::from_be(k.service_id_be) == lb.service_id)
        .map(|(len, k)| (len - 32, proxy_common::addr_from_map(k.addr)))
        .collect();
    // The two ranges; a range holds the primary node address, so, as kube-proxy does, the LB IP is
    // allowed too (a VIP held by the node loops back with itself as source). The node's secondary
    // address is in no range: not allowed.
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    for want in [(25, [203, 0, 113, 0]), (24, [192, 168, 0, 0]), (32, [198, 51, 100, 9])] {
        assert!(ranges.contains(&want), "{want:?} missing from {ranges:?}");
    }
    // A range holding only the secondary node address lets neither the node nor the LB IP in.
    let yaml = yaml.replace("\" 192.168.0.0/24\"", "192.168.1.0/24");
    let m = model::build(&objects(&yaml), &ModelOptions::default());
    let (d, _) = translate::translate(&m, &node(&m), &mut Ids::default());
    let lb = d.frontends[&fe([198, 51, 100, 9], 80, PROTO_TCP)];
    let ranges: Vec<(u32, [u8; 4])> = d
        .source_ranges
        .keys()
        .filter(|(_, k)| u32::from_be(k.service_id_be) == lb.service_id)
        .map(|(len, k)| (len - 32, proxy_common::addr_from_map(k.addr)))
        .collect();
    assert_eq!(ranges, [(24, [192, 168, 1, 0]), (25, [203, 0, 113, 0])], "only the ranges themselves");
}

#[test]
fn health_check_ports_count_local_ready_endpoints_over_all_ports() {
    let svc_yaml = |name: &str, n: u8, etp: &str, hc: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.{n}, externalTrafficPolicy: {etp}, {hc} ports: [{{name: a, port: 80, nodePort: 3008{n}}}, {{name: b, port: 81, nodePort: 3009{n}}}]}}\n---\n"
        )
    };
    let eps = [
        endpoint("10.0.1.1", "node-a", true, true, false, ""),
        endpoint("10.0.1.2", "node-a", false, true, true, ""),
        endpoint("10.0.2.1", "node-b", true, true, false, ""),
    ]
    .join(", ");
    let yaml = [
        svc_yaml("local", 1, "Local", "healthCheckNodePort: 32000,"),
        slice("local-1", "local", "[{name: a, port: 8080}, {name: b, port: 8081}]", &format!("[{eps}]")),
        svc_yaml("empty", 2, "Local", "healthCheckNodePort: 32001,"),
        svc_yaml("cluster", 3, "Cluster", ""),
        slice("cluster-1", "cluster", "[{name: a, port: 8080}]", &format!("[{eps}]")),
    ]
    .concat();
    let m = model::build(&objects(&yaml), &ModelOptions::default());
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let w = health::wanted(&m, "node-a");
    let name = |n: &str| health::ServiceName { namespace: "ns".into(), name: n.into() };
    // Two ports × one local ready endpoint (the terminating one and node-b's do not count).
    assert_eq!(w.get(&name("local")), Some(&(32000, 2)));
    assert_eq!(w.get(&name("empty")), Some(&(32001, 0)));
    assert_eq!(w.len(), 2, "eTP Cluster has no health check: {w:?}");
}

#[test]
fn serving_udp_endpoints_are_listed_per_frontend() {
    let eps = [
        endpoint("10.0.1.1", "node-a", true, true, false, ""),
        endpoint("10.0.1.2", "node-a", false, true, true, ""),
        endpoint("10.0.1.3", "node-a", false, false, false, ""),
    ]
    .join(", ");
    let yaml = [
        svc("dns", "10.96.0.10", "[{name: u, port: 53, protocol: UDP}, {name: t, port: 53, protocol: TCP}]"),
        slice("dns-1", "dns", "[{name: u, port: 5353, protocol: UDP}, {name: t, port: 5353}]", &format!("[{eps}]")),
    ]
    .concat();
    let (m, d) = build(&yaml);
    let serving = stale::serving_udp(&m, &node(&m), &d);
    let id = d.frontends[&fe([10, 96, 0, 10], 53, PROTO_UDP)].service_id;
    let want: std::collections::BTreeSet<_> =
        [[10, 0, 1, 1], [10, 0, 1, 2]].iter().map(|a| (id, addr_to_map(*a), port_to_map(5353))).collect();
    // The serving terminating endpoint keeps its flows; the not-serving one and TCP are not listed.
    assert_eq!(serving, want);
}

#[test]
fn inspection_rows_show_frontends_with_their_sets_and_only_live_conntrack_entries() {
    let eps =
        [endpoint("10.0.1.1", "node-a", true, true, false, ""), endpoint("10.0.2.1", "node-b", true, true, false, "")];
    let yaml = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}\n---\n".to_string(),
        slice("web-a", "web", "[{port: 8080}]", &format!("[{}]", eps.join(", "))),
    ]
    .concat();
    let (_, d) = build(&yaml);
    let rows = inspect::services(&d);
    assert_eq!(rows.len(), 3, "ClusterIP and the NodePort on two node addresses");
    let np = rows.iter().find(|r| r.frontend == "192.168.0.2:30080").unwrap();
    assert_eq!((np.kind, np.policy.as_slice()), ("NodePort", ["eTP=Local"].as_slice()));
    assert_eq!(np.local_backends, ["10.0.1.1:8080 (local)"]);
    assert_eq!(np.backends.len(), 2);
    let table = inspect::table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
    assert_eq!(table, "A          LONGER\nwide cell  x\n");

    let sec = 1_000_000_000u64;
    let key = |sport| proxy_common::CtKey { sport, proto: PROTO_UDP, ..Default::default() };
    let entry = |last_seen_ns| proxy_common::CtEntry {
        last_seen_ns,
        state: proxy_common::CT_STATE_REPLIED,
        flags: proxy_common::CT_F_ASSURED | proxy_common::CT_F_SEEN_REPLY,
        ..Default::default()
    };
    let now = 1000 * sec;
    // Answered UDP flows live 120 s after their last packet.
    let rows = inspect::conntrack(&[(key(1), entry(now - 10 * sec)), (key(2), entry(now - 200 * sec))], now);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].idle_s, rows[0].expires_in_s, rows[0].protocol.as_str()), (10, 110, "UDP"));
    assert_eq!((rows[0].state, rows[0].assured), ("REPLIED", true));
}

/// A table whose writes fail once a budget shared by all tables is spent: the N-th write of a sync
/// fails, as a full map or a kernel error would make it.
struct Faulty<K, V> {
    inner: std::collections::BTreeMap<K, V>,
    budget: Arc<std::sync::atomic::AtomicI64>,
}

impl<K: Ord + Clone, V: Clone> Faulty<K, V> {
    fn spend(&self) -> anyhow::Result<()> {
        if self.budget.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
            anyhow::bail!("injected write failure");
        }
        Ok(())
    }
}

impl<K: Ord + Clone, V: Clone> Table<K, V> for Faulty<K, V> {
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()> {
        self.spend()?;
        self.inner.put(k, v)
    }
    fn del(&mut self, k: &K) -> anyhow::Result<()> {
        self.spend()?;
        self.inner.del(k)
    }
    fn entries(&self) -> anyhow::Result<std::collections::BTreeMap<K, V>> {
        Ok(self.inner.clone())
    }
}

fn faulty_tables(budget: &Arc<std::sync::atomic::AtomicI64>) -> Tables {
    fn f<K, V>(budget: &Arc<std::sync::atomic::AtomicI64>) -> Box<Faulty<K, V>> {
        Box::new(Faulty { inner: Default::default(), budget: budget.clone() })
    }
    Tables {
        frontends: f(budget),
        slots: f(budget),
        backends: f(budget),
        members: f(budget),
        service_addrs: f(budget),
        source_ranges: f(budget),
        node_config: f(budget),
        node_addrs: f(budget),
    }
}

/// What the datapath reads through a frontend is there: both backend sets' slots, the backends and
/// memberships they name, and (but for NodePorts) the address's entry in the Service address set.
fn assert_consistent(t: &DesiredMaps, when: &str) {
    use proxy_common::{BackendSlotKey, LOCAL_SLOT_BASE, MemberKey};
    for (key, fe) in &t.frontends {
        let sets = [(0, fe.backend_count), (LOCAL_SLOT_BASE, fe.local_count)];
        for slot in sets.iter().flat_map(|&(base, n)| (0..u32::from(n)).map(move |i| base + i)) {
            let id = t.slots.get(&BackendSlotKey { service_id: fe.service_id, slot });
            let id = id.unwrap_or_else(|| panic!("{when}: {key:?} slot {slot} missing"));
            assert!(t.backends.contains_key(id), "{when}: {key:?} slot {slot} names missing backend {id}");
            assert!(
                t.members.contains_key(&MemberKey { service_id: fe.service_id, backend_id: *id }),
                "{when}: {key:?}: backend {id} without its membership"
            );
        }
        // NodePorts live on node addresses, which are not Service addresses (by design).
        if fe.flags & proxy_common::FRONTEND_F_NODE_PORT == 0 {
            assert!(t.service_addrs.contains_key(&key.addr), "{when}: {key:?} without its address entry");
        }
    }
}

#[test]
fn a_sync_failing_at_any_write_leaves_the_maps_consistent_and_the_next_sync_completes() {
    let np = "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: ns}\nspec:\n  type: NodePort\n  \
              clusterIP: 10.96.0.3\n  externalTrafficPolicy: Local\n  ports: [{port: 8080, nodePort: 30080}]\n---\n"
        .to_owned()
        + &slice(
            "np-a",
            "np",
            "[{port: 8080}]",
            "[{addresses: [10.2.0.1], nodeName: node-a}, {addresses: [10.2.0.2], nodeName: node-b}]",
        );
    let only_api = web(&["10.0.0.2"]).split("---\n").skip(2).collect::<Vec<_>>().join("---\n");
    let states = [
        String::new(),
        web(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        web(&["10.0.0.2", "10.0.0.3"]),
        only_api + &np,
        String::new(),
    ];
    let desired: Vec<DesiredMaps> = {
        let mut ids = Ids::default();
        states
            .iter()
            .map(|yaml| {
                let m = model::build(&objects(yaml), &ModelOptions::default());
                translate::translate(&m, &node(&m), &mut ids).0
            })
            .collect()
    };
    let mut failures_seen = 0;
    for (i, pair) in desired.windows(2).enumerate() {
        let (before, after) = (&pair[0], &pair[1]);
        // How many writes the whole transition takes.
        let unlimited = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let mut tables = faulty_tables(&unlimited);
        let mut rec = Reconciler::new(&tables).unwrap();
        rec.sync(before, &mut tables).unwrap();
        let s = rec.sync(after, &mut tables).unwrap();
        let ops = (s.written + s.deleted) as i64;
        assert!(ops > 0, "transition {i} changes something");
        // The same transition failing at each of its writes in turn.
        for n in 0..ops {
            let budget = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
            let mut tables = faulty_tables(&budget);
            let mut rec = Reconciler::new(&tables).unwrap();
            rec.sync(before, &mut tables).unwrap();
            budget.store(n, std::sync::atomic::Ordering::SeqCst);
            let when = format!("transition {i}, failing at write {n} of {ops}");
            let e = rec.sync(after, &mut tables).expect_err(&when);
            assert!(format!("{e:#}").contains("injected write failure"), "{when}: {e:#}");
            failures_seen += 1;
            assert_consistent(&tables.dump().unwrap(), &when);
            // The next sync (incremental: its mirror matches what was written) finishes the job.
            budget.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
            let done = rec.sync(after, &mut tables).unwrap_or_else(|e| panic!("{when}: retry: {e:#}"));
            assert_eq!(done.written + done.deleted, (ops - n) as usize, "{when}: only the rest is written");
            assert_eq!(&tables.dump().unwrap(), after, "{when}");
        }
    }
    assert!(failures_seen > 20, "{failures_seen}");
}
