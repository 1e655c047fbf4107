//! File output (`--output-dir`): the served certificate chain, its key and the trust bundle
//! as `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem`, for applications without a
//! proxy.
//!
//! The three files are replaced together, the way the kubelet updates Secret volumes: each
//! set is written into a new hidden directory (`..<RFC 3339 time>`), flushed to disk, then
//! the `..data` symlink is pointed at it with one `rename`, which is atomic. The names
//! people open (`DIR/key.pem`, ...) are symlinks through `..data`, so each file, opened on
//! its own, is always complete and from one set. A reader that needs the key and the
//! certificate to match, whatever the timing, resolves `DIR/..data` once and opens the
//! files in the directory it names; the set before the current one is kept, so such a reader
//! is never left with a directory deleted under it by the next rotation.
//!
//! Files are rewritten whenever the certificate or the trust bundle changes. When the
//! certificate expires and is withdrawn, the files stay (the application keeps what it has,
//! as Envoy does); the metrics and `/readyz` say so. A failed write is logged, counted in
//! `sds_agent_file_writes_total{result="failure"}` and retried with backoff; the previous
//! set stays in place meanwhile.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::{Metrics, ResultLabel};
use crate::secrets::{SecretManager, ServedBundle, ServedCert};

/// The certificate chain, leaf first.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The private key, PKCS#8, mode 0600.
pub const KEY: &str = "key.pem";
/// The trust bundle.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The symlink naming the current set.
pub const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Writes sets of files into one directory.
#[derive(Debug)]
pub struct FileOutput {
    dir: PathBuf,
}

impl FileOutput {
    /// Prepares `dir` (created if missing). Fails if a file the agent must own already
    /// exists there as something other than its symlink: the agent never overwrites a
    /// key or certificate it did not write.
    pub fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for name in [CERT_CHAIN, KEY, ROOT_CERT] {
            let path = dir.join(name);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} exists and was not written by sds-agent; remove it or choose another --output-dir",
                            path.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // A set half-switched by a crash.
        match fs::remove_file(dir.join(DATA_TMP)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one set and switches `..data` to it; then removes sets older than the
    /// previous one. Returns the new set's directory name.
    pub fn write(&self, cert: &ServedCert, bundle: &ServedBundle) -> io::Result<String> {
        let name = format!("..{}", humantime::format_rfc3339_nanos(SystemTime::now()));
        let generation = self.dir.join(&name);
        fs::create_dir(&generation)?;
        fs::set_permissions(&generation, fs::Permissions::from_mode(0o755))?;
        let written = (|| {
            write_file(
                &generation.join(CERT_CHAIN),
                cert.chain_pem.as_bytes(),
                0o644,
            )?;
            write_file(&generation.join(KEY), cert.key_pem().as_bytes(), 0o600)?;
            write_file(&generation.join(ROOT_CERT), bundle.pem.as_bytes(), 0o644)?;
            sync_dir(&generation)
        })();
        if let Err(e) = written {
            drop(fs::remove_dir_all(&generation));
            return Err(e);
        }
        let previous = fs::read_link(self.dir.join(DATA)).ok();
        // Point a new symlink at the set, then rename it over `..data`: readers see the old
        // set or the new one, never a mix.
        let tmp = self.dir.join(DATA_TMP);
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        symlink(&name, &tmp)?;
        fs::rename(&tmp, self.dir.join(DATA))?;
        for file in [CERT_CHAIN, KEY, ROOT_CERT] {
            let link = self.dir.join(file);
            if fs::symlink_metadata(&link).is_err() {
                symlink(Path::new(DATA).join(file), &link)?;
            }
        }
        sync_dir(&self.dir)?;
        self.remove_old(&name, previous.as_deref());
        Ok(name)
    }

    /// Removes every set but `current` and `previous`. Failures only warn: a leftover
    /// directory costs a few kilobytes, and the next write tries again.
    fn remove_old(&self, current: &str, previous: Option<&Path>) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = name == current
                || name == DATA
                || name == DATA_TMP
                || previous.is_some_and(|p| p == Path::new(name));
            if keep || !name.starts_with("..") {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && let Err(error) = fs::remove_dir_all(entry.path())
            {
                warn!(%error, dir = %entry.path().display(), "cannot remove an old file output set");
            }
        }
    }

    /// Writes a set whenever the certificate or the bundle changes, until `shutdown`.
    pub async fn run(
        self,
        manager: Arc<SecretManager>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        // File output is per-pod mode's: the workload's own identity (config refuses it in
        // node mode).
        let Some(identity) = manager.workload_identity().cloned() else {
            error!("file output needs a workload identity; none in node mode");
            return;
        };
        let mut cert_rx = manager.subscribe_cert(&identity);
        let mut bundle_rx = manager.subscribe_bundle();
        let mut written: Option<(u64, u64)> = None;
        let mut retry = RETRY_FIRST;
        let this = Arc::new(self);
        loop {
            let cert = cert_rx.borrow_and_update().clone();
            let bundle = bundle_rx.borrow_and_update().clone();
            let mut failed = false;
            if let (Some(cert), Some(bundle)) = (cert, bundle)
                && written != Some((cert.version, bundle.version))
            {
                let out = this.clone();
                let (c, b) = (cert.clone(), bundle.clone());
                let result = tokio::task::spawn_blocking(move || out.write(&c, &b))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                match result {
                    Ok(set) => {
                        metrics
                            .file_writes
                            .get_or_create(&ResultLabel { result: "success" })
                            .inc();
                        info!(
                            dir = %this.dir.display(), set, serial = %cert.leaf.serial,
                            "certificate files written"
                        );
                        written = Some((cert.version, bundle.version));
                        retry = RETRY_FIRST;
                    }
                    Err(e) => {
                        metrics
                            .file_writes
                            .get_or_create(&ResultLabel { result: "failure" })
                            .inc();
                        error!(
                            error = %e, dir = %this.dir.display(), retry_in_ms = retry.as_millis() as u64,
                            "cannot write the certificate files; the previous ones stay"
                        );
                        failed = true;
                    }
                }
            }
            let pause = async {
                if failed {
                    tokio::time::sleep(retry).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = cert_rx.changed() => if r.is_err() { return },
                r = bundle_rx.changed() => if r.is_err() { return },
                _ = pause => retry = (retry * 2).min(RETRY_MAX),
            }
        }
    }
}

/// Creates `path` with `mode` (never following or replacing anything), writes and flushes it.
fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have taken bits off; the key must be exactly 0600, the rest 0644.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
