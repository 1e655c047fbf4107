//! The pod and container behind a process, read from the text of `/proc/<pid>/cgroup`.
//!
//! This module owns one pure function, [`parse`], and the two names it yields, [`PodUid`]
//! and [`ContainerId`]. It never touches the file system: [`super::process`] reads the file
//! (through a directory descriptor that pins the process) and hands the text here.
//!
//! # What is recognised
//!
//! Every line is `hierarchy-id:controllers:path` (cgroup v1 has one line per hierarchy, v2 the
//! single line `0::path`, a hybrid host both). A line whose path names a Kubernetes pod must
//! also name the container below it; all such lines must agree; lines that name no pod (the
//! v2 line of a kind node, `rdma:/`, ...) are ignored. The pod is found by its cgroup, in the
//! two layouts the kubelet creates:
//!
//! - **cgroupfs driver**: `…/kubepods[/burstable|/besteffort]/pod<uid>/<container>`, the uid
//!   with `-`;
//! - **systemd driver**: `…/kubepods-<qos>-pod<uid>.slice/<container>` (and `kubepods-pod<uid>`
//!   for the guaranteed class), the uid with `_` as systemd needs; any slice name whose
//!   dash-separated parts end in `kubepods[-<qos>]` counts, so kind's `kubelet-kubepods-…`
//!   and other cgroup roots work. The flattened form
//!   `kubepods-<qos>-pod<uid>.slice:<runtime>:<id>` (containerd's systemd path used as a
//!   plain directory name, seen under `/system.slice/containerd.service/` on kind nodes) is
//!   accepted too.
//!
//! The container is `<64 hex>` (cgroupfs with containerd or docker), or
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (systemd).
//! `crio-conmon-<id>.scope` is cri-o's monitor process, not the workload, and is refused.
//! Cgroups below the container's (crun's `container` sub-cgroup, a container that runs its
//! own systemd or docker) belong to that container.
//!
//! What may come before the pod: anything ending in the kubepods root (kind's `/docker/<id>`
//! node container, docker desktop's `/kubepods/kubepods`), or, when the agent runs in its own
//! cgroup namespace, only `..` segments (`/../../../burstable/pod<uid>/<id>`), since the
//! kubepods root is then above the namespace root and invisible.
//!
//! These are the forms SPIRE's k8s workload attestor accepts (pod uid with `_` or `-`,
//! container id of 64 hex), stricter in four ways, each a test below: the pod must sit under
//! a kubepods root or a namespace escape (SPIRE matches `pod<uid>/<id>` anywhere); a pod
//! without a container is an error, not "not a pod"; upper-case hex is refused, since the
//! kubelet and the runtimes only write lower case; and a pod path inside a `user.slice` is
//! refused, because systemd delegates that subtree to the logged-in user, who could create a
//! look-alike `kubepods/…/pod<uid>/<id>` cgroup in it. Static pods (whose uid is a 32-hex hash,
//! not a UUID) are refused with [`CgroupError::BadPodUid`].
//!
//! What this trusts: the path is the kernel's, but its names were chosen by whoever created
//! the cgroups, which is the kubelet and the runtime, or anyone else with write access to a
//! cgroup subtree (root, a `Delegate=yes` service, a privileged container below its own
//! cgroup). The first pod on a path wins, so a container cannot name another pod below
//! itself; `user.slice` is refused by name because it is the one subtree systemd hands to
//! unprivileged users.
//!
//! This module must never pick one of two disagreeing answers, and never read
//! `/proc/<pid>/mountinfo` or anything else a workload can write.

use std::fmt;
use std::str::FromStr;

/// The largest cgroup file accepted. A real one is a few hundred bytes per hierarchy (at most
/// about 15 lines); anything near this is not a kernel's answer.
pub const MAX_LEN: usize = 64 * 1024;

/// The pod and the container a process runs in, as its cgroup names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodContainer {
    /// The pod's `metadata.uid`.
    pub pod_uid: PodUid,
    /// The container's runtime id, as in `status.containerStatuses[].containerID` after its
    /// `<runtime>://` prefix.
    pub container_id: ContainerId,
}

/// A pod uid in the canonical form the API server shows: a lower-case UUID with `-`, such as
/// `2c48913c-b29f-11e7-9350-020968147796`. Parsed from that form or its `_` form (systemd).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

/// A container id: exactly 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(String);

/// A string that is not a pod uid (see [`PodUid`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a pod uid: expected a lower-case uuid (8-4-4-4-12 hex digits, `-` or `_`)")]
pub struct InvalidPodUid;

/// A string that is not a container id (see [`ContainerId`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a container id: expected 64 lower-case hex digits")]
pub struct InvalidContainerId;

/// Why a cgroup file does not name exactly one pod container. Line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// The text is longer than [`MAX_LEN`].
    #[error("cgroup file is longer than {MAX_LEN} bytes")]
    TooLarge,
    /// A line is not `hierarchy-id:controllers:/path`.
    #[error("cgroup line {line} is not `hierarchy-id:controllers:/path`")]
    Malformed {
        /// The line.
        line: usize,
    },
    /// No line names a Kubernetes pod: a host process, or one outside any pod.
    #[error("the process is not in a kubernetes pod")]
    NotInPod,
    /// A line names a pod but no container below it: the pod's own cgroup, where only a
    /// pod-level process (or nothing) runs.
    #[error("cgroup line {line} names a pod but no container")]
    NoContainer {
        /// The line.
        line: usize,
    },
    /// The pod segment's uid is not a lower-case UUID (a typo, upper case, a static pod's hash).
    #[error("cgroup line {line} names a pod whose uid is not a lower-case uuid")]
    BadPodUid {
        /// The line.
        line: usize,
    },
    /// The cgroup below the pod is not a container: not 64 lower-case hex digits, bare or in
    /// a `cri-containerd-`, `crio-` or `docker-` scope.
    #[error("cgroup line {line}: the cgroup below the pod is not a container id")]
    BadContainerId {
        /// The line.
        line: usize,
    },
    /// cri-o's `crio-conmon-<id>.scope`: the container monitor, not the workload.
    #[error("cgroup line {line} is cri-o's conmon, not a workload container")]
    Conmon {
        /// The line.
        line: usize,
    },
    /// The pod path sits inside a `user.slice`, a subtree systemd delegates to a user.
    #[error("cgroup line {line} names a pod inside a user's delegated user.slice")]
    UserDelegated {
        /// The line.
        line: usize,
    },
    /// Two lines name different pods.
    #[error("cgroup lines {first} and {line} disagree on the pod uid")]
    PodUidMismatch {
        /// The first line that named a pod.
        first: usize,
        /// The line that disagrees with it.
        line: usize,
    },
    /// Two lines name different containers.
    #[error("cgroup lines {first} and {line} disagree on the container id")]
    ContainerIdMismatch {
        /// The first line that named a container.
        first: usize,
        /// The line that disagrees with it.
        line: usize,
    },
}

/// Why one path does not name a pod container; [`parse`] adds the line number.
enum PathError {
    NoContainer,
    BadPodUid,
    BadContainerId,
    Conmon,
    UserDelegated,
}

/// The quality-of-service classes the kubelet nests pods under (guaranteed pods sit directly
/// under the kubepods root).
const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

/// Reads the pod and container a process runs in from the text of its `/proc/<pid>/cgroup`.
pub fn parse(contents: &str) -> Result<PodContainer, CgroupError> {
    if contents.len() > MAX_LEN {
        return Err(CgroupError::TooLarge);
    }
    let mut found: Option<(usize, PodContainer)> = None;
    for (index, text) in contents.lines().enumerate() {
        let line = index + 1;
        if text.is_empty() {
            continue;
        }
        let path = line_path(text).ok_or(CgroupError::Malformed { line })?;
        let Some(this) = parse_path(path).map_err(|error| match error {
            PathError::NoContainer => CgroupError::NoContainer { line },
            PathError::BadPodUid => CgroupError::BadPodUid { line },
            PathError::BadContainerId => CgroupError::BadContainerId { line },
            PathError::Conmon => CgroupError::Conmon { line },
            PathError::UserDelegated => CgroupError::UserDelegated { line },
        })?
        else {
            continue;
        };
        match &found {
            None => found = Some((line, this)),
            Some((first, seen)) if seen.pod_uid != this.pod_uid => {
                return Err(CgroupError::PodUidMismatch {
                    first: *first,
                    line,
                });
            }
            Some((first, seen)) if seen.container_id != this.container_id => {
                return Err(CgroupError::ContainerIdMismatch {
                    first: *first,
                    line,
                });
            }
            Some(_) => {}
        }
    }
    found.map(|(_, pc)| pc).ok_or(CgroupError::NotInPod)
}

/// The path of one `hierarchy-id:controllers:/path` line (the path may hold `:` itself).
fn line_path(text: &str) -> Option<&str> {
    let mut fields = text.splitn(3, ':');
    let (id, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    let numeric = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    (numeric && path.starts_with('/')).then_some(path)
}

/// The pod container one cgroup path names, `None` if it names no pod.
fn parse_path(path: &str) -> Result<Option<PodContainer>, PathError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate() {
        let Some(pod) = pod_segment(&segments[..i], segment) else {
            continue;
        };
        if segments[..i].contains(&"user.slice") {
            return Err(PathError::UserDelegated);
        }
        let (uid, inline_leaf) = pod;
        let pod_uid = uid.parse::<PodUid>().map_err(|_| PathError::BadPodUid)?;
        let container_id = match inline_leaf {
            Some((runtime, id)) => colon_leaf(runtime, id)?,
            None => scope_leaf(segments.get(i + 1).ok_or(PathError::NoContainer)?)?,
        };
        // The first pod wins: anything below its container is that container's own subtree.
        return Ok(Some(PodContainer {
            pod_uid,
            container_id,
        }));
    }
    Ok(None)
}

/// A pod's cgroup segment: the raw uid text, and for the flattened
/// `<pod slice>:<runtime>:<id>` form, the runtime and id that follow it.
type PodSegment<'a> = (&'a str, Option<(&'a str, &'a str)>);

/// If `segment` (below `ancestors`) is a pod's cgroup, what it holds.
fn pod_segment<'a>(ancestors: &[&str], segment: &'a str) -> Option<PodSegment<'a>> {
    if let Some((slice, leaf)) = segment.split_once(':') {
        let uid = systemd_pod_uid(slice)?;
        let (runtime, id) = leaf.split_once(':').unwrap_or((leaf, ""));
        return Some((uid, Some((runtime, id))));
    }
    if let Some(uid) = systemd_pod_uid(segment) {
        return Some((uid, None));
    }
    let uid = segment.strip_prefix("pod")?;
    cgroupfs_parent_ok(ancestors).then_some((uid, None))
}

/// The uid text of a systemd pod slice, `<root>-kubepods[-<qos>]-pod<uid>.slice`.
fn systemd_pod_uid(segment: &str) -> Option<&str> {
    let stem = segment.strip_suffix(".slice")?;
    let (parent, uid) = stem.rsplit_once("-pod")?;
    let mut parts = parent.rsplit('-');
    let last = parts.next()?;
    let root = if QOS_CLASSES.contains(&last) {
        parts.next()?
    } else {
        last
    };
    (root == "kubepods").then_some(uid)
}

/// Whether a cgroupfs `pod<uid>` directory below `ancestors` sits where the kubelet puts pods:
/// under `kubepods` (optionally a QoS class between), or below only `..` segments when the
/// kubepods root lies outside the reader's cgroup namespace.
fn cgroupfs_parent_ok(ancestors: &[&str]) -> bool {
    let above = match ancestors.split_last() {
        Some((last, rest)) if QOS_CLASSES.contains(last) => rest,
        _ => ancestors,
    };
    match above.last() {
        Some(&"kubepods") => true,
        Some(&"..") => above.iter().all(|s| *s == ".."),
        _ => false,
    }
}

/// The container id of the cgroup directly below a pod's: `<id>`, or
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`.
fn scope_leaf(leaf: &str) -> Result<ContainerId, PathError> {
    let id = match leaf.strip_suffix(".scope") {
        None => leaf,
        Some(stem) if stem.starts_with("crio-conmon-") => return Err(PathError::Conmon),
        Some(stem) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|runtime| stem.strip_prefix(runtime))
            .ok_or(PathError::BadContainerId)?,
    };
    id.parse().map_err(|_| PathError::BadContainerId)
}

/// The container id of the flattened `…slice:<runtime>:<id>` form.
fn colon_leaf(runtime: &str, id: &str) -> Result<ContainerId, PathError> {
    match runtime {
        "cri-containerd" | "crio" | "docker" => id.parse().map_err(|_| PathError::BadContainerId),
        "crio-conmon" => Err(PathError::Conmon),
        _ => Err(PathError::BadContainerId),
    }
}

impl PodUid {
    /// The canonical form, with `-`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PodUid {
    type Err = InvalidPodUid;

    /// Accepts `8-4-4-4-12` lower-case hex digits separated all by `-` or all by `_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const DASHES: [usize; 4] = [8, 13, 18, 23];
        let bytes = s.as_bytes();
        if bytes.len() != 36 {
            return Err(InvalidPodUid);
        }
        let separator = bytes[8];
        if separator != b'-' && separator != b'_' {
            return Err(InvalidPodUid);
        }
        let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
            if DASHES.contains(&i) {
                b == separator
            } else {
                is_lower_hex(b)
            }
        });
        if !well_formed {
            return Err(InvalidPodUid);
        }
        Ok(PodUid(s.replace('_', "-")))
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ContainerId {
    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ContainerId {
    type Err = InvalidContainerId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(is_lower_hex) {
            Ok(ContainerId(s.to_owned()))
        } else {
            Err(InvalidContainerId)
        }
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_U: &str = "2c48913c_b29f_11e7_9350_020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const OTHER_UID: &str = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80";
    const OTHER_CID: &str = "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6";
    const NODE: &str = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26";

    fn ok(contents: &str) -> PodContainer {
        match parse(contents) {
            Ok(pc) => pc,
            Err(error) => panic!("{contents:?} failed: {error}"),
        }
    }

    fn expect(contents: &str, uid: &str, cid: &str) {
        let pc = ok(contents);
        assert_eq!(pc.pod_uid.as_str(), uid, "{contents:?}");
        assert_eq!(pc.container_id.as_str(), cid, "{contents:?}");
    }

    /// The v1 controller lines of one cgroup v1 host, all on `path`.
    fn v1(path: &str) -> String {
        [
            "12:hugetlb",
            "11:net_cls,net_prio",
            "10:pids",
            "9:cpuset",
            "8:devices",
            "7:memory",
            "6:perf_event",
            "5:blkio",
            "4:cpu,cpuacct",
            "3:freezer",
            "2:rdma",
            "1:name=systemd",
        ]
        .iter()
        .map(|head| format!("{head}:{path}\n"))
        .collect()
    }

    // cgroupfs driver. A burstable pod under cgroup v1, one line per controller: the layout
    // of SPIRE's init-container fixture and of any kubeadm node before systemd became the
    // default driver.
    #[test]
    fn cgroupfs_v1_burstable() {
        let text = v1(&format!("/kubepods/burstable/pod{UID}/{CID}"));
        expect(&text, UID, CID);
    }

    // A guaranteed pod has no QoS directory (kubelet's cgroup manager; SPIRE's "without QOS").
    #[test]
    fn cgroupfs_guaranteed() {
        expect(&format!("0::/kubepods/pod{UID}/{CID}\n"), UID, CID);
    }

    // Best-effort under cgroup v2 with cgroupfs: the single unified line.
    #[test]
    fn cgroupfs_v2_besteffort() {
        expect(
            &format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"),
            UID,
            CID,
        );
    }

    // Docker Desktop's Kubernetes puts the kubepods root inside another kubepods directory.
    #[test]
    fn docker_desktop_double_kubepods() {
        let text = format!("4:memory:/kubepods/kubepods/besteffort/pod{UID}/{CID}\n");
        expect(&text, UID, CID);
    }

    // kind (cgroupfs inside a docker node container), cgroup v1 hybrid: every v1 controller
    // shows the node container's `/docker/<id>` prefix; the v2 line is containerd's own
    // service cgroup and names no pod (SPIRE's kind fixture has this shape).
    #[test]
    fn kind_cgroupfs_hybrid() {
        let mut text = v1(&format!(
            "/docker/{NODE}/kubepods/besteffort/pod{OTHER_UID}/{OTHER_CID}"
        ));
        text.push_str(&format!(
            "0::/docker/{NODE}/system.slice/containerd.service\n"
        ));
        expect(&text, OTHER_UID, OTHER_CID);
    }

    // systemd driver with docker (dockershim days): `docker-<id>.scope`. SPIRE's fixture
    // keeps the uid with `-`, so both separators are accepted in slices.
    #[test]
    fn systemd_docker_dashed_uid() {
        let text = v1(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice/docker-{CID}.scope"
        ));
        expect(&text, UID, CID);
    }

    // systemd driver with containerd on cgroup v2, the common form on current distributions:
    // the uid has `_` because `-` is systemd's hierarchy separator.
    #[test]
    fn systemd_containerd_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_U}.slice/cri-containerd-{CID}.scope\n"
        );
        expect(&text, UID, CID);
    }

    // systemd driver, guaranteed class: `kubepods-pod<uid>.slice` directly under kubepods.slice.
    #[test]
    fn systemd_guaranteed() {
        let text =
            format!("0::/kubepods.slice/kubepods-pod{UID_U}.slice/cri-containerd-{CID}.scope\n");
        expect(&text, UID, CID);
    }

    // cri-o with systemd on a hybrid host (minikube, OpenShift 3): v1 lines on the pod, an
    // `rdma:/` line at the root and a v2 line on crio.service, neither naming a pod.
    #[test]
    fn crio_systemd_hybrid() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_U}.slice/crio-{CID}.scope"
        );
        let text = format!(
            "10:pids:{path}\n9:cpuset:{path}\n3:rdma:/\n1:name=systemd:{path}\n0::/system.slice/crio.service\n"
        );
        expect(&text, UID, CID);
    }

    // cri-o's container monitor runs in a sibling scope of the container: never the workload.
    #[test]
    fn crio_conmon_is_refused() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_U}.slice/crio-conmon-{CID}.scope\n"
        );
        assert_eq!(parse(&text), Err(CgroupError::Conmon { line: 1 }));
    }

    // crun on cgroup v2 with systemd puts the container's processes in a `container`
    // sub-cgroup of the scope; a container running its own docker nests `/docker/<id>`.
    // Both still belong to the container the scope names.
    #[test]
    fn sub_cgroups_of_a_container_belong_to_it() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_U}.slice/crio-{CID}.scope/container\n"
        );
        expect(&text, UID, CID);
        let nested = format!("0::/kubepods/burstable/pod{UID}/{CID}/docker/{OTHER_CID}\n");
        expect(&nested, UID, CID);
    }

    // kind with the systemd driver: the kubelet's cgroup root is `/kubelet`, so every slice
    // name carries a `kubelet-` prefix.
    #[test]
    fn kind_systemd_kubelet_slice() {
        let text = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_U}.slice/cri-containerd-{CID}.scope\n"
        );
        expect(&text, UID, CID);
    }

    // containerd given a systemd cgroups path but writing it as a plain directory: the slice,
    // runtime prefix and id joined by `:` in one segment below containerd's service cgroup
    // (SPIRE's "cri-containerd" case).
    #[test]
    fn flattened_systemd_path_under_containerd_service() {
        let text = format!(
            "0::/system.slice/containerd.service/kubepods-besteffort-pod{UID_U}.slice:cri-containerd:{CID}\n"
        );
        expect(&text, UID, CID);
        let conmon = format!("0::/kubepods-besteffort-pod{UID_U}.slice:crio-conmon:{CID}\n");
        assert_eq!(parse(&conmon), Err(CgroupError::Conmon { line: 1 }));
        let unknown = format!("0::/kubepods-besteffort-pod{UID_U}.slice:runc:{CID}\n");
        assert_eq!(
            parse(&unknown),
            Err(CgroupError::BadContainerId { line: 1 })
        );
        let no_id = format!("0::/kubepods-besteffort-pod{UID_U}.slice:cri-containerd\n");
        assert_eq!(parse(&no_id), Err(CgroupError::BadContainerId { line: 1 }));
    }

    // Read from inside another cgroup namespace (Kubernetes 1.25+ gives containers their
    // own): the path climbs out with `..` and the kubepods root is not visible.
    #[test]
    fn other_cgroup_namespace() {
        expect(
            &format!("0::/../../../burstable/pod{UID}/{CID}\n"),
            UID,
            CID,
        );
        expect(&format!("0::/../../pod{UID}/{CID}\n"), UID, CID);
        expect(
            &format!(
                "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_U}.slice/cri-containerd-{CID}.scope\n"
            ),
            UID,
            CID,
        );
    }

    // SPIRE accepts a container with no pod (cri-o with KubeEdge, `/../crio-<id>.scope`);
    // without a pod uid there is nothing to look up, so it is not in a pod here.
    #[test]
    fn container_without_pod_is_not_in_pod() {
        let text = format!("0::/../crio-{CID}.scope\n");
        assert_eq!(parse(&text), Err(CgroupError::NotInPod));
        assert_eq!(
            parse(&format!("0::/kubepods/{CID}\n")),
            Err(CgroupError::NotInPod)
        );
    }

    // A pod directory outside a kubepods root or namespace escape does not count (SPIRE
    // matches it anywhere).
    #[test]
    fn pod_outside_kubepods_is_not_in_pod() {
        for path in [
            format!("/something/pod{UID}/{CID}"),
            format!("/pod{UID}/{CID}"),
            format!("/burstable/pod{UID}/{CID}"),
            format!("/system.slice/../pod{UID}/{CID}"),
            format!("/x/other-pod{UID_U}.slice/{CID}"),
        ] {
            assert_eq!(
                parse(&format!("0::{path}\n")),
                Err(CgroupError::NotInPod),
                "{path}"
            );
        }
    }

    // Host processes: systemd services, login sessions, the root, this very machine's form.
    #[test]
    fn host_processes_are_not_in_pod() {
        for text in [
            "0::/\n",
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "9:name=systemd:/\n4:memory:/process_api/c70336de63a7759f527d53b1cbe0f701\n0::/\n",
            "",
            "\n\n",
        ] {
            assert_eq!(parse(text), Err(CgroupError::NotInPod), "{text:?}");
        }
    }

    // The pod's own cgroup (where the sandbox's pause process may sit under some runtimes, or
    // a pod-level process) names no container.
    #[test]
    fn pod_without_container_is_an_error() {
        assert_eq!(
            parse(&format!("0::/kubepods/besteffort/pod{UID}\n")),
            Err(CgroupError::NoContainer { line: 1 })
        );
        assert_eq!(
            parse(&format!(
                "1:cpu:/\n2:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_U}.slice\n"
            )),
            Err(CgroupError::NoContainer { line: 2 })
        );
    }

    // A user's systemd manager may create any cgroup below its user.slice subtree: a pod
    // path there is a forgery, not the kubelet's.
    #[test]
    fn pod_inside_user_slice_is_refused() {
        let text = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods/besteffort/pod{UID}/{CID}\n"
        );
        assert_eq!(parse(&text), Err(CgroupError::UserDelegated { line: 1 }));
    }

    #[test]
    fn bad_container_ids() {
        let upper = CID.to_uppercase();
        let short = &CID[..63];
        let long = format!("{CID}0");
        let non_hex = format!("{}g", &CID[..63]);
        for leaf in [
            short.to_owned(),
            long.clone(),
            upper.clone(),
            non_hex,
            format!("cri-containerd-{short}.scope"),
            format!("crio-{long}.scope"),
            format!("docker-{upper}.scope"),
            format!("containerd-{CID}.scope"),
            format!("cri-containerd-{CID}"),
            "notanid".to_owned(),
        ] {
            let text = format!("0::/kubepods/burstable/pod{UID}/{leaf}\n");
            assert_eq!(
                parse(&text),
                Err(CgroupError::BadContainerId { line: 1 }),
                "{leaf}"
            );
        }
    }

    #[test]
    fn bad_pod_uids() {
        let static_pod = "2732ca68f6358eba7703fb6f82a25c94"; // a static pod's hash uid
        let mixed = "2c48913c-b29f_11e7-9350-020968147796";
        for uid in [
            static_pod,
            mixed,
            "2C48913C-B29F-11E7-9350-020968147796",
            "2c48913c-b29f-11e7-9350-02096814779",
            "2c48913c-b29f-11e7-9350-0209681477966",
            "2c48913cxb29fx11e7x9350x020968147796",
            "",
        ] {
            let text = format!("0::/kubepods/burstable/pod{uid}/{CID}\n");
            assert_eq!(
                parse(&text),
                Err(CgroupError::BadPodUid { line: 1 }),
                "{uid}"
            );
        }
        let slice = format!("0::/kubepods.slice/kubepods-pod{static_pod}.slice/{CID}\n");
        assert_eq!(parse(&slice), Err(CgroupError::BadPodUid { line: 1 }));
    }

    #[test]
    fn disagreeing_lines_are_an_error() {
        let pod_a = format!("/kubepods/burstable/pod{UID}/{CID}");
        let pod_b = format!("/kubepods/burstable/pod{OTHER_UID}/{CID}");
        let text = format!("3:cpu:{pod_a}\n2:memory:/\n1:pids:{pod_b}\n");
        assert_eq!(
            parse(&text),
            Err(CgroupError::PodUidMismatch { first: 1, line: 3 })
        );
        let ctr_b = format!("/kubepods/burstable/pod{UID}/{OTHER_CID}");
        let text = format!("3:cpu:{pod_a}\n0::{ctr_b}\n");
        assert_eq!(
            parse(&text),
            Err(CgroupError::ContainerIdMismatch { first: 1, line: 2 })
        );
        // The same pod and container in both layouts agree.
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_U}.slice/cri-containerd-{CID}.scope"
        );
        expect(&format!("1:cpu:{pod_a}\n0::{systemd}\n"), UID, CID);
        // A pod line and a pod-without-container line: an error, never the one that parsed.
        let text = format!("3:cpu:{pod_a}\n0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(parse(&text), Err(CgroupError::NoContainer { line: 2 }));
    }

    #[test]
    fn garbage_lines_are_malformed() {
        for (text, line) in [
            ("hello\n", 1),
            ("12:pids\n", 1),
            ("x:pids:/kubepods\n", 1),
            (":pids:/kubepods\n", 1),
            ("12:pids:kubepods/pod\n", 1),
            ("0::/\n-1::/\n", 2),
            ("0::\n", 1),
            ("\u{0}\u{1}\u{2}", 1),
        ] {
            assert_eq!(
                parse(text),
                Err(CgroupError::Malformed { line }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn truncated_line_is_an_error() {
        let full = format!("0::/kubepods/burstable/pod{UID}/{CID}\n");
        // Cut inside the container id, inside the pod uid, and right after the pod.
        let cut = |n: usize| full[..n].to_owned();
        let in_cid = full.len() - 10;
        let in_uid = full.find("/pod").unwrap_or_default() + 11;
        let after_pod = full.find(CID).unwrap_or_default();
        assert_eq!(
            parse(&cut(in_cid)),
            Err(CgroupError::BadContainerId { line: 1 })
        );
        assert_eq!(parse(&cut(in_uid)), Err(CgroupError::BadPodUid { line: 1 }));
        assert_eq!(
            parse(&cut(after_pod)),
            Err(CgroupError::NoContainer { line: 1 })
        );
    }

    #[test]
    fn huge_input_is_refused() {
        let line = format!("0::/kubepods/burstable/pod{UID}/{CID}\n");
        let huge = line.repeat(MAX_LEN / line.len() + 1);
        assert_eq!(parse(&huge), Err(CgroupError::TooLarge));
        // Just under the limit, the same line repeated still agrees with itself.
        let big = line.repeat(MAX_LEN / line.len());
        expect(&big, UID, CID);
        // A single enormous path is refused before it is split.
        let long_path = format!("0::/{}\n", "a/".repeat(MAX_LEN));
        assert_eq!(parse(&long_path), Err(CgroupError::TooLarge));
    }

    #[test]
    fn crlf_line_endings_parse_as_lines() {
        // `lines()` strips `\r\n`, so a CRLF file parses as the same lines.
        expect(&format!("0::/kubepods/pod{UID}/{CID}\r\n"), UID, CID);
    }

    #[test]
    fn names_parse_and_print_canonically() {
        let dashed: PodUid = UID.parse().unwrap();
        let underscored: PodUid = UID_U.parse().unwrap();
        assert_eq!(dashed, underscored);
        assert_eq!(underscored.to_string(), UID);
        let cid: ContainerId = CID.parse().unwrap();
        assert_eq!(cid.to_string(), CID);
        assert_eq!("x".parse::<PodUid>(), Err(InvalidPodUid));
        assert_eq!("x".parse::<ContainerId>(), Err(InvalidContainerId));
        assert_eq!(
            InvalidPodUid.to_string(),
            "not a pod uid: expected a lower-case uuid (8-4-4-4-12 hex digits, `-` or `_`)"
        );
    }

    #[test]
    fn error_messages_name_the_line_not_the_values() {
        let error = CgroupError::PodUidMismatch { first: 1, line: 3 };
        assert_eq!(
            error.to_string(),
            "cgroup lines 1 and 3 disagree on the pod uid"
        );
        assert_eq!(
            CgroupError::NotInPod.to_string(),
            "the process is not in a kubernetes pod"
        );
    }
}
