//! The `imgcache` binary: parse arguments (with the configuration file's values for what the
//! command line and environment left unset), run, turn the outcome into an exit code.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::FromArgMatches;
use imgcache::cli::Cli;
use imgcache::commands::{Outcome, kind_of};
use imgcache::config;
use imgcache::error::chain;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let matches = match imgcache::cli::command().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => return clap_exit(&e),
    };
    let file = match config::locate(config::explicit_path(&argv)) {
        None => None,
        Some((path, explicit)) if !explicit && !path.is_file() => None,
        Some((path, _)) => match config::load(&path) {
            Ok(f) => Some(f),
            Err(e) => return fail(&e),
        },
    };
    // `config show` reports sources, so it gets the matches from before the file was applied.
    let original = matches.clone();
    let matches = match &file {
        None => matches,
        Some(f) => {
            let injected = match config::inject(&argv, &matches, f) {
                Ok(a) => a,
                Err(e) => return fail(&e.into()),
            };
            match imgcache::cli::command().try_get_matches_from(&injected) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("imgcache: (with settings from {})", f.path.display());
                    return clap_exit(&e);
                }
            }
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_exit(&e),
    };
    match imgcache::run(cli, &original, file.as_ref()) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Partial(code)) => ExitCode::from(code),
        Err(e) => fail(&e),
    }
}

/// clap prints help/version to stdout with code 0 and usage errors with code 2.
fn clap_exit(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
}

fn fail(e: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(e) {
        return ExitCode::SUCCESS;
    }
    let kind = kind_of(e);
    let mut msg = chain(e);
    // Every command gives the same hint a read-only or unwritable cache needs, whichever file
    // it was writing when it found out.
    if kind == imgcache::error::Kind::NotWritable && !msg.contains("permission") {
        msg.push_str(
            "; check that the instances path is writable by this user and its filesystem is not read-only",
        );
    }
    eprintln!("imgcache: {msg}");
    ExitCode::from(kind.exit_code())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}
