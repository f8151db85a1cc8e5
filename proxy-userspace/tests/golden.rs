//! Golden tests of the translation, without root: Kubernetes YAML in (`tests/golden/*.yaml`), the
//! exact contents of every map userspace writes out (`*.maps`, one readable line per entry). A change
//! in what the datapath is given shows up as a diff of these files.
//! `UPDATE_GOLDEN=1 cargo test -p proxy-userspace --test golden` rewrites them.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use ebpf_proxy::{
    config::NodeArgs,
    model::{self, ModelOptions, Protocol},
    objects::{self, Objects},
    translate::{self, DesiredMaps, Ids, NodeContext},
};
use proxy_common::{
    BACKEND_F_LOCAL, FRONTEND_F_AFFINITY, FRONTEND_F_CLUSTER_IP, FRONTEND_F_ETP_LOCAL, FRONTEND_F_EXTERNAL,
    FRONTEND_F_HAS_ENDPOINTS, FRONTEND_F_ITP_LOCAL, FRONTEND_F_NODE_PORT, FRONTEND_F_SOURCE_RANGES, LOCAL_SLOT_BASE,
    MEMBER_F_CLUSTER, MEMBER_F_LOCAL, NODE_F_CLUSTER_CIDR, NODE_F_CONFIGURED, NODE_F_MASQUERADE_ALL,
    NODE_F_SERVICE_CIDR, SERVICE_ADDR_F_CLUSTER_IP, SOURCE_RANGE_ID_BITS, addr_from_map, port_from_map,
};

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_from_map(a))
}

fn flags(bits: u32, names: &[(u32, &str)]) -> String {
    let set: Vec<&str> = names.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect();
    if set.is_empty() { "-".into() } else { set.join("|") }
}

fn proto(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

fn mask_len(mask: u32) -> u32 {
    u32::from(ip(mask)).count_ones()
}

/// Every map, one line per entry, in key order.
fn render(d: &DesiredMaps) -> String {
    let mut out = String::new();
    for c in d.node_config.values() {
        let fl = [
            (NODE_F_CLUSTER_CIDR, "CLUSTER_CIDR"),
            (NODE_F_SERVICE_CIDR, "SERVICE_CIDR"),
            (NODE_F_MASQUERADE_ALL, "MASQUERADE_ALL"),
            (NODE_F_CONFIGURED, "CONFIGURED"),
        ];
        writeln!(
            out,
            "NODE_CONFIG masq {} cluster {}/{} service {}/{} snat {}-{} flags {}",
            ip(c.masq_addr),
            ip(c.cluster_cidr),
            mask_len(c.cluster_cidr_mask),
            ip(c.service_cidr),
            mask_len(c.service_cidr_mask),
            c.snat_port_min,
            c.snat_port_max,
            flags(c.flags, &fl)
        )
        .unwrap();
    }
    for a in d.node_addrs.keys() {
        writeln!(out, "NODE_ADDRS {}", ip(*a)).unwrap();
    }
    let fe_flags = [
        (u32::from(FRONTEND_F_CLUSTER_IP), "CLUSTER_IP"),
        (u32::from(FRONTEND_F_EXTERNAL), "EXTERNAL"),
        (u32::from(FRONTEND_F_NODE_PORT), "NODE_PORT"),
        (u32::from(FRONTEND_F_ETP_LOCAL), "ETP_LOCAL"),
        (u32::from(FRONTEND_F_ITP_LOCAL), "ITP_LOCAL"),
        (u32::from(FRONTEND_F_AFFINITY), "AFFINITY"),
        (u32::from(FRONTEND_F_SOURCE_RANGES), "SOURCE_RANGES"),
        (u32::from(FRONTEND_F_HAS_ENDPOINTS), "HAS_ENDPOINTS"),
    ];
    let mut frontends: Vec<_> = d.frontends.iter().collect();
    frontends.sort_by_key(|(_, f)| f.service_id);
    for (k, f) in frontends {
        writeln!(
            out,
            "FRONTENDS {}:{}/{} -> service {} cluster {} local {} affinity {}s flags {}",
            ip(k.addr),
            port_from_map(k.port),
            proto(k.proto),
            f.service_id,
            f.backend_count,
            f.local_count,
            f.affinity_timeout_s,
            flags(u32::from(f.flags), &fe_flags)
        )
        .unwrap();
    }
    for (k, b) in &d.slots {
        let slot =
            if k.slot >= LOCAL_SLOT_BASE { format!("local {}", k.slot - LOCAL_SLOT_BASE) } else { k.slot.to_string() };
        writeln!(out, "BACKEND_SLOTS service {} slot {slot} -> backend {b}", k.service_id).unwrap();
    }
    for (id, b) in &d.backends {
        let local = if b.flags & BACKEND_F_LOCAL != 0 { " local" } else { "" };
        writeln!(out, "BACKENDS {id} -> {}:{}/{}{local}", ip(b.addr), port_from_map(b.port), proto(b.proto)).unwrap();
    }
    for (k, m) in &d.members {
        let fl = flags(*m, &[(MEMBER_F_CLUSTER, "CLUSTER"), (MEMBER_F_LOCAL, "LOCAL")]);
        writeln!(out, "BACKEND_MEMBERS {} backend {} -> {fl}", k.service_id, k.backend_id).unwrap();
    }
    for (a, s) in &d.service_addrs {
        let fl = flags(u32::from(s.flags), &[(u32::from(SERVICE_ADDR_F_CLUSTER_IP), "CLUSTER_IP")]);
        writeln!(out, "SERVICE_ADDRS {} -> frontends {} flags {fl}", ip(*a), s.frontends).unwrap();
    }
    for (len, k) in d.source_ranges.keys() {
        writeln!(
            out,
            "SOURCE_RANGES service {} {}/{}",
            u32::from_be(k.service_id_be),
            ip(k.addr),
            len - SOURCE_RANGE_ID_BITS
        )
        .unwrap();
    }
    out
}

/// The node every case is translated for: node-a with two addresses, pods in 10.244.0.0/16.
fn translate(yaml: &str) -> (String, Vec<String>) {
    let mut objs = Objects::default();
    objects::parse_into(yaml, "golden", &mut objs);
    let model = model::build(&objs, &ModelOptions::default());
    let args = NodeArgs {
        node_name: "node-a".into(),
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(172, 16, 9, 2)],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        service_cidr: Some("10.96.0.0/16".parse().unwrap()),
        ..Default::default()
    };
    let node = NodeContext::new(&args, &model);
    let (desired, notes) = translate::translate(&model, &node, &mut Ids::default());
    (render(&desired), model.errors.iter().map(ToString::to_string).chain(notes).collect())
}

#[test]
fn kubernetes_yaml_in_map_contents_out() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for yaml in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        cases += 1;
        let (maps, notes) = translate(&std::fs::read_to_string(yaml).unwrap());
        assert!(notes.is_empty(), "{}: {notes:?}", yaml.display());
        let golden = yaml.with_extension("maps");
        if update {
            std::fs::write(&golden, &maps).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} missing (UPDATE_GOLDEN=1)", golden.display()));
        if want != maps {
            failures.push(format!("{}:\n--- want\n{want}--- got\n{maps}", golden.display()));
        }
    }
    assert!(cases >= 3, "no golden cases found in {}", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
