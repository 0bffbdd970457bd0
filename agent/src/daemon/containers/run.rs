//! `mig run`: a new container's spec from its image and the request (command, user, env,
//! network, user namespace), recorded and started through its shim.

use super::{internal, invalid, new_id, spawn_watch};
use crate::api::{ApiError, ContainerState, ErrorKind, Response, RunRequest};
use crate::daemon::{Agent, Entry};
use crate::layout::{now, StateRecord};
use mig_runtime::spec::{ContainerSpec, IdMap, ImageRef, ProcessSpec};
use std::sync::Arc;

/// The host id range a `--userns` spec is validated with; the container's own range is allocated
/// when it is recorded (`mig_runtime::container::userns`).
const USERNS_MAP: IdMap = IdMap {
    host_id: mig_runtime::container::userns::BASE,
    size: mig_runtime::container::userns::SIZE,
};
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Agent {
    /// The network of a new container: an address from this host's container subnet (or the
    /// requested one) with `--net bridge`, `None` (loopback only) without.
    fn allocate_net(
        &self,
        id: &str,
        req: &RunRequest,
    ) -> Result<Option<mig_runtime::net::NetSpec>, ApiError> {
        use mig_runtime::net::{HostNet, NetError, NetMode};
        match (req.net, req.ip) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(invalid("--ip needs --net bridge")),
            (Some(NetMode::Bridge), want) => HostNet::load(&self.cfg.state_dir)
                .and_then(|n| n.allocate(id, want))
                .map(Some)
                .map_err(|e| {
                    let kind = match e {
                        NetError::NoHostNet { .. } => ErrorKind::Unavailable,
                        NetError::AddressTaken { .. } | NetError::Reserved { .. } => {
                            ErrorKind::AlreadyExists
                        }
                        NetError::OutOfSubnet { .. } => ErrorKind::InvalidArgument,
                        _ => ErrorKind::Internal,
                    };
                    ApiError::new(kind, e.to_string())
                }),
        }
    }

    /// Gives back the address of a container that was never created.
    fn release_net(&self, spec: &ContainerSpec) {
        if spec.net.is_some() {
            if let Err(e) = mig_runtime::net::ipam::release(&self.cfg.state_dir, &spec.id) {
                tracing::warn!(id = %spec.id, error = %e, "cannot release the container's address");
            }
        }
    }

    /// `run`: creates the container's directory and spec, starts its shim, waits for the init.
    pub(crate) async fn run_container(
        self: &Arc<Self>,
        mut req: RunRequest,
    ) -> Result<Response, ApiError> {
        check_cpus(req.limits.cpu_millis)?;
        let bundle = match req.bundle.take() {
            Some(dir) => Some(self.bundle_request(&dir, &mut req).await?),
            None => None,
        };
        let images = self.images.clone();
        let image_key = req.image.clone();
        let image = tokio::task::spawn_blocking(move || images.get(&image_key))
            .await
            .map_err(|e| internal(format!("image lookup task failed: {e}")))?
            .map_err(|e| ApiError::new(ErrorKind::NotFound, e.to_string()))?;
        let id = new_id();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("c-{}", &id[..8]));
        let hostname = match &req.hostname {
            Some(h) => h.clone(),
            None if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => name.clone(),
            None => id[..12].to_owned(),
        };
        let cfg = &image.config;
        let args = command_of(
            &cfg.entrypoint,
            &cfg.cmd,
            req.entrypoint.as_deref(),
            &req.args,
        );
        if args.is_empty() {
            return Err(invalid(if req.entrypoint.is_some() {
                "no command given and the entrypoint is empty"
            } else {
                "no command given and the image defines none"
            }));
        }
        if let Some(w) = &req.workdir {
            crate::daemon::exec::check_workdir(w)?;
        }
        let user_ids = match &req.user {
            None => None,
            Some(u) => Some(self.image_user(&image, u).await?),
        };
        let mut env = cfg.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.into());
        }
        for kv in &req.env {
            let key = kv.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        let (uid, gid) = match (user_ids, &bundle) {
            (Some(ids), _) => ids,
            (None, Some(b)) => (b.uid, b.gid),
            (None, None) => parse_user(&cfg.user),
        };
        let net = self.allocate_net(&id, &req)?;
        let mut spec = ContainerSpec {
            id: id.clone(),
            name: name.clone(),
            image: ImageRef {
                name: image.name.clone(),
                id: image.id.clone(),
                layers: image.layers.clone(),
            },
            process: ProcessSpec {
                args,
                env,
                cwd: if let Some(w) = &req.workdir {
                    w.clone()
                } else if let Some(b) = &bundle {
                    b.cwd.clone()
                } else if cfg.workdir.is_empty() {
                    "/".into()
                } else {
                    cfg.workdir.clone()
                },
                uid,
                gid,
            },
            hostname,
            limits: req.limits.clone(),
            userns: req.userns.then_some(USERNS_MAP),
            net,
        };
        if let Err(e) = spec.validate() {
            self.release_net(&spec);
            return Err(invalid(e.to_string()));
        }
        let state = StateRecord::new(ContainerState::Created, self.cgroup_name(&id));
        {
            let _reserving = crate::migration::dest::reserving();
            let mut map = self.lock();
            if map.values().any(|e| e.spec.name == name) {
                drop(map);
                self.release_net(&spec);
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("the name {name} is already in use"),
                ));
            }
            if let Some(other) = crate::migration::dest::arriving_named(&self.cfg.state_dir, &name)
            {
                drop(map);
                self.release_net(&spec);
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("the name {name} is already in use: container {other} is arriving here from another host"),
                ));
            }
            if spec.userns.is_some() {
                // A host id range of its own, free among this host's containers (recorded in
                // the spec, kept across moves).
                let used = map.values().filter_map(|e| e.spec.userns.as_ref());
                match mig_runtime::container::userns::allocate(&id, used) {
                    Some(m) => spec.userns = Some(m),
                    None => {
                        drop(map);
                        self.release_net(&spec);
                        return Err(ApiError::new(
                            ErrorKind::Unavailable,
                            "no free user-namespace id range",
                        ));
                    }
                }
            }
            map.insert(
                id.clone(),
                Entry {
                    spec: spec.clone(),
                    state: state.clone(),
                    busy: true,
                },
            );
        }
        match self.start_shim(&spec, &state, "start").await {
            Ok((child, init_pid)) => {
                tracing::info!(%id, init_pid, "container started");
                self.update(&id, |e| {
                    e.busy = false;
                    e.state.state = ContainerState::Running;
                    e.state.started = Some(now());
                });
                spawn_watch(self.clone(), id.clone(), Some(child));
                self.emit(crate::daemon::events::EventKind::ContainerStarted {
                    id: id.clone(),
                    name: name.clone(),
                });
                Ok(Response::Created { id, name })
            }
            Err(err) => {
                tracing::warn!(%id, error = %err.message, "container failed to start");
                // Its record never reached the disk (a full file system): a restarted agent could
                // not load it, nor `rm` remove it, so nothing of it stays (QA of session 25).
                let cd = self.dirs.container(&id);
                if !cd.spec().is_file() {
                    self.lock().remove(&id);
                    let _ = std::fs::remove_dir_all(&cd.dir);
                    return Err(ApiError::new(
                        err.kind,
                        format!(
                            "starting container {name} failed: {}; nothing of it was kept",
                            err.message
                        ),
                    ));
                }
                self.update(&id, |e| {
                    e.busy = false;
                    e.state.state = ContainerState::Failed;
                    e.state.finished = Some(now());
                    e.state.reason = Some(err.message.clone());
                });
                Err(ApiError::new(
                    err.kind,
                    format!("starting container {name} failed: {}", err.message),
                ))
            }
        }
    }
}

impl Agent {
    /// `run --user`: numeric ids of `user` from the image's /etc/passwd and /etc/group.
    async fn image_user(
        &self,
        image: &mig_runtime::image::Image,
        user: &str,
    ) -> Result<(u32, u32), ApiError> {
        crate::daemon::exec::check_user(user)?;
        let images = self.images.clone();
        let layers = image.layers.clone();
        let u = user.to_owned();
        tokio::task::spawn_blocking(move || images.resolve_user(&layers, &u, None))
            .await
            .map_err(|e| internal(format!("user lookup task failed: {e}")))?
            .map_err(|e| match e {
                mig_runtime::image::ImageError::UnknownUser(_) => invalid(format!(
                    "unknown user {user:?} for image {}: not in the image's /etc/passwd or /etc/group",
                    image.name
                )),
                other => internal(format!(
                    "cannot look up user {user:?} in image {}: {}",
                    image.name,
                    crate::shim::chain(&other)
                )),
            })
    }
}

/// The container's argv: podman's rules. `entrypoint` (`--entrypoint`) replaces the image's;
/// the image's cmd is used only when no `args` are given and the entrypoint was not replaced
/// by a non-empty one (`--entrypoint ''` clears the entrypoint and keeps the cmd).
fn command_of(
    image_entrypoint: &[String],
    image_cmd: &[String],
    entrypoint: Option<&[String]>,
    args: &[String],
) -> Vec<String> {
    let ep = entrypoint.unwrap_or(image_entrypoint);
    let cmd = if !args.is_empty() {
        args
    } else if entrypoint.is_none_or(<[String]>::is_empty) {
        image_cmd
    } else {
        &[]
    };
    ep.iter().chain(cmd).cloned().collect()
}

/// `uid[:gid]` (numeric) from the image config; root otherwise.
fn parse_user(user: &str) -> (u32, u32) {
    let mut it = user.split(':');
    let uid = it.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(uid);
    (uid, gid)
}

/// A CPU limit above the CPUs this agent may use is refused, as podman does (QA of session 30,
/// F4: `--cpus 99` on a 2-CPU host was taken). Checked when a container is made here, not when
/// one arrives: a move to a smaller host keeps its limit. One below the kernel's smallest quota
/// is refused here too, with the same range (QA of session 32, F8: 0.001 was refused only when
/// the cgroup was made, leaving a failed container).
fn check_cpus(cpu_millis: Option<u64>) -> Result<(), ApiError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    cpus_within(cpu_millis, cpus)
}

/// [`check_cpus`] on an agent that may use `cpus` CPUs.
fn cpus_within(cpu_millis: Option<u64>, cpus: u64) -> Result<(), ApiError> {
    let min = mig_runtime::cgroup::CPU_MIN_MILLIS;
    let range = format!("its range is {} to {cpus}", min as f64 / 1000.0);
    match cpu_millis {
        Some(m) if m > cpus * 1000 => Err(invalid(format!(
            "a CPU limit of {} is more than the {cpus} CPUs this agent may use: {range}",
            m as f64 / 1000.0
        ))),
        Some(m) if m < min => Err(invalid(format!(
            "a CPU limit of {} is less than the kernel can enforce (a quota of 1 ms per 100 ms \
             period): {range}",
            m as f64 / 1000.0
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_users() {
        let id = new_id();
        mig_runtime::spec::validate_id(&id).unwrap();
        assert_eq!(parse_user(""), (0, 0));
        assert_eq!(parse_user("1000"), (1000, 1000));
        assert_eq!(parse_user("1000:50"), (1000, 50));
    }

    #[test]
    fn cpu_limits_outside_the_range_are_refused_with_it() {
        let refused = |m, cpus| cpus_within(Some(m), cpus).unwrap_err().message;
        // QA of session 32, F8: the cgroup step refused 0.001 to 0.009 after the record was made.
        for m in [1, 9] {
            let msg = refused(m, 2);
            assert_eq!(
                msg,
                format!(
                    "a CPU limit of {} is less than the kernel can enforce (a quota of 1 ms per \
                     100 ms period): its range is 0.01 to 2",
                    m as f64 / 1000.0
                )
            );
        }
        assert_eq!(
            refused(2001, 2),
            "a CPU limit of 2.001 is more than the 2 CPUs this agent may use: its range is 0.01 to 2"
        );
        for ok in [None, Some(10), Some(1500), Some(2000)] {
            assert!(cpus_within(ok, 2).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn entrypoint_and_cmd() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (ep, cmd) = (v(&["/entry"]), v(&["serve", "-v"]));
        // Image only; args replace the cmd.
        assert_eq!(
            command_of(&ep, &cmd, None, &[]),
            v(&["/entry", "serve", "-v"])
        );
        assert_eq!(command_of(&ep, &cmd, None, &v(&["x"])), v(&["/entry", "x"]));
        // --entrypoint drops the image's cmd unless args are given.
        assert_eq!(command_of(&ep, &cmd, Some(&v(&["id"])), &[]), v(&["id"]));
        assert_eq!(
            command_of(&ep, &cmd, Some(&v(&["sh", "-c"])), &v(&["echo 1"])),
            v(&["sh", "-c", "echo 1"])
        );
        // --entrypoint '' clears it; the cmd (or args) is the command.
        assert_eq!(command_of(&ep, &cmd, Some(&[]), &[]), v(&["serve", "-v"]));
        assert_eq!(command_of(&ep, &cmd, Some(&[]), &v(&["ls"])), v(&["ls"]));
        assert!(command_of(&ep, &[], Some(&[]), &[]).is_empty());
    }
}
