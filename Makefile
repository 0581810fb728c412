# The two commands of the README.
#   make run   installs what is missing, builds release, serves http://127.0.0.1:2379 (data in ./default.vigil)
#   make test  installs what is missing and runs every test
.PHONY: run test test-again test-sanitized build protos fuzz format format-check robustness

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
	$(MAKE) format-check
	./scripts/docs.sh

# The suite once more on the same build (CI runs it twice: a flaky test shows).
test-again:
	swift test --skip-build

# The code follows .swift-format (swift-format ships with the toolchain).
format:
	swift format -i -r --parallel Sources Tests Benchmarks Examples Fuzz Package.swift

format-check:
	swift format lint -r --strict --parallel Sources Tests Benchmarks Examples Fuzz Package.swift

# The whole suite again under the address sanitizer (CI runs it after `make test`); thread:
# scripts/sanitize.sh thread.
test-sanitized:
	./scripts/install-deps.sh --test
	./scripts/sanitize.sh address

# libFuzzer on every network parser for 60 s each (scripts/fuzz.sh).
fuzz:
	./scripts/install-deps.sh
	./scripts/fuzz.sh 60

protos:
	./scripts/generate-protos.sh

# The robustness suite, every profile (about 12 minutes): seeded traffic against vigil (debug
# build: it has the failpoints), etcd 3.4 and the mirror, with kills, pauses and every failpoint,
# then the validators. A violation prints its seed, failpoint and history window; the history and
# logs go to .build/robustness. More: ROBUSTNESS_ARGS="--rounds 3", "--profiles vigil-kills",
# "--seed 42", "--profiles list". CI runs the short profiles (Tests/RobustnessTests).
robustness:
	./scripts/install-deps.sh --test
	swift build
	.build/debug/vigil-robustness $(ROBUSTNESS_ARGS)
