#!/usr/bin/env bash
# Runs the Vault backend's tests (integration/tests/vault_e2e.rs) and the OpenBao harness's
# own tests (integration/tests/openbao_harness.rs) against the real hashicorp/vault dev
# container of vault.yaml instead of an OpenBao dev server. Skips cleanly without Docker.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1 \
  || ! docker compose version >/dev/null 2>&1; then
  echo "skipping: docker not available"
  exit 0
fi
compose=(docker compose -f integration/compose/vault.yaml)
trap '"${compose[@]}" down --volumes >/dev/null 2>&1 || true' EXIT
"${compose[@]}" up -d

addr=http://127.0.0.1:8200
healthy=
for _ in $(seq 60); do
  if curl -fsS "$addr/v1/sys/health" >/dev/null 2>&1; then healthy=1; break; fi
  sleep 1
done
if [ -z "$healthy" ]; then
  echo "vault did not answer $addr/v1/sys/health within 60 s" >&2
  "${compose[@]}" logs vault >&2 || true
  exit 1
fi

# The dev server prints its unseal key in its banner; the seal/unseal tests need it.
key=
for _ in $(seq 10); do
  key=$("${compose[@]}" logs vault 2>/dev/null | sed -n 's/.*Unseal Key: //p' | head -1 | tr -d '\r ')
  [ -n "$key" ] && break
  sleep 1
done
if [ -z "$key" ]; then
  echo "no 'Unseal Key:' in the vault container's log" >&2
  exit 1
fi

export SDS_TEST_VAULT_ADDR="$addr"
export SDS_TEST_VAULT_TOKEN=root
export SDS_TEST_VAULT_UNSEAL_KEY="$key"
# The external Vault stands in for bao: these tests must not skip.
export SDS_AGENT_REQUIRE_BAO=1
cargo build -p sds-agent
# One Vault for all tests: they share its mounts and one of them seals it, so run them one
# at a time.
cargo test -p sds-integration --test vault_e2e --test openbao_harness -- --test-threads=1
