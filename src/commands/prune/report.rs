//! What prune reports: one item per entry, temp file and RBD image with the action taken and
//! why; totals. `--json` prints all of it; the text lists what was (or would be) removed.

use std::io::Write;

use serde::Serialize;

use crate::progress::printable;
use crate::units::human;

/// What prune did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Kept,
    Removed,
    /// `--dry-run`: it would have been removed.
    WouldRemove,
    /// Locked by another process (or, in RBD, a clone appeared); left alone.
    Busy,
}

impl Action {
    /// Removed, or would be.
    pub fn frees(self) -> bool {
        matches!(self, Action::Removed | Action::WouldRemove)
    }
}

#[derive(Debug, Serialize)]
pub struct Item {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    pub size: u64,
    pub allocated: u64,
    /// Seconds since the entry was last used (mtime).
    pub idle_seconds: u64,
    pub users: usize,
    pub action: Action,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub instances_scanned: usize,
    pub entries: Vec<Item>,
    pub temps: Vec<Item>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rbd: Vec<Item>,
    /// Stale lock files removed (`lock_files_would_remove` with `--dry-run`).
    #[serde(skip)]
    pub lock_files_removed: usize,
    #[serde(rename = "lock_files_removed", skip_serializing_if = "Option::is_none")]
    pub lock_files_removed_json: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_files_would_remove: Option<usize>,
    pub freed_bytes: u64,
    pub allocated_before: u64,
    pub allocated_after: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    pub over_max_size: bool,
    pub warnings: Vec<String>,
    /// `--quiet`: no "nothing to prune" line.
    #[serde(skip)]
    pub quiet: bool,
}

impl crate::progress::Render for Report {
    fn text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let removed: Vec<&Item> = self
            .entries
            .iter()
            .chain(&self.temps)
            .chain(&self.rbd)
            .filter(|i| i.action.frees())
            .collect();
        for i in &removed {
            let what = match (&i.image_id, &i.image_name) {
                (Some(id), Some(n)) => format!("{}, image {id} \"{}\"", i.kind, printable(n)),
                (Some(id), None) => format!("{}, image {id}", i.kind),
                _ => i.kind.to_owned(),
            };
            writeln!(
                out,
                "{} {} ({what}, {}): {}",
                if self.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                i.name,
                human(i.allocated),
                i.reason
            )?;
        }
        if !removed.is_empty() || self.lock_files_removed > 0 {
            writeln!(
                out,
                "{} {} in {} file(s); {} stale lock file(s) {}; cache now {}",
                if self.dry_run { "would free" } else { "freed" },
                human(self.freed_bytes),
                removed.len(),
                self.lock_files_removed,
                if self.dry_run { "to remove" } else { "removed" },
                human(self.allocated_after)
            )?;
        } else if !self.quiet {
            writeln!(
                out,
                "nothing to prune: {} entries, {}, {} instance(s) scanned",
                self.entries.len(),
                human(self.allocated_before),
                self.instances_scanned
            )?;
        }
        Ok(())
    }
}
