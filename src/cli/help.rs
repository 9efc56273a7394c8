//! The clap command as it is shown and parsed: each subcommand's own options first, the global
//! ones that matter to it under "Global options" (the cache location hidden where no cache is
//! used), the exit codes each command can end with, and usage lines that do not depend on what
//! was typed (or injected from the configuration file).

use clap::CommandFactory;

use super::Cli;
use crate::error::EXIT_CODES_HELP;

/// Heading of the options every command shares.
pub const GLOBAL_HEADING: &str = "Global options";

/// The global options that only commands working on a cache use.
const CACHE_OPTIONS: &[&str] = &["instances_path", "base_dir_name"];

/// Subcommands that never touch a cache: `--instances-path` and `--base-dir-name` are hidden
/// from their help (still accepted, so a shared command line or alias keeps working).
pub const NO_CACHE: &[&str] = &["inspect", "completions", "man", "config template"];

/// The exit codes each command can end with (docs/usage.md has the meaning of each). A command
/// not listed shows none in its help, and 0, 1 and 2 on its man page.
pub const EXIT_CODES: &[(&str, &[u8])] = &[
    (
        "fetch",
        &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 17],
    ),
    (
        "create",
        &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17],
    ),
    ("delete", &[0, 1, 2, 7, 8, 11, 14, 15]),
    ("prune", &[0, 1, 2, 7, 9, 11, 13, 14, 15, 18]),
    ("list", &[0, 1, 2, 15, 18]),
    ("verify", &[0, 1, 2, 6, 8, 9, 14, 15, 18]),
    ("inspect", &[0, 1, 2, 5, 11]),
];

/// The command-line interface: [`Cli`]'s clap command, built, with the adjustments above. Use it
/// wherever arguments are parsed or help, completions and man pages are made.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(&name, |sub| adjust(sub, &name));
    }
    let usage = bare_usage(&mut cmd);
    cmd.override_usage(usage)
}

/// The usage line of a command as nothing given yet: `imgcache fetch [OPTIONS] <ID>...`.
fn bare_usage(cmd: &mut clap::Command) -> String {
    let usage = cmd.render_usage().to_string();
    usage.trim_start_matches("Usage:").trim().to_owned()
}

/// One subcommand: hidden cache options, its exit codes, a fixed usage line.
fn adjust(mut sub: clap::Command, name: &str) -> clap::Command {
    if NO_CACHE.contains(&name) {
        sub = hide_cache_options(sub);
    }
    if let Some(codes) = codes_of(name) {
        sub = sub.after_help(exit_codes_help(codes, name == "fetch"));
    }
    // clap's usage in an error lists the options that were given (the configuration file's
    // included), which makes optional flags look required: `imgcache fetch --glance-url <URL>
    // --instances-path <DIR> <ID>...`. The usage of the bare command never does.
    let usage = bare_usage(&mut sub);
    let children: Vec<String> = sub
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for child in children {
        let no_cache = NO_CACHE.contains(&format!("{name} {child}").as_str());
        sub = sub.mut_subcommand(&child, |mut c| {
            if no_cache {
                c = hide_cache_options(c);
            }
            let usage = bare_usage(&mut c);
            c.override_usage(usage)
        });
    }
    sub.override_usage(usage)
}

/// Hides `--instances-path` and `--base-dir-name` from a command's help, man page and
/// completions.
fn hide_cache_options(cmd: clap::Command) -> clap::Command {
    // `mut_args` changes the arguments in place; `mut_arg` would move one to the end of a built
    // command and leave clap's index of them stale.
    cmd.mut_args(|a| {
        if CACHE_OPTIONS.contains(&a.get_id().as_str()) {
            a.hide(true)
        } else {
            a
        }
    })
}

/// The exit codes a subcommand can end with, if it has a list.
pub fn codes_of(name: &str) -> Option<&'static [u8]> {
    EXIT_CODES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Every exit code with its one-line meaning, from the table in `imgcache --help`.
pub fn exit_codes() -> Vec<(u8, &'static str)> {
    EXIT_CODES_HELP
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (code, text) = l.split_once(' ')?;
            Some((code.parse().ok()?, text.trim()))
        })
        .collect()
}

/// The note under the table (several image ids).
pub fn exit_codes_note() -> &'static str {
    EXIT_CODES_HELP.lines().last().unwrap_or_default()
}

/// The "Exit codes:" block of one subcommand's help; `note`: with the line on several ids.
fn exit_codes_help(codes: &[u8], note: bool) -> String {
    let mut out = String::from("Exit codes:\n");
    for (code, text) in exit_codes() {
        if codes.contains(&code) {
            out.push_str(&format!("  {code:<3} {text}\n"));
        }
    }
    if note {
        out.push_str(exit_codes_note());
        out.push('\n');
    }
    out.push_str("All exit codes: imgcache --help, or man imgcache.");
    out
}
