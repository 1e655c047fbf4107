//! Staged root rotation under traffic, with real Envoys: two agents, a client Envoy and a
//! server Envoy doing mTLS with a new handshake per request (and one pooled connection),
//! while the trust domain's root changes.
//!
//! - **Embedded CA:** the agents share a root from files; the next CA's files appear, and
//!   `sds-agent ca rotate` (the real CLI) asks each agent to rotate.
//! - **istiod:** the test Istio CA adds a root, signs under it, then drops the old one, as an
//!   operator does with istiod's plugged-in root; the agents follow.
//! - **Vault (OpenBao):** a second root issuer is generated in the PKI mount, made the
//!   default issuer, and the first issuer is deleted; the agents follow.
//!
//! Each test asserts 0 failed requests, every phase seen in `/trust` in order (announced,
//! issuing, retiring, removed), and the old root gone from every Envoy at the end.
//!
//! Without Envoy the tests print a line and pass, unless `SDS_AGENT_REQUIRE_ENVOY=1` (set by
//! `scripts/test.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::time::Duration;

use sds_integration::agent::Agent;
use sds_integration::envoy::Envoy;
use sds_integration::http;
use sds_integration::istio_ca::{IstioTestCa, mesh_ca};
use sds_integration::mesh::{BODY, Mesh, MeshCa, Traffic, drive, rotation_paths};
use sds_integration::pki::SharedCa;
use sds_integration::pki::serial_of_pem;
use sds_integration::process::{agent_bin, envoy_bin};
use sds_integration::vault::Vault;
use sds_integration::{Serial, test_dir, wait_until};
use serde_json::Value;
use tokio::time::Instant;

/// `--root-overlap` of the agents: long enough to see phase 3, short enough for a test.
const OVERLAP: &str = "4s";
const PHASES: [&str; 4] = ["announced", "issuing", "retiring", "removed"];

async fn trust(agent: &Agent) -> Value {
    let r = http::get(agent.admin(), "/trust").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).unwrap()
}

fn phase(t: &Value) -> String {
    t["rotation"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn history(t: &Value) -> Vec<String> {
    t["rotation"]["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|c| c["phase"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn served_roots(t: &Value) -> Vec<Serial> {
    t["roots"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| r["serial"].as_str().unwrap_or_default().parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The roots an Envoy trusts, as `/certs` shows them.
async fn envoy_roots(envoy: &Envoy) -> Option<Vec<Serial>> {
    let certs = envoy.certs().await.ok()?;
    Some(certs.first()?.ca.iter().map(|c| c.serial.clone()).collect())
}

/// Polls both agents' `/trust` until `until`, and returns the phases each was seen in, in
/// the order seen (consecutive repeats folded).
async fn watch_phases(mesh: &Mesh, until: Instant) -> [Vec<String>; 2] {
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    while Instant::now() < until {
        for (i, agent) in [&mesh.frontend, &mesh.backend].into_iter().enumerate() {
            let p = phase(&trust(agent).await);
            if seen[i].last() != Some(&p) {
                seen[i].push(p);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// Every phase in `seen` comes after the one before it.
fn assert_in_order(seen: &[String], report: &str) {
    let rank = |p: &str| {
        ["none", "announced", "issuing", "retiring", "removed"]
            .iter()
            .position(|x| *x == p)
            .unwrap_or_else(|| panic!("unknown phase {p}: {report}"))
    };
    assert!(
        seen.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
        "phases out of order {seen:?}: {report}"
    );
}

async fn wait_for_phase(agent: &Agent, wanted: &str, limit: Duration) {
    let reached = wait_until(&format!("phase {wanted}"), limit, || async {
        phase(&trust(agent).await) == wanted
    })
    .await;
    if let Err(e) = reached {
        panic!("{e}: {} says {}", agent.spiffe_id(), trust(agent).await);
    }
}

/// Waits until both Envoys trust exactly `roots`, in any order.
async fn wait_for_envoys_to_trust(mesh: &Mesh, roots: &[Serial]) {
    for side in [&mesh.client, &mesh.server] {
        wait_until(
            "the Envoys to trust the new roots",
            Duration::from_secs(20),
            || {
                let mut roots = roots.to_vec();
                roots.sort();
                async move {
                    envoy_roots(side).await.is_some_and(|mut r| {
                        r.sort();
                        r == roots
                    })
                }
            },
        )
        .await
        .unwrap();
    }
}

/// The traffic of the two loops, checked, with the mesh's diagnostics on failure.
async fn check_traffic(mesh: &Mesh, fresh: &Traffic, pooled: &Traffic) -> String {
    let report = format!(
        "fresh: {} ok, {} failed {:?}; pooled: {} ok, {} failed {:?}\n{}",
        fresh.ok,
        fresh.failed,
        fresh.failures,
        pooled.ok,
        pooled.failed,
        pooled.failures,
        mesh.diagnostics().await
    );
    assert_eq!(fresh.failed + pooled.failed, 0, "{report}");
    assert!(fresh.ok > 50 && pooled.ok > 50, "{report}");
    assert!(fresh.wrong_peers.is_empty(), "{report}");
    report
}

/// What a rotation under traffic showed.
struct Rotated {
    fresh: Traffic,
    pooled: Traffic,
    /// The mesh's diagnostics and the traffic, for failure messages.
    report: String,
    /// The phases each agent was seen in.
    seen: [Vec<String>; 2],
    /// The roots served at the end.
    new_roots: Vec<Serial>,
}

/// Runs `steps` (which returns the roots expected at the end) while requests flow on a new
/// connection each and on a pooled one until `until`. Then checks the traffic (0 failed),
/// that each agent went through every phase in order and serves only the new roots, and that
/// both Envoys trust only those.
async fn rotate_under_traffic(
    mesh: &Mesh,
    until: Instant,
    steps: impl Future<Output = Vec<Serial>>,
) -> Rotated {
    let (fresh, pooled, seen, new_roots) = tokio::join!(
        drive(mesh.entry, "/fresh", until),
        drive(mesh.entry, "/pooled", until),
        watch_phases(mesh, until),
        steps,
    );
    let report = check_traffic(mesh, &fresh, &pooled).await;
    for (agent, seen) in [&mesh.frontend, &mesh.backend].into_iter().zip(&seen) {
        let t = trust(agent).await;
        assert_eq!(history(&t), PHASES, "{t}");
        assert_in_order(seen, &report);
        assert_eq!(served_roots(&t), new_roots, "{t}");
    }
    wait_for_envoys_to_trust(mesh, &new_roots).await;
    Rotated {
        fresh,
        pooled,
        report,
        seen,
        new_roots,
    }
}

async fn first_request(mesh: &Mesh) {
    let entry = mesh.entry;
    wait_until("a first request", Duration::from_secs(20), || async move {
        http::get(entry, "/fresh")
            .await
            .is_ok_and(|r| r.status == 200 && r.body == BODY)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_embedded_ca_root_is_rotated_under_traffic_in_four_phases() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let current = SharedCa::write(dir.path()).unwrap();
    let next_dir = dir.path().join("next");
    std::fs::create_dir(&next_dir).unwrap();
    let (next_cert, next_key) = (next_dir.join("ca.pem"), next_dir.join("ca-key.pem"));
    let old_root = current.serial.clone();
    let mesh_ca = {
        let (cert, key) = (current.cert.clone(), current.key.clone());
        let (next_cert, next_key) = (next_cert.clone(), next_key.clone());
        MeshCa {
            agent_args: Box::new(move |_| {
                vec![
                    "--embedded-ca-cert".into(),
                    cert.clone().into(),
                    "--embedded-ca-key".into(),
                    key.clone().into(),
                    // Named now, put in place later: the rotation begins when asked.
                    "--embedded-next-ca-cert".into(),
                    next_cert.clone().into(),
                    "--embedded-next-ca-key".into(),
                    next_key.clone().into(),
                    "--root-overlap".into(),
                    OVERLAP.into(),
                ]
            }),
            roots: vec![old_root.clone()],
            agent_env: Vec::new(),
        }
    };
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    first_request(&mesh).await;
    assert_eq!(phase(&trust(&mesh.frontend).await), "none");

    // Without the next CA's files, `ca rotate` is refused and says which file is missing.
    let refused = ca_rotate(&mesh.frontend).await;
    assert!(
        !refused.status.success() && refused.stderr.contains("ca.pem"),
        "{refused:?}"
    );

    let until = Instant::now() + Duration::from_secs(30);
    let steps = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The operator puts the next CA where the flags say, and asks both agents.
        let next = SharedCa::write(&next_dir).unwrap();
        for agent in [&mesh.frontend, &mesh.backend] {
            let out = ca_rotate(agent).await;
            assert!(out.status.success(), "{out:?}");
            assert!(out.stdout.contains("root rotation begun"), "{out:?}");
        }
        for agent in [&mesh.frontend, &mesh.backend] {
            wait_for_phase(agent, "removed", Duration::from_secs(25)).await;
        }
        vec![next.serial]
    };
    let Rotated {
        fresh,
        pooled,
        report,
        seen,
        new_roots,
    } = rotate_under_traffic(&mesh, until, steps).await;
    for agent in [&mesh.frontend, &mesh.backend] {
        assert_eq!(
            agent
                .metric_total("sds_agent_root_rotation_phase ")
                .await
                .unwrap(),
            4
        );
    }
    // The handshakes used certificates of the new root by the end.
    let client_now = mesh.frontend.current_serial().await.unwrap().unwrap();
    let server_now = mesh.backend.current_serial().await.unwrap().unwrap();
    assert!(fresh.client_certs_used.contains(&client_now), "{report}");
    assert!(fresh.server_certs_used.contains(&server_now), "{report}");
    eprintln!(
        "embedded root rotation under traffic: fresh {} ok, pooled {} ok, 0 failed; phases seen \
         {seen:?}; old root {old_root} gone, new root {new_roots:?}",
        fresh.ok, pooled.ok
    );
}

#[tokio::test]
async fn an_istiod_root_rotation_is_followed_under_traffic_in_four_phases() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let ca = IstioTestCa::start(dir.path()).await.unwrap();
    let old_root = ca.root_serials().await.unwrap();
    let base = mesh_ca(&ca, dir.path(), None, old_root.clone())
        .await
        .unwrap();
    let mesh_ca = MeshCa {
        agent_args: Box::new(move |sa| {
            let mut args = (base.agent_args)(sa);
            args.extend::<[OsString; 2]>(["--root-overlap".into(), OVERLAP.into()]);
            args
        }),
        roots: base.roots,
        agent_env: base.agent_env,
    };
    // Long-lived certificates: each renewal here is one the agent or the test asks for.
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    first_request(&mesh).await;
    // istiod's roots are its own to rotate: `ca rotate` says so.
    let refused = ca_rotate(&mesh.frontend).await;
    assert!(
        !refused.status.success() && refused.stderr.contains("announces its own roots"),
        "{refused:?}"
    );

    let until = Instant::now() + Duration::from_secs(35);
    let steps = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // 1. The CA adds a root; the agents learn it with their next certificate.
        ca.add_next_root().await.unwrap();
        let both = ca.root_serials().await.unwrap();
        rotate(&mesh.frontend).await;
        rotate(&mesh.backend).await;
        // The Envoys ACK the bundle with both roots: phase 2. The CA still signs under the
        // old root, so the agents wait there.
        for agent in [&mesh.frontend, &mesh.backend] {
            wait_for_phase(agent, "issuing", Duration::from_secs(20)).await;
        }
        wait_for_envoys_to_trust(&mesh, &both).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(phase(&trust(&mesh.frontend).await), "issuing");
        // 2. The CA signs under the new root; the frontend moves first.
        ca.sign_with_next_root().await;
        rotate(&mesh.frontend).await;
        wait_for_phase(&mesh.frontend, "retiring", Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        rotate(&mesh.backend).await;
        wait_for_phase(&mesh.backend, "retiring", Duration::from_secs(20)).await;
        // 3. The CA drops the old root; the agents learn it with their next certificate, and
        //    remove it once the overlap is over.
        ca.drop_old_root().await;
        rotate(&mesh.frontend).await;
        rotate(&mesh.backend).await;
        for agent in [&mesh.frontend, &mesh.backend] {
            wait_for_phase(agent, "removed", Duration::from_secs(20)).await;
        }
        ca.root_serials().await.unwrap()
    };
    let Rotated {
        fresh,
        pooled,
        report,
        seen,
        new_roots: new_root,
    } = rotate_under_traffic(&mesh, until, steps).await;
    assert_eq!(new_root.len(), 1);
    assert_ne!(new_root, old_root);
    let client_now = mesh.frontend.current_serial().await.unwrap().unwrap();
    assert!(fresh.client_certs_used.contains(&client_now), "{report}");
    eprintln!(
        "istiod root rotation under traffic: fresh {} ok, pooled {} ok, 0 failed; phases seen \
         {seen:?}; old root {old_root:?} gone, new root {new_root:?}",
        fresh.ok, pooled.ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_issuer_rotation_is_followed_under_traffic_in_four_phases() {
    let Some(envoy) = envoy_bin().unwrap() else {
        return;
    };
    let dir = test_dir().unwrap();
    let Some(vault) = Vault::start(dir.path()).await.unwrap() else {
        return;
    };
    let root_1 = vault
        .pki_with_root("pki", "sds-agent root 1")
        .await
        .unwrap();
    vault
        .role("pki", "sds", "spiffe://example.org/*", "1h")
        .await
        .unwrap();
    vault.sign_policy("sds-agent", "pki", "sds").await.unwrap();
    // The issuers API, from which the agents read the roots, needs no token.
    let token = vault.token("sds-agent", "1h", true).await.unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, token).unwrap();
    let old_root = vec![serial_of_pem(&root_1).unwrap()];
    let addr = vault.addr().to_owned();
    let mesh_ca = MeshCa {
        agent_args: Box::new(move |_| {
            [
                "--ca",
                "vault",
                "--vault-addr",
                &addr,
                "--vault-role",
                "sds",
                "--root-overlap",
                OVERLAP,
                // Issuers added and deleted are seen within a second.
                "--trust-bundle-refresh",
                "1s",
            ]
            .into_iter()
            .map(OsString::from)
            .chain([
                OsString::from("--vault-token-file"),
                token_file.clone().into(),
            ])
            .collect()
        }),
        roots: old_root.clone(),
        agent_env: Vec::new(),
    };
    let mesh = Mesh::start(&envoy, dir.path(), "1h", &rotation_paths(), &mesh_ca)
        .await
        .unwrap();
    first_request(&mesh).await;

    let until = Instant::now() + Duration::from_secs(35);
    let steps = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // 1. A second root issuer; the default issuer still signs.
        let root_2 = vault
            .root(
                "POST",
                "pki/root/generate/internal",
                Some(serde_json::json!({
                    "common_name": "sds-agent root 2",
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": "87600h",
                    "issuer_name": "root-2",
                })),
            )
            .await
            .unwrap();
        let new_root = serial_of_pem(root_2["data"]["certificate"].as_str().unwrap()).unwrap();
        for agent in [&mesh.frontend, &mesh.backend] {
            wait_for_phase(agent, "issuing", Duration::from_secs(20)).await;
        }
        let mut both = old_root.clone();
        both.push(new_root.clone());
        wait_for_envoys_to_trust(&mesh, &both).await;
        // 2. root-2 becomes the default issuer; the agents renew under it.
        vault
            .root(
                "POST",
                "pki/config/issuers",
                Some(serde_json::json!({ "default": "root-2" })),
            )
            .await
            .unwrap();
        rotate(&mesh.frontend).await;
        wait_for_phase(&mesh.frontend, "retiring", Duration::from_secs(20)).await;
        rotate(&mesh.backend).await;
        wait_for_phase(&mesh.backend, "retiring", Duration::from_secs(20)).await;
        // 3. root-1 is deleted from the mount: gone at the next read, after the overlap.
        vault
            .root("DELETE", "pki/issuer/root-1", None)
            .await
            .unwrap();
        for agent in [&mesh.frontend, &mesh.backend] {
            wait_for_phase(agent, "removed", Duration::from_secs(20)).await;
        }
        vec![new_root]
    };
    let Rotated {
        fresh,
        pooled,
        seen,
        new_roots,
        ..
    } = rotate_under_traffic(&mesh, until, steps).await;
    eprintln!(
        "vault root rotation under traffic: fresh {} ok, pooled {} ok, 0 failed; phases seen \
         {seen:?}; old root {old_root:?} gone, new roots {new_roots:?}",
        fresh.ok, pooled.ok
    );
}

async fn rotate(agent: &Agent) {
    let r = http::request(agent.admin(), "POST", "/rotate")
        .await
        .unwrap();
    assert!((200..300).contains(&r.status), "POST /rotate: {r:?}");
}

#[derive(Debug)]
struct CliOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// `sds-agent ca rotate --admin-addr <agent>`, the real CLI.
async fn ca_rotate(agent: &Agent) -> CliOutput {
    let out = tokio::process::Command::new(agent_bin().unwrap())
        .args(["ca", "rotate", "--admin-addr", &agent.admin().to_string()])
        .output()
        .await
        .unwrap();
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
