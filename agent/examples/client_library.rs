//! The client library example of docs/api.md ("Client library") run against an agent, its lines
//! as written there (checks added between them): runs a busybox container, inspects it, reads
//! its log, execs in it (as `nobody`, with a standard input), stops and removes it.
//!
//! ```text
//! MIG_SOCKET=/run/mig/lab/NAME/host-a.sock cargo run -p mig-agent --example client_library
//! ```
//!
//! Needs root (the socket is root-only) and an image named `busybox` whose /etc/passwd has
//! `nobody`. Keep it in step with docs/api.md.

use mig_agent::api::{ExecOptions, RunRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let socket = std::env::var("MIG_SOCKET").unwrap_or_else(|_| "/run/mig/migd.sock".into());
    // docs/api.md: Client::connect("/run/mig/migd.sock".as_ref()); here MIG_SOCKET's.
    let mut c = mig_agent::client::Client::connect(socket.as_ref()).await?;
    #[rustfmt::skip]
    let (id, _name) = c.run(RunRequest { image: "busybox".into(), args: vec!["sleep".into(), "100".into()], ..Default::default() }).await?;
    let details = c.inspect(&id).await?; // ContainerDetails with pid_map and usage
    println!(
        "{id}: {}, pid_map {:?}",
        details.state.as_str(),
        details.pid_map
    );
    c.logs(&id, false, |chunk| print!("{chunk}")).await?;
    let r = c.exec(&id, vec!["hostname".into()], vec![]).await?; // ExecResult { code, stdout, stderr }
    println!("hostname: {:?} (exit {})", r.stdout, r.code);
    anyhow::ensure!(r.code == 0, "hostname failed: {r:?}");
    #[rustfmt::skip]
    let opts = ExecOptions { user: Some("nobody".into()), stdin: Some(b"hi\n".to_vec()), ..Default::default() };
    let r = c.exec_with(&id, vec!["cat".into()], opts).await?; // as nobody, stdin "hi\n"
    println!("cat as nobody: {:?} (exit {})", r.stdout, r.code);
    anyhow::ensure!(r.code == 0 && r.stdout == "hi\n", "cat as nobody: {r:?}");
    c.stop(&id, 10).await?;
    c.remove(&id, false).await?;
    println!("{id} stopped and removed");
    Ok(())
}
