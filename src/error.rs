//! The crate-wide error: one variant per module's error enum.

/// Any error strata's library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest was malformed or content did not match it.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    /// The Dockerfile is malformed.
    #[error(transparent)]
    Dockerfile(#[from] crate::dockerfile::DockerfileError),
    /// Reading the build context failed.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// Writing or reading a layer failed.
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    /// Image metadata is malformed.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A registry conversation failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Credentials could not be read or written.
    #[error(transparent)]
    Credential(#[from] crate::registry::CredentialError),
    /// A pull, push or copy failed.
    #[error(transparent)]
    Transfer(#[from] crate::registry::TransferError),
    /// A sandboxed step could not run.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// A layer recipe is malformed.
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    /// A build failed.
    #[error(transparent)]
    Build(#[from] crate::build::BuildError),
    /// The publish backend failed.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    /// The hand-off to Kubernetes failed.
    #[error(transparent)]
    Deploy(#[from] crate::deploy::DeployError),
    /// An I/O error (fs-err errors name their path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
