//! Tools setup.sh installs under $EBPF_PROXY_TOOLS (default ~/.local/ebpf-proxy): the real
//! kube-apiserver and kubectl v1.20.2, and etcd; and the real API server started from them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::testbed::{Netns, Proc, run, wait_for};

/// A tool's path; panics, saying how to get it, when setup.sh has not installed it.
pub fn tool(name: &str) -> PathBuf {
    let home = std::env::var("EBPF_PROXY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".local/ebpf-proxy"));
    let path = match name {
        "etcd" => home.join("venv/bin/etcd"),
        _ => home.join(name),
    };
    assert!(path.is_file(), "{} missing: run scripts/setup.sh", path.display());
    path
}

/// A real kube-apiserver with its etcd, in a test namespace; stopped on drop.
pub struct RealApiServer {
    _apiserver: Proc,
    _etcd: Proc,
    /// `https://127.0.0.1:16443` in the namespace.
    pub base: String,
    /// A bearer token of `system:masters`.
    pub token: String,
}

impl RealApiServer {
    /// Starts etcd and kube-apiserver in `ns`, their state and logs under `dir`; waits for /readyz.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Self> {
        let token = "admintoken";
        std::fs::write(dir.join("tokens.csv"), format!("{token},admin,admin,system:masters\n"))?;
        run(Command::new("openssl").args(["genrsa", "-out"]).arg(dir.join("sa.key")).arg("2048"))?;
        let mut etcd = ns.command(tool("etcd"));
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", "http://127.0.0.1:23790", "--advertise-client-urls"])
            .args(["http://127.0.0.1:23790", "--listen-peer-urls", "http://127.0.0.1:23800"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log"))?);
        let etcd = Proc::spawn(etcd, "etcd")?;
        let mut api = ns.command(tool("kube-apiserver"));
        api.args(["--etcd-servers=http://127.0.0.1:23790", "--secure-port=16443", "--bind-address=127.0.0.1"])
            // A namespace with only loopback has no default route to take an address from.
            .arg("--advertise-address=127.0.0.1")
            // A short history, so that a resourceVersion expires within a test: watches served by
            // etcd (no watch cache, which keeps at least 75 s), compacted every 2 s (default 5 min).
            .args(["--watch-cache=false", "--etcd-compaction-interval=2s"])
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", dir.join("sa.key").display()))
            .arg(format!("--service-account-signing-key-file={}", dir.join("sa.key").display()))
            .arg(format!("--token-auth-file={}", dir.join("tokens.csv").display()))
            .args(["--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16"])
            // As kubeadm and every distribution run it: privileged containers allowed (the default
            // refuses them, and node agents such as ebpf-proxy's bpffs init container need one).
            .arg("--allow-privileged=true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("apiserver.log"))?);
        let apiserver = Proc::spawn(api, "kube-apiserver")?;
        let base = "https://127.0.0.1:16443".to_owned();
        wait_for(Duration::from_secs(60), || {
            run(ns
                .command("curl")
                .args(["-sk", "--fail", "-m", "2", "-H", &format!("Authorization: Bearer {token}")])
                .arg(format!("{base}/readyz")))
            .is_ok()
        })
        .with_context(|| {
            format!(
                "kube-apiserver not ready: {}",
                std::fs::read_to_string(dir.join("apiserver.log")).unwrap_or_default()
            )
        })?;
        Ok(Self { _apiserver: apiserver, _etcd: etcd, base, token: token.to_owned() })
    }

    /// Writes a kubeconfig for kubectl (the server's self-signed certificate is not checked).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: t, user: {{token: {}}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n\
             current-context: t\n",
            self.base, self.token
        );
        std::fs::write(path, text)?;
        Ok(())
    }
}
