//! strata's integration tests: the real binary against real tools (umoci, skopeo, GNU tar,
//! the OCI image-spec JSON schemas via python3-jsonschema), all installed by `.ci/run`.
//! A missing tool fails the test with a message naming the package: peers are never skipped.

mod common;

mod auth;
mod build;
mod errors;
mod faults;
mod harness_selftest;
mod push_pull;
mod registry;
mod reproducible;
mod store;
