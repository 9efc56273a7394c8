//! One module per subcommand (a folder where it is big). Each takes a resolved request (built by
//! `cli` from the command line), does its work through the floors below, and returns an
//! [`Outcome`] after printing its report through [`crate::progress::print`]. Commands never
//! import each other. Also here: the mapping from an error chain to its exit-code kind.

pub mod config;
pub mod create;
pub mod delete;
pub mod fetch;
pub mod inspect;
pub mod list;
pub mod prune;
pub mod verify;

use crate::error::{self, Classified, Kind, UsageError};

/// How a command ended when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for was done.
    Success,
    /// Some items failed; they were reported; exit with this code.
    Partial(u8),
}

/// Finds the kind of an error by walking its chain, outermost first; the first cause that
/// names a kind decides. Every library error exposes its own through `kind()`.
pub fn kind_of(err: &anyhow::Error) -> Kind {
    err.chain().find_map(kind_of_cause).unwrap_or(Kind::Other)
}

fn kind_of_cause(cause: &(dyn std::error::Error + 'static)) -> Option<Kind> {
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            $(if let Some(e) = cause.downcast_ref::<$t>() {
                return Some(e.kind());
            })*
        };
    }
    if cause.is::<UsageError>() {
        return Some(Kind::Usage);
    }
    if cause.is::<error::NoInstancesPath>() {
        return Some(Kind::NoInstancesPath);
    }
    if let Some(e) = cause.downcast_ref::<Classified>() {
        return Some(e.kind);
    }
    kinds!(
        crate::glance::Error,
        crate::http::Error,
        crate::lock::Error,
        crate::inspect::Error,
        crate::qemu_img::Error,
        crate::fetch::Error,
        crate::openstack::keystone::Error,
        crate::rbd::Error,
        crate::signature::Error,
        crate::barbican::Error,
        crate::templates::Error,
        crate::fsimage::Error,
        crate::configdrive::Error,
        create::Error,
    );
    cause
        .downcast_ref::<std::io::Error>()
        .and_then(error::io_kind)
}
