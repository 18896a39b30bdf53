#!/usr/bin/env bash
# Makes a CA and the server and agent key pairs for imdsgate's mutual TLS, for clusters without
# cert-manager, and writes them as the Kubernetes Secrets the manifests mount
# (imdsgate-server-tls, imdsgate-agent-tls: tls.crt, tls.key, ca.crt).
#
#   scripts/gen-certs.sh [--out DIR] [--namespace NS] [--days N] [--apply]
#
# DIR (default ./imdsgate-certs) receives the PEM files, secrets.yaml and
# webhook-cabundle-patch.json. --apply applies the Secrets and patches the admission webhook's
# caBundle. Keep ca.key offline; re-run before --days runs out.
set -euo pipefail

out=./imdsgate-certs
namespace=imdsgate
days=825
apply=false
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --apply) apply=true; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gen-certs: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done
command -v openssl >/dev/null || { echo "gen-certs: openssl is required" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ec_key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=imdsgate-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

issue() { # name usage san
  local name=$1 usage=$2 san=$3
  ec_key "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$name" -out "$name.csr"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s' \
    "$usage" "$san" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
issue imdsgate-server serverAuth \
  "subjectAltName=DNS:imdsgate-server.$namespace.svc,DNS:imdsgate-server.$namespace.svc.cluster.local,DNS:imdsgate-webhook.$namespace.svc"
issue imdsgate-agent clientAuth ""

b64() { base64 <"$1" | tr -d '\n'; }
secret() { # name cert key
  cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: imdsgate
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$2")
  tls.key: $(b64 "$3")
  ca.crt: $(b64 ca.crt)
YAML
}
{ secret imdsgate-server-tls imdsgate-server.crt imdsgate-server.key; echo '---'; secret imdsgate-agent-tls imdsgate-agent.crt imdsgate-agent.key; } >secrets.yaml
# The admission webhook's caBundle, as a JSON patch for the ValidatingWebhookConfiguration.
printf '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"%s"}]\n' "$(b64 ca.crt)" >webhook-cabundle-patch.json
echo "gen-certs: wrote CA, key pairs, secrets.yaml and webhook-cabundle-patch.json to $(pwd)" >&2
if $apply; then
  kubectl apply -f secrets.yaml
  if kubectl get validatingwebhookconfiguration imdsgate >/dev/null 2>&1; then
    kubectl patch validatingwebhookconfiguration imdsgate --type=json --patch-file=webhook-cabundle-patch.json
  else
    echo "gen-certs: no ValidatingWebhookConfiguration 'imdsgate' yet; run again with --apply after 'kubectl apply -k deploy/...'" >&2
  fi
fi
