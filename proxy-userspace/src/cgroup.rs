//! Where the cgroup v2 hierarchy is. A systemd-unified host (Debian 12's and most distributions'
//! default) mounts it at /sys/fs/cgroup; a hybrid one (cgroup v1 controllers, as some VMs and older
//! distributions run) at /sys/fs/cgroup/unified, under a tmpfs of v1 hierarchies. The socket
//! programs must attach to the v2 one, so it is looked up in the mount table rather than assumed —
//! also under a directory given on the command line, such as the DaemonSet's hostPath mount of the
//! host's /sys/fs/cgroup.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The cgroup v2 mounts in a mountinfo table (`/proc/self/mountinfo`), in table order: those that
/// show a hierarchy's root (a bind mount of a sub-directory shows another root and is left out).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let mut fields = fields.split_whitespace();
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// Mount points escape space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 hierarchy at or under `dir` in `mountinfo`: `dir` itself when it is one, else the
/// first one mounted below it (`dir/unified` on a hybrid host).
pub fn cgroup2_at_or_under(mountinfo: &str, dir: &Path) -> Option<PathBuf> {
    let mounts = cgroup2_mounts(mountinfo);
    mounts.iter().find(|m| m.as_path() == dir).or_else(|| mounts.iter().find(|m| m.starts_with(dir))).cloned()
}

fn mountinfo() -> Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")
}

/// This process's cgroup v2 hierarchy: the first one mounted.
pub fn host_cgroup2() -> Result<PathBuf> {
    match cgroup2_mounts(&mountinfo()?).into_iter().next() {
        Some(m) => Ok(m),
        None => bail!(
            "no cgroup v2 hierarchy is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified` on a \
             host with cgroup v1 controllers), pass --cgroup DIR, or run with --socket-lb=false"
        ),
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `dir` is a directory of a cgroup v2 hierarchy (its root or a cgroup in it).
pub fn is_cgroup2(dir: &Path) -> Result<bool> {
    let st = nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    Ok(st.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 directory `dir` names: `dir` itself when it is in a cgroup v2 hierarchy, else the
/// hierarchy mounted under it.
pub fn cgroup2_in(dir: &Path) -> Result<PathBuf> {
    let dir = dir.canonicalize().with_context(|| format!("--cgroup {}", dir.display()))?;
    if is_cgroup2(&dir)? {
        return Ok(dir);
    }
    cgroup2_at_or_under(&mountinfo()?, &dir).with_context(|| {
        format!(
            "--cgroup {}: neither a cgroup v2 mount nor a directory with one under it (a hybrid host mounts it \
             at /sys/fs/cgroup/unified)",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12, systemd-unified.
    const UNIFIED: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:5 - pstore pstore rw
";
    /// A hybrid host: v1 controllers under a tmpfs, v2 at unified/; and a container's bind mount of
    /// a sub-cgroup, which is no hierarchy root.
    const HYBRID: &str = "\
23 21 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
24 23 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
25 23 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
31 23 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
90 80 0:23 /kubepods/pod1 /run/x rw,relatime - cgroup2 cgroup2 rw
";
    /// A DaemonSet pod with the host's /sys/fs/cgroup (hybrid) mounted at /run/ebpf-proxy/cgroupv2.
    const POD: &str = "\
700 690 0:120 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
710 690 0:22 / /run/ebpf-proxy/cgroupv2 rw,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
711 710 0:23 / /run/ebpf-proxy/cgroupv2/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
712 690 0:24 / /run/with\\040space rw - cgroup2 cgroup2 rw
";

    #[test]
    fn the_v2_hierarchy_is_found_on_unified_and_hybrid_hosts() {
        assert_eq!(cgroup2_mounts(UNIFIED), [PathBuf::from("/sys/fs/cgroup")]);
        assert_eq!(cgroup2_mounts(HYBRID), [PathBuf::from("/sys/fs/cgroup/unified")]);
        let unified = cgroup2_at_or_under(UNIFIED, Path::new("/sys/fs/cgroup"));
        assert_eq!(unified.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        let hybrid = cgroup2_at_or_under(HYBRID, Path::new("/sys/fs/cgroup"));
        assert_eq!(hybrid.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_at_or_under(HYBRID, Path::new("/sys/fs/pstore")), None);
    }

    #[test]
    fn the_daemon_sets_host_mount_is_followed_to_the_hierarchy_under_it() {
        let found = cgroup2_at_or_under(POD, Path::new("/run/ebpf-proxy/cgroupv2"));
        assert_eq!(found.as_deref(), Some(Path::new("/run/ebpf-proxy/cgroupv2/unified")));
        assert!(cgroup2_mounts(POD).contains(&PathBuf::from("/run/with space")));
    }
}
