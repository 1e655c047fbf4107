//! The Python clients of the interop tests: gRPC's own C-core (grpcio) and the SPIFFE
//! project's Workload API client (py-spiffe), run from `integration/python/`.
//!
//! They are clients nobody here wrote, so they show what real applications meet on the
//! agent's sockets (gRPC C-core sends the socket path as `:authority`, for one). The
//! interpreter is `SDS_AGENT_PYTHON`, a virtualenv with `grpcio` and `spiffe` installed
//! (`scripts/test.sh` makes it in `.venv-test/`); without it the tests print a line and pass,
//! unless `SDS_AGENT_REQUIRE_PYTHON=1`. There is no fallback to a `python3` on `PATH`, which
//! would not have those packages.
//!
//! A script prints one JSON object on stdout and exits non-zero, with a message on stderr,
//! when a check of its own fails; [`run_json`] turns that into `Ok(Value)` or an error that
//! carries both streams. Every run is bounded and killed when it overruns.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::Error;

/// The interpreter named by `SDS_AGENT_PYTHON`, `None` (with a line on stderr) when it is not
/// set or not a file, or an error then if `SDS_AGENT_REQUIRE_PYTHON=1`.
pub fn python() -> Result<Option<PathBuf>, Error> {
    let found = std::env::var_os("SDS_AGENT_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    match found {
        Some(p) => Ok(Some(p)),
        None if std::env::var("SDS_AGENT_REQUIRE_PYTHON").as_deref() == Ok("1") => {
            Err(Error::Missing(format!(
                "no Python with grpcio and spiffe (SDS_AGENT_PYTHON={:?}), and \
                 SDS_AGENT_REQUIRE_PYTHON=1 requires it: run scripts/test.sh, which installs it",
                std::env::var_os("SDS_AGENT_PYTHON")
            )))
        }
        None => {
            eprintln!(
                "skipping: SDS_AGENT_PYTHON (a Python with grpcio and spiffe) is not set; run \
                 scripts/test.sh"
            );
            Ok(None)
        }
    }
}

/// `integration/python/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Runs `python script args...`, killed after `limit`, and parses its stdout as JSON. A
/// non-zero exit, an overrun or output that is not JSON is an error with stdout and stderr.
pub async fn run_json(
    python: &Path,
    script: &Path,
    args: &[&str],
    limit: Duration,
) -> Result<Value, Error> {
    let what = format!(
        "{} {}",
        script.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" ")
    );
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).args(args);
    run_json_command(cmd, &what, limit).await
}

/// Runs `cmd` (a Python client, perhaps wrapped, e.g. into a pod's cgroup by
/// [`crate::pods::Pods::command_in`]) as [`run_json`] does; `what` names it in errors.
pub async fn run_json_command(
    cmd: std::process::Command,
    what: &str,
    limit: Duration,
) -> Result<Value, Error> {
    let what = what.to_owned();
    let child = tokio::process::Command::from(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(crate::io_error(format!("starting {what}")))?;
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => {
            return Err(Error::Timeout {
                what: format!("{what} to exit"),
                limit,
            });
        }
        Ok(result) => result.map_err(crate::io_error(format!("running {what}")))?,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(Error::Api {
            call: what,
            detail: format!(
                "exited {}\nstderr:\n{stderr}\nstdout:\n{stdout}",
                output.status
            ),
        });
    }
    serde_json::from_str(&stdout).map_err(|e| Error::Malformed {
        what: "a Python client's JSON",
        detail: format!("{what}: {e}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    })
}
