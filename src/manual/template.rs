//! The configuration file template (`imgcache config template`, shipped by the Debian package as
//! /etc/imgcache/imgcache.toml): every key `config` accepts, commented out at its default, with
//! one line saying what it does. Made from [`crate::config::KEYS`] and the clap options, so it
//! cannot drift from what the file may hold.

use crate::cli::help;
use crate::config::{DEFAULT_PATH, KEYS};

/// The template, as TOML text.
pub fn render() -> String {
    let cmd = help::command();
    let mut out = format!(
        "# {DEFAULT_PATH}: settings for every imgcache command\n\
         # (this is `imgcache config template`). Keys are the long option names with _ for -;\n\
         # each applies to the commands that have that option. Every key is commented out at its\n\
         # default: uncomment a line to change it. Precedence: command line > environment > this\n\
         # file > defaults; `imgcache config show` prints each effective value and its source.\n\
         # Secrets (tokens, passwords) are refused here: keep them in the environment or in\n\
         # clouds.yaml/secure.yaml.\n"
    );
    for key in KEYS {
        let id = if *key == "force_raw" {
            "no_force_raw"
        } else {
            key
        };
        let Some(arg) = cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
            .find(|a| a.get_id() == id)
        else {
            continue;
        };
        out.push('\n');
        out.push_str(&format!("# {}\n", explanation(key, arg)));
        out.push_str(&format!("#{key} = {}\n", value(key, arg)));
    }
    out
}

/// The option's help on one line, then its flag and variable.
fn explanation(key: &str, arg: &clap::Arg) -> String {
    let help = if key == "force_raw" {
        "Convert non-raw images (qcow2, vmdk, ...) to raw; false keeps them as they are.".to_owned()
    } else {
        let text = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.ends_with('.') {
            text
        } else {
            format!("{text}.")
        }
    };
    let long = arg.get_long().unwrap_or(key);
    let mut from = format!("--{long}");
    if let Some(env) = arg.get_env() {
        from.push_str(&format!(", {}", env.to_string_lossy()));
    }
    let none = if takes_value(arg) && arg.get_default_values().is_empty() {
        " Default: none."
    } else {
        ""
    };
    format!("{help}{none} ({from})")
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.takes_values())
}

/// The default as a TOML value, or a placeholder named after the option's value.
fn value(key: &str, arg: &clap::Arg) -> String {
    if key == "force_raw" {
        return "true".into();
    }
    if !takes_value(arg) {
        return "false".into();
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    match defaults.first() {
        Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => d.clone(),
        Some(d) => toml::Value::String(d.clone()).to_string(),
        None => {
            let name = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| "VALUE".to_owned(), |n| n.to_string());
            toml::Value::String(format!("<{name}>")).to_string()
        }
    }
}
