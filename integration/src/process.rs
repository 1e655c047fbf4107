//! Child processes for the tests, and where their binaries are.
//!
//! A [`ChildGuard`] owns one child: its stdout and stderr go to a log file, and dropping the
//! guard kills and reaps the child on every path out of a test, a panic included. When the
//! guard is dropped during a panic it also prints the tail of that log to stderr, so a failed
//! run in CI shows what the agent and Envoy said without anyone asking for it. This module
//! never decides whether a test passes.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, io_error};

/// How many log lines a guard prints when it is dropped during a panic, or puts into a
/// readiness error.
const TAIL_ON_PANIC: usize = 40;

/// A running child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdin closed and stdout and stderr both appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, Error> {
        let out = File::create(log).map_err(io_error(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_error(format!("duplicating {}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(io_error(format!("starting {name} ({cmd:?})")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The name given at spawn, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that receives its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How it exited, or `None` while it runs.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child
            .try_wait()
            .map_err(io_error(format!("polling {}", self.name)))
    }

    /// Kills it with SIGKILL and reaps it, as a crash or the OOM killer would end it: no
    /// signal handler runs, nothing is cleaned up (an agent leaves its socket file behind).
    pub fn kill_hard(&mut self) -> Result<ExitStatus, Error> {
        let what = format!("killing {}", self.name);
        // An already exited child makes `kill` fail with InvalidInput; `wait` still reaps it.
        let _ = self.child.kill();
        self.child.wait().map_err(io_error(what))
    }

    /// The last `lines` lines of its log, under a header naming the process and the file.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "----- {} ({}), last {} of {} lines -----\n{}\n",
            self.name,
            self.log.display(),
            all.len() - from,
            all.len(),
            all[from..].join("\n")
        )
    }

    /// Polls `ready` every 100 ms until it holds. Fails as soon as the process exits, or
    /// when `limit` passes, with the tail of its log; `what` names the condition awaited.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status()? {
                return Err(self.not_ready(format!("it exited ({status})")));
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("no {what} within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn not_ready(&self, reason: String) -> Error {
        Error::NotReady {
            name: self.name.clone(),
            reason,
            log_tail: self.tail(TAIL_ON_PANIC),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SIGKILL: nothing of the child's is worth a graceful shutdown once the test is over,
        // and kill-then-wait cannot hang.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.tail(TAIL_ON_PANIC));
        }
    }
}

/// The `sds-agent` binary: `SDS_AGENT_BIN` if set, else `target/<profile>/sds-agent` beside
/// the running test binary (`target/<profile>/deps/<test>`).
pub fn agent_bin() -> Result<PathBuf, Error> {
    let bin = match std::env::var_os("SDS_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(io_error("locating the running test binary"))?
            .parent()
            .and_then(Path::parent)
            .map(|profile_dir| profile_dir.join("sds-agent"))
            .ok_or_else(|| Error::Missing("no target/<profile>/ above the test binary".into()))?,
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::Missing(format!(
            "the agent binary {} does not exist: run `cargo build -p sds-agent` first \
             (scripts/test.sh does), or set SDS_AGENT_BIN",
            bin.display()
        )))
    }
}

/// The Envoy binary: `ENVOY_BIN` if set, else `envoy` on `PATH`; see [`find_program`].
pub fn envoy_bin() -> Result<Option<PathBuf>, Error> {
    find_program("envoy", "ENVOY_BIN", "SDS_AGENT_REQUIRE_ENVOY")
}

/// A program the tests need: `$env_var` if set, else `name` on `PATH`.
///
/// When there is none, this is `Ok(None)` and a line on stderr says the test is skipped,
/// unless `$require_var=1`, in which case it is an error: a run that is meant to exercise the
/// program (scripts/test.sh sets these) must not pass by skipping.
pub fn find_program(
    name: &str,
    env_var: &str,
    require_var: &str,
) -> Result<Option<PathBuf>, Error> {
    let found = match std::env::var_os(env_var) {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        }),
    };
    match found {
        Some(bin) => Ok(Some(bin)),
        None if std::env::var(require_var).as_deref() == Ok("1") => Err(Error::Missing(format!(
            "{name} not found ({env_var}={:?}, nor `{name}` on PATH), and {require_var}=1 \
             requires it: run scripts/test.sh, which installs it",
            std::env::var_os(env_var)
        ))),
        None => {
            eprintln!("skipping: {name} not found; run scripts/test.sh");
            Ok(None)
        }
    }
}
