//! strata's integration tests: the real binary against real tools (umoci, skopeo, GNU tar,
//! the OCI image-spec JSON schemas via python3-jsonschema), all installed by `.ci/run`.
//! A missing tool fails the test with a message naming the package: peers are never skipped.

mod common;
mod git_server;
mod serve_support;

mod auth;
mod build;
mod cache;
mod deploy;
mod deploy_apply;
mod deploy_kube;
mod errors;
mod faults;
mod git_build;
mod git_context;
mod harness_selftest;
mod push_pull;
mod registry;
mod relay_copy;
mod reproducible;
mod run;
mod run_compat;
mod run_mounts;
mod serve;
mod serve_durable;
mod store;
