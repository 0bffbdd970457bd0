//! An async client of the agent API, for the `mig` CLI and for other Rust programs (a rebalancer,
//! tests). One [`Client`] is one connection; requests on it are sequential.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mig_agent::client::ClientError> {
//! let mut c = mig_agent::client::Client::connect("/run/mig/migd.sock".as_ref()).await?;
//! for ct in c.list(true).await? {
//!     println!("{} {}", ct.name, ct.state.as_str());
//! }
//! # Ok(()) }
//! ```

use crate::api::frame::{read_frame, write_frame, FrameError};
use crate::api::{
    ApiError, CheckpointResult, ContainerDetails, ContainerSummary, ErrorKind, Event, ExecResult,
    Hello, HostInfo, ImageInfo, Request, Response, RestoreResult, RunRequest, API_VERSION,
};
use crate::migration::{IdentityInfo, MoveResult, PeerInfo};
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent failed")]
    Frame(#[from] FrameError),
    #[error("the agent speaks API version {agent}, this client speaks {API_VERSION}")]
    Version { agent: u32 },
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("unexpected answer from the agent to {request}: {got}")]
    Unexpected { request: &'static str, got: String },
}

impl ClientError {
    /// The API error kind, when the agent refused the request.
    pub fn api_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api(e) => Some(e.kind),
            _ => None,
        }
    }
}

/// One connection to an agent.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// The agent's hello.
    pub agent: Hello,
}

fn unexpected(request: &'static str, got: Response) -> ClientError {
    match got {
        Response::Error(e) => ClientError::Api(e),
        other => ClientError::Unexpected {
            request,
            got: format!("{other:?}").chars().take(200).collect(),
        },
    }
}

impl Client {
    /// Connects to the agent's unix socket and exchanges hellos.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: path.to_owned(),
                    source,
                })?;
        write_frame(&mut stream, &Hello::new("mig-client")).await?;
        let agent: Hello = read_frame(&mut stream).await?;
        if agent.api_version != API_VERSION {
            return Err(ClientError::Version {
                agent: agent.api_version,
            });
        }
        Ok(Client { stream, agent })
    }

    /// Sends one request and reads one response (errors are returned as [`ClientError::Api`]).
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        write_frame(&mut self.stream, req).await?;
        match read_frame(&mut self.stream).await? {
            Response::Error(e) => Err(ClientError::Api(e)),
            r => Ok(r),
        }
    }

    /// Moves a running container to a pinned peer (live migration).
    pub async fn move_container(
        &mut self,
        container: &str,
        peer: &str,
    ) -> Result<MoveResult, ClientError> {
        let req = Request::Move {
            container: container.into(),
            peer: peer.into(),
        };
        match self.call(&req).await? {
            Response::Moved(r) => Ok(*r),
            r => Err(unexpected("move", r)),
        }
    }

    /// Settles an in-doubt move (on the source agent).
    pub async fn move_resolve(&mut self, container: &str) -> Result<MoveResult, ClientError> {
        let req = Request::MoveResolve {
            container: container.into(),
        };
        match self.call(&req).await? {
            Response::Moved(r) => Ok(*r),
            r => Err(unexpected("move_resolve", r)),
        }
    }

    pub async fn peer_add(
        &mut self,
        name: &str,
        address: &str,
        fingerprint: &str,
    ) -> Result<PeerInfo, ClientError> {
        let req = Request::PeerAdd {
            name: name.into(),
            address: address.into(),
            fingerprint: fingerprint.into(),
        };
        match self.call(&req).await? {
            Response::Peer(p) => Ok(p),
            r => Err(unexpected("peer_add", r)),
        }
    }

    pub async fn peer_list(&mut self) -> Result<Vec<PeerInfo>, ClientError> {
        match self.call(&Request::PeerList).await? {
            Response::Peers(p) => Ok(p),
            r => Err(unexpected("peer_list", r)),
        }
    }

    pub async fn peer_remove(&mut self, name: &str) -> Result<PeerInfo, ClientError> {
        let req = Request::PeerRemove { name: name.into() };
        match self.call(&req).await? {
            Response::Peer(p) => Ok(p),
            r => Err(unexpected("peer_remove", r)),
        }
    }

    /// The agent's migration identity (fingerprint and QUIC address).
    pub async fn identity(&mut self) -> Result<IdentityInfo, ClientError> {
        match self.call(&Request::Identity).await? {
            Response::Identity(i) => Ok(i),
            r => Err(unexpected("identity", r)),
        }
    }

    pub async fn image_import(&mut self, path: &str, name: &str) -> Result<ImageInfo, ClientError> {
        let req = Request::ImageImport {
            path: path.into(),
            name: name.into(),
        };
        match self.call(&req).await? {
            Response::Image(i) => Ok(i),
            r => Err(unexpected("image_import", r)),
        }
    }

    pub async fn image_list(&mut self) -> Result<Vec<ImageInfo>, ClientError> {
        match self.call(&Request::ImageList).await? {
            Response::Images(i) => Ok(i),
            r => Err(unexpected("image_list", r)),
        }
    }

    pub async fn image_remove(&mut self, image: &str) -> Result<ImageInfo, ClientError> {
        let req = Request::ImageRemove {
            image: image.into(),
        };
        match self.call(&req).await? {
            Response::Image(i) => Ok(i),
            r => Err(unexpected("image_remove", r)),
        }
    }

    /// Creates and starts a container; returns its id and name.
    pub async fn run(&mut self, req: RunRequest) -> Result<(String, String), ClientError> {
        match self.call(&Request::Run(req)).await? {
            Response::Created { id, name } => Ok((id, name)),
            r => Err(unexpected("run", r)),
        }
    }

    pub async fn list(&mut self, all: bool) -> Result<Vec<ContainerSummary>, ClientError> {
        match self.call(&Request::List { all }).await? {
            Response::Containers(c) => Ok(c),
            r => Err(unexpected("list", r)),
        }
    }

    pub async fn inspect(&mut self, container: &str) -> Result<ContainerDetails, ClientError> {
        let req = Request::Inspect {
            container: container.into(),
        };
        match self.call(&req).await? {
            Response::Container(c) => Ok(*c),
            r => Err(unexpected("inspect", r)),
        }
    }

    /// Streams the container's log to `sink` (each piece as it arrives); with `follow`, until the
    /// container has exited and its log is drained.
    pub async fn logs(
        &mut self,
        container: &str,
        follow: bool,
        mut sink: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        let req = Request::Logs {
            container: container.into(),
            follow,
        };
        write_frame(&mut self.stream, &req).await?;
        loop {
            match read_frame(&mut self.stream).await? {
                Response::LogData { data } => sink(&data),
                Response::LogEnd => return Ok(()),
                r => return Err(unexpected("logs", r)),
            }
        }
    }

    /// Subscribes to the agent's events; read them with [`Client::next_event`]. The connection
    /// serves nothing else afterwards.
    pub async fn subscribe_events(&mut self) -> Result<(), ClientError> {
        match self.call(&Request::Events).await? {
            Response::Ok => Ok(()),
            r => Err(unexpected("events", r)),
        }
    }

    /// The next event after [`Client::subscribe_events`].
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        match read_frame(&mut self.stream).await? {
            Response::Event(e) => Ok(*e),
            r => Err(unexpected("events", r)),
        }
    }

    pub async fn exec(
        &mut self,
        container: &str,
        args: Vec<String>,
        env: Vec<String>,
    ) -> Result<ExecResult, ClientError> {
        let req = Request::Exec {
            container: container.into(),
            args,
            env,
        };
        match self.call(&req).await? {
            Response::Exec(e) => Ok(e),
            r => Err(unexpected("exec", r)),
        }
    }

    pub async fn stop(&mut self, container: &str, timeout_secs: u64) -> Result<(), ClientError> {
        let req = Request::Stop {
            container: container.into(),
            timeout_secs,
        };
        self.expect_ok("stop", &req).await
    }

    pub async fn kill(&mut self, container: &str, signal: i32) -> Result<(), ClientError> {
        let req = Request::Kill {
            container: container.into(),
            signal,
        };
        self.expect_ok("kill", &req).await
    }

    pub async fn remove(&mut self, container: &str, force: bool) -> Result<(), ClientError> {
        let req = Request::Remove {
            container: container.into(),
            force,
        };
        self.expect_ok("remove", &req).await
    }

    pub async fn info(&mut self) -> Result<HostInfo, ClientError> {
        match self.call(&Request::Info).await? {
            Response::Info(i) => Ok(i),
            r => Err(unexpected("info", r)),
        }
    }

    /// Checkpoints a running container (it ends unless `leave_running`).
    pub async fn checkpoint(
        &mut self,
        container: &str,
        leave_running: bool,
        export: Option<&str>,
    ) -> Result<CheckpointResult, ClientError> {
        let req = Request::Checkpoint {
            container: container.into(),
            leave_running,
            export: export.map(Into::into),
        };
        match self.call(&req).await? {
            Response::Checkpointed(r) => Ok(*r),
            r => Err(unexpected("checkpoint", r)),
        }
    }

    /// Restores a checkpointed container.
    pub async fn restore(&mut self, container: &str) -> Result<RestoreResult, ClientError> {
        let req = Request::Restore {
            container: Some(container.into()),
            import: None,
            name: None,
        };
        match self.call(&req).await? {
            Response::Restored(r) => Ok(*r),
            r => Err(unexpected("restore", r)),
        }
    }

    /// Creates a container from an exported archive (a path on the agent's host) and restores it.
    pub async fn restore_import(
        &mut self,
        file: &str,
        name: Option<&str>,
    ) -> Result<RestoreResult, ClientError> {
        let req = Request::Restore {
            container: None,
            import: Some(file.into()),
            name: name.map(Into::into),
        };
        match self.call(&req).await? {
            Response::Restored(r) => Ok(*r),
            r => Err(unexpected("restore", r)),
        }
    }

    async fn expect_ok(&mut self, what: &'static str, req: &Request) -> Result<(), ClientError> {
        match self.call(req).await? {
            Response::Ok => Ok(()),
            r => Err(unexpected(what, r)),
        }
    }
}
