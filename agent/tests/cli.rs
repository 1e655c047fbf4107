//! The `sds-agent` binary as users run it: configuration precedence (flag > env > file >
//! default), clear errors with exit code 2, the socket's permissions and safety rules,
//! signals, `--help`, and no key material in logs.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_types)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sds-agent");

/// The agent command with no SDS_AGENT_* or RUST_LOG inherited from the test's environment.
fn agent() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SDS_AGENT_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn validate_json(cmd: &mut Command) -> serde_json::Value {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "validate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A running agent, killed if the test ends early.
struct Running {
    child: Option<Child>,
    admin: u16,
    log: PathBuf,
}

impl Running {
    fn start(dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        let admin = free_port();
        let log = dir.join(format!("agent-{admin}.log"));
        let child = agent()
            .args(["run", "--admin-addr", &format!("127.0.0.1:{admin}")])
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let r = Self {
            child: Some(child),
            admin,
            log,
        };
        assert!(
            wait_until(Duration::from_secs(15), || http_status(r.admin, "/readyz")
                == Some(200)),
            "agent not ready: {}",
            r.stderr()
        );
        r
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, sig: &str) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let sent = Instant::now();
        assert!(
            Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let deadline = sent + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, sent.elapsed());
            }
            assert!(Instant::now() < deadline, "agent did not exit after {sig}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

fn http_body(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn defaults_and_precedence_flag_env_file() {
    let d = validate_json(agent().arg("validate"));
    assert_eq!(d["socket"], "./var/run/secrets/workload-spiffe-uds/socket");
    assert_eq!(d["socket-mode"], "0600");
    assert_eq!(
        d["spiffe-id"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(d["ca"]["backend"], "embedded");
    assert_eq!(d["cert-ttl"], "1day");
    assert_eq!(d["renew-at"], 0.5);
    assert_eq!(d["key-type"], "ecdsa-p256");
    assert_eq!(d["admin-addr"], "127.0.0.1:15020");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "trust-domain = \"file.org\"\nnamespace = \"file-ns\"\nservice-account = \"file-sa\"\ncert-ttl = \"90m\"\nkey-type = \"rsa-2048\"\n",
    )
    .unwrap();
    // File alone.
    let c = validate_json(agent().arg("validate").arg("--config").arg(&file));
    assert_eq!(c["spiffe-id"], "spiffe://file.org/ns/file-ns/sa/file-sa");
    assert_eq!(c["cert-ttl"], "1h 30m");
    // Env beats file; flag beats env; the file still fills the rest. --config from env too.
    let c = validate_json(
        agent()
            .args(["validate", "--service-account", "flag-sa"])
            .env("SDS_AGENT_CONFIG", &file)
            .env("SDS_AGENT_NAMESPACE", "env-ns")
            .env("SDS_AGENT_SERVICE_ACCOUNT", "env-sa")
            .env("SDS_AGENT_RENEW_AT", "0.7"),
    );
    assert_eq!(c["spiffe-id"], "spiffe://file.org/ns/env-ns/sa/flag-sa");
    assert_eq!(c["renew-at"], 0.7);
    assert_eq!(c["key-type"], "rsa-2048");
}

/// Arguments, environment, and what the error must mention.
type Case = (Vec<String>, Vec<(&'static str, &'static str)>, &'static str);

#[test]
fn bad_input_exits_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let malformed = write("bad.toml", "trust-domain = \"x\"\nnamespace = \n");
    let unknown = write("unknown.toml", "trust_domain = \"x\"\n");
    let garbage = write("garbage.pem", "not a certificate");
    let key = write(
        "key.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let cases: Vec<Case> = vec![
        (
            vec!["--config".into(), malformed.display().to_string()],
            vec![],
            "line 2",
        ),
        (
            vec!["--config".into(), unknown.display().to_string()],
            vec![],
            "unknown field `trust_domain`",
        ),
        (
            vec!["--trust-domain".into(), "Example.COM".into()],
            vec![],
            "--trust-domain",
        ),
        (
            vec!["--namespace".into(), "a/b".into()],
            vec![],
            "--namespace",
        ),
        (
            vec!["--cert-ttl".into(), "soon".into()],
            vec![],
            "--cert-ttl",
        ),
        (
            vec!["--renew-at".into(), "1.5".into()],
            vec![],
            "--renew-at",
        ),
        (
            vec!["--key-type".into(), "ed25519".into()],
            vec![],
            "--key-type",
        ),
        (vec!["--ca".into(), "vault".into()], vec![], "--ca"),
        (
            vec!["--embedded-ca-cert".into(), garbage.display().to_string()],
            vec![],
            "go together",
        ),
        (
            vec![
                "--embedded-ca-cert".into(),
                garbage.display().to_string(),
                "--embedded-ca-key".into(),
                key.display().to_string(),
            ],
            vec![],
            "embedded CA",
        ),
        (
            vec![],
            vec![("SDS_AGENT_KEY_TYPE", "dsa")],
            "SDS_AGENT_KEY_TYPE",
        ),
    ];
    for sub in ["validate", "run"] {
        for (args, env, needle) in &cases {
            let mut cmd = agent();
            cmd.arg(sub)
                .args(args)
                .args(["--socket", &dir.path().join("s").display().to_string()]);
            cmd.args(["--admin-addr", "127.0.0.1:0"]);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = run(&mut cmd);
            let err = String::from_utf8_lossy(&out.stderr);
            let code = out.status.code();
            // Bad CA files are found by `run` only once it builds the CA: exit 1, not 2.
            let want = if sub == "run" && *needle == "embedded CA" {
                Some(1)
            } else {
                Some(2)
            };
            assert_eq!(code, want, "{sub} {args:?} {env:?}: {err}");
            assert!(
                err.contains(needle),
                "{sub} {args:?}: {err:?} lacks {needle:?}"
            );
            assert!(!err.contains("AAAA"), "key file content echoed: {err}");
        }
    }
    assert!(
        !dir.path().join("s").exists(),
        "a refused configuration created the socket"
    );
}

#[test]
fn run_serves_with_tight_permissions_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nested/dirs/sds.sock");
    let mut a = Running::start(dir.path(), &socket, &[]);
    assert_eq!(mode(&socket), 0o600);
    let secrets: serde_json::Value = serde_json::from_str(&http_body(a.admin, "/secrets")).unwrap();
    let names: Vec<&str> = secrets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "ROOTCA"]);
    assert!(
        a.stderr().contains("ephemeral"),
        "the ephemeral root is not announced"
    );
    let (status, took) = a.signal("-TERM");
    assert!(status.success(), "{status}: {}", a.stderr());
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn sigint_and_a_configured_socket_mode() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let mut a = Running::start(dir.path(), &socket, &["--socket-mode", "0660"]);
    assert_eq!(mode(&socket), 0o660);
    let (status, took) = a.signal("-INT");
    assert!(status.success() && took < Duration::from_secs(5));
    assert!(!socket.exists());
}

#[test]
fn a_stale_socket_is_replaced_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    // A crashed run's socket: the file exists, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut first = Running::start(dir.path(), &socket, &[]);
    assert!(
        first.stderr().contains("stale socket"),
        "{}",
        first.stderr()
    );

    // A second agent on the same path must refuse, and leave the first alone.
    let out = run(agent()
        .args(["run", "--admin-addr", "127.0.0.1:0", "--socket"])
        .arg(&socket));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the first agent lost its socket"
    );
    assert_eq!(http_status(first.admin, "/readyz"), Some(200));
    assert!(first.signal("-TERM").0.success());
}

#[test]
fn a_file_at_the_socket_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, "data").unwrap();
    let out = run(agent()
        .args(["run", "--admin-addr", "127.0.0.1:0", "--socket"])
        .arg(&path));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn help_and_version() {
    let out = run(agent().arg("version"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sds-agent 0."));
    let help = String::from_utf8_lossy(&run(agent().args(["run", "--help"])).stdout).into_owned();
    for flag in [
        "--socket ",
        "--socket-mode",
        "--trust-domain",
        "--namespace",
        "--service-account",
        "--ca ",
        "--cert-ttl",
        "--renew-at",
        "--key-type",
        "--embedded-ca-cert",
        "--embedded-ca-key",
        "--admin-addr",
        "--config",
        "SDS_AGENT_TRUST_DOMAIN",
        "SDS_AGENT_CERT_TTL",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn no_key_material_in_logs_even_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    // A CA key on disk, so we can also check that its contents never reach the log.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let (cp, kp) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
    std::fs::write(&cp, cert.pem()).unwrap();
    std::fs::write(&kp, key.serialize_pem()).unwrap();
    let socket = dir.path().join("sds.sock");
    let args = [
        "--log-level",
        "trace",
        "--cert-ttl",
        "10s",
        "--embedded-ca-cert",
        cp.to_str().unwrap(),
        "--embedded-ca-key",
        kp.to_str().unwrap(),
    ];
    let mut a = Running::start(dir.path(), &socket, &args);
    // Fetch the key over SDS, so the serving path runs (and logs at trace) too.
    let served_key = fetch_default_key(&socket);
    assert!(served_key.contains("PRIVATE KEY"));
    let _ = http_body(a.admin, "/secrets");
    std::thread::sleep(Duration::from_secs(6)); // at least one rotation
    assert!(a.signal("-TERM").0.success());
    let log = a.stderr();
    assert!(log.contains("certificate issued"), "nothing logged?");
    assert!(
        log.matches("certificate issued").count() >= 2,
        "no rotation in the window"
    );
    assert!(!log.contains("PRIVATE KEY"));
    let served_body: String = served_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for chunk in served_body.as_bytes().chunks(24) {
        assert!(
            !log.contains(std::str::from_utf8(chunk).unwrap()),
            "workload key material in the log"
        );
    }
    let ca_key_body: String = key
        .serialize_pem()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for chunk in ca_key_body.as_bytes().chunks(24) {
        assert!(
            !log.contains(std::str::from_utf8(chunk).unwrap()),
            "CA key material in the log"
        );
    }
}

/// The PEM private key of `default`, fetched over SDS.
fn fetch_default_key(socket: &Path) -> String {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = socket.to_owned();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let resp = SecretDiscoveryServiceClient::new(channel)
            .fetch_secrets(DiscoveryRequest {
                resource_names: vec!["default".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let secret = Secret::decode(resp.resources[0].value.as_slice()).unwrap();
        match secret.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                match t.private_key.and_then(|k| k.specifier) {
                    Some(Specifier::InlineBytes(b)) => String::from_utf8(b).unwrap(),
                    other => panic!("no inline key: {other:?}"),
                }
            }
            other => panic!("not a tls_certificate: {other:?}"),
        }
    })
}
