# Conveniences over the scripts the README names.
.PHONY: build up test clean

build:
	go build -o bin/invokex ./cmd/invokex

up:
	./scripts/up.sh

test:
	./scripts/test.sh

clean:
	rm -rf bin
