//! The agent's Unix sockets (SDS, and the Workload API if served): created with tight permissions, never stolen from a live agent, and
//! removed on shutdown.
//!
//! The socket is bound under a temporary name in the same directory, given its mode, then
//! renamed into place, so no client can ever connect to it with looser permissions. A socket
//! file left by a crashed run (nobody accepts on it) is replaced; a live one is an error, and
//! anything that is not a socket is never deleted.
//!
//! While the agent runs, [`keep`] accepts connections and checks every second that the path
//! still names the socket it bound: one deleted (a cleanup script, a volume remounted) or
//! replaced is bound again, under the same rules, and the event is logged and counted.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::attest::conn::Conn;
use crate::metrics::Metrics;

/// How often the socket's path is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long to pause accepting after an accept error (out of file descriptors, say), so that
/// a persistent error does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Another process accepts connections on the path.
    #[error("{0} is in use: another agent is listening on it")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A filesystem call failed.
    #[error("{what} {path}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The path it failed on.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Longest socket path Linux takes: `sun_path` is 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Removes the socket file on drop, if it is still the one this process created.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketGuard {
    fn at(path: &Path) -> Result<Self, SocketError> {
        let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Io {
            what: "cannot stat",
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether the path still names the socket this guard was made for.
    pub fn in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

/// Accepts connections on `listener` into `conns` until `shutdown`, and keeps the socket at
/// `path`: whenever the path no longer names it, binds it again (with `mode`) and accepts on
/// the new one. Removes the socket when it ends. `name` ("SDS", "Workload API") is how the
/// log names the socket.
#[allow(clippy::too_many_arguments)] // one call per socket, in lib.rs; a struct would only rename them
pub async fn keep(
    name: &'static str,
    path: PathBuf,
    mode: u32,
    mut listener: UnixListener,
    mut guard: SocketGuard,
    conns: mpsc::Sender<io::Result<Conn>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last failure to rebind, so that it is logged once, not every second.
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    if conns.send(Ok(Conn::accepted(conn))).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    warn!(%error, socket = name, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            _ = tick.tick() => {
                if guard.in_place() {
                    continue;
                }
                let gone = match std::fs::symlink_metadata(&path) {
                    Err(_) => "deleted",
                    Ok(_) => "replaced",
                };
                match bind(&path, mode) {
                    Ok((l, g)) => {
                        // The old guard names a file that is no longer at the path: dropping
                        // it removes nothing.
                        (listener, guard) = (l, g);
                        failing = None;
                        metrics.socket_recreated.inc();
                        warn!(path = %path.display(), "the {name} socket was {gone}; created it again");
                    }
                    Err(e) => {
                        let message = e.to_string();
                        if failing.as_deref() != Some(&message) {
                            error!(
                                path = %path.display(),
                                error = %message,
                                "the {name} socket was {gone} and cannot be created again; retrying every second"
                            );
                            failing = Some(message);
                        }
                    }
                }
            }
        }
    }
    drop(guard);
}

/// Binds a socket at `path` with permission bits `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketGuard), SocketError> {
    fn io_err<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
        move |source| SocketError::Io {
            what,
            path: p.to_owned(),
            source,
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create directory", &dir))?;
    remove_if_stale(path)?;

    // A short temporary name (`.<pid>.tmp`), so that it fits sun_path whenever the final
    // path nearly does. Only a socket left there by an earlier process is ever removed.
    let tmp = dir.join(format!(".{:x}.tmp", std::process::id()));
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&tmp);
    }
    if tmp.as_os_str().len() > MAX_SOCKET_PATH && path.as_os_str().len() <= MAX_SOCKET_PATH {
        // The temporary name does not fit but the path does: bind in place and set the mode
        // at once. Connecting needs write permission, which the umask-derived mode (0755 at
        // most, usually) gives only the owner, so the short window admits no one else.
        let listener = UnixListener::bind(path).map_err(io_err("cannot bind", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("cannot set permissions of", path))?;
        return Ok((listener, SocketGuard::at(path)?));
    }
    let listener = UnixListener::bind(&tmp).map_err(io_err("cannot bind", &tmp))?;
    let result = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set permissions of", &tmp))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(io_err("cannot move the socket to", path))
        });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((listener, SocketGuard::at(path)?))
}

fn remove_if_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                what: "cannot stat",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "replacing a stale socket left by an earlier run");
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                what: "cannot remove stale socket",
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(SocketError::Io {
            what: "cannot probe existing socket",
            path: path.to_owned(),
            source,
        }),
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        // Replaced by someone else, or already gone: not ours to remove.
        if self.in_place()
            && let Err(error) = std::fs::remove_file(&self.path)
        {
            warn!(%error, path = %self.path.display(), "cannot remove the socket");
        }
    }
}
