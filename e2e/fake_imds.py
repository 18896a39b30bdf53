"""Stand-in for the node's real EC2 metadata service (which cannot run here): it answers with the
NODE's identity, so a test can tell whether a pod ever reaches it. Serves IMDSv2 tokens, the
node role's credentials, placement facts and user-data. Usage: fake_imds.py HOST PORT"""
import http.server
import json
import sys

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


class Handler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        if self.path == "/latest/api/token":
            self.reply(200, NODE_TOKEN)
        else:
            self.reply(404, "not found")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") not in (None, NODE_TOKEN):
            self.reply(401, "bad token")
        elif self.path in ROUTES:
            self.reply(200, ROUTES[self.path])
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


http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
