#!/usr/bin/env bash
# Installs what the microVM path needs (QEMU, the kernel toolchain and
# Debian's linux-source-6.1, e2fsprogs, debootstrap) and builds the guest
# kernel into the cache (minutes, once). Sourced by test.sh so that the QEMU
# driver's conformance suite and end-to-end tests run for real in CI.
set -euo pipefail
vm_pkgs=(qemu-system-x86 linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev lz4 cpio e2fsprogs debootstrap xz-utils)
missing=()
for p in "${vm_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "vm-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "vm-deps: guest kernel $(CGO_ENABLED=0 go run ./cmd/invokex guest kernel)" >&2
# The Debian roots of the interpreted runtimes the VM tests use (debootstrap,
# minutes once; cached in the guest cache like the kernel).
vm_bin=$(mktemp -d)
trap 'rm -rf "$vm_bin"' EXIT
CGO_ENABLED=0 go build -o "$vm_bin/invokex" ./cmd/invokex
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$vm_bin/invokex-agent" ./cmd/invokex-agent
for rt in python3.11 nodejs18.x; do
  echo "vm-deps: $rt root image $("$vm_bin/invokex" guest runtime build "$rt")" >&2
done
rm -rf "$vm_bin"
trap - EXIT
