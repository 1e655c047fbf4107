#!/usr/bin/env bash
# Runs each cargo-fuzz target under fuzz/ for a set time and prints what it did. Not part of
# CI: the targets need the nightly toolchain and the sanitizer build of every dependency.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   default 60 s, every target
#   FUZZ_CMIN=1 bash scripts/fuzz.sh ...                   then minimize each corpus in place
#                                                          (cargo fuzz cmin, set-cover merge)
#                                                          before commit; the seed-* files,
#                                                          which cmin renames, come back from git
#
# Each target starts from and grows its corpus, fuzz/corpus/<target>/ (the committed seeds
# are the files named seed-*). A crash, leak, out-of-memory or timeout is written by libFuzzer
# under fuzz/artifacts/<target>/ (ignored by git), and the target keeps being counted as
# crashed; the other targets still run. Per target it prints executions, executions per
# second, coverage (libFuzzer's cov: edges and ft: features at the end of the run), the
# corpus size in files and bytes, and the artifacts found. Exit 1 if any target crashed.
#
# Installs cargo-fuzz when missing (cargo install --locked). Builds into fuzz/target.
# Per-target logs: fuzz/target/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLCHAIN=+nightly
ALL_TARGETS=(config ca_response sds_request resource_name h2_connection cgroup)
# Per-input limit: longer than any legitimate input (sds_request waits at most ~50 ms),
# short enough that a hang is reported as a timeout artifact within the run.
INPUT_TIMEOUT=25

seconds=60
targets=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
    [0-9]*) seconds=$arg ;;
    *) targets+=("$arg") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "error: cargo fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version > /dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

echo "building the fuzz targets (cargo $TOOLCHAIN fuzz build)" >&2
cargo $TOOLCHAIN fuzz build
mkdir -p fuzz/target/logs

# Artifacts already there before this run, so that only new ones are reported.
count_artifacts() {
  find "fuzz/artifacts/$1" -type f 2> /dev/null | wc -l
}

rows=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  before=$(count_artifacts "$t")
  log="fuzz/target/logs/$t.log"
  echo "fuzzing $t for ${seconds}s (log: $log)" >&2
  status=0
  cargo $TOOLCHAIN fuzz run "$t" -- \
    -max_total_time="$seconds" -timeout="$INPUT_TIMEOUT" -print_final_stats=1 \
    < /dev/null > "$log" 2>&1 || status=$?
  after=$(count_artifacts "$t")

  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # The last status line: "#N DONE cov: C ft: F corp: U/Sb ..." (or the last before a crash).
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<< "$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<< "$last")
  files=$(find "fuzz/corpus/$t" -type f | wc -l)
  bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
  crashes=$((after - before))
  verdict=none
  if [ "$crashes" -gt 0 ] || [ "$status" -ne 0 ]; then
    verdict="$crashes new artifact(s), exit $status: $(grep -m1 -E '^==[0-9]+==|panicked at|^SUMMARY' "$log" || echo see log)"
    failed=1
  fi
  rows+=("| $t | ${execs:-?} | ${rate:-?} | ${cov:-?} | ${ft:-?} | $files files, $bytes B | $verdict |")
done

if [ "${FUZZ_CMIN:-0}" = 1 ]; then
  for t in "${targets[@]}"; do
    echo "minimizing fuzz/corpus/$t" >&2
    # Set-cover merge keeps every feature in fewer files than the default merge (ca_response:
    # 1.35 MB instead of 1.8 MB).
    cargo $TOOLCHAIN fuzz cmin "$t" -- -set_cover_merge=1 < /dev/null \
      > "fuzz/target/logs/$t.cmin.log" 2>&1
    seeds=$(git ls-files "fuzz/corpus/$t/seed-*")
    [ -z "$seeds" ] || git checkout HEAD -- $seeds
    echo "$t: $(find "fuzz/corpus/$t" -type f | wc -l) files, $(du -sb "fuzz/corpus/$t" | cut -f1) B after cmin" >&2
  done
fi

echo
echo "cargo $TOOLCHAIN fuzz, ${seconds}s per target, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
echo
echo "| target | executions | exec/s | cov | ft | corpus | crashes |"
echo "|---|---:|---:|---:|---:|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
