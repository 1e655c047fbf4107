//! The node-mode kubelet client (`sds_agent::attest::kubelet`) against the fake kubelet of
//! `integration/src/kubelet.rs`, over real sockets: HTTPS with the fake's CA and bearer
//! token, and the read-only port. What pod a container is found in (regular and init
//! containers), a pod UID that does not match, a pod the kubelet learns of late or never,
//! the single flight and the spacing of fetches, and each way the kubelet can refuse.
//!
//! The exact timing rules are proven with paused time in the client's unit tests; here the
//! fake sees real requests, so spacing is checked from its arrival times.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use sds_agent::attest::kubelet::{
    KubeletClient, KubeletConfig, KubeletEndpoint, KubeletError, PodIdentity,
};
use sds_integration::kubelet::{
    FORBIDDEN_TOKEN, FORBIDDEN_USER, FakeContainer, FakeKubelet, FakePod, Runtime,
};
use sds_integration::test_dir;

/// Short enough for quick tests, long enough to tell apart from connection setup.
const POLL: Duration = Duration::from_millis(150);
const ATTEMPTS: u32 = 4;

struct Setup {
    kubelet: FakeKubelet,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn secure() -> Self {
        let dir = test_dir().unwrap();
        let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
        Self { kubelet, dir }
    }

    async fn read_only() -> Self {
        let dir = test_dir().unwrap();
        let kubelet = FakeKubelet::start_read_only(dir.path()).await.unwrap();
        Self { kubelet, dir }
    }

    /// The secure endpoint as the agent would be configured for it.
    fn endpoint(&self) -> KubeletEndpoint {
        KubeletEndpoint::Secure {
            host: self.kubelet.host(),
            port: self.kubelet.port(),
            ca: Some(self.kubelet.ca_path().to_owned()),
            token_file: self.kubelet.token_file().to_owned(),
        }
    }

    fn client_for(&self, endpoint: KubeletEndpoint) -> KubeletClient {
        let mut config = KubeletConfig::new(endpoint);
        config.poll_interval = POLL;
        config.max_attempts = ATTEMPTS;
        config.request_timeout = Duration::from_secs(5);
        KubeletClient::new(config).unwrap()
    }

    fn client(&self) -> KubeletClient {
        self.client_for(self.endpoint())
    }

    /// A token file in the test's directory holding `token`.
    fn token_file(&self, name: &str, token: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path
    }
}

fn identity_of(pod: &FakePod) -> PodIdentity {
    PodIdentity {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        service_account: pod.service_account.clone().unwrap_or("default".into()),
    }
}

#[tokio::test]
async fn a_container_is_found_in_its_pod_over_https() {
    let s = Setup::secure().await;
    let mut web = FakePod::new("shop", "web-0", "web");
    web.init_containers.push(FakeContainer::new("setup"));
    web.containers
        .push(FakeContainer::new("envoy").on(Runtime::CriO));
    let mut db = FakePod::new("shop", "db-0", "ignored");
    db.service_account = None;
    db.containers[0].runtime = Runtime::Docker;
    s.kubelet.set_pods(vec![web.clone(), db.clone()]);
    let client = s.client();

    let found = client.find(&web.uid, web.container_id(0)).await.unwrap();
    assert_eq!(found, identity_of(&web));
    // The sidecar, reported by cri-o, and the finished init container.
    let envoy = client.find(&web.uid, web.container_id(1)).await.unwrap();
    assert_eq!(envoy, identity_of(&web));
    let init = client
        .find(&web.uid, web.init_containers[0].id())
        .await
        .unwrap();
    assert_eq!(init, identity_of(&web));
    // Docker's prefix, and no serviceAccountName: "default".
    let found = client.find(&db.uid, db.container_id(0)).await.unwrap();
    assert_eq!(found.service_account, "default");
    // All from the first list.
    assert_eq!(s.kubelet.pods_requests(), 1);
    assert_eq!(client.fetch_count(), 1);
}

#[tokio::test]
async fn a_container_claimed_for_another_pod_uid_is_refused() {
    let s = Setup::secure().await;
    let web = FakePod::new("shop", "web-0", "web");
    let admin = FakePod::new("ops", "admin-0", "cluster-admin");
    s.kubelet.set_pods(vec![web.clone(), admin.clone()]);
    let client = s.client();
    // A caller whose cgroup says pod `web` but whose container the kubelet lists in
    // `admin` (or the reverse) gets neither identity.
    let err = client
        .find(&web.uid, admin.container_id(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeletError::PodUidMismatch { ref found_uid, .. } if *found_uid == admin.uid),
        "{err}"
    );
    assert!(err.to_string().contains("ops/admin-0"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(s.kubelet.pods_requests(), 1);
}

#[tokio::test]
async fn a_pod_that_appears_after_two_polls_is_found_within_the_bound() {
    let s = Setup::secure().await;
    s.kubelet.add_pod(FakePod::new("shop", "db-0", "db"));
    let late = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod_after(late.clone(), 2);
    let client = s.client();
    let found = client.find(&late.uid, late.container_id(0)).await.unwrap();
    assert_eq!(found, identity_of(&late));
    assert_eq!(s.kubelet.pods_requests(), 3);
    assert_eq!(client.fetch_count(), 3);
}

#[tokio::test]
async fn a_container_being_created_is_found_once_it_has_an_id() {
    let s = Setup::secure().await;
    let mut pod = FakePod::new("shop", "web-0", "web");
    let id = pod.container_id(0).to_owned();
    pod.containers[0].id = None;
    s.kubelet.add_pod(pod.clone());
    let client = s.client();
    let lookup = {
        let client = client.clone();
        let uid = pod.uid.clone();
        let id = id.clone();
        tokio::spawn(async move { client.find(&uid, &id).await })
    };
    // The runtime reports the ID once the first list has gone out without it.
    sds_integration::wait_until("the first pod list", Duration::from_secs(5), || async {
        s.kubelet.pods_requests() >= 1
    })
    .await
    .unwrap();
    pod.containers[0].id = Some(id);
    s.kubelet.replace_pod(pod.clone());
    let found = lookup.await.unwrap().unwrap();
    assert_eq!(found, identity_of(&pod));
    assert!(client.fetch_count() >= 2);
}

#[tokio::test]
async fn a_pod_that_never_appears_is_not_found_after_max_attempts_spaced_fetches() {
    let s = Setup::secure().await;
    let known = FakePod::new("shop", "db-0", "db");
    s.kubelet.add_pod(known.clone());
    let client = s.client();
    // One lookup first, so that every fetch timed below reuses the open connection and
    // arrives as long after its start as the others do.
    client
        .find(&known.uid, known.container_id(0))
        .await
        .unwrap();
    s.kubelet.clear_requests();

    let ghost = FakePod::new("shop", "ghost-0", "ghost");
    let err = client
        .find(&ghost.uid, ghost.container_id(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeletError::PodNotFound { attempts, .. } if attempts == ATTEMPTS),
        "{err}"
    );
    assert!(err.is_retryable());
    let requests = s.kubelet.requests();
    assert_eq!(requests.len(), ATTEMPTS as usize, "{requests:?}");
    // Arrival times lag the client's starts by a near-constant time on one connection;
    // a few milliseconds of scheduling noise are allowed for.
    let slack = Duration::from_millis(10);
    for pair in requests.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap + slack >= POLL,
            "fetches {gap:?} apart, less than {POLL:?}"
        );
    }
}

#[tokio::test]
async fn fifty_concurrent_lookups_cause_one_fetch() {
    let s = Setup::secure().await;
    let pods: Vec<FakePod> = (0..5)
        .map(|i| FakePod::new("shop", &format!("web-{i}"), "web"))
        .collect();
    s.kubelet.set_pods(pods.clone());
    // Slow enough that every lookup arrives while the one fetch is in flight.
    s.kubelet.set_delay(Duration::from_millis(500));
    let client = s.client();
    let mut lookups = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = client.clone();
        let pod = pods[i % pods.len()].clone();
        lookups.spawn(async move {
            let found = client.find(&pod.uid, pod.container_id(0)).await;
            (pod, found)
        });
    }
    while let Some(joined) = lookups.join_next().await {
        let (pod, found) = joined.unwrap();
        assert_eq!(found.unwrap(), identity_of(&pod));
    }
    assert_eq!(s.kubelet.pods_requests(), 1);
    assert_eq!(client.fetch_count(), 1);
}

#[tokio::test]
async fn a_token_the_kubelet_does_not_accept_is_a_401_with_its_message() {
    let s = Setup::secure().await;
    s.kubelet.add_pod(FakePod::new("shop", "web-0", "web"));
    let pod = s.kubelet.pods()[0].clone();
    let client = s.client_for(KubeletEndpoint::Secure {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
        ca: Some(s.kubelet.ca_path().to_owned()),
        token_file: s.token_file("stale-token", "a-token-nobody-issued"),
    });
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Unauthorized { .. }), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("401 unauthorized") && text.ends_with(": Unauthorized"),
        "{text}"
    );
    assert!(!text.contains("a-token-nobody-issued"), "{text}");
    // Not retried.
    assert_eq!(s.kubelet.pods_requests(), 1);
}

#[tokio::test]
async fn a_service_account_without_nodes_proxy_is_a_403_with_the_kubelets_message() {
    let s = Setup::secure().await;
    s.kubelet.add_pod(FakePod::new("shop", "web-0", "web"));
    let pod = s.kubelet.pods()[0].clone();
    let client = s.client_for(KubeletEndpoint::Secure {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
        ca: Some(s.kubelet.ca_path().to_owned()),
        token_file: s.token_file("no-proxy-token", FORBIDDEN_TOKEN),
    });
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Forbidden { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("needs get on nodes/proxy"), "{text}");
    assert!(
        text.contains(&format!(
            "Forbidden (user={FORBIDDEN_USER}, verb=get, resource=nodes, subresource=proxy)"
        )),
        "{text}"
    );
    assert_eq!(s.kubelet.pods_requests(), 1);
}

#[tokio::test]
async fn the_token_is_read_again_at_every_fetch() {
    let s = Setup::secure().await;
    let first = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod(first.clone());
    let client = s.client();
    client
        .find(&first.uid, first.container_id(0))
        .await
        .unwrap();
    // The projected token rotates: the kubelet accepts only the new one, and the file
    // holds it.
    s.kubelet.rotate_token("rotated-token-2").unwrap();
    let second = FakePod::new("shop", "web-1", "web");
    s.kubelet.add_pod(second.clone());
    let found = client
        .find(&second.uid, second.container_id(0))
        .await
        .unwrap();
    assert_eq!(found, identity_of(&second));
    let statuses: Vec<u16> = s.kubelet.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200]);
}

#[tokio::test]
async fn an_answer_that_is_not_a_pod_list_is_refused() {
    let s = Setup::secure().await;
    let pod = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod(pod.clone());
    s.kubelet.set_body_override(Some(
        "{\"kind\":\"PodList\",\"items\":[{\"metadata\":".into(),
    ));
    let client = s.client();
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::BadResponse { .. }), "{err}");
    assert!(err.to_string().contains("is not a PodList"), "{err}");

    s.kubelet
        .set_body_override(Some("<html>login</html>".into()));
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::BadResponse { .. }), "{err}");
    assert_eq!(s.kubelet.pods_requests(), 2);
}

#[tokio::test]
async fn a_kubelet_certificate_from_another_ca_is_refused() {
    let s = Setup::secure().await;
    let pod = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod(pod.clone());
    let (other_root, _, _) =
        sds_integration::pki::serving_pki("someone else", "another root", &["localhost"]).unwrap();
    let other_ca = s.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other_root).unwrap();
    let client = s.client_for(KubeletEndpoint::Secure {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
        ca: Some(other_ca),
        token_file: s.kubelet.token_file().to_owned(),
    });
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("not trusted"), "{err}");
    assert!(!err.is_retryable());
    // The handshake failed, so the kubelet never saw a request (nor the token).
    assert_eq!(s.kubelet.pods_requests(), 0);
    assert_eq!(client.fetch_count(), 1);
}

#[tokio::test]
async fn skipping_verification_still_sends_the_token_and_finds_the_pod() {
    let s = Setup::secure().await;
    let pod = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod(pod.clone());
    let client = s.client_for(KubeletEndpoint::Secure {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
        ca: None,
        token_file: s.kubelet.token_file().to_owned(),
    });
    let found = client.find(&pod.uid, pod.container_id(0)).await.unwrap();
    assert_eq!(found, identity_of(&pod));
}

#[tokio::test]
async fn the_read_only_port_needs_no_token() {
    let s = Setup::read_only().await;
    let pod = FakePod::new("shop", "web-0", "web");
    s.kubelet.add_pod(pod.clone());
    let client = s.client_for(KubeletEndpoint::ReadOnly {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
    });
    let found = client.find(&pod.uid, pod.container_id(0)).await.unwrap();
    assert_eq!(found, identity_of(&pod));
    assert!(s.kubelet.url().starts_with("http://"));
    // HTTPS to the plain port fails; so does plain HTTP to the secure one.
    let https = s.client_for(KubeletEndpoint::Secure {
        host: s.kubelet.host(),
        port: s.kubelet.port(),
        ca: Some(s.kubelet.ca_path().to_owned()),
        token_file: s.kubelet.token_file().to_owned(),
    });
    let ghost = FakePod::new("shop", "ghost-0", "ghost");
    let err = https
        .find(&ghost.uid, ghost.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_kubelet_is_retried_then_answered_unavailable() {
    let s = Setup::secure().await;
    let port = sds_integration::free_port().unwrap();
    let client = s.client_for(KubeletEndpoint::Secure {
        host: "127.0.0.1".into(),
        port,
        ca: Some(s.kubelet.ca_path().to_owned()),
        token_file: s.kubelet.token_file().to_owned(),
    });
    let pod = FakePod::new("shop", "web-0", "web");
    let err = client
        .find(&pod.uid, pod.container_id(0))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Unreachable { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(client.fetch_count(), u64::from(ATTEMPTS));
}

#[tokio::test]
async fn other_paths_and_no_token_get_the_kubelets_answers() {
    // What a client that is not ours sees, to pin the fake's behaviour: authentication
    // comes before routing.
    let s = Setup::secure().await;
    let http = reqwest_client(s.kubelet.ca_path());
    let base = format!("https://{}", s.kubelet.addr());
    let anonymous = http.get(format!("{base}/pods")).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    assert_eq!(anonymous.text().await.unwrap().trim(), "Unauthorized");
    let anywhere = http
        .get(format!("{base}/stats/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(anywhere.status().as_u16(), 401);
    let token = sds_integration::kubelet::TOKEN;
    let elsewhere = http
        .get(format!("{base}/stats/summary"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status().as_u16(), 404);
    let body = http
        .get(format!("{base}/pods"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert!(list["items"].is_null());
}

fn reqwest_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let certs = reqwest::Certificate::from_pem_bundle(&pem).unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only(certs)
        .build()
        .unwrap()
}
