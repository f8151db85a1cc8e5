//! kube-proxy's own rule layouts for the benchmark's Services, loaded the way kube-proxy loads them.
//!
//! - iptables mode follows `pkg/proxy/iptables/proxier.go` (kubernetes v1.31–v1.34, `syncProxyRules`,
//!   `writeServiceToEndpointRules`, `largeClusterEndpointsThreshold`): filter and nat tables with
//!   KUBE-SERVICES (one rule per Service port, the KUBE-NODEPORTS jump last), KUBE-SVC-* with the
//!   masquerade rule for off-cluster sources then `statistic --mode random` jumps to KUBE-SEP-*, each
//!   KUBE-SEP-* with its hairpin KUBE-MARK-MASQ rule and the DNAT, KUBE-POSTROUTING masquerading what
//!   is marked. Above 1,000 endpoints kube-proxy drops the per-endpoint comments, and so does this.
//!   Loaded by `iptables-legacy-restore` (the faster of the two backends here: see BENCHMARKS.md).
//!   One endpoint change is the partial restore kube-proxy makes since v1.28 (`MinimizeIPTablesRestore`):
//!   KUBE-SERVICES and the fixed chains rewritten in full, the changed Service's chains, stale KUBE-SEP
//!   chains deleted, with `--noflush`.
//! - nftables mode follows `pkg/proxy/nftables/proxier.go` (kubernetes v1.31–v1.34, `setupNFTables`,
//!   `syncProxyRules`, `writeServiceToEndpointRules`): table `ip kube-proxy`, the `service-ips` verdict
//!   map looked up from the `services` chain, per Service a chain with the masquerade rule and
//!   `numgen random mod N vmap`, per endpoint a chain with the hairpin mark and the DNAT, the
//!   `masquerading` chain, the filter chains on new connections (`cluster-ips-check`,
//!   `service-endpoints-check`, `firewall-check`). Loaded by `nft -f`; one endpoint change is the
//!   transaction kube-proxy's partial sync sends (the Service's chain rewritten, the new endpoint chain
//!   added, the stale one deleted).
//!
//! Chain names have kube-proxy's shape (prefix, 16 or 8 hash characters, the nftables name tail); the
//! hash is this file's, not kube-proxy's SHA-256, which changes nothing the kernel does.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddrV4,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tests::testbed::{CLUSTER_CIDR, Netns, run};

use crate::table::{BenchService, NAMESPACE, Table};

/// kube-proxy's `largeClusterEndpointsThreshold`.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
/// The Service CIDR the ClusterIPs are allocated from (nftables' drop rule for unallocated ones).
const SERVICE_CIDR: &str = "10.96.0.0/16";
const MASQ_MARK: &str = "0x4000";

/// `len` characters of base32 (RFC 4648 alphabet) of a 64-bit FNV-1a hash of `s`, and of `s` again
/// with a salt for the characters past the first 12.
fn hash_name(s: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    };
    let (a, b) = (fnv(s.as_bytes()), fnv(format!("{s}#").as_bytes()));
    (0..len)
        .map(|k| {
            let h = if k < 12 { a >> (5 * k) } else { b >> (5 * (k - 12)) };
            ALPHABET[(h & 31) as usize] as char
        })
        .collect()
}

/// kube-proxy's `ServicePortName` as it appears in comments and chain names: `ns/name:port`.
fn port_name(s: &BenchService) -> String {
    format!("{NAMESPACE}/{}:{}", s.name(), s.port_name)
}

fn svc_chain(s: &BenchService) -> String {
    format!("KUBE-SVC-{}", hash_name(&format!("{}tcp", port_name(s)), 16))
}

fn sep_chain(s: &BenchService, ep: SocketAddrV4) -> String {
    format!("KUBE-SEP-{}", hash_name(&format!("{}tcp{ep}", port_name(s)), 16))
}

/// Whether kube-proxy would leave out the per-endpoint comments.
fn large_cluster(t: &Table) -> bool {
    t.total_endpoints() > LARGE_CLUSTER_ENDPOINTS
}

/// The fixed filter table (kube-proxy's jumps from the built-in chains and its own chains).
const IPTABLES_FILTER: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A INPUT -j KUBE-FIREWALL\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -j KUBE-FIREWALL\n\
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
COMMIT\n";

/// KUBE-SERVICES, KUBE-POSTROUTING and KUBE-MARK-MASQ: written in full at every sync.
fn iptables_fixed_nat(t: &Table, out: &mut String) {
    out.push_str(
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for s in &t.services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {}",
            s.ip(),
            port_name(s),
            s.port,
            svc_chain(s)
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" \
         -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

/// One Service's KUBE-SVC and KUBE-SEP rules (the chains declared by the caller).
fn iptables_service(s: &BenchService, large: bool, out: &mut String) {
    let svc = svc_chain(s);
    let name = port_name(s);
    let _ = writeln!(
        out,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
        s.ip(),
        s.port
    );
    let n = s.endpoints.len();
    for (k, &ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, ep);
        let comment = |text: &str| if large { String::new() } else { format!("-m comment --comment \"{text}\" ") };
        let statistic = if k + 1 < n {
            format!("-m statistic --mode random --probability {:.11} ", 1.0 / (n - k) as f64)
        } else {
            String::new()
        };
        let _ = writeln!(out, "-A {svc} {}{statistic}-j {sep}", comment(&format!("{name} -> {ep}")));
        let _ = writeln!(out, "-A {sep} -s {}/32 {}-j KUBE-MARK-MASQ", ep.ip(), comment(&name));
        let _ = writeln!(out, "-A {sep} -p tcp {}-m tcp -j DNAT --to-destination {ep}", comment(&name));
    }
}

const NAT_FIXED_CHAINS: &str =
    ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";

fn declare_service_chains(s: &BenchService, out: &mut String) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    for &ep in &s.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, ep));
    }
}

/// The whole ruleset, for `iptables-restore` into an empty namespace.
pub fn iptables_full(t: &Table) -> String {
    let large = large_cluster(t);
    let mut out = String::with_capacity(t.services.len() * 2048);
    out.push_str(IPTABLES_FILTER);
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    out.push_str(NAT_FIXED_CHAINS);
    for s in &t.services {
        declare_service_chains(s, &mut out);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    iptables_fixed_nat(t, &mut out);
    for s in &t.services {
        iptables_service(s, large, &mut out);
    }
    out.push_str("COMMIT\n");
    out
}

/// The partial restore (`--noflush`) for Service `changed` whose endpoints were `before`: the fixed
/// chains in full, the Service's chains, the stale KUBE-SEP chains deleted.
pub fn iptables_change(t: &Table, changed: &BenchService, before: &BenchService) -> String {
    let mut out = String::with_capacity(t.services.len() * 200);
    out.push_str("*nat\n");
    out.push_str(NAT_FIXED_CHAINS);
    declare_service_chains(changed, &mut out);
    // A chain must be empty to be deleted: declaring it flushes it (as kube-proxy does).
    let stale: Vec<String> =
        before.endpoints.iter().filter(|ep| !changed.endpoints.contains(ep)).map(|&ep| sep_chain(before, ep)).collect();
    for chain in &stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    iptables_fixed_nat(t, &mut out);
    iptables_service(changed, large_cluster(t), &mut out);
    for chain in &stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_service_chain(s: &BenchService) -> String {
    let tail = format!("{NAMESPACE}/{}/tcp/{}", s.name(), s.port_name);
    format!("service-{}-{tail}", hash_name(&tail, 8))
}

fn nft_endpoint_chain(s: &BenchService, ep: SocketAddrV4) -> String {
    let tail = format!("{NAMESPACE}/{}/tcp/{}__{}/{}", s.name(), s.port_name, ep.ip(), ep.port());
    format!("endpoint-{}-{tail}", hash_name(&tail, 8))
}

/// The table's fixed part: sets, maps, base chains and the shared chains.
fn nft_fixed() -> String {
    format!(
        "add table ip kube-proxy {{ comment \"rules for kube-proxy\" ; }}\n\
         add set ip kube-proxy cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add set ip kube-proxy nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map ip kube-proxy no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map ip kube-proxy no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add map ip kube-proxy firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add map ip kube-proxy service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map ip kube-proxy service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add chain ip kube-proxy filter-prerouting {{ type filter hook prerouting priority -110 ; }}\n\
         add chain ip kube-proxy filter-input {{ type filter hook input priority -110 ; }}\n\
         add chain ip kube-proxy filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add chain ip kube-proxy filter-output {{ type filter hook output priority -110 ; }}\n\
         add chain ip kube-proxy filter-output-post-dnat {{ type filter hook output priority -90 ; }}\n\
         add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain ip kube-proxy nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain ip kube-proxy nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain ip kube-proxy cluster-ips-check\n\
         add chain ip kube-proxy firewall-check\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add chain ip kube-proxy masquerading\n\
         add chain ip kube-proxy nodeport-endpoints-check\n\
         add chain ip kube-proxy reject-chain\n\
         add chain ip kube-proxy service-endpoints-check\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy filter-prerouting ct state new jump firewall-check\n\
         add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check\n\
         add rule ip kube-proxy filter-input ct state new jump service-endpoints-check\n\
         add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n\
         add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n\
         add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n\
         add rule ip kube-proxy filter-output ct state new jump firewall-check\n\
         add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add rule ip kube-proxy nat-output jump services\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add rule ip kube-proxy cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n\
         add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add rule ip kube-proxy masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor {MASQ_MARK}\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add rule ip kube-proxy reject-chain reject\n\
         add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"
    )
}

/// One Service's chains and rules (chains added, then their rules: a rule may only name a chain
/// that exists).
fn nft_service(s: &BenchService, out: &mut String) {
    let svc = nft_service_chain(s);
    for &ep in &s.endpoints {
        let chain = nft_endpoint_chain(s, ep);
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        let _ = writeln!(out, "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade", ep.ip());
        let _ = writeln!(out, "add rule ip kube-proxy {chain} meta l4proto tcp dnat to {ep}");
    }
    let _ = writeln!(out, "add chain ip kube-proxy {svc}");
    let _ = writeln!(out, "flush chain ip kube-proxy {svc}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.ip(),
        s.port
    );
    let targets: Vec<String> =
        s.endpoints.iter().enumerate().map(|(k, &ep)| format!("{k} : goto {}", nft_endpoint_chain(s, ep))).collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        targets.join(" , ")
    );
}

/// The whole table, for `nft -f` into an empty namespace.
pub fn nft_full(t: &Table) -> String {
    let mut out = nft_fixed();
    out.reserve(t.services.len() * 3072);
    for s in &t.services {
        nft_service(s, &mut out);
    }
    for s in &t.services {
        let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", s.ip());
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . tcp . {} : goto {} }}",
            s.ip(),
            s.port,
            nft_service_chain(s)
        );
    }
    out
}

/// The partial-sync transaction for Service `changed` whose endpoints were `before`.
pub fn nft_change(changed: &BenchService, before: &BenchService) -> String {
    let mut out = String::new();
    nft_service(changed, &mut out);
    for &ep in before.endpoints.iter().filter(|ep| !changed.endpoints.contains(ep)) {
        let chain = nft_endpoint_chain(before, ep);
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        let _ = writeln!(out, "delete chain ip kube-proxy {chain}");
    }
    out
}

/// Runs `program args` in `ns` with `input` on its standard input; how long it took to finish
/// (the rules are in force when it returns).
pub fn load(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let mut cmd = ns.command(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    // Written from a thread: the program may answer before it has read everything.
    let mut stdin = child.stdin.take().context("stdin")?;
    let text = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output()?;
    let took = t0.elapsed();
    writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().take(5).collect::<Vec<_>>().join("\n")
    );
    Ok(took)
}

/// Removes the iptables layout (the namespace's tables then hold no rules).
pub fn clear_iptables(ns: &Netns) -> Result<()> {
    for table in ["nat", "filter"] {
        run(ns.command("iptables-legacy").args(["-t", table, "-F"]))?;
        run(ns.command("iptables-legacy").args(["-t", table, "-X"]))?;
    }
    Ok(())
}

/// Removes the nftables layout.
pub fn clear_nft(ns: &Netns) -> Result<()> {
    if run(ns.command("nft").args(["list", "tables"]))?.contains("table ip kube-proxy") {
        run(ns.command("nft").args(["delete", "table", "ip", "kube-proxy"]))?;
    }
    Ok(())
}
