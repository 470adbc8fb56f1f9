#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the driver and store conformance
# suites, and the end-to-end tests (a real server, the real AWS SDK, real
# aws-lambda-go, python and node functions). Installs what tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
if [ "$(id -u)" -eq 0 ]; then
  source scripts/vm-deps.sh
fi
go vet ./...
go test -count=1 -timeout 60m ./... "$@"
