# Pinned versions of everything the test bed fetches. Sourced by the other scripts; the one place to bump.
K8S_VERSION=v1.34.4     # kube-apiserver and kubectl, built from the Go module proxy
ETCD_VERSION=v3.6.6     # etcd, built from the Go module proxy
COREDNS_VERSION=v1.15.0 # CoreDNS for the cluster tests, built from the Go module proxy
MOTO_VERSION=5.1.22     # moto[server], the STS emulator, in the project's .venv
AWSCLI_VERSION=1.46.3   # aws CLI (botocore) used as a real IMDS client in the end-to-end tests
HELM_VERSION=v3.22.0        # helm, built from the Go module proxy (helm.sh/helm/v3)
PROMETHEUS_VERSION=v0.316.0 # prometheus and promtool, built from the Go module proxy (Go module tag of Prometheus 3.16)
