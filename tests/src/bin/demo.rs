//! `cargo xtask demo`: a sandbox node in network namespaces running the seed example — Deployment
//! `webapp` (2 nginx pods) behind the ClusterIP Service `frontend` on port 80 — with ebpf-proxy.
//! Curls the Service 20 times from a client pod, shows `trace` for one packet, and tears everything
//! down, also on Ctrl-C.

use std::{
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{SigHandler, Signal, signal};
use tests::{
    proxy_binary,
    testbed::{CLUSTER_CIDR, LbMode, NODE_IP, NODE_NAME, Node, answered_by, client_seen},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The EndpointSlice the EndpointSlice controller would write for the webapp pods.
fn endpoint_slice(pods: &[(&str, std::net::Ipv4Addr)]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: frontend-x7k2p\n  namespace: default\n  \
         labels: {kubernetes.io/service-name: frontend}\naddressType: IPv4\nports:\n  - {name: http, port: 80, protocol: TCP}\nendpoints:\n",
    );
    for (name, ip) in pods {
        s.push_str(&format!(
            "  - addresses: [{ip}]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: {NODE_NAME}\n    \
             targetRef: {{kind: Pod, namespace: default, name: {name}}}\n"
        ));
    }
    s
}

fn demo() -> Result<()> {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    println!("== building a node in network namespaces (node {NODE_NAME}, pods in {CLUSTER_CIDR})");
    let mut node = Node::new(0)?;
    for name in ["webapp-5d8f7c9b4-k2x9q", "webapp-5d8f7c9b4-p7m4z"] {
        node.add_pod(name)?.start_nginx()?;
        check_interrupted()?;
    }
    node.add_pod("client")?;
    let webapp: Vec<_> = node.pods[..2].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    for (name, ip) in &webapp {
        println!("   pod {name:<24} {ip}  (nginx)");
    }
    println!("   pod {:<24} {}  (curl)", "client", node.pod("client").ip);
    for file in ["deployment.yaml", "service.yaml"] {
        node.write_objects(
            file,
            &fs::read_to_string(seed.join(file)).with_context(|| format!("reading seed {file}"))?,
        )?;
    }
    node.write_objects("endpointslice.yaml", &endpoint_slice(&webapp))?;
    println!("== objects: examples/seed/{{deployment,service}}.yaml + an EndpointSlice for the 2 pods");

    println!("== starting ebpf-proxy run (socket-level LB + tc path) in the node namespace");
    node.start_proxy(&proxy_binary(), LbMode::Socket)?;
    for line in node.proxy_log_text().lines() {
        println!("   | {line}");
    }
    check_interrupted()?;

    println!("== curl http://frontend (10.96.0.10:80) 20 times from the client pod");
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for i in 1..=20 {
        let body = node.curl("client", true, "http://10.96.0.10/")?;
        let pod = answered_by(&body).unwrap_or("?").to_owned();
        println!("   request {i:>2}: answered by {pod:<24} (it saw client {})", client_seen(&body).unwrap_or("?"));
        *counts.entry(pod).or_default() += 1;
        check_interrupted()?;
    }
    println!("   totals: {counts:?}");

    println!("== ebpf-proxy trace: one TCP SYN from the client to the Service, through the real program");
    let client_ip = node.pod("client").ip.to_string();
    let trace = |json: bool| -> Result<String> {
        let mut c = Command::new(proxy_binary());
        c.arg("trace").arg("--objects").arg(&node.objects_dir).args([
            "--node-name",
            NODE_NAME,
            "--node-ip",
            &NODE_IP.to_string(),
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--src",
            &client_ip,
            "--dst",
            "10.96.0.10:80",
        ]);
        if json {
            c.arg("--json");
        }
        tests::testbed::run(&mut c)
    };
    for line in trace(false)?.lines() {
        println!("   {line}");
    }
    println!("   --json: {}", trace(true)?.trim());

    println!("== tearing down");
    node.stop_proxy()?;
    drop(node);
    println!("   done: namespaces, cgroup and pins removed");
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
    }
    demo()
}
