//! An upgrade across a change of map layout, in the single-node testbed: the datapath of this build
//! (layout 1), left running as a rollout leaves it (SIGTERM with --keep-datapath), is taken over by
//! a build whose connection entry has another layout (proxy-common's test-only `layout-test`, layout
//! 2: two address fields swapped; built by `cargo xtask test`). Its connections are carried into the new table, so a kept-alive
//! connection through the tc path keeps answering from its backend; the new layout is recorded and the
//! old build then refuses the maps instead of misreading them. Needs root; fails (never skips)
//! without.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use aya::maps::{Array, Map, MapData};
use ebpf_proxy::conntrack::ConntrackMaps;
use tests::{
    client::{connect_in, keepalive_request},
    proxy_binary, proxy_binary_layout_test,
    testbed::{LbMode, Node, answered_by, service_yaml, slice_yaml},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: usize = 4;

fn layout(node: &Node) -> (u32, u32) {
    let data = MapData::from_pin(node.bpffs.path.join("LAYOUT")).expect("LAYOUT pinned");
    let array: Array<MapData, u32> = Array::try_from(Map::Array(data)).unwrap();
    (array.get(&0, 0).unwrap(), array.get(&1, 0).unwrap())
}

fn pods_reached(node: &Node, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| answered_by(&node.curl("client", false, &format!("http://{VIP}/")).expect("curl")).unwrap().to_owned())
        .collect()
}

#[test]
fn an_upgrade_across_a_connection_table_layout_change_keeps_established_connections() {
    let mut node = Node::new(BACKENDS).expect("testbed node");
    for pod in &mut node.pods {
        pod.start_nginx().unwrap();
    }
    node.add_pod("client").unwrap();
    let ips: Vec<_> = node.pods[..BACKENDS].iter().map(|p| p.ip).collect();
    node.write_objects(
        "web.yaml",
        &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &ips)),
    )
    .unwrap();
    // This build, as the DaemonSet runs it; a connection through the tc path (tracked per packet).
    node.proxy_args = vec!["--keep-datapath".into()];
    node.start_proxy(&proxy_binary(), LbMode::TcOnly).unwrap();
    assert_eq!(layout(&node), (1, 0));
    let mut kept = connect_in(&node.pod("client").ns.name, std::net::SocketAddrV4::new(VIP, 80));
    let kept_pod = keepalive_request(&mut kept);
    let tracked_before = ConntrackMaps::pinned(&node.bpffs.path).unwrap().connections().unwrap().len();
    assert!(tracked_before >= 1);
    node.stop_proxy().unwrap();

    // The next release, whose connection entries keep the backend and SNAT addresses swapped.
    std::fs::write(&node.proxy_log, "").unwrap();
    node.start_proxy(&proxy_binary_layout_test(), LbMode::TcOnly).expect("the new layout's build takes over");
    let log = node.proxy_log_text();
    assert!(log.contains("migrating the pinned maps from layout 1 to 2"), "{log}");
    assert!(
        log.contains("of CONNTRACK carried over") && log.contains("migrated the pinned maps from layout 1 to 2"),
        "{log}"
    );
    assert_eq!(layout(&node), (2, 0), "the new layout recorded, no switch left half done");
    assert!(!node.bpffs.path.join("CONNTRACK-migrating").exists());
    // The established connection was carried over, converted: it answers from the same backend (read
    // with the new layout unconverted, its backend address would be its SNAT address, 0).
    for _ in 0..5 {
        assert_eq!(keepalive_request(&mut kept), kept_pod);
    }
    let all: BTreeSet<String> = (0..BACKENDS).map(|i| format!("pod-{i}")).collect();
    assert_eq!(pods_reached(&node, 40), all, "new connections through the new build");

    // Going back to the old build would read layout 2 as layout 1: it refuses.
    node.stop_proxy().unwrap();
    let args = node.proxy_command(LbMode::TcOnly);
    node.spawn_proxy_unready(&proxy_binary(), &args, &[]).unwrap();
    let status = node.wait_proxy_exit(Duration::from_secs(10)).expect("the old build refuses at once");
    assert!(!status.success());
    assert!(node.proxy_log_text().contains("have layout 2; this build reads layout 1"), "{}", node.proxy_log_text());
    assert_eq!(keepalive_request(&mut kept), kept_pod, "and the datapath it refused still runs");
}
