# discovery: DNS service discovery (DNS responder + HTTP registration API) in one process.
#
#   docker build -t discovery .
#   docker run --rm -p 53:53/udp -p 53:53/tcp -p 8080:8080 discovery
#
# The base image is a build argument: any Debian-like image with python3 (>= 3.11) and its venv
# module. Without a registry, make one locally (README, "Container image"):
#   podman build --build-arg BASE=localhost/debian-python:bookworm -t discovery .
ARG BASE=docker.io/library/python:3.12-slim-bookworm

# Stage 1: build the wheel and install it with its dependencies into a virtual environment.
FROM ${BASE} AS build
WORKDIR /src
# A C compiler (and the Python headers where the base lacks them) for the recvmmsg extension;
# without them the wheel is built without it and the image reads UDP with the pure-Python loop.
RUN headers='import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; \
    if ! command -v cc >/dev/null || ! python3 -c "$headers"; then \
      { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev \
             $(python3 -c "$headers" || echo python3-dev) \
        && rm -rf /var/lib/apt/lists/*; } \
      || echo "no C compiler: the image reads UDP with the pure-Python loop" >&2; \
    fi
COPY pyproject.toml README.md LICENSE ./
COPY discovery ./discovery
RUN python3 -m venv /opt/discovery \
 && /opt/discovery/bin/pip install --no-cache-dir --quiet --upgrade pip \
 && /opt/discovery/bin/pip wheel --no-cache-dir --quiet --wheel-dir /wheels . \
 && /opt/discovery/bin/pip install --no-cache-dir --quiet --no-index --find-links /wheels discovery \
 && /opt/discovery/bin/pip uninstall --quiet --yes pip \
 && find /opt/discovery -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/discovery/bin/python -m compileall -q /opt/discovery/lib

# Stage 2: the runtime: the same base (the venv links to its interpreter), the venv, no build tools.
FROM ${BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="discovery" \
      org.opencontainers.image.description="DNS service discovery: HTTP registration with TTL leases, answers over DNS" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/discovery"

# Port 53 without root: the interpreter gets CAP_NET_BIND_SERVICE as a file capability (the
# alternative, without setcap: run with --sysctl net.ipv4.ip_unprivileged_port_start=53).
RUN command -v setcap >/dev/null \
    || { apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libcap2-bin \
         && rm -rf /var/lib/apt/lists/*; } \
 && echo 'discovery:x:10053:10053:discovery:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'discovery:x:10053:' >> /etc/group
COPY --from=build /opt/discovery /opt/discovery
RUN setcap cap_net_bind_service=+ep "$(readlink -f /opt/discovery/bin/python3)"

ENV PATH=/opt/discovery/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISCOVERY_DNS=0.0.0.0:53 \
    DISCOVERY_HTTP=0.0.0.0:8080
USER 10053:10053
EXPOSE 53/udp 53/tcp 8080/tcp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/discovery/bin/python3", "-c", "import os, urllib.request; port = os.environ.get('DISCOVERY_HTTP', '0.0.0.0:8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2)"]
ENTRYPOINT ["/opt/discovery/bin/discovery"]
CMD ["serve"]
