//! mig-agent: `migd` (the per-host agent, [`daemon`]), its API ([`api`]) and async client library
//! ([`client`]), the `mig` CLI ([`cli`]) and the per-container shim ([`shim`]).
//!
//! The state directory layout shared by the agent and the shim is in [`layout`].

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod lab;
pub mod layout;
pub mod metrics;
pub mod migration;
pub mod privacy;
pub mod remote;
pub mod shim;
