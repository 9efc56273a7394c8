//! Command-line types (clap derive) and the parsers for their values. Validation that needs
//! more than one flag happens in the commands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::EXIT_CODES_HELP;

/// Keeps the VM image cache of a compute host: verified, locked, atomic downloads of Glance
/// images into `<instances_path>/_base`, converted to raw, in Nova's layout.
#[derive(Debug, Parser)]
#[command(name = "imgcache", version, after_help = EXIT_CODES_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command shares.
#[derive(Debug, Args)]
pub struct Global {
    /// The directory holding instance directories, `_base` and `locks`.
    #[arg(
        long,
        global = true,
        env = "IMGCACHE_INSTANCES_PATH",
        default_value = "/var/lib/imgcache/instances",
        value_name = "DIR"
    )]
    pub instances_path: PathBuf,

    /// Name of the image cache directory inside the instances path (Nova's
    /// `[image_cache] subdirectory_name`).
    #[arg(long, global = true, default_value = "_base", value_name = "NAME")]
    pub base_dir_name: String,

    /// Print nothing but warnings and errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More detail on stderr (-v). Secrets are never printed.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download Glance images into the cache, verified and converted to raw.
    ///
    /// Prints `<id> <absolute base path>` per image on stdout (or JSON with --json).
    #[command(after_help = EXIT_CODES_HELP)]
    Fetch(FetchArgs),
}

/// How to reach Glance.
#[derive(Debug, Args, Clone)]
pub struct GlanceArgs {
    /// Glance endpoint, e.g. http://controller:9292 (with or without /v2).
    #[arg(long, env = "OS_IMAGE_URL", value_name = "URL")]
    pub glance_url: Option<String>,

    /// Keystone token sent as X-Auth-Token. Never printed.
    #[arg(
        long,
        env = "OS_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// PEM file with the CA certificate(s) that sign Glance's TLS certificate.
    #[arg(long, env = "OS_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Do not verify Glance's TLS certificate (unsafe; for lab setups).
    #[arg(long)]
    pub insecure: bool,

    /// Connect timeout (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Longest silence while waiting for Glance's answer or the next bytes of an image; a
    /// stalled transfer is then retried (and resumed).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub read_timeout: Duration,

    /// Retries after connection errors, timeouts, 5xx and 429 (attempts that made progress
    /// are not counted).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub retries: u32,

    /// First wait between retries; doubles each time, up to 30s. Retry-After wins.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub retry_backoff: Duration,
}

/// `imgcache fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Glance image ids.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,

    #[command(flatten)]
    pub glance: GlanceArgs,

    /// How long to wait for another process working on the same image (0 = do not wait).
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,

    /// Images fetched at the same time.
    #[arg(short, long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64), value_name = "N")]
    pub jobs: u16,

    /// Keep non-raw images (qcow2, vmdk, ...) as they are instead of converting to raw.
    #[arg(long)]
    pub no_force_raw: bool,

    /// Read `file://` direct_url locations directly (a Glance file store mounted on this host);
    /// the data is verified the same way. Needs Glance's show_image_direct_url.
    #[arg(long, env = "IMGCACHE_ALLOW_DIRECT_FILE")]
    pub allow_direct_file: bool,

    /// One JSON document on stdout instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Parses `90`, `90s`, `500ms`, `10m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 10m, 2h"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
