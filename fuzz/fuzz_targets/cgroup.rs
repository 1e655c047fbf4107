//! The cgroup parser of node-mode attestation (`sds_agent::attest::cgroup::parse`) on
//! arbitrary bytes: the text of a `/proc/<pid>/cgroup` as the input's UTF-8, or its lossy
//! decoding when it is not UTF-8. It must never panic, and whatever it accepts must be a
//! 64-hex container id and a canonical pod uid that parses back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sds_agent::attest::cgroup::{self, ContainerId, PodUid};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(found) = cgroup::parse(&text) else {
        return;
    };
    let cid = found.container_id.as_str();
    assert_eq!(cid.len(), 64, "container id {cid:?}");
    assert!(
        cid.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "container id {cid:?}"
    );
    let uid = found.pod_uid.as_str();
    assert_eq!(uid.len(), 36, "pod uid {uid:?}");
    for (i, b) in uid.bytes().enumerate() {
        if [8, 13, 18, 23].contains(&i) {
            assert_eq!(b, b'-', "pod uid {uid:?}");
        } else {
            assert!(
                b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
                "pod uid {uid:?}"
            );
        }
    }
    assert_eq!(uid.parse::<PodUid>().ok().as_ref(), Some(&found.pod_uid));
    assert_eq!(
        cid.parse::<ContainerId>().ok().as_ref(),
        Some(&found.container_id)
    );
    // Every accepted file names its pod in some line, by its uid in one of the two forms.
    assert!(
        text.contains(uid) || text.contains(&uid.replace('-', "_")),
        "pod uid {uid:?} not in the input"
    );
    assert!(text.contains(cid), "container id {cid:?} not in the input");
});
