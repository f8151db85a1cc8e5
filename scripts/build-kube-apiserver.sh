#!/usr/bin/env bash
# Builds a real kube-apiserver and kubectl v1.20.2 offline, from Debian bookworm's `kubernetes` source
# package (the full tree with vendor/) and Debian's Go 1.19, for the tests that check the project's
# test API server against the real one and render and dry-run the deploy/ manifests with them. Nothing is installed system-wide: apt runs with a private
# configuration and state under WORKDIR, and the .debs it downloads are unpacked there with
# dpkg-deb -x. About 8 minutes on 2 cores; the binaries (~110 MB and ~40 MB) are left at WORKDIR/kube-apiserver
# and WORKDIR/kubectl.
#
# Usage: scripts/build-kube-apiserver.sh WORKDIR
# Each stage prints one line with the time since start; the compiler's own output goes to
# WORKDIR/build.log (its last lines are printed if the build fails).
set -euo pipefail

work=${1:?usage: $0 WORKDIR}
mkdir -p "$work"
work=$(cd "$work" && pwd)
log="$work/build.log"
: >"$log"
start=$(date +%s)
stage() { printf '[kube-apiserver %4ds] %s\n' "$(($(date +%s) - start))" "$*"; }
fail() {
  echo "kube-apiserver build failed: $*; last lines of $log:" >&2
  tail -n 30 "$log" >&2
  exit 1
}

# --- A private apt: the mirror this machine already uses, with source packages ----------------------
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $1; exit}')
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
    /etc/apt/sources.list 2>/dev/null)
fi
[ -n "$mirror" ] || fail "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d"
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.d"
cat >"$apt_dir/sources.d/bookworm.sources" <<EOF
Types: deb deb-src
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
cat >"$apt_dir/apt.conf" <<EOF
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$apt_dir/sources.d";
Dir::State::Lists "$apt_dir/lists";
Dir::Cache "$apt_dir/cache";
EOF
export APT_CONFIG="$apt_dir/apt.conf"
stage "reading the package lists of $mirror (bookworm, with sources)"
apt-get -q update >>"$log" 2>&1 || fail "apt-get update"

# --- Sources and the toolchain, unpacked under WORKDIR -------------------------------------------------
debs="$work/debs"
root="$work/root"
mkdir -p "$debs" "$root"
stage "downloading the kubernetes source package (about 40 MB) and Go 1.19"
(
  cd "$debs"
  apt-get -q source --download-only kubernetes
  # reflect2 1.0.2: the vendored 1.0.1 crashes (map iteration) under Go >= 1.18.
  apt-get -q download golang-1.19-go golang-1.19-src rsync libpopt0 golang-github-modern-go-reflect2-dev
) >>"$log" 2>&1 || fail "downloading packages"
stage "unpacking"
for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
tar -C "$work" -xzf "$debs"/kubernetes_*.orig.tar.gz
tree="$work/kubernetes-1.20.2"
[ -d "$tree" ] || fail "the source package did not unpack to $tree"
reflect2="$tree/vendor/github.com/modern-go/reflect2"
rm -rf "$reflect2"
mkdir -p "$reflect2"
cp -r "$root/usr/share/gocode/src/github.com/modern-go/reflect2/." "$reflect2/"
rm -f "$reflect2/go.mod"

# --- The build, offline ---------------------------------------------------------------------------------
export GOROOT="$root/usr/lib/go-1.19"
export PATH="$GOROOT/bin:$root/usr/bin:$PATH"
export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu"
export GOCACHE="$work/gocache" GOPROXY=off CGO_ENABLED=0 HOME="$work/home" GOPATH="$tree/.go"
mkdir -p "$HOME" "$GOPATH/src/k8s.io"
ln -sfn ../../.. "$GOPATH/src/k8s.io/kubernetes"
stage "compiling cmd/kube-apiserver with $(go version | awk '{print $3}') (the longest stage: about 6 minutes)"
(cd "$tree" && make WHAT=cmd/kube-apiserver) >>"$log" 2>&1 || fail "make WHAT=cmd/kube-apiserver"
cp "$tree/_output/local/bin/linux/amd64/kube-apiserver" "$work/kube-apiserver"
# kubectl shares most of its packages with the API server: the build cache makes it a short stage.
stage "compiling cmd/kubectl (about a minute)"
(cd "$tree" && make WHAT=cmd/kubectl) >>"$log" 2>&1 || fail "make WHAT=cmd/kubectl"
cp "$tree/_output/local/bin/linux/amd64/kubectl" "$work/kubectl"
stage "done: $("$work/kube-apiserver" --version) at $work/kube-apiserver, kubectl at $work/kubectl"
