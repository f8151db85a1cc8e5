//! `ebpf-proxy cleanup` in a network namespace holding kube-proxy's real iptables and nftables
//! layouts (tests/fixtures), loaded with iptables-restore and nft: kube-proxy's chains, jumps and
//! table go; the kubelet's chains and an operator's rules stay; a second run finds nothing to do.
//! Needs root; fails (never skips) without.

use std::process::{Command, Stdio};

use tests::{
    proxy_binary,
    testbed::{Netns, require_privileges, run, unique_id},
};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)).unwrap()
}

fn feed(ns: &Netns, program: &str, args: &[&str], input: &str) {
    let mut child = ns.command(program).args(args).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "{program} {args:?} failed");
}

#[test]
fn cleanup_removes_kube_proxys_rules_and_nothing_else() {
    require_privileges().unwrap();
    for tool in ["iptables-restore", "nft"] {
        assert!(Command::new(tool).arg("--version").output().is_ok(), "{tool} missing: run scripts/setup.sh");
    }
    let ns = Netns::new(format!("epx-{}-clean", unique_id())).unwrap();
    feed(&ns, "iptables-restore", &[], &fixture("kube-proxy-iptables.save"));
    feed(&ns, "nft", &["-f", "-"], &fixture("kube-proxy.nft"));
    let before = run(&mut ns.command("iptables-save")).unwrap();
    assert!(before.contains("KUBE-SVC-XPGD46QRK7WJZT7O") && before.contains("-j KUBE-SERVICES"), "{before}");

    let out = run(ns.command(proxy_binary()).arg("cleanup")).expect("cleanup");
    println!("{out}");
    let after = run(&mut ns.command("iptables-save")).unwrap();
    for gone in [
        "KUBE-SERVICES",
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-CANARY",
    ] {
        assert!(!after.contains(gone), "{gone} left behind:\n{after}");
    }
    for kept in [
        ":KUBE-MARK-MASQ",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        ":KUBE-FIREWALL",
        "-A INPUT -j KUBE-FIREWALL",
        ":KUBE-KUBELET-CANARY",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "--to-destination 192.168.50.9:22",
        "-A POSTROUTING -s 10.200.0.0/16 -j MASQUERADE",
    ] {
        assert!(after.contains(kept), "{kept} was removed:\n{after}");
    }
    let tables = run(ns.command("nft").args(["list", "tables"])).unwrap();
    assert!(!tables.contains("kube-proxy") && tables.contains("table ip keepme"), "{tables}");

    // Nothing left to do the second time.
    let again = run(ns.command(proxy_binary()).arg("cleanup")).expect("second cleanup");
    assert!(!again.contains("removed") && !again.contains("deleted"), "{again}");
    assert_eq!(
        run(&mut ns.command("iptables-save")).unwrap().lines().filter(|l| !l.starts_with('#')).count(),
        after.lines().filter(|l| !l.starts_with('#')).count()
    );
}
