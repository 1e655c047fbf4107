//! The `sds-agent` binary as users run it, from the outside: configuration precedence
//! (flag > env > file > default) through `validate`, bad input refused with exit code 2 and
//! the setting named, `run` end to end (socket permissions, admin endpoint, SDS, SIGTERM and
//! SIGINT), the socket safety rules, `--help` and `version`, and no key material in logs.
//!
//! Every child is killed when its test ends, whatever the path, and every wait has a
//! deadline: a broken agent fails a test, it never hangs the suite.

// Test code: a panic is the failure report. The children run on the wall clock, so tokio's
// pausable Instant would buy nothing here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_types)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sds-agent");
/// How long a command that should finish at once may take.
const QUICK: Duration = Duration::from_secs(20);
/// How long `run` may take to become ready (debug build, RSA keys on a busy machine).
const READY: Duration = Duration::from_secs(30);
/// DESIGN: the process exits within 5 s of SIGTERM.
const STOP: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The agent command, with no SDS_AGENT_* or RUST_LOG inherited from the test's environment.
fn agent() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("SDS_AGENT_") || name.starts_with("VAULT_") || name == "RUST_LOG" {
            c.env_remove(&k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// A child process that is killed and reaped when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.0.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits up to `limit` for the child to exit.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a finished command printed.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `cmd` to completion, killing it (and failing) if it takes longer than `limit`.
/// Output goes to files, so a chatty child can never block on a full pipe.
fn finish(cmd: &mut Command, limit: Duration) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Guard(Some(
        cmd.stdout(std::fs::File::create(&o).unwrap())
            .stderr(std::fs::File::create(&e).unwrap())
            .spawn()
            .unwrap(),
    ));
    let status = child.wait(limit);
    let stderr = std::fs::read_to_string(&e).unwrap();
    let Some(status) = status else {
        panic!("{cmd:?} still running after {limit:?}; stderr: {stderr}");
    };
    Out {
        status,
        stdout: std::fs::read_to_string(&o).unwrap(),
        stderr,
    }
}

/// `validate` must succeed; returns the resolved configuration it printed.
fn validate_json(cmd: &mut Command) -> Value {
    let out = finish(cmd, QUICK);
    assert_eq!(
        out.code(),
        Some(0),
        "validate failed: {:?} {}",
        cmd.get_args().collect::<Vec<_>>(),
        out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("validate printed no JSON ({e}): {}", out.stdout))
}

/// A free loopback port: bound, then released for the agent to take.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request on the admin port: status and body, or `None` if nobody answers.
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path)
}

/// Polls `cond` every 20 ms for up to `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
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

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Sends a signal by name (`TERM`, `INT`) with kill(1): the tests have no libc.
fn kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A running `sds-agent run`, with its stderr in a file; killed when dropped.
struct Running {
    child: Guard,
    admin: u16,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    /// `run --socket SOCKET --admin-addr 127.0.0.1:PORT EXTRA...`, waited on until `/readyz`
    /// answers 200.
    fn start(dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        Self::spawn(dir, || {
            let mut cmd = agent();
            cmd.arg("run").arg("--socket").arg(socket).args(extra);
            cmd
        })
    }

    /// Starts `make()` (a `run` without `--admin-addr`) on a free admin port and waits
    /// until it is ready. The port is free when picked but not reserved, so if another
    /// process takes it first, this tries again with another.
    fn spawn(dir: &Path, make: impl Fn() -> Command) -> Self {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_spawn(dir, make()) {
                Ok(r) => return r,
                Err(log) if attempts < 3 && log.contains("--admin-addr") => continue,
                Err(log) => panic!("agent exited before it was ready: {log}"),
            }
        }
    }

    fn try_spawn(dir: &Path, mut cmd: Command) -> Result<Self, String> {
        let admin = free_port();
        let stdout = dir.join(format!("agent-{admin}.stdout"));
        let stderr = dir.join(format!("agent-{admin}.stderr"));
        let child = cmd
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut r = Self {
            child: Guard(Some(child)),
            admin,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + READY;
        loop {
            if let Some(status) = r.child.try_wait() {
                return Err(format!("({status}) {}", r.log()));
            }
            if get(admin, "/readyz").is_some_and(|(s, _)| s == 200) {
                return Ok(r);
            }
            assert!(Instant::now() < deadline, "agent not ready: {}", r.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the agent has written to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Sends `sig` and returns the exit status, asserting the exit came within [`STOP`].
    fn stop(&mut self, sig: &str) -> ExitStatus {
        let sent = Instant::now();
        kill(self.child.id(), sig);
        let status = self.child.wait(STOP + Duration::from_secs(5));
        let took = sent.elapsed();
        let Some(status) = status else {
            panic!(
                "agent still running {took:?} after SIG{sig}: {}",
                self.log()
            );
        };
        assert!(
            took < STOP,
            "agent took {took:?} to exit after SIG{sig}: {}",
            self.log()
        );
        status
    }

    /// GET `/secrets`, parsed.
    fn secrets(&self) -> Vec<Value> {
        let (status, body) = get(self.admin, "/secrets").expect("admin endpoint gone");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A CA certificate and its PKCS#8 key, written as `NAME.pem` and `NAME-key.pem`.
struct CaFiles {
    cert: PathBuf,
    key: PathBuf,
    key_pem: String,
}

fn write_ca(dir: &Path, name: &str) -> CaFiles {
    write_ca_with(dir, name, |_| {})
}

fn write_ca_with(
    dir: &Path,
    name: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> CaFiles {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {name}"));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    tweak(&mut p);
    let cert = p.self_signed(&key).unwrap();
    let files = CaFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        key_pem: key.serialize_pem(),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, &files.key_pem).unwrap();
    files
}

/// Asserts that no 24-character piece of the base64 body of `pem` occurs in `text`.
fn assert_no_piece_of(pem: &str, text: &str, what: &str) {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(body.len() >= 24, "{what}: no PEM body in {pem:?}");
    for chunk in body.as_bytes().chunks(24).filter(|c| c.len() == 24) {
        let chunk = std::str::from_utf8(chunk).unwrap();
        assert!(!text.contains(chunk), "{what} found in output: {chunk}");
    }
}

// ---------------------------------------------------------------------------------------
// SDS client (FetchSecrets and StreamSecrets over the Unix socket)
// ---------------------------------------------------------------------------------------

mod sds {
    use std::path::Path;

    use envoy_types::pb::envoy::config::core::v3::DataSource;
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;
    use tonic::transport::{Channel, Endpoint};

    pub(crate) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    pub(crate) async fn connect(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
        let path = socket.to_owned();
        let channel = Endpoint::from_static("http://localhost")
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
        SecretDiscoveryServiceClient::new(channel)
    }

    pub(crate) fn request(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// The certificate chain and private key of `default`, both PEM, fetched over SDS.
    pub(crate) fn fetch_default(socket: &Path) -> (String, String) {
        runtime().block_on(async {
            let resp = tokio::time::timeout(super::QUICK, async {
                connect(socket)
                    .await
                    .fetch_secrets(request(&["default"]))
                    .await
                    .unwrap()
                    .into_inner()
            })
            .await
            .expect("FetchSecrets timed out");
            default_of(&resp)
        })
    }

    /// The chain and key of the `default` secret in `resp`.
    pub(crate) fn default_of(resp: &DiscoveryResponse) -> (String, String) {
        for any in &resp.resources {
            let s = Secret::decode(any.value.as_slice()).unwrap();
            if s.name != "default" {
                continue;
            }
            match s.r#type {
                Some(secret::Type::TlsCertificate(t)) => {
                    return (inline(t.certificate_chain), inline(t.private_key));
                }
                other => panic!("default is not a tls_certificate: {other:?}"),
            }
        }
        panic!("no default secret in {resp:?}");
    }

    fn inline(ds: Option<DataSource>) -> String {
        match ds.and_then(|d| d.specifier) {
            Some(Specifier::InlineBytes(b)) => String::from_utf8(b).unwrap(),
            Some(Specifier::InlineString(s)) => s,
            other => panic!("not inline: {other:?}"),
        }
    }

    /// The URI SANs of the first certificate of a PEM chain.
    pub(crate) fn leaf_uris(chain_pem: &str) -> Vec<String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let der = pem::parse(chain_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(der.contents()).unwrap();
        let san = cert.subject_alternative_name().unwrap().expect("no SAN");
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// 1. Precedence: flag > env > file > default, seen through `validate`
// ---------------------------------------------------------------------------------------

#[test]
fn validate_prints_the_defaults_and_touches_nothing() {
    let cwd = tempfile::tempdir().unwrap();
    // Something already listens on the default admin port? validate must not care, since
    // it serves nothing; hold a port and point the agent at it to prove it never binds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();

    let d = validate_json(agent().arg("validate").current_dir(cwd.path()));
    let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "socket",
        "socket-mode",
        "spiffe-id",
        "ca",
        "cert-ttl",
        "renew-at",
        "key-type",
        "admin-addr",
        "log-level",
    ] {
        assert!(keys.contains(&k), "validate output lacks {k}: {d}");
    }
    assert_eq!(d["socket"], "./var/run/secrets/workload-spiffe-uds/socket");
    assert_eq!(d["socket-mode"], "0600");
    assert_eq!(
        d["spiffe-id"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(d["ca"]["backend"], "embedded");
    assert_eq!(d["ca"]["cert"], Value::Null);
    assert_eq!(d["ca"]["key"], Value::Null);
    assert_eq!(
        humantime::parse_duration(d["cert-ttl"].as_str().unwrap()).unwrap(),
        Duration::from_secs(24 * 3600)
    );
    assert_eq!(d["renew-at"], 0.5);
    assert_eq!(d["key-type"], "ecdsa-p256");
    assert_eq!(d["admin-addr"], "127.0.0.1:15020");
    assert_eq!(d["log-level"], Value::Null);
    assert_eq!(d["status-addr"], Value::Null);
    // The default: the agent's own uid, resolved when it starts; no group.
    assert_eq!(d["allowed-uids"], Value::Null);
    assert_eq!(d["allowed-gids"], serde_json::json!([]));
    assert_eq!(d["max-streams"], 16384);
    assert_eq!(d["max-message-size"], 262144);
    assert_eq!(d["max-requests-per-second"], 50);
    // Groups alone mean exactly those groups: the own-uid default is gone.
    let only_groups = validate_json(
        agent()
            .args(["validate", "--allowed-gids", "1337"])
            .current_dir(cwd.path()),
    );
    assert_eq!(only_groups["allowed-uids"], serde_json::json!([]));
    assert_eq!(only_groups["allowed-gids"], serde_json::json!([1337]));

    let d = validate_json(
        agent()
            .args(["validate", "--admin-addr", &busy_addr])
            .current_dir(cwd.path()),
    );
    assert_eq!(d["admin-addr"], busy_addr.as_str());
    let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "validate created files in its working directory: {left:?}"
    );
    drop(busy);
}

/// One setting in the precedence test: its values at each level and how `validate` shows
/// them.
struct Setting {
    /// Flag name without `--`; also the file key and, upper-cased, the env suffix.
    key: &'static str,
    /// Settings that must come from the same level (a CA certificate and its key) share one.
    group: usize,
    /// The value in the file, as a TOML literal.
    file_toml: String,
    /// The values given at file, env and flag level, as strings.
    given: [String; 3],
    /// What `validate` shows for each level.
    shown: [String; 3],
    /// Where `validate` shows it.
    read: fn(&Value) -> String,
}

fn spiffe_part(v: &Value, i: usize) -> String {
    let id = v["spiffe-id"].as_str().unwrap();
    let rest = id.strip_prefix("spiffe://").unwrap();
    // spiffe://TD/ns/NS/sa/SA
    rest.split('/').nth(i).unwrap().to_owned()
}

fn settings(dir: &Path) -> Vec<Setting> {
    fn s(v: &str) -> String {
        v.to_owned()
    }
    fn string(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    fn plain(
        key: &'static str,
        group: usize,
        given: [&str; 3],
        shown: [&str; 3],
        read: fn(&Value) -> String,
    ) -> Setting {
        Setting {
            key,
            group,
            file_toml: format!("{:?}", given[0]),
            given: given.map(s),
            shown: shown.map(s),
            read,
        }
    }
    let cas = ["file", "env", "flag"].map(|level| write_ca(dir, &format!("ca-{level}")));
    let paths = |f: fn(&CaFiles) -> &PathBuf| cas.each_ref().map(|c| f(c).display().to_string());
    vec![
        plain(
            "socket",
            0,
            ["/file/sock", "/env/sock", "/flag/sock"],
            ["/file/sock", "/env/sock", "/flag/sock"],
            |v| string(&v["socket"]),
        ),
        plain(
            "socket-mode",
            1,
            ["0640", "0660", "0700"],
            ["0640", "0660", "0700"],
            |v| string(&v["socket-mode"]),
        ),
        plain(
            "trust-domain",
            2,
            ["file.example", "env.example", "flag.example"],
            ["file.example", "env.example", "flag.example"],
            |v| spiffe_part(v, 0),
        ),
        plain(
            "namespace",
            3,
            ["file-ns", "env-ns", "flag-ns"],
            ["file-ns", "env-ns", "flag-ns"],
            |v| spiffe_part(v, 2),
        ),
        plain(
            "service-account",
            4,
            ["file-sa", "env-sa", "flag-sa"],
            ["file-sa", "env-sa", "flag-sa"],
            |v| spiffe_part(v, 4),
        ),
        plain(
            "cert-ttl",
            5,
            ["90m", "2h", "45m"],
            ["5400", "7200", "2700"],
            |v| {
                humantime::parse_duration(v["cert-ttl"].as_str().unwrap())
                    .unwrap()
                    .as_secs()
                    .to_string()
            },
        ),
        Setting {
            key: "renew-at",
            group: 6,
            // A TOML float in the file; strings in env and flags.
            file_toml: "0.7".into(),
            given: [s("0.7"), s("0.6"), s("0.8")],
            shown: [s("0.7"), s("0.6"), s("0.8")],
            read: |v| string(&v["renew-at"]),
        },
        plain(
            "key-type",
            7,
            ["rsa-2048", "ecdsa-p384", "rsa-3072"],
            ["rsa-2048", "ecdsa-p384", "rsa-3072"],
            |v| string(&v["key-type"]),
        ),
        plain(
            "admin-addr",
            8,
            ["127.0.0.1:1111", "127.0.0.1:2222", "[::1]:3333"],
            ["127.0.0.1:1111", "127.0.0.1:2222", "[::1]:3333"],
            |v| string(&v["admin-addr"]),
        ),
        plain(
            "log-level",
            9,
            ["debug", "warn", "sds_agent=trace"],
            ["debug", "warn", "sds_agent=trace"],
            |v| string(&v["log-level"]),
        ),
        plain(
            "log-format",
            11,
            ["json", "text", "json"],
            ["json", "text", "json"],
            |v| string(&v["log-format"]),
        ),
        Setting {
            key: "allowed-uids",
            group: 14,
            // A TOML array in the file; comma-separated in env and flags.
            file_toml: "[1337, 0]".into(),
            given: [s("1337,0"), s("101"), s("2000, 1000,2000")],
            shown: [s("[0,1337]"), s("[101]"), s("[1000,2000]")],
            read: |v| v["allowed-uids"].to_string(),
        },
        Setting {
            key: "max-streams",
            group: 16,
            file_toml: "100".into(),
            given: [s("100"), s("200"), s("300")],
            shown: [s("100"), s("200"), s("300")],
            read: |v| v["max-streams"].to_string(),
        },
        Setting {
            key: "max-message-size",
            group: 17,
            file_toml: "4096".into(),
            given: [s("4096"), s("8192"), s("1048576")],
            shown: [s("4096"), s("8192"), s("1048576")],
            read: |v| v["max-message-size"].to_string(),
        },
        Setting {
            key: "max-requests-per-second",
            group: 18,
            file_toml: "10".into(),
            given: [s("10"), s("20"), s("30")],
            shown: [s("10"), s("20"), s("30")],
            read: |v| v["max-requests-per-second"].to_string(),
        },
        plain(
            "allowed-gids",
            15,
            ["1337", "101,102", "0"],
            ["[1337]", "[101,102]", "[0]"],
            |v| v["allowed-gids"].to_string(),
        ),
        plain(
            "status-addr",
            13,
            ["0.0.0.0:15021", "127.0.0.1:2222", "[::]:3333"],
            ["0.0.0.0:15021", "127.0.0.1:2222", "[::]:3333"],
            |v| string(&v["status-addr"]),
        ),
        plain(
            "output-dir",
            12,
            ["/run/a", "/run/b", "/run/c"],
            ["/run/a", "/run/b", "/run/c"],
            |v| string(&v["output-dir"]),
        ),
        {
            let p = paths(|c| &c.cert);
            Setting {
                key: "embedded-ca-cert",
                group: 10,
                file_toml: format!("{:?}", p[0]),
                given: p.clone(),
                shown: p,
                read: |v| string(&v["ca"]["cert"]),
            }
        },
        {
            let p = paths(|c| &c.key);
            Setting {
                key: "embedded-ca-key",
                group: 10,
                file_toml: format!("{:?}", p[0]),
                given: p.clone(),
                shown: p,
                read: |v| string(&v["ca"]["key"]),
            }
        },
    ]
}

fn env_name(key: &str) -> String {
    format!("SDS_AGENT_{}", key.to_uppercase().replace('-', "_"))
}

#[test]
fn every_setting_comes_from_flag_then_env_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let all = settings(dir.path());
    let file = dir.path().join("agent.toml");
    let mut toml = String::from("ca = \"embedded\"\n");
    for s in &all {
        toml.push_str(&format!("{} = {}\n", s.key, s.file_toml));
    }
    std::fs::write(&file, &toml).unwrap();

    // (how the file is given, which groups get an env value, which get a flag)
    type Pick = fn(usize) -> bool;
    let scenarios: [(&str, Pick, Pick); 6] = [
        ("flag", |_| false, |_| false),
        ("env", |_| true, |_| false),
        ("env", |_| true, |_| true),
        ("env", |g| g % 2 == 0, |g| g % 3 == 0),
        ("flag", |_| false, |g| g % 2 == 1),
        ("none", |_| true, |g| g % 2 == 0),
    ];
    for (config_via, env_for, flag_for) in scenarios {
        let mut cmd = agent();
        cmd.arg("validate");
        match config_via {
            "flag" => {
                cmd.arg("--config").arg(&file);
            }
            "env" => {
                cmd.env("SDS_AGENT_CONFIG", &file);
            }
            _ => {}
        }
        for s in &all {
            if env_for(s.group) {
                cmd.env(env_name(s.key), &s.given[1]);
            }
            if flag_for(s.group) {
                cmd.arg(format!("--{}", s.key)).arg(&s.given[2]);
            }
        }
        let v = validate_json(&mut cmd);
        for s in &all {
            let level = if flag_for(s.group) {
                2
            } else if env_for(s.group) {
                1
            } else {
                0
            };
            assert_eq!(
                (s.read)(&v),
                s.shown[level],
                "{} should come from the {} (config via {config_via}): {v:#}",
                s.key,
                ["file", "env", "flag"][level]
            );
        }
    }
}

#[test]
fn config_file_from_env_and_the_flag_beats_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, "namespace = \"from-a\"\ncert-ttl = \"2h\"\n").unwrap();
    std::fs::write(&b, "namespace = \"from-b\"\n").unwrap();

    let v = validate_json(agent().arg("validate").env("SDS_AGENT_CONFIG", &a));
    assert_eq!(
        v["spiffe-id"],
        "spiffe://cluster.local/ns/from-a/sa/default"
    );
    assert_eq!(v["cert-ttl"], "2h");

    let v = validate_json(
        agent()
            .arg("validate")
            .arg("--config")
            .arg(&b)
            .env("SDS_AGENT_CONFIG", &a),
    );
    assert_eq!(
        v["spiffe-id"],
        "spiffe://cluster.local/ns/from-b/sa/default"
    );
    assert_eq!(
        humantime::parse_duration(v["cert-ttl"].as_str().unwrap()).unwrap(),
        Duration::from_secs(24 * 3600),
        "a.toml was read although --config named b.toml"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Bad input: exit code 2, and stderr names the setting
// ---------------------------------------------------------------------------------------

/// A refused configuration.
struct Bad {
    what: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// All of these must be in stderr.
    needles: Vec<String>,
    /// The error is in a CA file, which `run` finds when it builds the CA.
    ca_file: bool,
}

fn bad(what: &'static str, args: &[&str], needles: &[&str]) -> Bad {
    Bad {
        what,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![],
        needles: needles.iter().map(|n| (*n).to_owned()).collect(),
        ca_file: false,
    }
}

fn bad_inputs(dir: &Path) -> (Vec<Bad>, Vec<String>) {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let malformed = write("malformed.toml", "trust-domain = \"x.org\"\nnamespace = \n");
    let unknown = write(
        "unknown.toml",
        "namespace = \"ok\"\ntrust_domain = \"x.org\"\n",
    );
    let bad_in_file = write("bad-value.toml", "renew-at = 1.5\n");
    let missing = dir.join("missing.toml").display().to_string();
    let garbage = write("garbage.pem", "this is not a certificate\n");
    let good = write_ca(dir, "good");
    let other = write_ca(dir, "other");
    let expired = write_ca_with(dir, "expired", |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let leaf = write_ca_with(dir, "leaf", |p| {
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    });
    let [good_cert, good_key, other_key] =
        [&good.cert, &good.key, &other.key].map(|p| p.display().to_string());
    let keys = vec![
        good.key_pem.clone(),
        other.key_pem.clone(),
        leaf.key_pem.clone(),
        expired.key_pem.clone(),
    ];

    let mut cases = vec![
        bad(
            "malformed TOML",
            &["--config", &malformed],
            &["line 2", &malformed],
        ),
        bad(
            "unknown key in the file",
            &["--config", &unknown],
            &["unknown field", "trust_domain", &unknown],
        ),
        bad("missing config file", &["--config", &missing], &[&missing]),
        bad(
            "unknown log format",
            &["--log-format", "yaml"],
            &["--log-format", "yaml", "text or json"],
        ),
        bad(
            "unparsable log filter",
            &["--log-level", "sds_agent=[loud"],
            &["--log-level", "sds_agent=[loud"],
        ),
        bad(
            "empty output directory",
            &["--output-dir", ""],
            &["--output-dir"],
        ),
        bad(
            "bad value in the file",
            &["--config", &bad_in_file],
            &["renew-at", "1.5", "between 0 and 1"],
        ),
        bad(
            "uppercase trust domain",
            &["--trust-domain", "Example.COM"],
            &["--trust-domain", "SDS_AGENT_TRUST_DOMAIN", "Example.COM"],
        ),
        bad(
            "namespace with a slash",
            &["--namespace", "a/b"],
            &["--namespace", "SDS_AGENT_NAMESPACE", "a/b"],
        ),
        bad(
            "service account with a slash",
            &["--service-account", "web/admin"],
            &["--service-account", "web/admin"],
        ),
        bad(
            "unparsable ttl",
            &["--cert-ttl", "soon"],
            &["--cert-ttl", "SDS_AGENT_CERT_TTL", "soon"],
        ),
        bad(
            "ttl too short",
            &["--cert-ttl", "1s"],
            &["--cert-ttl", "at least"],
        ),
        bad(
            "renew-at above 1",
            &["--renew-at", "1.5"],
            &["--renew-at", "SDS_AGENT_RENEW_AT", "1.5"],
        ),
        bad(
            "unknown key type",
            &["--key-type", "ed25519"],
            &["--key-type", "ed25519"],
        ),
        bad(
            "unknown CA backend",
            &["--ca", "acme"],
            &["--ca", "acme", "embedded, istiod, vault"],
        ),
        bad(
            "vault without an address",
            &["--ca", "vault", "--vault-role", "sds"],
            &["--vault-addr", "VAULT_ADDR"],
        ),
        bad(
            "vault address not a URL",
            &[
                "--ca",
                "vault",
                "--vault-role",
                "sds",
                "--vault-addr",
                "vault:8200",
            ],
            &["--vault-addr", "http://"],
        ),
        bad(
            "vault token auth without a token",
            &[
                "--ca",
                "vault",
                "--vault-role",
                "sds",
                "--vault-addr",
                "http://127.0.0.1:8200",
            ],
            &["--vault-token-file", "VAULT_TOKEN"],
        ),
        bad(
            "socket mode not octal",
            &["--socket-mode", "rw-------"],
            &["--socket-mode", "rw-------"],
        ),
        bad(
            "socket mode without owner rw",
            &["--socket-mode", "0400"],
            &["--socket-mode", "owner"],
        ),
        bad(
            "admin address without a port",
            &["--admin-addr", "localhost"],
            &["--admin-addr", "localhost"],
        ),
        bad(
            "no streams at all",
            &["--max-streams", "0"],
            &["--max-streams", "from 1 to"],
        ),
        bad(
            "a message size below a kilobyte",
            &["--max-message-size", "100"],
            &["--max-message-size", "from 1024 to"],
        ),
        bad(
            "a request rate that is not a number",
            &["--max-requests-per-second", "fast"],
            &["--max-requests-per-second", "whole number"],
        ),
        bad(
            "allowed uid that is a name",
            &["--allowed-uids", "envoy"],
            &["--allowed-uids", "\"envoy\" is not a numeric ID"],
        ),
        bad(
            "empty entry in allowed gids",
            &["--allowed-gids", "1337,,0"],
            &["--allowed-gids", "numeric IDs separated by commas"],
        ),
        bad(
            "allowed uid -1",
            &["--allowed-uids", "4294967295"],
            &["--allowed-uids", "invalid ID"],
        ),
        bad(
            "status address that is a host name",
            &["--status-addr", "localhost:15021"],
            &["--status-addr", "localhost:15021", "IP:PORT"],
        ),
        bad(
            "CA certificate without its key",
            &["--embedded-ca-cert", &good_cert],
            &["--embedded-ca-cert", "--embedded-ca-key"],
        ),
        bad(
            "CA key without its certificate",
            &["--embedded-ca-key", &good_key],
            &["--embedded-ca-cert", "--embedded-ca-key"],
        ),
    ];
    let mut ca = |what, cert: &str, key: &str, needles: &[&str]| {
        let mut b = bad(
            what,
            &["--embedded-ca-cert", cert, "--embedded-ca-key", key],
            needles,
        );
        b.ca_file = true;
        cases.push(b);
    };
    ca(
        "garbage CA certificate",
        &garbage,
        &good_key,
        &["certificate"],
    );
    ca("garbage CA key", &good_cert, &garbage, &["key"]);
    ca(
        "CA key in the certificate slot",
        &good_key,
        &good_key,
        &["certificate"],
    );
    ca(
        "CA key of another CA",
        &good_cert,
        &other_key,
        &["key", "match"],
    );
    let (leaf_cert, leaf_key) = (
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
    );
    ca(
        "CA certificate that is not a CA",
        &leaf_cert,
        &leaf_key,
        &["not a CA"],
    );
    let (old_cert, old_key) = (
        expired.cert.display().to_string(),
        expired.key.display().to_string(),
    );
    ca(
        "expired CA certificate",
        &old_cert,
        &old_key,
        &["not valid"],
    );
    let missing_pem = dir.join("missing.pem").display().to_string();
    ca(
        "missing CA certificate file",
        &missing_pem,
        &good_key,
        &["--embedded-ca-cert", &missing_pem],
    );

    // Node mode's kubelet files: `validate` reads them as `run` does (which finds them when
    // it builds the kubelet client).
    let token = write("kubelet-token", "a-token\n");
    let empty_token = write("empty-token", "");
    let missing_token = dir.join("missing-token").display().to_string();
    let mut node = |what, kubelet_ca: &str, token: &str, needles: &[&str]| {
        let mut b = bad(
            what,
            &[
                "--mode",
                "node",
                "--kubelet-ca",
                kubelet_ca,
                "--kubelet-token-file",
                token,
            ],
            needles,
        );
        b.ca_file = true;
        cases.push(b);
    };
    node(
        "node mode: missing kubelet CA",
        &missing_pem,
        &token,
        &["--kubelet", &missing_pem],
    );
    node(
        "node mode: garbage kubelet CA",
        &garbage,
        &token,
        &["--kubelet", &garbage],
    );
    node(
        "node mode: missing kubelet token",
        &good_cert,
        &missing_token,
        &["reading the kubelet token", &missing_token],
    );
    node(
        "node mode: empty kubelet token",
        &good_cert,
        &empty_token,
        &[&empty_token, "empty"],
    );

    let federated = write("partner.pem", "not a bundle\n");
    for (what, value, needles) in [
        (
            "federate-with without =",
            "partner.example".to_owned(),
            vec!["--federate-with", "expected TD=FILE"],
        ),
        (
            "federate-with a bad trust domain",
            "Partner!=/x.pem".to_owned(),
            vec!["--federate-with", "Partner!"],
        ),
        (
            "federate-with the agent's own domain",
            "cluster.local=/x.pem".to_owned(),
            vec!["--federate-with", "own trust domain"],
        ),
        (
            "federate-with a plain http endpoint",
            "partner.example=http://bundle.partner.example".to_owned(),
            vec!["--federate-with", "must be https://"],
        ),
        (
            "federate-with a domain twice",
            "a.example=/a.pem,a.example=/b.pem".to_owned(),
            vec!["--federate-with", "given twice"],
        ),
    ] {
        let mut b = bad(what, &[], &[]);
        b.env = vec![("SDS_AGENT_FEDERATE_WITH", value)];
        b.needles = needles.into_iter().map(str::to_owned).collect();
        cases.push(b);
    }
    let mut unreadable_bundle = bad(
        "federated bundle that is not one",
        &["--federate-with", &format!("partner.example={federated}")],
        &["--federate-with partner.example=", "no X.509 root"],
    );
    unreadable_bundle.ca_file = true;
    cases.push(unreadable_bundle);
    let missing_dir = dir.join("no-such-dir").display().to_string();
    let mut no_dir = bad(
        "federation dir that does not exist",
        &["--federation-dir", &missing_dir],
        &["--federation-dir", &missing_dir],
    );
    no_dir.ca_file = true;
    cases.push(no_dir);
    let bundles = dir.join("bundles");
    std::fs::create_dir(&bundles).unwrap();
    std::fs::copy(&good.cert, bundles.join("partner.example.pem")).unwrap();
    let mut twice = bad(
        "federation dir repeating a --federate-with domain",
        &[
            "--federate-with",
            &format!("partner.example={}", good.cert.display()),
            "--federation-dir",
            &bundles.display().to_string(),
        ],
        &[
            "--federation-dir",
            "partner.example is also given by --federate-with",
        ],
    );
    twice.ca_file = true;
    cases.push(twice);
    cases.push(bad(
        "sds-plain-roots that is not a boolean",
        &["--sds-plain-roots=maybe"],
        &["sds-plain-roots", "expected true or false"],
    ));
    cases.push(bad(
        "federation poll interval too short",
        &["--federation-poll-interval", "1ms"],
        &["federation-poll-interval", "at least 100ms"],
    ));
    cases.push(bad(
        "root overlap not a duration",
        &["--root-overlap", "a day"],
        &["root-overlap", "a day", "expected e.g. 30m"],
    ));
    cases.push(bad(
        "root overlap too short",
        &["--root-overlap", "10ms"],
        &["root-overlap", "at least 1s"],
    ));
    cases.push(bad(
        "trust bundle refresh too short",
        &["--trust-bundle-refresh", "0s"],
        &["trust-bundle-refresh", "at least 1s"],
    ));
    cases.push(bad(
        "next embedded CA without its key",
        &["--embedded-next-ca-cert", "/etc/next.pem"],
        &["--embedded-next-ca-cert and --embedded-next-ca-key go together"],
    ));
    cases.push(bad(
        "next embedded CA for an ephemeral root",
        &[
            "--embedded-next-ca-cert",
            "/etc/next.pem",
            "--embedded-next-ca-key",
            "/etc/next-key.pem",
        ],
        &[
            "--embedded-next-ca-cert needs --embedded-ca-cert",
            "sds-agent ca rotate",
        ],
    ));
    cases.push(bad(
        "unknown mode",
        &["--mode", "nodes"],
        &["mode", "nodes", "expected pod or node"],
    ));
    let out_dir = dir.join("out").display().to_string();
    cases.push(bad(
        "node mode with --output-dir",
        &["--mode", "node", "--output-dir", &out_dir],
        &["--output-dir", "--mode node"],
    ));
    cases.push(bad(
        "a kubelet CA and no verification",
        &[
            "--mode",
            "node",
            "--kubelet-ca",
            &good_cert,
            "--kubelet-skip-tls-verify",
        ],
        &["--kubelet-ca", "--kubelet-skip-tls-verify"],
    ));
    cases.push(bad(
        "a CA concurrency of 0",
        &["--mode", "node", "--ca-concurrency", "0"],
        &["ca-concurrency", "0"],
    ));

    // `--ca` lists (CA failover).
    cases.push(bad(
        "an unknown backend in a --ca list",
        &["--ca", "vault,acme"],
        &["--ca", "\"acme\"", "embedded, istiod, vault"],
    ));
    cases.push(bad(
        "a backend listed twice",
        &["--ca", "embedded, embedded"],
        &["--ca", "embedded is listed twice"],
    ));
    cases.push(bad(
        "an empty element in a --ca list",
        &["--ca", "vault,,embedded"],
        &["--ca", "vault,,embedded", "empty backend name"],
    ));
    cases.push(bad(
        "a trailing comma in a --ca list",
        &["--ca", "embedded,"],
        &["--ca", "empty backend name"],
    ));
    cases.push(bad(
        "a fallback with settings of its own that are missing",
        &["--ca", "embedded,vault", "--vault-role", "sds"],
        &["--vault-addr", "VAULT_ADDR"],
    ));
    cases.push(bad(
        "a fallback that node mode refuses with these settings",
        &[
            "--mode",
            "node",
            "--ca",
            "embedded,cert-manager",
            "--cert-manager-issuer-name",
            "mesh-ca",
            "--pod-name",
            "web-0",
            "--pod-uid",
            "0d3c2b1a-1111-4222-8333-444455556666",
        ],
        &["--pod-name", "--mode node"],
    ));
    cases.push(bad(
        "--ca-failover-after with one backend",
        &["--ca", "embedded", "--ca-failover-after", "1m"],
        &["--ca-failover-after", "two or more backends"],
    ));
    cases.push(bad(
        "--ca-failover-after not a duration",
        &["--ca", "istiod,embedded", "--ca-failover-after", "soon"],
        &["--ca-failover-after", "SDS_AGENT_CA_FAILOVER_AFTER", "soon"],
    ));
    cases.push(bad(
        "--ca-failover-after under a second",
        &["--ca", "istiod,embedded", "--ca-failover-after", "10ms"],
        &["--ca-failover-after", "at least 1s"],
    ));
    let mut env_list = bad(
        "a backend listed twice in the environment",
        &[],
        &["SDS_AGENT_CA", "vault is listed twice"],
    );
    env_list.env = vec![("SDS_AGENT_CA", "vault,embedded,vault".into())];
    cases.push(env_list);

    let mut env_case = bad("bad env value", &[], &["SDS_AGENT_KEY_TYPE", "dsa"]);
    env_case.env = vec![("SDS_AGENT_KEY_TYPE", "dsa".into())];
    cases.push(env_case);
    let mut env_ttl = bad("bad env ttl", &[], &["SDS_AGENT_CERT_TTL", "2"]);
    env_ttl.env = vec![("SDS_AGENT_CERT_TTL", "2".into())];
    cases.push(env_ttl);
    (cases, keys)
}

#[test]
fn bad_input_exits_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (cases, keys) = bad_inputs(dir.path());
    let never = dir.path().join("never/sds.sock");
    for sub in ["validate", "run"] {
        for case in &cases {
            let mut cmd = agent();
            cmd.arg(sub)
                .args(&case.args)
                .arg("--socket")
                .arg(&never)
                .current_dir(dir.path());
            if !case.args.iter().any(|a| a == "--admin-addr") {
                cmd.args(["--admin-addr", "127.0.0.1:0"]);
            }
            for (k, v) in &case.env {
                cmd.env(k, v);
            }
            // Bounded: a bad configuration that `run` wrongly accepts would serve forever.
            let out = finish(&mut cmd, QUICK);
            let what = format!("{sub}, {}: {:?} {:?}", case.what, case.args, case.env);
            // `run` finds a bad CA file only when it builds the CA, after parsing the
            // configuration; any failure will do there, as long as it says why.
            if sub == "run" && case.ca_file {
                assert!(
                    !out.status.success() && out.code().is_some(),
                    "{what}: {} {}",
                    out.status,
                    out.stderr
                );
            } else {
                assert_eq!(out.code(), Some(2), "{what}: {}", out.stderr);
            }
            assert!(
                out.stderr.contains("error"),
                "{what}: no error on stderr: {:?}",
                out.stderr
            );
            for needle in &case.needles {
                assert!(
                    out.stderr.contains(needle.as_str()),
                    "{what}: stderr lacks {needle:?}: {}",
                    out.stderr
                );
            }
            if sub == "validate" {
                assert!(
                    out.stdout.trim().is_empty(),
                    "{what}: validate printed a configuration although it failed: {}",
                    out.stdout
                );
            }
            // A misplaced key file must not be echoed in the error.
            for output in [&out.stdout, &out.stderr] {
                assert!(!output.contains("PRIVATE KEY"), "{what}: {output}");
                for k in &keys {
                    assert_no_piece_of(k, output, "a CA key");
                }
            }
        }
    }
    assert!(
        !never.parent().unwrap().exists(),
        "a refused configuration created the socket directory"
    );
}

/// In node mode each pod's CertificateRequest goes in the pod's own namespace, so naming one
/// namespace for them all is refused, whether it comes from the flag, the environment or
/// the config file; pod mode takes it as before. Without it, node mode resolves to each
/// pod's namespace.
#[test]
fn node_mode_refuses_one_cert_manager_namespace_for_every_pod() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
         https://127.0.0.1:1\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
         context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "cert-manager-namespace = \"sds-agent\"\n").unwrap();
    // Node mode's validate reads the kubelet's CA and the token (the pod's files).
    let kubelet_ca = write_ca(dir.path(), "kubelet-ca");
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token\n").unwrap();
    let validate = |mode: &str| {
        let mut cmd = agent();
        cmd.args(["validate", "--mode", mode, "--ca", "cert-manager"])
            .args(["--cert-manager-issuer-name", "mesh-ca"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("SDS_AGENT_KUBELET_CA", &kubelet_ca.cert)
            .env("SDS_AGENT_KUBELET_TOKEN_FILE", &token)
            .current_dir(dir.path());
        cmd
    };
    let add = |cmd: &mut Command, source: &str| {
        match source {
            "flag" => cmd.args(["--cert-manager-namespace", "sds-agent"]),
            "environment" => cmd.env("SDS_AGENT_CERT_MANAGER_NAMESPACE", "sds-agent"),
            _ => cmd.arg("--config").arg(&file),
        };
    };
    for source in ["flag", "environment", "config file"] {
        let mut cmd = validate("node");
        add(&mut cmd, source);
        let out = finish(&mut cmd, QUICK);
        assert_eq!(out.code(), Some(2), "{source}: {}", out.stderr);
        assert!(out.stdout.trim().is_empty(), "{source}: {}", out.stdout);
        for needle in [
            "--cert-manager-namespace (SDS_AGENT_CERT_MANAGER_NAMESPACE, file key \
             cert-manager-namespace)",
            "cannot be used with --mode node",
            "each pod's request goes in that pod's own namespace",
        ] {
            assert!(
                out.stderr.contains(needle),
                "{source}: stderr lacks {needle:?}: {}",
                out.stderr
            );
        }

        let mut cmd = validate("pod");
        add(&mut cmd, source);
        let v = validate_json(&mut cmd);
        assert_eq!(v["ca"]["namespace"], "sds-agent", "{source}: {v}");
    }

    let v = validate_json(&mut validate("node"));
    assert_eq!(v["mode"], "node", "{v}");
    assert_eq!(v["ca"]["backend"], "cert-manager", "{v}");
    assert_eq!(v["ca"]["per-pod-namespace"], true, "{v}");
    assert!(v["ca"].get("namespace").is_none(), "{v}");
}

// ---------------------------------------------------------------------------------------
// 3. `run` end to end
// ---------------------------------------------------------------------------------------

#[test]
fn run_serves_with_0600_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock_dir = dir.path().join("s/nested");
    let socket = sock_dir.join("sock");
    let mut a = Running::start(
        dir.path(),
        &socket,
        &[
            "--trust-domain",
            "example.org",
            "--namespace",
            "shop",
            "--service-account",
            "web",
        ],
    );
    let id = "spiffe://example.org/ns/shop/sa/web";

    assert!(is_socket(&socket), "no socket at {}", socket.display());
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(get(a.admin, "/healthz").map(|(s, _)| s), Some(200));
    let secrets = a.secrets();
    let names: Vec<&str> = secrets
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"default"), "{secrets:?}");
    assert!(names.contains(&"ROOTCA"), "{secrets:?}");
    let default = secrets.iter().find(|s| s["name"] == "default").unwrap();
    assert_eq!(default["spiffe_id"], id, "{default}");
    let root = secrets.iter().find(|s| s["name"] == "ROOTCA").unwrap();
    assert_eq!(root["spiffe_id"], "spiffe://example.org", "{root}");

    // The socket really serves SDS, with the certificate of that identity.
    let (chain, key) = sds::fetch_default(&socket);
    assert_eq!(sds::leaf_uris(&chain), [id]);
    assert!(key.contains("PRIVATE KEY"));

    // Only the socket is in its directory: no temporary file left from binding it.
    let entries: Vec<_> = std::fs::read_dir(&sock_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["sock"], "unexpected files next to the socket");

    let status = a.stop("TERM");
    assert_eq!(status.code(), Some(0), "{status}: {}", a.log());
    assert!(!socket.exists(), "socket left behind after SIGTERM");
    assert_eq!(
        std::fs::read_dir(&sock_dir).unwrap().count(),
        0,
        "files left next to the socket"
    );
    assert!(
        !a.printed().contains("PRIVATE KEY"),
        "a key on stdout: {}",
        a.printed()
    );
}

/// `--status-addr` serves probes and metrics, and nothing that reveals or changes state: no
/// `/secrets`, no `/proxies`, no `POST /rotate` (which would let anyone on the pod network
/// drive the CA). The admin endpoint keeps all of them.
#[test]
fn the_status_port_serves_probes_and_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sock");
    let status_port = free_port();
    let mut a = Running::start(
        dir.path(),
        &socket,
        &["--status-addr", &format!("127.0.0.1:{status_port}")],
    );
    assert!(
        a.log().contains(&format!("status=127.0.0.1:{status_port}")),
        "the status address is not logged: {}",
        a.log()
    );
    assert_eq!(get(status_port, "/healthz"), Some((200, "ok\n".into())));
    let (code, body) = get(status_port, "/readyz").unwrap();
    assert_eq!((code, body.as_str()), (200, r#"{"ready":true}"#));
    let (code, body) = get(status_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("sds_agent_certificate_expiry_seconds{"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let serial = a.secrets()[0]["serial"].clone();
    for (method, path) in [
        ("GET", "/secrets"),
        ("GET", "/proxies"),
        ("POST", "/rotate"),
    ] {
        let (code, _) = http(status_port, method, path).unwrap();
        assert_eq!(code, 404, "{method} {path} on the status port");
        let (code, _) = http(a.admin, method, path).unwrap();
        assert!(code < 300, "{method} {path} on the admin port: {code}");
    }
    // Nothing sent to the status port rotated anything: only the admin POST did, once.
    assert!(
        wait_until(Duration::from_secs(10), || a.secrets()[0]["serial"]
            != serial),
        "the admin POST /rotate did not rotate"
    );
    let (_, body) = get(status_port, "/metrics").unwrap();
    assert!(
        body.contains(r#"sds_agent_renewals_total{result="success"} 2"#),
        "{body}"
    );
    let status = a.stop("TERM");
    assert_eq!(status.code(), Some(0), "{status}: {}", a.log());
    assert!(
        get(status_port, "/healthz").is_none(),
        "the status port still answers after shutdown"
    );
}

#[test]
fn socket_mode_0660_default_path_and_sigint() {
    let cwd = tempfile::tempdir().unwrap();
    // No --socket: the default path, relative to the working directory.
    let mut a = Running::spawn(cwd.path(), || {
        let mut cmd = agent();
        cmd.args(["run", "--socket-mode", "0660"])
            .current_dir(cwd.path());
        cmd
    });
    let socket = cwd
        .path()
        .join("var/run/secrets/workload-spiffe-uds/socket");
    assert!(is_socket(&socket), "no socket at the default path");
    assert_eq!(mode(&socket), 0o660);
    let status = a.stop("INT");
    assert_eq!(status.code(), Some(0), "{status}: {}", a.log());
    assert!(!socket.exists(), "socket left behind after SIGINT");
}

#[test]
fn sigterm_with_a_connected_proxy_still_exits_0_in_time() {
    use futures::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let mut a = Running::start(dir.path(), &socket, &[]);
    let rt = sds::runtime();
    // A proxy holding a StreamSecrets open: its request stream never ends.
    let mut responses = rt.block_on(async {
        let mut client = sds::connect(&socket).await;
        let requests = futures::stream::iter([sds::request(&["default", "ROOTCA"])])
            .chain(futures::stream::pending());
        let mut responses = tokio::time::timeout(QUICK, client.stream_secrets(requests))
            .await
            .expect("StreamSecrets timed out")
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(QUICK, responses.message())
            .await
            .expect("no first response")
            .unwrap()
            .expect("stream ended at once");
        assert!(!first.resources.is_empty());
        responses
    });

    let status = a.stop("TERM");
    assert_eq!(status.code(), Some(0), "{status}: {}", a.log());
    assert!(!socket.exists(), "socket left behind");
    // The proxy sees its stream end (cleanly or not) instead of hanging.
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = responses.message().await {}
        })
        .await
    });
    assert!(ended.is_ok(), "the proxy's stream outlived the agent");
}

// ---------------------------------------------------------------------------------------
// 4. Socket safety
// ---------------------------------------------------------------------------------------

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    // A crashed run's socket: the file exists, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(is_socket(&socket));
    // A child being spawned by a parallel test can hold a copy of the listener's descriptor
    // until it execs; wait until the socket refuses connections.
    assert!(
        wait_until(QUICK, || std::os::unix::net::UnixStream::connect(&socket)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)),
        "the socket still accepts connections"
    );

    let mut a = Running::start(dir.path(), &socket, &[]);
    let (chain, _) = sds::fetch_default(&socket);
    assert!(chain.contains("CERTIFICATE"));
    assert_eq!(a.stop("TERM").code(), Some(0), "{}", a.log());
    assert!(!socket.exists());
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let mut first = Running::start(dir.path(), &socket, &[]);
    let ino = std::fs::symlink_metadata(&socket).unwrap().ino();
    let (before, _) = sds::fetch_default(&socket);

    let out = finish(
        agent()
            .args(["run", "--admin-addr", "127.0.0.1:0", "--socket"])
            .arg(&socket),
        QUICK,
    );
    assert!(
        !out.status.success() && out.code().is_some(),
        "second agent: {} {}",
        out.status,
        out.stderr
    );
    assert!(out.stderr.contains("in use"), "{}", out.stderr);

    // The first agent keeps its socket (the same file) and keeps serving.
    assert_eq!(std::fs::symlink_metadata(&socket).unwrap().ino(), ino);
    let (after, _) = sds::fetch_default(&socket);
    assert_eq!(after, before, "the first agent's certificate changed");
    assert_eq!(get(first.admin, "/readyz").map(|(s, _)| s), Some(200));
    assert_eq!(first.stop("TERM").code(), Some(0), "{}", first.log());
    assert!(!socket.exists());
}

#[test]
fn what_is_not_a_socket_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, "data").unwrap();
    let subdir = dir.path().join("a-directory");
    std::fs::create_dir(&subdir).unwrap();
    std::fs::write(subdir.join("inside"), "data").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();

    for path in [&file, &subdir, &link] {
        let out = finish(
            agent()
                .args(["run", "--admin-addr", "127.0.0.1:0", "--socket"])
                .arg(path),
            QUICK,
        );
        assert!(
            !out.status.success() && out.code().is_some(),
            "{}: {} {}",
            path.display(),
            out.status,
            out.stderr
        );
        assert!(
            out.stderr.contains("not a socket"),
            "{}: {}",
            path.display(),
            out.stderr
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    assert_eq!(
        std::fs::read_to_string(subdir.join("inside")).unwrap(),
        "data"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), file);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a-directory", "link", "precious"], "stray files");
}

/// A socket path a little under the platform limit (108 bytes on Linux, including the NUL)
/// is a valid path and must work.
#[test]
fn a_socket_path_near_the_length_limit_works() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().display().to_string().len() + "/".len() + "/sock".len();
    let pad = 100usize.saturating_sub(base).max(1);
    let socket = dir.path().join("d".repeat(pad)).join("sock");
    assert!(socket.as_os_str().len() < 104, "{}", socket.display());
    let mut a = Running::start(dir.path(), &socket, &[]);
    assert!(is_socket(&socket));
    assert_eq!(a.stop("TERM").code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// 5. version and --help
// ---------------------------------------------------------------------------------------

#[test]
fn version_and_help() {
    let version = env!("CARGO_PKG_VERSION");
    let out = finish(agent().arg("version"), QUICK);
    assert_eq!(out.code(), Some(0));
    assert_eq!(
        out.stdout.trim(),
        format!("sds-agent {version} (backends: embedded, istiod, vault, acm-pca, cert-manager)")
    );
    let out = finish(agent().args(["version", "--output", "json"]), QUICK);
    assert_eq!(out.code(), Some(0));
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["version"], version);
    assert_eq!(v["backends"][0], "embedded");
    let out = finish(agent().arg("--version"), QUICK);
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout.contains(version), "{}", out.stdout);

    let out = finish(agent().arg("--help"), QUICK);
    assert_eq!(out.code(), Some(0));
    for sub in ["run", "validate", "status", "rotate", "version"] {
        assert!(
            out.stdout.lines().any(|l| l.trim_start().starts_with(sub)),
            "--help lacks the {sub} subcommand: {}",
            out.stdout
        );
    }

    let flags = [
        "config",
        "socket",
        "socket-mode",
        "trust-domain",
        "namespace",
        "service-account",
        "ca",
        "cert-ttl",
        "renew-at",
        "key-type",
        "embedded-ca-cert",
        "embedded-ca-key",
        "admin-addr",
        "log-level",
        "log-format",
        "output-dir",
    ];
    for sub in ["run", "validate"] {
        let out = finish(agent().args([sub, "--help"]), QUICK);
        assert_eq!(out.code(), Some(0));
        let help = &out.stdout;
        for flag in flags {
            // `--socket <PATH>`, not just the `--socket` in `--socket-mode`.
            assert!(
                help.contains(&format!("--{flag} <")),
                "{sub} --help lacks --{flag}: {help}"
            );
            let var = env_name(flag);
            assert!(
                help.contains(&format!("{var}=")),
                "{sub} --help lacks {var}: {help}"
            );
        }
        for default in [
            "cluster.local",
            "24h",
            "0.5",
            "ecdsa-p256",
            "127.0.0.1:15020",
            "0600",
        ] {
            assert!(
                help.contains(default),
                "{sub} --help lacks the default {default}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. No key material in logs
// ---------------------------------------------------------------------------------------

#[test]
fn no_key_material_in_logs_even_at_trace() {
    for format in ["text", "json"] {
        no_key_material_in_logs_at_trace_as(format);
    }
}

/// With file output on too, so writing the key file is among what is logged.
fn no_key_material_in_logs_at_trace_as(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path(), "ca");
    let socket = dir.path().join("sds.sock");
    let out_dir = dir.path().join("certs");
    let mut a = Running::start(
        dir.path(),
        &socket,
        &[
            "--log-level",
            "trace",
            "--log-format",
            format,
            "--output-dir",
            out_dir.to_str().unwrap(),
            "--embedded-ca-cert",
            ca.cert.to_str().unwrap(),
            "--embedded-ca-key",
            ca.key.to_str().unwrap(),
        ],
    );
    // Serve the key over SDS, rotate, and serve the new one, so that loading the CA, issuing,
    // rotating and serving have all run (and logged at trace).
    let (_, first_key) = sds::fetch_default(&socket);
    let version_of = |a: &Running| {
        a.secrets()
            .iter()
            .find(|s| s["name"] == "default")
            .map(|s| s["version"].clone())
    };
    let v1 = version_of(&a);
    assert!(v1.is_some(), "no default in /secrets");
    assert_eq!(http(a.admin, "POST", "/rotate").map(|(s, _)| s), Some(202));
    assert!(
        wait_until(QUICK, || version_of(&a) != v1
            && sds::fetch_default(&socket).1 != first_key),
        "POST /rotate did not rotate: {}",
        a.log()
    );
    let (_, second_key) = sds::fetch_default(&socket);
    let _ = get(a.admin, "/metrics");
    assert!(
        wait_until(QUICK, || std::fs::read_to_string(out_dir.join("key.pem"))
            .is_ok_and(|k| k == second_key)),
        "key.pem never became the served key: {}",
        a.log()
    );
    assert_eq!(a.stop("TERM").code(), Some(0), "{}", a.log());

    let log = a.log();
    assert!(
        log.matches("certificate issued").count() >= 2,
        "expected two issuances in the trace log: {log}"
    );
    if format == "json" {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let event: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("--log-format json printed a non-JSON line ({e}): {line}")
            });
            assert!(
                event["level"].is_string() && event["timestamp"].is_string(),
                "{line}"
            );
        }
        assert!(
            log.lines().any(|l| l.contains("\"level\":\"TRACE\"")),
            "--log-level trace logged no trace event"
        );
        let issued: Value = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["message"] == "certificate issued")
            .expect("no `certificate issued` event");
        for field in ["serial", "not_after", "backend", "duration_ms"] {
            assert!(
                !issued[field].is_null(),
                "`certificate issued` lacks {field}: {issued}"
            );
        }
    } else {
        assert!(
            log.contains("TRACE"),
            "--log-level trace logged no trace event"
        );
    }
    assert!(
        log.contains("certificate files written"),
        "file output did not run: {log}"
    );
    for output in [&log, &a.printed()] {
        assert!(!output.contains("PRIVATE KEY"), "a PEM key in the output");
        assert_no_piece_of(&ca.key_pem, output, "the CA key");
        assert_no_piece_of(&first_key, output, "a workload key");
        assert_no_piece_of(&second_key, output, "the rotated workload key");
    }
}

// ---------------------------------------------------------------------------------------
// 7. status and rotate, for people and scripts
// ---------------------------------------------------------------------------------------

/// `status`/`rotate` against the agent at `port`.
fn client(sub: &str, port: u16, extra: &[&str]) -> Out {
    finish(
        agent()
            .arg(sub)
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(extra),
        QUICK,
    )
}

/// The `default` row's serial as `/secrets` has it.
fn served_serial(a: &Running) -> String {
    a.secrets()
        .iter()
        .find(|s| s["name"] == "default")
        .and_then(|s| s["serial"].as_str().map(str::to_owned))
        .expect("no default in /secrets")
}

/// The state `/proxies` gives the one connected proxy.
fn proxy_state(a: &Running) -> Option<String> {
    let (_, body) = get(a.admin, "/proxies")?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v.get(0)?["state"].as_str().map(str::to_owned)
}

#[test]
fn status_and_rotate_report_what_is_served_and_each_proxy_state() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let a = Running::start(dir.path(), &socket, &["--service-account", "web"]);

    // No proxy yet: ready, exit 0, the default row carries the served serial and backend.
    let serial = served_serial(&a);
    let out = client("status", a.admin, &[]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("default"))
        .unwrap_or_else(|| panic!("no default row: {}", out.stdout));
    for cell in [
        "spiffe://cluster.local/ns/default/sa/web",
        serial.as_str(),
        "embedded",
    ] {
        assert!(row.contains(cell), "{cell} not in {row:?}");
    }
    assert!(
        out.stdout.lines().any(|l| l.starts_with("ROOTCA")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("no proxies connected"),
        "{}",
        out.stdout
    );

    // A proxy subscribes and ACKs: its state is ACKED.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut first = sds::request(&["default", "ROOTCA"]);
    first.node = Some(Node {
        id: "web-1".into(),
        ..Default::default()
    });
    tx.try_send(first).unwrap();
    let mut responses = rt.block_on(async {
        sds::connect(&socket)
            .await
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner()
    });
    let next = |responses: &mut tonic::Streaming<_>| {
        rt.block_on(async { tokio::time::timeout(QUICK, responses.message()).await })
            .expect("no push in time")
            .unwrap()
            .expect("stream ended")
    };
    let r1: envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse =
        next(&mut responses);
    let mut ack = sds::request(&["default", "ROOTCA"]);
    ack.version_info = r1.version_info.clone();
    ack.response_nonce = r1.nonce.clone();
    tx.try_send(ack).unwrap();
    assert!(wait_until(QUICK, || proxy_state(&a).as_deref() == Some("acked")));
    let out = client("status", a.admin, &[]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let proxy = out
        .stdout
        .lines()
        .find(|l| l.contains("web-1"))
        .unwrap_or_else(|| panic!("no proxy row: {}", out.stdout));
    assert!(proxy.contains("ACKED") && proxy.contains("sotw"), "{proxy}");
    assert!(proxy.contains(&r1.version_info), "{proxy}");

    // rotate --wait: exit 0 once a new certificate is served, naming it.
    let out = client("rotate", a.admin, &["--wait", "--output", "json"]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["previous_serial"], serial.as_str());
    let rotated = served_serial(&a);
    assert_ne!(rotated, serial);
    assert_eq!(report["serial"], rotated.as_str());

    // The proxy rejects the pushed certificate: exit 4, and the NACK's message shown.
    let r2 = next(&mut responses);
    assert_ne!(r2.version_info, r1.version_info);
    let mut nack = sds::request(&["default", "ROOTCA"]);
    nack.version_info = r1.version_info.clone();
    nack.response_nonce = r2.nonce.clone();
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "Failed to load certificate chain".into(),
        details: vec![],
    });
    tx.try_send(nack).unwrap();
    assert!(wait_until(QUICK, || proxy_state(&a).as_deref() == Some("nacked")));
    let out = client("status", a.admin, &[]);
    assert_eq!(out.code(), Some(4), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("NACKED: Failed to load certificate chain"),
        "{}",
        out.stdout
    );
    let out = client("status", a.admin, &["-o", "json"]);
    assert_eq!(out.code(), Some(4));
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["proxies"][0]["state"], "nacked");
    assert_eq!(v["proxies"][0]["node_id"], "web-1");
    assert_eq!(v["secrets"][0]["serial"], rotated.as_str());
    assert_eq!(v["secrets"][0]["backend"], "embedded");

    // rotate without --wait: asked, exit 0; the certificate changes soon after.
    let out = client("rotate", a.admin, &[]);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "rotation requested");
    assert!(wait_until(QUICK, || served_serial(&a) != rotated));
    drop(tx);
}

#[test]
fn status_and_rotate_fail_clearly_without_an_agent_and_status_says_not_ready() {
    // Nothing listens: exit 1 and the address named.
    let port = free_port();
    for sub in ["status", "rotate"] {
        let out = client(sub, port, &["--timeout", "2s"]);
        assert_eq!(out.code(), Some(1), "{sub}: {}", out.stderr);
        assert!(
            out.stderr
                .contains("cannot reach the agent's admin endpoint")
                && out.stderr.contains(&format!("127.0.0.1:{port}")),
            "{sub}: {}",
            out.stderr
        );
    }
    // Something that is not the agent: exit 1, the answer quoted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
            );
        }
    });
    let out = client("status", other, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("unexpected answer") && out.stderr.contains("hello"),
        "{}",
        out.stderr
    );
    drop(server);

    // An agent whose CA never answers: exit 3, NOT READY with the CA's error.
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut child = Guard(Some(
        agent()
            .args(["run", "--socket"])
            .arg(dir.path().join("s"))
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--ca", "vault", "--vault-addr", "http://127.0.0.1:9"])
            .args(["--vault-role", "web", "--vault-token", "t"])
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    // Not ready, and the first failure recorded (the 503 comes before the first answer).
    assert!(wait_until(READY, || get(admin, "/readyz").is_some_and(
        |(s, body)| s == 503 && !body.contains(r#""consecutive_failures":0"#)
    )));
    let out = client("status", admin, &[]);
    assert_eq!(out.code(), Some(3), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("NOT READY"), "{}", out.stdout);
    assert!(
        out.stdout.contains("no secrets served yet"),
        "{}",
        out.stdout
    );
    let out = client("status", admin, &["-o", "json"]);
    assert_eq!(out.code(), Some(3));
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ready"], false);
    assert!(
        v["health"]["consecutive_failures"].as_u64() >= Some(1),
        "{v}"
    );
    assert!(child.try_wait().is_none(), "the agent exited");
}

// ---------------------------------------------------------------------------------------
// 8. File output
// ---------------------------------------------------------------------------------------

/// The leaf's public key (raw SPKI bits), subject and issuer, from a PEM chain.
fn leaf_of(chain_pem: &str) -> (Vec<u8>, String, String) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = pem::parse(chain_pem).unwrap();
    let (_, c) = X509Certificate::from_der(der.contents()).unwrap();
    (
        c.public_key().subject_public_key.data.to_vec(),
        c.subject().to_string(),
        c.issuer().to_string(),
    )
}

/// One read of the three files from one resolved `..data`: whether the set is consistent.
fn read_set(dir: &Path) -> Result<String, String> {
    // Resolve `..data` once; the set it names stays until two rotations later.
    let set = std::fs::canonicalize(dir.join("..data")).map_err(|e| e.to_string())?;
    let chain = std::fs::read_to_string(set.join("cert-chain.pem")).map_err(|e| e.to_string())?;
    let key = std::fs::read_to_string(set.join("key.pem")).map_err(|e| e.to_string())?;
    let root = std::fs::read_to_string(set.join("root-cert.pem")).map_err(|e| e.to_string())?;
    let pair = rcgen::KeyPair::from_pem(&key).map_err(|e| format!("key.pem: {e}"))?;
    let (leaf_key, _, issuer) = leaf_of(&chain);
    if leaf_key != pair.public_key_raw() {
        return Err(format!(
            "key.pem does not match cert-chain.pem in {}",
            set.display()
        ));
    }
    let (_, root_subject, _) = leaf_of(&root);
    if issuer != root_subject {
        return Err(format!("leaf issued by {issuer}, root is {root_subject}"));
    }
    Ok(set.display().to_string())
}

#[test]
fn file_output_is_replaced_as_a_set_through_twenty_rotations() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let out_dir = dir.path().join("certs");
    let a = Running::start(
        dir.path(),
        &socket,
        &["--output-dir", out_dir.to_str().unwrap()],
    );
    assert!(wait_until(QUICK, || read_set(&out_dir).is_ok()));

    // Readers: one through a resolved `..data` (key and certificate must always match), one
    // opening the names people use (each file must always be whole).
    let stop = Arc::new(AtomicBool::new(false));
    let set_reader = {
        let (stop, out_dir) = (stop.clone(), out_dir.clone());
        std::thread::spawn(move || {
            let mut sets = std::collections::BTreeSet::new();
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match read_set(&out_dir) {
                    Ok(set) => {
                        sets.insert(set);
                        reads += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((reads, sets.len()))
        })
    };
    let file_reader = {
        let (stop, out_dir) = (stop.clone(), out_dir.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for name in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
                    let text = std::fs::read_to_string(out_dir.join(name))
                        .map_err(|e| format!("{name}: {e}"))?;
                    let blocks = pem::parse_many(&text).map_err(|e| format!("{name}: {e}"))?;
                    if blocks.is_empty() || !text.ends_with("-----\n") {
                        return Err(format!("{name} is not whole: {text:?}"));
                    }
                }
                reads += 1;
            }
            Ok::<_, String>(reads)
        })
    };

    let mut serials = vec![served_serial(&a)];
    for _ in 0..20 {
        let out = client("rotate", a.admin, &["--wait", "-o", "json"]);
        assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
        let report: Value = serde_json::from_str(&out.stdout).unwrap();
        serials.push(report["serial"].as_str().unwrap().to_owned());
    }
    // The last set is on disk before the readers stop.
    let (last_chain, last_key) = sds::fetch_default(&socket);
    assert!(wait_until(QUICK, || {
        std::fs::read_to_string(out_dir.join("key.pem")).is_ok_and(|k| k == last_key)
    }));
    stop.store(true, Ordering::Relaxed);
    let (set_reads, sets_seen) = set_reader.join().unwrap().unwrap();
    let file_reads = file_reader.join().unwrap().unwrap();
    assert!(
        set_reads > 20 && file_reads > 20,
        "{set_reads} {file_reads}"
    );
    assert!(sets_seen > 1, "the reader never saw a rotation");
    eprintln!("{set_reads} set reads over {sets_seen} sets, {file_reads} file reads, 0 mismatches");
    let unique: std::collections::BTreeSet<_> = serials.iter().collect();
    assert_eq!(unique.len(), 21, "{serials:?}");

    // What is left: the three names as symlinks through ..data, the current and the
    // previous sets only, the key 0600 and the rest 0644, and the chain the one served.
    assert_eq!(
        std::fs::read_to_string(out_dir.join("cert-chain.pem")).unwrap(),
        last_chain
    );
    for (name, want) in [
        ("cert-chain.pem", 0o644),
        ("key.pem", 0o600),
        ("root-cert.pem", 0o644),
    ] {
        let link = out_dir.join(name);
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("..data").join(name)
        );
        assert_eq!(mode(&link), want, "{name}");
    }
    // The old sets go after `..data` has switched, so the last write may still be removing
    // them when the new key is already readable: wait (bounded) for it to finish.
    let sets = || -> Vec<String> {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != "..data")
            .collect()
    };
    assert!(wait_until(QUICK, || sets().len() == 2), "{:?}", sets());
    // One write per set at most: two rotations that land during one write are written once,
    // as the newer. The count comes after the write returns, so it is waited for too.
    let writes = || {
        get(a.admin, "/metrics").and_then(|(_, metrics)| {
            metrics
                .lines()
                .find(|l| l.starts_with("sds_agent_file_writes_total{result=\"success\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    assert!(
        wait_until(QUICK, || writes() >= Some(sets_seen as u64)),
        "{:?} writes, {sets_seen} sets seen",
        writes()
    );
}

#[test]
fn file_output_never_overwrites_files_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::write(out_dir.join("key.pem"), "someone else's key\n").unwrap();
    let out = finish(
        agent()
            .args(["run", "--socket"])
            .arg(dir.path().join("s"))
            .args(["--admin-addr", "127.0.0.1:0", "--output-dir"])
            .arg(&out_dir),
        QUICK,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--output-dir") && out.stderr.contains("was not written by sds-agent"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("key.pem")).unwrap(),
        "someone else's key\n"
    );
    assert!(!dir.path().join("s").exists(), "socket left behind");
}

// ---------------------------------------------------------------------------------------
// Caller authorization: SO_PEERCRED against --allowed-uids / --allowed-gids
// ---------------------------------------------------------------------------------------

/// The uid and gid this test runs as: the owner of a file it creates.
fn own_ids(dir: &Path) -> (u32, u32) {
    let probe = dir.join("whoami");
    std::fs::write(&probe, "").unwrap();
    let m = std::fs::metadata(&probe).unwrap();
    (m.uid(), m.gid())
}

/// FetchSecrets and StreamSecrets for `default`: the gRPC code of each (`Ok` when a secret
/// came back), and the messages of the refusals.
fn call_both(socket: &Path) -> [(tonic::Code, String); 2] {
    use tokio_stream::StreamExt;
    sds::runtime().block_on(async {
        tokio::time::timeout(QUICK, async {
            let mut client = sds::connect(socket).await;
            let fetch = match client.fetch_secrets(sds::request(&["default"])).await {
                Ok(r) => {
                    sds::default_of(r.get_ref());
                    (tonic::Code::Ok, String::new())
                }
                Err(s) => (s.code(), s.message().to_owned()),
            };
            let requests = tokio_stream::once(sds::request(&["default"]));
            let stream = match client.stream_secrets(requests).await {
                Ok(r) => match r.into_inner().next().await {
                    Some(Ok(first)) => {
                        sds::default_of(&first);
                        (tonic::Code::Ok, String::new())
                    }
                    Some(Err(s)) => (s.code(), s.message().to_owned()),
                    None => (tonic::Code::Unknown, "stream ended".into()),
                },
                Err(s) => (s.code(), s.message().to_owned()),
            };
            [fetch, stream]
        })
        .await
        .expect("SDS calls timed out")
    })
}

fn metric(a: &Running, series: &str) -> Option<f64> {
    let (_, body) = get(a.admin, "/metrics").unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn callers_whose_uid_and_gid_are_not_allowed_get_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = own_ids(dir.path());
    // Some other uid than ours, so this process is a stranger.
    let stranger = (uid + 4242).to_string();
    let socket = dir.path().join("refusing.sock");
    let mut a = Running::start(dir.path(), &socket, &["--allowed-uids", &stranger]);
    let denied = "sds_agent_sds_callers_denied_total";
    assert_eq!(metric(&a, denied), Some(0.0), "the counter exists at zero");

    for (code, message) in call_both(&socket) {
        assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
        assert_eq!(
            message,
            format!("uid {uid} gid {gid} may not fetch secrets from this agent")
        );
    }
    assert_eq!(metric(&a, denied), Some(2.0));
    let (_, proxies) = get(a.admin, "/proxies").unwrap();
    assert_eq!(proxies, "[]", "a refused stream is not a proxy");
    let log = a.log();
    assert_eq!(
        log.matches("refusing SDS caller").count(),
        2,
        "one line per refusal: {log}"
    );
    assert!(
        log.contains(&format!("uid={uid} gid={gid} pid={}", std::process::id())),
        "the log names the caller: {log}"
    );
    assert!(a.stop("TERM").success());

    // The same policy with our group added: in, and /proxies says who we are.
    let socket = dir.path().join("by-group.sock");
    let mut a = Running::start(
        dir.path(),
        &socket,
        &[
            "--allowed-uids",
            &stranger,
            "--allowed-gids",
            &gid.to_string(),
        ],
    );
    let rt = sds::runtime();
    let proxies = rt.block_on(async {
        use tokio_stream::StreamExt;
        let mut client = sds::connect(&socket).await;
        let (_keep, requests) = {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(sds::request(&["default"])).await.unwrap();
            (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
        };
        let mut responses = client.stream_secrets(requests).await.unwrap().into_inner();
        tokio::time::timeout(QUICK, responses.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        get(a.admin, "/proxies").unwrap().1
    });
    let proxies: Value = serde_json::from_str(&proxies).unwrap();
    assert_eq!(
        proxies[0]["caller"],
        serde_json::json!({ "uid": uid, "gid": gid, "pid": std::process::id() }),
        "{proxies}"
    );
    assert_eq!(metric(&a, denied), Some(0.0));
    // The client's connection closes with its runtime: no shutdown grace period to wait out.
    drop(rt);
    assert!(a.stop("TERM").success());
}

/// Run by [`another_user_is_refused_by_default_and_served_once_listed`] as another user:
/// calls the socket in `SDS_CALLER_SOCKET` and prints what it got.
#[test]
#[ignore = "a helper: run as another user by another test"]
fn sds_calls_as_another_user() {
    let Some(socket) = std::env::var_os("SDS_CALLER_SOCKET") else {
        return;
    };
    for (code, message) in call_both(Path::new(&socket)) {
        println!("CALL {code:?} {message}");
    }
}

/// A process of another user (uid 65534, started with setpriv) reaches a socket opened to
/// everyone (0666): refused by default, which is the agent's own uid only; served once its
/// uid is listed.
#[test]
fn another_user_is_refused_by_default_and_served_once_listed() {
    let dir = tempfile::tempdir().unwrap();
    if own_ids(dir.path()).0 != 0 {
        eprintln!("skipped: only root can run a process as another user here");
        return;
    }
    // A copy of this test binary that uid 65534 can run, in a directory it can enter.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("caller");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let as_nobody = |socket: &Path| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args([
                "--ignored",
                "--exact",
                "sds_calls_as_another_user",
                "--nocapture",
            ])
            .env("SDS_CALLER_SOCKET", socket)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix("CALL "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    let socket = dir.path().join("default.sock");
    let mut a = Running::start(dir.path(), &socket, &["--socket-mode", "0666"]);
    let calls = as_nobody(&socket);
    assert_eq!(
        calls,
        ["PermissionDenied uid 65534 gid 65534 may not fetch secrets from this agent"; 2]
    );
    assert_eq!(metric(&a, "sds_agent_sds_callers_denied_total"), Some(2.0));
    // The agent's own user is still served.
    assert_eq!(call_both(&socket).map(|(c, _)| c), [tonic::Code::Ok; 2]);
    assert!(a.stop("TERM").success());

    let socket = dir.path().join("listed.sock");
    let mut a = Running::start(
        dir.path(),
        &socket,
        &["--socket-mode", "0666", "--allowed-uids", "65534"],
    );
    assert_eq!(as_nobody(&socket), ["Ok ", "Ok "]);
    // Listing another uid replaces the default: root is no longer served.
    assert_eq!(
        call_both(&socket).map(|(c, _)| c),
        [tonic::Code::PermissionDenied; 2]
    );
    assert!(a.stop("TERM").success());
}

// ---------------------------------------------------------------------------------------
// The socket kept in place
// ---------------------------------------------------------------------------------------

/// The socket deleted under a running agent comes back within a few seconds, logged and
/// counted, and serves; a regular file put in its place is never deleted, and the socket
/// returns once that file is gone. Streams open meanwhile are not cut.
#[test]
fn a_deleted_or_replaced_socket_is_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kept.sock");
    let mut a = Running::start(dir.path(), &socket, &[]);
    let recreated = "sds_agent_socket_recreated_total";
    assert_eq!(metric(&a, recreated), Some(0.0));
    let rt = sds::runtime();
    // A stream opened before anything happens to the socket file.
    let mut before = rt.block_on(async {
        use tokio_stream::StreamExt;
        let mut client = sds::connect(&socket).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(sds::request(&["default"])).await.unwrap();
        let mut responses = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(QUICK, responses.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        (client, tx, responses)
    });

    std::fs::remove_file(&socket).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || is_socket(&socket)),
        "the socket was not created again: {}",
        a.log()
    );
    assert_eq!(mode(&socket), 0o600, "created again with the same mode");
    assert!(
        wait_until(Duration::from_secs(5), || a
            .log()
            .contains("the SDS socket was deleted; created it again")),
        "{}",
        a.log()
    );
    let (chain, _) = sds::fetch_default(&socket);
    assert!(chain.contains("BEGIN CERTIFICATE"));
    assert_eq!(metric(&a, recreated), Some(1.0));

    // A regular file in its place: refused, logged once, left alone.
    // Renamed over the socket in one step: were it removed first, the agent's check could
    // come in between and bind a new socket there.
    let file = dir.path().join("not-yours");
    std::fs::write(&file, "not yours").unwrap();
    std::fs::rename(&file, &socket).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || a
            .log()
            .contains("cannot be created again")),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not yours");
    assert_eq!(
        a.log().matches("cannot be created again").count(),
        1,
        "the same failure logged every second: {}",
        a.log()
    );
    std::fs::remove_file(&socket).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || is_socket(&socket)),
        "the socket did not come back once the file was gone: {}",
        a.log()
    );
    // Counted just after the socket appears.
    assert!(
        wait_until(QUICK, || metric(&a, recreated) == Some(2.0)),
        "{:?}",
        metric(&a, recreated)
    );
    let (chain, _) = sds::fetch_default(&socket);
    assert!(chain.contains("BEGIN CERTIFICATE"));

    // The stream from before still gets pushes: a rotation reaches it.
    assert_eq!(http(a.admin, "POST", "/rotate").map(|(c, _)| c), Some(202));
    rt.block_on(async {
        use tokio_stream::StreamExt;
        // The request sender stays alive (in `before`): the stream is still open.
        let (_, _, ref mut responses) = before;
        let pushed = tokio::time::timeout(QUICK, responses.next())
            .await
            .expect("no push after the rotation")
            .unwrap()
            .unwrap();
        assert!(pushed.version_info.contains("default:2"), "{pushed:?}");
    });
    // Dropping the runtime closes the client's connection, so the stop needs no grace period.
    drop(before);
    drop(rt);
    assert!(a.stop("TERM").success());
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

/// SIGTERM the moment the socket appears, before the agent is even ready: a clean exit 0 with
/// the socket removed, every time (signal handlers come before the socket).
#[test]
fn sigterm_as_soon_as_the_socket_appears_still_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        let socket = dir.path().join(format!("early-{i}.sock"));
        let child = agent()
            .args(["run", "--admin-addr", "127.0.0.1:0", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = Guard(Some(child));
        // A shell loop with builtins notices the socket within microseconds, far sooner than
        // this process could poll and spawn kill(1).
        let watcher = Command::new("sh")
            .args([
                "-c",
                r#"while [ ! -S "$1" ]; do kill -0 "$2" 2>/dev/null || exit 1; done; kill -TERM "$2""#,
                "sh",
            ])
            .arg(&socket)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(
            watcher.success(),
            "run {i}: the agent exited before its socket appeared"
        );
        let status = child.wait(STOP).expect("still running after SIGTERM");
        assert_eq!(status.code(), Some(0), "run {i}: {status}");
        assert!(!socket.exists(), "run {i}: socket left behind");
    }
}

/// The commands speak plain HTTP to the admin address: no CA bundle is needed, and a broken
/// one does not stop them (an image may carry none).
#[test]
fn status_works_without_any_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Running::start(dir.path(), &dir.path().join("s.sock"), &[]);
    let out = finish(
        agent()
            .args(["status", "--admin-addr", &format!("127.0.0.1:{}", a.admin)])
            .env("SSL_CERT_FILE", dir.path().join("no-such-bundle.pem"))
            .env("SSL_CERT_DIR", dir.path().join("no-such-dir")),
        QUICK,
    );
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("ready"), "{}", out.stdout);
    assert!(a.stop("TERM").success());
}

/// `--ca vault,embedded`: `validate` resolves and builds every listed backend, each with its
/// own settings, and prints them in order with the failover threshold.
#[test]
fn validate_resolves_every_backend_of_a_ca_list() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("vault-token");
    std::fs::write(&token, "hvs.never-printed").unwrap();
    let token = token.display().to_string();
    let d = validate_json(agent().current_dir(dir.path()).args([
        "validate",
        "--ca",
        "vault, embedded",
        "--vault-addr",
        "http://127.0.0.1:8200",
        "--vault-role",
        "sds",
        "--vault-token-file",
        &token,
        "--ca-failover-after",
        "90s",
    ]));
    assert_eq!(d["ca"]["backend"], "vault");
    assert_eq!(d["ca-fallbacks"][0]["backend"], "embedded");
    assert_eq!(d["ca-fallbacks"].as_array().unwrap().len(), 1);
    assert_eq!(
        humantime::parse_duration(d["ca-failover-after"].as_str().unwrap()).unwrap(),
        Duration::from_secs(90)
    );
    // One backend: neither key.
    let d = validate_json(agent().current_dir(dir.path()).arg("validate"));
    assert!(d.get("ca-fallbacks").is_none() && d.get("ca-failover-after").is_none());
    // A fallback whose file cannot be used fails `validate`, naming the backend.
    let out = finish(
        agent().current_dir(dir.path()).args([
            "validate",
            "--ca",
            "vault,embedded",
            "--vault-addr",
            "http://127.0.0.1:8200",
            "--vault-role",
            "sds",
            "--vault-token-file",
            &token,
            "--embedded-ca-cert",
            &token,
            "--embedded-ca-key",
            &token,
        ]),
        QUICK,
    );
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("--ca backend embedded"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("never-printed"), "{}", out.stderr);
}
