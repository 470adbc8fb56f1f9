#!/usr/bin/env bash
# The main job: build invokex, start the all-in-one server on 127.0.0.1:9000
# with its embedded defaults, deploy the bundled examples, invoke each once,
# print what to try next, and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
mkdir -p bin
CGO_ENABLED=0 go build -o bin/invokex ./cmd/invokex
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o bin/invokex-agent ./cmd/invokex-agent
echo "built bin/invokex and bin/invokex-agent; starting the server (Ctrl-C stops it)" >&2
exec bin/invokex up "$@"
