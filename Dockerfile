# ociedge container image: multi-stage build, small non-root runtime.
# Build:  docker build -t ociedge .
# Run:    docker run -p 5000:5000 -v ociedge-data:/var/lib/ociedge ociedge
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The same build command as the README.
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/ociedge ociedge \
    && mkdir -p /var/lib/ociedge /etc/ociedge && chown ociedge /var/lib/ociedge
COPY --from=build /src/target/release/ociedge /usr/local/bin/ociedge
COPY config/container.yaml /etc/ociedge/ociedge.yaml
USER ociedge
WORKDIR /var/lib/ociedge
VOLUME ["/var/lib/ociedge", "/etc/ociedge"]
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:5000/healthz || exit 1
ENTRYPOINT ["ociedge"]
CMD ["serve", "--config", "/etc/ociedge/ociedge.yaml"]
