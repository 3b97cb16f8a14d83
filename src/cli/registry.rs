//! Registry commands (`pull`, `push`, `login`, `logout`, `copy`, `tags`, `delete`) and the
//! flags every networked command shares. Credentials are looked up the way docker and podman
//! do; the environment is read here and nowhere else.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::progress::{Mode, TransferRenderer};
use super::{UsageError, open_store};
use crate::media::Platform;
use crate::registry::{
    AadSource, AcrProvider, Client, ClientOptions, CredentialProvider, CredentialStore, Reference,
    Secret, WorkloadIdentity,
};

/// Flags shared by every command that talks to registries.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Allow plain HTTP (and no TLS) for this registry (`HOST[:PORT]`; loopback always may).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Trust this PEM CA bundle in addition to the system roots (also `$SSL_CERT_FILE`).
    #[arg(long = "ca-file", value_name = "FILE")]
    ca_files: Vec<PathBuf>,
    /// containers-auth.json to read credentials from (and `login` to write to).
    #[arg(long, env = "REGISTRY_AUTH_FILE", value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// An Entra (Azure AD) access token in a file, exchanged for ACR credentials in-process.
    #[arg(long = "aad-token-file", value_name = "FILE")]
    aad_token_file: Option<PathBuf>,
    /// Registries (`HOST` or `*.SUFFIX`) that get ACR/Entra authentication
    /// (default `*.azurecr.io`).
    #[arg(long = "acr-registry", value_name = "PATTERN")]
    acr_registries: Vec<String>,
    /// Largest upload chunk, e.g. `4MiB` for GHCR (default 16MiB).
    #[arg(long = "max-chunk-size", value_name = "SIZE", value_parser = parse_size)]
    max_chunk_size: Option<u64>,
    /// Blobs transferred at once (default 6).
    #[arg(long = "max-parallel", value_name = "N")]
    parallel: Option<usize>,
}

/// `4MiB`, `512k`, `1048576`.
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?}")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("invalid size {s:?}"))
}

impl RegistryArgs {
    /// The credential lookup chain: ACR/Entra for ACR hosts when configured, then
    /// auth.json and docker's config.json (with their credential helpers).
    pub fn credentials(&self) -> anyhow::Result<Arc<dyn CredentialProvider>> {
        let store: Arc<dyn CredentialProvider> = Arc::new(self.credential_store());
        let aad = match &self.aad_token_file {
            Some(f) => Some(AadSource::TokenFile(f.clone())),
            None => WorkloadIdentity::from_env(|k| std::env::var(k).ok())?
                .map(AadSource::WorkloadIdentity),
        };
        Ok(match aad {
            None => store,
            Some(source) => {
                let mut p = AcrProvider::new(source)?
                    .fallback(store)
                    .plain_http_loopback(true);
                if !self.acr_registries.is_empty() {
                    p = p.registries(self.acr_registries.clone());
                }
                Arc::new(p)
            }
        })
    }

    /// Docker config and auth.json, from the environment as docker and podman read it.
    pub fn credential_store(&self) -> CredentialStore {
        let docker_dir = std::env::var_os("DOCKER_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
        CredentialStore::new(docker_dir, self.authfile.clone())
    }

    /// The client options these flags (and `$SSL_CERT_FILE`) ask for.
    fn options(&self) -> ClientOptions {
        let mut opts = ClientOptions {
            insecure_registries: self.insecure_registries.clone(),
            ca_files: self.ca_files.clone(),
            ..ClientOptions::default()
        };
        if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
            opts.ca_files.push(PathBuf::from(f));
        }
        if let Some(c) = self.max_chunk_size {
            opts.chunk_size = c;
            opts.monolithic_threshold = opts.monolithic_threshold.min(c);
        }
        if let Some(p) = self.parallel {
            opts.parallelism = p.max(1);
        }
        opts
    }

    /// A client with these options.
    pub fn client(&self, progress: Option<&Arc<TransferRenderer>>) -> anyhow::Result<Client> {
        let client = Client::new(self.options(), self.credentials()?)?;
        Ok(match progress {
            Some(r) => {
                let r = Arc::clone(r);
                client.with_progress(Arc::new(move |e| r.event(&e)))
            }
            None => client,
        })
    }
}

/// A runtime for network commands.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn parse_ref(s: &str) -> Result<Reference, UsageError> {
    s.parse()
        .map_err(|e: crate::store::NameError| UsageError(e.to_string()))
}

/// `strata pull`
#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference (`registry/repo:tag`, `name@sha256:…`).
    reference: String,
    /// Platform to pick from a multi-platform image (default: the host's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Progress output: `auto`, `plain`, `json`.
    #[arg(long, default_value = "auto")]
    progress: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub(super) fn pull(a: PullArgs) -> anyhow::Result<ExitCode> {
    let r = parse_ref(&a.reference)?;
    let store = open_store()?;
    let _in_use = store.in_use()?;
    let renderer = Arc::new(TransferRenderer::new(Mode::parse(&a.progress)));
    let client = a.registry.client(Some(&renderer))?;
    let platform = a.platform.clone().unwrap_or_else(Platform::host);
    let image = runtime()?.block_on(crate::registry::pull(&client, &store, &r, &platform))?;
    renderer.finish();
    println!("{}", image.digest());
    Ok(ExitCode::SUCCESS)
}

/// `strata push`
#[derive(Args, Debug)]
pub struct PushArgs {
    /// The image in the local store (name, digest or prefix).
    source: String,
    /// Where to push (`registry/repo:tag`); default: SOURCE itself, read as a reference.
    destination: Option<String>,
    /// Progress output: `auto`, `plain`, `json`.
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Write the pushed manifest digest to this file.
    #[arg(long = "digestfile")]
    digestfile: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub(super) fn push(a: PushArgs) -> anyhow::Result<ExitCode> {
    let dest = parse_ref(a.destination.as_deref().unwrap_or(&a.source))?;
    let store = open_store()?;
    let _in_use = store.in_use()?;
    let desc = store.resolve(&a.source)?;
    let image = store.image(&desc.digest)?;
    let renderer = Arc::new(TransferRenderer::new(Mode::parse(&a.progress)));
    let client = a.registry.client(Some(&renderer))?;
    let report = runtime()?.block_on(crate::registry::push(&client, &store, &image, &dest))?;
    renderer.finish();
    renderer.pushed(&dest, &report);
    if let Some(f) = &a.digestfile {
        fs_err::write(f, report.digest.to_string())?;
    }
    println!("{}", report.digest);
    Ok(ExitCode::SUCCESS)
}

/// `strata login`
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Registry host (`HOST[:PORT]`; `docker.io` for Docker Hub).
    registry: String,
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password (prefer --password-stdin: command lines are visible to other users).
    #[arg(short, long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from standard input.
    #[arg(long = "password-stdin")]
    password_stdin: bool,
    #[command(flatten)]
    registry_args: RegistryArgs,
}

/// `docker login` accepts URLs and Hub aliases; store the host as the key.
fn registry_host(s: &str) -> String {
    let s = s
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = s.split('/').next().unwrap_or(s);
    match host {
        "index.docker.io" | "registry-1.docker.io" => crate::registry::DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

pub(super) fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let registry = registry_host(&a.registry);
    let username = a
        .username
        .clone()
        .ok_or_else(|| UsageError("--username is required".into()))?;
    let password = match (&a.password, a.password_stdin) {
        (Some(p), _) => {
            eprintln!("WARNING: --password on the command line is insecure; use --password-stdin");
            p.clone()
        }
        (None, true) => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => {
            return Err(UsageError("give the password with --password-stdin".into()).into());
        }
    };
    if password.is_empty() {
        return Err(UsageError("the password is empty".into()).into());
    }
    // Check the credentials with the registry first, as docker does: nothing wrong is saved.
    let credential = crate::registry::Credential::Basic {
        username: username.clone(),
        password: Secret::new(password.clone()),
    };
    let client = Client::new(
        a.registry_args.options(),
        Arc::new(crate::registry::Fixed(credential)),
    )?;
    runtime()?.block_on(client.check_login(&registry))?;
    let where_ =
        a.registry_args
            .credential_store()
            .login(&registry, &username, &Secret::new(password))?;
    eprintln!("Credentials for {registry} saved to {where_:?}");
    println!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

/// `strata logout`
#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// Registry host.
    registry: String,
    #[command(flatten)]
    registry_args: RegistryArgs,
}

pub(super) fn logout(a: LogoutArgs) -> anyhow::Result<ExitCode> {
    let registry = registry_host(&a.registry);
    if a.registry_args.credential_store().logout(&registry)? {
        println!("Removed login credentials for {registry}");
    } else {
        println!("Not logged in to {registry}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata tags`
#[derive(Args, Debug)]
pub struct TagsArgs {
    /// Repository (`registry/repo`).
    repository: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub(super) fn tags(a: TagsArgs) -> anyhow::Result<ExitCode> {
    let r = parse_ref(&a.repository)?;
    let client = a.registry.client(None)?;
    for t in runtime()?.block_on(client.list_tags(&r))? {
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `strata delete`
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Manifest to delete (`registry/repo@sha256:…`, or a tag, resolved to its digest).
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub(super) fn delete(a: DeleteArgs) -> anyhow::Result<ExitCode> {
    let r = parse_ref(&a.reference)?;
    let client = a.registry.client(None)?;
    let rt = runtime()?;
    let pinned = match r.digest {
        Some(_) => r.clone(),
        None => {
            let desc = rt
                .block_on(client.head_manifest(&r))?
                .ok_or_else(|| anyhow::anyhow!("{r} does not exist"))?;
            r.with_digest(desc.digest)
        }
    };
    rt.block_on(client.delete_manifest(&pinned))?;
    println!("Deleted {pinned}");
    Ok(ExitCode::SUCCESS)
}

/// An image location in skopeo's transport syntax.
#[derive(Clone, Debug)]
enum Location {
    /// `docker://REF`
    Registry(Reference),
    /// `oci:DIR[:TAG]`
    OciDir(PathBuf, Option<String>),
    /// `oci-archive:FILE[:TAG]`
    OciArchive(PathBuf, Option<String>),
    /// `docker-archive:FILE[:NAME:TAG]`
    DockerArchive(PathBuf, Option<String>),
    /// `strata:REF` — the local store.
    Store(String),
}

fn parse_location(s: &str) -> Result<Location, UsageError> {
    let (transport, rest) = s.split_once(':').ok_or_else(|| {
        UsageError(format!(
            "invalid image location {s:?}: expected docker://REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or strata:REF"
        ))
    })?;
    let file_and_rest = |r: &str| match r.split_once(':') {
        Some((f, x)) if !x.is_empty() => (PathBuf::from(f), Some(x.to_string())),
        Some((f, _)) => (PathBuf::from(f), None),
        None => (PathBuf::from(r), None),
    };
    match transport {
        "docker" => Ok(Location::Registry(parse_ref(
            rest.strip_prefix("//")
                .ok_or_else(|| UsageError(format!("{s:?}: expected docker://REF")))?,
        )?)),
        "oci" => {
            let (d, t) = crate::store::split_layout_spec(rest);
            Ok(Location::OciDir(d, t))
        }
        "oci-archive" => {
            let (f, t) = file_and_rest(rest);
            Ok(Location::OciArchive(f, t))
        }
        "docker-archive" => {
            let (f, n) = file_and_rest(rest);
            Ok(Location::DockerArchive(f, n))
        }
        "strata" => Ok(Location::Store(rest.to_string())),
        other => Err(UsageError(format!("unknown transport {other:?} in {s:?}"))),
    }
}

/// `strata copy`
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Source (`docker://REF`, `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:NAME:TAG]`, `strata:REF` for the local store).
    source: String,
    /// Destination, in the same syntax.
    destination: String,
    /// Platform to pick from a multi-platform source (default: the host's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Progress output: `auto`, `plain`, `json`.
    #[arg(long, default_value = "auto")]
    progress: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Copy an image between transports, through the store: manifests are kept byte for byte
/// (so digests are kept) except from docker-archive, which has none. Registry-to-registry
/// copies fetch only manifest and config up front; layers are mounted (same registry) or
/// relayed.
pub(super) fn copy(a: CopyArgs) -> anyhow::Result<ExitCode> {
    let src = parse_location(&a.source)?;
    let dst = parse_location(&a.destination)?;
    let store = open_store()?;
    let _in_use = store.in_use()?;
    let renderer = Arc::new(TransferRenderer::new(Mode::parse(&a.progress)));
    let client = a.registry.client(Some(&renderer))?;
    let platform = a.platform.clone().unwrap_or_else(Platform::host);
    let rt = runtime()?;
    let image = match &src {
        Location::Registry(r) => {
            rt.block_on(crate::registry::pull_metadata(
                &client, &store, r, &platform,
            ))?
            .0
        }
        Location::OciDir(d, t) => {
            crate::store::import_oci_layout(&store, d, t.as_deref(), &platform)?
        }
        Location::OciArchive(f, t) => {
            crate::store::import_oci_archive(&store, f, t.as_deref(), &platform)?
        }
        Location::DockerArchive(f, n) => {
            crate::store::import_docker_archive(&store, f, n.as_deref())?
        }
        Location::Store(r) => store.image(&store.resolve(r)?.digest)?,
    };
    let digest = match &dst {
        Location::Registry(r) => {
            let report = rt.block_on(crate::registry::push(&client, &store, &image, r))?;
            renderer.finish();
            renderer.pushed(r, &report);
            report.digest
        }
        other => {
            rt.block_on(crate::registry::ensure_blobs(
                &client,
                &store,
                &image.manifest.layers,
            ))?;
            renderer.finish();
            let desc = image.descriptor();
            let target = match other {
                Location::OciDir(d, t) => crate::store::ExportTarget::OciDir {
                    dir: d.clone(),
                    tag: t.clone(),
                },
                Location::OciArchive(f, t) => crate::store::ExportTarget::OciArchive {
                    file: f.clone(),
                    tag: t.clone(),
                },
                Location::DockerArchive(f, n) => crate::store::ExportTarget::DockerArchive {
                    file: f.clone(),
                    name: n.clone(),
                },
                Location::Store(name) => {
                    let n: crate::store::ImageName = name
                        .parse()
                        .map_err(|e: crate::store::NameError| UsageError(e.to_string()))?;
                    store.commit_image(&image, &[n])?;
                    println!("{}", image.digest());
                    return Ok(ExitCode::SUCCESS);
                }
                Location::Registry(_) => unreachable!("handled above"),
            };
            crate::store::export(&store, &desc, &target)?;
            image.digest()
        }
    };
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}
