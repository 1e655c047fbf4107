//! The Kubernetes manifests in `deploy/kubernetes`, rendered and checked offline.
//!
//! Every directory there with a `kustomization.yaml` (the base, each overlay under
//! `overlays/`, the optional `monitoring/`, the examples under `examples/`) is found by walking
//! the tree, not listed here. Each is rendered with `kubectl kustomize` (`KUBECTL_BIN`, else
//! `kubectl` on `PATH`: `scripts/test.sh` unpacks Debian 12's kubectl 1.20, whose built-in
//! kustomize is the oldest the manifests promise to work with) and validated with
//! `kubernetes-validate --strict` (`KUBERNETES_VALIDATE_BIN`; unknown fields fail) against the
//! API schemas of the oldest Kubernetes the manifests support (1.29, native sidecars on by
//! default) and of later ones.
//! kubernetes-validate knows only the built-in kinds; the Prometheus Operator's PodMonitor is
//! the one custom kind allowed, and its fields are checked here by hand.
//!
//! What the schemas cannot say is then checked on the parsed objects, for every pod template
//! of every overlay: the agent is a native sidecar; every container runs as non-root with a
//! read-only root filesystem, no privilege escalation, no capabilities and the runtime's
//! seccomp profile; the socket's emptyDir is mounted in the agent and in Envoy, Envoy's
//! bootstrap (the copy of `deploy/envoy/sidecar.yaml`) dials the very path the agent listens
//! on, and Envoy passes both the socket's mode and the agent's own check of its caller
//! (`SO_PEERCRED` against `--allowed-uids`/`--allowed-gids`); every `SDS_AGENT_*` variable is a
//! flag of the built agent's `run --help`; every file a variable names is on a volume, and each
//! projected token carries the audience its flag expects; the probes and Prometheus point at
//! the status port and never at the admin port; resources are set; the backend is the
//! overlay's, with what that backend needs (IRSA, RBAC equal to `deploy/cert-manager/rbac.yaml`,
//! the Istio root ConfigMap). Finally the agent's own `validate` reads each overlay's
//! environment, as kubelet would hand it over, and must accept it.
//!
//! `examples/workload-api` has no Envoy, so the Envoy checks are not applied to it; it gets
//! its own: the same hardening, resources, pinned images, flags, Downward API, probes and
//! files as the overlays, and the Workload API's wiring. The agent serves it
//! (`SDS_AGENT_WORKLOAD_API_SOCKET`) on an emptyDir, the SDS socket is on another that only the
//! agent mounts, spiffe-helper's `agent_address` (read from its ConfigMap, whose keys must be
//! spiffe-helper's) is that very file through spiffe-helper's own mount of that volume, no
//! other container mounts it, and spiffe-helper passes the socket's mode and the agent's caller
//! check; `validate` with the pod's environment resolves that socket and, by its own reading,
//! admits spiffe-helper's uid. `other-clients.yaml` there is merged into the example the way an
//! overlay would merge it, and its linkerd2-proxy and go-spiffe settings are held to the same
//! wiring, each client's address read in that client's own syntax.
//!
//! Node mode (`node/`, and the chart's `mode: node`) is held by one helper to the same
//! hardening, with its deliberate exceptions written down there and allowed nowhere else:
//! `hostPID` (the callers' real pids), the hostPath socket directory, and one init container
//! that runs as root with CAP_CHOWN alone to hand that directory to the agent's uid. Beyond
//! them: a non-root agent under a uid no workload commonly uses, the node's name and kubelet
//! from the Downward API, no per-pod identity or caller-uid settings, a 0666 socket, `get` on
//! nodes/pods or nodes/proxy (and no more on any nodes/ subresource) bound to the agent's
//! account, the backend's needs cluster-wide; `node/workload` mounts that very directory
//! read-only in Envoy, whose bootstrap dials the socket.
//!
//! The Helm chart (`deploy/helm/sds-agent`, `HELM_BIN`) is linted with `helm lint --strict`
//! and rendered with `helm template` with its defaults and every value set in its `ci/`,
//! validated like the kustomize output, then checked: node mode as above, pod mode (no pod;
//! the agent's settings, the Envoy bootstrap, the cert-manager Role) with `validate`
//! accepting the settings as a pod would run them. Its `values.schema.json` is shown to refuse
//! bad values, each named in helm's message.
//!
//! The checks are shown to fail: a broken kustomization, an unknown field, a kind without a
//! schema, and a pod, DaemonSet or node workload weakened in each checked way are all refused.
//!
//! Until the agent has node mode's flags, the node-mode tests fail on exactly the variables
//! that name them (reported apart, [`NODE_MODE_FLAGS`]), and `validate` refuses the node-mode
//! environment.
//!
//! Without kubectl or kubernetes-validate these tests print a line and pass, unless
//! `SDS_AGENT_REQUIRE_KUBECTL=1` (set by `scripts/test.sh`); the chart's, without helm, unless
//! `SDS_AGENT_REQUIRE_HELM=1`. They need the agent binary: `cargo build -p sds-agent`.

// Test code, helpers included (clippy's allow-unwrap-in-tests covers only `#[test]` bodies):
// a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use sds_integration::process::{agent_bin, find_program};
use serde_norway::Value;

/// Kubernetes versions whose schemas every rendering must pass: the oldest the manifests
/// support (1.29: native sidecars on by default), the first with native sidecars GA, and the
/// newest kubernetes-validate 1.37.0 ships.
const KUBERNETES_VERSIONS: [&str; 3] = ["1.29", "1.33", "1.37"];

/// Custom kinds a rendering may hold: kubernetes-validate has no schema for them, so it only
/// warns, and they are checked by hand ([`check_pod_monitor`]).
const CUSTOM_KINDS: [(&str, &str); 1] = [("monitoring.coreos.com/v1", "PodMonitor")];

/// Every overlay the docs promise, with the `--ca` it must select.
const OVERLAYS: [(&str, &str); 6] = [
    ("embedded", "embedded"),
    ("vault", "vault"),
    ("acm-pca", "acm-pca"),
    ("cert-manager", "cert-manager"),
    ("istiod", "istiod"),
    ("istio-csr", "istiod"),
];

/// The SDS socket: istio-agent's path, which the bootstrap names relative to `/`.
const SOCKET: &str = "/var/run/secrets/workload-spiffe-uds/socket";

/// The audience each token-file flag's token must carry.
const TOKEN_AUDIENCES: [(&str, &str); 2] = [
    // istiod and istio-csr accept `istio-ca` unless configured otherwise.
    ("SDS_AGENT_CA_TOKEN_FILE", "istio-ca"),
    // The Vault role's `audience`, as docs/deploying.md sets it.
    ("SDS_AGENT_VAULT_JWT_FILE", "vault"),
];

/// The sockets the agent creates itself: an emptyDir is where they belong.
const AGENT_SOCKETS: [&str; 2] = ["SDS_AGENT_SOCKET", "SDS_AGENT_WORKLOAD_API_SOCKET"];

/// The workload without Envoy that takes its identity from the agent's Workload API, through
/// spiffe-helper.
const WORKLOAD_API_EXAMPLE: &str = "examples/workload-api";

/// In that directory, outside its kustomization: a patch adding linkerd2-proxy and a go-spiffe
/// program as further Workload API clients.
const OTHER_CLIENTS: &str = "other-clients.yaml";

/// spiffe-helper's configuration keys (spiffe/spiffe-helper: cmd/spiffe-helper/config/config.go,
/// the health checks and hint from README.md). It refuses to start on any other key.
const SPIFFE_HELPER_KEYS: [&str; 20] = [
    "add_intermediates_to_bundle",
    "agent_address",
    "cmd",
    "cmd_args",
    "pid_file_name",
    "cert_dir",
    "cert_file_mode",
    "key_file_mode",
    "jwt_bundle_file_mode",
    "jwt_svid_file_mode",
    "include_federated_domains",
    "renew_signal",
    "daemon_mode",
    "svid_file_name",
    "svid_key_file_name",
    "svid_bundle_file_name",
    "jwt_svids",
    "jwt_bundle_file_name",
    "health_checks",
    "hint",
];

/// Where kube clients look for in-cluster credentials.
const IN_CLUSTER_CREDENTIALS: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The agent's largest resident memory measured on a release build (docs/deploying.md#resources:
/// 17.3 MiB, glibc, the acm-pca client), rounded up: its memory request must not be below it.
const MEASURED_PEAK_RSS: u64 = 18 * MIB;

const MIB: u64 = 1024 * 1024;

// What the Downward API hands the agent in these tests.
const SAMPLE_NAMESPACE: &str = "payments";
const SAMPLE_POD_NAME: &str = "sds-demo-7c9d8-x2x4q";
const SAMPLE_POD_UID: &str = "0d3c2b1a-1111-4222-8333-444455556666";
const SAMPLE_NODE_NAME: &str = "worker-3";
const SAMPLE_HOST_IP: &str = "10.0.3.17";
/// The node-mode manifests: the agent's DaemonSet, and a workload it serves.
const NODE: &str = "node";
const NODE_WORKLOAD: &str = "node/workload";

/// The Helm chart, from the repository's root; its `ci/` holds the value sets the tests use.
const CHART: &str = "deploy/helm/sds-agent";

/// The node agent's init container that hands the host socket directory to the agent's uid:
/// the one container allowed to run as root, and only with CAP_CHOWN.
const SOCKET_DIR_INIT: &str = "socket-dir";

/// What [`check_security`] says of `socket-dir` that its deliberate exception allows.
const SOCKET_DIR_EXCEPTIONS: [&str; 3] = [
    "runAsNonRoot must be true",
    "runAsUser must be set and not 0",
    "capabilities must drop ALL and add none",
];

/// Settings that name one pod's identity or the uids allowed to call: never in node mode,
/// where each caller's identity comes from attestation.
const PER_POD_SETTINGS: [&str; 6] = [
    "SDS_AGENT_NAMESPACE",
    "SDS_AGENT_SERVICE_ACCOUNT",
    "SDS_AGENT_POD_NAME",
    "SDS_AGENT_POD_UID",
    "SDS_AGENT_ALLOWED_UIDS",
    "SDS_AGENT_ALLOWED_GIDS",
];

/// Uids that workloads commonly run as (distroless `nonroot`, `nobody`, Istio's proxy): the
/// node agent, sharing the host's PID namespace, must not be one of them.
const COMMON_WORKLOAD_UIDS: [u64; 3] = [65532, 65534, 1337];

/// The node-mode flags (issue 18); until the agent built here has them, the tests report the
/// variables that name them apart from every other problem.
const NODE_MODE_FLAGS: [&str; 13] = [
    "SDS_AGENT_MODE",
    "SDS_AGENT_NODE_NAME",
    "SDS_AGENT_KUBELET_HOST",
    "SDS_AGENT_KUBELET_PORT",
    "SDS_AGENT_KUBELET_READ_ONLY_PORT",
    "SDS_AGENT_KUBELET_CA",
    "SDS_AGENT_KUBELET_TOKEN_FILE",
    "SDS_AGENT_KUBELET_SKIP_TLS_VERIFY",
    "SDS_AGENT_KUBELET_POLL_INTERVAL",
    "SDS_AGENT_KUBELET_MAX_ATTEMPTS",
    "SDS_AGENT_PROC_ROOT",
    "SDS_AGENT_CA_CONCURRENCY",
    "SDS_AGENT_IDENTITY_IDLE_TIMEOUT",
];

// ---------------------------------------------------------------------------------------------
// The tests

/// Every kustomization renders, and its output passes strict schema validation for every
/// version in [`KUBERNETES_VERSIONS`]; the promised overlays are all there.
#[test]
fn every_kustomization_renders_and_passes_strict_validation() {
    let Some(tools) = Tools::find() else { return };
    let dirs = kustomizations();
    let names: BTreeSet<String> = dirs.iter().map(|d| relative(d)).collect();
    for expected in [
        "base",
        "monitoring",
        WORKLOAD_API_EXAMPLE,
        NODE,
        NODE_WORKLOAD,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(OVERLAYS.iter().map(|(o, _)| format!("overlays/{o}")))
    {
        assert!(
            names.contains(&expected),
            "no kustomization in deploy/kubernetes/{expected}; found {names:?}"
        );
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for dir in &dirs {
        let result = tools
            .render(dir)
            .and_then(|yaml| tools.validate(&yaml, scratch.path()));
        match result {
            Ok(passed) => eprintln!("{}: {passed} resource validations passed", relative(dir)),
            Err(e) => failures.push(format!("{}: {e}", relative(dir))),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The semantic checks of the module doc, on every overlay.
#[test]
fn every_overlay_wires_the_sidecar_safely_for_its_backend() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let rbac =
        parse_docs(&std::fs::read_to_string(repo().join("deploy/cert-manager/rbac.yaml")).unwrap())
            .unwrap();
    let overlays = overlays();
    assert!(
        !overlays.is_empty(),
        "no overlays found under deploy/kubernetes/overlays"
    );
    let mut failures = Vec::new();
    for dir in &overlays {
        let docs = parse_docs(&tools.render(dir).unwrap()).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let problems = check_overlay(&name, &docs, &flags, &rbac);
        if problems.is_empty() {
            eprintln!("{}: ok", relative(dir));
        } else {
            failures.push(format!("{}:\n  {}", relative(dir), problems.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `sds-agent validate`, given exactly the environment kubelet would give the agent container
/// of each overlay (Downward API fields filled with sample values), accepts it and resolves the
/// identity, backend, socket and listeners the manifests mean.
#[test]
fn the_agent_accepts_every_overlays_configuration() {
    let Some(tools) = Tools::find() else { return };
    let bin = agent_bin().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // The cert-manager backend refuses to start outside a pod without a kubeconfig; the test
    // gives it one that points nowhere (validate does not connect).
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    let mut failures = Vec::new();
    for dir in overlays() {
        let docs = parse_docs(&tools.render(&dir).unwrap()).unwrap();
        for pod in pod_templates(&docs) {
            let Some(agent) = container(pod.spec, "sds-agent") else {
                failures.push(format!(
                    "{}: {}: no sds-agent container",
                    relative(&dir),
                    pod.owner
                ));
                continue;
            };
            let mut env = match kubelet_env(pod.spec, agent) {
                Ok(env) => env,
                Err(e) => {
                    failures.push(format!("{}: {e}", relative(&dir)));
                    continue;
                }
            };
            if env.get("SDS_AGENT_CA").map(String::as_str) == Some("cert-manager") {
                env.insert(
                    "SDS_AGENT_KUBECONFIG".into(),
                    kubeconfig.display().to_string(),
                );
            }
            let out = Command::new(&bin)
                .arg("validate")
                .env_clear()
                .envs(&env)
                .current_dir(scratch.path())
                .output()
                .unwrap();
            if !out.status.success() {
                failures.push(format!(
                    "{}: sds-agent validate refused the environment {env:?} ({}): {}",
                    relative(&dir),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
                continue;
            }
            let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let sa = pod.spec["serviceAccountName"].as_str().unwrap_or("default");
            let td = env
                .get("SDS_AGENT_TRUST_DOMAIN")
                .map_or("cluster.local", String::as_str);
            let expected = [
                (
                    "spiffe-id",
                    format!("spiffe://{td}/ns/{SAMPLE_NAMESPACE}/sa/{sa}"),
                ),
                ("socket", SOCKET.to_owned()),
                (
                    "socket-mode",
                    env.get("SDS_AGENT_SOCKET_MODE")
                        .cloned()
                        .unwrap_or_default(),
                ),
                ("admin-addr", "127.0.0.1:15020".to_owned()),
                ("status-addr", "0.0.0.0:15021".to_owned()),
                ("log-format", "json".to_owned()),
            ];
            for (key, want) in expected {
                if resolved[key].as_str() != Some(want.as_str()) {
                    failures.push(format!(
                        "{}: validate resolved {key} = {}, not {want:?}",
                        relative(&dir),
                        resolved[key]
                    ));
                }
            }
            let backend = resolved["ca"]["backend"].as_str().unwrap_or_default();
            if Some(backend) != env.get("SDS_AGENT_CA").map(String::as_str) {
                failures.push(format!(
                    "{}: validate resolved the backend {backend:?}",
                    relative(&dir)
                ));
            }
            if backend == "cert-manager"
                && (resolved["ca"]["pod-name"] != SAMPLE_POD_NAME
                    || resolved["ca"]["pod-uid"] != SAMPLE_POD_UID)
            {
                failures.push(format!(
                    "{}: the cert-manager backend does not get the pod's name and UID: {}",
                    relative(&dir),
                    resolved["ca"]
                ));
            }
            eprintln!(
                "{}: sds-agent validate: {} for {}",
                relative(&dir),
                backend,
                resolved["spiffe-id"]
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The base's Envoy bootstrap is `deploy/envoy/sidecar.yaml`, byte for byte, and that is what
/// the rendered ConfigMap holds: the two cannot drift.
#[test]
fn the_envoy_bootstrap_is_deploy_envoy_sidecar_yaml() {
    let original = std::fs::read_to_string(repo().join("deploy/envoy/sidecar.yaml")).unwrap();
    let copy = std::fs::read_to_string(kubernetes_dir().join("base/envoy-sidecar.yaml")).unwrap();
    assert!(
        copy == original,
        "deploy/kubernetes/base/envoy-sidecar.yaml differs from deploy/envoy/sidecar.yaml; \
         copy it again: cp deploy/envoy/sidecar.yaml deploy/kubernetes/base/envoy-sidecar.yaml"
    );
    let Some(tools) = Tools::find() else { return };
    let docs = parse_docs(&tools.render(&kubernetes_dir().join("base")).unwrap()).unwrap();
    let maps: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && !d["data"]["envoy.yaml"].is_null())
        .collect();
    assert_eq!(maps.len(), 1, "one ConfigMap with envoy.yaml in the base");
    assert_eq!(
        maps[0]["data"]["envoy.yaml"].as_str(),
        Some(original.as_str()),
        "the rendered bootstrap is not the file"
    );
}

/// The optional PodMonitor selects the pods of every overlay and of the Workload API example,
/// and scrapes their status port.
#[test]
fn the_pod_monitor_scrapes_the_status_port_of_every_overlay() {
    let Some(tools) = Tools::find() else { return };
    let monitors =
        parse_docs(&tools.render(&kubernetes_dir().join("monitoring")).unwrap()).unwrap();
    let mut failures = Vec::new();
    for dir in overlays()
        .into_iter()
        .chain([kubernetes_dir().join(WORKLOAD_API_EXAMPLE)])
    {
        let docs = parse_docs(&tools.render(&dir).unwrap()).unwrap();
        for pod in pod_templates(&docs) {
            for problem in check_pod_monitor(&monitors, &pod) {
                failures.push(format!("{}: {}: {problem}", relative(&dir), pod.owner));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A kustomization naming a file that is not there, or holding YAML that does not parse, fails
/// to render, and kubectl's message names the missing file or the broken line.
#[test]
fn a_broken_kustomization_fails_to_render() {
    let Some(tools) = Tools::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - missing-deployment.yaml\n",
    )
    .unwrap();
    let err = tools.render(dir.path()).unwrap_err();
    assert!(
        err.contains("missing-deployment.yaml"),
        "the error does not name the missing file: {err}"
    );

    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources: [deployment.yaml\n",
    )
    .unwrap();
    let err = tools.render(dir.path()).unwrap_err();
    // kubectl 1.20 says only `yaml: line 1: did not find expected ',' or ']'`.
    assert!(
        err.contains("yaml: line 1"),
        "the error does not say where the YAML breaks: {err}"
    );
}

/// Strict validation refuses a misspelt field (the kind of typo that would silently drop a
/// security setting), and a kind it has no schema for is refused unless it is one of
/// [`CUSTOM_KINDS`].
#[test]
fn strict_validation_refuses_unknown_fields_and_unknown_kinds() {
    let Some(tools) = Tools::find() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let mut docs = parse_docs(&tools.render(&kubernetes_dir().join("base")).unwrap()).unwrap();
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let agent = &mut deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(agent["name"], "sds-agent");
    let security = agent["securityContext"].as_mapping_mut().unwrap();
    let value = security.remove("readOnlyRootFilesystem").unwrap();
    security.insert("readOnlyRootFileSystem".into(), value);
    let err = tools.validate(&to_yaml(&docs), scratch.path()).unwrap_err();
    assert!(
        err.contains("readOnlyRootFileSystem"),
        "the error does not name the field: {err}"
    );

    let unknown = "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: x\n";
    let err = tools.validate(unknown, scratch.path()).unwrap_err();
    assert!(
        err.contains("Gadget"),
        "the error does not name the kind: {err}"
    );
}

/// Each semantic check fails on a pod weakened in the way it guards against.
#[test]
fn the_semantic_checks_catch_a_weakened_pod() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let rbac =
        parse_docs(&std::fs::read_to_string(repo().join("deploy/cert-manager/rbac.yaml")).unwrap())
            .unwrap();
    let good = |overlay: &str| {
        parse_docs(
            &tools
                .render(&kubernetes_dir().join("overlays").join(overlay))
                .unwrap(),
        )
        .unwrap()
    };
    for overlay in ["embedded", "vault", "istiod", "cert-manager", "acm-pca"] {
        assert_eq!(
            check_overlay(overlay, &good(overlay), &flags, &rbac),
            Vec::<String>::new(),
            "{overlay} must pass unchanged"
        );
    }

    type Mutation = fn(&mut Value);
    let cases: [(&str, &str, Mutation); 17] = [
        ("embedded", "readOnlyRootFilesystem", |pod| {
            agent_mut(pod)["securityContext"]
                .as_mapping_mut()
                .unwrap()
                .remove("readOnlyRootFilesystem");
        }),
        ("embedded", "allowPrivilegeEscalation", |pod| {
            container_mut(pod, "envoy")["securityContext"]["allowPrivilegeEscalation"] =
                true.into();
        }),
        ("embedded", "capabilities", |pod| {
            container_mut(pod, "app")["securityContext"]["capabilities"]["drop"] =
                Value::Sequence(vec!["NET_RAW".into()]);
        }),
        ("embedded", "runAsUser", |pod| {
            agent_mut(pod)["securityContext"]["runAsUser"] = 0.into()
        }),
        ("embedded", "native sidecar", |pod| {
            agent_mut(pod)
                .as_mapping_mut()
                .unwrap()
                .remove("restartPolicy");
        }),
        ("embedded", "same user", |pod| {
            container_mut(pod, "envoy")["securityContext"]["runAsUser"] = 101.into()
        }),
        ("embedded", "refuse envoy", |pod| {
            push_env(agent_mut(pod), "SDS_AGENT_ALLOWED_UIDS", "1337")
        }),
        ("embedded", "not a flag", |pod| {
            push_env(agent_mut(pod), "SDS_AGENT_NOT_A_FLAG", "1")
        }),
        ("embedded", "/readyz", |pod| {
            agent_mut(pod)["readinessProbe"]["httpGet"]["path"] = "/secrets".into()
        }),
        ("embedded", "status port", |pod| {
            agent_mut(pod)["livenessProbe"]["httpGet"]["port"] = 15020.into();
        }),
        ("embedded", "loopback", |pod| {
            set_env(agent_mut(pod), "SDS_AGENT_ADMIN_ADDR", "0.0.0.0:15020")
        }),
        ("embedded", "prometheus.io/port", |pod| {
            pod["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] =
                "15020".into();
        }),
        ("embedded", "memory", |pod| {
            agent_mut(pod)["resources"]["requests"]
                .as_mapping_mut()
                .unwrap()
                .remove("memory");
        }),
        ("embedded", "emptyDir", |pod| {
            container_mut(pod, "envoy")["volumeMounts"]
                .as_sequence_mut()
                .unwrap()
                .retain(|m| m["name"] != "workload-socket");
        }),
        ("vault", "audience", |pod| {
            let volumes = pod["spec"]["template"]["spec"]["volumes"]
                .as_sequence_mut()
                .unwrap();
            let token = volumes
                .iter_mut()
                .find(|v| v["name"] == "vault-token")
                .unwrap();
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"] = "istio-ca".into();
        }),
        ("istiod", "SDS_AGENT_CA", |pod| {
            set_env(agent_mut(pod), "SDS_AGENT_CA", "embedded")
        }),
        ("cert-manager", "in-cluster credentials", |pod| {
            agent_mut(pod)["volumeMounts"]
                .as_sequence_mut()
                .unwrap()
                .retain(|m| m["name"] != "kube-api-access");
        }),
    ];
    for (overlay, expected, mutate) in cases {
        let mut docs = good(overlay);
        mutate(docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap());
        let problems = check_overlay(overlay, &docs, &flags, &rbac);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{overlay}: a change that breaks `{expected}` went unnoticed; problems: {problems:#?}"
        );
    }

    // The alternative docs/deploying.md describes passes: Envoy under its own uid 101, the
    // socket 0660 in the pod's fsGroup, and that group allowed to call.
    let mut docs = good("embedded");
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] = 65532.into();
    container_mut(deployment, "envoy")["securityContext"]["runAsUser"] = 101.into();
    container_mut(deployment, "envoy")["securityContext"]["runAsGroup"] = 65532.into();
    set_env(agent_mut(deployment), "SDS_AGENT_SOCKET_MODE", "0660");
    push_env(agent_mut(deployment), "SDS_AGENT_ALLOWED_GIDS", "65532");
    assert_eq!(
        check_overlay("embedded", &docs, &flags, &rbac),
        Vec::<String>::new(),
        "a 0660 socket shared by group must pass"
    );

    // The cert-manager Role must grant what deploy/cert-manager/rbac.yaml grants.
    let mut docs = good("cert-manager");
    let role = docs.iter_mut().find(|d| d["kind"] == "Role").unwrap();
    role["rules"][0]["verbs"] = Value::Sequence(vec!["create".into(), "get".into()]);
    let problems = check_overlay("cert-manager", &docs, &flags, &rbac);
    assert!(
        problems.iter().any(|p| p.contains("rbac.yaml")),
        "a narrowed Role went unnoticed: {problems:#?}"
    );
    // And the IRSA role must be named on the service account.
    let mut docs = good("acm-pca");
    let sa = docs
        .iter_mut()
        .find(|d| d["kind"] == "ServiceAccount")
        .unwrap();
    sa["metadata"]
        .as_mapping_mut()
        .unwrap()
        .remove("annotations");
    let problems = check_overlay("acm-pca", &docs, &flags, &rbac);
    assert!(
        problems.iter().any(|p| p.contains("role-arn")),
        "a missing IRSA role went unnoticed: {problems:#?}"
    );
}

/// The Workload API example (`examples/workload-api`): the base pod's hardening, the agent's
/// settings, and spiffe-helper wired to the agent's Workload API socket (see
/// [`check_workload_api_pod`]). The Envoy checks of the overlays are not applied to it: it has
/// no Envoy.
#[test]
fn the_workload_api_example_wires_spiffe_helper_to_the_agent() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let docs = workload_api_example(&tools);
    let problems = check_workload_api_example(&docs, &flags);
    assert!(
        problems.is_empty(),
        "{WORKLOAD_API_EXAMPLE}:\n  {}",
        problems.join("\n  ")
    );
    eprintln!("{WORKLOAD_API_EXAMPLE}: ok");
}

/// `sds-agent validate`, given the environment kubelet would give the example's agent, serves
/// the Workload API on the very path spiffe-helper's `agent_address` names, keeps the SDS
/// socket apart, and by its own reading of the caller check (allowed uids and gids, socket
/// mode) admits spiffe-helper's uid.
#[test]
fn the_agent_accepts_the_workload_api_examples_configuration() {
    let Some(tools) = Tools::find() else { return };
    let docs = workload_api_example(&tools);
    let pods = pod_templates(&docs);
    assert_eq!(pods.len(), 1, "one pod template in {WORKLOAD_API_EXAMPLE}");
    let pod = &pods[0];
    let agent = container(pod.spec, "sds-agent").expect("an sds-agent container");
    let helper = container(pod.spec, "spiffe-helper").expect("a spiffe-helper container");
    let conf = spiffe_helper_conf(&docs, pod.spec, helper).unwrap();
    let Some(HclValue::Str(dialled)) = conf.get("agent_address") else {
        panic!("helper.conf has no agent_address: {conf:?}");
    };
    let scratch = tempfile::tempdir().unwrap();
    let (env, resolved) = agent_validate(pod, scratch.path());

    let sa = pod.spec["serviceAccountName"].as_str().unwrap();
    let expected = [
        ("workload-api-socket", dialled.clone()),
        ("socket", env["SDS_AGENT_SOCKET"].clone()),
        ("socket-mode", env["SDS_AGENT_SOCKET_MODE"].clone()),
        (
            "spiffe-id",
            format!("spiffe://cluster.local/ns/{SAMPLE_NAMESPACE}/sa/{sa}"),
        ),
        ("admin-addr", "127.0.0.1:15020".to_owned()),
        ("status-addr", "0.0.0.0:15021".to_owned()),
        ("log-format", "json".to_owned()),
    ];
    for (key, want) in expected {
        assert_eq!(
            resolved[key].as_str(),
            Some(want.as_str()),
            "validate resolved {key} = {}",
            resolved[key]
        );
    }
    assert_eq!(resolved["ca"]["backend"], "embedded");
    assert_ne!(resolved["socket"], resolved["workload-api-socket"]);

    assert!(
        agent_admits(&resolved, agent, helper),
        "the agent, as validate reads its settings, would refuse spiffe-helper ({:?}): {resolved}",
        helper["securityContext"]
    );
    eprintln!(
        "{WORKLOAD_API_EXAMPLE}: sds-agent validate: Workload API on {} for {}",
        resolved["workload-api-socket"], resolved["spiffe-id"]
    );
}

/// `other-clients.yaml`, merged into the example as an overlay would merge it, renders and
/// passes strict validation; linkerd2-proxy and the go-spiffe program each name the agent's
/// Workload API socket in their own syntax, on the same volume, with the hardened security
/// context; linkerd2-proxy asks for the SPIFFE ID the agent issues; and the agent, by its own
/// `validate`, admits linkerd2-proxy's uid on a 0660 socket of its group.
#[test]
fn the_other_clients_patch_dials_the_same_workload_api() {
    let Some(tools) = Tools::find() else { return };
    let yaml = render_with_other_clients(&tools).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let passed = tools.validate(&yaml, scratch.path()).unwrap();
    eprintln!("{WORKLOAD_API_EXAMPLE} + {OTHER_CLIENTS}: {passed} resource validations passed");
    let docs = parse_docs(&yaml).unwrap();
    let (problems, clients) = check_other_clients(&docs);
    assert!(
        problems.is_empty(),
        "{WORKLOAD_API_EXAMPLE} + {OTHER_CLIENTS}:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(clients, ["app", "linkerd-proxy", "spiffe-helper"]);

    let pod = &pod_templates(&docs)[0];
    let (_, resolved) = agent_validate(pod, scratch.path());
    assert_eq!(resolved["socket-mode"], "0660");
    let agent = container(pod.spec, "sds-agent").unwrap();
    for name in &clients {
        let c = container(pod.spec, name).unwrap();
        assert!(
            agent_admits(&resolved, agent, c),
            "the agent, as validate reads its settings, would refuse {name} ({:?}): {resolved}",
            c["securityContext"]
        );
    }
    let linkerd = container(pod.spec, "linkerd-proxy").unwrap();
    let id = container_env(pod.spec, linkerd)["LINKERD2_PROXY_IDENTITY_SERVER_ID"].clone();
    assert_eq!(
        id.as_deref(),
        resolved["spiffe-id"].as_str(),
        "linkerd2-proxy would wait for an SVID the agent never issues"
    );
}

/// Each Workload API check fails on a pod miswired in the way it guards against, and the
/// alternative the example's comments describe (a client of its own uid, in the agent's group,
/// on a 0660 socket, allowed by uid) passes.
#[test]
fn the_workload_api_checks_catch_a_miswired_pod() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let good = workload_api_example(&tools);
    assert_eq!(
        check_workload_api_example(&good, &flags),
        Vec::<String>::new(),
        "{WORKLOAD_API_EXAMPLE} must pass unchanged"
    );

    type Mutation = fn(&mut [Value]);
    let cases: [(&str, Mutation); 16] = [
        // spiffe-helper mounts the socket's volume somewhere else: agent_address leads nowhere.
        (
            "spiffe-helper: helper.conf agent_address names /run/spiffe/workload/api.sock, on no volume",
            |docs| {
                mount_mut(deployment_mut(docs), "spiffe-helper", "workload-api")["mountPath"] =
                    "/run/spiffe/agent".into();
            },
        ),
        // ... or the same path, but another volume.
        ("which is not the agent's Workload API socket", |docs| {
            mount_mut(deployment_mut(docs), "spiffe-helper", "workload-api")["name"] =
                "svids".into();
        }),
        ("which is not the agent's Workload API socket", |docs| {
            set_helper_conf(
                docs,
                "/run/spiffe/workload/api.sock",
                "/run/spiffe/workload/agent.sock",
            )
        }),
        ("must be a bare path", |docs| {
            set_helper_conf(
                docs,
                "\"/run/spiffe/workload/api.sock\"",
                "\"unix:///run/spiffe/workload/api.sock\"",
            )
        }),
        ("unknown key agentAddress", |docs| {
            set_helper_conf(docs, "agent_address =", "agentAddress =")
        }),
        ("daemon_mode", |docs| {
            set_helper_conf(docs, "daemon_mode = true", "daemon_mode = false")
        }),
        ("cert_dir", |docs| {
            mount_mut(deployment_mut(docs), "spiffe-helper", "svids")["readOnly"] = true.into();
        }),
        // Another uid: the 0600 socket keeps it out, and so would the agent.
        ("spiffe-helper cannot open a 0600 socket", |docs| {
            container_mut(deployment_mut(docs), "spiffe-helper")["securityContext"]["runAsUser"] =
                65534.into();
        }),
        ("the agent would refuse spiffe-helper", |docs| {
            push_env(
                agent_mut(deployment_mut(docs)),
                "SDS_AGENT_ALLOWED_UIDS",
                "1000",
            )
        }),
        ("SDS_AGENT_WORKLOAD_API_SOCKET must be set", |docs| {
            agent_mut(deployment_mut(docs))["env"]
                .as_sequence_mut()
                .unwrap()
                .retain(|e| e["name"] != "SDS_AGENT_WORKLOAD_API_SOCKET");
        }),
        ("must be an emptyDir", |docs| {
            let volumes = deployment_mut(docs)["spec"]["template"]["spec"]["volumes"]
                .as_sequence_mut()
                .unwrap();
            let v = volumes
                .iter_mut()
                .find(|v| v["name"] == "workload-api")
                .unwrap();
            *v = serde_norway::from_str(
                "{name: workload-api, hostPath: {path: /run/spire/agent-sockets, type: Directory}}",
            )
            .unwrap();
        }),
        (
            "the SDS socket /run/spiffe/workload/socket is on the Workload API's volume",
            |docs| {
                set_env(
                    agent_mut(deployment_mut(docs)),
                    "SDS_AGENT_SOCKET",
                    "/run/spiffe/workload/socket",
                )
            },
        ),
        // A container that is no client mounting the socket.
        (
            "other mounts the Workload API socket's volume workload-api",
            |docs| {
                let spec = &mut deployment_mut(docs)["spec"]["template"]["spec"];
                let mut other = spec["containers"][0].clone();
                other["name"] = "other".into();
                other["args"] = Value::Sequence(vec![]);
                other["image"] = "registry.example.com/other:1.0.0".into();
                spec["containers"].as_sequence_mut().unwrap().push(other);
            },
        ),
        (
            "spiffe-helper mounts the SDS socket's volume sds-socket",
            |docs| {
                let mut mount = serde_norway::Mapping::new();
                mount.insert("name".into(), "sds-socket".into());
                mount.insert(
                    "mountPath".into(),
                    "/var/run/secrets/workload-spiffe-uds".into(),
                );
                container_mut(deployment_mut(docs), "spiffe-helper")["volumeMounts"]
                    .as_sequence_mut()
                    .unwrap()
                    .push(Value::Mapping(mount));
            },
        ),
        // The base pod's hardening holds here too.
        (
            "spiffe-helper: readOnlyRootFilesystem must be true",
            |docs| {
                container_mut(deployment_mut(docs), "spiffe-helper")["securityContext"]
                    .as_mapping_mut()
                    .unwrap()
                    .remove("readOnlyRootFilesystem");
            },
        ),
        ("is not a flag", |docs| {
            push_env(
                agent_mut(deployment_mut(docs)),
                "SDS_AGENT_WORKLOAD_API_SOCKET_MODE",
                "0600",
            )
        }),
    ];
    for (expected, mutate) in cases {
        let mut docs = good.clone();
        mutate(&mut docs);
        let problems = check_workload_api_example(&docs, &flags);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "a change that breaks `{expected}` went unnoticed; problems: {problems:#?}"
        );
    }

    // The alternative: spiffe-helper under a uid of its own, in the agent's group, the socket
    // 0660, that uid allowed.
    let mut docs = good.clone();
    let d = deployment_mut(&mut docs);
    container_mut(d, "spiffe-helper")["securityContext"]["runAsUser"] = 1000.into();
    set_env(agent_mut(d), "SDS_AGENT_SOCKET_MODE", "0660");
    push_env(agent_mut(d), "SDS_AGENT_ALLOWED_UIDS", "1000");
    assert_eq!(
        check_workload_api_example(&docs, &flags),
        Vec::<String>::new(),
        "a 0660 socket shared by group, the client's uid allowed, must pass"
    );

    // The other clients' settings, merged, and broken one at a time.
    let merged = parse_docs(&render_with_other_clients(&tools).unwrap()).unwrap();
    assert_eq!(check_other_clients(&merged).0, Vec::<String>::new());
    let cases: [(&str, Mutation); 5] = [
        ("must be a unix:// URI", |docs| {
            set_env(
                container_mut(deployment_mut(docs), "app"),
                "SPIFFE_ENDPOINT_SOCKET",
                "/run/spiffe/workload/api.sock",
            )
        }),
        ("must not be opaque", |docs| {
            set_env(
                container_mut(deployment_mut(docs), "app"),
                "SPIFFE_ENDPOINT_SOCKET",
                "unix:run/spiffe/workload/api.sock",
            )
        }),
        ("the agent would refuse linkerd-proxy", |docs| {
            set_env(
                agent_mut(deployment_mut(docs)),
                "SDS_AGENT_ALLOWED_UIDS",
                "65532",
            )
        }),
        ("linkerd-proxy cannot open a 0600 socket", |docs| {
            set_env(
                agent_mut(deployment_mut(docs)),
                "SDS_AGENT_SOCKET_MODE",
                "0600",
            )
        }),
        (
            "LINKERD2_PROXY_IDENTITY_SERVER_ID must be the SPIFFE ID the agent issues",
            |docs| {
                set_env(
                    container_mut(deployment_mut(docs), "linkerd-proxy"),
                    "LINKERD2_PROXY_IDENTITY_SERVER_ID",
                    "spiffe://root.linkerd.cluster.local/ns/$(_pod_ns)/sa/$(_pod_sa)",
                )
            },
        ),
    ];
    for (expected, mutate) in cases {
        let mut docs = merged.clone();
        mutate(&mut docs);
        let (problems, _) = check_other_clients(&docs);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{OTHER_CLIENTS}: a change that breaks `{expected}` went unnoticed; problems: {problems:#?}"
        );
    }
}

/// `node/` and `node/workload/`: the DaemonSet holds the node-mode checks of
/// [`check_node_agent`] (hostPID, the hostPath socket directory, the one root init container,
/// the kubelet RBAC, the hardening everywhere else), and the workload's Envoy reaches the very
/// socket through that host directory, read-only ([`check_node_workload`]).
#[test]
fn the_node_manifests_serve_the_node_from_one_hardened_agent() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let rbac = cert_manager_rbac();
    let agent = parse_docs(&tools.render(&kubernetes_dir().join(NODE)).unwrap()).unwrap();
    let problems = check_node_agent(&agent, &flags, &rbac);
    let workload =
        parse_docs(&tools.render(&kubernetes_dir().join(NODE_WORKLOAD)).unwrap()).unwrap();
    let workload_problems = check_node_workload(&workload, &agent);
    let flag_problems = missing_node_flags(&problems);
    eprintln!("{NODE}: flags the built agent lacks: {flag_problems:?}");
    let problems: Vec<&String> = problems
        .iter()
        .chain(&workload_problems)
        .filter(|p| !flag_problems.contains(p))
        .collect();
    assert!(
        problems.is_empty(),
        "{NODE}, {NODE_WORKLOAD}:\n  {}",
        problems
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        flag_problems.is_empty(),
        "{NODE}: the DaemonSet sets variables that are no flags of this agent (node mode \
         not built yet?):\n  {}",
        flag_problems.join("\n  ")
    );
}

/// `helm lint --strict` passes with the defaults and with every value set in the chart's `ci/`
/// (both modes, every backend), and what `helm template` renders from each passes the same
/// strict schema validation as the kustomize output.
#[test]
fn the_chart_lints_and_renders_every_value_set() {
    let (Some(tools), Some(helm)) = (Tools::find(), Helm::find()) else {
        return;
    };
    let sets = chart_value_sets();
    let modes: BTreeSet<String> = sets.iter().map(|s| s.mode()).collect();
    assert_eq!(
        modes,
        BTreeSet::from(["node".to_owned(), "pod".to_owned()]),
        "ci/ must hold value sets of both modes"
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for set in std::iter::once(None).chain(sets.iter().map(Some)) {
        let file = set.map(|s| s.file.as_path());
        let name = set.map_or("defaults".to_owned(), |s| s.name.clone());
        let result = helm
            .lint(file)
            .and_then(|()| helm.template(file))
            .and_then(|yaml| tools.validate(&yaml, scratch.path()));
        match result {
            Ok(passed) => eprintln!("chart {name}: lint ok, {passed} resource validations passed"),
            Err(e) => failures.push(format!("chart {name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Node mode, for every value set: the same node-mode checks as `node/` (one helper), the
/// backend's needs in a cluster-wide scope, the socket on the values' host path, nodes/proxy
/// granted exactly when `rbac.nodesProxy`, and the PodMonitor (when enabled) scraping the
/// agents' status port.
#[test]
fn the_charts_node_mode_serves_the_node_from_one_hardened_agent() {
    let Some(helm) = Helm::find() else { return };
    let flags = agent_env_flags();
    let rbac = cert_manager_rbac();
    let mut failures = Vec::new();
    let mut flag_failures = BTreeSet::new();
    for set in chart_value_sets().iter().filter(|s| s.mode() == "node") {
        let docs = parse_docs(&helm.template(Some(&set.file)).unwrap()).unwrap();
        let mut problems = check_node_agent(&docs, &flags, &rbac);
        let pods = pod_templates(&docs);
        let socket_dir = set.value(&["node", "socketHostPath"]);
        let socket_dir = socket_dir.as_str().unwrap_or("/run/sds-agent/sockets");
        for pod in &pods {
            let path = seq(&pod.spec["volumes"])
                .iter()
                .find_map(|v| v["hostPath"]["path"].as_str());
            if path != Some(socket_dir) {
                problems.push(format!(
                    "the socket's host directory is {path:?}, not the values' {socket_dir}"
                ));
            }
            let backend = set.value(&["ca", "backend"]);
            let backend = backend.as_str().unwrap_or("embedded");
            let env = env_of(container(pod.spec, "sds-agent").unwrap());
            if !env
                .iter()
                .any(|(k, v)| k == "SDS_AGENT_CA" && v.literal() == Some(backend))
            {
                problems.push(format!("SDS_AGENT_CA is not the values' {backend}"));
            }
        }
        let proxy = set.value(&["rbac", "nodesProxy"]).as_bool().unwrap_or(true);
        if kubelet_rbac_grants(&docs, "nodes/proxy") != proxy {
            problems.push(format!(
                "rbac.nodesProxy is {proxy}, and nodes/proxy is granted: {}",
                !proxy
            ));
        }
        if set.value(&["podMonitor", "enabled"]) == true {
            for pod in &pods {
                problems.extend(check_pod_monitor(&docs, pod));
            }
        }
        let missing = missing_node_flags(&problems);
        flag_failures.extend(missing.iter().cloned());
        problems.retain(|p| !missing.contains(p));
        if problems.is_empty() {
            eprintln!("chart {}: ok", set.name);
        } else {
            failures.push(format!("chart {}:\n  {}", set.name, problems.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        flag_failures.is_empty(),
        "the chart sets variables that are no flags of this agent (node mode not built yet?):\n  {}",
        flag_failures.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

/// Pod mode, for every value set: the chart runs no pod; it ships the agent's settings (real
/// flags, none of the per-pod Downward API ones), the Envoy bootstrap dialling the agent's
/// socket and accepting the trust domain, the cert-manager Role equal to
/// `deploy/cert-manager/rbac.yaml` bound to each listed account; and `sds-agent validate`
/// accepts those settings with the Downward API's added, as a pod would run them.
#[test]
fn the_charts_pod_mode_ships_what_the_sidecars_share() {
    let Some(helm) = Helm::find() else { return };
    let flags = agent_env_flags();
    let rbac = cert_manager_rbac();
    let bin = agent_bin().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    let mut failures = Vec::new();
    for set in chart_value_sets().iter().filter(|s| s.mode() == "pod") {
        let docs = parse_docs(&helm.template(Some(&set.file)).unwrap()).unwrap();
        let accounts: Vec<String> = seq(&set.value(&["pod", "serviceAccounts"]))
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let (mut problems, settings) = check_pod_mode_chart(&docs, &flags, &rbac, &accounts);

        // The settings as a pod runs them: envFrom the ConfigMap, identity from the Downward API.
        let mut env = settings.clone();
        env.insert("SDS_AGENT_NAMESPACE".into(), SAMPLE_NAMESPACE.into());
        env.insert("SDS_AGENT_SERVICE_ACCOUNT".into(), "sds-demo".into());
        env.insert("SDS_AGENT_POD_NAME".into(), SAMPLE_POD_NAME.into());
        env.insert("SDS_AGENT_POD_UID".into(), SAMPLE_POD_UID.into());
        if settings.get("SDS_AGENT_CA").map(String::as_str) == Some("cert-manager") {
            env.insert(
                "SDS_AGENT_KUBECONFIG".into(),
                kubeconfig.display().to_string(),
            );
        }
        let out = Command::new(&bin)
            .arg("validate")
            .env_clear()
            .envs(&env)
            .current_dir(scratch.path())
            .output()
            .unwrap();
        if out.status.success() {
            let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let td = settings
                .get("SDS_AGENT_TRUST_DOMAIN")
                .map_or("cluster.local", String::as_str);
            let want = format!("spiffe://{td}/ns/{SAMPLE_NAMESPACE}/sa/sds-demo");
            if resolved["spiffe-id"] != want.as_str() || resolved["socket"] != SOCKET {
                problems.push(format!(
                    "validate resolved {} on {}, not {want} on {SOCKET}",
                    resolved["spiffe-id"], resolved["socket"]
                ));
            }
            if resolved["ca"]["backend"].as_str()
                != settings.get("SDS_AGENT_CA").map(String::as_str)
            {
                problems.push(format!("validate resolved the backend {}", resolved["ca"]));
            }
        } else {
            problems.push(format!(
                "sds-agent validate refused the settings {env:?} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if set.value(&["podMonitor", "enabled"]) == true {
            let sidecars = parse_docs(&Tools::find().map_or_else(String::new, |t| {
                t.render(&kubernetes_dir().join("overlays/embedded"))
                    .unwrap()
            }))
            .unwrap();
            for pod in pod_templates(&sidecars) {
                problems.extend(check_pod_monitor(&docs, &pod));
            }
        }
        if problems.is_empty() {
            eprintln!("chart {}: ok", set.name);
        } else {
            failures.push(format!("chart {}:\n  {}", set.name, problems.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `sds-agent validate`, given exactly the environment kubelet would give the node agent of
/// `node/` and of each node-mode value set of the chart (spec.nodeName and status.hostIP
/// filled with sample values), accepts it and resolves the backend, socket, mode 0666 and
/// listeners meant. Sets naming the embedded CA's files are left out: validate reads them,
/// and they exist only in the pod.
#[test]
fn the_agent_accepts_the_node_mode_configurations() {
    let Some(tools) = Tools::find() else { return };
    let helm = Helm::find();
    let bin = agent_bin().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    // validate reads the files node mode starts with (the kubelet's CA and the agent's
    // token, and a pinned trust bundle where one is set); they are the pod's, so stand-ins
    // are written here.
    let ca = sds_integration::pki::SharedCa::write(scratch.path()).unwrap();
    let token = scratch.path().join("token");
    std::fs::write(&token, "a-service-account-token").unwrap();
    let stand_ins = [
        ("SDS_AGENT_KUBELET_CA", ca.cert.display().to_string()),
        ("SDS_AGENT_KUBELET_TOKEN_FILE", token.display().to_string()),
        ("SDS_AGENT_CA_TRUST_BUNDLE", ca.cert.display().to_string()),
    ];
    let mut renderings = vec![(
        NODE.to_owned(),
        tools.render(&kubernetes_dir().join(NODE)).unwrap(),
    )];
    if let Some(helm) = &helm {
        for set in chart_value_sets().iter().filter(|s| s.mode() == "node") {
            renderings.push((
                format!("chart {}", set.name),
                helm.template(Some(&set.file)).unwrap(),
            ));
        }
    }
    let mut failures = Vec::new();
    for (name, yaml) in renderings {
        let docs = parse_docs(&yaml).unwrap();
        for pod in pod_templates(&docs) {
            let agent = container(pod.spec, "sds-agent").unwrap();
            let mut env = kubelet_env(pod.spec, agent).unwrap();
            if env.contains_key("SDS_AGENT_EMBEDDED_CA_CERT") {
                eprintln!("{name}: validate left out (the embedded CA's files are the pod's)");
                continue;
            }
            if env.get("SDS_AGENT_CA").map(String::as_str) == Some("cert-manager") {
                env.insert(
                    "SDS_AGENT_KUBECONFIG".into(),
                    kubeconfig.display().to_string(),
                );
            }
            // The kubelet files default to the pod's service-account mount (no CA where the
            // kubelet is not verified); the trust bundle is replaced only where it is set.
            let unverified = [
                "SDS_AGENT_KUBELET_READ_ONLY_PORT",
                "SDS_AGENT_KUBELET_SKIP_TLS_VERIFY",
            ]
            .iter()
            .any(|k| env.get(*k).is_some_and(|v| !v.is_empty() && v != "false"));
            for (key, stand_in) in &stand_ins {
                let wanted = match *key {
                    "SDS_AGENT_KUBELET_CA" => !unverified,
                    "SDS_AGENT_KUBELET_TOKEN_FILE" => true,
                    _ => env.contains_key(*key),
                };
                if wanted {
                    env.insert((*key).to_owned(), stand_in.clone());
                }
            }
            let out = Command::new(&bin)
                .arg("validate")
                .env_clear()
                .envs(&env)
                .current_dir(scratch.path())
                .output()
                .unwrap();
            if !out.status.success() {
                failures.push(format!(
                    "{name}: sds-agent validate refused the environment {env:?} ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                continue;
            }
            let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            for (key, want) in [
                // The agent built here ignores SDS_AGENT_MODE (an unknown variable) until node
                // mode is merged; this is what tells the two apart.
                ("mode", "node"),
                ("socket", SOCKET),
                ("socket-mode", "0666"),
                ("admin-addr", "127.0.0.1:15020"),
                ("status-addr", "0.0.0.0:15021"),
            ] {
                if resolved[key] != want {
                    failures.push(format!(
                        "{name}: validate resolved {key} = {}, not {want:?}",
                        resolved[key]
                    ));
                }
            }
            if resolved["ca"]["backend"].as_str() != env.get("SDS_AGENT_CA").map(String::as_str) {
                failures.push(format!(
                    "{name}: validate resolved the backend {}",
                    resolved["ca"]
                ));
            }
            eprintln!("{name}: sds-agent validate: {}", resolved["ca"]["backend"]);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The chart's schema refuses bad values, and `helm lint` names the value: an unknown mode or
/// backend, a misspelt key, a trust domain in capitals, `latest`, a relative host path, root
/// for the agent, a backend without what it needs (an http:// Vault, no issuer, a malformed
/// ARN), a variable that is not `SDS_AGENT_*`. `helm template` refuses them too, and refuses
/// an `extraEnv` entry that the chart's own values set.
#[test]
fn the_charts_schema_refuses_bad_values() {
    let Some(helm) = Helm::find() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("values.yaml");
    let cases = [
        ("mode: daemon", "mode must be one of"),
        ("ca: {backend: letsencrypt}", "ca.backend"),
        ("podMonitr: {enabled: true}", "podMonitr is not allowed"),
        ("trustDomain: Example.COM", "trustDomain"),
        (
            "image: {repository: ghcr.io/sds-agent/sds-agent, tag: latest}",
            "image.tag",
        ),
        (
            "node: {socketHostPath: run/sds-agent}",
            "node.socketHostPath",
        ),
        ("node: {socketHostPath: /run/../etc}", "node.socketHostPath"),
        ("mode: node\nnode: {runAsUser: 0}", "node.runAsUser"),
        (
            "ca: {backend: vault, vault: {addr: 'http://vault:8200'}}",
            "ca.vault.addr",
        ),
        ("ca: {backend: cert-manager}", "ca.certManager.issuerName"),
        (
            "ca: {backend: acm-pca, acmPca: {arn: not-an-arn}}",
            "ca.acmPca.arn",
        ),
        ("extraEnv: {LOG_LEVEL: debug}", "extraEnv"),
        ("node: {kubelet: {port: 70000}}", "node.kubelet.port"),
        (
            "node: {kubelet: {pollInterval: soon}}",
            "node.kubelet.pollInterval",
        ),
    ];
    for (values, expected) in cases {
        std::fs::write(&file, values).unwrap();
        let err = helm.lint(Some(&file)).expect_err(values);
        assert!(
            err.contains(expected),
            "helm lint refused {values:?} without naming {expected:?}: {err}"
        );
        let err = helm.template(Some(&file)).expect_err(values);
        assert!(
            err.contains(expected),
            "helm template refused {values:?} without naming {expected:?}: {err}"
        );
    }
    std::fs::write(&file, "extraEnv: {SDS_AGENT_CA: vault}").unwrap();
    let err = helm.template(Some(&file)).unwrap_err();
    assert!(
        err.contains("extraEnv.SDS_AGENT_CA: the chart sets SDS_AGENT_CA"),
        "{err}"
    );
}

/// Each node-mode check fails on a DaemonSet or workload weakened in the way it guards
/// against, on the kustomize rendering and the chart's alike.
#[test]
fn the_node_checks_catch_a_weakened_daemonset() {
    let Some(tools) = Tools::find() else { return };
    let flags = agent_env_flags();
    let rbac = cert_manager_rbac();
    let good = parse_docs(&tools.render(&kubernetes_dir().join(NODE)).unwrap()).unwrap();
    let workload =
        parse_docs(&tools.render(&kubernetes_dir().join(NODE_WORKLOAD)).unwrap()).unwrap();
    let baseline = check_node_agent(&good, &flags, &rbac);
    let missing = missing_node_flags(&baseline);
    assert_eq!(
        baseline.iter().filter(|p| !missing.contains(p)).count(),
        0,
        "{NODE} must pass unchanged: {baseline:#?}"
    );

    type Mutation = fn(&mut [Value]);
    let cases: [(&str, Mutation); 16] = [
        ("hostPID must be true", |docs| {
            pod_spec_mut(docs)
                .as_mapping_mut()
                .unwrap()
                .remove("hostPID");
        }),
        ("hostNetwork", |docs| {
            pod_spec_mut(docs)["hostNetwork"] = true.into();
        }),
        ("sds-agent: runAsUser must be set and not 0", |docs| {
            node_container_mut(docs, "sds-agent")["securityContext"]["runAsUser"] = 0.into();
        }),
        ("is a common workload uid", |docs| {
            node_container_mut(docs, "sds-agent")["securityContext"]["runAsUser"] = 65532.into();
            node_container_mut(docs, "socket-dir")["command"][1] = "65532:65500".into();
        }),
        ("sds-agent: capabilities must drop ALL", |docs| {
            node_container_mut(docs, "sds-agent")["securityContext"]["capabilities"]["add"] =
                Value::Sequence(vec!["SYS_PTRACE".into()]);
        }),
        ("may add CHOWN and nothing else", |docs| {
            node_container_mut(docs, "socket-dir")["securityContext"]["capabilities"]["add"] =
                Value::Sequence(vec!["CHOWN".into(), "DAC_OVERRIDE".into()]);
        }),
        ("socket-dir: must only chown", |docs| {
            node_container_mut(docs, "socket-dir")["command"] = serde_norway::from_str(
                "[sh, -c, 'chown 65500:65500 /run/sds-agent/sockets && chmod 777 /']",
            )
            .unwrap();
        }),
        ("hostPath of type DirectoryOrCreate", |docs| {
            pod_spec_mut(docs)["volumes"][0] =
                serde_norway::from_str("{name: sockets, emptyDir: {}}").unwrap();
        }),
        ("SDS_AGENT_SOCKET_MODE must be 0666", |docs| {
            set_env(
                node_container_mut(docs, "sds-agent"),
                "SDS_AGENT_SOCKET_MODE",
                "0600",
            );
        }),
        ("must not be set in node mode", |docs| {
            push_env(
                node_container_mut(docs, "sds-agent"),
                "SDS_AGENT_SERVICE_ACCOUNT",
                "sds-agent",
            );
        }),
        ("must not be set in node mode", |docs| {
            push_env(
                node_container_mut(docs, "sds-agent"),
                "SDS_AGENT_ALLOWED_UIDS",
                "65532",
            );
        }),
        (
            "SDS_AGENT_NODE_NAME must come from the Downward API",
            |docs| {
                let agent = node_container_mut(docs, "sds-agent");
                agent["env"]
                    .as_sequence_mut()
                    .unwrap()
                    .retain(|e| e["name"] != "SDS_AGENT_NODE_NAME");
                push_env(agent, "SDS_AGENT_NODE_NAME", "worker-1");
            },
        ),
        ("SDS_AGENT_MODE must be node", |docs| {
            set_env(
                node_container_mut(docs, "sds-agent"),
                "SDS_AGENT_MODE",
                "pod",
            );
        }),
        ("nodes/pods or nodes/proxy", |docs| {
            let role = docs
                .iter_mut()
                .find(|d| d["kind"] == "ClusterRole")
                .unwrap();
            role["rules"][0]["resources"] = Value::Sequence(vec!["pods".into()]);
        }),
        ("only get", |docs| {
            let role = docs
                .iter_mut()
                .find(|d| d["kind"] == "ClusterRole")
                .unwrap();
            role["rules"][0]["verbs"] = Value::Sequence(vec!["get".into(), "create".into()]);
        }),
        ("bound to the service account sds-agent", |docs| {
            let binding = docs
                .iter_mut()
                .find(|d| d["kind"] == "ClusterRoleBinding")
                .unwrap();
            binding["subjects"][0]["namespace"] = "default".into();
        }),
    ];
    for (expected, mutate) in cases {
        let mut docs = good.clone();
        mutate(&mut docs);
        let problems = check_node_agent(&docs, &flags, &rbac);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "a change that breaks `{expected}` went unnoticed; problems: {problems:#?}"
        );
    }

    assert_eq!(
        check_node_workload(&workload, &good),
        Vec::<String>::new(),
        "{NODE_WORKLOAD} must pass unchanged"
    );
    let cases: [(&str, Mutation); 4] = [
        ("read-only", |docs| {
            mount_mut(deployment_mut(docs), "envoy", "sds-agent-sockets")["readOnly"] =
                false.into();
        }),
        ("not the agent's /run/sds-agent/sockets", |docs| {
            deployment_mut(docs)["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] =
                "/run/spire/sockets".into();
        }),
        ("app mounts the agent's socket directory", |docs| {
            let mount = serde_norway::from_str(
                "{name: sds-agent-sockets, mountPath: /sockets, readOnly: true}",
            )
            .unwrap();
            container_mut(deployment_mut(docs), "app")["volumeMounts"] =
                Value::Sequence(vec![mount]);
        }),
        ("envoy's sds-grpc cluster dials", |docs| {
            container_mut(deployment_mut(docs), "envoy")["workingDir"] = "/tmp".into();
        }),
    ];
    for (expected, mutate) in cases {
        let mut docs = workload.clone();
        mutate(&mut docs);
        let problems = check_node_workload(&docs, &good);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{NODE_WORKLOAD}: a change that breaks `{expected}` went unnoticed; problems: {problems:#?}"
        );
    }
}

/// The node workload's and the chart's Envoy bootstraps are `deploy/envoy/sidecar.yaml`,
/// byte for byte (kustomize and Helm read no file outside their directory, so each has a
/// copy).
#[test]
fn the_node_and_chart_bootstraps_are_deploy_envoy_sidecar_yaml() {
    let original = std::fs::read_to_string(repo().join("deploy/envoy/sidecar.yaml")).unwrap();
    for copy in [
        kubernetes_dir()
            .join(NODE_WORKLOAD)
            .join("envoy-sidecar.yaml"),
        repo().join(CHART).join("files/envoy-sidecar.yaml"),
    ] {
        let text = std::fs::read_to_string(&copy).unwrap();
        assert!(
            text == original,
            "{} differs from deploy/envoy/sidecar.yaml; copy it again",
            copy.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tools

/// kubectl and kubernetes-validate.
#[derive(Debug)]
struct Tools {
    kubectl: PathBuf,
    validator: PathBuf,
}

impl Tools {
    /// Both programs, or `None` (with a line saying the test is skipped) when one is missing,
    /// unless `SDS_AGENT_REQUIRE_KUBECTL=1`.
    fn find() -> Option<Self> {
        let kubectl =
            find_program("kubectl", "KUBECTL_BIN", "SDS_AGENT_REQUIRE_KUBECTL").unwrap()?;
        let validator = find_program(
            "kubernetes-validate",
            "KUBERNETES_VALIDATE_BIN",
            "SDS_AGENT_REQUIRE_KUBECTL",
        )
        .unwrap()?;
        Some(Self { kubectl, validator })
    }

    /// `kubectl kustomize DIR`: the rendered YAML, or kubectl's complaint.
    fn render(&self, dir: &Path) -> Result<String, String> {
        let out = Command::new(&self.kubectl)
            .arg("kustomize")
            .arg(dir)
            .output()
            .map_err(|e| format!("running {}: {e}", self.kubectl.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kubectl kustomize {} failed ({}): {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8(out.stdout).map_err(|e| format!("kubectl printed non-UTF-8: {e}"))
    }

    /// `kubernetes-validate --strict` against each of [`KUBERNETES_VERSIONS`]: the number of
    /// resource validations passed, or every complaint. A kind without a schema fails unless it
    /// is one of [`CUSTOM_KINDS`]; so does a resource that was not validated at all.
    fn validate(&self, yaml: &str, scratch: &Path) -> Result<usize, String> {
        let docs = parse_docs(yaml)?;
        let custom = docs
            .iter()
            .filter(|d| {
                CUSTOM_KINDS
                    .iter()
                    .any(|(api, kind)| d["apiVersion"] == *api && d["kind"] == *kind)
            })
            .count();
        let file = scratch.join("rendered.yaml");
        std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.validator);
        cmd.arg("--strict");
        for version in KUBERNETES_VERSIONS {
            cmd.args(["--kubernetes-version", version]);
        }
        let out = cmd
            .arg(&file)
            .output()
            .map_err(|e| format!("running {}: {e}", self.validator.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut problems = Vec::new();
        let mut passed = 0;
        for line in stdout.lines() {
            let custom_kind_warning = line.starts_with("WARN ")
                && CUSTOM_KINDS.iter().any(|(api, kind)| {
                    line.contains(&format!("for kind {kind} with api version {api} "))
                });
            if line.starts_with("INFO ") && line.contains(" passed for resource ") {
                passed += 1;
            } else if !custom_kind_warning && !line.trim().is_empty() {
                problems.push(line.to_owned());
            }
        }
        if !out.status.success() {
            problems.push(format!(
                "kubernetes-validate exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let expected = (docs.len() - custom) * KUBERNETES_VERSIONS.len();
        if problems.is_empty() && passed != expected {
            problems.push(format!(
                "{passed} resource validations passed, {expected} expected"
            ));
        }
        if problems.is_empty() {
            Ok(passed)
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// helm 3, for the chart in [`CHART`].
#[derive(Debug)]
struct Helm {
    bin: PathBuf,
}

impl Helm {
    /// helm (`HELM_BIN`, else `helm` on `PATH`), or `None` with a line saying the test is
    /// skipped, unless `SDS_AGENT_REQUIRE_HELM=1`.
    fn find() -> Option<Self> {
        find_program("helm", "HELM_BIN", "SDS_AGENT_REQUIRE_HELM")
            .unwrap()
            .map(|bin| Self { bin })
    }

    /// `helm lint --strict` of the chart with `values` (else its defaults): `Ok`, or helm's
    /// complaint (its output names each value the schema refuses).
    fn lint(&self, values: Option<&Path>) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["lint", "--strict"]).arg(repo().join(CHART));
        if let Some(values) = values {
            cmd.arg("--values").arg(values);
        }
        let out = self.run(&mut cmd)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "helm lint failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `helm template` of the chart as release `sds-agent` in namespace `sds-agent`, for the
    /// oldest Kubernetes the chart supports: the rendered YAML, or helm's complaint.
    fn template(&self, values: Option<&Path>) -> Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["template", "sds-agent"])
            .arg(repo().join(CHART))
            .args(["--namespace", "sds-agent", "--kube-version", "1.29.0"]);
        if let Some(values) = values {
            cmd.arg("--values").arg(values);
        }
        let out = self.run(&mut cmd)?;
        if !out.status.success() {
            return Err(format!(
                "helm template failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8(out.stdout).map_err(|e| format!("helm printed non-UTF-8: {e}"))
    }

    /// Runs helm with its configuration, cache and data in a scratch directory, so that no
    /// repository or plugin of the machine's is read.
    fn run(&self, cmd: &mut Command) -> Result<std::process::Output, String> {
        let home = tempfile::tempdir().map_err(|e| e.to_string())?;
        cmd.env("HELM_CONFIG_HOME", home.path().join("config"))
            .env("HELM_CACHE_HOME", home.path().join("cache"))
            .env("HELM_DATA_HOME", home.path().join("data"))
            .output()
            .map_err(|e| format!("running {}: {e}", self.bin.display()))
    }
}

/// One values file of the chart's `ci/` directory, read, with the chart's defaults beside it.
#[derive(Debug)]
struct ValueSet {
    name: String,
    file: PathBuf,
    values: Value,
    defaults: Value,
}

impl ValueSet {
    fn mode(&self) -> String {
        self.value(&["mode"]).as_str().unwrap_or("pod").to_owned()
    }

    /// The value at `path`, from the file, else the chart's default, else null.
    fn value(&self, path: &[&str]) -> Value {
        let get = |root: &Value| path.iter().try_fold(root, |v, k| v.get(*k)).cloned();
        get(&self.values)
            .or_else(|| get(&self.defaults))
            .unwrap_or(Value::Null)
    }
}

/// The value sets in the chart's `ci/`, sorted by name.
fn chart_value_sets() -> Vec<ValueSet> {
    let chart = repo().join(CHART);
    let defaults: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart.join("values.yaml")).unwrap())
            .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart.join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| ValueSet {
            name: file.file_name().unwrap().to_string_lossy().into_owned(),
            values: serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap(),
            defaults: defaults.clone(),
            file,
        })
        .collect()
}

/// `deploy/cert-manager/rbac.yaml`, parsed: what the cert-manager RBAC must grant.
fn cert_manager_rbac() -> Vec<Value> {
    parse_docs(&std::fs::read_to_string(repo().join("deploy/cert-manager/rbac.yaml")).unwrap())
        .unwrap()
}

/// The `SDS_AGENT_*` variables `sds-agent run --help` lists: every flag's `[env: ...]`.
fn agent_env_flags() -> BTreeSet<String> {
    let out = Command::new(agent_bin().unwrap())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "sds-agent run --help: {}", out.status);
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            name.starts_with("SDS_AGENT_").then_some(name)
        })
        .collect();
    assert!(
        flags.contains("SDS_AGENT_STATUS_ADDR") && flags.len() > 40,
        "cannot read the flags from --help: {flags:?}"
    );
    flags
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Everything wrong with one overlay's rendering; empty when all is well.
fn check_overlay(
    name: &str,
    docs: &[Value],
    flags: &BTreeSet<String>,
    rbac: &[Value],
) -> Vec<String> {
    let mut problems = Vec::new();
    let pods = pod_templates(docs);
    if pods.is_empty() {
        problems.push("no workload with a pod template".to_owned());
    }
    for pod in &pods {
        let mut p = Vec::new();
        check_pod(name, docs, pod, flags, rbac, &mut p);
        problems.extend(p.into_iter().map(|m| format!("{}: {m}", pod.owner)));
    }
    problems
}

/// The checks of one pod template.
fn check_pod(
    overlay: &str,
    docs: &[Value],
    pod: &PodTemplate<'_>,
    flags: &BTreeSet<String>,
    rbac: &[Value],
    p: &mut Vec<String>,
) {
    let spec = pod.spec;
    let Some(agent) = container(spec, "sds-agent") else {
        p.push("no container named sds-agent".to_owned());
        return;
    };
    let Some(envoy) = container(spec, "envoy") else {
        p.push("no container named envoy".to_owned());
        return;
    };

    let env = check_agent_and_containers(spec, agent, flags, p);
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| match v {
                EnvValue::Literal(s) => Some(s.as_str()),
                _ => None,
            })
    };

    // The backend.
    let expected_ca = OVERLAYS
        .iter()
        .find(|(o, _)| *o == overlay)
        .map(|(_, ca)| *ca);
    let ca = literal("SDS_AGENT_CA").unwrap_or("embedded");
    match expected_ca {
        Some(want) if want != ca => p.push(format!(
            "SDS_AGENT_CA is {ca:?}; the {overlay} overlay must select {want:?}"
        )),
        None if !OVERLAYS.iter().any(|(_, c)| *c == ca) => {
            p.push(format!("SDS_AGENT_CA {ca:?} is not a backend"))
        }
        _ => {}
    }
    if agent["args"].as_sequence().is_some_and(|a| {
        a.iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with("--ca")))
    }) {
        p.push(
            "the backend is chosen by SDS_AGENT_CA; a --ca argument would override the overlays"
                .to_owned(),
        );
    }

    check_socket(docs, spec, agent, envoy, &env, p);
    check_files(spec, agent, &env, p);
    check_ports_and_probes(pod, agent, &env, p);
    check_disruption_budget(docs, pod, p);

    check_backend(docs, pod, agent, &env, ca, rbac, RbacScope::Namespace, p);
}

/// Where the agent's RBAC applies: its pod's namespace (the sidecar pattern: the agent acts as
/// its pod's service account), or every namespace (node mode: each pod's requests go in that
/// pod's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RbacScope {
    Namespace,
    Cluster,
}

/// What the backend `ca` needs, in either mode: its settings, its token's audience (through
/// [`check_files`]), IRSA, the Istio root ConfigMap, the cert-manager RBAC and in-cluster
/// credentials; and the pod's service account is in the rendering.
#[allow(clippy::too_many_arguments)]
fn check_backend(
    docs: &[Value],
    pod: &PodTemplate<'_>,
    agent: &Value,
    env: &[(String, EnvValue)],
    ca: &str,
    rbac: &[Value],
    scope: RbacScope,
    p: &mut Vec<String>,
) {
    let spec = pod.spec;
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let sa_name = spec["serviceAccountName"].as_str().unwrap_or("default");
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == sa_name);
    if sa.is_none() {
        p.push(format!(
            "the service account {sa_name} is not in the rendering"
        ));
    }

    match ca {
        "vault" => {
            if !literal("SDS_AGENT_VAULT_ADDR").is_some_and(|a| a.starts_with("https://")) {
                p.push(
                    "SDS_AGENT_VAULT_ADDR must be an https:// address (the token travels to it)"
                        .to_owned(),
                );
            }
            if literal("SDS_AGENT_VAULT_ROLE").is_none() {
                p.push("SDS_AGENT_VAULT_ROLE is required with --ca vault".to_owned());
            }
            if literal("SDS_AGENT_VAULT_AUTH") == Some("kubernetes")
                && literal("SDS_AGENT_VAULT_JWT_FILE").is_none()
            {
                p.push("Kubernetes auth needs SDS_AGENT_VAULT_JWT_FILE on a projected token (the pod mounts no default token)".to_owned());
            }
        }
        "istiod" => {
            if literal("SDS_AGENT_CA_TOKEN_FILE").is_none() {
                p.push("--ca istiod needs SDS_AGENT_CA_TOKEN_FILE on a projected token".to_owned());
            }
            match literal("SDS_AGENT_CA_ROOT_CERT").and_then(|f| file_source(spec, agent, f)) {
                Some(FileSource::ConfigMap { name, key }) if name == "istio-ca-root-cert" && key == "root-cert.pem" => {}
                other => p.push(format!(
                    "SDS_AGENT_CA_ROOT_CERT must be root-cert.pem of the istio-ca-root-cert ConfigMap, is {other:?}"
                )),
            }
            if literal("SDS_AGENT_CLUSTER_ID").is_none() {
                p.push("--ca istiod needs SDS_AGENT_CLUSTER_ID".to_owned());
            }
            if pod.meta["labels"]["sidecar.istio.io/inject"] != "false" {
                p.push("the pod must opt out of istio-proxy injection (sidecar.istio.io/inject: \"false\")".to_owned());
            }
        }
        "acm-pca" => {
            let arn = literal("SDS_AGENT_ACM_PCA_ARN").unwrap_or_default();
            let parts: Vec<&str> = arn.split(':').collect();
            if parts.len() != 6
                || parts[..3] != ["arn", "aws", "acm-pca"]
                || !parts[5].starts_with("certificate-authority/")
            {
                p.push(format!(
                    "SDS_AGENT_ACM_PCA_ARN {arn:?} is not a private CA's ARN"
                ));
            }
            let role = sa.map(|s| &s["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]);
            if !role
                .and_then(Value::as_str)
                .is_some_and(|r| r.starts_with("arn:aws:iam::"))
            {
                p.push(format!("the service account {sa_name} must name its IAM role (eks.amazonaws.com/role-arn)"));
            }
            let skipped: BTreeSet<&str> =
                pod.meta["annotations"]["eks.amazonaws.com/skip-containers"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
            let others: BTreeSet<&str> = all_containers(spec)
                .filter_map(|c| c["name"].as_str())
                .filter(|n| *n != "sds-agent")
                .collect();
            if skipped != others {
                p.push(format!("eks.amazonaws.com/skip-containers must name every container but the agent: {others:?}, is {skipped:?}"));
            }
        }
        "cert-manager" => {
            if literal("SDS_AGENT_CERT_MANAGER_ISSUER_NAME").is_none() {
                p.push("--ca cert-manager needs SDS_AGENT_CERT_MANAGER_ISSUER_NAME".to_owned());
            }
            check_in_cluster_credentials(spec, agent, p);
            check_cert_manager_rbac(docs, sa_name, rbac, scope, p);
        }
        _ => {}
    }
}

/// What every pod with the agent must satisfy, whatever talks to it: the agent is a native
/// sidecar; every container is locked down, with resources and a pinned image; the agent's
/// environment holds real flags only, none twice, and its identity from the Downward API.
/// Returns the agent's environment.
fn check_agent_and_containers(
    spec: &Value,
    agent: &Value,
    flags: &BTreeSet<String>,
    p: &mut Vec<String>,
) -> Vec<(String, EnvValue)> {
    // A native sidecar: an init container that kubelet keeps running.
    let is_init = seq(&spec["initContainers"])
        .iter()
        .any(|c| c["name"] == "sds-agent");
    if !is_init || agent["restartPolicy"] != "Always" {
        p.push(
            "sds-agent must be a native sidecar: in initContainers with restartPolicy: Always"
                .to_owned(),
        );
    }

    // Every container locked down.
    for c in all_containers(spec) {
        check_security(spec, c, p);
        check_resources(c, p);
        check_image(c, p);
    }

    // The environment: real flags only, no duplicates, identity from the Downward API.
    let env = env_of(agent);
    check_env_names(&env, flags, p);
    for (key, field) in [
        ("SDS_AGENT_NAMESPACE", "metadata.namespace"),
        ("SDS_AGENT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("SDS_AGENT_POD_NAME", "metadata.name"),
        ("SDS_AGENT_POD_UID", "metadata.uid"),
    ] {
        if !env
            .iter()
            .any(|(k, v)| k == key && *v == EnvValue::Field(field.to_owned()))
        {
            p.push(format!("{key} must come from the Downward API ({field})"));
        }
    }
    env
}

/// Every `SDS_AGENT_*` name is a flag of the built agent, and none is set twice.
fn check_env_names(env: &[(String, EnvValue)], flags: &BTreeSet<String>, p: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for (key, _) in env {
        if !seen.insert(key.as_str()) {
            p.push(format!("{key} is set twice"));
        }
        if key.starts_with("SDS_AGENT_") && !flags.contains(key) {
            p.push(format!("{key} is not a flag of `sds-agent run --help`"));
        }
    }
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities, the
/// runtime's seccomp profile (each from the container, else the pod).
fn check_security(spec: &Value, c: &Value, p: &mut Vec<String>) {
    let name = c["name"].as_str().unwrap_or("?");
    let sc = &c["securityContext"];
    let pod_sc = &spec["securityContext"];
    let either = |key: &str| {
        if sc[key].is_null() {
            &pod_sc[key]
        } else {
            &sc[key]
        }
    };
    if *either("runAsNonRoot") != true {
        p.push(format!("{name}: runAsNonRoot must be true"));
    }
    if either("runAsUser").as_u64().is_none_or(|u| u == 0) {
        p.push(format!("{name}: runAsUser must be set and not 0"));
    }
    if sc["readOnlyRootFilesystem"] != true {
        p.push(format!("{name}: readOnlyRootFilesystem must be true"));
    }
    if sc["allowPrivilegeEscalation"] != false {
        p.push(format!("{name}: allowPrivilegeEscalation must be false"));
    }
    if sc["privileged"] == true {
        p.push(format!("{name}: must not be privileged"));
    }
    let drop: Vec<&str> = seq(&sc["capabilities"]["drop"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if drop != ["ALL"] || !seq(&sc["capabilities"]["add"]).is_empty() {
        p.push(format!("{name}: capabilities must drop ALL and add none"));
    }
    if either("seccompProfile")["type"] != "RuntimeDefault" {
        p.push(format!("{name}: seccompProfile must be RuntimeDefault"));
    }
}

/// CPU and memory requests and a memory limit on every container; the agent's memory request
/// is at least its measured peak.
fn check_resources(c: &Value, p: &mut Vec<String>) {
    let name = c["name"].as_str().unwrap_or("?");
    let r = &c["resources"];
    for (what, v) in [
        ("requests.cpu", &r["requests"]["cpu"]),
        ("requests.memory", &r["requests"]["memory"]),
        ("limits.memory", &r["limits"]["memory"]),
    ] {
        if v.is_null() {
            p.push(format!("{name}: resources.{what} must be set"));
        }
    }
    let request = r["requests"]["memory"].as_str().and_then(bytes);
    let limit = r["limits"]["memory"].as_str().and_then(bytes);
    if let (Some(request), Some(limit)) = (request, limit)
        && limit < request
    {
        p.push(format!("{name}: the memory limit is below the request"));
    }
    if name == "sds-agent" && request.is_some_and(|r| r < MEASURED_PEAK_RSS) {
        p.push(format!(
            "{name}: the memory request is below the measured peak of {} MiB",
            MEASURED_PEAK_RSS / MIB
        ));
    }
}

/// Images carry a tag (set by kustomize `images:`), never `latest`.
fn check_image(c: &Value, p: &mut Vec<String>) {
    let name = c["name"].as_str().unwrap_or("?");
    let image = c["image"].as_str().unwrap_or_default();
    let tag = image
        .rsplit('/')
        .next()
        .and_then(|last| last.split_once(':'))
        .map(|(_, t)| t);
    if !image.contains('@') && !tag.is_some_and(|t| !t.is_empty() && t != "latest") {
        p.push(format!(
            "{name}: image {image:?} must be pinned to a tag (kustomize images:)"
        ));
    }
}

/// The socket: an absolute path on an emptyDir mounted at the same place in the agent and in
/// Envoy; Envoy's bootstrap dials that path; one user for both when the mode is 0600.
fn check_socket(
    docs: &[Value],
    spec: &Value,
    agent: &Value,
    envoy: &Value,
    env: &[(String, EnvValue)],
    p: &mut Vec<String>,
) {
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let socket = literal("SDS_AGENT_SOCKET").unwrap_or_default();
    if socket != SOCKET {
        p.push(format!("SDS_AGENT_SOCKET must be {SOCKET}, is {socket:?}"));
        return;
    }
    let Some((mount, _)) = mount_for(agent, socket) else {
        p.push(format!("the agent has no volume at {socket}"));
        return;
    };
    let volume = volume(spec, mount["name"].as_str().unwrap_or_default());
    if volume.is_none_or(|v| v.get("emptyDir").is_none()) {
        p.push("the socket's volume must be an emptyDir".to_owned());
    }
    let envoy_mount = mount_for(envoy, socket);
    if !envoy_mount
        .is_some_and(|(m, _)| m["name"] == mount["name"] && m["mountPath"] == mount["mountPath"])
    {
        p.push(format!(
            "envoy must mount the socket's emptyDir {} at {}",
            mount["name"].as_str().unwrap_or("?"),
            mount["mountPath"].as_str().unwrap_or("?")
        ));
    }
    if let Some(app) = all_containers(spec).find(|c| {
        c["name"] != "sds-agent" && c["name"] != "envoy" && mount_for(c, socket).is_some()
    }) {
        p.push(format!(
            "{} mounts the socket's volume; only the agent and Envoy should",
            app["name"].as_str().unwrap_or("?")
        ));
    }

    // Envoy's bootstrap: the ConfigMap file its -c names; the pipe of sds-grpc, resolved from
    // its working directory; the trust domain it accepts.
    match envoy_bootstrap(docs, spec, envoy) {
        Err(e) => p.push(e),
        Ok(bootstrap) => {
            let workdir = envoy["workingDir"].as_str().unwrap_or("");
            let resolved = envoy_dials(&bootstrap, workdir);
            if resolved.as_deref() != Some(socket) {
                p.push(format!("envoy's sds-grpc cluster dials {resolved:?} (workingDir {workdir:?}), not the agent's socket {socket}"));
            }
            let td = literal("SDS_AGENT_TRUST_DOMAIN").unwrap_or("cluster.local");
            let prefix = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
                ["typed_config"]["common_tls_context"]["combined_validation_context"]["default_validation_context"]
                ["match_typed_subject_alt_names"][0]["matcher"]["prefix"];
            if prefix.as_str() != Some(&format!("spiffe://{td}/")) {
                p.push(format!(
                    "envoy accepts peers matching {prefix:?}; the agent's trust domain is {td}"
                ));
            }
        }
    }

    check_caller(spec, agent, envoy, env, "an SDS caller", p);
}

/// Whether `caller` can open the agent's sockets (`--socket-mode` applies to both) and is then
/// served: the agent checks the caller's uid and primary gid from the kernel (SO_PEERCRED)
/// against `--allowed-uids` / `--allowed-gids`, by default its own uid only. `role` names the
/// caller in the message ("an SDS caller", "a Workload API caller").
fn check_caller(
    spec: &Value,
    agent: &Value,
    caller: &Value,
    env: &[(String, EnvValue)],
    role: &str,
    p: &mut Vec<String>,
) {
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let name = caller["name"].as_str().unwrap_or("?");
    let mode = literal("SDS_AGENT_SOCKET_MODE").unwrap_or("0600");
    let Ok(mode) = u32::from_str_radix(mode.trim_start_matches("0o"), 8) else {
        p.push(format!("SDS_AGENT_SOCKET_MODE {mode:?} is not octal"));
        return;
    };
    let id = |c: &Value, key: &str| {
        c["securityContext"][key]
            .as_u64()
            .or_else(|| spec["securityContext"][key].as_u64())
    };
    let same_user =
        id(agent, "runAsUser").is_some() && id(agent, "runAsUser") == id(caller, "runAsUser");
    let same_group =
        id(agent, "runAsGroup").is_some() && id(agent, "runAsGroup") == id(caller, "runAsGroup");
    let shared_group = same_group || spec["securityContext"]["fsGroup"].as_u64().is_some();
    let ok = same_user || (mode & 0o060 == 0o060 && shared_group) || mode & 0o006 == 0o006;
    if !ok {
        p.push(format!("{name} cannot open a {mode:04o} socket: run it as the same user as the agent, or use 0660 and a shared group"));
    }

    // Who the agent serves once connected.
    let ids = |key: &str| -> Option<Vec<u64>> {
        literal(key).map(|list| {
            list.split(',')
                .map(|id| id.trim().parse().unwrap_or(u64::MAX))
                .collect()
        })
    };
    let (uids, gids) = (ids("SDS_AGENT_ALLOWED_UIDS"), ids("SDS_AGENT_ALLOWED_GIDS"));
    let caller_uid = id(caller, "runAsUser");
    let caller_gid = id(caller, "runAsGroup");
    let uid_allowed = match (&uids, &gids) {
        (Some(uids), _) => caller_uid.is_some_and(|u| uids.contains(&u)),
        (None, Some(_)) => false,
        (None, None) => same_user,
    };
    let gid_allowed = gids
        .as_ref()
        .is_some_and(|gids| caller_gid.is_some_and(|g| gids.contains(&g)));
    if !uid_allowed && !gid_allowed {
        p.push(format!(
            "the agent would refuse {name} (uid {caller_uid:?}, gid {caller_gid:?}) as {role}: \
             SDS_AGENT_ALLOWED_UIDS {uids:?}, SDS_AGENT_ALLOWED_GIDS {gids:?}, default the agent's own uid"
        ));
    }
}

/// Every absolute path an `SDS_AGENT_*` variable names is on a volume of the agent (its root
/// filesystem is read-only and the image holds nothing there); token files are projected
/// tokens with their flag's audience.
fn check_files(spec: &Value, agent: &Value, env: &[(String, EnvValue)], p: &mut Vec<String>) {
    for (key, value) in env {
        let Some(path) = value
            .literal()
            .map(|v| {
                if key == "SDS_AGENT_WORKLOAD_API_SOCKET" {
                    v.strip_prefix("unix://").unwrap_or(v)
                } else {
                    v
                }
            })
            .filter(|v| v.starts_with('/'))
        else {
            continue;
        };
        if !key.starts_with("SDS_AGENT_") {
            continue;
        }
        let source = file_source(spec, agent, path);
        let expected_audience = TOKEN_AUDIENCES
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, a)| *a);
        match (&source, expected_audience) {
            (None, _) => p.push(format!("{key}={path} is on no volume of the agent")),
            (Some(FileSource::Token { audience }), Some(want))
                if audience.as_deref() != Some(want) =>
            {
                p.push(format!("{key}={path} is a token of audience {audience:?}; its CA expects audience {want:?}"));
            }
            (Some(FileSource::Token { .. }), _) => {}
            (Some(other), Some(want)) => p.push(format!(
                "{key}={path} must be a projected token of audience {want:?}, is {other:?}"
            )),
            (Some(FileSource::EmptyDir), None)
                if !AGENT_SOCKETS.contains(&key.as_str()) && !key.ends_with("_DIR") =>
            {
                p.push(format!(
                    "{key}={path} is on an emptyDir: nothing puts the file there"
                ));
            }
            _ => {}
        }
    }
}

/// The status listener serves the probes and Prometheus; the admin listener stays on
/// loopback and is named by nothing outside the pod.
fn check_ports_and_probes(
    pod: &PodTemplate<'_>,
    agent: &Value,
    env: &[(String, EnvValue)],
    p: &mut Vec<String>,
) {
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let admin: Option<SocketAddr> = literal("SDS_AGENT_ADMIN_ADDR").map(|a| {
        a.parse()
            .unwrap_or_else(|_| panic!("SDS_AGENT_ADMIN_ADDR {a:?}"))
    });
    if admin.is_some_and(|a| !a.ip().is_loopback()) {
        p.push("SDS_AGENT_ADMIN_ADDR must stay on loopback (it serves POST /rotate)".to_owned());
    }
    let admin_port = admin.map_or(15020, |a| a.port());
    let Some(status) = literal("SDS_AGENT_STATUS_ADDR").and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        p.push("SDS_AGENT_STATUS_ADDR must be set to an address (0.0.0.0:15021)".to_owned());
        return;
    };
    if !status.ip().is_unspecified() {
        p.push(format!("SDS_AGENT_STATUS_ADDR {status} must listen on all addresses, for kubelet and Prometheus"));
    }
    let ports = seq(&agent["ports"]);
    let status_port = ports
        .iter()
        .find(|port| port["containerPort"].as_u64() == Some(u64::from(status.port())));
    let Some(status_name) = status_port.and_then(|port| port["name"].as_str()) else {
        p.push(format!(
            "the agent must declare a named containerPort {}",
            status.port()
        ));
        return;
    };
    if status_name.len() > 15 {
        p.push(format!(
            "port name {status_name} is longer than 15 characters"
        ));
    }
    if ports
        .iter()
        .any(|port| port["containerPort"].as_u64() == Some(u64::from(admin_port)))
    {
        p.push("the admin port must not be declared as a containerPort".to_owned());
    }
    let targets_status =
        |port: &Value| port == status_name || port.as_u64() == Some(u64::from(status.port()));
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        let get = &agent[probe]["httpGet"];
        if get["path"] != path || !targets_status(&get["port"]) {
            p.push(format!(
                "{probe} must GET {path} on the status port {status_name}, is {:?} on {:?}",
                get["path"], get["port"]
            ));
        }
    }
    let startup = &agent["startupProbe"];
    let patience = startup["periodSeconds"].as_u64().unwrap_or(10)
        * startup["failureThreshold"].as_u64().unwrap_or(3);
    // cert-manager's default wait for one approval is 60 s, and a first attempt may fail.
    if patience < 120 {
        p.push(format!("startupProbe gives up after {patience} s; a slow CA (cert-manager: 60 s per attempt) needs at least 120 s"));
    }
    let annotations = &pod.meta["annotations"];
    let scraped_port = annotations["prometheus.io/port"]
        .as_str()
        .and_then(|s| s.parse::<u16>().ok());
    if annotations["prometheus.io/scrape"] != "true"
        || scraped_port != Some(status.port())
        || annotations["prometheus.io/path"] != "/metrics"
    {
        p.push(format!(
            "prometheus.io/port, /path and /scrape must point at /metrics on the status port {}, are {:?}",
            status.port(),
            annotations
        ));
    }
}

/// A workload of two replicas or more has a budget that selects its pods.
fn check_disruption_budget(docs: &[Value], pod: &PodTemplate<'_>, p: &mut Vec<String>) {
    if pod.replicas < 2 {
        return;
    }
    let covered = docs
        .iter()
        .filter(|d| d["kind"] == "PodDisruptionBudget")
        .any(|pdb| {
            let wanted = pdb["spec"]["selector"]["matchLabels"].as_mapping();
            wanted.is_some_and(|m| {
                !m.is_empty() && m.iter().all(|(k, v)| pod.meta["labels"].get(k) == Some(v))
            })
        });
    if !covered {
        p.push(
            "a workload with several replicas needs a PodDisruptionBudget selecting its pods"
                .to_owned(),
        );
    }
}

/// The pod does not automount API credentials, so the agent must get them itself, at the
/// in-cluster path: a token for the API server, its CA, the namespace.
fn check_in_cluster_credentials(spec: &Value, agent: &Value, p: &mut Vec<String>) {
    if spec["automountServiceAccountToken"] != false {
        return;
    }
    let files = [
        ("token", Some(FileSource::Token { audience: None })),
        (
            "ca.crt",
            Some(FileSource::ConfigMap {
                name: "kube-root-ca.crt".into(),
                key: "ca.crt".into(),
            }),
        ),
        ("namespace", Some(FileSource::DownwardApi)),
    ];
    for (file, want) in files {
        let path = format!("{IN_CLUSTER_CREDENTIALS}/{file}");
        let got = file_source(spec, agent, &path);
        if got != want {
            p.push(format!(
                "in-cluster credentials: the agent needs {path} ({want:?}), has {got:?}"
            ));
        }
    }
}

/// The overlay's Role grants what `deploy/cert-manager/rbac.yaml` grants, and a RoleBinding
/// gives it to the pod's service account.
fn check_cert_manager_rbac(
    docs: &[Value],
    sa: &str,
    rbac: &[Value],
    scope: RbacScope,
    p: &mut Vec<String>,
) {
    let (role_kind, binding_kind) = match scope {
        RbacScope::Namespace => ("Role", "RoleBinding"),
        RbacScope::Cluster => ("ClusterRole", "ClusterRoleBinding"),
    };
    let reference = rbac
        .iter()
        .find(|d| d["kind"] == "Role")
        .map(|r| &r["rules"]);
    let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == role_kind).collect();
    let Some(role) = roles.iter().find(|r| Some(&r["rules"]) == reference) else {
        p.push(format!(
            "no {role_kind} grants the rules of deploy/cert-manager/rbac.yaml: {reference:?}"
        ));
        return;
    };
    let bound = docs.iter().filter(|d| d["kind"] == binding_kind).any(|b| {
        b["roleRef"]["kind"] == role_kind
            && b["roleRef"]["name"] == role["metadata"]["name"]
            && seq(&b["subjects"])
                .iter()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa)
    });
    if !bound {
        p.push(format!(
            "no {binding_kind} gives the certificaterequests {role_kind} to the service account {sa}"
        ));
    }
}

/// The PodMonitor selects the pod and scrapes `/metrics` on the agent's status port by name.
fn check_pod_monitor(monitors: &[Value], pod: &PodTemplate<'_>) -> Vec<String> {
    let mut p = Vec::new();
    let Some(monitor) = monitors.iter().find(|d| d["kind"] == "PodMonitor") else {
        return vec!["no PodMonitor in deploy/kubernetes/monitoring".to_owned()];
    };
    if monitor["apiVersion"] != "monitoring.coreos.com/v1" {
        p.push(format!("PodMonitor apiVersion {:?}", monitor["apiVersion"]));
    }
    let spec = &monitor["spec"];
    let known: BTreeSet<&str> = ["selector", "namespaceSelector", "podMetricsEndpoints"].into();
    for key in spec
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.as_str())
    {
        if !known.contains(key) {
            p.push(format!(
                "PodMonitor spec.{key}: not a field this test knows"
            ));
        }
    }
    let selected = spec["selector"]["matchLabels"]
        .as_mapping()
        .is_some_and(|m| {
            !m.is_empty() && m.iter().all(|(k, v)| pod.meta["labels"].get(k) == Some(v))
        });
    if !selected || spec["namespaceSelector"]["any"] != true {
        p.push("the PodMonitor must select the pod by its labels, in any namespace".to_owned());
    }
    let status_name = container(pod.spec, "sds-agent")
        .and_then(|a| {
            seq(&a["ports"])
                .iter()
                .find(|port| port["containerPort"] == 15021)
                .and_then(|port| port["name"].as_str())
        })
        .unwrap_or("?");
    let endpoints = seq(&spec["podMetricsEndpoints"]);
    if endpoints.len() != 1
        || endpoints[0]["port"] != status_name
        || endpoints[0]["path"] != "/metrics"
    {
        p.push(format!(
            "the PodMonitor must scrape /metrics on port {status_name}, has {endpoints:?}"
        ));
    }
    p
}

/// Everything wrong with the Workload API example's rendering; empty when all is well.
fn check_workload_api_example(docs: &[Value], flags: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let pods = pod_templates(docs);
    if pods.is_empty() {
        problems.push("no workload with a pod template".to_owned());
    }
    for pod in &pods {
        let mut p = Vec::new();
        check_workload_api_pod(docs, pod, flags, &mut p);
        problems.extend(p.into_iter().map(|m| format!("{}: {m}", pod.owner)));
    }
    problems
}

/// The checks of a pod whose application takes its identity from the Workload API: what every
/// agent pod needs ([`check_agent_and_containers`]: native sidecar, hardening, resources,
/// pinned images, real flags, the Downward API), the agent's files, probes and ports, the
/// disruption budget, and [`check_workload_api`]; spiffe-helper is the application.
fn check_workload_api_pod(
    docs: &[Value],
    pod: &PodTemplate<'_>,
    flags: &BTreeSet<String>,
    p: &mut Vec<String>,
) {
    let spec = pod.spec;
    let Some(agent) = container(spec, "sds-agent") else {
        p.push("no container named sds-agent".to_owned());
        return;
    };
    let env = check_agent_and_containers(spec, agent, flags, p);
    let ca = env
        .iter()
        .find(|(k, _)| k == "SDS_AGENT_CA")
        .and_then(|(_, v)| v.literal())
        .unwrap_or("embedded");
    if !OVERLAYS.iter().any(|(_, c)| *c == ca) {
        p.push(format!("SDS_AGENT_CA {ca:?} is not a backend"));
    }
    check_files(spec, agent, &env, p);
    check_ports_and_probes(pod, agent, &env, p);
    check_disruption_budget(docs, pod, p);
    let sa_name = spec["serviceAccountName"].as_str().unwrap_or("default");
    if !docs
        .iter()
        .any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == sa_name)
    {
        p.push(format!(
            "the service account {sa_name} is not in the rendering"
        ));
    }
    check_workload_api(docs, spec, agent, &env, p);
    if !all_containers(spec).any(is_spiffe_helper) {
        p.push("no spiffe-helper container, the example's application".to_owned());
    }
}

/// [`other-clients.yaml`](OTHER_CLIENTS) merged into the example: its containers are hardened
/// like the example's and wired to the agent's Workload API ([`check_workload_api`]). Images
/// and resources are the user's to add, so they are not checked. The problems, and the
/// Workload API clients found.
fn check_other_clients(docs: &[Value]) -> (Vec<String>, Vec<String>) {
    let mut p = Vec::new();
    let pods = pod_templates(docs);
    let Some(pod) = pods.first() else {
        return (
            vec!["no workload with a pod template".to_owned()],
            Vec::new(),
        );
    };
    let Some(agent) = container(pod.spec, "sds-agent") else {
        return (vec!["no container named sds-agent".to_owned()], Vec::new());
    };
    for c in all_containers(pod.spec) {
        check_security(pod.spec, c, &mut p);
    }
    let clients = check_workload_api(docs, pod.spec, agent, &env_of(agent), &mut p);
    (p, clients)
}

/// The Workload API's wiring: the agent serves it on an absolute path
/// (`SDS_AGENT_WORKLOAD_API_SOCKET`, `unix://` allowed) on an emptyDir; the SDS socket is on
/// another volume that only the agent mounts; every client ([`workload_api_clients`]) names,
/// in its own syntax, a path that is that very file through its own mount of that volume, and
/// passes the socket's mode and the agent's caller check ([`check_caller`]); linkerd2-proxy
/// asks for the SPIFFE ID the agent issues; and no container but the agent and its clients
/// mounts the volume. Returns the clients' names, sorted.
fn check_workload_api(
    docs: &[Value],
    spec: &Value,
    agent: &Value,
    env: &[(String, EnvValue)],
    p: &mut Vec<String>,
) -> Vec<String> {
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let Some(raw) = literal("SDS_AGENT_WORKLOAD_API_SOCKET") else {
        p.push(
            "SDS_AGENT_WORKLOAD_API_SOCKET must be set: without it the agent serves no Workload API"
                .to_owned(),
        );
        return Vec::new();
    };
    let served = raw.strip_prefix("unix://").unwrap_or(raw);
    if !served.starts_with('/') {
        p.push(format!(
            "SDS_AGENT_WORKLOAD_API_SOCKET must be an absolute path, unix:// in front or not, is {raw:?}"
        ));
        return Vec::new();
    }
    let Some(socket) = socket_file(spec, agent, served) else {
        p.push(format!(
            "the agent has no volume at {served}, its Workload API socket"
        ));
        return Vec::new();
    };
    let (socket_volume, socket_name) = (&socket.0, &socket.1);
    if volume(spec, socket_volume).is_none_or(|v| v.get("emptyDir").is_none()) {
        p.push(format!(
            "the Workload API socket's volume {socket_volume} must be an emptyDir of the pod"
        ));
    }

    // SDS apart: nothing here speaks it, and a Workload API client must not reach it.
    if let Some(sds) = literal("SDS_AGENT_SOCKET")
        && let Some((sds_volume, _)) = socket_file(spec, agent, sds)
    {
        if sds_volume == *socket_volume {
            p.push(format!(
                "the SDS socket {sds} is on the Workload API's volume {sds_volume}: every Workload API \
                 client could open SDS too; give it an emptyDir of its own"
            ));
        } else {
            for c in all_containers(spec).filter(|c| c["name"] != "sds-agent") {
                if mounts(c, &sds_volume) {
                    p.push(format!(
                        "{} mounts the SDS socket's volume {sds_volume}; only the agent should",
                        c["name"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
    }

    let clients = workload_api_clients(docs, spec, p);
    if clients.is_empty() {
        p.push(
            "no container calls the Workload API (spiffe-helper's agent_address, \
             SPIFFE_ENDPOINT_SOCKET, LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS)"
                .to_owned(),
        );
    }
    let td = literal("SDS_AGENT_TRUST_DOMAIN").unwrap_or("cluster.local");
    let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
    let mut names = BTreeSet::new();
    for client in &clients {
        let name = client.container["name"].as_str().unwrap_or("?");
        match &client.path {
            Err(e) => p.push(format!("{name}: {e}")),
            Ok(path) => match socket_file(spec, client.container, path) {
                None => p.push(format!(
                    "{name}: {} names {path}, on no volume of {name}",
                    client.setting
                )),
                Some((v, f)) if v != *socket_volume || f != *socket_name => p.push(format!(
                    "{name}: {} names {path}, which is not the agent's Workload API socket {served} \
                     (file {f} of volume {v}, not {socket_name} of {socket_volume})",
                    client.setting
                )),
                Some(_) => {}
            },
        }
        if client.setting.starts_with("LINKERD2_PROXY_") {
            check_linkerd_identity(spec, client.container, td, sa, p);
        }
        if names.insert(name.to_owned()) {
            check_caller(
                spec,
                agent,
                client.container,
                env,
                "a Workload API caller",
                p,
            );
        }
    }

    // Nobody else.
    for c in all_containers(spec) {
        let name = c["name"].as_str().unwrap_or("?");
        if name != "sds-agent" && !names.contains(name) && mounts(c, socket_volume) {
            p.push(format!(
                "{name} mounts the Workload API socket's volume {socket_volume} but calls no \
                 Workload API; only the agent and its clients should"
            ));
        }
    }
    names.into_iter().collect()
}

/// A container that calls the agent's Workload API, and how it names the socket.
#[derive(Debug)]
struct WorkloadApiClient<'a> {
    container: &'a Value,
    /// Where the address is set: `helper.conf agent_address`, or the variable's name.
    setting: String,
    /// The socket's path as the client resolves it, or why it cannot reach a Unix socket.
    path: Result<String, String>,
}

/// Every container configured to call a Workload API: spiffe-helper by the `agent_address` of
/// its configuration (checked by [`check_spiffe_helper_conf`]), go-spiffe, py-spiffe and
/// java-spiffe programs by `SPIFFE_ENDPOINT_SOCKET`, linkerd2-proxy by
/// `LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS` (or the older
/// `LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET`).
fn workload_api_clients<'a>(
    docs: &[Value],
    spec: &'a Value,
    p: &mut Vec<String>,
) -> Vec<WorkloadApiClient<'a>> {
    let mut clients = Vec::new();
    for c in all_containers(spec).filter(|c| c["name"] != "sds-agent") {
        let name = c["name"].as_str().unwrap_or("?");
        if is_spiffe_helper(c) {
            // spiffe-helper reads SPIFFE_ENDPOINT_SOCKET only when agent_address is not set.
            match spiffe_helper_conf(docs, spec, c) {
                Err(e) => p.push(format!("{name}: {e}")),
                Ok(conf) => {
                    check_spiffe_helper_conf(c, &conf, p);
                    let path = match conf.get("agent_address") {
                        Some(HclValue::Str(a)) => spiffe_helper_path(a),
                        None => Err(
                            "helper.conf sets no agent_address: spiffe-helper would dial \
                                     SPIFFE_ENDPOINT_SOCKET or /tmp/spire-agent/public/api.sock"
                                .to_owned(),
                        ),
                        Some(other) => Err(format!("agent_address is {other:?}, not a string")),
                    };
                    clients.push(WorkloadApiClient {
                        container: c,
                        setting: "helper.conf agent_address".to_owned(),
                        path,
                    });
                }
            }
            continue;
        }
        for (key, value) in env_of(c) {
            let resolve: fn(&str) -> Result<String, String> = match key.as_str() {
                "SPIFFE_ENDPOINT_SOCKET" => spiffe_endpoint_path,
                "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS"
                | "LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET" => linkerd_path,
                _ => continue,
            };
            let path = match &value {
                EnvValue::Literal(v) => resolve(v),
                _ => Err(format!("{key} is not a literal value this test can follow")),
            };
            clients.push(WorkloadApiClient {
                container: c,
                setting: key,
                path,
            });
        }
    }
    clients
}

/// A container running spiffe-helper's image.
fn is_spiffe_helper(c: &Value) -> bool {
    let image = c["image"].as_str().unwrap_or_default();
    let image = image.split('@').next().unwrap_or_default();
    let repo = match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    };
    repo.ends_with("spiffe/spiffe-helper")
}

/// spiffe-helper's configuration: the file its `-config` names (`helper.conf` in its working
/// directory, the image's `/`, without one), read from the ConfigMap mounted there.
fn spiffe_helper_conf(
    docs: &[Value],
    spec: &Value,
    c: &Value,
) -> Result<BTreeMap<String, HclValue>, String> {
    let args: Vec<&str> = seq(&c["command"])
        .iter()
        .chain(seq(&c["args"]))
        .filter_map(Value::as_str)
        .collect();
    let config = args
        .windows(2)
        .find(|w| w[0] == "-config" || w[0] == "--config")
        .map(|w| w[1])
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("-config=").or(a.strip_prefix("--config=")))
        })
        .unwrap_or("helper.conf");
    let config = if config.starts_with('/') {
        config.to_owned()
    } else {
        let workdir = c["workingDir"].as_str().unwrap_or("/");
        format!("{}/{config}", workdir.trim_end_matches('/'))
    };
    match file_source(spec, c, &config) {
        Some(FileSource::ConfigMap { name, key }) => {
            let map = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name.as_str())
                .ok_or(format!(
                    "the ConfigMap {name} of {config} is not in the rendering"
                ))?;
            let text = map["data"][key.as_str()]
                .as_str()
                .ok_or(format!("ConfigMap {name} has no {key}"))?;
            parse_hcl(text).map_err(|e| format!("{config}: {e}"))
        }
        other => Err(format!(
            "its configuration {config} is not a ConfigMap file: {other:?}"
        )),
    }
}

/// What spiffe-helper refuses or what would stop it serving the files: an unknown key; the
/// three X.509 file names not all set; not a daemon (it would write the files once and exit);
/// a certificate directory that is not a writable emptyDir mounted there (the root filesystem
/// is read-only, and spiffe-helper does not create the directory).
fn check_spiffe_helper_conf(c: &Value, conf: &BTreeMap<String, HclValue>, p: &mut Vec<String>) {
    let name = c["name"].as_str().unwrap_or("?");
    for key in conf.keys() {
        if !SPIFFE_HELPER_KEYS.contains(&key.as_str()) {
            p.push(format!(
                "{name}: helper.conf: unknown key {key}, which stops spiffe-helper at start"
            ));
        }
    }
    for key in [
        "svid_file_name",
        "svid_key_file_name",
        "svid_bundle_file_name",
    ] {
        if !matches!(conf.get(key), Some(HclValue::Str(f)) if !f.is_empty()) {
            p.push(format!(
                "{name}: helper.conf must set {key}: the SVID, its key and the bundle are the point"
            ));
        }
    }
    if conf.get("daemon_mode") != Some(&HclValue::Bool(true)) {
        p.push(format!(
            "{name}: helper.conf must set daemon_mode = true, or spiffe-helper writes the files once \
             and exits, and they are not renewed"
        ));
    }
    let cert_dir = match conf.get("cert_dir") {
        Some(HclValue::Str(d)) => d.trim_end_matches('/'),
        _ => "",
    };
    let writable = cert_dir.starts_with('/')
        && mount_for(c, &format!("{cert_dir}/svid.pem")).is_some_and(|(m, rest)| {
            rest == "svid.pem" && m["readOnly"] != true && m["subPath"].is_null()
        });
    if !writable {
        p.push(format!(
            "{name}: helper.conf cert_dir {cert_dir:?} must be the mount path of a writable volume \
             of spiffe-helper (its root filesystem is read-only, and it does not create the directory)"
        ));
    }
}

/// `agent_address` as spiffe-helper dials it: it puts `unix://` in front itself, so the value
/// is a bare path (spiffe/spiffe-helper, pkg/sidecar/util_posix.go).
fn spiffe_helper_path(address: &str) -> Result<String, String> {
    if address.starts_with("unix:") || address.contains("://") {
        return Err(format!(
            "helper.conf agent_address {address:?} must be a bare path: spiffe-helper puts unix:// in \
             front of it itself"
        ));
    }
    if !address.starts_with('/') {
        return Err(format!(
            "helper.conf agent_address {address:?} must be an absolute path"
        ));
    }
    Ok(address.to_owned())
}

/// `SPIFFE_ENDPOINT_SOCKET` as go-spiffe parses it (spiffe/go-spiffe,
/// v2/workloadapi/addr_posix.go): a `unix:` URI, `unix:///path` or `unix:/path`; a bare path,
/// an opaque `unix:path`, a query or a fragment are refused. A host would not name a local file.
fn spiffe_endpoint_path(address: &str) -> Result<String, String> {
    let Some(rest) = address.strip_prefix("unix:") else {
        return Err(if address.starts_with("tcp:") {
            format!(
                "SPIFFE_ENDPOINT_SOCKET {address:?} is TCP; the agent serves a Unix socket only"
            )
        } else {
            format!(
                "SPIFFE_ENDPOINT_SOCKET {address:?} must be a unix:// URI: go-spiffe refuses an address \
                 without a tcp:// or unix:// scheme"
            )
        });
    };
    if rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "SPIFFE_ENDPOINT_SOCKET {address:?}: a unix URI must not have a query or a fragment"
        ));
    }
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => {
            let at = authority_and_path
                .find('/')
                .unwrap_or(authority_and_path.len());
            let (host, path) = authority_and_path.split_at(at);
            if !host.is_empty() {
                return Err(format!(
                    "SPIFFE_ENDPOINT_SOCKET {address:?} names a host, {host:?}: unix:///absolute/path"
                ));
            }
            path
        }
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(format!(
            "SPIFFE_ENDPOINT_SOCKET {address:?}: a unix URI must not be opaque (go-spiffe); \
             unix:///absolute/path"
        ));
    }
    Ok(path.to_owned())
}

/// `LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS` as linkerd2-proxy dials it: `unix:` is
/// stripped and the rest connected to as a path (linkerd/linkerd2-proxy,
/// linkerd/app/src/spire.rs), so `unix:///p`, `unix:/p` and `/p` all reach `/p` (the kernel
/// reads several leading slashes as one).
fn linkerd_path(address: &str) -> Result<String, String> {
    let rest = address.strip_prefix("unix:").unwrap_or(address);
    if !rest.starts_with('/') {
        return Err(format!(
            "the Workload API address {address:?} must be an absolute path, with or without unix: \
             (linkerd2-proxy connects to what follows unix: as a path)"
        ));
    }
    Ok(format!("/{}", rest.trim_start_matches('/')))
}

/// linkerd2-proxy picks, among the SVIDs it is sent, the one whose SPIFFE ID is
/// `LINKERD2_PROXY_IDENTITY_SERVER_ID`: it must be the ID the agent issues (with the sample
/// namespace for the Downward API's). It also needs a server name and its trust anchors.
fn check_linkerd_identity(spec: &Value, c: &Value, td: &str, sa: &str, p: &mut Vec<String>) {
    let name = c["name"].as_str().unwrap_or("?");
    let env = container_env(spec, c);
    let want = format!("spiffe://{td}/ns/{SAMPLE_NAMESPACE}/sa/{sa}");
    let id = env.get("LINKERD2_PROXY_IDENTITY_SERVER_ID");
    if id != Some(&Some(want.clone())) {
        p.push(format!(
            "{name}: LINKERD2_PROXY_IDENTITY_SERVER_ID must be the SPIFFE ID the agent issues, {want} \
             here, is {id:?}"
        ));
    }
    for key in [
        "LINKERD2_PROXY_IDENTITY_SERVER_NAME",
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
    ] {
        if !env.contains_key(key) {
            p.push(format!("{name}: linkerd2-proxy needs {key}"));
        }
    }
}

/// The file a container reaches at `path`: the volume, and the file's path inside it (below
/// the mount's subPath, if any).
fn socket_file(spec: &Value, c: &Value, path: &str) -> Option<(String, String)> {
    let (mount, rest) = mount_for(c, path)?;
    let name = mount["name"].as_str()?;
    volume(spec, name)?;
    let file = match mount["subPath"].as_str() {
        Some(sub) => format!("{}/{rest}", sub.trim_end_matches('/')),
        None => rest,
    };
    Some((name.to_owned(), file))
}

fn mounts(c: &Value, volume: &str) -> bool {
    seq(&c["volumeMounts"]).iter().any(|m| m["name"] == volume)
}

/// Whether the agent, with the settings `validate` resolved, serves `caller`: the socket's
/// mode lets the caller's uid or primary gid connect (connecting takes write permission), and
/// its uid or gid passes `--allowed-uids` / `--allowed-gids`, whose default is the agent's own
/// uid unless `--allowed-gids` is given.
fn agent_admits(resolved: &serde_json::Value, agent: &Value, caller: &Value) -> bool {
    let id = |c: &Value, key: &str| c["securityContext"][key].as_u64();
    let (agent_uid, agent_gid) = (id(agent, "runAsUser"), id(agent, "runAsGroup"));
    let (uid, gid) = (id(caller, "runAsUser"), id(caller, "runAsGroup"));
    let Some(mode) = resolved["socket-mode"]
        .as_str()
        .and_then(|m| u32::from_str_radix(m, 8).ok())
    else {
        return false;
    };
    let can_connect = if uid.is_some() && uid == agent_uid {
        mode & 0o200 != 0
    } else if gid.is_some() && gid == agent_gid {
        mode & 0o020 != 0
    } else {
        mode & 0o002 != 0
    };
    let listed = |key: &str, id: Option<u64>| {
        resolved[key].as_array().is_some_and(|ids| {
            ids.iter()
                .any(|i| i.as_u64().is_some_and(|i| Some(i) == id))
        })
    };
    let no_gids = resolved["allowed-gids"]
        .as_array()
        .is_none_or(|g| g.is_empty());
    let uid_ok = if resolved["allowed-uids"].is_null() {
        no_gids && uid.is_some() && uid == agent_uid
    } else {
        listed("allowed-uids", uid)
    };
    can_connect && (uid_ok || listed("allowed-gids", gid))
}

// ---------------------------------------------------------------------------------------------
// Node mode and the Helm chart

/// The node-mode DaemonSet's checks: [`check_node_pod`] for every pod template, and exactly
/// one DaemonSet. Empty when all is well.
fn check_node_agent(docs: &[Value], flags: &BTreeSet<String>, rbac: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let pods = pod_templates(docs);
    let daemonsets = pods
        .iter()
        .filter(|p| p.owner.starts_with("DaemonSet/"))
        .count();
    if daemonsets != 1 {
        problems.push(format!(
            "node mode is one DaemonSet; the workloads are {:?}",
            pods.iter().map(|p| &p.owner).collect::<Vec<_>>()
        ));
    }
    for pod in &pods {
        let mut p = Vec::new();
        check_node_pod(docs, pod, flags, rbac, &mut p);
        problems.extend(p.into_iter().map(|m| format!("{}: {m}", pod.owner)));
    }
    problems
}

/// One node agent's pod. The hardening of the sidecar pattern, with the deliberate exceptions
/// node mode needs and no others: `hostPID` (the callers' real pids), a hostPath socket
/// directory (`DirectoryOrCreate`, writable by the agent alone), and the `socket-dir` init
/// container, root with CAP_CHOWN only, whose one command hands that directory to the agent's
/// uid. The agent itself is non-root without capabilities, under a uid no workload commonly
/// uses; its settings are real flags, the node's name and kubelet from the Downward API, none
/// of the per-pod identity or caller-uid settings, a 0666 socket; the kubelet RBAC is `get`
/// on nodes/pods or nodes/proxy for its service account; and the backend has what it needs,
/// cluster-wide.
fn check_node_pod(
    docs: &[Value],
    pod: &PodTemplate<'_>,
    flags: &BTreeSet<String>,
    rbac: &[Value],
    p: &mut Vec<String>,
) {
    let spec = pod.spec;
    if !pod.owner.starts_with("DaemonSet/") {
        p.push("node mode runs the agent as a DaemonSet, one pod per node".to_owned());
    }
    let Some(agent) = seq(&spec["containers"])
        .iter()
        .find(|c| c["name"] == "sds-agent")
    else {
        p.push(
            "no container named sds-agent (in node mode the agent is the pod's container)"
                .to_owned(),
        );
        return;
    };

    // Deliberate exception: the host's PID namespace, and nothing else of the host's.
    if spec["hostPID"] != true {
        p.push(
            "hostPID must be true: the agent takes the caller's pid from SO_PEERCRED, and in a \
             PID namespace of its own every caller in another pod is pid 0 and refused"
                .to_owned(),
        );
    }
    for key in ["hostNetwork", "hostIPC"] {
        if spec[key] == true {
            p.push(format!(
                "{key} must not be set: the agent needs the host's pids only"
            ));
        }
    }

    // The hardening, everywhere; the socket-dir init container's exceptions are checked by
    // check_node_socket instead.
    for c in all_containers(spec) {
        let mut cp = Vec::new();
        check_security(spec, c, &mut cp);
        if c["name"] == SOCKET_DIR_INIT {
            cp.retain(|m| !SOCKET_DIR_EXCEPTIONS.iter().any(|e| m.ends_with(e)));
        }
        p.extend(cp);
        check_resources(c, p);
        check_image(c, p);
    }
    let id = |c: &Value, key: &str| {
        c["securityContext"][key]
            .as_u64()
            .or_else(|| spec["securityContext"][key].as_u64())
    };
    if let Some(uid) = id(agent, "runAsUser")
        && COMMON_WORKLOAD_UIDS.contains(&uid)
    {
        p.push(format!(
            "sds-agent: {uid} is a common workload uid: sharing the host's PID namespace, the \
             agent may signal that uid's processes on the node; give it a uid no workload uses"
        ));
    }

    let env = env_of(agent);
    check_env_names(&env, flags, p);
    let literal = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.literal())
    };
    let value = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    if literal("SDS_AGENT_MODE") != Some("node") {
        p.push("SDS_AGENT_MODE must be node".to_owned());
    }
    if value("SDS_AGENT_NODE_NAME") != Some(&EnvValue::Field("spec.nodeName".to_owned())) {
        p.push(
            "SDS_AGENT_NODE_NAME must come from the Downward API (spec.nodeName): the agent \
             serves the pods of its own node only"
                .to_owned(),
        );
    }
    match value("SDS_AGENT_KUBELET_HOST") {
        None => {}
        Some(EnvValue::Field(f)) if f == "status.hostIP" => {}
        Some(EnvValue::Literal(h)) if !h.is_empty() => {}
        Some(other) => p.push(format!(
            "SDS_AGENT_KUBELET_HOST must be status.hostIP (Downward API) or a host, is {other:?}"
        )),
    }
    for key in PER_POD_SETTINGS {
        if value(key).is_some() {
            p.push(format!(
                "{key} must not be set in node mode: each caller's identity comes from \
                 attestation, not from the agent's pod or uid lists"
            ));
        }
    }
    if literal("SDS_AGENT_SOCKET_MODE") != Some("0666") {
        p.push(format!(
            "SDS_AGENT_SOCKET_MODE must be 0666 in node mode (every pod's user connects; \
             attestation decides what it gets), is {:?}",
            literal("SDS_AGENT_SOCKET_MODE")
        ));
    }
    check_node_socket(spec, agent, &env, p);
    check_files(spec, agent, &env, p);
    check_ports_and_probes(pod, agent, &env, p);

    let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
    let namespace = docs
        .iter()
        .find(|d| {
            d["kind"] == "DaemonSet"
                && format!(
                    "DaemonSet/{}",
                    d["metadata"]["name"].as_str().unwrap_or("?")
                ) == pod.owner
        })
        .and_then(|d| d["metadata"]["namespace"].as_str())
        .unwrap_or("default");
    check_kubelet_rbac(docs, sa, namespace, p);

    let ca = literal("SDS_AGENT_CA").unwrap_or("embedded");
    if !OVERLAYS.iter().any(|(_, c)| *c == ca) {
        p.push(format!("SDS_AGENT_CA {ca:?} is not a backend"));
    }
    if ca != "cert-manager" {
        // The kubelet takes the service account's token and CA (cert-manager checks these
        // itself, with its RBAC).
        check_in_cluster_credentials(spec, agent, p);
    }
    check_backend(docs, pod, agent, &env, ca, rbac, RbacScope::Cluster, p);
}

/// The node's socket directory: the agent's socket is on a writable hostPath of type
/// `DirectoryOrCreate`; the `socket-dir` init container (a plain init container that exits)
/// mounts that volume only, drops ALL and adds CHOWN alone, and runs exactly
/// `chown <agent uid>:<agent gid> <its mount>`; no other container mounts it.
fn check_node_socket(spec: &Value, agent: &Value, env: &[(String, EnvValue)], p: &mut Vec<String>) {
    let socket = env
        .iter()
        .find(|(k, _)| k == "SDS_AGENT_SOCKET")
        .and_then(|(_, v)| v.literal())
        .unwrap_or_default();
    if socket != SOCKET {
        p.push(format!("SDS_AGENT_SOCKET must be {SOCKET}, is {socket:?}"));
        return;
    }
    let Some((mount, _)) = mount_for(agent, socket) else {
        p.push(format!("the agent has no volume at {socket}"));
        return;
    };
    let name = mount["name"].as_str().unwrap_or_default();
    if mount["readOnly"] == true {
        p.push("the agent's mount of its socket directory must be writable".to_owned());
    }
    let v = volume(spec, name);
    let host = v.map(|v| &v["hostPath"]);
    if !host.is_some_and(|h| {
        h["type"] == "DirectoryOrCreate"
            && h["path"]
                .as_str()
                .is_some_and(|path| path.starts_with('/') && path != "/")
    }) {
        p.push(format!(
            "the socket's volume must be a hostPath of type DirectoryOrCreate, the node's socket \
             directory, is {v:?}"
        ));
    }
    for c in all_containers(spec) {
        let cname = c["name"].as_str().unwrap_or("?");
        if cname != "sds-agent" && cname != SOCKET_DIR_INIT && mounts(c, name) {
            p.push(format!(
                "{cname} mounts the node's socket directory; only the agent should"
            ));
        }
    }

    // Deliberate exception: the one root container.
    let Some(init) = seq(&spec["initContainers"])
        .iter()
        .find(|c| c["name"] == SOCKET_DIR_INIT)
    else {
        p.push(format!(
            "no {SOCKET_DIR_INIT} init container: kubelet creates the host directory as root, \
             0755, and the agent's uid cannot create its socket there"
        ));
        return;
    };
    if init["restartPolicy"] == "Always" {
        p.push(format!(
            "{SOCKET_DIR_INIT}: must be a plain init container, which exits"
        ));
    }
    let caps = &init["securityContext"]["capabilities"];
    let list = |v: &Value| -> Vec<String> {
        seq(v)
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    if list(&caps["drop"]) != ["ALL"] || list(&caps["add"]) != ["CHOWN"] {
        p.push(format!(
            "{SOCKET_DIR_INIT}: must drop ALL; may add CHOWN and nothing else, adds {:?}",
            list(&caps["add"])
        ));
    }
    let init_mounts = seq(&init["volumeMounts"]);
    let owner = format!(
        "{}:{}",
        agent["securityContext"]["runAsUser"].as_u64().unwrap_or(0),
        agent["securityContext"]["runAsGroup"].as_u64().unwrap_or(0)
    );
    let dir = init_mounts
        .first()
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_default();
    if init_mounts.len() != 1 || init_mounts[0]["name"] != name {
        p.push(format!(
            "{SOCKET_DIR_INIT}: must mount the socket directory {name} and nothing else"
        ));
    }
    let command: Vec<&str> = seq(&init["command"])
        .iter()
        .chain(seq(&init["args"]))
        .filter_map(Value::as_str)
        .collect();
    if command != ["chown", owner.as_str(), dir] {
        p.push(format!(
            "{SOCKET_DIR_INIT}: must only chown {dir} to the agent's {owner}, runs {command:?}"
        ));
    }
}

/// The kubelet's pod list: a ClusterRole granting `get` on nodes/pods or nodes/proxy, bound to
/// the agent's service account in its namespace; and no role anywhere grants more than `get`
/// on a nodes/ subresource (`create` on nodes/proxy is exec into any pod on the node).
fn check_kubelet_rbac(docs: &[Value], sa: &str, namespace: &str, p: &mut Vec<String>) {
    let strings = |v: &Value| -> Vec<String> {
        seq(v)
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut granting = Vec::new();
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let name = role["metadata"]["name"].as_str().unwrap_or("?");
        for rule in seq(&role["rules"]) {
            let resources = strings(&rule["resources"]);
            let verbs = strings(&rule["verbs"]);
            if !resources.iter().any(|r| r.starts_with("nodes")) {
                continue;
            }
            if verbs != ["get"] {
                p.push(format!(
                    "{} {name} grants {verbs:?} on {resources:?}: only get",
                    role["kind"].as_str().unwrap_or("?")
                ));
            }
            if role["kind"] == "ClusterRole"
                && strings(&rule["apiGroups"]) == [""]
                && resources
                    .iter()
                    .any(|r| r == "nodes/pods" || r == "nodes/proxy")
                && verbs.iter().any(|v| v == "get")
            {
                granting.push(name.to_owned());
            }
        }
    }
    if granting.is_empty() {
        p.push(
            "no ClusterRole grants get on nodes/pods or nodes/proxy (kubelet's GET /pods)"
                .to_owned(),
        );
        return;
    }
    let bound = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding")
        .any(|b| {
            b["roleRef"]["kind"] == "ClusterRole"
                && granting.iter().any(|g| b["roleRef"]["name"] == g.as_str())
                && seq(&b["subjects"]).iter().any(|s| {
                    s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == namespace
                })
        });
    if !bound {
        p.push(format!(
            "the kubelet ClusterRole {granting:?} is not bound to the service account {sa} in \
             namespace {namespace}"
        ));
    }
}

/// Whether some ClusterRole of the rendering grants `resource`.
fn kubelet_rbac_grants(docs: &[Value], resource: &str) -> bool {
    docs.iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .flat_map(|r| seq(&r["rules"]))
        .any(|rule| seq(&rule["resources"]).iter().any(|r| r == resource))
}

/// A workload of the node agent (`agent`, its rendering): no agent in the pod; every
/// container hardened, with resources and a pinned image; Envoy mounts, read-only, the agent's
/// very host directory at the socket's directory, and its bootstrap dials the socket there;
/// no other container mounts it; a budget when it has replicas.
fn check_node_workload(docs: &[Value], agent: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let host_dir = pod_templates(agent).iter().find_map(|pod| {
        let a = container(pod.spec, "sds-agent")?;
        let (mount, _) = mount_for(a, SOCKET)?;
        volume(pod.spec, mount["name"].as_str()?)?["hostPath"]["path"]
            .as_str()
            .map(str::to_owned)
    });
    let Some(host_dir) = host_dir else {
        return vec!["the node agent has no host directory at its socket".to_owned()];
    };
    let pods = pod_templates(docs);
    if pods.is_empty() {
        problems.push("no workload with a pod template".to_owned());
    }
    for pod in &pods {
        let spec = pod.spec;
        let mut p = Vec::new();
        if container(spec, "sds-agent").is_some() {
            p.push("the node agent serves this pod: no sds-agent in it".to_owned());
        }
        for c in all_containers(spec) {
            check_security(spec, c, &mut p);
            check_resources(c, &mut p);
            check_image(c, &mut p);
        }
        check_disruption_budget(docs, pod, &mut p);
        match container(spec, "envoy") {
            None => p.push("no container named envoy".to_owned()),
            Some(envoy) => match mount_for(envoy, SOCKET) {
                None => p.push(format!("envoy has no volume at {SOCKET}")),
                Some((mount, _)) => {
                    let name = mount["name"].as_str().unwrap_or_default();
                    if mount["readOnly"] != true {
                        p.push(
                            "envoy must mount the agent's socket directory read-only".to_owned(),
                        );
                    }
                    let v = volume(spec, name);
                    let host = v.map(|v| &v["hostPath"]);
                    if !host.is_some_and(|h| {
                        h["path"] == host_dir.as_str()
                            && (h["type"] == "Directory" || h["type"] == "DirectoryOrCreate")
                    }) {
                        p.push(format!(
                            "envoy's {SOCKET} is on {v:?}, not the agent's {host_dir}"
                        ));
                    }
                    for c in all_containers(spec).filter(|c| c["name"] != "envoy") {
                        if mounts(c, name) {
                            p.push(format!(
                                "{} mounts the agent's socket directory; only Envoy should",
                                c["name"].as_str().unwrap_or("?")
                            ));
                        }
                    }
                    match envoy_bootstrap(docs, spec, envoy) {
                        Err(e) => p.push(e),
                        Ok(bootstrap) => {
                            let workdir = envoy["workingDir"].as_str().unwrap_or("");
                            let dials = envoy_dials(&bootstrap, workdir);
                            if dials.as_deref() != Some(SOCKET) {
                                p.push(format!(
                                    "envoy's sds-grpc cluster dials {dials:?} (workingDir \
                                     {workdir:?}), not the agent's socket {SOCKET}"
                                ));
                            }
                        }
                    }
                }
            },
        }
        let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
        if !docs
            .iter()
            .any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == sa)
        {
            p.push(format!("the service account {sa} is not in the rendering"));
        }
        problems.extend(p.into_iter().map(|m| format!("{}: {m}", pod.owner)));
    }
    problems
}

/// The chart in pod mode: no pod of its own; one ConfigMap of agent settings (real flags, none
/// twice, none of the pod's own identity, the socket Envoy dials, the status and admin
/// listeners); the Envoy bootstrap ConfigMap, `deploy/envoy/sidecar.yaml` with the trust
/// domain's prefix, dialling that socket; with cert-manager, the Role of
/// `deploy/cert-manager/rbac.yaml` bound to each of `accounts`. The problems, and the settings.
fn check_pod_mode_chart(
    docs: &[Value],
    flags: &BTreeSet<String>,
    rbac: &[Value],
    accounts: &[String],
) -> (Vec<String>, BTreeMap<String, String>) {
    let mut p = Vec::new();
    if !pod_templates(docs).is_empty() {
        p.push("pod mode runs no pod: the agent is each workload's sidecar".to_owned());
    }
    let maps: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["kind"] == "ConfigMap"
                && d["data"].as_mapping().is_some_and(|m| {
                    !m.is_empty()
                        && m.keys()
                            .all(|k| k.as_str().is_some_and(|k| k.starts_with("SDS_AGENT_")))
                })
        })
        .collect();
    if maps.len() != 1 {
        p.push(format!(
            "one ConfigMap of SDS_AGENT_* settings expected, found {}",
            maps.len()
        ));
        return (p, BTreeMap::new());
    }
    let settings: BTreeMap<String, String> = maps[0]["data"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect();
    let env: Vec<(String, EnvValue)> = settings
        .iter()
        .map(|(k, v)| (k.clone(), EnvValue::Literal(v.clone())))
        .collect();
    check_env_names(&env, flags, &mut p);
    for key in &PER_POD_SETTINGS[..4] {
        if settings.contains_key(*key) {
            p.push(format!(
                "{key} is each pod's own (Downward API), not a shared setting"
            ));
        }
    }
    if settings.get("SDS_AGENT_MODE").is_some_and(|m| m != "pod") {
        p.push("the sidecar's settings must not select node mode".to_owned());
    }
    for (key, want) in [
        ("SDS_AGENT_SOCKET", SOCKET),
        ("SDS_AGENT_STATUS_ADDR", "0.0.0.0:15021"),
        ("SDS_AGENT_ADMIN_ADDR", "127.0.0.1:15020"),
    ] {
        if settings.get(key).map(String::as_str) != Some(want) {
            p.push(format!("{key} must be {want}, is {:?}", settings.get(key)));
        }
    }
    let td = settings
        .get("SDS_AGENT_TRUST_DOMAIN")
        .map_or("cluster.local", String::as_str);
    match docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["envoy.yaml"].is_string())
    {
        None => p.push("no ConfigMap with Envoy's bootstrap (envoy.yaml)".to_owned()),
        Some(map) => {
            let text = map["data"]["envoy.yaml"].as_str().unwrap_or_default();
            let original =
                std::fs::read_to_string(repo().join("deploy/envoy/sidecar.yaml")).unwrap();
            let want = original.replace("spiffe://cluster.local/", &format!("spiffe://{td}/"));
            if text != want {
                p.push(format!(
                    "the Envoy bootstrap is not deploy/envoy/sidecar.yaml for the trust domain {td}"
                ));
            }
            let bootstrap: Value = serde_norway::from_str(text).unwrap_or(Value::Null);
            if envoy_dials(&bootstrap, "/").as_deref() != Some(SOCKET) {
                p.push(format!(
                    "the Envoy bootstrap dials {:?} from workingDir /, not {SOCKET}",
                    envoy_dials(&bootstrap, "/")
                ));
            }
        }
    }
    if settings.get("SDS_AGENT_CA").map(String::as_str) == Some("cert-manager") {
        for sa in accounts {
            check_cert_manager_rbac(docs, sa, rbac, RbacScope::Namespace, &mut p);
        }
    }
    (p, settings)
}

/// The problems that only say a node-mode variable is not a flag of the agent built here:
/// what the node-mode tests report apart until node mode's flags are merged.
fn missing_node_flags(problems: &[String]) -> Vec<String> {
    problems
        .iter()
        .filter(|p| {
            NODE_MODE_FLAGS
                .iter()
                .any(|f| p.contains(&format!("{f} is not a flag of")))
        })
        .cloned()
        .collect()
}

/// The path Envoy's `sds-grpc` cluster dials, from its working directory `workdir`.
fn envoy_dials(bootstrap: &Value, workdir: &str) -> Option<String> {
    let pipe = seq(&bootstrap["static_resources"]["clusters"])
        .iter()
        .find(|c| c["name"] == "sds-grpc")
        .and_then(|c| {
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"]
                .as_str()
        })?;
    Some(match pipe.strip_prefix("./") {
        Some(rel) if workdir.starts_with('/') => {
            format!("{}/{rel}", workdir.trim_end_matches('/'))
        }
        Some(_) => format!("(relative to an unset workingDir) {pipe}"),
        None => pipe.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Reading the rendered objects

/// A pod template and what owns it.
#[derive(Debug)]
struct PodTemplate<'a> {
    owner: String,
    replicas: u64,
    meta: &'a Value,
    spec: &'a Value,
}

fn pod_templates(docs: &[Value]) -> Vec<PodTemplate<'_>> {
    docs.iter()
        .filter(|d| {
            [
                "Deployment",
                "StatefulSet",
                "DaemonSet",
                "ReplicaSet",
                "Job",
            ]
            .iter()
            .any(|k| d["kind"] == *k)
        })
        .map(|d| PodTemplate {
            owner: format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            ),
            replicas: if d["kind"] == "DaemonSet" {
                0
            } else {
                d["spec"]["replicas"].as_u64().unwrap_or(1)
            },
            meta: &d["spec"]["template"]["metadata"],
            spec: &d["spec"]["template"]["spec"],
        })
        .collect()
}

fn all_containers(spec: &Value) -> impl Iterator<Item = &Value> {
    seq(&spec["initContainers"])
        .iter()
        .chain(seq(&spec["containers"]))
}

fn container<'a>(spec: &'a Value, name: &str) -> Option<&'a Value> {
    all_containers(spec).find(|c| c["name"] == name)
}

fn volume<'a>(spec: &'a Value, name: &str) -> Option<&'a Value> {
    seq(&spec["volumes"]).iter().find(|v| v["name"] == name)
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

/// A variable's value as kubelet sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EnvValue {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
    /// Any other `valueFrom`.
    Other,
}

impl EnvValue {
    fn literal(&self) -> Option<&str> {
        match self {
            Self::Literal(s) => Some(s),
            _ => None,
        }
    }
}

fn env_of(c: &Value) -> Vec<(String, EnvValue)> {
    seq(&c["env"])
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                EnvValue::Field(field.to_owned())
            } else if e["valueFrom"].is_null() {
                EnvValue::Literal(e["value"].as_str().unwrap_or_default().to_owned())
            } else {
                EnvValue::Other
            };
            (name, value)
        })
        .collect()
}

/// The agent container's environment as kubelet would give it, Downward API fields filled
/// with the sample values; `$(VAR)` references are not used by the manifests and refused.
fn kubelet_env(spec: &Value, agent: &Value) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (name, value) in env_of(agent) {
        let value = match value {
            EnvValue::Literal(s) if s.contains("$(") => {
                return Err(format!("{name}: $(...) references are not expected"));
            }
            EnvValue::Literal(s) => s,
            EnvValue::Field(f) => match f.as_str() {
                "metadata.namespace" => SAMPLE_NAMESPACE.to_owned(),
                "metadata.name" => SAMPLE_POD_NAME.to_owned(),
                "metadata.uid" => SAMPLE_POD_UID.to_owned(),
                "spec.serviceAccountName" => spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                "spec.nodeName" => SAMPLE_NODE_NAME.to_owned(),
                "status.hostIP" => SAMPLE_HOST_IP.to_owned(),
                other => return Err(format!("{name}: no sample value for the field {other}")),
            },
            EnvValue::Other => return Err(format!("{name}: a valueFrom this test cannot resolve")),
        };
        env.insert(name, value);
    }
    Ok(env)
}

/// A container's environment as kubelet sets it: Downward API fields get the sample values,
/// `$(NAME)` is replaced by an earlier variable's value (a later or unknown one is left as
/// written, as kubelet leaves it), and `None` stands for a source this test cannot read (a
/// ConfigMap key, a Secret, ...).
fn container_env(spec: &Value, c: &Value) -> BTreeMap<String, Option<String>> {
    let mut env: BTreeMap<String, Option<String>> = BTreeMap::new();
    for e in seq(&c["env"]) {
        let name = e["name"].as_str().unwrap_or_default().to_owned();
        let value = if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.namespace" => Some(SAMPLE_NAMESPACE.to_owned()),
                "metadata.name" => Some(SAMPLE_POD_NAME.to_owned()),
                "metadata.uid" => Some(SAMPLE_POD_UID.to_owned()),
                "spec.serviceAccountName" => Some(
                    spec["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                ),
                _ => None,
            }
        } else if e["valueFrom"].is_null() {
            let mut value = e["value"].as_str().unwrap_or_default().to_owned();
            for (k, v) in &env {
                if let Some(v) = v {
                    value = value.replace(&format!("$({k})"), v);
                }
            }
            Some(value)
        } else {
            None
        };
        env.insert(name, value);
    }
    env
}

/// A value of an HCL file as this test reads spiffe-helper's: strings, booleans, integers;
/// lists and objects on one line are kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HclValue {
    Str(String),
    Bool(bool),
    Int(i64),
    Other(String),
}

/// The `key = value` lines of an HCL file written as spiffe-helper's configurations are: one
/// assignment a line, `#` and `//` comments. Anything else (a block over several lines, a key
/// set twice) is an error rather than a guess.
fn parse_hcl(text: &str) -> Result<BTreeMap<String, HclValue>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {n}: not `key = value`: {line}"));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {n}: not a key: {key:?}"));
        }
        let value = value.trim();
        let parsed = if let Some(rest) = value.strip_prefix('"') {
            let mut s = String::new();
            let mut chars = rest.chars();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => s.push(chars.next().ok_or(format!("line {n}: a lone backslash"))?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => s.push(c),
                }
            }
            let tail: String = chars.collect();
            let tail = tail.trim();
            if !closed || !(tail.is_empty() || tail.starts_with('#') || tail.starts_with("//")) {
                return Err(format!("line {n}: cannot read the string {value}"));
            }
            HclValue::Str(s)
        } else {
            let v = value
                .split('#')
                .next()
                .unwrap_or_default()
                .split("//")
                .next()
                .unwrap_or_default()
                .trim();
            match v {
                "true" => HclValue::Bool(true),
                "false" => HclValue::Bool(false),
                _ if v.parse::<i64>().is_ok() => HclValue::Int(v.parse().unwrap()),
                _ if (v.starts_with('[') && v.ends_with(']'))
                    || (v.starts_with('{') && v.ends_with('}')) =>
                {
                    HclValue::Other(v.to_owned())
                }
                _ => return Err(format!("line {n}: cannot read the value {v}")),
            }
        };
        if out.insert(key.to_owned(), parsed).is_some() {
            return Err(format!("line {n}: {key} is set twice"));
        }
    }
    Ok(out)
}

/// The deepest volume mount of `c` holding `path`, and the path below it.
fn mount_for<'a>(c: &'a Value, path: &str) -> Option<(&'a Value, String)> {
    seq(&c["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let at = m["mountPath"].as_str()?.trim_end_matches('/');
            let rest = path.strip_prefix(at)?.strip_prefix('/')?;
            Some((m, at.len(), rest.to_owned()))
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(m, _, rest)| (m, rest))
}

/// Where a file a container reads comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileSource {
    /// A projected service-account token; `None`: the API server's audience.
    Token {
        audience: Option<String>,
    },
    ConfigMap {
        name: String,
        key: String,
    },
    Secret {
        name: String,
        key: String,
    },
    DownwardApi,
    EmptyDir,
    Other,
}

/// The source of the file at `path` in container `c`, if a volume holds it.
fn file_source(spec: &Value, c: &Value, path: &str) -> Option<FileSource> {
    let (mount, rest) = mount_for(c, path)?;
    let rest = match mount["subPath"].as_str() {
        Some(sub) if rest.is_empty() => sub.to_owned(),
        Some(sub) => format!("{sub}/{rest}"),
        None => rest,
    };
    let v = volume(spec, mount["name"].as_str()?)?;
    let keyed = |src: &Value| -> Option<String> {
        match src["items"].as_sequence() {
            Some(items) => items
                .iter()
                .find(|i| i["path"] == rest.as_str())
                .and_then(|i| i["key"].as_str())
                .map(str::to_owned),
            None => Some(rest.clone()),
        }
    };
    if v.get("emptyDir").is_some() {
        return Some(FileSource::EmptyDir);
    }
    if let Some(cm) = v.get("configMap") {
        return Some(FileSource::ConfigMap {
            name: cm["name"].as_str()?.to_owned(),
            key: keyed(cm)?,
        });
    }
    if let Some(secret) = v.get("secret") {
        return Some(FileSource::Secret {
            name: secret["secretName"].as_str()?.to_owned(),
            key: keyed(secret)?,
        });
    }
    if let Some(projected) = v.get("projected") {
        for source in seq(&projected["sources"]) {
            if let Some(token) = source.get("serviceAccountToken") {
                if token["path"] == rest.as_str() {
                    return Some(FileSource::Token {
                        audience: token["audience"].as_str().map(str::to_owned),
                    });
                }
            } else if let Some(cm) = source.get("configMap") {
                if let Some(key) = keyed(cm).filter(|_| cm["items"].is_sequence()) {
                    return Some(FileSource::ConfigMap {
                        name: cm["name"].as_str()?.to_owned(),
                        key,
                    });
                }
            } else if let Some(secret) = source.get("secret") {
                if let Some(key) = keyed(secret).filter(|_| secret["items"].is_sequence()) {
                    return Some(FileSource::Secret {
                        name: secret["name"].as_str()?.to_owned(),
                        key,
                    });
                }
            } else if let Some(downward) = source.get("downwardAPI")
                && seq(&downward["items"])
                    .iter()
                    .any(|i| i["path"] == rest.as_str())
            {
                return Some(FileSource::DownwardApi);
            }
        }
        return None;
    }
    Some(FileSource::Other)
}

/// Envoy's bootstrap, parsed: the file its `-c` names, from the ConfigMap mounted there.
fn envoy_bootstrap(docs: &[Value], spec: &Value, envoy: &Value) -> Result<Value, String> {
    let args: Vec<&str> = seq(&envoy["command"])
        .iter()
        .chain(seq(&envoy["args"]))
        .filter_map(Value::as_str)
        .collect();
    let config = args
        .windows(2)
        .find(|w| w[0] == "-c" || w[0] == "--config-path")
        .map(|w| w[1])
        .ok_or("envoy has no -c argument")?;
    match file_source(spec, envoy, config) {
        Some(FileSource::ConfigMap { name, key }) => {
            let map = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name.as_str())
                .ok_or(format!("envoy's ConfigMap {name} is not in the rendering"))?;
            let text = map["data"][key.as_str()]
                .as_str()
                .ok_or(format!("ConfigMap {name} has no {key}"))?;
            serde_norway::from_str(text).map_err(|e| format!("envoy's bootstrap {name}/{key}: {e}"))
        }
        other => Err(format!(
            "envoy's -c {config} is not a ConfigMap file: {other:?}"
        )),
    }
}

/// A Kubernetes memory quantity in bytes (the suffixes the manifests use).
fn bytes(q: &str) -> Option<u64> {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    Some(n * scale)
}

// ---------------------------------------------------------------------------------------------
// Files and YAML

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn relative(dir: &Path) -> String {
    dir.strip_prefix(kubernetes_dir())
        .unwrap_or(dir)
        .display()
        .to_string()
}

/// Every directory under deploy/kubernetes holding a kustomization, sorted.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        if ["kustomization.yaml", "kustomization.yml", "Kustomization"]
            .iter()
            .any(|f| dir.join(f).is_file())
        {
            found.push(dir.to_owned());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for entry in entries {
            walk(&entry, found);
        }
    }
    let mut found = Vec::new();
    walk(&kubernetes_dir(), &mut found);
    found
}

/// The kustomizations under deploy/kubernetes/overlays.
fn overlays() -> Vec<PathBuf> {
    let root = kubernetes_dir().join("overlays");
    kustomizations()
        .into_iter()
        .filter(|d| d.starts_with(&root))
        .collect()
}

/// Every non-empty document of a YAML stream.
fn parse_docs(yaml: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| {
            Value::deserialize(doc).map_err(|e| format!("rendered YAML does not parse: {e}"))
        })
        .filter(|v| !matches!(v, Ok(Value::Null)))
        .collect()
}

fn to_yaml(docs: &[Value]) -> String {
    let mut out = String::new();
    for doc in docs {
        writeln!(out, "---\n{}", serde_norway::to_string(doc).unwrap()).unwrap();
    }
    out
}

/// The Workload API example, rendered.
fn workload_api_example(tools: &Tools) -> Vec<Value> {
    parse_docs(
        &tools
            .render(&kubernetes_dir().join(WORKLOAD_API_EXAMPLE))
            .unwrap(),
    )
    .unwrap()
}

/// The Workload API example with [`OTHER_CLIENTS`] merged, as an overlay of a user's would
/// merge it: a kustomization in a scratch directory with the example as its base and a copy
/// of the patch (kustomize reads no file outside the kustomization's directory, and takes a
/// base by a relative path only).
fn render_with_other_clients(tools: &Tools) -> Result<String, String> {
    let example = kubernetes_dir().join(WORKLOAD_API_EXAMPLE);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::copy(example.join(OTHER_CLIENTS), dir.path().join(OTHER_CLIENTS))
        .map_err(|e| e.to_string())?;
    let up = "../".repeat(dir.path().components().count() - 1);
    let base = format!(
        "{up}{}",
        example
            .strip_prefix("/")
            .map_err(|e| e.to_string())?
            .display()
    );
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             bases:\n  - {base}\npatchesStrategicMerge:\n  - {OTHER_CLIENTS}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    tools.render(dir.path())
}

/// `sds-agent validate` with exactly the environment kubelet would give the pod's agent: that
/// environment, and what the agent resolved. Panics when the agent refuses it.
fn agent_validate(
    pod: &PodTemplate<'_>,
    scratch: &Path,
) -> (BTreeMap<String, String>, serde_json::Value) {
    let agent = container(pod.spec, "sds-agent").expect("an sds-agent container");
    let env = kubelet_env(pod.spec, agent).unwrap();
    let out = Command::new(agent_bin().unwrap())
        .arg("validate")
        .env_clear()
        .envs(&env)
        .current_dir(scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sds-agent validate refused the environment {env:?} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved = serde_json::from_slice(&out.stdout).unwrap();
    (env, resolved)
}

/// A kubeconfig that points nowhere, for `validate` with `--ca cert-manager` outside a pod.
const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: \"https://127.0.0.1:1\"}
users:
- name: nobody
  user: {token: not-a-token}
contexts:
- name: test
  context: {cluster: nowhere, user: nobody}
current-context: test
";

// ---------------------------------------------------------------------------------------------
// Mutations for the negative tests

fn agent_mut(deployment: &mut Value) -> &mut Value {
    container_mut(deployment, "sds-agent")
}

fn container_mut<'a>(deployment: &'a mut Value, name: &str) -> &'a mut Value {
    let spec = &mut deployment["spec"]["template"]["spec"];
    let in_init = seq(&spec["initContainers"])
        .iter()
        .any(|c| c["name"] == name);
    let list = if in_init {
        &mut spec["initContainers"]
    } else {
        &mut spec["containers"]
    };
    list.as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn push_env(c: &mut Value, name: &str, value: &str) {
    let mut entry = serde_norway::Mapping::new();
    entry.insert("name".into(), name.into());
    entry.insert("value".into(), value.into());
    c["env"]
        .as_sequence_mut()
        .unwrap()
        .push(Value::Mapping(entry));
}

fn set_env(c: &mut Value, name: &str, value: &str) {
    let entry = c["env"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"] == name)
        .unwrap();
    entry["value"] = value.into();
}

fn deployment_mut(docs: &mut [Value]) -> &mut Value {
    docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap()
}

/// The mount of `volume` in container `name`.
fn mount_mut<'a>(deployment: &'a mut Value, name: &str, volume: &str) -> &'a mut Value {
    container_mut(deployment, name)["volumeMounts"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["name"] == volume)
        .unwrap()
}

/// Replaces `from` by `to` in the ConfigMap holding helper.conf.
fn set_helper_conf(docs: &mut [Value], from: &str, to: &str) {
    let map = docs
        .iter_mut()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["helper.conf"].is_string())
        .unwrap();
    let text = map["data"]["helper.conf"].as_str().unwrap().to_owned();
    assert!(text.contains(from), "helper.conf has no {from:?}");
    map["data"]["helper.conf"] = text.replace(from, to).into();
}

/// The DaemonSet's pod spec.
fn pod_spec_mut(docs: &mut [Value]) -> &mut Value {
    &mut docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap()["spec"]["template"]["spec"]
}

/// A container of the DaemonSet.
fn node_container_mut<'a>(docs: &'a mut [Value], name: &str) -> &'a mut Value {
    container_mut(
        docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap(),
        name,
    )
}
