//! imgcache: the VM image cache of a compute host, as a library behind the `imgcache` CLI.

pub mod cache;
pub mod cli;
pub mod commands;
pub mod config;
pub mod disk;
pub mod error;
pub mod fetch;
pub mod glance;
pub mod inspect;
pub mod instance;
pub mod lock;
pub mod openstack;
pub mod progress;
pub mod qemu_img;
pub mod rbd;
pub mod scan;
pub mod size;
pub mod templates;

use anyhow::Result;

/// How a command ended when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for was done.
    Success,
    /// Some items failed; they were reported; exit with this code.
    Partial(u8),
}

/// Runs a parsed command line. `matches` (as the user gave them, before the configuration
/// file was applied) and `file` are for `config show`.
pub fn run(
    cli: cli::Cli,
    matches: &clap::ArgMatches,
    file: Option<&config::File>,
) -> Result<Outcome> {
    let reporter = progress::Terminal::new(cli.global.quiet, cli.global.verbose);
    match cli.command {
        cli::Command::Config(cli::ConfigCommand::Show { json }) => {
            commands::config::show(matches, file, json)
        }
        cli::Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = cli::Cli::command();
            clap_complete::generate(shell, &mut cmd, "imgcache", &mut std::io::stdout());
            Ok(Outcome::Success)
        }
        cli::Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(cli::Cli::command()).render(&mut std::io::stdout())?;
            Ok(Outcome::Success)
        }
        cli::Command::Fetch(args) => commands::fetch::run(&cli.global, args, &reporter),
        cli::Command::Create(args) => commands::create::run(&cli.global, *args, &reporter),
        cli::Command::Delete(args) => commands::delete::run(&cli.global, args, &reporter),
        cli::Command::Prune(args) => commands::prune::run(&cli.global, args, &reporter),
        cli::Command::List(args) => commands::list::run(&cli.global, args),
        cli::Command::Inspect(args) => commands::inspect::run(args),
        cli::Command::Verify(args) => commands::verify::run(&cli.global, args, &reporter),
    }
}
