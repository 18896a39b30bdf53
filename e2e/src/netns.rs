//! Nodes and pods as network namespaces. A [`NodeNs`] holds the node's own IP on its `eth0`
//! (as a hostNetwork agent sees it) with `ip_forward` on; each [`PodNs`] is joined to it by a veth
//! pair, with the pod's IP and a default route through the node, so traffic from a pod to
//! 169.254.169.254 enters the node namespace where the agent's DNAT rule catches it. Nothing is
//! created in, or changed on, the machine's own network namespace; everything is removed on drop.
//!
//! A pod can also get an IPv6 address ([`NodeNs::add_pod_ipv6`]): its default IPv6 route goes to
//! `fe80::1` on the node end of its veth, so its traffic for `[fd00:ec2::254]` enters the node
//! namespace the same way.
//!
//! Processes in the node namespace reach services on the machine's loopback (the apiserver, the
//! server, moto) through [`NodeNs::forward_to_host`], a socat relay over a Unix socket (the file
//! system is shared between namespaces, the network is not). Its TCP ends run without Nagle's
//! algorithm, as the agent's and server's own sockets do: with it, a gRPC answer's last small
//! frame waited for a delayed ACK in one call of five (40 ms), which no real cluster has.

use crate::process::{ChildGuard, run};
use anyhow::{Context, Result, bail};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Prefix of every namespace the test bed makes; `scripts/test.sh` removes leftovers by it.
pub const NS_PREFIX: &str = "imdsgate-e2e-";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

fn unique_name(role: &str) -> String {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{NS_PREFIX}{}-{n}-{role}", std::process::id())
}

/// A node: a network namespace with the node's IP, the pods joined to it, and relays to the host.
pub struct NodeNs {
    name: String,
    host_ip: Ipv4Addr,
    pods: Mutex<Vec<String>>,
    relays: Mutex<Vec<ChildGuard>>,
    next_pod: AtomicU32,
    dir: TempDir,
}

/// A pod: a network namespace whose `eth0` is a veth peer in its node's namespace.
#[derive(Clone, Debug)]
pub struct PodNs {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_veth: String,
}

impl NodeNs {
    /// Creates a node namespace with `host_ip` on its `eth0` and IPv4 forwarding on.
    pub fn create(host_ip: Ipv4Addr) -> Result<NodeNs> {
        let name = unique_name("node");
        ip(&["netns", "add", &name])?;
        let node = NodeNs {
            name,
            host_ip,
            pods: Mutex::new(Vec::new()),
            relays: Mutex::new(Vec::new()),
            next_pod: AtomicU32::new(0),
            dir: tempfile::Builder::new().prefix("imdsgate-e2e-netns-").tempdir()?,
        };
        let n = node.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        // The node's "uplink": a veth whose peer stays in the namespace (no dummy module needed).
        ip(&["-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink0"])?;
        ip(&["-n", n, "addr", "add", &format!("{host_ip}/32"), "dev", "eth0"])?;
        ip(&["-n", n, "link", "set", "uplink0", "up"])?;
        ip(&["-n", n, "link", "set", "eth0", "up"])?;
        run(Command::new("ip").args(["netns", "exec", n, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// Creates a pod namespace with address `pod_ip`, joined to this node by a veth pair whose node
    /// end is named `veth<N>` (matching a `veth+` host-interface pattern).
    pub fn add_pod(&self, pod_ip: Ipv4Addr) -> Result<PodNs> {
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed);
        let pod = PodNs { name: unique_name(&format!("pod{n}")), ip: pod_ip, host_veth: format!("veth{n}") };
        ip(&["netns", "add", &pod.name])?;
        self.pods.lock().expect("pods lock").push(pod.name.clone());
        let (node, p) = (self.name.as_str(), pod.name.as_str());
        let host_ip = self.host_ip.to_string();
        ip(&["-n", p, "link", "set", "lo", "up"])?;
        ip(&["-n", node, "link", "add", &pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", p])?;
        ip(&["-n", node, "link", "set", &pod.host_veth, "up"])?;
        ip(&["-n", node, "route", "add", &format!("{pod_ip}/32"), "dev", &pod.host_veth])?;
        ip(&["-n", p, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
        ip(&["-n", p, "link", "set", "eth0", "up"])?;
        ip(&["-n", p, "route", "add", &format!("{host_ip}/32"), "dev", "eth0", "scope", "link"])?;
        ip(&["-n", p, "route", "add", "default", "via", &host_ip, "dev", "eth0", "onlink"])?;
        Ok(pod)
    }

    /// Gives `pod` the IPv6 address `pod_ip` too: the node end of its veth gets `fe80::1`, the pod's
    /// default IPv6 route goes through it, and the node routes `pod_ip` back. Both addresses skip
    /// duplicate address detection, so they work at once.
    pub fn add_pod_ipv6(&self, pod: &PodNs, pod_ip: Ipv6Addr) -> Result<()> {
        let (node, p) = (self.name.as_str(), pod.name.as_str());
        ip(&["-n", node, "addr", "add", "fe80::1/64", "dev", &pod.host_veth, "nodad"])?;
        ip(&["-n", node, "route", "add", &format!("{pod_ip}/128"), "dev", &pod.host_veth])?;
        ip(&["-n", p, "addr", "add", &format!("{pod_ip}/128"), "dev", "eth0", "nodad"])?;
        ip(&["-n", p, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
        Ok(())
    }

    /// The IPv6 NAT table of this node's namespace, as `ip6tables -t nat -S` prints it.
    pub fn nat6_rules(&self) -> Result<String> {
        run(self.command("ip6tables").args(["-w", "5", "-t", "nat", "-S"]))
    }

    /// A command that runs `program` inside this node's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(&self.name, program)
    }

    /// Makes `127.0.0.1:<port>` inside the node namespace lead to `127.0.0.1:<port>` on the machine,
    /// so a process in the node namespace reaches the apiserver, the server or moto at the same URL.
    pub async fn forward_to_host(&self, port: u16) -> Result<()> {
        self.forward_into(&self.name.clone(), port).await
    }

    /// The same for one of this node's pods.
    pub async fn forward_to_host_from_pod(&self, pod: &PodNs, port: u16) -> Result<()> {
        self.forward_into(&pod.name, port).await
    }

    async fn forward_into(&self, ns: &str, port: u16) -> Result<()> {
        let socket: PathBuf = self.dir.path().join(format!("relay-{ns}-{port}.sock"));
        let host_side = ChildGuard::spawn(
            "relay (host side)",
            Command::new("socat")
                .arg(format!("UNIX-LISTEN:{},fork", socket.display()))
                .arg(format!("TCP:127.0.0.1:{port},nodelay")),
            &self.dir.path().join(format!("relay-{ns}-{port}-host.log")),
        )?;
        let ns_side = ChildGuard::spawn(
            "relay (namespace side)",
            in_netns(ns, "socat")
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"))
                .arg(format!("UNIX-CONNECT:{}", socket.display())),
            &self.dir.path().join(format!("relay-{ns}-{port}-ns.log")),
        )?;
        self.relays.lock().expect("relays lock").extend([host_side, ns_side]);
        wait_listening_in(ns, port, Duration::from_secs(10)).await
    }

    /// Makes `listen_ip:listen_port` inside the node namespace lead to `127.0.0.1:host_port` on the
    /// machine: a second server replica at another loopback address of the node behind the same
    /// port as the first, say.
    pub async fn forward_to_host_at(
        &self,
        listen_ip: Ipv4Addr,
        listen_port: u16,
        host_port: u16,
    ) -> Result<()> {
        let socket: PathBuf =
            self.dir.path().join(format!("relay-{listen_ip}-{listen_port}-{host_port}.sock"));
        let host_side = ChildGuard::spawn(
            "relay (host side)",
            Command::new("socat")
                .arg(format!("UNIX-LISTEN:{},fork", socket.display()))
                .arg(format!("TCP:127.0.0.1:{host_port},nodelay")),
            &self.dir.path().join(format!("relay-{listen_ip}-{listen_port}-host.log")),
        )?;
        let ns_side = ChildGuard::spawn(
            "relay (namespace side)",
            self.command("socat")
                .arg(format!("TCP-LISTEN:{listen_port},bind={listen_ip},reuseaddr,fork,nodelay"))
                .arg(format!("UNIX-CONNECT:{}", socket.display())),
            &self.dir.path().join(format!("relay-{listen_ip}-{listen_port}-ns.log")),
        )?;
        self.relays.lock().expect("relays lock").extend([host_side, ns_side]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(self.command("ss").args(["-Hltn", &format!("src {listen_ip}:{listen_port}")]))?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {listen_ip}:{listen_port} in {}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The reverse relay: TCP `port` on the node namespace's loopback (the agent's admin port, say)
    /// made reachable from the machine's loopback, at the port returned (for a scraper outside).
    pub async fn expose_on_host(&self, port: u16) -> Result<u16> {
        let socket: PathBuf = self.dir.path().join(format!("expose-{port}.sock"));
        let host_port = crate::process::free_port()?;
        let ns_side = ChildGuard::spawn(
            "expose (namespace side)",
            in_netns(&self.name, "socat")
                .arg(format!("UNIX-LISTEN:{},fork", socket.display()))
                .arg(format!("TCP:127.0.0.1:{port},nodelay")),
            &self.dir.path().join(format!("expose-{port}-ns.log")),
        )?;
        let host_side = ChildGuard::spawn(
            "expose (host side)",
            Command::new("socat")
                .arg(format!("TCP-LISTEN:{host_port},bind=127.0.0.1,reuseaddr,fork,nodelay"))
                .arg(format!("UNIX-CONNECT:{}", socket.display())),
            &self.dir.path().join(format!("expose-{port}-host.log")),
        )?;
        self.relays.lock().expect("relays lock").extend([ns_side, host_side]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", host_port)).is_err() {
            if Instant::now() > deadline {
                bail!("the relay to port {port} in {} does not listen", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(host_port)
    }

    /// Waits until something listens on TCP `port` inside the node namespace.
    pub async fn wait_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        wait_listening_in(&self.name, port, timeout).await
    }

    /// The NAT table of this node's namespace, as `iptables -t nat -S` prints it.
    pub fn nat_rules(&self) -> Result<String> {
        run(self.command("iptables").args(["-w", "5", "-t", "nat", "-S"]))
    }
}

impl PodNs {
    /// A command that runs `program` inside this pod's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(&self.name, program)
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        self.relays.lock().map(|mut r| r.clear()).ok();
        let pods = self.pods.lock().map(|p| p.clone()).unwrap_or_default();
        for pod in pods {
            // Deleting a namespace destroys its veth end, and with it the peer in the node.
            let _ = ip(&["netns", "del", &pod]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Waits until something listens on TCP `port` inside namespace `ns`.
pub async fn wait_listening_in(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = run(in_netns(ns, "ss").args(["-Hltn", &format!("sport = :{port}")]))?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {ns} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn in_netns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args)).with_context(|| format!("ip {}", args.join(" ")))
}
