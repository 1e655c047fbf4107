//! The `:authority` values gRPC clients send on a Unix socket, over the agent's real socket.
//!
//! gRPC C-core (Envoy's google_grpc, Python, C++) sends the socket path percent-encoded
//! without its leading `/`, grpc-java sends the raw path, grpc-go sends `localhost`. None of
//! the first two is a URI authority, and the h2 crate used to reset such a stream
//! (hyperium/h2#487); the agent's h2 is patched to treat them as absent (vendor/README.md).
//! These tests speak HTTP/2 by hand, since the h2 and hyper clients cannot send such an
//! authority: the client preface, SETTINGS, one HEADERS frame whose block is HPACK literals
//! (no indexing, no Huffman), and one DATA frame with a gRPC-framed `DiscoveryRequest`.
//!
//! The served cases check that a `default` secret with a certificate chain comes back. The
//! refused cases check that header blocks h2 refused before the patch still are (missing or
//! empty pseudo-headers, `:status` in a request, uppercase or connection-specific names, a
//! CONNECT with an unparsable authority), each with `localhost` and with both socket-path
//! forms as `:authority`, so the new code path is in play.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use sds_agent::RunningAgent;
use sds_agent::config::RunArgs;
use sds_agent::secrets::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
// Frame types and flags (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PROTOCOL_ERROR: u32 = 0x1;

/// An agent with the embedded CA on a temporary Unix socket, serving.
struct Agent {
    _agent: RunningAgent,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn ready() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let config = RunArgs {
            socket: Some(socket.to_string_lossy().into_owned()),
            admin_addr: Some("127.0.0.1:0".into()),
            trust_domain: Some("example.org".into()),
            service_account: Some("web".into()),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        let policy = Policy::from_config(&config);
        let ca = sds_agent::build_ca(&config).unwrap();
        let agent = RunningAgent::start(&config, policy, ca).await.unwrap();
        // Ready: a certificate and a bundle are published (watched, not polled).
        let mut cert = agent
            .manager()
            .subscribe_cert(agent.manager().workload_identity().unwrap());
        let mut bundle = agent.manager().subscribe_bundle();
        tokio::time::timeout(WAIT, async {
            cert.wait_for(Option::is_some).await.unwrap();
            bundle.wait_for(Option::is_some).await.unwrap();
        })
        .await
        .expect("no certificate in time");
        Self {
            _agent: agent,
            socket,
            _dir: dir,
        }
    }

    /// The socket path as gRPC C-core sends it: leading `/` stripped, then percent-encoded
    /// (`URI::PercentEncodeAuthority(absl::StripPrefix(uri.path(), "/"))`).
    fn c_core_authority(&self) -> String {
        let path = self.socket.to_str().unwrap();
        percent_encode_authority(path.strip_prefix('/').unwrap_or(path))
    }

    /// The socket path as grpc-java sends it: raw.
    fn java_authority(&self) -> String {
        self.socket.to_str().unwrap().to_owned()
    }

    /// Sends one request (`headers`, then a DATA frame with a gRPC-framed `DiscoveryRequest`
    /// for `default` and `ROOTCA`, ending the stream if `end_stream`) on a new connection.
    async fn exchange(&self, headers: &[(&str, &str)], end_stream: bool) -> Outcome {
        tokio::time::timeout(WAIT, exchange(&self.socket, headers, end_stream))
            .await
            .unwrap_or_else(|_| panic!("no outcome in time for {headers:?}"))
    }
}

/// What came back for stream 1.
#[derive(Debug)]
enum Outcome {
    /// A `DiscoveryResponse` in a DATA frame.
    Served(Box<DiscoveryResponse>),
    /// The stream ended (END_STREAM or RST_STREAM with this code) without a message.
    Ended { reset: Option<u32> },
    /// RST_STREAM before any response headers.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed with none of the above.
    Closed,
}

/// How h2 refuses a malformed request.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// RST_STREAM(PROTOCOL_ERROR): a malformed message (RFC 9113, section 8.1.1).
    Stream,
    /// GOAWAY(PROTOCOL_ERROR): h2 fails the whole connection when a header block does not
    /// decode (an uppercase name is refused by its HPACK decoder).
    Connection,
}

/// One frame as read: (type, flags, stream id, payload).
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn exchange(socket: &Path, headers: &[(&str, &str)], end_stream: bool) -> Outcome {
    let mut io = UnixStream::connect(socket).await.unwrap();
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, HEADERS, END_HEADERS, 1, &header_block(headers));
    let flags = if end_stream { END_STREAM } else { 0 };
    frame(
        &mut out,
        DATA,
        flags,
        1,
        &grpc_message(&discovery_request()),
    );
    io.write_all(&out).await.unwrap();

    let mut saw_headers = false;
    let mut body = Vec::new();
    loop {
        let Some(f) = read_frame(&mut io).await else {
            return Outcome::Closed;
        };
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                // The server may have closed already (after a GOAWAY still to be read).
                let _ = io.write_all(&ack).await;
            }
            PING if f.flags & ACK == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, PING, ACK, 0, &f.payload);
                let _ = io.write_all(&ack).await;
            }
            GOAWAY => return Outcome::GoAway(be32(&f.payload[4..8])),
            RST_STREAM if f.stream == 1 => {
                let code = be32(&f.payload[..4]);
                return if saw_headers {
                    Outcome::Ended { reset: Some(code) }
                } else {
                    Outcome::Reset(code)
                };
            }
            HEADERS if f.stream == 1 => {
                // Response headers or trailers; their block is not decoded.
                saw_headers = true;
                if f.flags & END_STREAM != 0 {
                    return Outcome::Ended { reset: None };
                }
            }
            DATA if f.stream == 1 => {
                body.extend_from_slice(unpadded(&f));
                if body.len() >= 5 {
                    let len = be32(&body[1..5]) as usize;
                    if body.len() >= 5 + len {
                        let resp = DiscoveryResponse::decode(&body[5..5 + len]).unwrap();
                        return Outcome::Served(Box::new(resp));
                    }
                }
                if f.flags & END_STREAM != 0 {
                    return Outcome::Ended { reset: None };
                }
            }
            // WINDOW_UPDATE, acknowledgements, frames of other streams: the request and the
            // answer fit the initial windows.
            _ => {}
        }
    }
}

/// Reads one frame; `None` at the end of the connection.
async fn read_frame(io: &mut UnixStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: be32(&head[5..9]) & 0x7fff_ffff,
        payload,
    })
}

/// A DATA frame's payload without its padding.
fn unpadded(f: &Frame) -> &[u8] {
    if f.flags & PADDED == 0 {
        return &f.payload;
    }
    let pad = usize::from(f.payload[0]);
    &f.payload[1..f.payload.len() - pad]
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Appends a frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(
        len < 1 << 14,
        "larger than the default SETTINGS_MAX_FRAME_SIZE"
    );
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK header block of "literal header field without indexing, new name" entries,
/// without Huffman coding (RFC 7541, section 6.2.2), in the order given.
fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_string(&mut out, name.as_bytes());
        hpack_string(&mut out, value.as_bytes());
    }
    out
}

/// A string literal: H = 0 and a 7-bit prefix length (RFC 7541, sections 5.1 and 5.2).
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n % 0x80) as u8 | 0x80);
            n /= 0x80;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length.
fn grpc_message(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn discovery_request() -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "test-node".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// gRPC C-core's `URI::PercentEncodeAuthority`: unreserved, sub-delims and `:@[]` stay,
/// every other byte becomes `%XX`.
fn percent_encode_authority(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@[]".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A gRPC request's header block for `path`, with `authority` if given.
fn grpc_headers<'a>(path: &'a str, authority: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![(":method", "POST"), (":scheme", "http"), (":path", path)];
    if let Some(a) = authority {
        h.push((":authority", a));
    }
    h.extend([("content-type", "application/grpc"), ("te", "trailers")]);
    h
}

/// The outcome is a response with the `default` secret, carrying a certificate chain, and
/// the `ROOTCA` secret.
#[track_caller]
fn assert_served(outcome: Outcome, what: &str) {
    let Outcome::Served(resp) = outcome else {
        panic!("{what}: not served: {outcome:?}");
    };
    assert_eq!(resp.type_url, SECRET_TYPE, "{what}");
    let secrets: Vec<Secret> = resp
        .resources
        .iter()
        .map(|any| Secret::decode(any.value.as_slice()).unwrap())
        .collect();
    let default = secrets
        .iter()
        .find(|s| s.name == "default")
        .unwrap_or_else(|| panic!("{what}: no default secret in {secrets:?}"));
    let Some(secret::Type::TlsCertificate(tls)) = &default.r#type else {
        panic!("{what}: default is not a tls_certificate");
    };
    let Some(Specifier::InlineBytes(chain)) = tls
        .certificate_chain
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    else {
        panic!("{what}: default has no inline certificate chain");
    };
    assert!(
        chain.starts_with(b"-----BEGIN CERTIFICATE-----"),
        "{what}: the chain is not PEM"
    );
    assert!(
        secrets.iter().any(|s| s.name == "ROOTCA"),
        "{what}: no ROOTCA secret"
    );
}

#[track_caller]
fn assert_refused(outcome: Outcome, refusal: Refusal, what: &str) {
    let refused = match refusal {
        Refusal::Stream => matches!(outcome, Outcome::Reset(PROTOCOL_ERROR)),
        Refusal::Connection => matches!(outcome, Outcome::GoAway(PROTOCOL_ERROR)),
    };
    assert!(
        refused,
        "{what}: expected {refusal:?} refusal, got {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Served: every authority form gRPC clients send on a Unix socket
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn fetch_with_the_c_core_percent_encoded_path_is_served() {
    let a = Agent::ready().await;
    let authority = a.c_core_authority();
    assert!(authority.contains("%2F") && !authority.starts_with('%'));
    let outcome = a
        .exchange(&grpc_headers(FETCH, Some(&authority)), true)
        .await;
    assert_served(outcome, &authority);
    // The same with the leading `/` encoded too (grpc-swift, older C-core).
    let authority = percent_encode_authority(a.socket.to_str().unwrap());
    assert!(authority.starts_with("%2F"));
    let outcome = a
        .exchange(&grpc_headers(FETCH, Some(&authority)), true)
        .await;
    assert_served(outcome, &authority);
}

#[tokio::test]
async fn fetch_with_the_grpc_java_raw_path_is_served() {
    let a = Agent::ready().await;
    let authority = a.java_authority();
    assert!(authority.starts_with('/'));
    let outcome = a
        .exchange(&grpc_headers(FETCH, Some(&authority)), true)
        .await;
    assert_served(outcome, &authority);
}

#[tokio::test]
async fn fetch_with_localhost_is_served() {
    let a = Agent::ready().await;
    let outcome = a
        .exchange(&grpc_headers(FETCH, Some("localhost")), true)
        .await;
    assert_served(outcome, "localhost");
}

#[tokio::test]
async fn fetch_without_an_authority_is_served() {
    let a = Agent::ready().await;
    let outcome = a.exchange(&grpc_headers(FETCH, None), true).await;
    assert_served(outcome, "no :authority");
}

#[tokio::test]
async fn stream_with_the_c_core_percent_encoded_path_is_served() {
    let a = Agent::ready().await;
    let authority = a.c_core_authority();
    // A SotW stream stays open: the request does not end it, the first response is read.
    let outcome = a
        .exchange(&grpc_headers(STREAM, Some(&authority)), false)
        .await;
    assert_served(outcome, &authority);
}

#[tokio::test]
async fn stream_with_the_grpc_java_raw_path_is_served() {
    let a = Agent::ready().await;
    let authority = a.java_authority();
    let outcome = a
        .exchange(&grpc_headers(STREAM, Some(&authority)), false)
        .await;
    assert_served(outcome, &authority);
}

// ---------------------------------------------------------------------------------------
// Still refused: each is tried with a URI authority and with both socket-path forms, so
// the new code path (an unparsable authority treated as absent) is in play for each
// ---------------------------------------------------------------------------------------

/// Sends `headers(authority)` on a new connection once per authority form and asserts
/// each is refused.
async fn assert_refused_for_each_authority(
    a: &Agent,
    refusal: Refusal,
    what: &str,
    headers: impl Fn(&str) -> Vec<(String, String)>,
) {
    for authority in [
        "localhost".to_owned(),
        a.c_core_authority(),
        a.java_authority(),
    ] {
        let owned = headers(&authority);
        let h: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (&**n, &**v)).collect();
        let outcome = a.exchange(&h, true).await;
        assert_refused(outcome, refusal, &format!("{what}, :authority {authority}"));
    }
}

fn owned(h: &[(&str, &str)]) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_request_without_scheme_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Stream, "no :scheme", |auth| {
        owned(&[(":method", "POST"), (":path", FETCH), (":authority", auth)])
    })
    .await;
}

#[tokio::test]
async fn a_request_without_method_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Stream, "no :method", |auth| {
        owned(&[(":scheme", "http"), (":path", FETCH), (":authority", auth)])
    })
    .await;
}

#[tokio::test]
async fn a_request_with_an_empty_path_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Stream, "empty :path", |auth| {
        owned(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", ""),
            (":authority", auth),
        ])
    })
    .await;
}

#[tokio::test]
async fn a_request_with_an_uppercase_header_name_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Connection, "uppercase header name", |auth| {
        let mut h = owned(&grpc_headers(FETCH, Some(auth)));
        h.push(("X-Request-Id".into(), "1".into()));
        h
    })
    .await;
}

#[tokio::test]
async fn a_request_with_a_status_pseudo_header_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Stream, ":status in a request", |auth| {
        owned(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", FETCH),
            (":authority", auth),
            (":status", "200"),
        ])
    })
    .await;
}

#[tokio::test]
async fn a_request_with_a_connection_header_is_refused() {
    let a = Agent::ready().await;
    assert_refused_for_each_authority(&a, Refusal::Stream, "connection-specific header", |auth| {
        let mut h = owned(&grpc_headers(FETCH, Some(auth)));
        h.push(("connection".into(), "keep-alive".into()));
        h
    })
    .await;
}

#[tokio::test]
async fn a_connect_with_an_unparsable_authority_is_refused() {
    let a = Agent::ready().await;
    for authority in [a.c_core_authority(), a.java_authority()] {
        let outcome = a
            .exchange(&[(":method", "CONNECT"), (":authority", &authority)], true)
            .await;
        assert_refused(outcome, Refusal::Stream, &format!("CONNECT {authority}"));
    }
    // The same CONNECT with a URI authority gets past h2 and is answered (by tonic, with no
    // such method): what refuses the ones above is their authority.
    let outcome = a
        .exchange(
            &[(":method", "CONNECT"), (":authority", "localhost:1")],
            true,
        )
        .await;
    assert!(
        matches!(outcome, Outcome::Ended { reset } if reset != Some(PROTOCOL_ERROR)),
        "CONNECT localhost:1 not answered: {outcome:?}"
    );
}

#[tokio::test]
async fn an_authority_that_is_not_a_valid_field_value_is_still_refused() {
    // RFC 9113, section 8.2.1: NUL, CR, LF and leading or trailing whitespace make a field
    // malformed; the patch treats only well-formed values that are not URI authorities as
    // absent.
    let a = Agent::ready().await;
    let bad = [
        "a\r\nx-injected: 1".to_owned(),
        "a\0b".to_owned(),
        "a\x7fb".to_owned(),
        format!(" {}", a.java_authority()),
        format!("{} ", a.java_authority()),
    ];
    for authority in bad {
        let h = grpc_headers(FETCH, Some(&authority));
        let outcome = a.exchange(&h, true).await;
        assert_refused(
            outcome,
            Refusal::Stream,
            &format!(":authority {authority:?}"),
        );
    }
}
