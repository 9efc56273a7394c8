//! One module per subcommand.

pub mod config;
pub mod create;
pub mod create_rbd;
pub mod delete;
pub mod fetch;
pub mod inspect;
pub mod list;
pub mod prune;
pub mod verify;
