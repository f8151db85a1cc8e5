//! Kubernetes objects as YAML, for the live tests and benchmarks.

use std::net::Ipv4Addr;

/// One endpoint in an EndpointSlice: address, node, and conditions (ready, serving, terminating).
pub struct Ep {
    pub addr: Ipv4Addr,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub fn ready(addr: Ipv4Addr, node: &str) -> Ep {
    Ep { addr, node: node.into(), ready: true, serving: true, terminating: false }
}

pub fn terminating(addr: Ipv4Addr, node: &str) -> Ep {
    Ep { addr, node: node.into(), ready: false, serving: true, terminating: true }
}

/// A Service (`spec` lines under `spec:`, one port named `p`) with its EndpointSlice.
pub fn service(name: &str, spec: &str, status: &str, target_port: u16, protocol: &str, eps: &[Ep]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}\n{status}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: {target_port}, protocol: {protocol}}}]\nendpoints:\n"
    );
    for e in eps {
        s.push_str(&format!(
            "  - {{addresses: [{}], nodeName: {}, conditions: {{ready: {}, serving: {}, terminating: {}}}}}\n",
            e.addr, e.node, e.ready, e.serving, e.terminating
        ));
    }
    if eps.is_empty() {
        s.push_str("  []\n");
    }
    s.push_str("---\n");
    s
}
