"""Stand-in for the node's real EC2 metadata service (which cannot run here): it answers with the
NODE's identity, so a test can tell whether a pod ever reaches it. Serves IMDSv2 tokens, the
node role's credentials, placement facts and user-data. It is deliberately lenient, as a real
service might be: percent-encoding, dot segments, empty segments and case are folded before the
lookup, so any spelling of a node path that got through would be answered.

Usage: fake_imds.py HOST PORT (HOST an IPv4 or IPv6 address). With FAKE_IMDS_RECORD=FILE set, the
request target of every request it receives (before any parsing) is appended to FILE, one per
line, so a test can prove what reached it."""
import http.server
import json
import os
import posixpath
import socket
import sys
import threading
import urllib.parse

NODE_TOKEN = "node-imds-token"
ROUTES = {
    "/latest/meta-data/placement/region": "us-east-1",
    "/latest/meta-data/placement/availability-zone": "us-east-1a",
    "/latest/meta-data/instance-id": "i-0123456789abcdef0",
    "/latest/meta-data/iam/security-credentials/": "node-role",
    "/latest/meta-data/iam/security-credentials/node-role": json.dumps({
        "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "NODEROLEKEY",
        "SecretAccessKey": "node-secret", "Token": "node-token",
        "LastUpdated": "2026-01-01T00:00:00Z", "Expiration": "2099-01-01T00:00:00Z"}),
    "/latest/user-data": "#!/bin/sh\necho node-secret-user-data\n",
}
RECORD = os.environ.get("FAKE_IMDS_RECORD")
RECORD_LOCK = threading.Lock()


def lenient(target):
    """The path a forgiving server would look up for a request target."""
    parts = urllib.parse.urlsplit(target)
    path = urllib.parse.unquote(parts.path).replace("\\", "/").lower()
    trailing = path.endswith("/")
    path = posixpath.normpath("/" + path.lstrip("/"))
    if trailing and path != "/":
        path += "/"
    return path


class Handler(http.server.BaseHTTPRequestHandler):
    def parse_request(self):
        ok = super().parse_request()
        if RECORD and getattr(self, "path", None) is not None:
            with RECORD_LOCK, open(RECORD, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{self.command} {self.path}\n")
        return ok

    def do_PUT(self):
        if lenient(self.path) == "/latest/api/token":
            self.reply(200, NODE_TOKEN)
        else:
            self.reply(404, "not found")

    def do_GET(self):
        path = lenient(self.path)
        if self.headers.get("X-aws-ec2-metadata-token") not in (None, NODE_TOKEN):
            self.reply(401, "bad token")
        elif path in ROUTES:
            self.reply(200, ROUTES[path])
        else:
            self.reply(404, "not found")

    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-imds: " + (fmt % args) + "\n")


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET


Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
