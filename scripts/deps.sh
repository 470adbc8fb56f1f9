#!/usr/bin/env bash
# Installs what InvokeX needs on a Debian host, idempotently: the
# interpreters behind the python and nodejs runtimes. Go itself must be
# installed already (see README). Runs as root (the process sandbox needs it).
set -euo pipefail

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v zip >/dev/null 2>&1 || true # not needed: invokex zips itself

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${need[*]}; run as root to install them with apt-get" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  else
    echo "deps: Go 1.26 or newer is required (https://go.dev/doc/install)" >&2
    exit 1
  fi
fi
