# The two commands of the README.
#   make run   installs what is missing, builds release, serves http://127.0.0.1:2379 (data in ./default.vigil)
#   make test  installs what is missing and runs every test
.PHONY: run test build protos

run:
	./scripts/install-deps.sh
	swift build -c release --product vigil
	.build/release/vigil --data-dir default.vigil --listen-client-urls http://127.0.0.1:2379

build:
	./scripts/install-deps.sh
	swift build

test:
	./scripts/install-deps.sh --test
	swift build
	swift test

protos:
	./scripts/generate-protos.sh
