#!/usr/bin/env bash
# Builds the container images the local multi-node test cluster runs (scripts/cluster.sh), with no
# registry: as docker-archive tarballs that `ctr -n k8s.io images import` accepts, in a cache outside
# the clone, and prints the directory holding them as its last line. Needs root, buildah, debootstrap,
# gcc with a static libc, and deb.debian.org (nothing else is pulled or fetched).
#   pause.tar     localhost/imdsgate/pause:3.10          deploy/docker/pause/pause.c, static, FROM scratch
#   coredns.tar   localhost/imdsgate/coredns:$COREDNS_VERSION   $IMDSGATE_K8S_BIN_DIR/coredns, FROM scratch
#   imdsgate.tar  localhost/imdsgate/imdsgate:dev        the repository's Dockerfile, BINARIES=prebuilt
#   workload.tar  localhost/imdsgate/workload:dev        imds-whoami (aws-sdk-rust) and imdsgate-asker,
#                                                        ca-certificates, a shell and sleep, and
#                                                        python3 and iproute2 (e2e/tests/spoofing.rs)
# The last two are FROM localhost/imdsgate/debian:bookworm-slim, a debootstrap minbase bookworm (kept in
# buildah's store only). Binaries come from `cargo build --bins` in $IMDSGATE_BINARIES_DIR (relative to
# the repository; default target/debug); this script never builds them. Each tarball is rebuilt only
# when a sha256 of its inputs (this script, sources, binaries, base) changed: a warm call only hashes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.sh disable=SC1091
. "$here/versions.sh"

cache=${XDG_CACHE_HOME:-$HOME/.cache}/imdsgate
out=$cache/images            # the tarballs (printed)
work=$cache/image-build      # buildah's store, the debootstrap rootfs, logs, memoised hashes
store=$work/buildah
keys=$out/.inputs            # <image>.sha256: the inputs' hash each tarball was built from
sums=$work/sums
logs=$work/logs

PAUSE_IMAGE=localhost/imdsgate/pause:3.10
COREDNS_IMAGE=localhost/imdsgate/coredns:${COREDNS_VERSION}
BASE_IMAGE=localhost/imdsgate/debian:bookworm-slim
IMDSGATE_IMAGE=localhost/imdsgate/imdsgate:dev
WORKLOAD_IMAGE=localhost/imdsgate/workload:dev

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian

log() { echo "cluster-images: $*" >&2; }
die() { log "$*"; exit 1; }

# --- inputs, checked before any slow work ---------------------------------------------------------
bins_rel=${IMDSGATE_BINARIES_DIR:-target/debug}
case $bins_rel in
  "$repo"/*) bins_rel=${bins_rel#"$repo"/} ;;
  /*) die "IMDSGATE_BINARIES_DIR=$bins_rel must be inside the repository ($repo): it is a Docker build-context path" ;;
esac
bins_rel=${bins_rel%/}
bins=$repo/$bins_rel
for b in imdsgate-agent imdsgate-server imds-whoami imdsgate-asker; do
  [ -x "$bins/$b" ] || die "$bins/$b is missing: build the binaries first (cargo build --bins, or cargo build --release --bins with IMDSGATE_BINARIES_DIR=target/release); this script does not build them"
done
[ -n "${IMDSGATE_K8S_BIN_DIR:-}" ] || die "IMDSGATE_K8S_BIN_DIR is not set: it names the directory holding coredns (IMDSGATE_K8S_BIN_DIR=\$(scripts/k8s-bins.sh cluster | tail -n1))"
coredns_bin=$IMDSGATE_K8S_BIN_DIR/coredns
[ -x "$coredns_bin" ] || die "$coredns_bin is missing: build it with scripts/k8s-bins.sh cluster"
pause_src=$repo/deploy/docker/pause/pause.c

mkdir -p "$out" "$keys" "$sums" "$logs"
exec 9>"$work/lock"
flock 9 # one build at a time per cache

# sha256 of a file's contents, memoised by its device, inode, size and mtime (the binaries are big).
file_sum() {
  local f st memo sum
  f=$(readlink -f "$1")
  st=$(stat -L -c '%d:%i:%s:%y' "$f")
  memo=$sums/$(printf '%s' "$f" | sha256sum | cut -d' ' -f1)
  if [ -f "$memo" ] && [ "$(sed -n 1p "$memo")" = "$st" ]; then
    sed -n 2p "$memo"
    return
  fi
  sum=$(sha256sum "$f" | cut -d' ' -f1)
  printf '%s\n%s\n' "$st" "$sum" >"$memo"
  echo "$sum"
}
inputs_sum() { printf '%s\n' "$@" | sha256sum | cut -d' ' -f1; }

# The base image's rootfs: debootstrap's output (the slow part), slimmed as debian:bookworm-slim is
# (docs, man pages, locales, apt lists and caches dropped, and kept out of later installs), cached as
# a tarball keyed by all of that, without the contents of the mount points.
ROOTFS_EXCLUDES=(./dev/'*' ./proc/'*' ./sys/'*' ./run/mount)
read -r -d '' SLIM_SCRIPT <<'SH' || true
set -eu
cat >/etc/dpkg/dpkg.cfg.d/docker <<'EOF'
# Files containers do not need, as in debian:bookworm-slim; this keeps later installs without them.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
cat >/etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >/etc/apt/apt.conf.d/docker-no-languages
cat >/etc/apt/sources.list <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/groff/* /usr/share/lintian/* /usr/share/linda/* /usr/share/locale/*
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/* /var/cache/debconf/*-old
find /var/log -type f -delete
rm -f /var/lib/dpkg/*-old
# Empty, for the container runtime (and buildah's RUN) to mount over; not the machine's DNS and name,
# which debootstrap copies in. Present in the base, they stay out of the layers RUN steps make.
for f in /etc/hosts /etc/hostname /etc/resolv.conf; do
  rm -f "$f"
  : >"$f"
  chmod 0644 "$f"
done
SH
base_key=$(inputs_sum "debootstrap --variant=minbase $DEBIAN_SUITE $DEBIAN_MIRROR" "$(uname -m)" "$SLIM_SCRIPT" "${ROOTFS_EXCLUDES[@]}")
rootfs_tar=$work/debian-$DEBIAN_SUITE-minbase-${base_key:0:16}.tar

script_sum=$(file_sum "${BASH_SOURCE[0]}")
declare -A want
want[pause]=$(inputs_sum "$script_sum" "$(file_sum "$pause_src")" "$(gcc --version 2>/dev/null | head -n1)")
want[coredns]=$(inputs_sum "$script_sum" "$COREDNS_IMAGE" "$(file_sum "$coredns_bin")")
want[imdsgate]=$(inputs_sum "$script_sum" "$base_key" "$bins_rel" \
  "$(file_sum "$repo/Dockerfile")" "$(file_sum "$repo/.dockerignore")" "$(file_sum "$repo/deploy/docker/select-iptables")" \
  "$(file_sum "$bins/imdsgate-agent")" "$(file_sum "$bins/imdsgate-server")")
want[workload]=$(inputs_sum "$script_sum" "$base_key" "$(file_sum "$bins/imds-whoami")" "$(file_sum "$bins/imdsgate-asker")")

stale=()
for img in pause coredns imdsgate workload; do
  if [ -f "$out/$img.tar" ] && [ "$(cat "$keys/$img.sha256" 2>/dev/null)" = "${want[$img]}" ]; then
    log "$img.tar is up to date"
  else
    stale+=("$img")
  fi
done
if [ ${#stale[@]} -eq 0 ]; then
  echo "$out"
  exit 0
fi

# --- building ---------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "building images needs root (debootstrap; buildah with the vfs driver and chroot isolation)"
command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah)"
export BUILDAH_ISOLATION=chroot
bah() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }
tmp=$(mktemp -d "$work/tmp.XXXXXX")
# The store is this script's alone (under the lock): every working container in it is a leftover,
# ours or buildah bud's (1.28 keeps one for a stage FROM another stage), and unnamed images too.
cleanup_store() {
  bah rm -a >/dev/null 2>&1 || true
  bah rmi --prune >/dev/null 2>&1 || true
}
cleanup() {
  cleanup_store
  rm -rf "$tmp"
}
trap cleanup EXIT

# Runs "$@" with its output in $logs/<name>.log, shown (the end of it) on failure.
logged() {
  local name=$1
  shift
  if ! "$@" >"$logs/$name.log" 2>&1; then
    tail -n 30 "$logs/$name.log" >&2
    die "$name failed (log: $logs/$name.log)"
  fi
}

ctr= # set by new_container
new_container() { # image: a working container of it in $ctr
  ctr=$(bah from --pull=never "$1")
}

# Exports an image of the store as $out/<file>.tar (a docker-archive tagged with its name), records
# the inputs' hash, then drops the image from the store: the tarball is the cache.
export_image() {
  local img=$1 name=$2 tar=$out/$1.tar
  rm -f "$tar" "$tar.tmp" "$keys/$img.sha256"
  logged "push-$img" bah push "$name" "docker-archive:$tar.tmp:$name"
  tar -xOf "$tar.tmp" manifest.json | grep -qF "\"$name\"" || die "$tar.tmp: manifest.json does not tag $name"
  mv "$tar.tmp" "$tar"
  echo "${want[$img]}" >"$keys/$img.sha256"
  bah rmi "$name" >/dev/null 2>&1 || true
  log "$img.tar: $name ($(du -h "$tar" | cut -f1))"
}

build_pause() {
  command -v gcc >/dev/null || die "gcc is not installed (apt-get install gcc libc6-dev)"
  log "building $PAUSE_IMAGE"
  gcc -static -Os -s -Wall -Wextra -o "$tmp/pause" "$pause_src" || die "compiling $pause_src failed (a static libc: libc6-dev)"
  chmod 0755 "$tmp/pause"
  new_container scratch
  local c=$ctr
  bah copy "$c" "$tmp/pause" /pause >/dev/null
  bah config --entrypoint '["/pause"]' --user 65535:65535 --label "imdsgate.inputs=${want[pause]}" "$c"
  bah commit -q --format docker --rm "$c" "$PAUSE_IMAGE" >/dev/null
  export_image pause "$PAUSE_IMAGE"
}

build_coredns() {
  log "building $COREDNS_IMAGE"
  new_container scratch
  local c=$ctr
  install -m 0755 "$coredns_bin" "$tmp/coredns"
  bah copy "$c" "$tmp/coredns" /coredns >/dev/null
  bah config --entrypoint '["/coredns"]' --label "imdsgate.inputs=${want[coredns]}" "$c"
  bah commit -q --format docker --rm "$c" "$COREDNS_IMAGE" >/dev/null
  export_image coredns "$COREDNS_IMAGE"
}

debootstrap_rootfs() {
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  log "debootstrap --variant=minbase $DEBIAN_SUITE (first run only; a few minutes)"
  local root=$tmp/rootfs
  # debootstrap mounts /proc, /sys and more inside its target: in a private mount namespace of its
  # own, these mounts never reach the machine's mount table and all go away with it.
  logged debootstrap unshare --mount --propagation private \
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR"
  if mount | grep -qF "$root"; then die "mounts under $root remain after debootstrap"; fi
  # A plain chroot (no mounts): the script only removes and writes files.
  chroot "$root" /bin/sh -c "$SLIM_SCRIPT" || die "slimming the rootfs failed"
  tar --numeric-owner --xattrs -C "$root" "${ROOTFS_EXCLUDES[@]/#/--exclude=}" -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  find "$work" -maxdepth 1 -name "debian-*-minbase-*.tar" ! -name "${rootfs_tar##*/}" -delete
  rm -rf "$root"
}

ensure_base() {
  if [ "$(bah inspect --type image --format '{{index .OCIv1.Config.Labels "imdsgate.inputs"}}' "$BASE_IMAGE" 2>/dev/null)" = "$base_key" ]; then
    return
  fi
  [ -f "$rootfs_tar" ] || debootstrap_rootfs
  log "importing $BASE_IMAGE"
  new_container scratch
  local c=$ctr
  bah add "$c" "$rootfs_tar" / >/dev/null
  bah config --cmd '["bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "imdsgate.inputs=$base_key" "$c"
  bah commit -q --format docker --rm "$c" "$BASE_IMAGE" >/dev/null
}

build_imdsgate() {
  ensure_base
  log "building $IMDSGATE_IMAGE from Dockerfile (binaries from $bins_rel, stripped into target/image)"
  # Stripped copies inside the build context (.dockerignore lets target/image/imdsgate-* in): a
  # debug build's symbols are 90% of its size and no use in the cluster.
  local b
  mkdir -p "$repo/target/image"
  for b in imdsgate-agent imdsgate-server; do
    strip -o "$repo/target/image/$b" "$bins/$b" 2>/dev/null || cp "$bins/$b" "$repo/target/image/$b"
  done
  logged bud-imdsgate bah bud --isolation chroot --network host --pull=never --format docker \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg BINARIES=prebuilt --build-arg "PREBUILT_DIR=target/image" \
    --label "imdsgate.inputs=${want[imdsgate]}" -f "$repo/Dockerfile" -t "$IMDSGATE_IMAGE" "$repo"
  export_image imdsgate "$IMDSGATE_IMAGE"
  cleanup_store
}

build_workload() {
  local b
  ensure_base
  log "building $WORKLOAD_IMAGE (imds-whoami from $bins_rel)"
  local ctx=$tmp/workload
  mkdir -p "$ctx"
  # Stripped: the debug build's symbols are most of its size and no use in the cluster.
  for b in imds-whoami imdsgate-asker; do
    strip -o "$ctx/$b" "$bins/$b" 2>/dev/null || cp "$bins/$b" "$ctx/$b"
  done
  cat >"$ctx/Containerfile" <<EOF
FROM $BASE_IMAGE
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates python3 iproute2 \\
 && rm -rf /var/lib/apt/lists/*
COPY imds-whoami imdsgate-asker /usr/local/bin/
CMD ["sleep", "infinity"]
EOF
  logged bud-workload bah bud --isolation chroot --network host --pull=never --format docker \
    --label "imdsgate.inputs=${want[workload]}" -f "$ctx/Containerfile" -t "$WORKLOAD_IMAGE" "$ctx"
  export_image workload "$WORKLOAD_IMAGE"
  cleanup_store
}

for img in "${stale[@]}"; do
  "build_$img"
done
echo "$out"
