#!/usr/bin/env bash
# Builds the static sds-agent binary, the one deploy/Dockerfile ships: a release build for
# x86_64-unknown-linux-musl with the default features, which are every CA backend. The
# Dockerfile runs this script too, so the image build and this build are the same steps.
#
#   bash scripts/static-build.sh           build, print the binary's path and size, check it
#                                          is static
#   bash scripts/static-build.sh --smoke   the same, then run the binary: `version` must name
#                                          every backend, `run` (embedded CA) must become
#                                          ready and exit 0 on SIGTERM with its socket removed
#
# Installs what the build needs when it is missing: the Rust target (rustup) and musl-gcc
# (Debian's musl-tools, as root), which cc-rs uses for aws-lc's C code on this target.
# Honours CARGO_TARGET_DIR. The binary's path is the last line of standard output.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
# The default build of the agent has every backend (agent/Cargo.toml [features] default).
BACKENDS=(embedded istiod vault acm-pca cert-manager)

smoke=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h | --help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "error: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# The Rust standard library for the target.
if ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "installing the Rust target $TARGET" >&2
  rustup target add "$TARGET"
fi

# A C compiler for musl: aws-lc-sys builds aws-lc with cc-rs, which picks musl-gcc for this
# target. (Neither cmake nor clang is needed: aws-lc-sys's cc builder covers this target.)
if ! command -v musl-gcc > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "installing musl-tools (musl-gcc)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends musl-tools > /dev/null
  else
    echo "error: musl-gcc not found: install musl-tools (Debian/Ubuntu: sudo apt-get install musl-tools)" >&2
    exit 1
  fi
fi
command -v readelf > /dev/null || { echo "error: readelf not found (binutils)" >&2; exit 1; }

# The path comes from cargo's own artifact message, so CARGO_TARGET_DIR, build.target-dir
# and the like are followed wherever they point.
bin=$(cargo build --release --locked --target "$TARGET" -p sds-agent --bin sds-agent \
        --message-format=json-render-diagnostics \
      | sed -n 's/.*"executable":"\([^"]*\/sds-agent\)".*/\1/p' | tail -n 1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "error: cargo reported no sds-agent executable" >&2
  exit 1
fi

# Static means no program interpreter (PT_INTERP) and no shared library needed (DT_NEEDED).
# Rust links musl binaries static-pie, so a dynamic section without DT_NEEDED is expected.
if readelf -lW "$bin" | grep -q 'INTERP'; then
  echo "error: $bin has a program interpreter: it is dynamically linked" >&2
  readelf -lW "$bin" | grep -A1 INTERP >&2
  exit 1
fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then
  echo "error: $bin needs shared libraries:" >&2
  readelf -dW "$bin" | grep '(NEEDED)' >&2
  exit 1
fi
size=$(stat -c %s "$bin")
echo "static binary: $bin, $size bytes ($((size / 1024 / 1024)) MiB), no interpreter, no shared libraries" >&2

if [ "$smoke" = 1 ]; then
  version=$("$bin" version)
  echo "$version" >&2
  for b in "${BACKENDS[@]}"; do
    case "$version" in
      *"backends: "*"$b"*) ;;
      *) echo "error: 'sds-agent version' does not name the $b backend" >&2; exit 1 ;;
    esac
  done

  dir=$(mktemp -d)
  pid=
  cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then kill -KILL "$pid" 2> /dev/null || true; fi
    rm -rf "$dir"
  }
  trap cleanup EXIT
  # The agent writes its log; the admin address is read from its "serving SDS" line.
  "$bin" run --socket "$dir/sds/socket" --admin-addr 127.0.0.1:0 --log-format json \
    --trust-domain smoke.test --namespace smoke --service-account smoke \
    > "$dir/log" 2>&1 &
  pid=$!
  admin=
  for _ in $(seq 100); do
    admin=$(sed -n 's/.*"admin":"\([0-9.]*:[0-9]*\)".*/\1/p' "$dir/log" | head -n 1)
    [ -n "$admin" ] && break
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
  done
  ready=
  if [ -n "$admin" ]; then
    for _ in $(seq 100); do
      if curl -fsS -o /dev/null "http://$admin/readyz" 2> /dev/null; then ready=1; break; fi
      sleep 0.1
    done
  fi
  if [ -z "$ready" ] || [ ! -S "$dir/sds/socket" ]; then
    echo "error: the static agent exited, or was not ready with its socket bound within 20 s; its log:" >&2
    cat "$dir/log" >&2
    exit 1
  fi
  # Idle for 1 s, as the figures in docs/image.md are taken. (This also keeps SIGTERM clear of
  # the moment between serving and installing the signal handlers, in which a SIGTERM still
  # kills the agent outright: docs/benchmarks.md, "The static musl build".)
  sleep 1
  rss=$(awk '/^VmRSS:/ { print $2 " " $3 }' "/proc/$pid/status")
  kill -TERM "$pid"
  status=0
  wait "$pid" || status=$?
  pid=
  if [ "$status" != 0 ] || [ -e "$dir/sds/socket" ]; then
    echo "error: after SIGTERM the agent exited $status and its socket is $([ -e "$dir/sds/socket" ] && echo still there || echo gone); its log:" >&2
    cat "$dir/log" >&2
    exit 1
  fi
  echo "smoke: version names every backend; run became ready on $admin (VmRSS $rss), exited 0 on SIGTERM, socket removed" >&2
fi

echo "$bin"
