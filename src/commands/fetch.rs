//! `imgcache fetch ID [ID...]`: fetch several images with bounded parallelism; each succeeds or
//! fails on its own; stdout gets `<id> <path>` lines (or one JSON document), stderr the rest.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use serde::Serialize;

use crate::Outcome;
use crate::cache::{self, Cache};
use crate::cli::{FetchArgs, FetchOpts, GlanceArgs, Global};
use crate::error::{self, UsageError};
use crate::fetch::{self, Fetched};
use crate::glance;
use crate::openstack;
use crate::progress::Reporter;

/// Runs the command.
pub fn run(global: &Global, args: FetchArgs, rep: &dyn Reporter) -> Result<Outcome> {
    for id in &args.ids {
        cache::validate_id("image id", id)?;
    }
    let cache = Cache::new(&global.instances_path, &global.base_dir_name)?;
    let client = glance::Client::new(&glance_settings(&args.glance)?)?;
    let opts = fetch_options(&args.glance, &args.fetch)?;
    let results = fetch_all(&cache, &client, &args.ids, &opts, args.jobs.into(), rep);

    let mut first_failure = None;
    let mut report = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (id, result) in args.ids.iter().zip(&results) {
        match result {
            Ok(f) => {
                if !args.json {
                    writeln!(out, "{} {}", f.id, f.path.display())?;
                }
                report.push(Item::ok(f));
            }
            Err(e) => {
                let kind = error::kind_of(e);
                first_failure.get_or_insert(kind.exit_code());
                let msg = one_line(e);
                if msg.contains(id.as_str()) {
                    eprintln!("imgcache: {msg}");
                } else {
                    eprintln!("imgcache: image {id}: {msg}");
                }
                report.push(Item::failed(id, kind, msg));
            }
        }
    }
    if args.json {
        serde_json::to_writer_pretty(&mut out, &Report { images: report })?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(match first_failure {
        None => Outcome::Success,
        Some(code) => Outcome::Partial(code),
    })
}

/// Fetch settings from the flags.
pub fn fetch_options(glance: &GlanceArgs, f: &FetchOpts) -> Result<fetch::Options, UsageError> {
    Ok(fetch::Options {
        lock_timeout: f.lock_timeout,
        retries: glance.retries,
        retry_backoff: glance.retry_backoff,
        force_raw: !f.no_force_raw,
        allow_direct_file: f.allow_direct_file,
        limits: crate::inspect::Limits {
            max_virtual_size: crate::size::parse("--max-virtual-size", &f.max_virtual_size)?,
            allow_luks: false,
        },
    })
}

/// Resolves how to reach Glance: flags > OS_* environment > clouds.yaml, then Keystone (if
/// credentials are given) for a token and the catalog's image endpoint.
pub fn glance_settings(args: &GlanceArgs) -> Result<glance::Settings> {
    let flags = openstack::Flags {
        cloud: args.os_cloud.clone().filter(|c| !c.is_empty()),
        glance_url: args.glance_url.clone().filter(|u| !u.is_empty()),
        token: args.token.clone().filter(|t| !t.is_empty()),
        cacert: args.cacert.clone(),
        insecure: args.insecure,
        region: args.os_region_name.clone().filter(|r| !r.is_empty()),
        interface: args.os_interface.clone().filter(|i| !i.is_empty()),
    };
    let creds = openstack::resolve(&flags, &|k| std::env::var(k).ok())?;
    let http = glance::HttpSettings {
        cacert: creds.cacert.clone(),
        insecure: creds.insecure,
        connect_timeout: args.connect_timeout,
        read_timeout: args.read_timeout,
    };
    let endpoint = openstack::endpoint(&creds, &http)?;
    Ok(glance::Settings {
        url: endpoint.url,
        auth: endpoint.auth,
        http,
    })
}

/// Fetches every id with at most `jobs` at a time; results come back in argument order.
fn fetch_all(
    cache: &Cache,
    client: &glance::Client,
    ids: &[String],
    opts: &fetch::Options,
    jobs: usize,
    rep: &dyn Reporter,
) -> Vec<Result<Fetched>> {
    let slots: Vec<Mutex<Option<Result<Fetched>>>> = ids.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(ids.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    let result = fetch::ensure(cache, client, id, opts, rep);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(anyhow::anyhow!("internal error: no result")))
        })
        .collect()
}

/// The error chain on one line: `outer: inner: innermost`.
pub fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[derive(Serialize)]
struct Report {
    images: Vec<Item>,
}

#[derive(Serialize)]
struct Item {
    id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u8>,
}

impl Item {
    fn ok(f: &Fetched) -> Item {
        Item {
            id: f.id.clone(),
            status: if f.downloaded { "fetched" } else { "cached" },
            path: Some(f.path.clone()),
            format: f.record.as_ref().map(|r| r.format.clone()),
            source_format: f.record.as_ref().map(|r| r.source_format.clone()),
            virtual_size: f.record.as_ref().map(|r| r.virtual_size),
            error: None,
            error_kind: None,
            exit_code: None,
        }
    }

    fn failed(id: &str, kind: error::Kind, msg: String) -> Item {
        Item {
            id: id.to_owned(),
            status: "failed",
            path: None,
            format: None,
            source_format: None,
            virtual_size: None,
            error: Some(msg),
            error_kind: Some(kind.name()),
            exit_code: Some(kind.exit_code()),
        }
    }
}
