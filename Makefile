# Conveniences over the scripts the README names.
.PHONY: build up test clean

# invokex-agent is what every sandbox runs (the server finds it next to itself).
build:
	CGO_ENABLED=0 go build -o bin/invokex ./cmd/invokex
	CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o bin/invokex-agent ./cmd/invokex-agent

up:
	./scripts/up.sh

test:
	./scripts/test.sh

clean:
	rm -rf bin

.PHONY: bench bench-qemu kernel
# Benchmarks side by side with Lambda's Runtime Interface Emulator; writes docs/benchmarks.md.
bench: build
	bin/invokex bench --runs 2000 --driver process

# The same suite with every function in a QEMU microVM (docs/benchmarks-qemu.md).
bench-qemu: build
	bin/invokex bench --runs 500 --cold-starts 50 --instances 8 --concurrency 1,8 --driver qemu

# The microVM guest kernel (cached; minutes the first time).
kernel:
	./scripts/build-kernel.sh
