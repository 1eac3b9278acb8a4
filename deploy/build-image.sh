#!/bin/sh
# Build the discovery image with podman:  deploy/build-image.sh [IMAGE]   (default localhost/discovery:dev)
#
# BASE names the base image (any Debian-like image with python3 >= 3.11 and its venv module).
# By default it is localhost/discovery-base:bookworm, made here with mmdebstrap from Debian's
# packages when it does not exist yet: for machines that reach Debian's mirrors but no image
# registry. With BASE=docker.io/library/python:3.12-slim-bookworm it is pulled as usual.
# When the host's pip has a configuration (/etc/pip.conf, e.g. a proxy's CA), the build's pip
# gets the same, mounted for the build only (never copied into the image).
set -eu
IMAGE=${1:-localhost/discovery:dev}
BASE=${BASE:-localhost/discovery-base:bookworm}
SUITE=${SUITE:-bookworm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PODMAN="podman --runtime runc"   # crun fails on hybrid cgroups (see README)

if ! podman image exists "$BASE"; then
  case "$BASE" in
    localhost/*)
      tarball=$(mktemp --suffix .tar)
      trap 'rm -f "$tarball"' EXIT
      echo "making $BASE with mmdebstrap ($SUITE, python3)" >&2
      mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,libcap2-bin,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$SUITE" "$tarball"
      podman import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
      ;;
    *) podman pull "$BASE" ;;
  esac
fi

set --
if [ -r /etc/pip.conf ]; then
  set -- -v /etc/pip.conf:/etc/pip.conf:ro
  cert=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' /etc/pip.conf | head -n 1)
  if [ -n "$cert" ] && [ -r "$cert" ]; then
    set -- "$@" -v "$cert:$cert:ro"
  fi
fi
revision=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
# --format docker: OCI images have no HEALTHCHECK
$PODMAN build --format docker --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@" \
  --build-arg BASE="$BASE" --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  -t "$IMAGE" "$ROOT"
