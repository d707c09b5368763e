# The bobbin operator image: a static-ish Rust binary on distroless (CA certificates for wss/https,
# glibc, no shell). Build with any OCI builder: `docker build -t bobbin .` or `buildah bud -t bobbin .`
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tekton ./tekton
COPY crds ./crds
COPY benches ./benches
RUN cargo build --release --locked --bin bobbin

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bobbin /usr/local/bin/bobbin
USER 65532:65532
EXPOSE 6555
ENTRYPOINT ["/usr/local/bin/bobbin"]
CMD ["serve"]
