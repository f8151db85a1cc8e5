//! `ebpf-proxy cleanup` in a network namespace holding kube-proxy's real iptables and nftables
//! layouts (tests/fixtures), loaded into both iptables backends (legacy and nft) and nft, with the
//! ipsets IPVS mode matches: kube-proxy's chains, jumps, table and sets go; the kubelet's chains and
//! an operator's rules and sets stay; a second run finds nothing to do. A step that fails (a set an
//! operator's rule still uses) fails the command after every other step ran. IPVS virtual servers
//! and kube-ipvs0 cannot be made here (this kernel has neither CONFIG_IP_VS nor CONFIG_DUMMY).
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

/// IPVS mode's sets, matched from kube-proxy's KUBE-SERVICES chain, and a set of the operator's.
fn add_ipsets(ns: &Netns, restore: &str) {
    for set in [
        "create KUBE-CLUSTER-IP hash:ip,port",
        "create KUBE-LOOP-BACK hash:ip,port,ip",
        "create keep-blocklist hash:ip",
    ] {
        let words: Vec<&str> = set.split_whitespace().collect();
        run(ns.command("ipset").args(&words)).unwrap();
    }
    feed(
        ns,
        restore,
        &["--noflush"],
        "*nat\n-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n",
    );
}

fn ipsets(ns: &Netns) -> String {
    run(ns.command("ipset").args(["list", "-n"])).unwrap()
}

#[test]
fn cleanup_removes_kube_proxys_rules_and_nothing_else() {
    require_privileges().unwrap();
    for tool in ["iptables-legacy-restore", "iptables-nft-restore", "nft", "ipset"] {
        assert!(Command::new(tool).arg("--version").output().is_ok(), "{tool} missing: run scripts/setup.sh");
    }
    let ns = Netns::new(format!("epx-{}-clean", unique_id())).unwrap();
    for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
        feed(&ns, restore, &[], &fixture("kube-proxy-iptables.save"));
    }
    add_ipsets(&ns, "iptables-legacy-restore");
    feed(&ns, "nft", &["-f", "-"], &fixture("kube-proxy.nft"));
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let before = run(&mut ns.command(save)).unwrap();
        assert!(before.contains("KUBE-SVC-XPGD46QRK7WJZT7O") && before.contains("-j KUBE-SERVICES"), "{before}");
    }

    let out = run(ns.command(proxy_binary()).arg("cleanup")).expect("cleanup");
    println!("{out}");
    for backend in ["iptables-legacy-restore", "iptables-nft-restore"] {
        assert!(out.contains(&format!("{backend}: removed")), "{out}");
    }
    let sets = ipsets(&ns);
    assert!(!sets.contains("KUBE-") && sets.contains("keep-blocklist"), "{sets}");
    let legacy = run(&mut ns.command("iptables-legacy-save")).unwrap();
    let after = run(&mut ns.command("iptables-nft-save")).unwrap();
    // The rules, table by table (the backends list their tables in different orders).
    let strip = |t: &str| {
        let mut tables: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
            .split('*')
            .map(|table| table.trim().to_owned())
            .collect();
        tables.sort();
        tables
    };
    assert_eq!(strip(&legacy), strip(&after), "both backends are left with the same rules");
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
    assert!(!again.contains("removed") && !again.contains("deleted") && !again.contains("destroyed"), "{again}");
    assert_eq!(strip(&run(&mut ns.command("iptables-nft-save")).unwrap()), strip(&after));
}

#[test]
fn cleanup_fails_when_a_step_fails_after_running_the_others() {
    require_privileges().unwrap();
    let ns = Netns::new(format!("epx-{}-cleanf", unique_id())).unwrap();
    feed(&ns, "iptables-nft-restore", &[], &fixture("kube-proxy-iptables.save"));
    add_ipsets(&ns, "iptables-nft-restore");
    // An operator's rule (not kube-proxy's) still matches one of kube-proxy's sets: it cannot go.
    feed(
        &ns,
        "iptables-legacy-restore",
        &[],
        "*filter\n-A INPUT -m set --match-set KUBE-LOOP-BACK src,dst,src -j ACCEPT\nCOMMIT\n",
    );
    let out = ns.command(proxy_binary()).arg("cleanup").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed step fails the command: {stderr}");
    assert!(stderr.contains("ipset") && stderr.contains("KUBE-LOOP-BACK"), "names the failed step: {stderr}");
    // The other steps ran: kube-proxy's chains are gone from the nft backend.
    let after = run(&mut ns.command("iptables-nft-save")).unwrap();
    assert!(!after.contains("KUBE-SERVICES") && !after.contains("KUBE-SVC-"), "{after}");
}
