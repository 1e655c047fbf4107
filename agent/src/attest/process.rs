//! Proving which process is behind a peer pid, and that it is still the same one.
//!
//! Node-mode callers are known by the SO_PEERCRED (pid, uid, gid) of their connection. A pid
//! is only a number: the caller may exit and the number be handed to another process before
//! the agent looks. [`inspect`] therefore pins the process and checks it from one handle:
//!
//! 1. it opens the directory `<root>/<pid>` once (`O_DIRECTORY`); the kernel ties that
//!    descriptor to the process it named, so once that process dies every read through it
//!    fails (`ESRCH` or `ENOENT`) even if the pid is reused;
//! 2. every file is read relative to that descriptor (`openat`), never by path again;
//! 3. it reads the start time (field 22 of `stat`, parsed after the *last* `)`, since the
//!    command name may hold spaces and parentheses), then `cgroup` (parsed by
//!    [`super::cgroup`]), then `stat` again, and requires the same start time;
//! 4. it requires the directory's owner (the process's uid, as `fstat` reports it) to be
//!    the peer uid, before the reads and again after them.
//!
//! What `inspect` cannot see is a pid reused *between* the connection and the open: for that
//! the caller compares [`ProcessInfo::started_after`] with the time it accepted the
//! connection. A process that started after its own connection was accepted is another one.
//!
//! Start ticks become wall time from the boot time and the clock tick rate
//! (`sysconf(_SC_CLK_TCK)`). For the host's `/proc` ([`ProcRoot::host`]) the boot time comes
//! from the clocks (`CLOCK_REALTIME` − `CLOCK_BOOTTIME`, nanosecond precision), so a start
//! time is exact to one tick. For an override ([`ProcRoot::new`], the `--proc-root` form: a
//! fake `/proc` for tests) it is `btime` from `<root>/stat`, which the kernel rounds down to
//! the second, so start times there can read up to a second early.
//!
//! This module never reads `/proc/<pid>/mountinfo`, `environ`, `cmdline` or anything else the
//! workload can write or forge (a workload can bind-mount over what `mountinfo` shows), and
//! its errors name the pid and nothing more about the process. A process that made itself
//! non-dumpable (setuid programs, `PR_SET_DUMPABLE` 0) shows as owned by root, and is refused
//! unless the peer is root too.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{CWD, Mode, OFlags};
use rustix::io::Errno;

use super::cgroup::{self, CgroupError, PodContainer};

/// The largest `stat` accepted. A real one is under 400 bytes (the command name is at most
/// 64 bytes).
const MAX_STAT_LEN: usize = 4096;

/// The largest `<root>/stat` read for its `btime` line (it grows with the number of CPUs).
const MAX_ROOT_STAT_LEN: u64 = 4 * 1024 * 1024;

/// Where the per-process directories are: the host's `/proc`, or a documented override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRoot {
    path: PathBuf,
    boot: BootClock,
}

/// Where the boot time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootClock {
    /// The host's clocks: exact, and the same boot the host's `/proc` counts from.
    HostClocks,
    /// `btime` in `<root>/stat`: whole seconds.
    StatFile,
}

/// A process proven to be the peer: alive for the whole inspection, owned by the peer uid,
/// and in the pod container its cgroup names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The pid, as the agent's pid namespace numbers it.
    pub pid: i32,
    /// Field 22 of `stat`: clock ticks from boot to the process's start.
    pub start_ticks: u64,
    /// The start as wall time (see the module documentation for its precision).
    pub started_at: SystemTime,
    /// The pod and container.
    pub cgroup: PodContainer,
}

/// Why a peer pid is not accepted as a proven pod process. Every variant means the caller is
/// not authenticated; the messages name the pid and what failed, nothing about the process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// SO_PEERCRED gave no usable pid (0 when the peer is in a pid namespace the agent cannot
    /// see, or a negative number).
    #[error("peer pid {pid} is not a process the agent can see")]
    InvalidPid {
        /// The pid.
        pid: i32,
    },
    /// The process exited (before or during the inspection).
    #[error("process {pid} is gone")]
    ProcessGone {
        /// The pid.
        pid: i32,
    },
    /// The process's owner is not the uid that connected.
    #[error("process {pid} is not owned by the connecting uid")]
    OwnerMismatch {
        /// The pid.
        pid: i32,
    },
    /// The two reads of `stat` gave different start times: the pid now names another process.
    #[error("process {pid} changed while it was inspected (its start time differs)")]
    StartTimeChanged {
        /// The pid.
        pid: i32,
    },
    /// A file of the process could not be read for a reason other than its exit.
    #[error("cannot read {file} of process {pid}")]
    Unreadable {
        /// The pid.
        pid: i32,
        /// `stat`, `cgroup` or `its directory`.
        file: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file of the process does not have the kernel's format.
    #[error("{file} of process {pid} is garbled: {reason}")]
    Garbled {
        /// The pid.
        pid: i32,
        /// `stat` or `cgroup`.
        file: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The process is not in exactly one pod container.
    #[error("process {pid} is not a pod container")]
    Cgroup {
        /// The pid.
        pid: i32,
        /// Why.
        #[source]
        source: CgroupError,
    },
    /// `<root>/stat` could not be read for the boot time (a `--proc-root` override only).
    #[error("cannot read the boot time from {}", path.display())]
    BootTimeUnreadable {
        /// `<root>/stat`.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `<root>/stat` has no valid `btime` line.
    #[error("{} has no valid btime line", path.display())]
    BootTimeGarbled {
        /// `<root>/stat`.
        path: PathBuf,
    },
    /// The clocks cannot date a process start (a boot time before 1970, or no tick rate).
    #[error("the system clocks cannot date the start of process {pid}")]
    Clock {
        /// The pid.
        pid: i32,
    },
}

/// Checks that `pid` is a live process owned by `peer_uid`, pinned for the whole inspection,
/// and returns its start time and pod container. See the module documentation.
pub fn inspect(root: &ProcRoot, pid: i32, peer_uid: u32) -> Result<ProcessInfo, AttestError> {
    inspect_with(root, pid, peer_uid, || {})
}

/// [`inspect`], calling `between` after the cgroup is read and before `stat` is read again
/// (tests use it to change the process under the inspection).
fn inspect_with(
    root: &ProcRoot,
    pid: i32,
    peer_uid: u32,
    between: impl FnOnce(),
) -> Result<ProcessInfo, AttestError> {
    let dir = ProcessDir::open(root, pid)?;
    dir.check_owner(peer_uid)?;
    let start_ticks = dir.start_ticks()?;
    let text = dir.read("cgroup", cgroup::MAX_LEN)?;
    let text = std::str::from_utf8(&text).map_err(|_| AttestError::Garbled {
        pid,
        file: "cgroup",
        reason: "not utf-8",
    })?;
    let cgroup = cgroup::parse(text).map_err(|source| AttestError::Cgroup { pid, source })?;
    between();
    if dir.start_ticks()? != start_ticks {
        return Err(AttestError::StartTimeChanged { pid });
    }
    dir.check_owner(peer_uid)?;
    let started_at = root.wall_time(pid, start_ticks)?;
    Ok(ProcessInfo {
        pid,
        start_ticks,
        started_at,
        cgroup,
    })
}

impl ProcessInfo {
    /// Whether the process started after `t`, by more than one clock tick (the granularity of
    /// its start time). Give it the time the connection was accepted: `true` means the pid
    /// was reused by a process that did not make the connection.
    pub fn started_after(&self, t: SystemTime) -> bool {
        match t.checked_add(tick()) {
            Some(limit) => self.started_at > limit,
            None => false,
        }
    }
}

impl ProcRoot {
    /// The host's `/proc`, dated with the host's clocks.
    pub fn host() -> Self {
        ProcRoot {
            path: PathBuf::from("/proc"),
            boot: BootClock::HostClocks,
        }
    }

    /// A `--proc-root` override: `<path>/<pid>/{stat,cgroup}` for the processes and
    /// `<path>/stat` for the boot time (`btime`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProcRoot {
            path: path.into(),
            boot: BootClock::StatFile,
        }
    }

    /// The `--proc-root` setting: `/proc` is the host's (boot time from the clocks), any
    /// other directory an override.
    pub fn from_setting(path: &Path) -> Self {
        if path == Path::new("/proc") {
            Self::host()
        } else {
            Self::new(path)
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wall time `start_ticks` after boot.
    fn wall_time(&self, pid: i32, start_ticks: u64) -> Result<SystemTime, AttestError> {
        let boot = match self.boot {
            BootClock::HostClocks => host_boot_time().ok_or(AttestError::Clock { pid })?,
            BootClock::StatFile => self.btime()?,
        };
        let hz = rustix::param::clock_ticks_per_second();
        if hz == 0 {
            return Err(AttestError::Clock { pid });
        }
        let since_boot = Duration::from_secs(start_ticks / hz)
            + Duration::from_nanos((start_ticks % hz) * 1_000_000_000 / hz);
        // A start after now (plus a tick of rounding) is not one the kernel wrote.
        let latest = SystemTime::now() + tick();
        boot.checked_add(since_boot)
            .filter(|started_at| *started_at <= latest)
            .ok_or(AttestError::Garbled {
                pid,
                file: "stat",
                reason: "the start time is out of range",
            })
    }

    /// `btime` (seconds since the epoch) from `<root>/stat`.
    fn btime(&self) -> Result<SystemTime, AttestError> {
        let path = self.path.join("stat");
        let mut text = String::new();
        File::open(&path)
            .and_then(|file| file.take(MAX_ROOT_STAT_LEN).read_to_string(&mut text))
            .map_err(|source| AttestError::BootTimeUnreadable {
                path: path.clone(),
                source,
            })?;
        text.lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|secs| secs.trim().parse::<u64>().ok())
            .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .ok_or(AttestError::BootTimeGarbled { path })
    }
}

impl Default for ProcRoot {
    fn default() -> Self {
        Self::host()
    }
}

/// The host's boot as wall time: `CLOCK_REALTIME` minus `CLOCK_BOOTTIME` (the clock
/// `/proc/<pid>/stat` counts start times on).
fn host_boot_time() -> Option<SystemTime> {
    use rustix::time::{ClockId, clock_gettime};
    let nanos =
        |t: rustix::time::Timespec| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    let realtime = nanos(clock_gettime(ClockId::Realtime));
    let since_boot = nanos(clock_gettime(ClockId::Boottime));
    let boot = u64::try_from(realtime - since_boot).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(boot))
}

/// One clock tick (10 ms at the usual 100 Hz).
fn tick() -> Duration {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(1_000_000_000 / hz)
}

/// An open `<root>/<pid>` directory: the process pinned.
#[derive(Debug)]
struct ProcessDir {
    pid: i32,
    fd: OwnedFd,
}

impl ProcessDir {
    fn open(root: &ProcRoot, pid: i32) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        let path = root.path.join(pid.to_string());
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(CWD, path.as_path(), flags, Mode::empty())
            .map_err(|errno| gone_or(pid, "its directory", errno.into()))?;
        Ok(ProcessDir { pid, fd })
    }

    /// Requires the process to be owned by `peer_uid`.
    fn check_owner(&self, peer_uid: u32) -> Result<(), AttestError> {
        let stat = rustix::fs::fstat(&self.fd)
            .map_err(|errno| gone_or(self.pid, "its directory", errno.into()))?;
        if stat.st_uid == peer_uid {
            Ok(())
        } else {
            Err(AttestError::OwnerMismatch { pid: self.pid })
        }
    }

    /// Field 22 of `stat`.
    fn start_ticks(&self) -> Result<u64, AttestError> {
        let stat = self.read("stat", MAX_STAT_LEN)?;
        parse_start_ticks(self.pid, &stat).map_err(|reason| AttestError::Garbled {
            pid: self.pid,
            file: "stat",
            reason,
        })
    }

    /// The file `name` of the process, at most `limit` bytes.
    fn read(&self, name: &'static str, limit: usize) -> Result<Vec<u8>, AttestError> {
        let pid = self.pid;
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())
            .map_err(|errno| gone_or(pid, name, errno.into()))?;
        let mut contents = Vec::new();
        // `limit + 1` bytes at most, to tell a full file from a longer one.
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        File::from(fd)
            .take(cap)
            .read_to_end(&mut contents)
            .map_err(|error| gone_or(pid, name, error))?;
        if contents.len() > limit {
            return Err(AttestError::Garbled {
                pid,
                file: name,
                reason: "longer than the kernel writes",
            });
        }
        Ok(contents)
    }
}

/// `ProcessGone` for the errors a dead process gives through a held descriptor (`ENOENT`
/// opening, `ESRCH` reading), `Unreadable` for the rest.
fn gone_or(pid: i32, file: &'static str, error: io::Error) -> AttestError {
    let gone = [Errno::NOENT, Errno::SRCH]
        .iter()
        .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()));
    if gone {
        AttestError::ProcessGone { pid }
    } else {
        AttestError::Unreadable {
            pid,
            file,
            source: error,
        }
    }
}

/// Field 22 (starttime) of a `stat` line, `pid (comm) state ppid … starttime …`. The command
/// name may hold anything but NUL, so the fields are counted after its *last* `)`.
fn parse_start_ticks(pid: i32, stat: &[u8]) -> Result<u64, &'static str> {
    let open = stat
        .iter()
        .position(|&b| b == b'(')
        .ok_or("no command name")?;
    let close = stat
        .iter()
        .rposition(|&b| b == b')')
        .filter(|&close| close > open)
        .ok_or("no end to the command name")?;
    let head = std::str::from_utf8(&stat[..open]).map_err(|_| "the pid is not a number")?;
    if head.trim().parse::<i32>() != Ok(pid) {
        return Err("it is for another pid");
    }
    let rest = std::str::from_utf8(&stat[close + 1..]).map_err(|_| "not text after the name")?;
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    let field = rest
        .split_ascii_whitespace()
        .nth(19)
        .ok_or("fewer than 22 fields")?;
    field.parse().map_err(|_| "the start time is not a number")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Command, Stdio};

    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const BTIME: u64 = 1_700_000_000;
    const PID: i32 = 4242;

    fn own_pid() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    fn own_uid() -> u32 {
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn pid_of(child: &Child) -> i32 {
        i32::try_from(child.id()).unwrap()
    }

    /// A `stat` line with `comm` and `start` in field 22 (the other fields are plausible).
    fn stat_line(pid: i32, comm: &str, start: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1234 0 0 0 5 3 0 0 20 0 1 0 {start} 12345678 456 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    /// A fake proc root in a temporary directory: `<root>/stat` with `btime`, and one process.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("stat"),
                format!("cpu  1 2 3 4\nintr 5\nbtime {BTIME}\nprocesses 99\n"),
            )
            .unwrap();
            let fake = FakeProc { dir };
            fake.process(PID, &stat_line(PID, "envoy", 12_345), &Self::pod_cgroup());
            fake
        }

        fn pod_cgroup() -> String {
            format!("0::/kubepods/burstable/pod{UID}/{CID}\n")
        }

        fn root(&self) -> ProcRoot {
            ProcRoot::new(self.dir.path())
        }

        fn process(&self, pid: i32, stat: &str, cgroup: &str) {
            let dir = self.dir.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), stat).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        }

        fn file(&self, pid: i32, name: &str) -> PathBuf {
            self.dir.path().join(pid.to_string()).join(name)
        }

        /// The owner of the fake process directories (whoever runs the tests).
        fn owner(&self) -> u32 {
            std::fs::metadata(self.dir.path()).unwrap().uid()
        }
    }

    #[test]
    fn fake_pod_process_is_proven() {
        let fake = FakeProc::new();
        let info = inspect(&fake.root(), PID, fake.owner()).unwrap();
        assert_eq!(info.pid, PID);
        assert_eq!(info.start_ticks, 12_345);
        assert_eq!(info.cgroup.pod_uid.as_str(), UID);
        assert_eq!(info.cgroup.container_id.as_str(), CID);
        let hz = rustix::param::clock_ticks_per_second();
        let expected = SystemTime::UNIX_EPOCH
            + Duration::from_secs(BTIME)
            + Duration::from_nanos(12_345 * 1_000_000_000 / hz);
        assert_eq!(info.started_at, expected);
    }

    #[test]
    fn odd_command_names_are_skipped_to_the_last_paren() {
        let fake = FakeProc::new();
        for (pid, comm) in [
            (11, "a b c"),
            (12, "x) S 1 2 3 (y"),
            (13, ") ) )"),
            (14, "(("),
            (15, "new\nline"),
            (16, ""),
            (17, "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"),
        ] {
            fake.process(pid, &stat_line(pid, comm, 777), &FakeProc::pod_cgroup());
            let info = inspect(&fake.root(), pid, fake.owner())
                .unwrap_or_else(|e| panic!("comm {comm:?}: {e}"));
            assert_eq!(info.start_ticks, 777, "comm {comm:?}");
        }
        // Bytes that are not UTF-8 in the name are fine too.
        let mut stat = b"18 (\xff\xfe)".to_vec();
        stat.extend_from_slice(stat_line(18, "", 778).split_once(')').unwrap().1.as_bytes());
        assert_eq!(parse_start_ticks(18, &stat), Ok(778));
    }

    #[test]
    fn garbled_stat_is_refused() {
        let fake = FakeProc::new();
        let long_name = "n".repeat(MAX_STAT_LEN);
        for (pid, stat, reason) in [
            (21, "21 envoy S 1 2 3".to_owned(), "no command name"),
            (
                22,
                "22 (envoy S 1 2 3".to_owned(),
                "no end to the command name",
            ),
            (
                23,
                "23 (envoy) S 1 2 3 4 5\n".to_owned(),
                "fewer than 22 fields",
            ),
            (
                24,
                stat_line(24, "envoy", 424_242).replace("424242", "x"),
                "the start time is not a number",
            ),
            (25, stat_line(99, "envoy", 5), "it is for another pid"),
            (26, ") (envoy".to_owned(), "no end to the command name"),
            (27, String::new(), "no command name"),
            (
                28,
                stat_line(28, &long_name, 5),
                "longer than the kernel writes",
            ),
            (
                29,
                stat_line(29, "envoy", 424_242).replace("424242", "-5"),
                "the start time is not a number",
            ),
        ] {
            fake.process(pid, &stat, &FakeProc::pod_cgroup());
            match inspect(&fake.root(), pid, fake.owner()) {
                Err(AttestError::Garbled {
                    pid: p,
                    file: "stat",
                    reason: r,
                }) => {
                    assert_eq!((p, r), (pid, reason), "{stat:?}");
                }
                other => panic!("{stat:?}: {other:?}"),
            }
        }
        // Start times after now: the largest tick count, and a day from now.
        let hz = rustix::param::clock_ticks_per_second();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let tomorrow = (now - BTIME + 86_400) * hz;
        for (pid, start) in [(30, u64::MAX), (31, tomorrow)] {
            fake.process(
                pid,
                &stat_line(pid, "envoy", start),
                &FakeProc::pod_cgroup(),
            );
            let error = inspect(&fake.root(), pid, fake.owner()).unwrap_err();
            assert!(
                matches!(
                    error,
                    AttestError::Garbled {
                        reason: "the start time is out of range",
                        ..
                    }
                ),
                "{start}: {error:?}"
            );
        }
    }

    #[test]
    fn changed_start_time_is_refused() {
        let fake = FakeProc::new();
        let stat = fake.file(PID, "stat");
        let result = inspect_with(&fake.root(), PID, fake.owner(), || {
            std::fs::write(&stat, stat_line(PID, "other", 99_999)).unwrap();
        });
        assert!(matches!(
            result,
            Err(AttestError::StartTimeChanged { pid: PID })
        ));
        // The same rewrite with the same start time is the same process.
        let again = inspect_with(&fake.root(), PID, fake.owner(), || {
            std::fs::write(&stat, stat_line(PID, "renamed", 99_999)).unwrap();
        });
        assert_eq!(again.unwrap().start_ticks, 99_999);
    }

    #[test]
    fn missing_files_mean_the_process_is_gone() {
        let fake = FakeProc::new();
        assert!(matches!(
            inspect(&fake.root(), 777, fake.owner()),
            Err(AttestError::ProcessGone { pid: 777 })
        ));
        std::fs::remove_file(fake.file(PID, "cgroup")).unwrap();
        assert!(matches!(
            inspect(&fake.root(), PID, fake.owner()),
            Err(AttestError::ProcessGone { pid: PID })
        ));
        std::fs::remove_file(fake.file(PID, "stat")).unwrap();
        assert!(matches!(
            inspect(&fake.root(), PID, fake.owner()),
            Err(AttestError::ProcessGone { pid: PID })
        ));
        // Deleted between the two reads of stat.
        fake.process(31, &stat_line(31, "envoy", 5), &FakeProc::pod_cgroup());
        let stat = fake.file(31, "stat");
        let result = inspect_with(&fake.root(), 31, fake.owner(), || {
            std::fs::remove_file(&stat).unwrap();
        });
        assert!(matches!(result, Err(AttestError::ProcessGone { pid: 31 })));
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_unreadable() {
        let fake = FakeProc::new();
        std::fs::write(fake.dir.path().join("55"), "not a directory").unwrap();
        let error = inspect(&fake.root(), 55, fake.owner()).unwrap_err();
        assert!(
            matches!(
                error,
                AttestError::Unreadable {
                    pid: 55,
                    file: "its directory",
                    ..
                }
            ),
            "{error:?}"
        );
        // A symlink to another process's directory is not followed.
        std::os::unix::fs::symlink(
            fake.dir.path().join(PID.to_string()),
            fake.dir.path().join("56"),
        )
        .unwrap();
        let error = inspect(&fake.root(), 56, fake.owner()).unwrap_err();
        assert!(
            matches!(error, AttestError::Unreadable { pid: 56, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn cgroup_problems_are_refused() {
        let fake = FakeProc::new();
        fake.process(
            41,
            &stat_line(41, "sh", 5),
            "0::/user.slice/session-1.scope\n",
        );
        let error = inspect(&fake.root(), 41, fake.owner()).unwrap_err();
        assert!(
            matches!(
                error,
                AttestError::Cgroup {
                    pid: 41,
                    source: CgroupError::NotInPod
                }
            ),
            "{error:?}"
        );
        let dir = fake.dir.path().join("42");
        fake.process(42, &stat_line(42, "sh", 5), "");
        std::fs::write(dir.join("cgroup"), b"0::/\xff\xfe\n").unwrap();
        let error = inspect(&fake.root(), 42, fake.owner()).unwrap_err();
        assert!(
            matches!(
                error,
                AttestError::Garbled {
                    pid: 42,
                    file: "cgroup",
                    reason: "not utf-8"
                }
            ),
            "{error:?}"
        );
        let huge = FakeProc::pod_cgroup().repeat(cgroup::MAX_LEN / 80 + 2);
        fake.process(43, &stat_line(43, "sh", 5), &huge);
        let error = inspect(&fake.root(), 43, fake.owner()).unwrap_err();
        assert!(
            matches!(
                error,
                AttestError::Garbled {
                    pid: 43,
                    file: "cgroup",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn fake_owner_mismatch_is_refused() {
        let fake = FakeProc::new();
        let error = inspect(&fake.root(), PID, fake.owner().wrapping_add(1)).unwrap_err();
        assert!(matches!(error, AttestError::OwnerMismatch { pid: PID }));
        assert_eq!(
            error.to_string(),
            format!("process {PID} is not owned by the connecting uid")
        );
    }

    #[test]
    fn boot_time_must_be_readable() {
        let fake = FakeProc::new();
        let root_stat = fake.dir.path().join("stat");
        for garbage in ["cpu 1 2 3\n", "btime\n", "btime x\n", "btime -1\n", ""] {
            std::fs::write(&root_stat, garbage).unwrap();
            let error = inspect(&fake.root(), PID, fake.owner()).unwrap_err();
            assert!(
                matches!(error, AttestError::BootTimeGarbled { .. }),
                "{garbage:?}: {error:?}"
            );
        }
        std::fs::remove_file(&root_stat).unwrap();
        let error = inspect(&fake.root(), PID, fake.owner()).unwrap_err();
        assert!(
            matches!(error, AttestError::BootTimeUnreadable { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn invalid_pids_are_refused() {
        for pid in [0, -1, i32::MIN] {
            assert!(matches!(
                inspect(&ProcRoot::host(), pid, 0),
                Err(AttestError::InvalidPid { pid: p }) if p == pid
            ));
        }
    }

    #[test]
    fn started_after_allows_one_tick() {
        let fake = FakeProc::new();
        let info = inspect(&fake.root(), PID, fake.owner()).unwrap();
        let at = info.started_at;
        assert!(!info.started_after(at));
        assert!(!info.started_after(at - tick() / 2));
        assert!(!info.started_after(at - tick()));
        assert!(info.started_after(at - tick() - Duration::from_nanos(1)));
        assert!(info.started_after(at - Duration::from_secs(1)));
        assert!(!info.started_after(at + Duration::from_secs(1)));
        assert!(info.started_after(SystemTime::UNIX_EPOCH));
    }

    // The real /proc: this test process, whatever cgroup it runs in.
    #[test]
    fn own_process_is_inspected_on_the_real_proc() {
        let pid = own_pid();
        let expected = cgroup::parse(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        match (inspect(&ProcRoot::host(), pid, own_uid()), expected) {
            // Outside a pod (a developer machine, most CI): refused for its cgroup.
            (Err(AttestError::Cgroup { pid: p, source }), Err(want)) => {
                assert_eq!((p, source), (pid, want));
            }
            // Inside a pod: proven, with the same cgroup.
            (Ok(info), Ok(want)) => {
                assert_eq!(info.cgroup, want);
                assert!(!info.started_after(SystemTime::now()));
            }
            (got, want) => panic!("inspect gave {got:?}, the cgroup parses as {want:?}"),
        }
    }

    // The start time of a real process, dated with the host clocks, is exact to a tick: a
    // child spawned between two clock readings is dated between them.
    #[test]
    fn real_start_time_is_dated_to_the_tick() {
        let before = SystemTime::now();
        let mut child = sleeper();
        let after = SystemTime::now();
        let dir = ProcessDir::open(&ProcRoot::host(), pid_of(&child)).unwrap();
        let ticks = dir.start_ticks().unwrap();
        let again = dir.start_ticks().unwrap();
        let started_at = ProcRoot::host().wall_time(pid_of(&child), ticks).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ticks, again);
        assert!(started_at <= after, "{started_at:?} after {after:?}");
        assert!(
            started_at + tick() + tick() >= before,
            "{started_at:?} before {before:?}"
        );
    }

    #[test]
    fn real_owner_mismatch_is_refused() {
        let pid = own_pid();
        let error = inspect(&ProcRoot::host(), pid, own_uid().wrapping_add(1)).unwrap_err();
        assert!(
            matches!(error, AttestError::OwnerMismatch { pid: p } if p == pid),
            "{error:?}"
        );
    }

    #[test]
    fn dead_child_is_gone() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        child.kill().unwrap();
        child.wait().unwrap();
        let error = inspect(&ProcRoot::host(), pid, own_uid()).unwrap_err();
        assert!(
            matches!(error, AttestError::ProcessGone { pid: p } if p == pid),
            "{error:?}"
        );
        assert_eq!(error.to_string(), format!("process {pid} is gone"));
    }

    // A directory opened while the process lived reads as gone once it has died and been
    // reaped: the descriptor pins that process, never a later owner of the pid.
    #[test]
    fn held_directory_of_a_dead_child_reads_as_gone() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        let dir = ProcessDir::open(&ProcRoot::host(), pid).unwrap();
        assert!(dir.start_ticks().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        let error = dir.start_ticks().unwrap_err();
        assert!(
            matches!(error, AttestError::ProcessGone { pid: p } if p == pid),
            "{error:?}"
        );
        let error = dir.read("cgroup", cgroup::MAX_LEN).unwrap_err();
        assert!(
            matches!(error, AttestError::ProcessGone { .. }),
            "{error:?}"
        );
    }
}
