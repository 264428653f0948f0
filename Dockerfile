# Multi-stage build: compile in the Rust image, run from a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin rlsproxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin rlsproxy
COPY --from=build /src/target/release/rlsproxy /usr/local/bin/rlsproxy
COPY proxy.toml /etc/rlsproxy/proxy.toml
USER rlsproxy
EXPOSE 6432 9930
ENTRYPOINT ["rlsproxy"]
CMD ["--config", "/etc/rlsproxy/proxy.toml"]
