//! The integration tests, compiled as one binary. Everything runs the `imgcache` binary from
//! outside, against a real Glance or the fault server.

mod support;

mod boot;
mod cli;
mod concurrency;
mod config;
mod configdrive;
mod convert_fetch;
mod corpus;
mod crash;
mod create;
mod fetch_faults;
mod fetch_real;
mod fuzz_inspect;
mod help;
mod hostile;
mod keystone;
mod man;
mod messages;
mod nova;
mod operator;
mod overlay;
mod package;
mod pipe;
mod prune;
mod qcow2_read;
mod ranges;
mod rbd;
mod resources;
mod signatures;
mod sparse_fetch;
