//! strata: a native, daemonless, reproducible OCI image builder.
//!
//! Data flows one way: a front end ([`dockerfile`]) turns text into a plan; [`source`] reads
//! build contexts; [`layer`] writes deterministic tar layers; [`image`] holds manifests and
//! configs; [`store`] keeps blobs content-addressed on disk; [`build`] executes a plan; the
//! [`serve`] is the publish backend (a build queue behind an HTTP API); the
//! [`cli`] is the only place that reads the environment, the clock and the working directory.
#![deny(missing_docs)]

pub mod build;
pub mod cli;
pub mod deploy;
pub mod digest;
pub mod dockerfile;
pub mod error;
pub mod image;
pub mod layer;
pub mod media;
pub mod recipe;
pub mod registry;
pub mod sandbox;
pub mod serve;
pub mod source;
pub mod store;

pub use digest::Digest;
pub use error::{Error, Result};
pub use media::{Compression, Descriptor, MediaType, Platform};
