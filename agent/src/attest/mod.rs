//! Who is calling, in node mode: the pod behind a connection's peer process.
//!
//! In node mode one agent serves every pod on its node through one socket, so a caller's
//! identity cannot be configured: it is attested per connection. The chain is
//!
//! 1. SO_PEERCRED gives the connecting process's pid and uid (the kernel's word, recorded at
//!    `connect`);
//! 2. [`process`] pins that pid's `/proc` directory, proves it is still the process that
//!    connected (owner = peer uid, the same start time before and after, started before the
//!    connection) and reads its cgroup;
//! 3. [`cgroup`] turns the cgroup into a pod uid and a container id;
//! 4. [`kubelet`]'s pod list turns those into a namespace and service account, hence the
//!    SPIFFE ID.
//!
//! Every step fails closed: an error anywhere means the caller is not authenticated. This
//! module never trusts anything the workload can write: not `mountinfo`, not its environment,
//! not its command line, and not the identity it asks for.

pub mod cgroup;
pub mod conn;
pub mod kubelet;
pub mod node;
pub mod process;
