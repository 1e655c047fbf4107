#!/usr/bin/env bash
# Runs the Vault backend's tests (integration/tests/vault_e2e.rs) against the real
# hashicorp/vault dev container instead of OpenBao. Skips cleanly without Docker.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "skipping: docker not available"
  exit 0
fi
compose=(docker compose -f integration/compose/vault.yaml)
trap '"${compose[@]}" down --volumes >/dev/null 2>&1 || true' EXIT
"${compose[@]}" up -d
for _ in $(seq 60); do
  curl -fsS http://127.0.0.1:8200/v1/sys/health >/dev/null 2>&1 && break
  sleep 1
done
export SDS_TEST_VAULT_ADDR=http://127.0.0.1:8200
export SDS_TEST_VAULT_TOKEN=root
SDS_TEST_VAULT_UNSEAL_KEY=$("${compose[@]}" logs vault | sed -n 's/.*Unseal Key: //p' | head -1 | tr -d '\r')
export SDS_TEST_VAULT_UNSEAL_KEY
cargo build -p sds-agent
# One Vault for all tests: they share its mounts, so run them one at a time.
cargo test -p sds-integration --test vault_e2e -- --test-threads=1
