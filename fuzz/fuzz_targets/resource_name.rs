//! The pure parsers of names that arrive from outside: SDS resource names, SPIFFE IDs, trust
//! domains, key types. None may panic, and what parses must print back to a string that
//! parses to the same value.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use sds_agent::identity::{ResourceName, SpiffeId, TrustDomain};
use sds_backends::KeyType;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = ResourceName::from_str(s) {
        assert_eq!(name.as_str(), s);
    }
    if let Ok(id) = SpiffeId::from_str(s) {
        let again = SpiffeId::from_str(&id.to_string());
        assert_eq!(
            again.ok().as_ref(),
            Some(&id),
            "SpiffeId round trip of {s:?}"
        );
        let _ = (id.trust_domain(), id.path());
    }
    if let Ok(td) = TrustDomain::from_str(s) {
        let again = TrustDomain::from_str(td.as_str());
        assert_eq!(
            again.ok().as_ref(),
            Some(&td),
            "TrustDomain round trip of {s:?}"
        );
        // A service-account identity in it, with the input split in two as its segments.
        let mid = (0..=s.len() / 2)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        let (ns, sa) = s.split_at(mid);
        let _ = SpiffeId::for_service_account(td, ns, sa);
    }
    if let Ok(kt) = KeyType::from_str(s) {
        let again = KeyType::from_str(kt.as_str());
        assert_eq!(again.ok(), Some(kt), "KeyType round trip of {s:?}");
    }
});
