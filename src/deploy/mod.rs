//! The hand-off to Kubernetes, in the two ways clusters take an image (see
//! `../shared/context/altinn.md`, "The hand-off to Kubernetes"):
//!
//! - [`flux`]: a Flux `HelmRelease` (or any manifests directory) packaged as a Flux OCI
//!   artifact (<https://fluxcd.io/flux/cheatsheets/oci-artifacts/>) and pushed through the
//!   registry client next to the image, then tagged with the environment a Flux
//!   `OCIRepository` follows — what `flux push artifact` + `flux tag artifact` do.
//! - [`apply`] and [`rollout`]: manifests whose images are pinned by digest ([`resolve`], like
//!   `ko resolve`), or generated from the image config ([`generate`]), server-side applied with
//!   kube-rs and followed until the rollout really happened (or failed, with the pod, container
//!   and reason).
//!
//! Values and manifests are YAML read into `serde_json::Value` (maps sorted, so every output
//! is a function of the input alone) and written back with serde-saphyr, the YAML library
//! kube-client already uses. Nothing here reads the environment or the clock: the CLI passes
//! the creation time and the kubeconfig choice in.

pub mod apply;
pub mod flux;
pub mod generate;
pub mod image;
pub mod resolve;
pub mod rollout;
pub mod values;

pub use apply::{ApplyOptions, KubeTarget, apply_objects, kube_client};
pub use flux::{
    AppOverrides, ArtifactFiles, ArtifactMeta, FLUX_CONFIG_TYPE, FLUX_CONTENT_TYPE, FluxArtifact,
    HelmRelease, PushedArtifact, push_artifact,
};
pub use generate::{Generate, generate};
pub use image::{ImageInfo, inspect_image};
pub use resolve::{ImageMap, parse_manifests, resolve_images, to_yaml};
pub use rollout::{RolloutOptions, RolloutState, evaluate, wait_for_rollout};
pub use values::{Values, parse_set};

/// Errors of the deploy hand-off.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A YAML document did not parse.
    #[error("invalid YAML in {what}")]
    Yaml {
        /// Which document (a file name, `stdin`, `--set`).
        what: String,
        /// The parser's complaint.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// Values or manifests are well-formed YAML but not what was expected.
    #[error("{what}: {msg}")]
    Invalid {
        /// Which input.
        what: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An image named in the manifests could not be resolved to a digest.
    #[error("image {name:?} is not known: give it with --image {name}=REF")]
    UnknownImage {
        /// The placeholder or name.
        name: String,
    },
    /// Talking to a registry failed.
    #[error(transparent)]
    Transfer(#[from] crate::registry::TransferError),
    /// Writing the artifact's tar failed.
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    /// The kubeconfig or in-cluster configuration could not be used.
    #[error("cannot load the Kubernetes client configuration")]
    KubeConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A request to the Kubernetes API failed.
    #[error("{action} failed")]
    Kube {
        /// What was being done (`apply deployment/app`).
        action: String,
        /// The client's error (the API server's status message included).
        #[source]
        source: kube::Error,
    },
    /// A rollout failed or did not finish in time.
    #[error("rollout of {object} failed: {reason}")]
    Rollout {
        /// `deployment/NAME` (with namespace).
        object: String,
        /// What went wrong: the condition, or the pod, container and reason.
        reason: String,
    },
    /// An I/O error (fs-err errors name their path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DeployError {
    pub(crate) fn invalid(what: impl Into<String>, msg: impl Into<String>) -> DeployError {
        DeployError::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn yaml(what: impl Into<String>, source: serde_saphyr::Error) -> DeployError {
        DeployError::Yaml {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// Result with [`DeployError`].
pub type Result<T, E = DeployError> = std::result::Result<T, E>;
