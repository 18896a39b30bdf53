#!/usr/bin/env bash
# Makes imdsgate's mutual-TLS material for clusters without cert-manager: a CA, the server and
# agent key pairs, and the Kubernetes Secrets the manifests mount (imdsgate-server-tls,
# imdsgate-agent-tls: tls.crt, tls.key, ca.crt).
#
#   scripts/gen-certs.sh [--out DIR] [--namespace NS] [--days N] [--ca-days N] [--apply]
#                        [--rotate-ca start|issue|finish]
#
# DIR (default ./imdsgate-certs) keeps the CA between runs and receives the PEM files, the bundle
# of trusted CAs (ca-bundle.crt: the Secrets' ca.crt and the webhook's caBundle), secrets.yaml and
# webhook-cabundle-patch.json. --apply applies the Secrets and patches the admission webhook's
# caBundle. NS (default imdsgate) is the Secrets' namespace and is in the server certificate's
# names (imdsgate-server.NS.svc, imdsgate-server.NS.svc.cluster.local, imdsgate-webhook.NS.svc):
# give the namespace you install into. --days (default 825) is the validity of the server and
# agent certificates, --ca-days (default 3650) that of a new CA.
#
# Renewal: run it again (with --apply) before the certificates expire. The CA in DIR is kept; only
# the server and agent certificates are issued anew. Both binaries re-read their files when the
# Secrets change, so nothing restarts.
#
# Replacing the CA without breaking running agents, servers or the webhook: three runs, each with
# --apply, waiting between them until every imdsgate pod has the new files (the kubelet updates
# Secret volumes within about a minute, the binaries re-read them within 30 seconds: wait 2
# minutes). At every step each certificate in use is trusted by every peer.
#   --rotate-ca start   a new CA; ca.crt in both Secrets and the webhook's caBundle trust the new
#                       and the old CA; the certificates in use (from the old CA) are kept
#   --rotate-ca issue   the server and agent certificates are issued from the new CA; both CAs
#                       are still trusted
#   --rotate-ca finish  the old CA is no longer trusted
# DIR holds the rotation's state (ca-next.* after start, ca-previous.crt after issue): run all
# three with the same DIR and NS. Keep DIR, with ca.key, offline between runs.
set -euo pipefail

out=./imdsgate-certs
namespace=imdsgate
days=825
ca_days=3650
apply=false
rotate=
usage() { echo "gen-certs: $1 (see --help)" >&2; exit 64; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--namespace|--days|--ca-days|--rotate-ca)
      [ $# -ge 2 ] || usage "$1 needs a value"
      case "$1" in
        --out) out=$2 ;;
        --namespace) namespace=$2 ;;
        --days) days=$2 ;;
        --ca-days) ca_days=$2 ;;
        --rotate-ca) rotate=$2 ;;
      esac
      shift 2 ;;
    --apply) apply=true; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
case "$rotate" in
  ''|start|issue|finish) ;;
  *) usage "--rotate-ca takes start, issue or finish, not '$rotate'" ;;
esac
for n in "$days" "$ca_days"; do
  case "$n" in
    ''|*[!0-9]*) usage "--days and --ca-days take a number of days, not '$n'" ;;
  esac
done
command -v openssl >/dev/null || { echo "gen-certs: openssl is required" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077

die() { echo "gen-certs: $*" >&2; exit 1; }
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

new_ca() { # prefix: writes prefix.key and prefix.crt; each CA has its own name
  ec_key "$1.key"
  openssl req -x509 -new -key "$1.key" -sha256 -days "$ca_days" -subj "/CN=imdsgate-ca-$(openssl rand -hex 4)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.crt"
}

issue() { # ca-prefix name usage san: writes name.key.new and name.crt.new
  local ca=$1 name=$2 usage=$3 san=$4
  ec_key "$name.key.new"
  openssl req -new -key "$name.key.new" -subj "/CN=$name" -out "$name.csr"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n%s\n' \
    "$usage" "$san" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days "$days" -sha256 -extfile "$name.ext" -out "$name.crt.new" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
issue_both() { # ca-prefix
  if ! openssl x509 -checkend $((days * 86400)) -noout -in "$1.crt" >/dev/null; then
    echo "gen-certs: warning: the CA expires within $days days, before the certificates issued now; replace it (--rotate-ca start)" >&2
  fi
  issue "$1" imdsgate-server serverAuth \
    "subjectAltName=DNS:imdsgate-server.$namespace.svc,DNS:imdsgate-server.$namespace.svc.cluster.local,DNS:imdsgate-webhook.$namespace.svc"
  issue "$1" imdsgate-agent clientAuth ""
}
install_leaves() {
  local name
  for name in imdsgate-server imdsgate-agent; do
    mv "$name.key.new" "$name.key"
    mv "$name.crt.new" "$name.crt"
  done
}
verifies() { # ca-file cert
  openssl verify -CAfile "$1" "$2" >/dev/null 2>&1
}

# Where a rotation stands: which step comes next (empty: none under way).
if [ -e ca-next.crt ]; then
  under_way=issue
elif [ -e ca-previous.crt ]; then
  under_way=finish
else
  under_way=
fi
if [ ! -e ca.crt ] || [ ! -e ca.key ]; then
  if [ -e ca.crt ] || [ -e ca.key ] || [ -n "$under_way" ]; then
    die "$(pwd) holds part of a CA (ca.crt, ca.key, ca-next.*, ca-previous.crt); restore it, or use an empty --out"
  fi
  [ -z "$rotate" ] || die "no CA in $(pwd) to rotate; run without --rotate-ca first"
  new_ca ca
  echo "gen-certs: made a new CA" >&2
fi
leaves_missing=false
for f in imdsgate-server.crt imdsgate-server.key imdsgate-agent.crt imdsgate-agent.key; do
  [ -e "$f" ] || leaves_missing=true
done

case "$rotate" in
  '')
    # Renewal (or the first run): certificates from the CA that signs, trust unchanged.
    issue_both ca
    install_leaves
    ;;
  start)
    [ -z "$under_way" ] || die "a CA rotation is under way; its next step is --rotate-ca $under_way"
    if $leaves_missing; then
      die "no server and agent certificates in $(pwd) to keep; run without --rotate-ca first"
    fi
    new_ca ca-next
    echo "gen-certs: made the next CA (ca-next.crt); the certificates in use stay" >&2
    ;;
  issue)
    [ "$under_way" = issue ] || die "--rotate-ca issue follows --rotate-ca start${under_way:+; the next step is --rotate-ca $under_way}"
    issue_both ca-next
    mv ca.crt ca-previous.crt
    rm -f ca.key
    mv ca-next.crt ca.crt
    mv ca-next.key ca.key
    install_leaves
    echo "gen-certs: issued the certificates from the new CA (ca.crt); the old one (ca-previous.crt) is still trusted" >&2
    ;;
  finish)
    [ "$under_way" = finish ] || die "--rotate-ca finish follows --rotate-ca issue${under_way:+; the next step is --rotate-ca $under_way}"
    for f in imdsgate-server.crt imdsgate-agent.crt; do
      verifies ca.crt "$f" || die "$f is not from the new CA; run without --rotate-ca to issue it, apply, wait, then finish"
    done
    rm -f ca-previous.crt
    echo "gen-certs: the old CA is no longer trusted" >&2
    ;;
esac

# What the peers trust: the CA that signs, and during a rotation the other one too (newest first).
{
  if [ -e ca-next.crt ]; then cat ca-next.crt; fi
  cat ca.crt
  if [ -e ca-previous.crt ]; then cat ca-previous.crt; fi
} >ca-bundle.crt
for f in imdsgate-server.crt imdsgate-agent.crt; do
  verifies ca-bundle.crt "$f" || die "$f does not verify against ca-bundle.crt; $(pwd) is inconsistent"
done

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
  ca.crt: $(b64 ca-bundle.crt)
YAML
}
{ secret imdsgate-server-tls imdsgate-server.crt imdsgate-server.key; echo '---'; secret imdsgate-agent-tls imdsgate-agent.crt imdsgate-agent.key; } >secrets.yaml
# The admission webhook's caBundle, as a JSON patch for the ValidatingWebhookConfiguration.
printf '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"%s"}]\n' "$(b64 ca-bundle.crt)" >webhook-cabundle-patch.json
echo "gen-certs: wrote the key pairs, ca-bundle.crt, secrets.yaml and webhook-cabundle-patch.json to $(pwd)" >&2
if $apply; then
  kubectl apply -f secrets.yaml
  if kubectl get validatingwebhookconfiguration imdsgate >/dev/null 2>&1; then
    kubectl patch validatingwebhookconfiguration imdsgate --type=json --patch-file=webhook-cabundle-patch.json
  else
    echo "gen-certs: no ValidatingWebhookConfiguration 'imdsgate' yet; run again with --apply after 'kubectl apply -k deploy/...'" >&2
  fi
fi
case "$rotate" in
  start|issue)
    next=$([ "$rotate" = start ] && echo issue || echo finish)
    echo "gen-certs: step $([ "$rotate" = start ] && echo 1 || echo 2) of 3 done. Once every imdsgate pod has the new files (2 minutes after --apply), run: $0 --out $(pwd) --namespace $namespace --rotate-ca $next --apply" >&2
    ;;
  finish) echo "gen-certs: CA rotation done" >&2 ;;
esac
