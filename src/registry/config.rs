//! Where registry credentials come from, and `login`/`logout` writing them back: docker's
//! `config.json` (<https://github.com/docker/cli/blob/master/man/docker-config-json.5.md>),
//! containers' `auth.json`
//! (<https://github.com/containers/image/blob/main/docs/containers-auth.json.5.md>) and
//! credential helpers speaking the `docker-credential-<name> get|store|erase` protocol
//! (<https://github.com/docker/docker-credential-helpers#development>).
//!
//! Nothing here reads the environment: the CLI passes `$DOCKER_CONFIG` (or `~/.docker`),
//! `$REGISTRY_AUTH_FILE` and the helper search path in.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

use super::credential::{Credential, CredentialFuture, CredentialProvider, Secret};
use super::reference::DOCKER_HUB;

/// The key Docker Hub's credentials live under in docker's `config.json`.
pub const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// What went wrong finding, storing or fetching credentials. Messages name the file, helper or
/// endpoint and what was wrong; they never carry secrets, file contents or helper output.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A credential file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A credential file (or its directory) could not be written.
    #[error("writing {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A credential file is not JSON.
    #[error("{path} is not valid JSON (line {line}, column {column})")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where the parser gave up.
        line: usize,
        /// Where the parser gave up.
        column: usize,
    },
    /// A credential file is JSON but not of the expected shape.
    #[error("{path}: {problem}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (keys named, values never).
        problem: String,
    },
    /// `login`/`logout` has nowhere to write.
    #[error(
        "no credential file to write: neither a docker config directory nor an auth file is set"
    )]
    NoConfigFile,
    /// The credential helper program is not on the search path.
    #[error("credential helper {program} not found on PATH")]
    HelperNotFound {
        /// `docker-credential-<name>`.
        program: String,
    },
    /// The credential helper could not be started or talked to.
    #[error("running credential helper {program}")]
    HelperSpawn {
        /// `docker-credential-<name>`.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The credential helper exited unsuccessfully (its output is not shown: it may hold
    /// secrets).
    #[error("credential helper {program} {action} failed ({status})")]
    HelperFailed {
        /// `docker-credential-<name>`.
        program: String,
        /// `get`, `store` or `erase`.
        action: &'static str,
        /// How it exited.
        status: ExitStatus,
    },
    /// The credential helper's answer is not the protocol's JSON.
    #[error("credential helper {program} returned malformed output for {action}")]
    HelperOutput {
        /// `docker-credential-<name>`.
        program: String,
        /// `get`.
        action: &'static str,
    },
    /// The Entra access token file could not be read.
    #[error("reading entra token file {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The workload identity federated token file could not be read.
    #[error("reading federated token file {path}")]
    FederatedTokenFile {
        /// The file (`AZURE_FEDERATED_TOKEN_FILE`).
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A token file exists but holds no token.
    #[error("token file {path} is empty")]
    EmptyTokenFile {
        /// The file.
        path: PathBuf,
    },
    /// Workload identity is half configured.
    #[error("workload identity needs {0} to be set")]
    MissingSetting(&'static str),
    /// An endpoint URL is unusable.
    #[error("invalid url {url}: {problem}")]
    Url {
        /// The URL (never carries a secret).
        url: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("building the http client")]
    Client(#[source] reqwest::Error),
    /// An HTTP request failed before an answer arrived.
    #[error("request to {url} failed")]
    Http {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// A token endpoint refused.
    #[error("{url} refused the token request (http {status}): {reason}")]
    TokenRefused {
        /// Where.
        url: String,
        /// HTTP status.
        status: u16,
        /// The endpoint's error code and description, with anything we sent scrubbed out.
        reason: String,
    },
    /// A token endpoint answered 2xx with something unusable.
    #[error("malformed token response from {url}: {problem}")]
    TokenResponse {
        /// Where.
        url: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Where `login` put the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Base64 `user:password` in this file (not encrypted).
    File(PathBuf),
    /// In this credential helper (`docker-credential-<name>`).
    Helper(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// docker's `config.json`: Docker Hub under [`DOCKER_HUB_CONFIG_KEY`].
    Docker,
    /// containers' `auth.json`: Docker Hub under `docker.io`.
    Containers,
}

#[derive(Clone, Debug)]
struct ConfigFile {
    path: PathBuf,
    flavor: Flavor,
}

/// Credentials from containers' `auth.json` and docker's `config.json` (in that order) and the
/// credential helpers they name. Lookups run blocking file reads and helper processes on
/// tokio's blocking pool.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    docker_config: Option<ConfigFile>,
    auth_file: Option<ConfigFile>,
    helper_dirs: Option<Vec<PathBuf>>,
}

impl CredentialStore {
    /// A store over `docker_config_dir/config.json` (`$DOCKER_CONFIG` or `~/.docker`) and
    /// `auth_file` (`$REGISTRY_AUTH_FILE`). Missing files are simply empty.
    pub fn new(docker_config_dir: Option<PathBuf>, auth_file: Option<PathBuf>) -> CredentialStore {
        CredentialStore {
            docker_config: docker_config_dir.map(|d| ConfigFile {
                path: d.join("config.json"),
                flavor: Flavor::Docker,
            }),
            auth_file: auth_file.map(|path| ConfigFile {
                path,
                flavor: Flavor::Containers,
            }),
            helper_dirs: None,
        }
    }

    /// Look credential helpers up in these directories (`$PATH` split) instead of leaving it
    /// to the operating system.
    pub fn helper_search_path(mut self, dirs: Vec<PathBuf>) -> CredentialStore {
        self.helper_dirs = Some(dirs);
        self
    }

    /// The credential for `registry` (`host[:port]`, `docker.io` for Docker Hub), blocking.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credential>, CredentialError> {
        let registry = normalize_registry(registry);
        for file in [&self.auth_file, &self.docker_config].into_iter().flatten() {
            let Some(cfg) = read_config(&file.path)? else {
                continue;
            };
            if let Some(c) = self.lookup_in(file, &cfg, &registry)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    fn lookup_in(
        &self,
        file: &ConfigFile,
        cfg: &Map<String, Value>,
        registry: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let mut helpers = vec![];
        for h in [
            cred_helper(cfg, &file.path, registry)?,
            creds_store(cfg, &file.path)?,
        ]
        .into_iter()
        .flatten()
        {
            if !helpers.contains(&h) {
                helpers.push(h);
            }
        }
        for helper in helpers {
            if let Some(c) = self.helper_get(&helper, registry)? {
                return Ok(Some(c));
            }
        }
        let Some(auths) = object_at(cfg, "auths", &file.path)? else {
            return Ok(None);
        };
        let Some(key) = find_key(auths, registry, &canonical_key(registry, file.flavor)) else {
            return Ok(None);
        };
        parse_entry(&auths[key], key, &file.path)
    }

    /// Store `username`/`password` for `registry` the way `docker login` does: in the
    /// credential helper the file names for it, else as base64 `user:password` under `auths`.
    /// Writes `auth_file` if set (as podman does), else docker's `config.json`; creates the
    /// directory (0700) and file (0600), keeps every other key, and replaces the file
    /// atomically.
    pub fn login(
        &self,
        registry: &str,
        username: &str,
        password: &Secret,
    ) -> Result<Stored, CredentialError> {
        let file = self.write_target()?;
        let registry = normalize_registry(registry);
        let mut cfg = read_config(&file.path)?.unwrap_or_default();
        let key = canonical_key(&registry, file.flavor);
        if let Some(helper) = self.write_helper(&cfg, file, &registry)? {
            let input = serde_json::json!({
                "ServerURL": helper_server_url(&registry),
                "Username": username,
                "Secret": password.expose(),
            });
            let program = helper_program_name(&helper);
            if self
                .run_helper(&helper, "store", input.to_string().as_bytes())?
                .is_none()
            {
                return Err(CredentialError::HelperOutput {
                    program,
                    action: "store",
                });
            }
            // docker keeps an empty entry so `docker logout` and tools listing logins see it.
            if file.flavor == Flavor::Docker {
                let auths = auths_mut(&mut cfg, &file.path)?;
                if !auths.contains_key(&key) {
                    auths.insert(key, Value::Object(Map::new()));
                    write_config(&file.path, &cfg)?;
                }
            }
            return Ok(Stored::Helper(program));
        }
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{username}:{}", password.expose()));
        let mut entry = Map::new();
        entry.insert("auth".into(), Value::String(auth));
        auths_mut(&mut cfg, &file.path)?.insert(key, Value::Object(entry));
        write_config(&file.path, &cfg)?;
        Ok(Stored::File(file.path.clone()))
    }

    /// Forget the credential for `registry`: erase it from the credential helper and remove
    /// every `auths` entry naming the registry. `true` if anything was removed.
    pub fn logout(&self, registry: &str) -> Result<bool, CredentialError> {
        let file = self.write_target()?;
        let registry = normalize_registry(registry);
        let Some(mut cfg) = read_config(&file.path)? else {
            return Ok(false);
        };
        let mut removed = false;
        if let Some(helper) = self.write_helper(&cfg, file, &registry)? {
            let url = helper_server_url(&registry);
            removed = self.run_helper(&helper, "erase", url.as_bytes())?.is_some();
        }
        if let Some(Value::Object(auths)) = cfg.get_mut("auths") {
            let keys: Vec<String> = auths
                .keys()
                .filter(|k| key_registry(k).as_deref() == Some(registry.as_str()))
                .cloned()
                .collect();
            if !keys.is_empty() {
                for k in &keys {
                    auths.remove(k);
                }
                write_config(&file.path, &cfg)?;
                removed = true;
            }
        }
        Ok(removed)
    }

    fn write_target(&self) -> Result<&ConfigFile, CredentialError> {
        self.auth_file
            .as_ref()
            .or(self.docker_config.as_ref())
            .ok_or(CredentialError::NoConfigFile)
    }

    fn write_helper(
        &self,
        cfg: &Map<String, Value>,
        file: &ConfigFile,
        registry: &str,
    ) -> Result<Option<String>, CredentialError> {
        Ok(match cred_helper(cfg, &file.path, registry)? {
            Some(h) => Some(h),
            None => creds_store(cfg, &file.path)?,
        })
    }

    fn helper_get(
        &self,
        helper: &str,
        registry: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let url = helper_server_url(registry);
        let Some(out) = self.run_helper(helper, "get", url.as_bytes())? else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(rename = "Username", default)]
            username: String,
            #[serde(rename = "Secret", default)]
            secret: String,
        }
        let answer: Answer =
            serde_json::from_slice(&out).map_err(|_| CredentialError::HelperOutput {
                program: helper_program_name(helper),
                action: "get",
            })?;
        if answer.secret.is_empty() {
            return Ok(None);
        }
        let secret = Secret::new(answer.secret);
        Ok(Some(if answer.username == "<token>" {
            Credential::IdentityToken(secret)
        } else {
            Credential::Basic {
                username: answer.username,
                password: secret,
            }
        }))
    }

    /// Run `docker-credential-<helper> <action>` with `input` on stdin. `None` when the helper
    /// says "credentials not found"; its stdout otherwise.
    fn run_helper(
        &self,
        helper: &str,
        action: &'static str,
        input: &[u8],
    ) -> Result<Option<Vec<u8>>, CredentialError> {
        let program = helper_program_name(helper);
        if helper.contains(['/', '\\']) || helper.is_empty() {
            return Err(CredentialError::HelperNotFound { program });
        }
        let path = match &self.helper_dirs {
            None => PathBuf::from(&program),
            Some(dirs) => dirs
                .iter()
                .map(|d| d.join(&program))
                .find(|p| is_executable(p))
                .ok_or_else(|| CredentialError::HelperNotFound {
                    program: program.clone(),
                })?,
        };
        let spawn_err = |source: io::Error| CredentialError::HelperSpawn {
            program: program.clone(),
            source,
        };
        let mut child = match Command::new(&path)
            .arg(action)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CredentialError::HelperNotFound { program });
            }
            Err(e) => return Err(spawn_err(e)),
        };
        if let Some(mut stdin) = child.stdin.take() {
            // A helper may exit without reading its input; that is for its exit status to say.
            match stdin.write_all(input) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
                _ => {}
            }
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            return Ok(Some(out.stdout));
        }
        let not_found = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .to_ascii_lowercase()
                .contains("credentials not found")
        };
        if not_found(&out.stdout) || not_found(&out.stderr) {
            return Ok(None);
        }
        Err(CredentialError::HelperFailed {
            program,
            action,
            status: out.status,
        })
    }
}

impl CredentialProvider for CredentialStore {
    fn credential<'a>(&'a self, registry: &'a str) -> CredentialFuture<'a> {
        let store = self.clone();
        let registry = registry.to_owned();
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || store.lookup(&registry)).await?;
            Ok(found?)
        })
    }
}

fn helper_program_name(helper: &str) -> String {
    format!("docker-credential-{helper}")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `docker.io`'s aliases folded, host lowercased, any scheme or path dropped.
pub(crate) fn normalize_registry(registry: &str) -> String {
    let rest = strip_scheme(registry).unwrap_or(registry);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

fn strip_scheme(s: &str) -> Option<&str> {
    s.strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
}

/// The registry an `auths`/`credHelpers` key names: `host`, `https://host`,
/// `https://host/v1/`, `http://host`. A scheme-less key with a path is a podman
/// repository-scoped entry (`host/namespace`); lookups are per registry, so it names none.
fn key_registry(key: &str) -> Option<String> {
    if strip_scheme(key).is_none() && key.trim_end_matches('/').contains('/') {
        return None;
    }
    Some(normalize_registry(key))
}

/// The key `login` writes: Docker Hub under docker's legacy URL in `config.json`, under
/// `docker.io` in `auth.json` (as podman writes it); other registries under `host[:port]`.
fn canonical_key(registry: &str, flavor: Flavor) -> String {
    match (registry, flavor) {
        (DOCKER_HUB, Flavor::Docker) => DOCKER_HUB_CONFIG_KEY.to_string(),
        _ => registry.to_string(),
    }
}

/// The server URL a helper is asked about (what `docker login` passes).
fn helper_server_url(registry: &str) -> String {
    canonical_key(registry, Flavor::Docker)
}

/// The key for `registry`: the canonical spelling if present, else the first (sorted) key
/// naming the same registry.
fn find_key<'m>(map: &'m Map<String, Value>, registry: &str, canonical: &str) -> Option<&'m str> {
    if let Some((k, _)) = map.get_key_value(canonical) {
        return Some(k);
    }
    map.keys()
        .find(|k| key_registry(k).as_deref() == Some(registry))
        .map(String::as_str)
}

fn cred_helper(
    cfg: &Map<String, Value>,
    path: &Path,
    registry: &str,
) -> Result<Option<String>, CredentialError> {
    let Some(helpers) = object_at(cfg, "credHelpers", path)? else {
        return Ok(None);
    };
    let Some(key) = find_key(helpers, registry, &helper_server_url(registry)) else {
        return Ok(None);
    };
    match &helpers[key] {
        Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
        Value::String(_) => Ok(None),
        _ => Err(malformed(
            path,
            format!("`credHelpers` entry {key} is not a string"),
        )),
    }
}

fn creds_store(cfg: &Map<String, Value>, path: &Path) -> Result<Option<String>, CredentialError> {
    match cfg.get("credsStore") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(malformed(path, "`credsStore` is not a string".into())),
    }
}

fn object_at<'m>(
    cfg: &'m Map<String, Value>,
    field: &str,
    path: &Path,
) -> Result<Option<&'m Map<String, Value>>, CredentialError> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(malformed(path, format!("`{field}` is not an object"))),
    }
}

fn auths_mut<'m>(
    cfg: &'m mut Map<String, Value>,
    path: &Path,
) -> Result<&'m mut Map<String, Value>, CredentialError> {
    let v = cfg
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    if v.is_null() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut()
        .ok_or_else(|| malformed(path, "`auths` is not an object".into()))
}

fn malformed(path: &Path, problem: String) -> CredentialError {
    CredentialError::Malformed {
        path: path.to_path_buf(),
        problem,
    }
}

/// One `auths` entry: `identitytoken`, else `auth` (base64 `user:password`), else
/// `username`/`password`; an empty entry (left by a helper login) is no credential.
fn parse_entry(
    entry: &Value,
    key: &str,
    path: &Path,
) -> Result<Option<Credential>, CredentialError> {
    let Value::Object(entry) = entry else {
        return Err(malformed(
            path,
            format!("`auths` entry {key} is not an object"),
        ));
    };
    let field = |name: &str| -> Result<Option<&str>, CredentialError> {
        match entry.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(malformed(
                path,
                format!("`{name}` of `auths` entry {key} is not a string"),
            )),
        }
    };
    if let Some(token) = field("identitytoken")? {
        return Ok(Some(Credential::IdentityToken(Secret::new(token))));
    }
    if let Some(auth) = field("auth")? {
        let bad = || {
            malformed(
                path,
                format!("`auth` of `auths` entry {key} is not base64 of user:password"),
            )
        };
        let lenient = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let decoded = lenient.decode(auth.trim()).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credential::Basic {
            username: user.to_string(),
            password: Secret::new(pass),
        }));
    }
    match (field("username")?, field("password")?) {
        (Some(u), Some(p)) => Ok(Some(Credential::Basic {
            username: u.to_string(),
            password: Secret::new(p),
        })),
        _ => Ok(None),
    }
}

/// The file's top-level object; `None` if it does not exist. An empty file is an empty object
/// (docker treats it so).
fn read_config(path: &Path) -> Result<Option<Map<String, Value>>, CredentialError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CredentialError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(Map::new()));
    }
    // serde_json's messages may quote the offending value; only its position is reported.
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(malformed(path, "top level is not a JSON object".into())),
        Err(e) => Err(CredentialError::Syntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
        }),
    }
}

/// Replace `path` atomically (temp file in the same directory, fsync, rename, fsync the
/// directory), mode 0600, creating the directory (0700) if needed. A symlinked file is
/// replaced at its target, as docker does.
fn write_config(path: &Path, cfg: &Map<String, Value>) -> Result<(), CredentialError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let write_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| CredentialError::Write { path: p, source }
    };
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).map_err(write_err(path))?
        }
        _ => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(write_err(&dir))?;
    }
    let mut json = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut json,
        serde_json::ser::PrettyFormatter::with_indent(b"\t"),
    );
    serde::Serialize::serialize(cfg, &mut ser)
        .map_err(|e| write_err(&target)(io::Error::other(e)))?;
    json.push(b'\n');
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(write_err(&dir))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err(tmp.path()))?;
    tmp.write_all(&json).map_err(write_err(&target))?;
    tmp.as_file().sync_all().map_err(write_err(&target))?;
    tmp.persist(&target)
        .map_err(|e| write_err(&target)(e.error))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(&dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    fn basic(u: &str, p: &str) -> Option<Credential> {
        Some(Credential::Basic {
            username: u.into(),
            password: Secret::new(p),
        })
    }

    fn write(path: &Path, v: Value) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// A credential helper speaking the real protocol over a real process: it keeps each
    /// `store`d JSON in `<dir>/store/<server url, / and : folded>` and logs its calls.
    fn helper(dir: &Path, name: &str) {
        let script = r#"#!/bin/sh
dir=$(dirname "$0")
key() { printf '%s' "$1" | tr '/:' '__'; }
case "$1" in
get|erase)
    read -r server
    echo "$1 $server" >> "$dir/log"
    f="$dir/store/$(key "$server")"
    if [ ! -f "$f" ]; then echo "credentials not found in native keychain"; exit 1; fi
    if [ "$1" = get ]; then cat "$f"; else rm "$f"; fi ;;
store)
    input=$(cat)
    server=$(printf '%s' "$input" | sed -n 's/.*"ServerURL":"\([^"]*\)".*/\1/p')
    echo "store $server" >> "$dir/log"
    mkdir -p "$dir/store"
    printf '%s' "$input" > "$dir/store/$(key "$server")" ;;
*) exit 2 ;;
esac
"#;
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn helper_store(dir: &Path, server: &str, user: &str, secret: &str) {
        let f = dir.join("store").join(server.replace(['/', ':'], "_"));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        let v = serde_json::json!({"ServerURL": server, "Username": user, "Secret": secret});
        std::fs::write(f, v.to_string()).unwrap();
    }

    struct Env {
        tmp: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Env {
            Env {
                tmp: tempfile::tempdir().unwrap(),
            }
        }
        fn docker_dir(&self) -> PathBuf {
            self.tmp.path().join("docker")
        }
        fn config(&self) -> PathBuf {
            self.docker_dir().join("config.json")
        }
        fn auth_file(&self) -> PathBuf {
            self.tmp.path().join("containers/auth.json")
        }
        fn bin(&self) -> PathBuf {
            let b = self.tmp.path().join("bin");
            std::fs::create_dir_all(&b).unwrap();
            b
        }
        fn docker_only(&self) -> CredentialStore {
            CredentialStore::new(Some(self.docker_dir()), None).helper_search_path(vec![self.bin()])
        }
        fn both(&self) -> CredentialStore {
            CredentialStore::new(Some(self.docker_dir()), Some(self.auth_file()))
                .helper_search_path(vec![self.bin()])
        }
    }

    #[test]
    fn every_entry_form_and_key_spelling() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({"auths": {
                "plain.example": {"auth": B64.encode("alice:pa:ss")},
                "https://scheme.example": {"username": "bob", "password": "pw"},
                "https://legacy.example/v1/": {"auth": B64.encode("carol:pw3").trim_end_matches('=')},
                "http://insecure.example:5000": {"identitytoken": "refresh-tok"},
                "empty.example": {},
                "quay.io/only/this/repo": {"auth": B64.encode("x:y")},
            }}),
        );
        let s = env.docker_only();
        assert_eq!(s.lookup("plain.example").unwrap(), basic("alice", "pa:ss"));
        assert_eq!(s.lookup("scheme.example").unwrap(), basic("bob", "pw"));
        assert_eq!(s.lookup("legacy.example").unwrap(), basic("carol", "pw3"));
        assert_eq!(
            s.lookup("insecure.example:5000").unwrap(),
            Some(Credential::IdentityToken(Secret::new("refresh-tok")))
        );
        assert_eq!(s.lookup("insecure.example").unwrap(), None);
        assert_eq!(s.lookup("empty.example").unwrap(), None);
        assert_eq!(s.lookup("quay.io").unwrap(), None);
        assert_eq!(s.lookup("other.example").unwrap(), None);
    }

    #[test]
    fn docker_hub_key_normalised() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({"auths": {DOCKER_HUB_CONFIG_KEY: {"auth": B64.encode("hub:pw")}}}),
        );
        let s = env.docker_only();
        for name in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(s.lookup(name).unwrap(), basic("hub", "pw"), "{name}");
        }
        // podman's spelling in auth.json
        write(
            &env.auth_file(),
            serde_json::json!({"auths": {"docker.io": {"auth": B64.encode("pod:pw")}}}),
        );
        assert_eq!(env.both().lookup("docker.io").unwrap(), basic("pod", "pw"));
    }

    #[test]
    fn auth_json_wins_over_docker_config() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({"auths": {"r.example": {"auth": B64.encode("docker:1")},
                                         "d.example": {"auth": B64.encode("docker:2")}}}),
        );
        write(
            &env.auth_file(),
            serde_json::json!({"auths": {"r.example": {"auth": B64.encode("podman:1")}}}),
        );
        let s = env.both();
        assert_eq!(s.lookup("r.example").unwrap(), basic("podman", "1"));
        assert_eq!(s.lookup("d.example").unwrap(), basic("docker", "2"));
    }

    #[test]
    fn missing_files_are_empty() {
        let env = Env::new();
        assert_eq!(env.both().lookup("r.example").unwrap(), None);
        assert_eq!(
            CredentialStore::default().lookup("r.example").unwrap(),
            None
        );
    }

    #[test]
    fn cred_helpers_then_creds_store_then_auths() {
        let env = Env::new();
        let bin = env.bin();
        helper(&bin, "per");
        helper(&bin, "all");
        write(
            &env.config(),
            serde_json::json!({
                "credHelpers": {"per.example": "per"},
                "credsStore": "all",
                "auths": {"inline.example": {"auth": B64.encode("inline:pw")}},
            }),
        );
        helper_store(&bin, "per.example", "per-user", "per-secret");
        helper_store(&bin, "store.example", "<token>", "store-refresh");
        helper_store(&bin, DOCKER_HUB_CONFIG_KEY, "hub-user", "hub-secret");
        let s = env.docker_only();
        assert_eq!(
            s.lookup("per.example").unwrap(),
            basic("per-user", "per-secret")
        );
        assert_eq!(
            s.lookup("store.example").unwrap(),
            Some(Credential::IdentityToken(Secret::new("store-refresh")))
        );
        assert_eq!(
            s.lookup("docker.io").unwrap(),
            basic("hub-user", "hub-secret")
        );
        // the store says "credentials not found": fall through to auths, then to nothing
        assert_eq!(s.lookup("inline.example").unwrap(), basic("inline", "pw"));
        assert_eq!(s.lookup("none.example").unwrap(), None);
        let log = std::fs::read_to_string(bin.join("log")).unwrap();
        assert!(log.contains("get per.example\n"), "{log}");
        assert!(
            log.contains(&format!("get {DOCKER_HUB_CONFIG_KEY}\n")),
            "{log}"
        );
    }

    #[test]
    fn helper_failures_are_errors_without_output() {
        let env = Env::new();
        let bin = env.bin();
        let path = bin.join("docker-credential-broken");
        std::fs::write(
            &path,
            "#!/bin/sh\necho 'oops hunter2' >&2\necho hunter2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let garbage = bin.join("docker-credential-garbage");
        std::fs::write(&garbage, "#!/bin/sh\necho '{\"Secret\": hunter2'\n").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
        write(
            &env.config(),
            serde_json::json!({"credHelpers": {"b.example": "broken", "g.example": "garbage",
                                               "m.example": "missing"}}),
        );
        let s = env.docker_only();
        for (registry, expect) in [
            (
                "b.example",
                "credential helper docker-credential-broken get failed",
            ),
            (
                "g.example",
                "credential helper docker-credential-garbage returned malformed output",
            ),
            (
                "m.example",
                "credential helper docker-credential-missing not found on PATH",
            ),
        ] {
            let e = s.lookup(registry).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(shown.contains(expect), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn malformed_files_name_the_file_not_the_secret() {
        let env = Env::new();
        let s = env.docker_only();
        std::fs::create_dir_all(env.docker_dir()).unwrap();
        let cases = [
            r#"{"auths": {"r.example": {"auth": "hunter2hunter2!!"}}}"#.to_string(),
            r#"{"auths": {"r.example": {"auth": "#.to_string()
                + "\""
                + &B64.encode("nocolonhunter2")
                + "\"}}}",
            r#"{"auths": {"r.example": {"password": ["hunter2"]}}}"#.to_string(),
            r#"{"auths": {"r.example": "hunter2"}}"#.to_string(),
            r#"{"auths": {"r.example": {"auth": "hunter2"}"#.to_string(),
            r#"{"auths": ["hunter2"]}"#.to_string(),
            r#"["hunter2"]"#.to_string(),
        ];
        for text in cases {
            std::fs::write(env.config(), &text).unwrap();
            let e = s.lookup("r.example").unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(
                shown.contains(&env.config().display().to_string()),
                "{shown}"
            );
            assert!(!shown.contains("hunter2"), "{text}: {shown}");
            assert!(!shown.contains(&B64.encode("nocolonhunter2")), "{shown}");
        }
    }

    #[test]
    fn login_lookup_logout_round_trip() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({
                "auths": {"other.example": {"auth": B64.encode("o:p")}},
                "psFormat": "table {{.ID}}",
                "proxies": {"default": {"httpProxy": "http://proxy:3128"}},
            }),
        );
        let s = env.docker_only();
        let stored = s
            .login("r.example:5000", "me", &Secret::new("s3cret"))
            .unwrap();
        assert_eq!(stored, Stored::File(env.config()));
        assert_eq!(s.lookup("r.example:5000").unwrap(), basic("me", "s3cret"));
        s.login("docker.io", "hub", &Secret::new("h")).unwrap();
        let v = read(&env.config());
        assert_eq!(
            v["auths"]["r.example:5000"]["auth"],
            B64.encode("me:s3cret")
        );
        assert_eq!(
            v["auths"][DOCKER_HUB_CONFIG_KEY]["auth"],
            B64.encode("hub:h")
        );
        assert_eq!(v["auths"]["other.example"]["auth"], B64.encode("o:p"));
        assert_eq!(v["psFormat"], "table {{.ID}}");
        assert_eq!(v["proxies"]["default"]["httpProxy"], "http://proxy:3128");
        let mode = std::fs::metadata(env.config())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        assert!(s.logout("r.example:5000").unwrap());
        assert!(!s.logout("r.example:5000").unwrap());
        assert_eq!(s.lookup("r.example:5000").unwrap(), None);
        assert_eq!(s.lookup("other.example").unwrap(), basic("o", "p"));
        assert_eq!(read(&env.config())["psFormat"], "table {{.ID}}");
    }

    #[test]
    fn logout_removes_every_spelling() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({"auths": {
                "r.example": {"auth": B64.encode("a:1")},
                "https://r.example": {"auth": B64.encode("a:2")},
                "https://r.example/v1/": {"auth": B64.encode("a:3")},
                "s.example": {"auth": B64.encode("b:1")},
            }}),
        );
        let s = env.docker_only();
        assert!(s.logout("r.example").unwrap());
        let v = read(&env.config());
        assert_eq!(v["auths"].as_object().unwrap().len(), 1);
        assert_eq!(s.lookup("r.example").unwrap(), None);
    }

    #[test]
    fn login_creates_dir_0700_and_file_0600() {
        let env = Env::new();
        let s = env.docker_only();
        assert!(!env.docker_dir().exists());
        s.login("r.example", "u", &Secret::new("p")).unwrap();
        let dir_mode = std::fs::metadata(env.docker_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let mode = std::fs::metadata(env.config())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // no temp files left beside it
        assert_eq!(std::fs::read_dir(env.docker_dir()).unwrap().count(), 1);
        assert!(!s.logout("never.example").unwrap());
    }

    #[test]
    fn login_goes_through_the_helper() {
        let env = Env::new();
        let bin = env.bin();
        helper(&bin, "pass");
        write(&env.config(), serde_json::json!({"credsStore": "pass"}));
        let s = env.docker_only();
        let stored = s
            .login("docker.io", "hub", &Secret::new("hub-secret"))
            .unwrap();
        assert_eq!(stored, Stored::Helper("docker-credential-pass".into()));
        assert_eq!(s.lookup("docker.io").unwrap(), basic("hub", "hub-secret"));
        let text = std::fs::read_to_string(env.config()).unwrap();
        assert!(!text.contains("hub-secret"), "{text}");
        // docker's empty placeholder entry
        assert_eq!(
            read(&env.config())["auths"][DOCKER_HUB_CONFIG_KEY],
            serde_json::json!({})
        );
        assert!(s.logout("docker.io").unwrap());
        assert_eq!(s.lookup("docker.io").unwrap(), None);
        let log = std::fs::read_to_string(bin.join("log")).unwrap();
        assert!(
            log.contains(&format!("store {DOCKER_HUB_CONFIG_KEY}\n")),
            "{log}"
        );
        assert!(
            log.contains(&format!("erase {DOCKER_HUB_CONFIG_KEY}\n")),
            "{log}"
        );
    }

    #[test]
    fn auth_file_is_where_login_writes_when_set() {
        let env = Env::new();
        let s = env.both();
        s.login("docker.io", "pod", &Secret::new("pw")).unwrap();
        assert!(!env.config().exists());
        assert_eq!(
            read(&env.auth_file())["auths"]["docker.io"]["auth"],
            B64.encode("pod:pw")
        );
        assert_eq!(s.lookup("docker.io").unwrap(), basic("pod", "pw"));
        assert!(s.logout("docker.io").unwrap());
        assert_eq!(s.lookup("docker.io").unwrap(), None);
        assert!(matches!(
            CredentialStore::new(None, None).login("r", "u", &Secret::new("p")),
            Err(CredentialError::NoConfigFile)
        ));
    }

    #[test]
    fn login_through_a_symlink_keeps_the_link() {
        let env = Env::new();
        let real = env.tmp.path().join("real.json");
        std::fs::write(&real, "{}").unwrap();
        std::fs::create_dir_all(env.docker_dir()).unwrap();
        std::os::unix::fs::symlink(&real, env.config()).unwrap();
        env.docker_only()
            .login("r.example", "u", &Secret::new("p"))
            .unwrap();
        assert!(
            std::fs::symlink_metadata(env.config())
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(read(&real)["auths"]["r.example"]["auth"], B64.encode("u:p"));
    }

    #[tokio::test]
    async fn provider_trait() {
        let env = Env::new();
        write(
            &env.config(),
            serde_json::json!({"auths": {"r.example": {"auth": B64.encode("u:p")}}}),
        );
        let p: Box<dyn CredentialProvider> = Box::new(env.docker_only());
        assert_eq!(p.credential("r.example").await.unwrap(), basic("u", "p"));
        assert_eq!(p.credential("x.example").await.unwrap(), None);
    }
}
