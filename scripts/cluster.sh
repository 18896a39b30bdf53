#!/usr/bin/env bash
# A real multi-node Kubernetes cluster on this one machine, for trying imdsgate as users run it and
# for the cluster tests. Nothing touches the machine's own network namespace, mounts or sysctls:
#
#   fabric        a network namespace holding a bridge; every member below has a veth on it
#   control plane a namespace (10.77.0.2) running etcd, kube-apiserver, kube-controller-manager,
#                 kube-scheduler and moto (the STS emulator, :5000)
#   nodes         server-0 and server-1 (10.77.0.10 and .11, labelled imdsgate.io/server-node=true
#                 and tainted: the server's two replicas keep apart) and worker-0 (10.77.0.12):
#                 each a namespace running its own containerd
#                 (Debian's, with runc and the CNI plugins, unpacked into the cache, not installed),
#                 kubelet (cgroupfs, its own root dir and cgroup root), kube-proxy (iptables mode)
#                 and a stand-in for the node's metadata service at 169.254.169.254:80
#   pod network   bridge CNI (cni0) with host-local IPAM on 10.244.<n>.0/24, routes between nodes
#   DNS           CoreDNS (built from the Go module proxy) as kube-dns at 10.96.0.10
#
# containerd and kubelet run in a private mount namespace per node (entered with `nsenter --net`,
# then `unshare --mount`), so their mounts never reach the machine's mount table; /var/lib, /var/log
# and /run are overlays onto the cluster directory inside it. Every image is built locally
# (scripts/cluster-images.sh: pause, CoreDNS, imdsgate from the Dockerfile, a workload with the
# aws-sdk-rust client) and imported into each node's containerd; no registry is used.
#
# Usage: scripts/cluster.sh up|down|status|load [--dir DIR]
#   up      builds what is missing (first run: Kubernetes binaries and images, minutes), starts the
#           cluster, waits until every node is Ready and CoreDNS answers, prints `export KUBECONFIG=…`
#           as its last line. The admin kubeconfig reaches the apiserver through a relay on the
#           machine's loopback.
#   down    stops everything and removes the namespaces, cgroups and DIR (safe to repeat).
#   status  nodes and pods.
#   load    re-imports the images (after rebuilding them) into every node.
# DIR defaults to $IMDSGATE_CLUSTER_DIR or /tmp/imdsgate-cluster; one cluster per DIR. Namespace
# names (imdsgate-cl-<checksum of DIR>-<member>, also in DIR/netns-prefix) and cgroup roots derive
# from DIR, so clusters in distinct directories coexist.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

cmd=${1:-}
[ $# -gt 0 ] && shift
dir=${IMDSGATE_CLUSTER_DIR:-/tmp/imdsgate-cluster}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --dir=*) dir=${1#--dir=}; shift ;;
    *) echo "cluster.sh: unknown argument $1" >&2; exit 64 ;;
  esac
done
case "$dir" in /*) ;; *) dir=$(pwd)/$dir ;; esac
prefix="imdsgate-cl-$(printf %s "$dir" | cksum | cut -d' ' -f1)"
cache=${XDG_CACHE_HOME:-$HOME/.cache}/imdsgate

# Members of the fabric: name, address, pod subnet index (cp has none).
nodes=(server-0 server-1 worker-0)
server_nodes=(server-0 server-1)
declare -A addr=([cp]=10.77.0.2 [server-0]=10.77.0.10 [server-1]=10.77.0.11 [worker-0]=10.77.0.12)
declare -A subnet=([server-0]=0 [server-1]=1 [worker-0]=2)
service_cidr=10.96.0.0/16
cluster_dns=10.96.0.10
sts_port=5000

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: %s\n' "$*" >&2; exit 1; }
ns_of() { echo "$prefix-$1"; }
net_of() { echo "--net=/run/netns/$(ns_of "$1")"; }
in_ns() { local net; net=$(net_of "$1"); shift; nsenter "$net" -- "$@"; }

# Starts a long-lived process detached from this shell, logging to DIR/log/NAME.log.
spawn() {
  local pname=$1
  shift
  setsid "$@" >"$dir/log/$pname.log" 2>&1 </dev/null &
  echo "$! $pname" >>"$dir/pids"
}

wait_until() { # wait_until SECONDS WHAT COMMAND...
  local secs=$1 what=$2 i
  shift 2
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for $what (logs in $dir/log)"
}

# ---------------------------------------------------------------------------------------------
# Prerequisites: Debian packages, the Kubernetes binaries, containerd/runc/CNI unpacked, images.

node_packages() {
  local pkgs=(containerd runc containernetworking-plugins) versions stamp out
  versions=$(for p in "${pkgs[@]}"; do apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}'; done | tr '\n' ' ')
  out="$cache/node-pkgs"
  stamp="$out/root/.stamp"
  if [ -f "$stamp" ] && [ -x "$out/root/usr/bin/containerd" ] && { [ "$versions" = "$(cat "$stamp")" ] || [ "$versions" = "  " ]; }; then
    echo "$out/root"
    return
  fi
  say "unpacking Debian's containerd, runc and CNI plugins into $out (not installed on the machine)"
  rm -rf "$out"
  mkdir -p "$out/debs" "$out/root"
  (cd "$out/debs" && apt-get download "${pkgs[@]}" >/dev/null 2>&1) || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    (cd "$out/debs" && apt-get download "${pkgs[@]}" >/dev/null 2>&1)
  } || die "apt-get download ${pkgs[*]} failed"
  for deb in "$out"/debs/*.deb; do dpkg -x "$deb" "$out/root"; done
  echo "$versions" >"$stamp"
  echo "$out/root"
}

prerequisites() {
  "$here/setup.sh" base >"$dir/k8s-dir" || die "scripts/setup.sh base failed"
  k8s=$("$here/k8s-bins.sh" cluster | tail -n 1)
  local missing=()
  for p in buildah debootstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  pkgroot=$(node_packages)
  images=$(IMDSGATE_K8S_BIN_DIR=$k8s "$here/cluster-images.sh" | tail -n 1)
  venv=${IMDSGATE_VENV:-$root/.venv}
  echo "$k8s" >"$dir/k8s-dir"
  echo "$pkgroot" >"$dir/pkg-dir"
  echo "$images" >"$dir/images-dir"
}

# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs (one CA for the whole cluster).

pki() {
  local p="$dir/pki"
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=imdsgate-cluster-ca" \
    -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  issue "$p" apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:${addr[cp]},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  issue "$p" admin "/O=system:masters/CN=imdsgate-cluster-admin" "extendedKeyUsage=clientAuth"
  issue "$p" apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  issue "$p" controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  issue "$p" scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  issue "$p" kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
  local n
  for n in "${nodes[@]}"; do
    issue "$p" "node-$n" "/O=system:nodes/CN=system:node:$n" "extendedKeyUsage=clientAuth"
  done
}

issue() { # issue DIR NAME SUBJECT EXTENSIONS
  local p=$1 n=$2 subj=$3 ext=$4
  openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$p/$n.key" -out "$p/$n.csr" 2>/dev/null
  openssl x509 -req -in "$p/$n.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' "$ext") -out "$p/$n.crt" 2>/dev/null
  rm -f "$p/$n.csr"
}

kubeconfig() { # kubeconfig FILE SERVER CERTNAME
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: imdsgate
    cluster:
      server: $2
      certificate-authority: $dir/pki/ca.crt
users:
  - name: $3
    user:
      client-certificate: $dir/pki/$3.crt
      client-key: $dir/pki/$3.key
contexts:
  - name: imdsgate
    context: {cluster: imdsgate, user: $3}
current-context: imdsgate
EOF
}

# ---------------------------------------------------------------------------------------------
# Network: the fabric bridge, one namespace per member, routes to every node's pod subnet.

network() {
  local fabric member ns n
  fabric=$(ns_of fabric)
  ip netns add "$fabric"
  ip -n "$fabric" link set lo up
  ip -n "$fabric" link add br0 type bridge
  ip -n "$fabric" link set br0 up
  for member in cp "${nodes[@]}"; do
    ns=$(ns_of "$member")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$fabric" link add "f-$member" type veth peer name eth0 netns "$ns"
    ip -n "$fabric" link set "f-$member" master br0 up
    ip -n "$ns" addr add "${addr[$member]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    for n in "${nodes[@]}"; do
      [ "$n" = "$member" ] && continue
      ip -n "$ns" route add "10.244.${subnet[$n]}.0/24" via "${addr[$n]}"
    done
  done
  for n in "${nodes[@]}"; do
    ns=$(ns_of "$n")
    # Services and anything unknown leave by the fabric (kube-proxy rewrites service addresses first).
    ip -n "$ns" route add default via "${addr[cp]}"
    ip -n "$ns" addr add 169.254.169.254/32 dev lo
    in_ns "$n" sysctl -q -w net.ipv4.ip_forward=1
  done

}

# ---------------------------------------------------------------------------------------------
# Control plane.

control_plane() {
  local p="$dir/pki" k8s
  k8s=$(cat "$dir/k8s-dir")
  mkdir -p "$dir/etcd"
  spawn etcd nsenter "$(net_of cp)" -- "$k8s/etcd" --name=imdsgate --data-dir="$dir/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn
  wait_until 30 etcd in_ns cp bash -c 'exec 3<>/dev/tcp/127.0.0.1/2379'
  spawn kube-apiserver nsenter "$(net_of cp)" -- "$k8s/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=6443 \
    --advertise-address="${addr[cp]}" --cert-dir="$dir/apiserver-certs" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" --kubelet-client-certificate="$p/apiserver-kubelet.crt" \
    --kubelet-client-key="$p/apiserver-kubelet.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range="$service_cidr" --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction --allow-privileged=true \
    --enable-aggregator-routing=true --kubelet-preferred-address-types=InternalIP --profiling=false --v=0
  kubeconfig "$dir/cp-admin.kubeconfig" https://127.0.0.1:6443 admin
  wait_until 90 kube-apiserver in_ns cp "$k8s/kubectl" --kubeconfig="$dir/cp-admin.kubeconfig" get --raw /readyz
  kubeconfig "$dir/controller-manager.kubeconfig" https://127.0.0.1:6443 controller-manager
  kubeconfig "$dir/scheduler.kubeconfig" https://127.0.0.1:6443 scheduler
  spawn kube-controller-manager nsenter "$(net_of cp)" -- "$k8s/kube-controller-manager" \
    --kubeconfig="$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 \
    --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
    --service-cluster-ip-range="$service_cidr" --profiling=false --v=0
  spawn kube-scheduler nsenter "$(net_of cp)" -- "$k8s/kube-scheduler" --kubeconfig="$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig="$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig="$dir/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false --v=0
  # STS for the server's pod.
  spawn moto nsenter "$(net_of cp)" -- "$venv/bin/moto_server" -H "${addr[cp]}" -p "$sts_port"
  # The admin kubeconfig for people and tests: a relay from the machine's loopback into the
  # control plane's namespace over a Unix socket (the machine's network is not touched).
  spawn relay-cp nsenter "$(net_of cp)" -- socat "UNIX-LISTEN:$dir/apiserver.sock,fork,unlink-early" TCP:127.0.0.1:6443
  wait_until 10 "the apiserver relay socket" test -S "$dir/apiserver.sock"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  spawn relay-host socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$dir/apiserver.sock"
  kubeconfig "$dir/kubeconfig" "https://127.0.0.1:$port" admin
  wait_until 20 "the apiserver through the relay" kc get --raw /readyz
}

kc() { "$(cat "$dir/k8s-dir")/kubectl" --kubeconfig="$dir/kubeconfig" "$@"; }

# ---------------------------------------------------------------------------------------------
# Nodes.

cgroup_hierarchies() {
  local h
  for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    [ -f "$h/cgroup.procs" ] && echo "$h"
  done
}

# The kubelet's cgroup root must exist in every hierarchy; cpuset needs its cpus and mems set.
make_cgroup_root() {
  local h cg=$1
  for h in $(cgroup_hierarchies); do
    mkdir -p "$h$cg"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" >"$h$cg/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h$cg/cpuset.mems"
    fi
  done
}

node_files() {
  local n=$1 nd="$dir/nodes/$1" pkg k8s i
  pkg=$(cat "$dir/pkg-dir")
  k8s=$(cat "$dir/k8s-dir")
  i=${subnet[$n]}
  mkdir -p "$nd"/{cni,ipam,kubelet,pod-logs,containerd/root,containerd/state,fake-sysctl} \
    "$nd"/overlay/{varlib,varlog,run}/{upper,work}
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$nd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/imdsgate/pause:3.10"
  enable_selinux = false
  # root here lacks CAP_SYS_RESOURCE, so no process may lower its oom_score_adj below containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$pkg/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$pkg/usr/lib/cni"
    conf_dir = "$nd/cni"
EOF
  cat >"$nd/cni/10-imdsgate.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "imdsgate-cluster",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$nd/ipam",
        "ranges": [[{"subnet": "10.244.$i.0/24", "gateway": "10.244.$i.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  printf 'nameserver %s\nsearch cluster.local\n' "$cluster_dns" >"$nd/resolv.conf"
  # What the kubelet would otherwise write to the machine's kernel (not namespaced): it reads
  # these values instead, from files bound over /proc/sys inside the node's mount namespace.
  echo 1 >"$nd/fake-sysctl/overcommit_memory"
  echo 10 >"$nd/fake-sysctl/panic"
  echo 1 >"$nd/fake-sysctl/panic_on_oops"
  local taints=""
  [[ " ${server_nodes[*]} " == *" $n "* ]] && taints=$'registerWithTaints:\n  - {key: imdsgate.io/server-node, effect: NoSchedule}'
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${addr[$n]}
port: 10250
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
cgroupRoot: /$prefix-$n
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
failCgroupV1: false
protectKernelDefaults: false
containerRuntimeEndpoint: unix://$nd/containerd.sock
clusterDNS: [$cluster_dns]
clusterDomain: cluster.local
resolvConf: $nd/resolv.conf
podLogsDir: $nd/pod-logs
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: Webhook}
# The nodes share the machine's disk: 1% of a large shared disk evicted pods with gigabytes free.
evictionHard: {memory.available: 50Mi, nodefs.available: 256Mi, imagefs.available: 256Mi, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 50
$taints
EOF
  kubeconfig "$nd/kubelet.kubeconfig" "https://${addr[cp]}:6443" "node-$n"
  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $dir/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $n
clusterCIDR: 10.244.0.0/16
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
  # Runs inside the node's network namespace, in a mount namespace of its own.
  cat >"$nd/run.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
export PATH="$pkg/usr/bin:$pkg/usr/sbin:\$PATH"
mount --make-rprivate /
for d in varlib:/var/lib varlog:/var/log run:/run; do
  mount -t overlay overlay -o "lowerdir=\${d#*:},upperdir=$nd/overlay/\${d%%:*}/upper,workdir=$nd/overlay/\${d%%:*}/work" "\${d#*:}"
done
mount --bind "$nd/fake-sysctl/overcommit_memory" /proc/sys/vm/overcommit_memory
mount --bind "$nd/fake-sysctl/panic" /proc/sys/kernel/panic
mount --bind "$nd/fake-sysctl/panic_on_oops" /proc/sys/kernel/panic_on_oops
containerd --config "$nd/containerd.toml" >"$dir/log/containerd-$n.log" 2>&1 &
containerd=\$!
for _ in \$(seq 1 120); do [ -S "$nd/containerd.sock" ] && break; sleep 0.25; done
for tar in "$(cat "$dir/images-dir")"/*.tar; do
  ctr --address "$nd/containerd.sock" -n k8s.io images import "\$tar" >>"$dir/log/images-$n.log" 2>&1
done
"$k8s/kubelet" --config="$nd/kubelet.yaml" --kubeconfig="$nd/kubelet.kubeconfig" \\
  --hostname-override=$n --node-ip=${addr[$n]} --root-dir="$nd/kubelet" --v=1 \\
  >"$dir/log/kubelet-$n.log" 2>&1 &
kubelet=\$!
wait -n \$containerd \$kubelet || true
echo "run.sh: containerd or kubelet exited" >&2
kill \$containerd \$kubelet 2>/dev/null || true
wait
EOF
}

start_node() {
  local n=$1 nd="$dir/nodes/$1" k8s
  k8s=$(cat "$dir/k8s-dir")
  make_cgroup_root "/$prefix-$n"
  spawn "imds-$n" nsenter "$(net_of "$n")" -- python3 "$here/cluster/imds-standin.py" --node "$n"
  spawn "node-$n" nsenter "$(net_of "$n")" -- unshare --mount --propagation private bash "$nd/run.sh"
  spawn "kube-proxy-$n" nsenter "$(net_of "$n")" -- "$k8s/kube-proxy" --config="$nd/kube-proxy.yaml" --v=0
}

coredns() {
  sed -e "s|@COREDNS_VERSION@|$COREDNS_VERSION|g" -e "s|@CLUSTER_DNS@|$cluster_dns|g" \
    "$here/cluster/coredns.yaml" | kc apply -f - >/dev/null
  kc -n kube-system rollout status deployment/coredns --timeout=180s >&2 \
    || die "CoreDNS did not become ready: $(kc -n kube-system describe pods -l k8s-app=kube-dns | tail -20)"
}

up() {
  if [ -e "$dir/pids" ]; then die "$dir holds a cluster already: scripts/cluster.sh down --dir $dir first"; fi
  mkdir -p "$dir/log"
  : >"$dir/pids"
  echo "$prefix" >"$dir/netns-prefix"
  prerequisites
  say "starting the cluster in $dir (namespaces $prefix-*)"
  pki
  network
  control_plane
  kubeconfig "$dir/kube-proxy.kubeconfig" "https://${addr[cp]}:6443" kube-proxy
  local n
  for n in "${nodes[@]}"; do
    node_files "$n"
    start_node "$n"
  done
  for n in "${nodes[@]}"; do
    wait_until 180 "node $n to register" kc get node "$n"
  done
  kc label node "${server_nodes[@]}" imdsgate.io/server-node=true --overwrite >/dev/null
  kc wait --for=condition=Ready node --all --timeout=180s >&2 || die "nodes not Ready: $(kc get nodes -o wide)"
  coredns
  kc get nodes -o wide >&2
  say "up; \`scripts/cluster.sh down --dir $dir\` removes it"
  echo "export KUBECONFIG=$dir/kubeconfig"
}

# ---------------------------------------------------------------------------------------------
# Teardown: processes (by namespace, pid file and cgroup), cgroups, namespaces, the directory.

kill_cgroup_tree() { # kill_cgroup_tree /relative/path
  local h cg=$1 f
  for h in $(cgroup_hierarchies); do
    [ -d "$h$cg" ] || continue
    while read -r f; do
      xargs -r kill -9 <"$f" 2>/dev/null || true
    done < <(find "$h$cg" -name cgroup.procs)
  done
}

remove_cgroup_tree() {
  local h cg=$1
  for h in $(cgroup_hierarchies); do
    [ -d "$h$cg" ] || continue
    find "$h$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  local member ns n pid
  if [ -f "$dir/pids" ]; then
    while read -r pid _; do kill -9 "-$pid" "$pid" 2>/dev/null || true; done <"$dir/pids"
  fi
  for _ in 1 2 3; do
    for member in cp "${nodes[@]}"; do
      ns=$(ns_of "$member")
      [ -e "/run/netns/$ns" ] && { ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; }
    done
    for n in "${nodes[@]}"; do kill_cgroup_tree "/$prefix-$n"; done
    sleep 0.5
  done
  for n in "${nodes[@]}"; do remove_cgroup_tree "/$prefix-$n"; done
  for member in fabric cp "${nodes[@]}"; do
    ns=$(ns_of "$member")
    if [ -e "/run/netns/$ns" ]; then ip netns del "$ns" 2>/dev/null || true; fi
  done
  if mount | grep -q " $dir"; then
    die "mounts under $dir remain in the machine's mount table; not removing it"
  fi
  rm -rf "$dir"
  say "down: $prefix removed"
}

status() {
  [ -f "$dir/kubeconfig" ] || die "no cluster in $dir"
  kc get nodes -o wide
  kc get pods -A -o wide
}

load() {
  local n nd tar pkg
  pkg=$(cat "$dir/pkg-dir")
  for n in "${nodes[@]}"; do
    nd="$dir/nodes/$n"
    for tar in "$(cat "$dir/images-dir")"/*.tar; do
      "$pkg/usr/bin/ctr" --address "$nd/containerd.sock" -n k8s.io images import "$tar" >/dev/null
    done
  done
}

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, cgroups)"
case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  load) load ;;
  *) echo "usage: scripts/cluster.sh up|down|status|load [--dir DIR]" >&2; exit 64 ;;
esac
