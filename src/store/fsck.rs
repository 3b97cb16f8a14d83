//! `strata fsck`: verify every blob against its name, and every reference down to the
//! diff_ids of its layers.

use std::collections::BTreeSet;
use std::io;

use fs_err as fs;

use super::{OciIndex, REF_NAME, Store, StoreError};
use crate::digest::{Digest, digest_reader};
use crate::image::Image;
use crate::layer::open_decompressed;

/// What fsck found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Blob files hashed.
    pub blobs: usize,
    /// Images (index entries) checked.
    pub images: usize,
    /// Leftover temp files (interrupted writes; harmless, never referenced).
    pub temp_files: usize,
    /// Problems, one line each. Empty means the store is consistent.
    pub problems: Vec<String>,
}

/// Check the whole store.
pub fn fsck(store: &Store) -> Result<FsckReport, StoreError> {
    let mut report = FsckReport::default();
    let mut good = BTreeSet::new();
    for entry in fs::read_dir(store.root().join("blobs/sha256"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        report.blobs += 1;
        let Ok(expected) = Digest::from_hex(&name) else {
            report
                .problems
                .push(format!("blobs/sha256/{name}: not a sha256 file name"));
            continue;
        };
        let (found, _) = digest_reader(fs::File::open(entry.path())?)?;
        if found == expected {
            good.insert(expected);
        } else {
            report
                .problems
                .push(format!("blob {expected}: content hashes to {found}"));
        }
    }
    report.temp_files = fs::read_dir(store.root().join("tmp"))?.count();

    let index = match OciIndex::read(store.root()) {
        Ok(i) => i,
        Err(e) => {
            report.problems.push(format!("index.json: {e}"));
            return Ok(report);
        }
    };
    for desc in &index.manifests {
        report.images += 1;
        let name = desc
            .annotations
            .get(REF_NAME)
            .cloned()
            .unwrap_or_else(|| desc.digest.to_string());
        let mut problem = |p: String| report.problems.push(format!("{name}: {p}"));
        if !good.contains(&desc.digest) {
            problem(format!("manifest {} missing or corrupt", desc.digest));
            continue;
        }
        let image = match store.image(&desc.digest) {
            Ok(i) => i,
            Err(e) => {
                problem(e.to_string());
                continue;
            }
        };
        if image.manifest_bytes.len() as u64 != desc.size {
            problem(format!(
                "index.json says {} bytes, manifest has {}",
                desc.size,
                image.manifest_bytes.len()
            ));
        }
        for p in check_layers(store, &image, &good)? {
            problem(p);
        }
    }
    Ok(report)
}

fn check_layers(
    store: &Store,
    image: &Image,
    good: &BTreeSet<Digest>,
) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let layers = match image.layers() {
        Ok(l) => l,
        Err(e) => return Ok(vec![e.to_string()]),
    };
    for layer in layers {
        let d = layer.descriptor.digest;
        if !good.contains(&d) {
            if store.has_blob(&d) || store.blob_source(&d).is_none() {
                problems.push(format!("layer {d} missing or corrupt"));
            }
            // Otherwise the layer lives in a registry until something needs its bytes.
            continue;
        }
        let size = fs::metadata(store.blob_path(&d))?.len();
        if size != layer.descriptor.size {
            problems.push(format!(
                "layer {d}: manifest says {} bytes, blob has {size}",
                layer.descriptor.size
            ));
        }
        let reader = io::BufReader::new(store.open_blob(&d)?);
        match open_decompressed(reader).and_then(|r| digest_reader(r).map_err(Into::into)) {
            Ok((diff_id, _)) if diff_id == layer.diff_id => {}
            Ok((diff_id, _)) => problems.push(format!(
                "layer {d}: diff_id is {diff_id}, config says {}",
                layer.diff_id
            )),
            Err(e) => problems.push(format!("layer {d}: {e}")),
        }
    }
    Ok(problems)
}
