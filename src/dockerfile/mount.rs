//! `RUN --mount=…` values, parsed as BuildKit's Dockerfile front end does
//! ([reference](https://docs.docker.com/reference/dockerfile/#run---mount)).
//!
//! The value is one CSV record of `key=value` fields (`readonly`/`ro`, `readwrite`/`rw` and
//! `required` may stand alone). Values other than `type` go through the caller's expander (ARG
//! and ENV, as BuildKit does). Defaults follow BuildKit: `type=bind`; bind and secret mounts
//! are read-only unless `rw`, cache and tmpfs mounts writable; a cache mount's `id` is its
//! cleaned target and its `sharing` is `shared`; a secret's target is `/run/secrets/<id>` and
//! its id the base name of its target; `mode`, `uid` and `gid` are only for cache and secret
//! mounts, `size` only for tmpfs, `sharing` only for cache, `required` only for secret and ssh.

/// The kind of a RUN mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// A directory or file from the context, a stage or an image.
    Bind,
    /// A persistent cache directory.
    Cache,
    /// A fresh tmpfs.
    Tmpfs,
    /// A secret file from `strata build --secret`.
    Secret,
    /// An SSH agent socket (parsed, not supported by the executor).
    Ssh,
}

impl MountType {
    /// The name as written in `type=`.
    pub fn name(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Every user sees the same directory at the same time.
    #[default]
    Shared,
    /// A user that finds the directory in use gets a directory of its own.
    Private,
    /// Users take turns.
    Locked,
}

/// One `--mount` of a RUN, expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// `type=`.
    pub kind: MountType,
    /// `target=` (`dst`, `destination`), as written; may be relative to the working directory.
    pub target: Option<String>,
    /// `source=` (`src`): a path in `from` (or the context), or a secret's id.
    pub source: Option<String>,
    /// `from=`: a stage or image.
    pub from: Option<String>,
    /// Read-only (after defaults).
    pub readonly: bool,
    /// `id=`.
    pub id: Option<String>,
    /// `sharing=` (cache mounts).
    pub sharing: Sharing,
    /// `required` (secret and ssh mounts).
    pub required: bool,
    /// `mode=` (octal).
    pub mode: Option<u32>,
    /// `uid=`.
    pub uid: Option<u32>,
    /// `gid=`.
    pub gid: Option<u32>,
    /// `size=` in bytes (tmpfs).
    pub size: Option<u64>,
    /// `env=`: a secret exposed as this environment variable.
    pub env: Option<String>,
}

impl RunMount {
    /// The secret id: `id`, else `source`, else the base name of the target.
    pub fn secret_id(&self) -> String {
        self.id
            .clone()
            .or_else(|| self.source.clone())
            .or_else(|| {
                self.target.as_deref().map(|t| {
                    t.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
            })
            .unwrap_or_default()
    }
}

/// Split one CSV record (Go's `encoding/csv`: `"` quotes a field, `""` is a quote inside one).
fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            ',' => {
                fields.push(std::mem::take(&mut cur));
                at_start = true;
            }
            _ => {
                cur.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err(format!("unterminated quote in --mount={s}"));
    }
    fields.push(cur);
    Ok(fields)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err(format!("invalid value for {key}: {v:?}")),
    }
}

/// A size like Docker's `RAMInBytes`: a number with an optional binary unit (`k`, `m`, `g`,
/// `t`, `p`, optionally followed by `b` or `ib`).
pub fn parse_ram_size(v: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {v:?}");
    let s = v.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let mul: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    Ok((n * mul as f64) as u64)
}

/// Parse one `--mount` value; `expand` expands a value's variables.
pub fn parse_mount(
    value: &str,
    expand: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<RunMount, String> {
    let mut m = RunMount {
        kind: MountType::Bind,
        target: None,
        source: None,
        from: None,
        readonly: false,
        id: None,
        sharing: Sharing::Shared,
        required: false,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        env: None,
    };
    let mut ro_auto = true;
    let mut sharing_set = false;
    for field in csv_fields(value)? {
        let Some((key, raw)) = field.split_once('=') else {
            match field.to_ascii_lowercase().as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_auto = false;
                }
                "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                    m.required = true;
                }
                "required" => {
                    return Err(format!(
                        "unexpected key 'required' for mount type '{}'",
                        m.kind.name()
                    ));
                }
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        let key = key.to_ascii_lowercase();
        let v = if key == "type" {
            raw.to_string()
        } else {
            expand(raw)?
        };
        let num = |radix: u32| {
            u32::from_str_radix(&v, radix).map_err(|_| format!("invalid value for {key}: {v:?}"))
        };
        match key.as_str() {
            "type" => {
                m.kind = match v.to_ascii_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "cache" => MountType::Cache,
                    "tmpfs" => MountType::Tmpfs,
                    "secret" => MountType::Secret,
                    "ssh" => MountType::Ssh,
                    _ => {
                        return Err(format!(
                            "unsupported mount type {v:?} (bind, cache, tmpfs, secret or ssh)"
                        ));
                    }
                }
            }
            "from" => m.from = Some(v),
            "source" | "src" => m.source = Some(v),
            "target" | "dst" | "destination" => m.target = Some(v),
            "readonly" | "ro" => {
                m.readonly = parse_bool(&key, &v)?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.readonly = !parse_bool(&key, &v)?;
                ro_auto = false;
            }
            "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                m.required = parse_bool(&key, &v)?;
            }
            "size" if m.kind == MountType::Tmpfs => m.size = Some(parse_ram_size(&v)?),
            "id" => m.id = Some(v),
            "sharing" if m.kind == MountType::Cache => {
                sharing_set = true;
                m.sharing = match v.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(format!("unsupported sharing value {v:?}")),
                }
            }
            "mode" => m.mode = Some(num(8)?),
            "uid" => m.uid = Some(num(10)?),
            "gid" => m.gid = Some(num(10)?),
            "env" => m.env = Some(v),
            "required" | "size" => {
                return Err(format!(
                    "unexpected key '{key}' for mount type '{}'",
                    m.kind.name()
                ));
            }
            "sharing" => {
                return Err(format!(
                    "invalid cache sharing set for {} mount",
                    m.kind.name()
                ));
            }
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
    }
    let file_info = matches!(
        m.kind,
        MountType::Secret | MountType::Ssh | MountType::Cache
    );
    if !file_info {
        for (name, set) in [
            ("mode", m.mode.is_some()),
            ("uid", m.uid.is_some()),
            ("gid", m.gid.is_some()),
        ] {
            if set {
                return Err(format!(
                    "{name} not allowed for {:?} type mounts",
                    m.kind.name()
                ));
            }
        }
    }
    if sharing_set && m.kind != MountType::Cache {
        return Err(format!(
            "invalid cache sharing set for {} mount",
            m.kind.name()
        ));
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    match m.kind {
        MountType::Secret => {
            if m.from.is_some() {
                return Err("secret mount should not have a from".into());
            }
            if m.source.is_none() && m.target.is_none() && m.id.is_none() && m.env.is_none() {
                return Err(
                    "invalid secret mount: one of id, source, target or env required".into(),
                );
            }
            if m.source.is_some() && m.id.is_some() {
                return Err("both source and id can't be set".into());
            }
        }
        MountType::Bind | MountType::Cache | MountType::Tmpfs if m.target.is_none() => {
            return Err(format!("{} mount needs a target", m.kind.name()));
        }
        _ => {}
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Result<RunMount, String> {
        parse_mount(v, &mut |s| Ok(s.replace("$X", "x")))
    }

    #[test]
    fn defaults_follow_buildkit() {
        let b = parse("target=/src").unwrap();
        assert_eq!(b.kind, MountType::Bind);
        assert!(b.readonly);
        let c = parse("type=cache,target=/root/.cache").unwrap();
        assert!(!c.readonly);
        assert_eq!(c.sharing, Sharing::Shared);
        let t = parse("type=tmpfs,target=/t,size=64m").unwrap();
        assert_eq!(t.size, Some(64 << 20));
        assert!(!t.readonly);
        let s = parse("type=secret,id=tok").unwrap();
        assert!(s.readonly && !s.required);
        assert_eq!(s.secret_id(), "tok");
        let s = parse("type=secret,target=/run/x/tok,required").unwrap();
        assert!(s.required);
        assert_eq!(s.secret_id(), "tok");
    }

    #[test]
    fn fields_and_expansion() {
        let m = parse(
            "type=cache,id=$X,target=/c,sharing=locked,mode=0700,uid=1000,gid=3000,from=base,source=/s,ro",
        )
        .unwrap();
        assert_eq!(m.id.as_deref(), Some("x"));
        assert_eq!(m.sharing, Sharing::Locked);
        assert_eq!(
            (m.mode, m.uid, m.gid),
            (Some(0o700), Some(1000), Some(3000))
        );
        assert!(m.readonly);
        let m = parse("type=bind,from=build,src=/out,dst=/in,rw=true").unwrap();
        assert!(!m.readonly);
        assert_eq!(m.from.as_deref(), Some("build"));
        let m = parse("\"type=bind\",\"target=/a,b\"").unwrap();
        assert_eq!(m.target.as_deref(), Some("/a,b"));
    }

    #[test]
    fn refusals() {
        for bad in [
            "type=nope,target=/x",
            "type=bind,target=/x,mode=0700",
            "type=tmpfs,target=/x,uid=1",
            "type=bind,target=/x,sharing=locked",
            "type=cache,target=/x,sharing=sometimes",
            "type=secret,id=a,source=b",
            "type=secret,id=a,from=x",
            "type=secret",
            "type=cache",
            "type=bind,target=/x,required",
            "type=bind,target=/x,size=1m",
            "type=bind,target=/x,bogus=1",
            "type=bind,target=/x,flag",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ram_sizes() {
        assert_eq!(parse_ram_size("1024").unwrap(), 1024);
        assert_eq!(parse_ram_size("1k").unwrap(), 1024);
        assert_eq!(parse_ram_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_ram_size("1g").unwrap(), 1 << 30);
        assert!(parse_ram_size("lots").is_err());
    }
}
