//! `cargo xtask image`: the container image, built here with podman from Debian's packages alone.
//! No image registry is reachable, so the base is made with mmdebstrap (Debian bookworm, the apt
//! variant) and imported, once; then deploy/Containerfile's two stages build on it.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// The base both stages start from.
pub const BASE: &str = "localhost/ebpf-proxy-base:bookworm";

/// The image, tagged with the release's version.
pub fn image_name() -> String {
    format!("localhost/ebpf-proxy:{}", env!("CARGO_PKG_VERSION"))
}

/// The machine's hard limit of `resource` (as `ulimit -H` prints it).
fn hard_limit(flag: &str) -> Result<u64> {
    let out = Command::new("sh").arg("-c").arg(format!("ulimit -H{flag}")).output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.parse().with_context(|| format!("ulimit -H{flag}: {text:?}"))
}

/// podman with runc: crun refuses hosts with a hybrid cgroup layout.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// `--ulimit` flags for the machine's own limits: podman's defaults for root (1,048,576 open files,
/// 4,194,304 processes) are above what many machines allow, and the container would not start; a
/// process limit above pid_max is refused too.
pub fn ulimits() -> Result<Vec<String>> {
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?.trim().parse()?;
    let nofile = hard_limit("n")?;
    let nproc = hard_limit("u").unwrap_or(pid_max).min(pid_max);
    Ok(vec![format!("--ulimit=nofile={nofile}:{nofile}"), format!("--ulimit=nproc={nproc}:{nproc}")])
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn image_exists(name: &str) -> Result<bool> {
    Ok(podman().args(["image", "exists", name]).status()?.success())
}

/// Makes the base image with mmdebstrap unless it is there.
fn base_image(work: &Path) -> Result<()> {
    if image_exists(BASE)? {
        return Ok(());
    }
    println!("[image] making {BASE} with mmdebstrap (Debian bookworm from the package mirror)");
    std::fs::create_dir_all(work)?;
    let tar = work.join("base.tar");
    status(
        Command::new("mmdebstrap")
            .args(["--quiet", "--variant=apt", "--include=ca-certificates"])
            // Documentation and translations have no use in a container.
            .args(["--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*"])
            .args(["--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm"])
            .arg(&tar),
    )?;
    status(podman().arg("import").arg(&tar).arg(BASE))?;
    std::fs::remove_file(&tar)?;
    Ok(())
}

/// Builds the image from deploy/Containerfile (the repository's root as the context).
pub fn build(root: &Path, work: &Path) -> Result<()> {
    for tool in ["podman", "mmdebstrap", "runc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: run scripts/setup.sh");
        }
    }
    let start = std::time::Instant::now();
    base_image(work)?;
    let name = image_name();
    println!("[image] building {name} from deploy/Containerfile");
    let mut c = podman();
    c.args(["build", "--network", "host", "--layers"]).args(ulimits()?);
    // The machine's trust store for the build's downloads (rustup, crates.io): a machine behind a
    // TLS-intercepting proxy trusts that proxy's CA, and the build must too. A build-time mount only.
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.is_file() {
        c.arg(format!("--volume={}:/run/host-ca/ca-certificates.crt:ro", ca.display()));
        c.args(["--build-arg", "HOST_CA=/run/host-ca/ca-certificates.crt"]);
    }
    c.args(["--build-arg", &format!("BASE={BASE}"), "-f"]).arg(root.join("deploy/Containerfile"));
    c.args(["-t", &name]).arg(root);
    status(&mut c)?;
    let size = podman().args(["image", "inspect", "--format", "{{.Size}}", &name]).output()?;
    let bytes: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().unwrap_or(0);
    println!("[image] {name}: {} MB, built in {:.0?}", bytes / 1_000_000, start.elapsed());
    Ok(())
}
