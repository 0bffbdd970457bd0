//! `mig run`: the request from its options, the start, the attached run (the container's log
//! followed until it ends) and the exit code of a command that could not run.

use super::{interrupted, json, out, CliError};
use crate::api::RunRequest;
use crate::cli::{RunArgs, EXIT_MIG_ERROR};
use crate::client::{Client, ClientError};
use mig_runtime::spec::Limits;

/// An agent older than `run`/`exec`'s newer options refuses a request that uses one, naming
/// the field it does not know (serde's "unknown field" message): say which option that is.
pub(crate) fn older_agent(e: ClientError) -> CliError {
    if let ClientError::Api(a) = &e {
        if a.kind == crate::api::ErrorKind::InvalidArgument {
            for (field, option) in [
                ("user", "--user"),
                ("workdir", "--workdir"),
                ("entrypoint", "--entrypoint"),
                ("stdin", "exec -i"),
                ("decide", "move --decide"),
            ] {
                if a.message.contains(&format!("unknown field `{field}`")) {
                    return CliError::OlderAgent { option, source: e };
                }
            }
        }
    }
    CliError::Client(e)
}

/// The exit code a shell gives when `run`'s command could not be executed: 127 when it is not
/// in the image, 126 when it cannot be executed. The agent reports this as a failed start
/// (kind `internal` up to API 3) whose message ends with the shim's words (agent/src/shim/
/// start.rs `spawn_failure`): "starting container N failed: starting the init: the command
/// \"x\" is not in the image (searched PATH ...)" or "... the command \"x\" cannot be executed:
/// ...". Matched on those words, whatever the kind, until the API carries the failure as data.
fn command_not_run(e: &ClientError) -> Option<u8> {
    let ClientError::Api(a) = e else { return None };
    let (_, tail) = a
        .message
        .split_once(": starting the init: the command \"")?;
    // The command's name is a Rust debug string: skip it to its closing quote.
    let mut escaped = false;
    let end = tail.char_indices().find_map(|(i, ch)| {
        let close = ch == '"' && !escaped;
        escaped = ch == '\\' && !escaped;
        close.then_some(i)
    })?;
    let rest = &tail[end + 1..];
    if rest.starts_with(" is not in the image") {
        Some(127)
    } else if rest.starts_with(" cannot be executed") {
        Some(126)
    } else {
        None
    }
}

/// `mig run`; attached (`follow`: the connections to follow its log, also across moves), it
/// waits for the container's end wherever it moved in the lab, and `--rm` removes it there.
pub(super) async fn run(
    c: &mut Client,
    r: RunArgs,
    follow: Option<crate::cli::logs::Agent>,
) -> Result<u8, CliError> {
    if r.rm && r.detach {
        return Err(CliError::RmDetached);
    }
    let bundle = match &r.bundle {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .map_err(|source| CliError::Path {
                    path: dir.clone(),
                    source,
                })?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let req = RunRequest {
        image: r.image.unwrap_or_default(),
        bundle,
        name: r.name,
        hostname: r.hostname,
        args: r.command,
        env: r.env,
        limits: Limits {
            memory: r.memory,
            cpu_millis: r.cpus,
            pids: r.pids,
        },
        userns: r.userns,
        net: r.net.map(Into::into),
        ip: r.ip,
        user: r.user,
        workdir: r.workdir,
        entrypoint: r.entrypoint.map(|e| e.0),
    };
    let rm = r.rm;
    let started = c.run(req).await;
    if let (true, Err(e)) = (rm, &started) {
        // The agent keeps a container that failed to start (for inspect); --rm removes it.
        if let Some(failed) = failed_start(e) {
            let _ = c.remove(failed, true).await;
        }
    }
    let (id, name) = started.map_err(|e| match command_not_run(&e) {
        Some(code) => CliError::CommandNotRun { code, source: e },
        None => older_agent(e),
    })?;
    // (The caller makes the connections for an attached run only.)
    let Some(agent) = follow.filter(|_| !r.detach) else {
        if r.json {
            json(&serde_json::json!({ "id": id, "name": name }))?;
        } else {
            out(&format!("{id}\n"))?;
        }
        return Ok(0);
    };
    // Ctrl-C detaches this command; the container runs on (podman would pass the signal to
    // it): say so rather than die of the signal with nothing said.
    let followed = tokio::select! {
        r = crate::cli::logs::follow_on(agent, &name, None) => r?,
        () = interrupted() => return Err(CliError::RunDetached { name, rm }),
    };
    // A container moved while attached ends on the host it moved to (QA of session 24: the
    // exit code was lost and --rm not applied there).
    let mut there;
    let c = match followed {
        crate::cli::logs::Followed::Here => c,
        crate::cli::logs::Followed::There { check } => {
            there = check;
            &mut there
        }
        crate::cli::logs::Followed::Away => return Ok(EXIT_MIG_ERROR),
    };
    let d = c.inspect(&id).await?;
    // The command's own output says why it failed; an OOM kill or the agent's reason (post-copy
    // failed...) would otherwise be only an exit status of 137 (QA: `run --rm --memory 64M`
    // of a JVM ended with nothing said).
    if let Some(why) = ended_why(&d) {
        eprintln!("mig: container {name} {why}");
    }
    if rm {
        if let Err(e) = c.remove(&id, false).await {
            eprintln!("mig: removing container {name} (--rm) failed: {e}");
        }
    }
    Ok(d.exit_code
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(EXIT_MIG_ERROR))
}

/// Why an attached container ended, when it was not the command's own doing: an OOM kill, or a
/// reason the agent recorded; `None` for an exit or a signal the user sent.
fn ended_why(d: &crate::api::ContainerDetails) -> Option<String> {
    if d.oom_killed {
        let why = match (&d.reason, d.limits.memory) {
            (Some(r), _) => r.strip_prefix("oom-killed: ").unwrap_or(r).to_owned(),
            (None, Some(m)) => format!("the container exceeded its memory limit ({m} bytes)"),
            (None, None) => "out of memory".to_owned(),
        };
        return Some(format!("was killed by the kernel's OOM killer: {why}"));
    }
    d.reason
        .as_ref()
        .filter(|_| d.signal.is_some())
        .map(|r| format!("was killed: {r}"))
}

/// The name of the container a failed `run` left behind: the agent's "starting container NAME
/// failed: ..." is said only once the container exists (a taken name or a missing image fail
/// before, with other words).
fn failed_start(e: &ClientError) -> Option<&str> {
    let ClientError::Api(a) = e else { return None };
    let rest = a.message.strip_prefix("starting container ")?;
    rest.split_once(" failed: ").map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn an_older_agent_refusing_a_new_field_names_the_option() {
        use crate::api::{ApiError, ErrorKind};
        let refused = |m: &str| ClientError::Api(ApiError::new(ErrorKind::InvalidArgument, m));
        let e = older_agent(refused(
            "cannot decode the frame: unknown field `stdin`, expected one of `container`, `args`, `env`",
        ));
        assert!(
            matches!(
                e,
                CliError::OlderAgent {
                    option: "exec -i",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("older"), "{e}");
        let e = older_agent(refused("unknown field `workdir`, expected ..."));
        assert!(matches!(
            e,
            CliError::OlderAgent {
                option: "--workdir",
                ..
            }
        ));
        assert!(matches!(
            older_agent(refused("invalid user \"\"")),
            CliError::Client(_)
        ));
    }

    /// REPORT #4 of session 16: `mig run IMAGE -- nosuchcmd` exited 125 where `mig exec` and
    /// podman give 127 (126 for a file that cannot be executed). The messages are the agent's
    /// as a client receives them.
    #[test]
    fn a_run_command_that_cannot_run_exits_as_a_shell_would() {
        use crate::api::{ApiError, ErrorKind};
        let api = |kind, m: &str| ClientError::Api(ApiError::new(kind, m));
        for (kind, message, want) in [
            (
                ErrorKind::Internal,
                "starting container a3 failed: starting the init: the command \"nosuchcmd\" is not in the image (searched PATH /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)",
                Some(127),
            ),
            (
                ErrorKind::Internal,
                "starting container a4 failed: starting the init: the command \"/opt/app\" is not in the image",
                Some(127),
            ),
            (
                ErrorKind::InvalidArgument,
                "starting container a5 failed: starting the init: the command \"/etc/passwd\" cannot be executed: container setup failed at step executing the command (pid 7): EACCES: Permission denied",
                Some(126),
            ),
            // A quote in the name does not end it early.
            (
                ErrorKind::Internal,
                r#"starting container q failed: starting the init: the command "a\" is not in the image b" cannot be executed: EACCES"#,
                Some(126),
            ),
            (
                ErrorKind::Internal,
                "starting container a6 failed: mounting the root filesystem: the command \"x\" is not in the image",
                None,
            ),
            (ErrorKind::NotFound, "no such image: busybx", None),
        ] {
            assert_eq!(command_not_run(&api(kind, message)), want, "{message}");
        }
        let e = CliError::CommandNotRun {
            code: 127,
            source: api(ErrorKind::Internal, "starting container a3 failed: x"),
        };
        assert_eq!(e.exit_code(), 127);
        assert_eq!(e.to_string(), "starting container a3 failed: x");
        assert_eq!(CliError::NoMigd.exit_code(), EXIT_MIG_ERROR);
        // The container a failed start left, for run --rm.
        let started = api(
            ErrorKind::Internal,
            "starting container c-1f2e failed: starting the init: x",
        );
        assert_eq!(failed_start(&started), Some("c-1f2e"));
        let taken = api(ErrorKind::AlreadyExists, "the name web is already in use");
        assert_eq!(failed_start(&taken), None);
    }
}
