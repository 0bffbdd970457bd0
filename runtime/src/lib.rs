//! mig-runtime: one host, one container.
//!
//! Everything here is synchronous and free of networking: images and the layer store ([`image`]),
//! the container's description ([`spec`]), its cgroup ([`cgroup`]), the code that builds its
//! namespaces, root filesystem and confinement and starts its init ([`container`]), and small
//! helpers for state on disk ([`fsutil`]) and the PID map ([`pidmap`]). [`net`] gives a container
//! a veth into the host's bridge (`mig run --net bridge`).

pub mod affinity;
pub mod bundle;
pub mod cgroup;
pub mod container;
pub mod fsutil;
pub mod image;
pub mod net;
pub mod pidfd;
pub mod pidmap;
pub mod spec;
