//! imgcache: the VM image cache of a compute host, as a library behind the `imgcache` CLI.
//!
//! The modules stand on five floors; each imports only from floors below it
//! (docs/ARCHITECTURE.md):
//! 5 interface (`cli`, `config`, `manual`, this file's [`run`]), 4 `commands`, 3 domain (`cache`,
//! `instance`, `scan`, `templates`, `disk`, `fetch`, `configdrive`), 2 adapters (`inspect`,
//! `qcow2_read`, `qcow2_write`, `qemu_img`, `rbd`, `glance`, `barbican`, `openstack`, `fsimage`), 1 ground (`error`, `units`,
//! `digest`, `fsutil`, `process`, `lock`, `progress`, `http`, `signature`).

pub mod barbican;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod config;
pub mod configdrive;
pub mod digest;
pub mod disk;
pub mod error;
pub mod fetch;
pub mod fsimage;
pub mod fsutil;
pub mod glance;
pub mod http;
pub mod inspect;
pub mod instance;
pub mod lock;
pub mod manual;
pub mod openstack;
pub mod process;
pub mod progress;
pub mod qcow2_read;
pub mod qcow2_write;
pub mod qemu_img;
pub mod rbd;
pub mod scan;
pub mod signature;
pub mod templates;
pub mod units;

use crate::cli::settings;
use crate::commands::Outcome;
use anyhow::Result;

/// Runs a parsed command line. `matches` (as the user gave them, before the configuration
/// file was applied) and `file` are for `config show`.
pub fn run(
    cli: cli::Cli,
    matches: &clap::ArgMatches,
    file: Option<&config::File>,
) -> Result<Outcome> {
    let rep = progress::Terminal::new(cli.global.quiet, cli.global.verbose);
    if cli.global.verbose > 1 && !cli.global.quiet {
        // -vv: every HTTP request and its answer (Keystone, the record, the data), never a secret.
        http::set_trace(Box::new(|line| eprintln!("imgcache: {line}")));
    }
    let g = &cli.global;
    match cli.command {
        cli::Command::Config(cli::ConfigCommand::Show { json }) => {
            commands::config::show(&config::effective(matches, file), json)
        }
        cli::Command::Config(cli::ConfigCommand::Template) => {
            progress::print_bytes(manual::template::render().as_bytes())?;
            Ok(Outcome::Success)
        }
        cli::Command::Completions { shell } => {
            // Rendered in memory first: a closed stdout is then an error we handle, not a
            // panic inside the generator.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli::command(), "imgcache", &mut script);
            progress::print_bytes(&script)?;
            Ok(Outcome::Success)
        }
        cli::Command::Man(args) => {
            let text = match &args.out_dir {
                Some(dir) => manual::write_all(dir)?
                    .iter()
                    .map(|p| format!("{}\n", p.display()))
                    .collect(),
                None => manual::page(&args.command)?.roff,
            };
            progress::print_bytes(text.as_bytes())?;
            Ok(Outcome::Success)
        }
        cli::Command::Fetch(args) => commands::fetch::run(settings::fetch(g, args)?, &rep),
        cli::Command::Create(args) => commands::create::run(settings::create(g, *args)?, &rep),
        cli::Command::Delete(args) => commands::delete::run(settings::delete(g, args)?, &rep),
        cli::Command::Prune(args) => commands::prune::run(settings::prune(g, args)?, &rep),
        cli::Command::List(args) => commands::list::run(settings::list(g, args)?),
        cli::Command::Inspect(args) => commands::inspect::run(settings::inspect(args)?),
        cli::Command::Verify(args) => commands::verify::run(settings::verify(g, args)?, &rep),
    }
}
