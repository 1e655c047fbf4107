//! Who is calling, in node mode: the pod behind a peer's process, asked of the kubelet.

pub mod kubelet;
