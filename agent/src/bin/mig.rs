//! `mig`: the command line client of the mig agent.

fn main() -> std::process::ExitCode {
    mig_agent::cli::main()
}
