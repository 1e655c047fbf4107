//! What a request's status means, and the shape of what is created. The calls themselves
//! are tested against the fake Kubernetes API in `integration/tests/cert_manager.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const ID: &str = "spiffe://example.org/ns/mesh/sa/web";

fn ca() -> (CertManagerCa, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
         https://127.0.0.1:1\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
         context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let mut config = CertManagerConfig::new(
        "mesh",
        IssuerRef {
            name: "mesh-ca".into(),
            kind: "ClusterIssuer".into(),
            group: DEFAULT_ISSUER_GROUP.into(),
        },
    );
    config.credentials = Credentials::Kubeconfig(path);
    (CertManagerCa::new(config).unwrap(), dir)
}

fn with_conditions(conditions: &[(&str, &str, &str, &str)]) -> CertificateRequest {
    CertificateRequest {
        api_version: "cert-manager.io/v1".into(),
        kind: "CertificateRequest".into(),
        metadata: ObjectMeta {
            name: Some("sds-agent-web-x7k2p".into()),
            ..ObjectMeta::default()
        },
        spec: CertificateRequestSpec::default(),
        status: Some(CertificateRequestStatus {
            conditions: conditions
                .iter()
                .map(|(t, s, r, m)| Condition {
                    type_: (*t).into(),
                    status: (*s).into(),
                    reason: Some((*r).into()),
                    message: Some((*m).into()),
                    last_transition_time: None,
                })
                .collect(),
            ..CertificateRequestStatus::default()
        }),
    }
}

#[test]
fn undecided_requests_say_what_they_wait_for() {
    let (ca, _dir) = ca();
    let cases = [
        (with_conditions(&[]), "not approved yet"),
        (
            with_conditions(&[("Approved", "True", "cert-manager.io", "ok")]),
            "approved, not issued yet",
        ),
        (
            with_conditions(&[
                ("Approved", "True", "cert-manager.io", "ok"),
                (
                    "Ready",
                    "False",
                    "Pending",
                    "Waiting on certificate issuance",
                ),
            ]),
            "Ready=False (Pending)",
        ),
    ];
    for (cr, needle) in cases {
        match ca.verdict(&cr) {
            Ok(Verdict::Waiting(what)) => assert!(what.contains(needle), "{what}"),
            Ok(Verdict::Issued(_)) => panic!("issued"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn cert_managers_verdicts_become_errors_with_its_message() {
    let (ca, _dir) = ca();
    let denied = with_conditions(&[(
        "Denied",
        "True",
        "policy.cert-manager.io",
        "No policy approved this request",
    )]);
    let err = ca.verdict(&denied).err().unwrap();
    assert!(matches!(err, CaError::Denied(_)), "{err}");
    assert!(err.to_string().contains("No policy approved"), "{err}");

    let failed = with_conditions(&[
        ("Approved", "True", "cert-manager.io", "ok"),
        (
            "Ready",
            "False",
            "Failed",
            "Failed to sign certificate: boom",
        ),
    ]);
    let err = ca.verdict(&failed).err().unwrap();
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(err.to_string().contains("ClusterIssuer/mesh-ca"), "{err}");
    assert!(err.to_string().contains("boom"), "{err}");

    let invalid = with_conditions(&[
        ("Approved", "True", "cert-manager.io", "ok"),
        ("InvalidRequest", "True", "BadConfig", "isCA is not allowed"),
    ]);
    assert!(matches!(
        ca.verdict(&invalid).err().unwrap(),
        CaError::Misconfigured(_)
    ));
}

#[test]
fn an_issued_request_must_be_approved_and_hold_a_certificate() {
    let (ca, _dir) = ca();
    let unapproved = with_conditions(&[("Ready", "True", "Issued", "ok")]);
    let err = ca.verdict(&unapproved).err().unwrap();
    assert!(matches!(err, CaError::BadResponse(_)), "{err}");
    assert!(err.to_string().contains("never approved"), "{err}");

    let empty = with_conditions(&[
        ("Approved", "True", "cert-manager.io", "ok"),
        ("Ready", "True", "Issued", "ok"),
    ]);
    let err = ca.verdict(&empty).err().unwrap();
    assert!(
        err.to_string().contains("status.certificate is empty"),
        "{err}"
    );

    let mut garbage = empty.clone();
    if let Some(status) = garbage.status.as_mut() {
        status.certificate = Some(ByteString(b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec()));
    }
    assert!(matches!(
        ca.verdict(&garbage).err().unwrap(),
        CaError::BadResponse(_)
    ));
}

#[test]
fn names_and_labels_fit_kubernetes_limits() {
    let id: SpiffeId = ID.parse().unwrap();
    assert_eq!(generate_name(&id), "sds-agent-web-");
    let long: SpiffeId = format!("spiffe://example.org/ns/mesh/sa/{}", "a".repeat(200))
        .parse()
        .unwrap();
    assert!(generate_name(&long).len() <= 253 - 5);
    let hash = identity_hash(&id);
    assert_eq!(hash.len(), 32);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(hash, identity_hash(&id), "stable");
    assert_ne!(hash, identity_hash(&long));
}

#[test]
fn the_request_is_serialized_with_cert_managers_field_names() {
    let (ca, _dir) = ca();
    let req = SignRequest {
        identity: ID.parse().unwrap(),
        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        ttl: Duration::from_secs(86400),
        key_type: crate::KeyType::EcdsaP256,
    };
    let json = serde_json::to_value(ca.request_object(&req, "mesh")).unwrap();
    assert_eq!(json["apiVersion"], "cert-manager.io/v1");
    assert_eq!(json["kind"], "CertificateRequest");
    assert_eq!(json["metadata"]["generateName"], "sds-agent-web-");
    assert_eq!(json["spec"]["isCA"], false);
    assert_eq!(json["spec"]["duration"], "86400s");
    assert_eq!(json["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert!(
        json["metadata"].get("ownerReferences").is_none(),
        "no pod given"
    );
    assert!(json.get("status").is_none());
    // `request` is Go's []byte: base64 of the PEM.
    let request = json["spec"]["request"].as_str().unwrap();
    assert!(request.starts_with("LS0tLS1CRUdJTi"), "{request}");
}

fn api_error(body: serde_json::Value) -> kube::Error {
    kube::Error::Api(Box::new(serde_json::from_value(body).unwrap()))
}

#[test]
fn api_errors_sort_into_retryable_and_not_with_what_to_do() {
    let (ca, _dir) = ca();
    let status = |code: u16, reason: &str, message: &str| {
        api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "code": code, "reason": reason, "message": message,
        }))
    };
    let throttled = ca.classify(
        "mesh",
        &status(429, "TooManyRequests", "slow down"),
        Verb::Create,
    );
    assert!(matches!(throttled, CaError::Throttled(_)), "{throttled}");
    for code in [500, 503, 504] {
        let e = ca.classify("mesh", &status(code, "InternalError", "etcd"), Verb::Get);
        assert!(
            matches!(e, CaError::Unavailable(_)) && e.is_retryable(),
            "{e}"
        );
    }
    let conflict = ca.classify("mesh", &status(409, "AlreadyExists", "x"), Verb::Create);
    assert!(conflict.is_retryable(), "{conflict}");
    let unauthorized = ca.classify(
        "mesh",
        &status(401, "Unauthorized", "Unauthorized"),
        Verb::Create,
    );
    assert!(matches!(unauthorized, CaError::Denied(_)), "{unauthorized}");
    let webhook = ca.classify(
        "mesh",
        &status(
            403,
            "Forbidden",
            "admission webhook \"webhook.cert-manager.io\" denied the request: spec.request",
        ),
        Verb::Create,
    );
    assert!(
        webhook.to_string().contains("an admission webhook refused"),
        "{webhook}"
    );
    assert!(!webhook.to_string().contains("RBAC"), "{webhook}");
    let forbidden = ca.classify("mesh", &status(403, "Forbidden", "no"), Verb::Delete);
    assert!(
        forbidden.to_string().contains("verbs [\"delete\"]"),
        "{forbidden}"
    );
    let no_crd = ca.classify(
        "mesh",
        &status(404, "NotFound", "404 page not found"),
        Verb::Create,
    );
    assert!(
        no_crd.to_string().contains("is cert-manager installed"),
        "{no_crd}"
    );
    let no_ns = ca.classify(
        "mesh",
        &api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
            "reason": "NotFound", "message": "namespaces \"mesh\" not found",
            "details": {"name": "mesh", "kind": "namespaces"},
        })),
        Verb::Create,
    );
    assert!(
        no_ns.to_string().contains("namespace mesh does not exist"),
        "{no_ns}"
    );
    assert!(!no_ns.is_retryable());
}

#[test]
fn outside_a_pod_in_cluster_credentials_are_refused_at_construction() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        eprintln!("running in a pod: in-cluster credentials exist, nothing to refuse");
        return;
    }
    let config = CertManagerConfig::new("mesh", IssuerRef::default());
    let err = CertManagerCa::new(CertManagerConfig {
        issuer: IssuerRef {
            name: "mesh-ca".into(),
            ..IssuerRef::default()
        },
        ..config
    })
    .unwrap_err();
    assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
    assert!(err.to_string().contains("give --kubeconfig"), "{err}");
}

/// The backend as node mode builds it: no namespace of its own.
fn node_ca() -> (CertManagerCa, tempfile::TempDir) {
    let (pod, dir) = ca();
    let mut config = CertManagerConfig::per_pod_namespace(pod.config.issuer.clone());
    config.credentials = pod.config.credentials.clone();
    (CertManagerCa::new(config).unwrap(), dir)
}

#[test]
fn in_node_mode_each_identity_has_the_namespace_its_spiffe_id_names() {
    let (node, _dir) = node_ca();
    let (pod, _pod_dir) = ca();
    for (id, ns) in [
        ("spiffe://example.org/ns/web/sa/frontend", "web"),
        ("spiffe://example.org/ns/payments/sa/default", "payments"),
        ("spiffe://example.org/ns/sa/sa/ns", "sa"),
    ] {
        let id: SpiffeId = id.parse().unwrap();
        assert_eq!(node.namespace_of(&id).unwrap(), ns, "{id}");
        assert_eq!(
            pod.namespace_of(&id).unwrap(),
            "mesh",
            "pod mode: the configured one"
        );
    }
    for (id, needle) in [
        ("spiffe://example.org/workload", "names no namespace"),
        ("spiffe://example.org/ns/web/sa", "names no namespace"),
        (
            "spiffe://example.org/ns/web/sa/x/extra",
            "names no namespace",
        ),
        (
            "spiffe://example.org/namespace/web/sa/x",
            "names no namespace",
        ),
        (
            "spiffe://example.org/ns/Web_1/sa/x",
            "not a Kubernetes namespace name",
        ),
    ] {
        let id: SpiffeId = id.parse().unwrap();
        let err = node.namespace_of(&id).unwrap_err();
        assert!(matches!(err, CaError::Misconfigured(_)), "{err}");
        assert!(!err.is_retryable(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(needle) && text.contains(&id.to_string()),
            "{text}"
        );
    }
}

#[test]
fn in_node_mode_the_request_and_the_hints_name_the_pods_namespace() {
    let (node, _dir) = node_ca();
    let req = SignRequest {
        identity: "spiffe://example.org/ns/web/sa/frontend".parse().unwrap(),
        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        ttl: Duration::from_secs(3600),
        key_type: crate::KeyType::EcdsaP256,
    };
    let json = serde_json::to_value(node.request_object(&req, "web")).unwrap();
    assert_eq!(json["metadata"]["namespace"], "web");
    assert_eq!(json["metadata"]["generateName"], "sds-agent-frontend-");

    let forbidden = node.classify(
        "web",
        &api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
            "reason": "Forbidden",
            "message": "certificaterequests.cert-manager.io is forbidden: User \
                        \"system:serviceaccount:sds-agent:sds-agent\" cannot create resource \
                        \"certificaterequests\" in API group \"cert-manager.io\" in the \
                        namespace \"web\"",
            "details": {"group": "cert-manager.io", "kind": "certificaterequests"},
        })),
        Verb::Create,
    );
    assert!(matches!(forbidden, CaError::Denied(_)), "{forbidden}");
    let text = forbidden.to_string();
    assert!(text.contains("certificaterequests in web"), "{text}");
    assert!(text.contains("(here web)"), "{text}");
    assert!(text.contains("needs a ClusterRole"), "{text}");
    assert!(text.contains("verbs [\"create\"]"), "{text}");

    let no_ns = node.classify(
        "web",
        &api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
            "reason": "NotFound", "message": "namespaces \"web\" not found",
            "details": {"name": "web", "kind": "namespaces"},
        })),
        Verb::Create,
    );
    let text = no_ns.to_string();
    assert!(matches!(no_ns, CaError::Misconfigured(_)), "{text}");
    assert!(text.contains("namespace web, the pod's"), "{text}");
    assert!(!text.contains("--cert-manager-namespace"), "{text}");
}
