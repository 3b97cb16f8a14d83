//! The OCI distribution protocol, spoken natively
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md>): references,
//! credentials, the token dance (incl. ACR's exchange), a retrying HTTP client with a
//! resumable upload engine, and pull/push/copy built on it.

mod acr;
mod config;
mod credential;
mod reference;

pub use acr::{AadSource, AcrProvider, WorkloadIdentity};
pub use config::{CredentialError, CredentialStore, DOCKER_HUB_CONFIG_KEY, Stored};
pub use credential::{
    Anonymous, Credential, CredentialFuture, CredentialLookupError, CredentialProvider, Fixed,
    Secret,
};
pub use reference::{DOCKER_HUB, DOCKER_HUB_API, Reference, is_loopback_host};

mod auth;
mod client;
mod error;
mod fetch;
mod pull;
mod push;
mod remote_cache;
mod retry;
#[cfg(test)]
mod tests;
mod transport;
mod upload;

pub use client::{Client, MAX_MANIFEST_SIZE, ManifestResponse};
pub use error::RegistryError;
pub use fetch::BlobSink;
pub use pull::{StoreSink, TransferError, ensure_blobs, local_name, pull, pull_metadata, resolve};
pub use push::{BlobRoute, PushReport, push, push_manifest};
pub use remote_cache::{CACHE_CONFIG_TYPE, export_cache, import_cache};
pub use transport::{ClientOptions, ProgressFn, TransferEvent};
pub use upload::{BlobSource, FileSource};
