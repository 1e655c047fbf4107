//! Generated protobuf code for the APIs sds-agent speaks that no published crate ships.
//!
//! Envoy's SDS messages and service come from the `envoy-types` crate and are not repeated
//! here. This crate holds:
//! - the Istio CA API (`istio.v1.auth.IstioCertificateService`), which istiod and
//!   cert-manager istio-csr serve, written from Istio's public API definition: the client
//!   is used by the `istiod` backend, the server by the test CA in `integration/`;
//! - the SPIFFE Workload API (`SpiffeWorkloadAPI`), written from the SPIFFE standard: the
//!   server is the agent's `workload_api` module.
//!
//! The `.proto` files live under `proto/` and `build.rs` compiles them with protox, so no
//! `protoc` is needed on the machine.

#![forbid(unsafe_code)]

/// The well-known types the generated messages hold (`google.protobuf.Struct`, ...).
pub use prost_types;

/// Generated modules, by protobuf package.
pub mod pb {
    /// `istio.v1.auth`: the Istio CA API.
    pub mod istio_v1_auth {
        #![allow(
            missing_docs,
            missing_debug_implementations,
            unreachable_pub,
            clippy::all,
            clippy::pedantic
        )]
        tonic::include_proto!("istio.v1.auth");
    }

    /// The SPIFFE Workload API (`SpiffeWorkloadAPI`). Its `.proto` has no package, so
    /// prost names the generated file `_`.
    pub mod spiffe_workload {
        #![allow(
            missing_docs,
            missing_debug_implementations,
            unreachable_pub,
            clippy::all,
            clippy::pedantic
        )]
        tonic::include_proto!("_");
    }
}
