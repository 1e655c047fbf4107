//! "Pods" on one machine, for the node-mode tests: each pod is a cgroup v2 directory laid out
//! as the kubelet's systemd driver lays it out for containerd, under a subtree this test run
//! owns, and a pod's process is any program started inside its container's cgroup.
//!
//! ```text
//! <cgroup2 mount>/sds-agent-test-<pid>-<n>/kubepods.slice/kubepods-besteffort.slice/
//!     kubepods-besteffort-pod<uid with _>.slice/cri-containerd-<64 hex>.scope
//! ```
//!
//! So `/proc/<pid>/cgroup` of such a process reads as it does on a node (the test subtree is
//! one more parent, like kind's `/kubelet.slice`), and the agent proves it with the real
//! `/proc`, the real SO_PEERCRED and the real kernel: nothing is faked but the kubelet
//! ([`crate::kubelet`]), which lists the same pod UIDs and container IDs.
//!
//! This needs a writable cgroup v2 hierarchy (root, or a delegated subtree). Where there is
//! none, [`PodCgroups::create`] says so and returns `None`, and the tests skip, unless
//! `SDS_AGENT_REQUIRE_CGROUPS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::kubelet::FakePod;
use crate::{Error, io_error};

/// A cgroup subtree owned by one test, removed when dropped.
#[derive(Debug)]
pub struct PodCgroups {
    root: PathBuf,
}

impl PodCgroups {
    /// A fresh subtree under the cgroup v2 mount, or `None` (with a line on stderr) where
    /// the machine has no writable one.
    pub fn create() -> Result<Option<Self>, Error> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let Some(mount) = cgroup2_mount() else {
            return skip("no cgroup v2 hierarchy is mounted");
        };
        let root = mount.join(format!(
            "sds-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::create_dir(&root) {
            Ok(()) => Ok(Some(Self { root })),
            Err(e) => skip(&format!("cannot create {}: {e}", root.display())),
        }
    }

    /// The container cgroup of `pod`'s first container, created if need be.
    pub fn container_cgroup(&self, pod: &FakePod) -> Result<PathBuf, Error> {
        let uid = pod.uid.replace('-', "_");
        let dir = self
            .root
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{uid}.slice"))
            .join(format!("cri-containerd-{}.scope", pod.container_id(0)));
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        Ok(dir)
    }

    /// `program args...` as a command that starts inside `pod`'s container: a shell moves
    /// itself into the cgroup, then becomes the program (same pid).
    pub fn command_in(&self, pod: &FakePod, program: &Path) -> Result<Command, Error> {
        let cgroup = self.container_cgroup(pod)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(cgroup)
            .arg(program);
        Ok(cmd)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        // Deepest first; a cgroup still holding a process stays (its test killed it, so
        // this is rare), and is harmless.
        let mut dirs = Vec::new();
        collect_dirs(&self.root, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn skip(why: &str) -> Result<Option<PodCgroups>, Error> {
    if std::env::var("SDS_AGENT_REQUIRE_CGROUPS").as_deref() == Ok("1") {
        return Err(Error::Missing(format!(
            "{why}, and SDS_AGENT_REQUIRE_CGROUPS=1 requires pods in cgroups"
        )));
    }
    eprintln!("skipping: {why}; the node-mode tests need a writable cgroup v2 hierarchy");
    Ok(None)
}

/// Where cgroup v2 is mounted (the harness reads its own mountinfo; the agent never does).
fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}
