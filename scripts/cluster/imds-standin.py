#!/usr/bin/env python3
"""The node's own metadata service in a cluster-test node namespace (169.254.169.254:80).

It answers as EC2 would for the node's instance role, with credentials carrying the markers the
test bed's asker flags (NODEROLEKEY, node-secret, node-imds-token), so a test can tell at once if a
pod ever received the node's role.
"""
import argparse
import json
import secrets
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE = "imdsgate-cluster-node-role"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    parser.add_argument("--listen", default="169.254.169.254")
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, body, ctype="text/plain"):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            if self.path == "/latest/api/token":
                self.reply(200, "node-imds-token-" + secrets.token_urlsafe(16))
            else:
                self.reply(404, "not found")

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/latest/meta-data/iam/security-credentials/":
                self.reply(200, ROLE)
            elif path == "/latest/meta-data/iam/security-credentials/" + ROLE:
                now = datetime.now(timezone.utc)
                doc = {
                    "Code": "Success",
                    "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "NODEROLEKEY" + args.node.upper().replace("-", ""),
                    "SecretAccessKey": "node-secret-" + args.node,
                    "Token": "node-imds-token",
                    "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                self.reply(200, json.dumps(doc), "application/json")
            elif path == "/latest/meta-data/instance-id":
                self.reply(200, "i-" + args.node)
            elif path == "/latest/meta-data/placement/region":
                self.reply(200, "us-east-1")
            elif path == "/latest/dynamic/instance-identity/document":
                self.reply(200, json.dumps({"region": "us-east-1", "instanceId": "i-" + args.node,
                                            "accountId": "123456789012"}), "application/json")
            else:
                self.reply(404, "not found")

        def log_message(self, fmt, *a):
            print("%s %s" % (self.address_string(), fmt % a), flush=True)

    ThreadingHTTPServer((args.listen, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
