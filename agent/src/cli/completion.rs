//! `mig completions SHELL`: the shell's completion script, offering what `--help` shows.
//!
//! clap_complete (4.6) writes every argument and subcommand of the command it is given into its
//! scripts, hidden ones included (it leaves out only hidden possible values), so `mig lab up
//! --<TAB>` offered the client options [`super::command`] hides there. clap has no way to remove
//! an argument from a command, so the scripts are made from a copy of the built command that
//! holds only the visible ones ([`visible`]).

/// The completion script of `shell` for `mig`.
pub(super) fn script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = visible(&super::command());
    // Into a buffer: clap_complete panics on a write error (a closed pipe).
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "mig", &mut buf);
    buf
}

/// A copy of the built command `cmd` without its hidden arguments and subcommands, with what
/// the completion scripts read of it: names, about texts, version, visible aliases and the
/// arguments themselves (value names, hints and possible values travel with them).
///
/// The copy takes the built command's arguments as they are, `--help`, `--version` and the
/// `help` subcommand included, so it turns clap's own off; and none of its arguments is global:
/// the built command already holds every global argument's copy where it applies, and a global
/// one would be copied again into the subcommands it was hidden from. Groups keep their visible
/// members. An argument that names a dropped one in `requires` or `conflicts_with` would fail
/// clap's checks in debug builds (tested below); the only hidden ones, the client options, name
/// only each other.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_owned())
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true)
        .allow_external_subcommands(cmd.is_allow_external_subcommands_set())
        .visible_aliases(
            cmd.get_visible_aliases()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_owned());
    }
    if let Some(v) = cmd.get_long_version() {
        out = out.long_version(v.to_owned());
    }
    let args: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .map(|a| a.clone().global(false))
        .collect();
    for g in cmd.get_groups() {
        let members: Vec<_> = g
            .get_args()
            .filter(|id| args.iter().any(|a| a.get_id() == *id))
            .cloned()
            .collect();
        if !members.is_empty() {
            out = out.group(
                clap::ArgGroup::new(g.get_id().clone())
                    .args(members)
                    .multiple(g.clone().is_multiple())
                    .required(g.is_required_set()),
            );
        }
    }
    out.args(args).subcommands(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(visible),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    /// The `opts` line bash's script offers for the command `path` (as the script names it,
    /// e.g. `mig__subcmd__lab__subcmd__up`).
    fn bash_opts(script: &str, path: &str) -> String {
        let case = format!("        {path})\n");
        let at = script
            .find(&case)
            .unwrap_or_else(|| panic!("no {path} in the script"));
        let line = script[at..]
            .lines()
            .find(|l| l.trim_start().starts_with("opts=\""))
            .unwrap();
        line.to_owned()
    }

    #[test]
    fn completions_offer_what_help_shows() {
        let bash = String::from_utf8(script(Shell::Bash)).unwrap();
        let client = [
            "--socket",
            "--host",
            "--remote",
            "--fingerprint",
            "--identity",
        ];
        // Hidden in lab and bench (and below): not offered there.
        for path in [
            "mig__subcmd__lab",
            "mig__subcmd__lab__subcmd__up",
            "mig__subcmd__lab__subcmd__restart",
            "mig__subcmd__bench__subcmd__move",
        ] {
            let opts = bash_opts(&bash, path);
            for o in client {
                assert!(
                    !opts.contains(&format!(" {o} ")),
                    "{path} offers {o}: {opts}"
                );
            }
            assert!(opts.contains(" --help "), "{path} lacks --help: {opts}");
        }
        let up = bash_opts(&bash, "mig__subcmd__lab__subcmd__up");
        assert!(
            up.contains(" --hosts ") && up.contains(" --subnet "),
            "{up}"
        );
        // Visible everywhere else.
        for path in ["mig", "mig__subcmd__run", "mig__subcmd__peers__subcmd__ls"] {
            let opts = bash_opts(&bash, path);
            for o in client {
                assert!(opts.contains(&format!(" {o} ")), "{path} lacks {o}: {opts}");
            }
        }
        assert!(bash_opts(&bash, "mig__subcmd__run").contains(" --memory "));

        // The other shells: generated (no clap check fails) and without the hidden options.
        let fish = String::from_utf8(script(Shell::Fish)).unwrap();
        assert!(fish.contains("__fish_mig_using_subcommand run\" -l host "));
        assert!(!fish
            .lines()
            .any(|l| l.contains("using_subcommand lab") && l.contains("-l host ")));
        let zsh = String::from_utf8(script(Shell::Zsh)).unwrap();
        assert!(zsh.contains("'--host=[Talk to the agent"));
        for shell in [Shell::Elvish, Shell::PowerShell] {
            assert!(!script(shell).is_empty());
        }
    }

    /// The copy leaves out exactly what is hidden: every command has the visible arguments and
    /// subcommands of the original, no more, no less.
    #[test]
    fn the_copy_keeps_every_visible_argument_and_subcommand() {
        fn compare(orig: &clap::Command, copy: &clap::Command, path: &str) {
            let ids = |c: &clap::Command, all: bool| {
                c.get_arguments()
                    .filter(|a| all || !a.is_hide_set())
                    .map(|a| a.get_id().to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(orig, false), ids(copy, true), "{path}");
            let subs = |c: &clap::Command, all: bool| {
                c.get_subcommands()
                    .filter(|s| all || !s.is_hide_set())
                    .map(|s| s.get_name().to_owned())
                    .collect::<Vec<_>>()
            };
            assert_eq!(subs(orig, false), subs(copy, true), "{path}");
            for s in copy.get_subcommands() {
                let o = orig.find_subcommand(s.get_name()).unwrap();
                compare(o, s, &format!("{path} {}", s.get_name()));
            }
        }
        let orig = crate::cli::command();
        let mut copy = visible(&orig);
        copy.build();
        compare(&orig, &copy, "mig");
    }
}
