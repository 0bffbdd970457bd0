//! A client of the agent API: lists the hosts of a lab (or one agent socket) with their memory use
//! and containers, then moves a container to another host and follows the move through its
//! status and the event stream.
//!
//! ```text
//! cargo run -p mig-agent --example list_and_move                  # list the hosts of MIG_LAB's lab
//! cargo run -p mig-agent --example list_and_move -- web host-b    # ...and move `web` to host-b
//! MIG_SOCKET=/run/mig/migd.sock cargo run -p mig-agent --example list_and_move
//! ```
//!
//! Run as root (the agent sockets are root-only). Remote agents work the same way through
//! `mig_agent::remote::connect(addr, fingerprint, &identity)`.

use mig_agent::api::MoveState;
use mig_agent::client::Client;
use std::path::PathBuf;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sockets: Vec<PathBuf> = match std::env::var_os("MIG_SOCKET") {
        Some(s) => vec![PathBuf::from(s)],
        None => mig_agent::lab::status(&mig_agent::lab::lab_name_from_env())?
            .into_iter()
            .map(|h| h.socket)
            .collect(),
    };
    let mut source = None;
    for socket in &sockets {
        let mut c = Client::connect(socket).await?;
        let info = c.info().await?;
        println!(
            "{} (api {}): {} cpus, memory {} MiB used of {}, containers use {} MiB",
            info.name,
            c.api_version(),
            info.cpus,
            info.memory_used_bytes >> 20,
            info.memory_total_bytes >> 20,
            info.containers_memory_bytes >> 20
        );
        for ct in c.list(false).await? {
            let mem = ct.usage.as_ref().map_or(0, |u| u.memory_bytes);
            println!("  {} {} {} KiB", ct.name, ct.state.as_str(), mem >> 10);
            if args.first() == Some(&ct.name) {
                source = Some(socket.clone());
            }
        }
    }
    let (Some(container), Some(peer)) = (args.first(), args.get(1)) else {
        return Ok(());
    };
    let Some(socket) = source else {
        anyhow::bail!("no running container named {container}");
    };
    let mut events = Client::connect(&socket).await?;
    events.subscribe_events().await?;
    let mut c = Client::connect(&socket).await?;
    let id = c.move_start(container, peer).await?;
    println!("move {id} started");
    let watch = tokio::spawn(async move {
        while let Ok(e) = events.next_event().await {
            println!("  event: {}", serde_json::to_string(&e).unwrap_or_default());
        }
    });
    let status = c.move_wait(&id, Duration::from_millis(100)).await?;
    watch.abort();
    match status.state {
        MoveState::Committed => {
            let r = status.result.as_deref();
            println!(
                "moved {container} to {peer}: downtime {} ms, total {} ms",
                r.map_or(0, |r| r.downtime_ms),
                r.map_or(0, |r| r.total_ms)
            );
        }
        state => anyhow::bail!(
            "the move of {container} to {peer} ended {state:?}: {}",
            status.error.map(|e| e.message).unwrap_or_default()
        ),
    }
    Ok(())
}
