//! `strata images`, `inspect`, `rmi`, `export`, `fsck`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use super::{UsageError, open_store};
use crate::store::{self, ExportTarget};

/// `strata images`
#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Print only image digests.
    #[arg(short, long)]
    quiet: bool,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// `strata inspect`
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image name, digest or digest prefix.
    reference: String,
    /// Print one field, as a path into the inspect JSON (`.Config.config.Env`, or Go-template
    /// style `{{.Digest}}`).
    #[arg(short, long)]
    format: Option<String>,
    /// Print the raw manifest bytes exactly as stored.
    #[arg(long, conflicts_with = "format")]
    raw: bool,
    /// With --raw, print the raw config bytes instead.
    #[arg(long, requires = "raw")]
    config: bool,
}

/// `strata rmi`
#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Images to remove (names, digests or digest prefixes).
    #[arg(required = true)]
    references: Vec<String>,
}

/// `strata export`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Image name, digest or digest prefix.
    reference: String,
    /// `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` or `docker-archive:FILE[:NAME:TAG]`.
    #[arg(short, long)]
    output: String,
    #[command(flatten)]
    registry: super::registry::RegistryArgs,
}

/// `strata fsck`
#[derive(Args, Debug)]
pub struct FsckArgs {}

/// `strata prune`
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Keep at most this much blob storage (e.g. `10GB`, `512MiB`), removing the least
    /// recently used first.
    #[arg(long = "keep-storage", value_name = "SIZE", value_parser = super::registry::parse_size)]
    keep_storage: Option<u64>,
    /// Only remove what was not used for this long: `until=24h` (units s, m, h, d).
    #[arg(long, value_name = "until=DURATION")]
    filter: Vec<String>,
    /// Also remove tagged images.
    #[arg(short, long)]
    all: bool,
}

/// `strata cache`
#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CacheCommand {
    /// Disk usage by kind.
    Du,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, UsageError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| UsageError(format!("invalid duration {s:?}")))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(UsageError(format!(
                "invalid duration unit in {s:?} (use s, m, h, d)"
            )));
        }
    };
    Ok(std::time::Duration::from_secs(secs))
}

pub(super) fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let mut until = None;
    for f in &a.filter {
        match f.split_once('=') {
            Some(("until", d)) => until = Some(parse_duration(d)?),
            _ => {
                return Err(
                    UsageError(format!("unknown filter {f:?} (expected until=DURATION)")).into(),
                );
            }
        }
    }
    let store = open_store()?;
    let r = store::prune(
        &store,
        &store::PruneOptions {
            keep_storage: a.keep_storage,
            until,
            all: a.all,
        },
    )?;
    for i in &r.images {
        println!("removed image {i}");
    }
    println!(
        "removed {} blobs ({}) and {} cache entries",
        r.blobs,
        human_size(r.bytes),
        r.cache_entries
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn cache(a: CacheArgs) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    match a.command {
        CacheCommand::Du => {
            let du = store::disk_usage(&store)?;
            println!("{:<14} {:>7} {:>12}", "KIND", "BLOBS", "SIZE");
            for (kind, (n, bytes)) in [
                ("images", du.images),
                ("layer cache", du.cache),
                ("unreferenced", du.unreferenced),
            ] {
                println!("{kind:<14} {n:>7} {:>12}", human_size(bytes));
            }
            println!("{:<14} {:>7} {:>12}", "other", "-", human_size(du.other));
            // Parts of "other", counted in directories rather than blobs.
            for (kind, (n, bytes)) in [
                ("  snapshots", du.run.snapshots),
                ("  cache mounts", du.run.mounts),
            ] {
                println!("{kind:<14} {n:>7} {:>12}", human_size(bytes));
            }
            println!("{} cache entries", du.cache_entries);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn images(a: ImagesArgs) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    let mut rows = Vec::new();
    for (name, desc) in store.list()? {
        let image = store
            .image(&desc.digest)
            .with_context(|| format!("read image {}", desc.digest))?;
        let created = image.config.oci.created().clone().unwrap_or_default();
        rows.push((name, desc.digest, image.size(), created));
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let v: Vec<Value> = rows
            .iter()
            .map(
                |(n, d, s, c)| json!({"name": n, "digest": d.to_string(), "size": s, "created": c}),
            )
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if a.quiet {
        for (_, d, _, _) in &rows {
            writeln!(out, "{d}")?;
        }
    } else {
        writeln!(
            out,
            "{:<40} {:<19} {:>10}  CREATED",
            "NAME", "DIGEST", "SIZE"
        )?;
        for (n, d, s, c) in &rows {
            let name = n.as_deref().unwrap_or("<none>");
            writeln!(
                out,
                "{name:<40} {:<19} {:>10}  {c}",
                format!("sha256:{}", d.short()),
                human_size(*s)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1.5 MB`-style sizes (decimal units, as docker prints).
pub(super) fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u])
            .replace(".000 ", " ")
            .to_string()
    }
}

pub(super) fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    let desc = store.resolve(&a.reference)?;
    let image = store.image(&desc.digest)?;
    let mut out = std::io::stdout().lock();
    if a.raw {
        out.write_all(if a.config {
            &image.config_bytes
        } else {
            &image.manifest_bytes
        })?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = store
        .list()?
        .into_iter()
        .filter(|(_, d)| d.digest == desc.digest)
        .filter_map(|(n, _)| n)
        .collect();
    let doc = json!({
        "Names": names,
        "Digest": desc.digest.to_string(),
        "MediaType": desc.media_type.to_string(),
        "Size": image.size(),
        "Manifest": serde_json::from_slice::<Value>(&image.manifest_bytes)?,
        "Config": serde_json::from_slice::<Value>(&image.config_bytes)?,
    });
    match a.format {
        None => writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?,
        Some(f) => {
            let v = select(&doc, &f).ok_or_else(|| {
                UsageError(format!(
                    "--format {f:?}: no such field in the inspect output"
                ))
            })?;
            match v {
                Value::String(s) => writeln!(out, "{s}")?,
                other => writeln!(out, "{}", serde_json::to_string(other)?)?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Walk `.A.B.C` (or `{{.A.B.C}}`) through a JSON document.
fn select<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let p = path.trim();
    let p = p
        .strip_prefix("{{")
        .and_then(|x| x.strip_suffix("}}"))
        .unwrap_or(p)
        .trim();
    let p = p.strip_prefix('.').unwrap_or(p);
    if p.is_empty() {
        return Some(doc);
    }
    p.split('.').try_fold(doc, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

pub(super) fn rmi(a: RmiArgs) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    for r in &a.references {
        let d = store.remove(r)?;
        println!("Untagged: {r} ({d})");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let target: ExportTarget = a.output.parse().map_err(UsageError)?;
    let store = open_store()?;
    let _in_use = store.in_use()?;
    let desc = store.resolve(&a.reference)?;
    let image = store.image(&desc.digest)?;
    if image
        .manifest
        .layers
        .iter()
        .any(|l| !store.has_blob(&l.digest))
    {
        // Layers of a lazy registry base: fetch them now, exports carry every byte.
        let client = a.registry.client(None)?;
        super::registry::runtime()?.block_on(crate::registry::ensure_blobs(
            &client,
            &store,
            &image.manifest.layers,
        ))?;
    }
    store::export(&store, &desc, &target)?;
    println!("{}", desc.digest);
    Ok(ExitCode::SUCCESS)
}

pub(super) fn fsck(_: FsckArgs) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    let r = store::fsck(&store)?;
    for p in &r.problems {
        println!("problem: {p}");
    }
    println!(
        "checked {} blobs and {} images: {} problems ({} leftover temp files)",
        r.blobs,
        r.images,
        r.problems.len(),
        r.temp_files
    );
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_walks_paths() {
        let doc = json!({"Digest": "sha256:x", "Config": {"config": {"Env": ["A=1"]}}});
        assert_eq!(select(&doc, "{{.Digest}}"), Some(&json!("sha256:x")));
        assert_eq!(select(&doc, ".Config.config.Env.0"), Some(&json!("A=1")));
        assert_eq!(select(&doc, ".Nope"), None);
    }

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1_500_000), "1.500 MB");
    }
}
