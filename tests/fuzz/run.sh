#!/usr/bin/env bash
# Builds the fuzz targets (cargo fuzz, on the stable toolchain with RUSTC_BOOTSTRAP=1), replays
# every saved input — regressions/<target>/ and corpus/<target>/ — once, then fuzzes each target
# briefly. Fails (non-zero) on any crash; a crash input is left in artifacts/<target>/.
#
#   tests/fuzz/run.sh                 all targets, FUZZ_TIME (default 10) seconds each
#   tests/fuzz/run.sh keys pipeline   some of them
#   FUZZ_TIME=60 tests/fuzz/run.sh    longer
#   FUZZ_TIME=0 tests/fuzz/run.sh     replay only
#
# Installs what it needs (cargo-fuzz; a C++ compiler for libFuzzer, from Debian). A tool that
# cannot be had is a failure under CI (CI set) and a skip elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR="$PWD"
cd ../..

FUZZ_TIME="${FUZZ_TIME:-10}"
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=(keys target config pipeline); fi
# The stable toolchain: cargo fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov…),
# which RUSTC_BOOTSTRAP=1 makes the stable compiler accept.
export RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}"

missing() {
  if [ -n "${CI:-}" ]; then
    echo "fuzz: FAILED: $1" >&2
    exit 1
  fi
  echo "fuzz: skipped: $1 (a failure under CI)" >&2
  exit 0
}

command -v cargo >/dev/null 2>&1 || missing "cargo is not installed"
if ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
  fi
  command -v c++ >/dev/null 2>&1 || missing "no C++ compiler (c++) to build libFuzzer"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  # In a temporary target dir of cargo's own, not in a CARGO_TARGET_DIR set for the project.
  env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked --quiet \
    || { echo "fuzz: FAILED: cannot install cargo-fuzz" >&2; exit 1; }
  cargo fuzz --version >/dev/null 2>&1 || missing "cargo fuzz does not run after installing it"
fi

fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }

start=$SECONDS
echo "fuzz: building ${TARGETS[*]} ($(cargo fuzz --version), $(rustc --version))"
if [ $# -gt 0 ]; then
  for t in "${TARGETS[@]}"; do fuzz build --fuzz-dir "$FUZZ_DIR" "$t"; done
else
  fuzz build --fuzz-dir "$FUZZ_DIR"
fi
echo "fuzz: built in $((SECONDS - start))s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
# One libFuzzer run; its log is shown only when it fails.
step() {
  local what="$1" t="$2"
  shift 2
  local log="$work/$t.$what.log" t0=$SECONDS
  if fuzz run --fuzz-dir "$FUZZ_DIR" "$t" "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "fuzz: $t $what: ok ($(grep -ao 'Done [0-9]* runs' "$log" | tail -1 | cut -d' ' -f2) runs, $((SECONDS - t0))s)"
  else
    failed=$((failed + 1))
    tail -n 60 "$log"
    echo "fuzz: $t $what: FAILED; the input is in $FUZZ_DIR/artifacts/$t/ — reproduce with" \
      "RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz $t <file>, and keep it in" \
      "tests/fuzz/regressions/$t/ once fixed" >&2
  fi
}

for t in "${TARGETS[@]}"; do
  saved=("$FUZZ_DIR/corpus/$t")
  if [ -d "$FUZZ_DIR/regressions/$t" ] && [ -n "$(ls -A "$FUZZ_DIR/regressions/$t")" ]; then
    saved+=("$FUZZ_DIR/regressions/$t")
  fi
  # -runs=0 with directories: every file in them, once.
  step replay "$t" "${saved[@]}" -- -runs=0 -timeout=10
  if [ "$FUZZ_TIME" -gt 0 ]; then
    # New inputs go to the first directory, a scratch one: the committed corpus stays as it is.
    mkdir -p "$work/corpus-$t"
    step "fuzz ${FUZZ_TIME}s" "$t" "$work/corpus-$t" "${saved[@]}" -- \
      -max_total_time="$FUZZ_TIME" -timeout=10 -print_final_stats=1
  fi
done

echo "fuzz: $passed passed, $failed failed ($((SECONDS - start))s in all)"
[ "$failed" -eq 0 ]
