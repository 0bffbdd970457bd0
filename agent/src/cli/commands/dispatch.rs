//! Running a parsed `mig` command: the dispatch to each command's code, and the commands done
//! here (`ps`, `inspect`, `logs`, `exec`, `stop`, `kill`, `rm`, `checkpoint`, `restore`, `image`).

use super::run::{older_agent, run};
use super::{chained, connect, json, out, CliError};
use crate::api::{ExecOptions, MAX_EXEC_STDIN};
use crate::cli::output;
use crate::cli::{Cli, Command, ImageCommand, EXIT_MIG_ERROR};
use crate::client::{Client, ClientError};
use std::io::Write;
use std::path::Path;

/// The exit code of a command killed by SIGKILL (128 + 9), as a container's leaving ends it.
const KILLED: i32 = 137;

pub(super) async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    match &cli.command {
        Command::Completions { shell } => {
            out(&String::from_utf8_lossy(&crate::cli::completion::script(
                *shell,
            )))?;
            return Ok(0);
        }
        Command::Man => {
            let buf = crate::cli::man::render(
                crate::cli::command(),
                crate::cli::man::MIG_NAME_LINE,
                Some(crate::cli::man::MIG_DESCRIPTION),
                "1",
            )
            .map_err(CliError::Output)?;
            out(&String::from_utf8_lossy(&buf))?;
            return Ok(0);
        }
        _ => {}
    }
    if let Command::Bench(crate::bench::BenchCommand::Move(args)) = cli.command {
        crate::bench::run(args)
            .await
            .map_err(|e| CliError::Bench(Box::new(e)))?;
        return Ok(0);
    }
    if let Command::Drain(a) = &cli.command {
        return crate::cli::drain::drain(&cli, a).await;
    }
    if let Some(code) = crate::cli::moves::dispatch(&cli).await? {
        return Ok(code);
    }
    if let Some(code) = crate::cli::events::dispatch(&cli).await? {
        return Ok(code);
    }
    if let Command::Logs {
        follow: true,
        tail,
        container,
    } = &cli.command
    {
        return crate::cli::logs::follow(&cli, container, *tail).await;
    }
    if let Command::Exec { tty: true, .. } = &cli.command {
        return Err(CliError::NoTty);
    }
    if let Command::Run(r) = &cli.command {
        if r.interactive || r.tty {
            return Err(CliError::RunNoTty);
        }
    }
    // A command that the container's leaving kills (a move, a checkpoint, a stop) ends with a
    // line that says so: watched from before it starts.
    let exec_watch = match &cli.command {
        Command::Exec { container, .. } => {
            crate::cli::logs::ExecWatch::start(&cli, container).await
        }
        _ => None,
    };
    let mut c = connect(&cli).await?;
    // An attached run follows its container's log, across moves too.
    let follow = match &cli.command {
        Command::Run(r) if !r.detach => Some(crate::cli::logs::Agent {
            logs: connect(&cli).await?,
            events: connect(&cli).await?,
            check: connect(&cli).await?,
        }),
        _ => None,
    };
    match cli.command {
        Command::Image(ic) => image(&mut c, ic).await.map(|_| 0),
        Command::Run(r) => run(&mut c, r, follow).await,
        Command::Ps {
            all,
            quiet,
            json: j,
        } => {
            let list = c.list(all).await?;
            if j {
                json(&list)?;
            } else if quiet {
                out(&output::ps_ids(&list))?;
            } else {
                out(&output::ps_table(&list))?;
            }
            Ok(0)
        }
        Command::Inspect {
            containers,
            json: j,
        } => {
            if let [container] = containers.as_slice() {
                let d = c.inspect(container).await?;
                if j {
                    json(&d)?;
                } else {
                    out(&output::inspect_text(&d))?;
                }
                return Ok(0);
            }
            // Several, as podman takes them (QA of session 30, F4): those found, then a line
            // for each one that could not be inspected.
            let (mut found, mut failed) = (Vec::new(), Vec::new());
            for n in &containers {
                match c.inspect(n).await {
                    Ok(d) => found.push(d),
                    Err(e) => failed.push(failure_line(n, &e)),
                }
            }
            if j {
                json(&found)?;
            } else {
                let texts: Vec<String> = found.iter().map(output::inspect_text).collect();
                out(&texts.join("\n"))?;
            }
            for line in &failed {
                eprintln!("{line}");
            }
            Ok(if failed.is_empty() { 0 } else { EXIT_MIG_ERROR })
        }
        // With --follow it went to logs::follow above.
        Command::Logs {
            tail: Some(n),
            container,
            ..
        } => {
            let log = crate::cli::logs::read_all(&mut c, &container).await?;
            out(&log[crate::cli::logs::tail_start(&log, n)..]).map(|_| 0)
        }
        Command::Logs {
            follow,
            tail: None,
            container,
        } => {
            let mut err = None;
            c.logs(&container, follow, |data| {
                if err.is_none() {
                    err = out(data).err();
                }
            })
            .await?;
            err.map_or(Ok(0), Err)
        }
        Command::Exec {
            env,
            user,
            workdir,
            interactive,
            tty: _,
            container,
            command,
        } => {
            let stdin = if interactive {
                Some(read_stdin()?)
            } else {
                None
            };
            let opts = ExecOptions {
                env,
                user,
                workdir,
                stdin,
            };
            // Byte for byte as it comes (API version 4; an older agent's output is one piece).
            let mut failed = None;
            let code = c
                .exec_stream(&container, command, opts, |stream, data| {
                    if stream == crate::api::ExecStream::Stderr {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(data);
                    } else if failed.is_none() {
                        let mut o = std::io::stdout().lock();
                        failed = o.write_all(data).and_then(|()| o.flush()).err();
                    }
                })
                .await
                .map_err(older_agent)?;
            if let Some(e) = failed {
                return Err(CliError::Output(e));
            }
            if code == KILLED {
                if let Some(why) = match exec_watch {
                    Some(w) => w.why_killed().await,
                    None => None,
                } {
                    eprintln!(
                        "mig: {container} {why} while the command ran; the command was killed with it"
                    );
                }
            }
            Ok(u8::try_from(code).unwrap_or(EXIT_MIG_ERROR))
        }
        Command::Stop { time, containers } => {
            let mut results = Vec::new();
            for n in containers {
                let r = c.stop(&n, time).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Kill { signal, containers } => {
            let sig = parse_signal(&signal)?;
            let mut results = Vec::new();
            for n in containers {
                let r = c.kill(&n, sig).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Rm { force, containers } => {
            let mut results = Vec::new();
            for n in containers {
                let r = c.remove(&n, force).await;
                results.push((n, r));
            }
            finish(results)
        }
        Command::Checkpoint {
            leave_running,
            export,
            tcp_established,
            json: j,
            container,
        } => {
            let export = export.map(|p| absolute(&p)).transpose()?;
            let r = c
                .checkpoint_with(
                    &container,
                    leave_running,
                    export.as_deref(),
                    tcp_established,
                )
                .await?;
            if j {
                json(&r)?;
            } else {
                out(&format!(
                    "{}: checkpointed in {} ms (freeze {} ms, dump {} ms), {} in {}{}\n",
                    container,
                    r.total_ms,
                    r.freeze_ms,
                    r.dump_ms,
                    output::human_size(r.image_bytes),
                    r.images_dir,
                    if r.leave_running {
                        ", still running"
                    } else {
                        ""
                    }
                ))?;
            }
            Ok(0)
        }
        Command::Restore {
            import,
            name,
            json: j,
            container,
        } => {
            let r = match (import, container) {
                (Some(file), _) => {
                    let file = std::fs::canonicalize(&file).map_err(|source| CliError::Path {
                        path: file.clone(),
                        source,
                    })?;
                    c.restore_import(&file.to_string_lossy(), name.as_deref())
                        .await?
                }
                (None, Some(ct)) => c.restore(&ct).await?,
                (None, None) => return Err(CliError::NothingToRestore),
            };
            let container = r.name.clone();
            if j {
                json(&r)?;
            } else {
                out(&format!(
                    "{}: restored in {} ms, init host pid {}\n",
                    container, r.total_ms, r.init_pid
                ))?;
            }
            Ok(0)
        }
        Command::Info { json: j } => {
            let i = c.info().await?;
            // The migration identity, when the agent runs its endpoint.
            let id = c.identity().await.ok();
            if j {
                let mut v = serde_json::to_value(&i).unwrap_or_default();
                if let (Some(id), Some(o)) = (&id, v.as_object_mut()) {
                    o.insert("fingerprint".into(), id.fingerprint.clone().into());
                    o.insert("listen".into(), id.listen.clone().into());
                }
                json(&v)?;
            } else {
                out(&output::info_text(&i))?;
                if let Some(id) = id {
                    out(&format!(
                        "fingerprint: {}\nlisten:      {}\n",
                        id.fingerprint,
                        id.listen.as_deref().unwrap_or("-")
                    ))?;
                }
            }
            Ok(0)
        }
        Command::Completions { .. } | Command::Man => Ok(0),
        Command::Move(_) | Command::Peers(_) | Command::Lab(_) | Command::Bench(_) => Ok(0),
        Command::Events(_) | Command::Drain(_) => Ok(0),
        Command::Clients(_) | Command::Rebalance(_) => Ok(0),
    }
}

/// `exec -i`: this command's standard input, whole (at most [`MAX_EXEC_STDIN`] bytes).
fn read_stdin() -> Result<Vec<u8>, CliError> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("mig: reading the standard input to its end (Ctrl-D), then running the command");
    }
    let mut data = Vec::new();
    stdin
        .lock()
        .take(MAX_EXEC_STDIN as u64 + 1)
        .read_to_end(&mut data)
        .map_err(CliError::Stdin)?;
    if data.len() > MAX_EXEC_STDIN {
        return Err(CliError::StdinTooLarge);
    }
    Ok(data)
}

/// Prints each name that succeeded on stdout and one `mig:` line per failure on stderr (as
/// podman does), nothing more: exit 125 when any failed.
fn finish(results: Vec<(String, Result<(), ClientError>)>) -> Result<u8, CliError> {
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(()) => out(&format!("{name}\n"))?,
            Err(e) => failed.push(failure_line(&name, &e)),
        }
    }
    for line in &failed {
        eprintln!("{line}");
    }
    Ok(if failed.is_empty() { 0 } else { EXIT_MIG_ERROR })
}

/// One target's failure: the agent's message, which names the container ("no such container:
/// x", "container x is running: ..."), prefixed with the name only when it does not (it said
/// "mig: x: no such container: x", and a summary line "mig: 1 of 2 operations failed" after).
fn failure_line(name: &str, e: &ClientError) -> String {
    let msg = chained(e);
    if msg.contains(name) {
        format!("mig: {msg}")
    } else {
        format!("mig: {name}: {msg}")
    }
}

fn parse_signal(s: &str) -> Result<i32, CliError> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| CliError::Signal(s.to_owned()))
}

async fn image(c: &mut Client, cmd: ImageCommand) -> Result<(), CliError> {
    match cmd {
        ImageCommand::Import {
            path,
            name,
            json: j,
        } => {
            let abs = std::fs::canonicalize(&path).map_err(|source| CliError::Path {
                path: path.clone(),
                source,
            })?;
            let name = name.unwrap_or_else(|| default_image_name(&abs));
            let img = c.image_import(&abs.to_string_lossy(), &name).await?;
            if j {
                json(&img)
            } else {
                out(&format!("{}\n", img.id))
            }
        }
        ImageCommand::Ls { quiet, json: j } => {
            let list = c.image_list().await?;
            if j {
                json(&list)
            } else if quiet {
                out(&output::image_ids(&list))
            } else {
                out(&output::images_table(&list))
            }
        }
        ImageCommand::Rm { images } => {
            for i in images {
                let img = c.image_remove(&i).await?;
                out(&format!("{}\n", img.id))?;
            }
            Ok(())
        }
    }
}

/// An absolute form of `p` (relative to the current directory; the file need not exist).
fn absolute(p: &Path) -> Result<String, CliError> {
    let abs = if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|source| CliError::Path {
                path: p.to_owned(),
                source,
            })?
            .join(p)
    };
    Ok(abs.to_string_lossy().into_owned())
}

/// `busybox-rootfs.tar.gz` -> `busybox-rootfs`.
fn default_image_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name = file.as_str();
    for ext in [".gz", ".zst", ".zstd", ".tgz", ".tar", ".oci"] {
        name = name.strip_suffix(ext).unwrap_or(name);
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "image".into()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::commands::strip_ansi;
    /// REPORT #5 of session 16: `mig rm a1 nosuch` printed "mig: nosuch: no such container:
    /// nosuch" and then "mig: 1 of 2 operations failed".
    #[test]
    fn each_failed_target_is_one_line_naming_it_once() {
        use crate::api::{ApiError, ErrorKind};
        let api = |kind, m: &str| ClientError::Api(ApiError::new(kind, m));
        assert_eq!(
            failure_line(
                "nosuch",
                &api(ErrorKind::NotFound, "no such container: nosuch")
            ),
            "mig: no such container: nosuch"
        );
        assert_eq!(
            failure_line(
                "s1",
                &api(
                    ErrorKind::Conflict,
                    "container s1 is running: stop it first or use -f"
                )
            ),
            "mig: container s1 is running: stop it first or use -f"
        );
        assert_eq!(
            failure_line("web", &api(ErrorKind::Internal, "the agent failed\nbadly")),
            "mig: web: the agent failed badly"
        );
    }

    #[test]
    fn names_and_signals() {
        assert_eq!(
            default_image_name(Path::new("/tmp/busybox-rootfs.tar.gz")),
            "busybox-rootfs"
        );
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("10").unwrap(), 10);
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(strip_ansi("\x1b[1merror:\x1b[0m x"), "error: x");
    }
}
