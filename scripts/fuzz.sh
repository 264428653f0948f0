#!/usr/bin/env bash
# Runs each cargo-fuzz target for FUZZ_SECONDS (default 60) starting from the
# small committed seed corpus in fuzz/corpus/<target>; new inputs go to a
# temp dir, so the committed corpus stays small. A crash is saved under
# fuzz/artifacts/<target>/ and fails the script: turn it into a unit test.
#
#   scripts/fuzz.sh                 # all targets: startup framing jwt
#   FUZZ_SECONDS=10 scripts/fuzz.sh jwt
#
# cargo-fuzz passes -Z flags to rustc. This machine has only a stable
# toolchain, and RUSTC_BOOTSTRAP=1 lets it accept them (libFuzzer builds
# work that way). The proxy forbids unsafe code, so the default sanitizer is
# none (panics and failed assertions are what we look for, and the build is
# much faster); FUZZ_SANITIZER=address turns ASan on.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(startup framing jwt); fi

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

cargo fuzz build -s "$sanitizer"
for target in "${targets[@]}"; do
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "fuzzing $target for $seconds s" >&2
    cargo fuzz run -s "$sanitizer" "$target" "$work" "$root/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    rm -rf "$work"
    trap - EXIT
done
