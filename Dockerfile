# The wiremesh image: the agent `wiremesh` (the entrypoint) and `meshctl`, on Debian with the
# tools the agent drives (nft, iptables-restore, ip, wireguard-go). Build and push your own:
#   docker build -t REGISTRY/wiremesh:0.1.0 .
# or one image for the amd64 and arm64 nodes a cluster mixes (the other architecture builds under
# QEMU emulation: slow):
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/wiremesh:0.1.0 --push .
# See docs/install.md.

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole package (Cargo.toml names the tests and benches, so cargo wants their files too);
# .dockerignore keeps target/ and .git out.
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nftables iptables wireguard-go wireguard-tools iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/wiremesh /src/target/release/meshctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/wiremesh"]
