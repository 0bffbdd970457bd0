//! Is a container live on a peer? Asked before a `--net bridge` checkpoint is restored
//! (protocol 1.7, `Message::Locate`): a copy frozen in a move answers no ARP probe, so the
//! address check alone let a second copy start while the first was frozen, and the move then
//! committed it too (QA of session 25, F17).

use super::chain;
use crate::daemon::Agent;
use mig_migrate::protocol::Role;
use mig_migrate::transport::{self, Located};
use mig_migrate::wire::{DestView, Resolution};
use std::sync::Arc;
use std::time::Duration;

/// How long one peer has to answer (connection included). A peer that cannot answer in time is
/// not waited for: the address probe still covers a copy that runs.
const ASK_LIMIT: Duration = Duration::from_secs(3);

/// What the pinned peers said about a container.
#[derive(Debug, Default)]
pub(crate) struct PeerAnswers {
    /// (peer, the container's state there) for each peer that holds it live.
    pub held: Vec<(String, String)>,
    /// (peer, why) for each peer that could not be asked.
    pub unasked: Vec<(String, String)>,
    /// Peers older than protocol 1.7, which cannot say (`Located::CannotTell`).
    pub too_old: Vec<String>,
}

impl Agent {
    /// Container `id`'s state here in words when this agent holds it live (running, frozen,
    /// moving away, arriving, in doubt), else `None`: the answer to a peer's `Locate`. It reads
    /// the journal directory and every container's records, so on a worker of a multi-threaded
    /// runtime (migd's) it runs as blocking code ([`tokio::task::block_in_place`]: the driver's
    /// `DestHost::locate` is synchronous), and the other tasks of that worker move elsewhere
    /// meanwhile (review of session 26, F9: it blocked the worker that drives the connection).
    pub(crate) fn held_live(&self, id: &str) -> Option<String> {
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_threaded {
            tokio::task::block_in_place(|| self.held_live_now(id))
        } else {
            self.held_live_now(id)
        }
    }

    fn held_live_now(&self, id: &str) -> Option<String> {
        let journals = self.journals();
        let open = |role: Role| {
            journals.iter().find(|j| {
                j.container_id == id && j.role == role && !super::journal::is_final(&j.state)
            })
        };
        if let Some(d) = crate::daemon::info::in_doubt(&journals).remove(id) {
            return Some(format!(
                "frozen, its move {} with {} in doubt",
                d.migration_id, d.peer
            ));
        }
        if let Some(j) = open(Role::Dest) {
            return Some(format!(
                "arriving from {}, migration {}",
                j.peer, j.migration_id
            ));
        }
        let e = self.lock().get(id).cloned()?;
        if let Some(m) = crate::daemon::info::moving(&journals, &e, id) {
            return Some(format!(
                "being moved to {}, migration {}",
                m.peer, m.migration_id
            ));
        }
        if open(Role::Source).is_some() || e.state.state.is_live() {
            return Some(e.state.state.as_str().to_owned());
        }
        None
    }

    /// Asks pinned peer `peer` whether it holds container `id` live (`Err` says why it could
    /// not be asked).
    pub(crate) async fn ask_peer_about(
        self: &Arc<Self>,
        peer: &str,
        id: &str,
    ) -> Result<Located, String> {
        let (net, peer) = self.pinned_peer(peer)?;
        ask(net, super::hello(self), peer, id.to_owned()).await.1
    }

    /// Asks pinned peer `peer`, as a destination, how migration `migration_id` stands there:
    /// its view and the outcome it answers from its journal, within [`ASK_LIMIT`] (the
    /// connection included). A question that changes nothing there.
    pub(crate) async fn ask_peer_resolution(
        self: &Arc<Self>,
        peer: &str,
        migration_id: &str,
    ) -> Result<(DestView, Resolution), String> {
        let (net, peer) = self.pinned_peer(peer)?;
        let hello = super::hello(self);
        asked(&net.endpoint, &net.identity, &peer, |conn| async move {
            transport::ask_resolution(&conn, &hello, migration_id, ASK_LIMIT).await
        })
        .await
    }

    /// The migration endpoint and pinned peer `peer` (`Err` says why there is none).
    fn pinned_peer(&self, peer: &str) -> Result<(&super::Net, transport::Peer), String> {
        let net = self
            .migration
            .net()
            .ok_or("the migration endpoint is not running")?;
        let peer = net
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
            .ok_or_else(|| format!("{peer} is not a pinned peer"))?;
        Ok((net, peer))
    }

    /// Asks every pinned peer, at once, whether it holds container `id` live.
    pub(crate) async fn ask_peers_about(self: &Arc<Self>, id: &str) -> PeerAnswers {
        let Some(net) = self.migration.net() else {
            return PeerAnswers::default();
        };
        let peers = net
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list()
            .to_vec();
        let hello = super::hello(self);
        let mut asks = tokio::task::JoinSet::new();
        for peer in peers {
            asks.spawn(ask(net, hello.clone(), peer, id.to_owned()));
        }
        let mut answers = PeerAnswers::default();
        while let Some(done) = asks.join_next().await {
            let Ok((peer, r)) = done else { continue };
            match r {
                Ok(Located::Held(state)) => answers.held.push((peer, state)),
                Ok(Located::NotHeld) => {}
                Ok(Located::CannotTell) => answers.too_old.push(peer),
                Err(why) => answers.unasked.push((peer, why)),
            }
        }
        answers.held.sort();
        answers.unasked.sort();
        answers.too_old.sort();
        answers
    }
}

/// Asks `peer` about container `id` within [`ASK_LIMIT`], the connection included; returns the
/// peer's name with the answer.
fn ask(
    net: &super::Net,
    hello: mig_migrate::wire::Hello,
    peer: mig_migrate::transport::Peer,
    id: String,
) -> impl std::future::Future<Output = (String, Result<Located, String>)> + Send + 'static {
    let (endpoint, identity) = (net.endpoint.clone(), net.identity.clone());
    async move {
        let r = asked(&endpoint, &identity, &peer, |conn| async move {
            transport::locate(&conn, &hello, &id, ASK_LIMIT).await
        })
        .await;
        (peer.name, r)
    }
}

/// Connects to `peer`, asks `question` on the connection and closes it, all within
/// [`ASK_LIMIT`]; `Err` says why there is no answer.
async fn asked<T, Q>(
    endpoint: &quinn::Endpoint,
    identity: &transport::Identity,
    peer: &transport::Peer,
    question: impl FnOnce(quinn::Connection) -> Q,
) -> Result<T, String>
where
    Q: std::future::Future<Output = Result<T, transport::DriverError>>,
{
    let asking = async {
        let conn = transport::connect(endpoint, identity, peer)
            .await
            .map_err(|e| chain(&e))?;
        let r = question(conn.clone()).await;
        conn.close(0u32.into(), b"done");
        r.map_err(|e| chain(&e))
    };
    tokio::time::timeout(ASK_LIMIT, asking)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ASK_LIMIT:?}")))
}
