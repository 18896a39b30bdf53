# One image for both binaries (imdsgate-agent and imdsgate-server).
#
# From source (the default; needs rust:1-bookworm and debian:bookworm-slim):
#   docker build -t imdsgate:0.1.0 .
#
# From binaries already built on the host (`cargo build --release --bins`);
# the rust image is then never pulled and the base image can be any Debian bookworm image:
#   docker build --build-arg BINARIES=prebuilt --build-arg PREBUILT_DIR=target/release -t imdsgate:0.1.0 .
# scripts/cluster-images.sh builds it this way with buildah, for the local test cluster:
#   buildah bud --build-arg BASE_IMAGE=localhost/imdsgate/debian:bookworm-slim \
#     --build-arg BINARIES=prebuilt --build-arg PREBUILT_DIR=target/image ...
#   (target/image: stripped copies of the debug build's binaries)
# Only target/{release,image}/imdsgate-{agent,server} of target/ are in the build context (.dockerignore).
ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm
# Which stage provides /out/imdsgate-agent and /out/imdsgate-server: `source` or `prebuilt`.
ARG BINARIES=source

FROM ${RUST_IMAGE} AS source
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p imdsgate-agent -p imdsgate-server \
 && strip target/release/imdsgate-agent target/release/imdsgate-server \
 && mkdir /out \
 && cp target/release/imdsgate-agent target/release/imdsgate-server /out/

FROM scratch AS prebuilt
# A directory of the build context holding imdsgate-agent and imdsgate-server.
ARG PREBUILT_DIR=target/release
COPY ${PREBUILT_DIR}/imdsgate-agent ${PREBUILT_DIR}/imdsgate-server /out/

# (":-source" repeats the default for buildah 1.28, whose unused-stage skipping ignores ARG defaults.)
FROM ${BINARIES:-source} AS binaries

FROM ${BASE_IMAGE}
# iptables (both nft and legacy backends) for the agent's interception rule.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && for mode in nft legacy; do \
      mkdir -p /usr/local/lib/imdsgate/$mode; \
      for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do \
        ln -s /usr/sbin/${t%%-*}-$mode${t#${t%%-*}} /usr/local/lib/imdsgate/$mode/$t; \
      done; \
    done
COPY --from=binaries /out/imdsgate-agent /out/imdsgate-server /usr/local/bin/
COPY deploy/docker/select-iptables /usr/local/bin/select-iptables
# The server runs as 65532 (set in its Deployment); the agent needs root with NET_ADMIN/NET_RAW.
ENTRYPOINT []
