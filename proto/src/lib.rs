//! Generated protobuf code for the APIs sds-agent speaks that no published crate ships.
//!
//! Envoy's SDS messages and service come from the `envoy-types` crate and are not repeated
//! here. The Istio CA API (`istio.v1.auth.IstioCertificateService`) lands here with the
//! istiod backend: its `.proto` files under `proto/`, compiled by `build.rs` with a protoc
//! that needs nothing from the machine, re-exported through `pub mod pb`. Until then this
//! crate holds only that plumbing's place in the workspace.

#![forbid(unsafe_code)]

/// Generated modules, re-exported. Empty until the first vendored API lands.
pub mod pb {}
