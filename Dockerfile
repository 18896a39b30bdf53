# One image for both binaries. Build: docker build -t imdsgate:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p imdsgate-agent -p imdsgate-server \
 && strip target/release/imdsgate-agent target/release/imdsgate-server

FROM debian:bookworm-slim
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
COPY --from=build /src/target/release/imdsgate-agent /src/target/release/imdsgate-server /usr/local/bin/
COPY deploy/docker/select-iptables /usr/local/bin/select-iptables
# The server runs as 65532 (set in its Deployment); the agent needs root with NET_ADMIN/NET_RAW.
ENTRYPOINT []
