//! `imgcache fetch ID [ID...]`: fetch several images with bounded parallelism; each succeeds or
//! fails on its own; stdout gets `<id> <path>` lines (or one JSON document), stderr the rest.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use serde::Serialize;

use super::{Outcome, kind_of};
use crate::cache::{self, Cache};
use crate::error::{self, Kind};
use crate::fetch::{self, Fetched};
use crate::glance;
use crate::openstack;
use crate::progress::{self, Render, Reporter};

/// What to fetch, resolved from the command line.
#[derive(Debug)]
pub struct Request {
    pub cache: Cache,
    pub ids: Vec<String>,
    pub access: openstack::Access,
    pub opts: fetch::Options,
    /// Images fetched at the same time.
    pub jobs: usize,
    pub json: bool,
}

/// Runs the command.
pub fn run(req: Request, rep: &dyn Reporter) -> Result<Outcome> {
    for id in &req.ids {
        cache::validate_id("image id", id)?;
    }
    let (settings, key_manager) = openstack::connect(&req.access)?;
    let client = glance::Client::new(&settings)?;
    let req = Request {
        opts: req.opts.with_key_manager(key_manager),
        ..req
    };
    // Each image's line (or error) is shown the moment it is done, not after the last one.
    let done = |id: &str, result: &Result<Fetched>| match result {
        Ok(f) if !req.json => rep.output(&format!("{} {}", f.id, f.path.display())),
        Ok(_) => {}
        Err(e) => rep.error(&failure_text(id, e)),
    };
    rep.expect(&req.ids);
    let results = fetch_all(&req, &client, rep, &done);
    let mut first_failure = None;
    let mut report = Report { images: Vec::new() };
    for (id, result) in req.ids.iter().zip(&results) {
        match result {
            Ok(f) => report.images.push(Item::ok(f)),
            Err(e) => {
                let kind = kind_of(e);
                first_failure.get_or_insert(kind.exit_code());
                report
                    .images
                    .push(Item::failed(id, kind, failure_text(id, e)));
            }
        }
    }
    if req.json {
        progress::print(&report, true)?;
    }
    Ok(match first_failure {
        None => Outcome::Success,
        Some(code) => Outcome::Partial(code),
    })
}

/// An image's error chain, naming the image once.
fn failure_text(id: &str, e: &anyhow::Error) -> String {
    let msg = error::chain(e);
    if msg.contains(id) {
        msg
    } else {
        format!("image {id}: {msg}")
    }
}

/// Fetches every id with at most `jobs` at a time, calling `done` as each finishes; results
/// come back in argument order.
fn fetch_all(
    req: &Request,
    client: &glance::Client,
    rep: &dyn Reporter,
    done: &(dyn Fn(&str, &Result<Fetched>) + Sync),
) -> Vec<Result<Fetched>> {
    let ids = &req.ids;
    let slots: Vec<Mutex<Option<Result<Fetched>>>> = ids.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..req.jobs.min(ids.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    let result = fetch::ensure(&req.cache, client, id, &req.opts, rep);
                    done(id, &result);
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

#[derive(Serialize)]
struct Report {
    images: Vec<Item>,
}

impl Render for Report {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for i in &self.images {
            if let Some(path) = &i.path {
                writeln!(out, "{} {}", i.id, path.display())?;
            }
        }
        Ok(())
    }
}

/// What happened to one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Downloaded now.
    Fetched,
    /// Already in the cache.
    Cached,
    Failed,
}

#[derive(Serialize)]
struct Item {
    id: String,
    status: Status,
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
            status: if f.downloaded {
                Status::Fetched
            } else {
                Status::Cached
            },
            path: Some(f.path.clone()),
            format: f.record.as_ref().map(|r| r.format.clone()),
            source_format: f.record.as_ref().map(|r| r.source_format.clone()),
            virtual_size: f.record.as_ref().map(|r| r.virtual_size),
            error: None,
            error_kind: None,
            exit_code: None,
        }
    }

    fn failed(id: &str, kind: Kind, msg: String) -> Item {
        Item {
            id: id.to_owned(),
            status: Status::Failed,
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
