//! One client connection: hellos, then requests until the client hangs up or the agent shuts down.

use super::Agent;
use crate::api::frame::{read_frame, write_frame, FrameError};
use crate::api::{
    self, ApiError, ErrorKind, Hello, Request, Response, API_VERSION, API_VERSION_EXEC_STREAM,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tracing::Instrument;

/// How long a client may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve(
    agent: Arc<Agent>,
    stream: UnixStream,
    shutdown: broadcast::Receiver<()>,
) {
    // The socket is root-only (mode 0600); refuse anyone else who got hold of it anyway.
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 => {}
        Ok(c) => {
            tracing::warn!(uid = c.uid(), "refusing a connection from a non-root peer");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials");
            return;
        }
    }
    serve_authenticated(agent, stream, shutdown).await
}

/// Serves a connection whose client is already authenticated (the local socket's root peer, or a
/// remote client with a pinned certificate bridged by [`crate::remote`]).
pub(crate) async fn serve_authenticated(
    agent: Arc<Agent>,
    mut stream: UnixStream,
    mut shutdown: broadcast::Receiver<()>,
) {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame::<Hello, _>(&mut stream)).await;
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e @ FrameError::Decode { .. })) => {
            // Not a hello we can read (a version that is not a number, a missing field): say so
            // in the usual place, after our hello, instead of closing without a word.
            tracing::debug!(error = %e, "bad hello");
            let why = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let err = ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "the client's hello is not valid ({why}): expected {{\"api_version\": N, \"software\": \"...\"}} with N a whole number"
                ),
            );
            if write_frame(&mut stream, &Hello::new("migd")).await.is_ok() {
                let _ = write_frame(&mut stream, &Response::Error(err)).await;
            }
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad hello");
            return;
        }
        Err(_) => return,
    };
    // The connection speaks the highest version both sides know; the agent's hello says which.
    // A client too old gets the agent's newest version and an error naming both.
    let version = api::negotiate(hello.api_version);
    let mut mine = Hello::new("migd");
    mine.api_version = *version.as_ref().unwrap_or(&API_VERSION);
    if write_frame(&mut stream, &mine).await.is_err() {
        return;
    }
    if let Err(e) = version {
        tracing::debug!(client = %hello.software, version = hello.api_version, "refused an unsupported API version");
        let _ = write_frame(&mut stream, &Response::Error(e)).await;
        return;
    }
    loop {
        let req = tokio::select! {
            r = read_frame::<Request, _>(&mut stream) => r,
            _ = shutdown.recv() => return,
        };
        let req = match req {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(e @ FrameError::Decode { .. }) => {
                // serde's message quotes what it could not take, which may be most of the
                // request: kept short, so that the answer always fits a frame (QA of session
                // 25: a 15 MiB name came back whole, and a request near 16 MiB got no answer).
                let why: String = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let short: String = why.chars().take(512).collect();
                let more = if short.len() < why.len() { " ..." } else { "" };
                let msg = format!("the request is not one this agent knows: {short}{more}");
                let _ = write_frame(
                    &mut stream,
                    &Response::Error(ApiError::new(ErrorKind::InvalidArgument, msg)),
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection ended");
                return;
            }
        };
        let span = tracing::info_span!("request", op = op_name(&req));
        let done = async {
            match req {
                Request::Logs { container, follow } => {
                    super::logs::stream(&agent, &mut stream, &container, follow, &mut shutdown)
                        .await
                }
                Request::Events => super::events::stream(&agent, &mut stream, &mut shutdown).await,
                Request::Exec {
                    container,
                    args,
                    env,
                    user,
                    workdir,
                    stdin,
                } if mine.api_version >= API_VERSION_EXEC_STREAM => {
                    let opts = crate::api::ExecOptions {
                        env,
                        user,
                        workdir,
                        stdin,
                    };
                    super::exec::stream(&agent, &mut stream, &container, args, opts).await
                }
                req => {
                    let resp = handle(&agent, req)
                        .await
                        .unwrap_or_else(Response::Error)
                        .for_version(mine.api_version);
                    write_frame(&mut stream, &resp).await
                }
            }
        }
        .instrument(span)
        .await;
        if done.is_err() {
            return;
        }
    }
}

fn op_name(r: &Request) -> &'static str {
    match r {
        Request::Move { .. } => "move",
        Request::MoveResolve { .. } => "move_resolve",
        Request::Events => "events",
        Request::MoveStart { .. } => "move_start",
        Request::ClientAdd { .. } => "client_add",
        Request::ClientList => "client_list",
        Request::ClientRemove { .. } => "client_remove",
        Request::MoveStatus { .. } => "move_status",
        Request::PeerAdd { .. } => "peer_add",
        Request::PeerList => "peer_list",
        Request::PeerRemove { .. } => "peer_remove",
        Request::Identity => "identity",
        Request::ImageImport { .. } => "image_import",
        Request::ImageList => "image_list",
        Request::ImageRemove { .. } => "image_remove",
        Request::Run(_) => "run",
        Request::List { .. } => "list",
        Request::Inspect { .. } => "inspect",
        Request::Logs { .. } => "logs",
        Request::Exec { .. } => "exec",
        Request::Stop { .. } => "stop",
        Request::Kill { .. } => "kill",
        Request::Remove { .. } => "remove",
        Request::Info => "info",
        Request::Checkpoint { .. } => "checkpoint",
        Request::Restore { .. } => "restore",
    }
}

async fn handle(agent: &Arc<Agent>, req: Request) -> Result<Response, ApiError> {
    match req {
        Request::Move {
            container,
            peer,
            tcp_established,
            mode,
            max_downtime_ms,
            no_memory_presync,
        } => agent
            .move_container(
                &container,
                &peer,
                tcp_established,
                crate::migration::modes::MoveOptions {
                    mode,
                    max_downtime_ms,
                    no_memory_presync,
                },
            )
            .await
            .map(|r| Response::Moved(Box::new(r))),
        Request::MoveResolve { container, decide } => agent
            .resolve_move(&container, decide)
            .await
            .map(|r| Response::Moved(Box::new(r))),
        Request::PeerAdd {
            name,
            address,
            fingerprint,
        } => agent
            .peer_add(&name, &address, &fingerprint)
            .map(Response::Peer),
        Request::PeerList => agent.peer_list().map(Response::Peers),
        Request::PeerRemove { name } => agent.peer_remove(&name).map(Response::Peer),
        Request::Identity => agent.identity_info().map(Response::Identity),
        Request::ImageImport { path, name } => agent.image_import(path, name).await,
        Request::ImageList => agent.image_list().await,
        Request::ImageRemove { image } => agent.image_remove(image).await,
        Request::Run(r) => agent.run_container(r).await,
        Request::List { all } => Ok(Response::Containers(agent.list_with_usage(all))),
        Request::MoveStart {
            container,
            peer,
            tcp_established,
            mode,
            max_downtime_ms,
            no_memory_presync,
        } => agent
            .move_start(super::events::MoveStartArgs {
                container,
                peer,
                tcp_established,
                opts: crate::migration::modes::MoveOptions {
                    mode,
                    max_downtime_ms,
                    no_memory_presync,
                },
            })
            .map(|id| Response::MoveStarted { id }),
        Request::ClientAdd { name, fingerprint } => {
            agent.client_add(&name, &fingerprint).map(Response::Client)
        }
        Request::ClientList => agent.client_list().map(Response::Clients),
        Request::ClientRemove { name } => agent.client_remove(&name).map(Response::Client),
        Request::MoveStatus { id } => agent
            .move_status(&id)
            .map(|s| Response::MoveStatus(Box::new(s))),
        Request::Inspect { container } => {
            let id = agent.resolve(&container)?;
            Ok(Response::Container(Box::new(agent.inspect(&id)?)))
        }
        Request::Exec {
            container,
            args,
            env,
            user,
            workdir,
            stdin,
        } => {
            let opts = crate::api::ExecOptions {
                env,
                user,
                workdir,
                stdin,
            };
            agent.exec(&container, args, opts).await
        }
        Request::Stop {
            container,
            timeout_secs,
        } => {
            let id = agent.resolve(&container)?;
            agent
                .stop(&id, Duration::from_secs(timeout_secs.min(3600)))
                .await?;
            Ok(Response::Ok)
        }
        Request::Kill { container, signal } => {
            let id = agent.resolve(&container)?;
            agent.kill_and_wait(&id, signal).await?;
            Ok(Response::Ok)
        }
        Request::Remove { container, force } => {
            let id = agent.resolve(&container)?;
            let net = agent.entry(&id).ok().and_then(|e| e.spec.net);
            agent.remove(&id, force).await?;
            if net.is_some() {
                // Removed for good (a move's source copy goes through `remove` too, but not here).
                if let Err(e) = mig_runtime::net::ipam::release(&agent.cfg.state_dir, &id) {
                    tracing::warn!(%id, error = %e, "cannot release the container's address");
                }
            }
            Ok(Response::Ok)
        }
        Request::Info => Ok(Response::Info(agent.info().await)),
        Request::Checkpoint {
            container,
            leave_running,
            export,
            tcp_established,
        } => {
            agent
                .checkpoint(&container, leave_running, export, tcp_established)
                .await
        }
        Request::Restore {
            container,
            import,
            name,
        } => match (container, import) {
            (Some(c), None) => agent.restore_checkpointed(&c).await,
            (None, Some(file)) => agent.restore_import(file, name).await,
            _ => Err(ApiError::new(
                ErrorKind::InvalidArgument,
                "restore takes either a container or an archive to import",
            )),
        },
        Request::Logs { .. } | Request::Events => Err(ApiError::new(
            ErrorKind::Internal,
            "logs and events are streamed",
        )),
    }
}
