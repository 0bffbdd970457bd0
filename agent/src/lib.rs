//! mig-agent: `migd`, its API and client library, the `mig` CLI and the per-container shim.
