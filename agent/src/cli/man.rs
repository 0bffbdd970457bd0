//! The man pages of `mig` (section 1) and `migd` (section 8): one page each, every subcommand
//! in it. clap_mangen's page listed the subcommands as `mig-run(1)`... pages that do not exist
//! (the package installs mig.1 and migd.8 only), and its NAME line was the crate's description.

/// `mig`'s NAME line, after `mig - `.
pub const MIG_NAME_LINE: &str = "run and move Linux containers";

/// `mig`'s DESCRIPTION (its help has the NAME line only).
pub const MIG_DESCRIPTION: &str = "mig is the command line client of migd, the per-host agent: \
it runs containers from images, checkpoints and restores them, and moves running containers \
between hosts.

It talks to one agent: --remote, else --socket, else --host (a lab host), else \
/run/mig/migd.sock. An option given on the command line wins over the variables of the others \
(MIG_REMOTE, MIG_SOCKET, MIG_HOST).

Exit codes: 0 on success; 125 for mig's own errors, with one line on stderr per failure; the \
command's code for exec and for run without -d (127 when the command is not in the container, \
126 when it cannot be executed).";

/// The roff page of `cmd` (a built command, as [`super::command`] returns it), with `name_line`
/// after `NAME - `, `description` (paragraphs; default: the command's long help) and, for a
/// command with subcommands, a COMMANDS section: for each subcommand
/// (nested ones too, `mig image ls`), its description, synopsis and options. The global options
/// are in the page's OPTIONS only.
pub fn render(
    cmd: clap::Command,
    name_line: &str,
    description: Option<&str>,
    section: &str,
) -> std::io::Result<Vec<u8>> {
    let description = description
        .map(str::to_owned)
        .or_else(|| cmd.get_long_about().map(|a| a.to_string()));
    let mut cmd = cmd.about(name_line.to_owned());
    if let Some(d) = description {
        cmd = cmd.long_about(d);
    }
    cmd.build();
    let globals: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.get_id().clone())
        .collect();
    let man = clap_mangen::Man::new(cmd.clone()).section(section);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if cmd.has_subcommands() {
        out.extend_from_slice(b".SH COMMANDS\n");
        for sub in cmd.get_subcommands() {
            subcommand(&mut out, sub, &globals, section)?;
        }
    }
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// One subcommand's part of the COMMANDS section, then its own subcommands'.
fn subcommand(
    out: &mut Vec<u8>,
    sub: &clap::Command,
    globals: &[clap::Id],
    section: &str,
) -> std::io::Result<()> {
    if sub.is_hide_set() || sub.get_name() == "help" {
        return Ok(());
    }
    let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_owned();
    // Global options, -h and -V are said once, in the page's OPTIONS.
    let own = sub.clone().mut_args(|a| {
        let repeated =
            globals.contains(a.get_id()) || a.get_id() == "help" || a.get_id() == "version";
        a.hide(repeated)
    });
    let man = clap_mangen::Man::new(own.clone()).section(section);
    out.extend_from_slice(format!(".SS \"{}\"\n", escape(&name)).as_bytes());
    if let Some(about) = sub.get_long_about().or(sub.get_about()) {
        for para in about.to_string().split("\n\n") {
            out.extend_from_slice(format!(".PP\n{}\n", escape(para)).as_bytes());
        }
    }
    let mut part = Vec::new();
    man.render_synopsis_section(&mut part)?;
    out.extend_from_slice(&without_heading(&part));
    if own.get_arguments().any(|a| !a.is_hide_set()) {
        let mut part = Vec::new();
        man.render_options_section(&mut part)?;
        out.extend_from_slice(&without_heading(&part));
    }
    for s in sub.get_subcommands() {
        subcommand(out, s, globals, section)?;
    }
    Ok(())
}

/// A section clap_mangen rendered, without its `.SH` heading line (the subcommand's `.SS`
/// heads it), starting a new paragraph.
fn without_heading(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with(".SH ")).collect();
    let mut s = String::from(".PP\n");
    for l in body {
        s.push_str(l);
        s.push('\n');
    }
    s.into_bytes()
}

/// Text for a roff line: backslashes escaped, and a leading `.` or `'` kept as text.
fn escape(text: &str) -> String {
    let s = text.replace('\\', "\\e").replace('\n', " ");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        let page = render(
            super::super::command(),
            MIG_NAME_LINE,
            Some(MIG_DESCRIPTION),
            "1",
        );
        String::from_utf8(page.unwrap()).unwrap()
    }

    /// REPORT #10 of session 16: the NAME line was agent/Cargo.toml's description, and SEE
    /// ALSO-like entries named mig-run(1), mig-move(1)... which no package installs.
    #[test]
    fn the_page_names_mig_and_holds_every_subcommand() {
        let p = page();
        assert!(
            p.contains(".SH NAME\nmig \\- run and move Linux containers\n"),
            "{}",
            &p[..p.len().min(600)]
        );
        assert!(!p.contains("per-container shim"), "crate description");
        assert!(
            !p.contains("mig-run(1)") && !p.contains("(1)\n"),
            "missing pages named"
        );
        for sub in [
            "mig run",
            "mig move",
            "mig drain",
            "mig image ls",
            "mig peers add",
            "mig lab up",
            "mig exec",
            "mig events",
        ] {
            assert!(p.contains(&format!(".SS \"{sub}\"\n")), "{sub} missing");
        }
        // A subcommand's own options are in its part, the global ones once.
        let run = &p[p.find(".SS \"mig run\"").unwrap()..];
        let run = &run[..run[4..].find(".SS ").unwrap()];
        assert!(run.contains("\\-\\-memory"), "{run}");
        assert!(!run.contains("\\-\\-socket"), "{run}");
        assert!(!run.contains("\\-\\-version"), "{run}");
        assert!(
            p.contains(".SH DESCRIPTION\nmig is the command line client"),
            "description"
        );
        assert_eq!(
            p.matches("\\fB\\-\\-socket\\fR").count(),
            2,
            "synopsis + options"
        );
    }

    #[test]
    fn help_says_what_mig_is() {
        let mut cmd = super::super::command();
        let help = cmd.render_help().to_string();
        assert!(
            help.starts_with("Run and move Linux containers\n"),
            "{help}"
        );
    }

    #[test]
    fn roff_text_is_escaped() {
        assert_eq!(escape(".hidden \\x"), "\\&.hidden \\ex");
    }
}
