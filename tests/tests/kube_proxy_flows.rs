//! kube-proxy's own packet-flow cases (`runPacketFlowTests` in pkg/proxy/{iptables,nftables}/
//! proxier_test.go), ported as data under `tests/kube_proxy_flows/` and run through `trace`'s machinery:
//! the real programs, BPF_PROG_TEST_RUN, private maps programmed by the same code as `run`, with
//! kube-proxy's test topology. Each case states kube-proxy's verdict and ours; where they differ on
//! purpose the data says why (`differs`). Needs root.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use ebpf_proxy::{
    config::NodeArgs,
    trace::{TraceArgs, TraceDatapath, TraceProto, Verdict},
};
use ipnet::Ipv4Net;
use serde::Deserialize;
use tests::testbed::WorkDir;

#[derive(Deserialize)]
struct Node {
    name: String,
    ips: Vec<Ipv4Addr>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<Ipv4Net>,
    #[serde(rename = "serviceCIDR")]
    service_cidr: Option<Ipv4Net>,
    #[serde(default, rename = "nodePortAddresses")]
    nodeport_addresses: Vec<Ipv4Net>,
    #[serde(default, rename = "masqueradeAll")]
    masquerade_all: bool,
}

#[derive(Deserialize)]
struct Flow {
    test: String,
    node: Node,
    objects: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    proto: String,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    /// kube-proxy's own verdict for the packet, verbatim from the Go test.
    #[serde(rename = "kubeProxy")]
    kube_proxy: KubeProxy,
    expect: Expect,
    /// Why `expect` is not kube-proxy's answer, where it is not.
    #[serde(default)]
    differs: Option<String>,
}

#[derive(Deserialize)]
struct KubeProxy {
    output: String,
    masq: bool,
}

impl KubeProxy {
    /// kube-proxy's answer in the terms of `expect`: no rule matched (`""`) or ACCEPT is a pass; DROP
    /// and REJECT are themselves; a list of endpoints is a forward to each, masqueraded or not.
    fn as_expect(&self) -> Expect {
        match self.output.as_str() {
            "" | "ACCEPT" => Expect { verdict: "pass".into(), backends: vec![] },
            "DROP" => Expect { verdict: "drop".into(), backends: vec![] },
            "REJECT" => Expect { verdict: "reject".into(), backends: vec![] },
            list => Expect {
                verdict: "forward".into(),
                backends: list
                    .split(", ")
                    .map(|addr| ExpectBackend { addr: addr.trim().into(), masq: self.masq })
                    .collect(),
            },
        }
    }
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expect {
    verdict: String,
    #[serde(default)]
    backends: Vec<ExpectBackend>,
}

#[derive(Deserialize, Debug, PartialEq)]
struct ExpectBackend {
    addr: String,
    masq: bool,
}

/// An expectation with its backends in a fixed order.
fn normalized(e: &Expect) -> (String, Vec<(String, bool)>) {
    let mut b: Vec<(String, bool)> = e.backends.iter().map(|b| (b.addr.clone(), b.masq)).collect();
    b.sort();
    (e.verdict.clone(), b)
}

fn flow_files(test: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube_proxy_flows");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/kube_proxy_flows")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".yaml") && (name == format!("{test}.yaml") || name.starts_with(&format!("{test}-")))
        })
        .collect();
    files.sort();
    files
}

/// Runs every case of every file of one Go test; returns how many ran. Fails listing every mismatch.
fn run_flows(test: &str) -> usize {
    assert!(nix::unistd::Uid::effective().is_root(), "packet-flow tests run BPF_PROG_TEST_RUN and need root");
    let files = flow_files(test);
    assert!(!files.is_empty(), "no data files for {test}");
    let mut failures = Vec::new();
    let mut count = 0;
    let mut programs = std::collections::BTreeMap::new();
    for file in &files {
        let flow: Flow = serde_yaml::from_str(&fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(flow.test, test);
        let dir = WorkDir(tempdir(test));
        let objects = dir.0.join("objects.yaml");
        fs::write(&objects, &flow.objects).unwrap();
        let node = NodeArgs {
            node_name: flow.node.name.clone(),
            node_ips: flow.node.ips.clone(),
            cluster_cidr: flow.node.cluster_cidr,
            service_cidr: flow.node.service_cidr,
            nodeport_addresses: flow.node.nodeport_addresses.clone(),
            masquerade_all: flow.node.masquerade_all,
        };
        let mut tdp = TraceDatapath::new(&objects, &node).expect("programming the datapath");
        for case in &flow.cases {
            // The data says why wherever ebpf-proxy answers differently from kube-proxy, and only there:
            // a changed expectation cannot pass silently, nor a stale reason linger.
            let same_as_kube_proxy = normalized(&case.kube_proxy.as_expect()) == normalized(&case.expect);
            match (&case.differs, same_as_kube_proxy) {
                (None, false) => failures.push(format!(
                    "{} / {}: expects {:?} where kube-proxy answers {:?}, with no `differs` reason",
                    file.file_name().unwrap().to_string_lossy(),
                    case.name,
                    case.expect,
                    case.kube_proxy.as_expect()
                )),
                (Some(why), true) => failures.push(format!(
                    "{} / {}: answers as kube-proxy does, yet says it differs: {why}",
                    file.file_name().unwrap().to_string_lossy(),
                    case.name
                )),
                _ => {}
            }
            let proto = match case.proto.as_str() {
                "tcp" => TraceProto::Tcp,
                "udp" => TraceProto::Udp,
                "sctp" => TraceProto::Sctp,
                other => panic!("unknown proto {other}"),
            };
            let args = TraceArgs {
                node: node.clone(),
                objects: objects.clone(),
                proto,
                src: case.src,
                dst: case.dst,
                json: true,
            };
            let report = tdp.trace(&args).unwrap_or_else(|e| panic!("{}: {}: {e:#}", file.display(), case.name));
            // The packet meets the program it would meet on a node: a pod's at its interface's
            // ingress, the node's own (its addresses, loopback) at egress, anything else at the
            // external interface.
            let program = if flow.node.ips.contains(&case.src) || case.src.is_loopback() {
                "from_node"
            } else if flow.node.cluster_cidr.is_some_and(|c| c.contains(&case.src)) {
                "from_pod"
            } else {
                "from_netdev"
            };
            *programs.entry(program).or_insert(0) += 1;
            if report.program != program {
                failures.push(format!(
                    "{} / {}: {} ran through {}, not {program}",
                    file.file_name().unwrap().to_string_lossy(),
                    case.name,
                    case.src,
                    report.program
                ));
            }
            let got = Expect {
                verdict: match report.verdict {
                    Verdict::Forward => "forward",
                    Verdict::Drop => "drop",
                    Verdict::Reject => "reject",
                    Verdict::Pass => "pass",
                }
                .into(),
                backends: report
                    .backends
                    .iter()
                    .map(|b| ExpectBackend { addr: b.addr.clone(), masq: b.masquerade })
                    .collect(),
            };
            if got != case.expect {
                failures.push(format!(
                    "{} / {}: {} -> {} ({}): expected {:?}, got {:?} (reason {:?})",
                    file.file_name().unwrap().to_string_lossy(),
                    case.name,
                    case.src,
                    case.dst,
                    case.proto,
                    case.expect,
                    got,
                    report.reason
                ));
            }
            count += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {count} cases of {test} differ:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{test}: {count} kube-proxy packet-flow cases pass (through {programs:?})");
    count
}

fn tempdir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("epx-flows-{test}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

macro_rules! flow_tests {
    ($($fn_name:ident => $go:literal, $min:literal;)*) => {
        $(
            #[test]
            fn $fn_name() {
                let n = run_flows($go);
                assert!(n >= $min, "{} has {n} cases, expected at least {}", $go, $min);
            }
        )*
    };
}

flow_tests! {
    trace_packet => "TestTracePacket", 7;
    no_endpoints_reject => "TestNoEndpointsReject", 6;
    cluster_ip_general => "TestClusterIPGeneral", 12;
    load_balancer => "TestLoadBalancer", 13;
    node_ports => "TestNodePorts", 24;
    external_traffic_policy_local => "TestExternalTrafficPolicyLocal", 7;
    external_traffic_policy_cluster => "TestExternalTrafficPolicyCluster", 7;
    internal_traffic_policy => "TestInternalTrafficPolicy", 8;
    terminating_endpoints_local => "TestTerminatingEndpointsTrafficPolicyLocal", 16;
    terminating_endpoints_cluster => "TestTerminatingEndpointsTrafficPolicyCluster", 16;
    internal_external_masquerade => "TestInternalExternalMasquerade", 120;
}
