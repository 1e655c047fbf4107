//! "Pods" on one machine, for the node-mode tests, in one of two ways ([`Pods`]):
//!
//! - **Real cgroups** ([`PodCgroups`]). Each pod is a cgroup v2 directory laid out as the
//!   kubelet's systemd driver lays it out for containerd, under a subtree this test run owns,
//!   and a pod's process is any program started inside its container's cgroup:
//!
//!   ```text
//!   <cgroup2 mount>/sds-agent-test-<pid>-<n>/kubepods.slice/kubepods-besteffort.slice/
//!       kubepods-besteffort-pod<uid with _>.slice/cri-containerd-<64 hex>.scope
//!   ```
//!
//!   So `/proc/<pid>/cgroup` of such a process reads as it does on a node (the test subtree
//!   is one more parent, like kind's `/kubelet.slice`), and the agent proves it with the real
//!   `/proc`, the real SO_PEERCRED and the real kernel: nothing is faked but the kubelet
//!   ([`crate::kubelet`]), which lists the same pod UIDs and container IDs. This needs a
//!   writable cgroup v2 hierarchy (root, or a delegated subtree).
//!
//! - **A fake `/proc`**, where there is no such hierarchy: a directory this test owns, given
//!   to the agent as `--proc-root` ([`Pods::agent_args`]). It holds `stat`, a copy of the real
//!   `/proc/stat` (the agent takes the boot time from its `btime`), and, for each process
//!   started in a pod, `<pid>/stat`, a copy of the real `/proc/<pid>/stat` (so the start time
//!   is the process's real one), and `<pid>/cgroup`, the line the kubelet's systemd driver and
//!   containerd would give that pod's container: the same path the real-cgroup mode creates,
//!   `0::/sds-agent-test-<pid>-<n>/kubepods.slice/…/cri-containerd-<64 hex>.scope`. The
//!   process writes its own entry before it becomes the program (a shell writes the entry of
//!   its own pid, then `exec`s, keeping the pid), so the entry exists before the program
//!   connects. The SO_PEERCRED, the pid, the uid (the owner of `<pid>/`, which the shell
//!   created) and the start time are real; which pod a process is in is what this harness
//!   wrote.
//!
//! What the fake `/proc` does **not** prove, so a change to `agent/src/attest/process.rs`
//! that touches these must be tested with real cgroups (scripts/test.sh requires them
//! wherever a cgroup v2 directory can be created):
//!
//! - **the kernel's `/proc/<pid>` handle tie.** A fake `<pid>/` is an ordinary directory: it
//!   outlives its process, so a read through the agent's handle does not fail once the
//!   process is gone, and a later process given the same pid (with no entry of its own) would
//!   be read as the earlier one's pod. The PID-reuse test therefore needs real cgroups
//!   ([`Pods::cgroups`]);
//! - **real cgroup membership.** The kernel never placed the process anywhere; the entry says
//!   what this harness wrote;
//! - **start times within a second.** `btime` is whole seconds (rounded down), so the agent
//!   dates a start up to a second early, where the host's clocks date it to one clock tick.
//!
//! [`Pods::create`] picks real cgroups where a cgroup v2 directory can be created, else the
//! fake `/proc`, and says which on stderr. `SDS_AGENT_PODS=fake-proc` forces the fake `/proc`
//! (to run the tests in that mode on a machine that has cgroups); `SDS_AGENT_REQUIRE_CGROUPS=1`
//! means real cgroups or fail, never a silent fallback (scripts/test.sh sets it where a cgroup
//! v2 directory can be created). An explicit `SDS_AGENT_PODS=fake-proc` wins over it, since
//! asking for the fake is not falling back to it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::kubelet::FakePod;
use crate::{Error, io_error};

/// The environment variable that forces the fake `/proc` in [`Pods::create`].
const PODS_ENV: &str = "SDS_AGENT_PODS";

/// The one value [`PODS_ENV`] takes.
const FAKE_PROC: &str = "fake-proc";

/// Where one test's pods are: real cgroups or a fake `/proc`, removed when dropped.
#[derive(Debug)]
pub struct Pods {
    place: Place,
}

#[derive(Debug)]
enum Place {
    Cgroups(PodCgroups),
    FakeProc(FakeProc),
}

/// A cgroup subtree owned by one test, removed when dropped.
#[derive(Debug)]
pub struct PodCgroups {
    root: PathBuf,
}

/// A fake `/proc` owned by one test (a test directory: kept with `SDS_E2E_KEEP_DIR`).
#[derive(Debug)]
struct FakeProc {
    dir: tempfile::TempDir,
    /// The name the real-cgroup mode would give this test's subtree; the cgroup lines start
    /// with it.
    subtree: String,
}

impl Pods {
    /// Real cgroups where a cgroup v2 directory can be created, else a fake `/proc`, unless
    /// `SDS_AGENT_PODS=fake-proc` forces the fake or `SDS_AGENT_REQUIRE_CGROUPS=1` forbids it.
    /// Says on stderr which it picked.
    pub fn create() -> Result<Self, Error> {
        match std::env::var(PODS_ENV) {
            Ok(v) if v == FAKE_PROC => {
                let pods = Self::fake_proc()?;
                eprintln!("pods: {} ({PODS_ENV}={FAKE_PROC})", pods.describe());
                return Ok(pods);
            }
            Ok(v) if !v.is_empty() => {
                return Err(Error::Malformed {
                    what: "environment",
                    detail: format!("{PODS_ENV}={v:?}: the one value it takes is {FAKE_PROC:?}"),
                });
            }
            _ => {}
        }
        match PodCgroups::create() {
            Ok(cgroups) => {
                let pods = Self {
                    place: Place::Cgroups(cgroups),
                };
                eprintln!("pods: {}", pods.describe());
                Ok(pods)
            }
            Err(why) => {
                if cgroups_required() {
                    return Err(Error::Missing(format!(
                        "{why}, and SDS_AGENT_REQUIRE_CGROUPS=1 requires pods in cgroups"
                    )));
                }
                let pods = Self::fake_proc()?;
                eprintln!(
                    "pods: {why}; falling back to {}, which proves less (pods.rs)",
                    pods.describe()
                );
                Ok(pods)
            }
        }
    }

    /// A fake `/proc`, whatever the machine allows.
    pub fn fake_proc() -> Result<Self, Error> {
        Ok(Self {
            place: Place::FakeProc(FakeProc::create()?),
        })
    }

    /// Real cgroups, for a test that needs the real kernel; `None` (with a line on stderr)
    /// where the machine has no writable cgroup v2 hierarchy, unless
    /// `SDS_AGENT_REQUIRE_CGROUPS=1`. `SDS_AGENT_PODS` does not apply.
    pub fn cgroups() -> Result<Option<Self>, Error> {
        match PodCgroups::create() {
            Ok(cgroups) => Ok(Some(Self {
                place: Place::Cgroups(cgroups),
            })),
            Err(why) if cgroups_required() => Err(Error::Missing(format!(
                "{why}, and SDS_AGENT_REQUIRE_CGROUPS=1 requires pods in cgroups"
            ))),
            Err(why) => {
                eprintln!("skipping: {why}; this test needs a writable cgroup v2 hierarchy");
                Ok(None)
            }
        }
    }

    /// Whether these pods are in a fake `/proc` rather than real cgroups.
    pub fn is_fake_proc(&self) -> bool {
        matches!(self.place, Place::FakeProc(_))
    }

    /// The flags the node agent needs to see these pods: `--proc-root <dir>` for a fake
    /// `/proc`, none for real cgroups (the agent reads the host's `/proc`).
    pub fn agent_args(&self) -> Vec<OsString> {
        match &self.place {
            Place::Cgroups(_) => Vec::new(),
            Place::FakeProc(fake) => vec!["--proc-root".into(), fake.root().into()],
        }
    }

    /// `program args...` as a command that starts inside `pod`'s first container, with the
    /// same pid from the start (a shell that places itself, then becomes the program).
    pub fn command_in(&self, pod: &FakePod, program: &Path) -> Result<Command, Error> {
        match &self.place {
            Place::Cgroups(cgroups) => cgroups.command_in(pod, program),
            Place::FakeProc(fake) => Ok(fake.command_with_entry(&fake.pod_line(pod), program)),
        }
    }

    /// `program args...` as a command that starts in no pod: with real cgroups, in this
    /// test's own cgroup; in a fake `/proc`, with an entry whose cgroup is the container
    /// runtime's service (`…/system.slice/containerd.service`), a process of the node that is
    /// no pod's.
    pub fn command_in_no_pod(&self, program: &Path) -> Result<Command, Error> {
        match &self.place {
            Place::Cgroups(_) => Ok(Command::new(program)),
            Place::FakeProc(fake) => Ok(fake.command_with_entry(&fake.no_pod_line(), program)),
        }
    }

    /// `program args...` as a command whose process has no entry in the fake `/proc` (any
    /// left by an earlier process with the same pid is removed first). A fake `/proc` only:
    /// with real cgroups every process has its `/proc/<pid>`.
    pub fn command_without_entry(&self, program: &Path) -> Result<Command, Error> {
        match &self.place {
            Place::Cgroups(_) => Err(Error::Missing(
                "a process without a /proc entry exists only in a fake /proc".to_owned(),
            )),
            Place::FakeProc(fake) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"rm -rf -- "$0/$$" && exec "$@""#)
                    .arg(fake.root())
                    .arg(program);
                Ok(cmd)
            }
        }
    }

    /// The container cgroup of `pod`'s first container, created if need be. Real cgroups
    /// only: a fake `/proc` has no cgroup directories.
    pub fn container_cgroup(&self, pod: &FakePod) -> Result<PathBuf, Error> {
        match &self.place {
            Place::Cgroups(cgroups) => cgroups.container_cgroup(pod),
            Place::FakeProc(_) => Err(Error::Missing(
                "a fake /proc has no cgroup directories; this needs Pods::cgroups()".to_owned(),
            )),
        }
    }

    fn describe(&self) -> String {
        match &self.place {
            Place::Cgroups(cgroups) => format!("real cgroups under {}", cgroups.root.display()),
            Place::FakeProc(fake) => format!("a fake /proc at {}", fake.root().display()),
        }
    }
}

impl PodCgroups {
    /// A fresh subtree under the cgroup v2 mount, or why the machine has none.
    fn create() -> Result<Self, String> {
        let Some(mount) = cgroup2_mount() else {
            return Err("no cgroup v2 hierarchy is mounted".to_owned());
        };
        let root = mount.join(subtree_name());
        match std::fs::create_dir(&root) {
            Ok(()) => Ok(Self { root }),
            Err(e) => Err(format!("cannot create {}: {e}", root.display())),
        }
    }

    /// The container cgroup of `pod`'s first container, created if need be.
    pub fn container_cgroup(&self, pod: &FakePod) -> Result<PathBuf, Error> {
        let dir = self.root.join(container_path(pod));
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

impl FakeProc {
    /// A test directory holding a copy of the real `/proc/stat`.
    fn create() -> Result<Self, Error> {
        let dir = crate::test_dir()?;
        // Read and written, not copied: procfs files report a size of 0.
        let stat = std::fs::read("/proc/stat").map_err(io_error("reading /proc/stat"))?;
        let copy = dir.path().join("stat");
        std::fs::write(&copy, stat).map_err(io_error(format!("writing {}", copy.display())))?;
        Ok(Self {
            dir,
            subtree: subtree_name(),
        })
    }

    /// The `--proc-root` directory.
    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The cgroup file of a process in `pod`'s first container.
    fn pod_line(&self, pod: &FakePod) -> String {
        format!("0::/{}/{}", self.subtree, container_path(pod).display())
    }

    /// The cgroup file of a process of the node in no pod (the container runtime's own).
    fn no_pod_line(&self) -> String {
        format!("0::/{}/system.slice/containerd.service", self.subtree)
    }

    /// `program args...` as a command that first writes its own entry, `<pid>/stat` (a copy
    /// of its real `/proc/<pid>/stat`) and `<pid>/cgroup` (`cgroup_line`), then becomes the
    /// program (same pid, same start time).
    fn command_with_entry(&self, cgroup_line: &str, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(concat!(
                r#"d="$0/$$" && mkdir -p "$d" && cat "/proc/$$/stat" > "$d/stat" && "#,
                r#"printf '%s\n' "$1" > "$d/cgroup" && shift && exec "$@""#,
            ))
            .arg(self.root())
            .arg(cgroup_line)
            .arg(program);
        cmd
    }
}

/// `sds-agent-test-<pid>-<n>`: a name for one test's subtree, unique in this machine's run.
fn subtree_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "sds-agent-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The container cgroup of `pod`'s first container below the subtree, as the kubelet's
/// systemd driver and containerd name it.
fn container_path(pod: &FakePod) -> PathBuf {
    let uid = pod.uid.replace('-', "_");
    Path::new("kubepods.slice/kubepods-besteffort.slice")
        .join(format!("kubepods-besteffort-pod{uid}.slice"))
        .join(format!("cri-containerd-{}.scope", pod.container_id(0)))
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

fn cgroups_required() -> bool {
    std::env::var("SDS_AGENT_REQUIRE_CGROUPS").as_deref() == Ok("1")
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
