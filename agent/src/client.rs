//! An async client of the agent API, for the `mig` CLI and for other Rust programs (a rebalancer,
//! tests). One [`Client`] is one connection; requests on it are sequential. A call dropped before
//! its answer was read (a `tokio::time::timeout` that fired, a `select!` that took another
//! branch) leaves that answer on the connection: the client then refuses every further call with
//! [`ClientError::OutOfStep`] rather than hand the old answer to the next one. Connect again.
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
    ApiError, CheckpointResult, ContainerDetails, ContainerSummary, ErrorKind, Event, ExecOptions,
    ExecOutput, ExecResult, ExecStream, Hello, HostInfo, ImageInfo, MoveStatus, Request, Response,
    RestoreResult, RunRequest, API_VERSION, API_VERSION_EXEC_STREAM, API_VERSION_MIN,
};
use crate::migration::{IdentityInfo, MoveResult, PeerInfo};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWrite};
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
    #[error("the agent answered API version {agent}, this client speaks versions {CLIENT_API_MIN} to {API_VERSION}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Version { agent: u32, detail: Option<String> },
    #[error("the agent did not answer the hello within {secs} s")]
    NoHello { secs: u64 },
    /// The agent refused the request (its message once: `transparent` gives no source to print
    /// again after it).
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("unexpected answer from the agent to {request}: {got}")]
    Unexpected { request: &'static str, got: String },
    #[error("this connection to the agent is out of step: an earlier request on it was dropped before its answer was read (connect again)")]
    OutOfStep,
    #[error("this connection to the agent serves only events since it subscribed to them (connect again for other requests)")]
    EventsOnly,
}

impl ClientError {
    /// The error and every cause under it, on one line (`talking to the agent failed: writing a
    /// frame failed: Broken pipe (os error 32)`). `Display` is this error's own layer only, with
    /// the cause in [`std::error::Error::source`], as the error types of Rust's libraries are:
    /// a program that logs one line per failure wants this.
    pub fn report(&self) -> String {
        report(self)
    }

    /// The API error kind, when the agent refused the request; `UnsupportedVersion` also when
    /// the client refused the agent's version ([`ClientError::Version`]).
    pub fn api_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api(e) => Some(e.kind),
            ClientError::Version { .. } => Some(ErrorKind::UnsupportedVersion),
            _ => None,
        }
    }
}

/// `e` and its sources joined with ": " (a cause repeated word for word in its parent's message
/// is not repeated).
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cur = c.source();
    }
    line
}

/// A byte stream to an agent: the unix socket, or a QUIC stream of the remote API.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// The API versions this client speaks: its hello offers the highest, the agent answers with the
/// version of the connection.
pub const CLIENT_API_MIN: u32 = API_VERSION_MIN;

/// One connection to an agent.
pub struct Client {
    stream: Box<dyn Duplex>,
    /// The agent's hello; its `api_version` is the version of this connection.
    pub agent: Hello,
    /// Keeps what the stream needs alive (the QUIC endpoint and connection of a remote client).
    _keep: Option<Box<dyn std::any::Any + Send>>,
    /// Set while an exchange is under way: still set at the next call when the last one was
    /// dropped half-way, whose answer may still come ([`ClientError::OutOfStep`]).
    open: bool,
    /// Bytes read from the stream that no response used yet ([`Client::read_response`]).
    read: Vec<u8>,
    /// Subscribed to the events: the agent answers nothing else on this connection.
    events: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("agent", &self.agent)
            .finish()
    }
}

fn exec_request(container: &str, args: Vec<String>, opts: ExecOptions) -> Request {
    Request::Exec {
        container: container.into(),
        args,
        env: opts.env,
        user: opts.user,
        workdir: opts.workdir,
        stdin: opts.stdin,
    }
}

fn unexpected(request: &'static str, got: Response) -> ClientError {
    match got {
        Response::Error(e) => ClientError::Api(e),
        other => ClientError::Unexpected {
            request,
            // As the agent sent it (JSON), not Rust's debug form.
            got: serde_json::to_string(&other)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        },
    }
}

/// How long the agent may take to answer our hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long to wait for the agent's error after a hello with a version we do not speak (an agent
/// sends it right after its hello; one that does not is not waited for).
const VERSION_ERROR_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the agent answered to our hello.
enum Handshake {
    Done(Hello),
    /// An agent that speaks only an older version than we offered (and refused ours): offer it.
    Retry(u32),
}

/// Sends our hello offering `offer` and checks the agent's answer.
async fn handshake(stream: &mut Box<dyn Duplex>, offer: u32) -> Result<Handshake, ClientError> {
    let mut hello = Hello::new("mig-client");
    hello.api_version = offer;
    write_frame(stream, &hello).await?;
    let agent: Hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(stream))
        .await
        .map_err(|_| ClientError::NoHello {
            secs: HELLO_TIMEOUT.as_secs(),
        })??;
    let v = agent.api_version;
    if (CLIENT_API_MIN..=offer).contains(&v) {
        // A version-1 agent refuses any other offer with an error frame after its hello.
        if v < offer && v == 1 {
            return Ok(Handshake::Retry(v));
        }
        return Ok(Handshake::Done(agent));
    }
    // Too old or too new for us: the agent's error (if it sent one) names both versions. An
    // agent that sends none and keeps the connection open is not waited for long.
    let detail =
        match tokio::time::timeout(VERSION_ERROR_WAIT, read_frame::<Response, _>(stream)).await {
            Ok(Ok(Response::Error(e))) => Some(e.message),
            _ => None,
        };
    Err(ClientError::Version { agent: v, detail })
}

impl Client {
    /// Connects to the agent's unix socket and exchanges hellos.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let open = || async {
            UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Duplex>)
                .map_err(|source| ClientError::Connect {
                    path: path.to_owned(),
                    source,
                })
        };
        let mut stream = open().await?;
        match handshake(&mut stream, API_VERSION).await? {
            Handshake::Done(agent) => Ok(Client::over(stream, agent, None)),
            Handshake::Retry(v) => {
                let mut stream = open().await?;
                match handshake(&mut stream, v).await? {
                    Handshake::Done(agent) => Ok(Client::over(stream, agent, None)),
                    Handshake::Retry(v) => Err(ClientError::Version {
                        agent: v,
                        detail: None,
                    }),
                }
            }
        }
    }

    /// Exchanges hellos on an already open stream (a remote client's QUIC stream, a test's
    /// socket). `keep` is held as long as the client lives.
    pub async fn handshake_on(
        stream: Box<dyn Duplex>,
        keep: Option<Box<dyn std::any::Any + Send>>,
    ) -> Result<Client, ClientError> {
        let mut stream = stream;
        match handshake(&mut stream, API_VERSION).await? {
            Handshake::Done(agent) => Ok(Client::over(stream, agent, keep)),
            Handshake::Retry(v) => Err(ClientError::Version {
                agent: v,
                detail: None,
            }),
        }
    }

    fn over(
        stream: Box<dyn Duplex>,
        agent: Hello,
        keep: Option<Box<dyn std::any::Any + Send>>,
    ) -> Client {
        Client {
            stream,
            agent,
            _keep: keep,
            open: false,
            read: Vec::new(),
            events: false,
        }
    }

    /// Reads one response frame, cancel-safe: what a dropped read got so far stays in
    /// `self.read`, and the next read goes on from it (`read_frame` reads straight from the
    /// stream, and a drop mid-frame lost the bytes it had).
    async fn read_response(&mut self) -> Result<Response, FrameError> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(head) = self.read.first_chunk::<4>() {
                let end = 4 + crate::api::frame::body_len(*head)?;
                if self.read.len() >= end {
                    let frame: Vec<u8> = self.read.drain(..end).collect();
                    return crate::api::frame::decode(&frame[4..]);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(FrameError::Read)?;
            if n == 0 {
                return Err(match self.read.is_empty() {
                    true => FrameError::Closed,
                    false => FrameError::Read(std::io::ErrorKind::UnexpectedEof.into()),
                });
            }
            self.read.extend_from_slice(&chunk[..n]);
        }
    }

    /// Starts an exchange, unless the last one was dropped before its end.
    fn begin(&mut self) -> Result<(), ClientError> {
        if self.events {
            return Err(ClientError::EventsOnly);
        }
        if self.open {
            return Err(ClientError::OutOfStep);
        }
        self.open = true;
        Ok(())
    }

    /// The API version of this connection.
    pub fn api_version(&self) -> u32 {
        self.agent.api_version
    }

    /// Sends one request and reads one response (errors are returned as [`ClientError::Api`]).
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.begin()?;
        write_frame(&mut self.stream, req).await?;
        let r = self.read_response().await?;
        self.open = false;
        match r {
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
        self.move_container_with(container, peer, false).await
    }

    /// Moves a running container to a pinned peer, keeping its established TCP connections when
    /// `tcp_established` (docs/networking.md).
    pub async fn move_container_with(
        &mut self,
        container: &str,
        peer: &str,
        tcp_established: bool,
    ) -> Result<MoveResult, ClientError> {
        self.move_container_mode(container, peer, tcp_established, None, None)
            .await
    }

    /// Moves a running container to a pinned peer in `mode` (the agent's default when `None`),
    /// refusing it (or, in mode `auto`, going post-copy) when the predicted downtime exceeds
    /// `max_downtime_ms` (docs/migration.md, "Modes").
    pub async fn move_container_mode(
        &mut self,
        container: &str,
        peer: &str,
        tcp_established: bool,
        mode: Option<crate::migration::MoveMode>,
        max_downtime_ms: Option<u64>,
    ) -> Result<MoveResult, ClientError> {
        let opts = crate::migration::modes::MoveOptions {
            mode,
            max_downtime_ms,
            no_memory_presync: false,
        };
        self.move_container_opts(container, peer, tcp_established, opts)
            .await
    }

    /// Moves a running container to a pinned peer with every option of `mig move`
    /// (`opts.no_memory_presync`: stream mode without the memory presync).
    pub async fn move_container_opts(
        &mut self,
        container: &str,
        peer: &str,
        tcp_established: bool,
        opts: crate::migration::modes::MoveOptions,
    ) -> Result<MoveResult, ClientError> {
        let req = Request::Move {
            container: container.into(),
            peer: peer.into(),
            tcp_established,
            mode: opts.mode,
            max_downtime_ms: opts.max_downtime_ms,
            no_memory_presync: opts.no_memory_presync,
        };
        match self.call(&req).await? {
            Response::Moved(r) => Ok(*r),
            r => Err(unexpected("move", r)),
        }
    }

    /// Starts a move in the background and returns its id (see [`Client::move_status`] and
    /// the event stream). API version 2.
    pub async fn move_start(&mut self, container: &str, peer: &str) -> Result<String, ClientError> {
        self.move_start_opts(container, peer, false, Default::default())
            .await
    }

    /// [`Client::move_start`] with every option of `mig move`: established TCP connections
    /// kept, the mode, the downtime limit, no memory presync.
    pub async fn move_start_opts(
        &mut self,
        container: &str,
        peer: &str,
        tcp_established: bool,
        opts: crate::migration::modes::MoveOptions,
    ) -> Result<String, ClientError> {
        let req = Request::MoveStart {
            container: container.into(),
            peer: peer.into(),
            tcp_established,
            mode: opts.mode,
            max_downtime_ms: opts.max_downtime_ms,
            no_memory_presync: opts.no_memory_presync,
        };
        match self.call(&req).await? {
            Response::MoveStarted { id } => Ok(id),
            r => Err(unexpected("move_start", r)),
        }
    }

    /// The state of a move started with [`Client::move_start`].
    pub async fn move_status(&mut self, id: &str) -> Result<MoveStatus, ClientError> {
        let req = Request::MoveStatus { id: id.into() };
        match self.call(&req).await? {
            Response::MoveStatus(s) => Ok(*s),
            r => Err(unexpected("move_status", r)),
        }
    }

    /// Waits for a move started with [`Client::move_start`] to end, polling every `every`.
    pub async fn move_wait(
        &mut self,
        id: &str,
        every: std::time::Duration,
    ) -> Result<MoveStatus, ClientError> {
        loop {
            let s = self.move_status(id).await?;
            if s.state != crate::api::MoveState::Running {
                return Ok(s);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Settles an in-doubt move (on the source agent).
    pub async fn move_resolve(&mut self, container: &str) -> Result<MoveResult, ClientError> {
        self.move_resolve_deciding(container, None).await
    }

    /// [`Client::move_resolve`] with the operator's outcome, applied where the other host
    /// cannot answer (docs/migration.md, "In doubt and `mig move --resolve`").
    pub async fn move_resolve_deciding(
        &mut self,
        container: &str,
        decide: Option<crate::api::Decision>,
    ) -> Result<MoveResult, ClientError> {
        let req = Request::MoveResolve {
            container: container.into(),
            decide,
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

    /// Pins a remote API client by its certificate fingerprint.
    pub async fn client_add(
        &mut self,
        name: &str,
        fingerprint: &str,
    ) -> Result<crate::remote::ClientInfo, ClientError> {
        let req = Request::ClientAdd {
            name: name.into(),
            fingerprint: fingerprint.into(),
        };
        match self.call(&req).await? {
            Response::Client(c) => Ok(c),
            r => Err(unexpected("client_add", r)),
        }
    }

    pub async fn client_list(&mut self) -> Result<Vec<crate::remote::ClientInfo>, ClientError> {
        match self.call(&Request::ClientList).await? {
            Response::Clients(c) => Ok(c),
            r => Err(unexpected("client_list", r)),
        }
    }

    pub async fn client_remove(
        &mut self,
        name: &str,
    ) -> Result<crate::remote::ClientInfo, ClientError> {
        let req = Request::ClientRemove { name: name.into() };
        match self.call(&req).await? {
            Response::Client(c) => Ok(c),
            r => Err(unexpected("client_remove", r)),
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
        self.begin()?;
        write_frame(&mut self.stream, &req).await?;
        loop {
            match self.read_response().await? {
                Response::LogData { data } => sink(&data),
                Response::LogEnd => {
                    self.open = false;
                    return Ok(());
                }
                // A refusal ends the exchange as its end would (QA of session 25: the next
                // call failed with OutOfStep).
                Response::Error(e) => {
                    self.open = false;
                    return Err(ClientError::Api(e));
                }
                r => return Err(unexpected("logs", r)),
            }
        }
    }

    /// Subscribes to the agent's events; read them with [`Client::next_event`]. The connection
    /// serves nothing else afterwards.
    pub async fn subscribe_events(&mut self) -> Result<(), ClientError> {
        match self.call(&Request::Events).await? {
            Response::Ok => {
                self.events = true;
                Ok(())
            }
            r => Err(unexpected("events", r)),
        }
    }

    /// The next event after [`Client::subscribe_events`].
    ///
    /// Cancel-safe: dropped before it returned (`select!` with a timer), it loses nothing; the
    /// next call goes on where it was.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if self.open {
            return Err(ClientError::OutOfStep);
        }
        match self.read_response().await? {
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
        self.exec_with(
            container,
            args,
            ExecOptions {
                env,
                ..ExecOptions::default()
            },
        )
        .await
    }

    /// `exec` with a user, a working directory or a standard input (at most
    /// [`crate::api::MAX_EXEC_STDIN`] bytes, sent whole). Agents before these options refuse a
    /// request that uses them (`invalid_argument`, naming the field). The output is decoded as
    /// UTF-8 (invalid sequences replaced); [`Client::exec_bytes`] and [`Client::exec_stream`]
    /// keep it byte for byte.
    pub async fn exec_with(
        &mut self,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
    ) -> Result<ExecResult, ClientError> {
        if self.api_version() >= API_VERSION_EXEC_STREAM {
            let o = self.exec_bytes(container, args, opts).await?;
            return Ok(ExecResult {
                code: o.code,
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                truncated: false,
            });
        }
        match self.call(&exec_request(container, args, opts)).await? {
            Response::Exec(e) => Ok(e),
            r => Err(unexpected("exec", r)),
        }
    }

    /// `exec` with its whole output kept byte for byte (from an agent of API version 4; an older
    /// agent's output is decoded as UTF-8 and capped, see [`ExecResult::truncated`]).
    pub async fn exec_bytes(
        &mut self,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
    ) -> Result<ExecOutput, ClientError> {
        let mut o = ExecOutput::default();
        o.code = self
            .exec_stream(container, args, opts, |stream, data| match stream {
                ExecStream::Stdout => o.stdout.extend_from_slice(data),
                ExecStream::Stderr => o.stderr.extend_from_slice(data),
            })
            .await?;
        Ok(o)
    }

    /// `exec`, handing each piece of output to `sink` as it arrives (byte for byte, without a
    /// cap, from an agent of API version 4; from an older agent, its one answer's `stdout` then
    /// `stderr`). Returns the command's exit code.
    pub async fn exec_stream(
        &mut self,
        container: &str,
        args: Vec<String>,
        opts: ExecOptions,
        mut sink: impl FnMut(ExecStream, &[u8]),
    ) -> Result<i32, ClientError> {
        let req = exec_request(container, args, opts);
        if self.api_version() < API_VERSION_EXEC_STREAM {
            return match self.call(&req).await? {
                Response::Exec(e) => {
                    sink(ExecStream::Stdout, e.stdout.as_bytes());
                    sink(ExecStream::Stderr, e.stderr.as_bytes());
                    Ok(e.code)
                }
                r => Err(unexpected("exec", r)),
            };
        }
        self.begin()?;
        write_frame(&mut self.stream, &req).await?;
        loop {
            match self.read_response().await? {
                Response::ExecData { stream, data } => sink(stream, &data),
                Response::ExecEnd { code } => {
                    self.open = false;
                    return Ok(code);
                }
                Response::Error(e) => {
                    self.open = false;
                    return Err(ClientError::Api(e));
                }
                r => return Err(unexpected("exec", r)),
            }
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
        self.checkpoint_with(container, leave_running, export, false)
            .await
    }

    /// Checkpoints a running container, dumping its established TCP connections when
    /// `tcp_established`.
    pub async fn checkpoint_with(
        &mut self,
        container: &str,
        leave_running: bool,
        export: Option<&str>,
        tcp_established: bool,
    ) -> Result<CheckpointResult, ClientError> {
        let req = Request::Checkpoint {
            container: container.into(),
            leave_running,
            export: export.map(Into::into),
            tcp_established,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_holds_the_cause() {
        let e = ClientError::Frame(FrameError::Write(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        )));
        assert_eq!(e.to_string(), "talking to the agent failed");
        assert_eq!(
            e.report(),
            "talking to the agent failed: writing a frame failed: broken pipe"
        );
        let api = ClientError::Api(ApiError::new(ErrorKind::NotFound, "no such container: x"));
        assert_eq!(api.report(), api.to_string());
    }

    /// A client over an in-memory stream and the agent's end of it, after the hello.
    async fn connected() -> (Client, tokio::io::DuplexStream) {
        let (mine, agent) = tokio::io::duplex(1 << 16);
        (
            Client::over(Box::new(mine), Hello::new("fake-migd"), None),
            agent,
        )
    }

    fn frame(r: &Response) -> Vec<u8> {
        let body = serde_json::to_vec(r).unwrap();
        [&(body.len() as u32).to_be_bytes()[..], &body].concat()
    }

    /// `next_event` dropped while half an event had arrived (a `select!` with a timer) loses
    /// nothing: the next call returns that event whole (QA: the bytes read were lost, and every
    /// later answer was misread).
    #[tokio::test]
    async fn a_dropped_event_read_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut c, mut agent) = connected().await;
        let ev = Response::Event(Box::new(Event {
            seq: 7,
            time_ms: 1,
            host: "host-a".into(),
            kind: crate::daemon::events::EventKind::ContainerStarted {
                id: "0".repeat(32),
                name: "web".into(),
            },
        }));
        let bytes = frame(&ev);
        agent.write_all(&bytes[..10]).await.unwrap();
        let short = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(short, c.next_event()).await.is_err());
        agent.write_all(&bytes[10..]).await.unwrap();
        let e = c.next_event().await.unwrap();
        assert_eq!(e.seq, 7);
    }

    /// A call dropped after its request went out would hand its answer to the next call: the
    /// next call is refused instead (QA: `stop` got the answer meant for an earlier `inspect`).
    #[tokio::test]
    async fn a_call_dropped_before_its_answer_puts_the_client_out_of_step() {
        let (mut c, agent) = connected().await;
        let short = std::time::Duration::from_millis(50);
        let dropped = tokio::time::timeout(short, c.call(&Request::Info)).await;
        assert!(dropped.is_err());
        let e = c.call(&Request::Info).await.unwrap_err();
        assert!(matches!(e, ClientError::OutOfStep), "{e}");
        drop(agent);
    }

    /// A refused `logs` or `exec` (no such container, an unknown user) is a whole answer: the
    /// next call goes on the same connection (QA of session 25: it failed with OutOfStep).
    #[tokio::test]
    async fn a_refused_log_or_exec_leaves_the_client_in_step() {
        use tokio::io::AsyncWriteExt;
        let (mut c, mut agent) = connected().await;
        let refusal = Response::Error(ApiError::new(ErrorKind::NotFound, "no such container: x"));
        let fake = tokio::spawn(async move {
            for answer in [&refusal, &refusal, &Response::Ok] {
                let _: Request = read_frame(&mut agent).await.unwrap();
                agent.write_all(&frame(answer)).await.unwrap();
            }
            agent
        });
        let e = c.logs("x", false, |_| {}).await.unwrap_err();
        assert!(matches!(e, ClientError::Api(_)), "{e}");
        let e = c.exec("x", vec!["true".into()], vec![]).await.unwrap_err();
        assert!(matches!(e, ClientError::Api(_)), "{e}");
        c.stop("x", 1).await.unwrap();
        drop(fake.await.unwrap());
    }

    /// Subscribed, the connection serves events only: another call fails at once instead of
    /// waiting for an answer the agent never sends (QA of session 25).
    #[tokio::test]
    async fn a_call_after_subscribing_fails_at_once() {
        use tokio::io::AsyncWriteExt;
        let (mut c, mut agent) = connected().await;
        let fake = tokio::spawn(async move {
            let _: Request = read_frame(&mut agent).await.unwrap();
            agent.write_all(&frame(&Response::Ok)).await.unwrap();
            agent
        });
        c.subscribe_events().await.unwrap();
        let e = c.call(&Request::Info).await.unwrap_err();
        assert!(matches!(e, ClientError::EventsOnly), "{e}");
        drop(fake.await.unwrap());
    }

    /// An agent that answers a version above our offer and then neither sends an error nor
    /// closes: the client gives up at once with an error naming both versions (it waited forever).
    #[tokio::test]
    async fn a_newer_agent_that_keeps_the_connection_open_is_refused_in_time() {
        let (mine, mut agent) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let _: Hello = read_frame(&mut agent).await.unwrap();
            let mut h = Hello::new("fake-migd");
            h.api_version = 99;
            write_frame(&mut agent, &h).await.unwrap();
            // Keeps the connection open.
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            drop(agent);
        });
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            Client::handshake_on(Box::new(mine), None),
        )
        .await
        .expect("the handshake hung");
        let e = r.expect_err("version 99 accepted");
        let msg = e.to_string();
        assert!(
            msg.contains("version 99")
                && msg.contains(&format!("{CLIENT_API_MIN} to {API_VERSION}")),
            "{msg}"
        );
        assert_eq!(e.api_kind(), Some(ErrorKind::UnsupportedVersion));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        fake.abort();
    }
}
