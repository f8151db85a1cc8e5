//! `--config`: kube-proxy's KubeProxyConfiguration read as kube-proxy would, without root.

use std::time::Duration;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, parser::ValueSource};
use ebpf_proxy::{kubeproxy_config as kpc, run::RunArgs};

/// A kube-proxy ConfigMap as kubeadm writes it (trimmed of nothing).
const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
"#;

#[test]
fn the_kubeadm_config_map_is_read_and_its_ipv4_cluster_cidr_used() {
    let (cfg, notes) = kpc::parse(KUBEADM).expect("kubeadm's KubeProxyConfiguration");
    assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
    assert_eq!(cfg.min_sync_period, Some(Duration::from_secs(1)));
    assert_eq!(cfg.sync_period, None, "0s means the default");
    assert_eq!(cfg.kubeconfig.as_deref(), Some("/var/lib/kube-proxy/kubeconfig.conf"));
    // Only zero values among the unsupported fields: nothing to report (verbosity 0, nulls, "").
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn the_conntrack_size_is_kube_proxys_and_its_default_timeouts_are_accepted() {
    // kube-proxy: max(maxPerCore × CPUs, min), min defaulting to 131072.
    let (cfg, notes) = kpc::parse(&KUBEADM.replace("  maxPerCore: null", "  maxPerCore: 100000")).unwrap();
    assert_eq!((cfg.conntrack_max(2), cfg.conntrack_max(1)), (Some(200_000), Some(131_072)));
    assert!(notes.is_empty(), "{notes:?}");
    let (cfg, _) = kpc::parse(KUBEADM).unwrap();
    assert_eq!(cfg.conntrack_max(8), None, "nulls: the default size");
    // The datapath's own lifetimes, spelled as kube-proxy does, are nothing to report.
    let text = KUBEADM
        .replace("  tcpCloseWaitTimeout: null", "  tcpCloseWaitTimeout: 1h0m0s")
        .replace("  tcpEstablishedTimeout: null", "  tcpEstablishedTimeout: 24h0m0s");
    assert!(kpc::parse(&text).unwrap().1.is_empty());
}

#[test]
fn unsupported_fields_that_are_set_are_reported_and_unknown_fields_rejected() {
    let text = KUBEADM
        .replace("  tcpCloseWaitTimeout: null", "  tcpCloseWaitTimeout: 2h")
        .replace("oomScoreAdj: null", "oomScoreAdj: -999")
        .replace("detectLocalMode: \"\"", "detectLocalMode: NodeCIDR");
    let (_, notes) = kpc::parse(&text).unwrap();
    for want in ["conntrack.tcpCloseWaitTimeout", "oomScoreAdj", "NodeCIDR"] {
        assert!(notes.iter().any(|n| n.contains(want)), "{want} not reported: {notes:?}");
    }
    let err =
        kpc::parse(&KUBEADM.replace("oomScoreAdj: null", "oomScoreAdj: null\nclusterCidr: 10.0.0.0/8")).unwrap_err();
    assert!(format!("{err:#}").contains("clusterCidr"), "{err:#}");
    assert!(kpc::parse("apiVersion: v1\nkind: ConfigMap\n").is_err());
}

#[test]
fn the_active_mode_section_counts_and_primary_node_port_addresses_are_the_node_ips() {
    let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
                iptables: {syncPeriod: 10s, masqueradeAll: true}\nnftables: {syncPeriod: 45s, masqueradeAll: false}\n\
                nodePortAddresses: [primary, 198.51.100.0/24]\nmetricsBindAddress: 0.0.0.0\nhealthzBindAddress: 127.0.0.1:12345\n";
    let (cfg, notes) = kpc::parse(text).unwrap();
    assert_eq!((cfg.sync_period, cfg.masquerade_all), (Some(Duration::from_secs(45)), None));
    assert!(cfg.nodeport_primary);
    assert_eq!(cfg.metrics_bind_address, Some("0.0.0.0:10249".parse().unwrap()));
    assert!(notes.iter().any(|n| n.contains("nftables")), "{notes:?}");

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }
    let matches =
        Cli::command().get_matches_from(["t", "--objects", "x", "--node-ip", "192.168.0.2", "--sync-period", "5s"]);
    let mut args = Cli::from_arg_matches(&matches).unwrap().run;
    let explicit = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    kpc::apply(&cfg, &mut args, explicit);
    assert_eq!(args.sync_period, Duration::from_secs(5), "the command line wins");
    assert_eq!(args.healthz_bind_address, "127.0.0.1:12345".parse().unwrap());
    let nets: Vec<String> = args.node.nodeport_addresses.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["198.51.100.0/24", "192.168.0.2/32"]);
}
