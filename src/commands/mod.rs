//! One module per subcommand.

pub mod create;
pub mod delete;
pub mod fetch;
