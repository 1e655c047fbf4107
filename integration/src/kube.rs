//! A stand-in for the one Kubernetes API endpoint that Vault's Kubernetes auth calls:
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`, and the service-account tokens it
//! vouches for.
//!
//! It owns a loopback HTTP/1.1 server and its fixture of tokens; it never talks to Vault and
//! never decides whether a test passes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::{Error, io_error};

/// The path of the TokenReview API.
pub const TOKENREVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// How long a minted token claims to be valid (`exp - iat`).
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest request the server reads; a TokenReview is a few kilobytes.
const MAX_REQUEST: usize = 1 << 20;
/// How long the server waits for one whole request.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// A loopback kube-apiserver that only reviews tokens, until dropped.
///
/// What it reproduces of kube-apiserver: the TokenReview exchange as Vault's Kubernetes auth
/// performs it. A `POST` of a `TokenReview` to [`TOKENREVIEW_PATH`] is answered `201
/// Created` with the review echoed (`kind`, `apiVersion`, `metadata.creationTimestamp:
/// null`, the `spec` as sent) and a `status`: for a token it minted, `authenticated: true`,
/// the user `system:serviceaccount:<ns>:<sa>` with the account's UID and the groups
/// `system:serviceaccounts`, `system:serviceaccounts:<ns>` and `system:authenticated`, and
/// the `spec.audiences` echoed when the request named any; for any other token,
/// `authenticated: false` with an `error`, still `201`, as the API server does. Other paths
/// are `404`, other methods `405`. Tokens are JWT-shaped with the claims Vault reads before
/// asking for a review: both the legacy secret-token claims
/// (`kubernetes.io/serviceaccount/namespace`, `.../service-account.name`,
/// `.../service-account.uid`) and the projected-token `kubernetes.io` claim, plus `iss`,
/// `sub`, `iat` and `exp`.
///
/// What it does not reproduce: TLS (Vault is given any CA PEM and a plain `http://` host);
/// authentication or authorization of the reviewer's own JWT (it is not looked at); audience
/// checks (audiences are echoed, never compared with the token's); expiry and revocation of
/// tokens (a minted token is valid until the server is dropped); signatures (tokens are
/// signed with nothing a verifier could check, which Vault does not try to do when it
/// delegates to TokenReview); and every other API of Kubernetes.
#[derive(Debug)]
pub struct TokenReviewServer {
    addr: SocketAddr,
    tokens: Arc<Tokens>,
    reviews: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Token -> the service account it stands for.
type Tokens = Mutex<HashMap<String, ServiceAccount>>;

#[derive(Debug, Clone)]
struct ServiceAccount {
    namespace: String,
    name: String,
    uid: String,
}

impl TokenReviewServer {
    /// Binds 127.0.0.1:0 and serves reviews in a task of the current runtime.
    pub async fn start() -> Result<Self, Error> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("binding the TokenReview server"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("reading the TokenReview server's address"))?;
        let tokens = Arc::new(Tokens::default());
        let reviews = Arc::new(AtomicUsize::new(0));
        let (t, r) = (Arc::clone(&tokens), Arc::clone(&reviews));
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting this task ends them too.
            let mut connections = JoinSet::new();
            while let Ok((conn, _)) = listener.accept().await {
                connections.spawn(serve(conn, Arc::clone(&t), Arc::clone(&r)));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            tokens,
            reviews,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`: Vault's `kubernetes_host`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many reviews it has answered, of known and unknown tokens alike (one per Vault
    /// login).
    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }

    /// A JWT-shaped token for Vault's own `token_reviewer_jwt` setting. It is never reviewed
    /// nor checked: it only has to look like a JWT.
    pub fn reviewer_jwt(&self) -> String {
        jwt(&json!({
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:vault:token-reviewer",
        }))
    }

    /// A new token of service account `service_account` in `namespace`, which this server
    /// will then vouch for. Each call mints a distinct token; the account's UID is stable.
    pub fn mint_token(&self, namespace: &str, service_account: &str) -> String {
        let uid = format!("uid-{namespace}-{service_account}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut tokens = self.tokens.lock();
        let token = jwt(&json!({
            "iss": "kubernetes/serviceaccount",
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "iat": now,
            "exp": now + TOKEN_LIFETIME.as_secs(),
            // Distinct tokens for the same account, as real ones are.
            "jti": format!("{}", tokens.len()),
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/service-account.name": service_account,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": uid},
            },
        }));
        tokens.insert(
            token.clone(),
            ServiceAccount {
                namespace: namespace.to_owned(),
                name: service_account.to_owned(),
                uid,
            },
        );
        token
    }

    /// [`Self::mint_token`], for callers written against the earlier async signature.
    pub async fn mint(&self, namespace: &str, service_account: &str) -> String {
        self.mint_token(namespace, service_account)
    }
}

impl Drop for TokenReviewServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWT-shaped token with these claims: base64url header, payload and a signature that
/// signs nothing.
fn jwt(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"sds-agent-tests"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(b"not checked when reviewed");
    format!("{header}.{payload}.{signature}")
}

/// Answers the requests of one connection until the peer closes it or asks to.
async fn serve(mut conn: TcpStream, tokens: Arc<Tokens>, reviews: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        let Ok(Some((head, body))) =
            tokio::time::timeout(READ_LIMIT, read_request(&mut conn, &mut buf))
                .await
                .unwrap_or(Ok(None))
        else {
            return;
        };
        let close = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        let request_line = head.lines().next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let (status, answer) = if path.split('?').next() != Some(TOKENREVIEW_PATH) {
            (
                "404 Not Found",
                status_json(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )
        } else if method != "POST" {
            (
                "405 Method Not Allowed",
                status_json(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ),
            )
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(review) => {
                    reviews.fetch_add(1, Ordering::SeqCst);
                    ("201 Created", answer_review(&review, &tokens))
                }
                Err(e) => (
                    "400 Bad Request",
                    status_json(400, "BadRequest", &e.to_string()),
                ),
            }
        };
        let answer = answer.to_string();
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{answer}",
            answer.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if conn.write_all(reply.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// Reads one request (head and `Content-Length` body) from `conn`, keeping any bytes of the
/// next one in `buf`; `None` when the peer closes between requests.
async fn read_request(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if len > MAX_REQUEST {
                return Err(std::io::Error::other("request too large"));
            }
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Ok(Some((head, body)));
            }
        }
        if buf.len() > MAX_REQUEST {
            return Err(std::io::Error::other("request too large"));
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The TokenReview kube-apiserver would answer to `review`.
fn answer_review(review: &Value, tokens: &Tokens) -> Value {
    let spec = review.get("spec").cloned().unwrap_or_else(|| json!({}));
    let token = spec["token"].as_str().unwrap_or_default();
    let known = tokens.lock().get(token).cloned();
    let status = match known {
        Some(sa) => {
            let mut status = json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
                    "uid": sa.uid,
                    "groups": [
                        "system:serviceaccounts",
                        format!("system:serviceaccounts:{}", sa.namespace),
                        "system:authenticated",
                    ],
                },
            });
            if let Some(audiences) = spec.get("audiences").filter(|a| !a.is_null()) {
                status["audiences"] = audiences.clone();
            }
            status
        }
        None => json!({
            "authenticated": false,
            "error": "[invalid bearer token, token lookup failed]",
        }),
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    })
}

/// A `metav1.Status` failure, as the API server answers errors.
fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http;

    fn claims(token: &str) -> Value {
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    }

    async fn review(server: &TokenReviewServer, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        let r = http::send(
            server.addr(),
            "POST",
            TOKENREVIEW_PATH,
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
        .await
        .unwrap();
        (r.status, serde_json::from_str(&r.body).unwrap())
    }

    #[tokio::test]
    async fn a_minted_token_is_reviewed_as_its_service_account() {
        let server = TokenReviewServer::start().await.unwrap();
        let token = server.mint_token("default", "web");
        assert_ne!(token, server.mint_token("default", "web"));
        let c = claims(&token);
        assert_eq!(c["kubernetes.io/serviceaccount/namespace"], "default");
        assert_eq!(
            c["kubernetes.io/serviceaccount/service-account.name"],
            "web"
        );
        assert_eq!(c["kubernetes.io"]["serviceaccount"]["name"], "web");
        assert_eq!(c["sub"], "system:serviceaccount:default:web");

        let request = json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "spec": {"token": token, "audiences": ["vault"]},
        });
        let (status, answer) = review(&server, &request).await;
        assert_eq!(status, 201);
        assert_eq!(answer["kind"], "TokenReview");
        assert_eq!(answer["spec"], request["spec"]);
        assert_eq!(answer["status"]["authenticated"], true);
        assert_eq!(
            answer["status"]["user"]["username"],
            "system:serviceaccount:default:web"
        );
        assert_eq!(answer["status"]["user"]["uid"], "uid-default-web");
        assert_eq!(
            answer["status"]["user"]["groups"][1],
            "system:serviceaccounts:default"
        );
        assert_eq!(answer["status"]["audiences"], json!(["vault"]));
        assert_eq!(server.reviews(), 1);
    }

    #[tokio::test]
    async fn an_unknown_token_is_not_authenticated() {
        let server = TokenReviewServer::start().await.unwrap();
        let (status, answer) = review(&server, &json!({"spec": {"token": "x.y.z"}})).await;
        assert_eq!(status, 201);
        assert_eq!(answer["status"]["authenticated"], false);
        assert!(answer["status"]["error"].is_string());
        assert_eq!(server.reviews(), 1);

        let r = http::get(server.addr(), "/api/v1/namespaces")
            .await
            .unwrap();
        assert_eq!(r.status, 404);
        let r = http::get(server.addr(), TOKENREVIEW_PATH).await.unwrap();
        assert_eq!(r.status, 405);
        assert_eq!(server.reviews(), 1);
    }
}
