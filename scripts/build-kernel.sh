#!/usr/bin/env bash
# Build the microVM guest kernel into the guest cache (once; minutes) and
# print its path. Needs Debian's linux-source-6.1 and a kernel toolchain:
#   apt-get install linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
# The cache is $INVOKEX_CACHE_DIR or /var/cache/invokex; pass --cache-dir to
# choose another, --check to only print the cached kernel's path.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./cmd/invokex guest kernel "$@"
