//! Micro benchmarks of the layer pipeline's stages, through the library API:
//! sha256, gzip (levels 1 and 6, 1 and 2 threads), zstd, tar writing, and a whole layer build of
//! a generated tree on disk. Run with `cargo bench --bench layer`; the side-by-side comparison
//! with the peers is `benches/compare.sh`.
//!
//! Inputs are generated from a fixed seed with the same mix as the macro workload: token-reusing
//! "DLL" bytes (~2.8× compressible), JSON text, and incompressible runs.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use divan::Bencher;
use divan::counter::BytesCount;
use strata::Compression;
use strata::digest::{Hasher, HashingWriter};
use strata::layer::{Entry, FileSource, LayerWriter};

fn main() {
    divan::main();
}

/// A tiny seeded generator (xorshift64*), so the inputs are the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(n)
            .collect()
    }
}

/// `len` bytes of the workload's mix: 60% DLL-like, 15% JSON, 25% incompressible.
fn mixed(rng: &mut Rng, len: usize) -> Vec<u8> {
    let tokens: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let n = 4 + rng.below(44) as usize;
            rng.bytes(n)
        })
        .collect();
    let mut out = Vec::with_capacity(len + 4096);
    while out.len() < len {
        match rng.below(100) {
            0..60 => {
                for _ in 0..64 {
                    // Skewed reuse: low token indices are far more common.
                    let a = rng.below(4096);
                    let i = (a * a / 4096) as usize;
                    out.extend_from_slice(&tokens[i]);
                }
            }
            60..75 => {
                for _ in 0..16 {
                    let id = rng.below(1000);
                    writeln!(
                        out,
                        "  \"field{id}\": {{ \"required\": true, \"id\": {id} }},"
                    )
                    .expect("writing to a Vec cannot fail");
                }
            }
            _ => out.extend_from_slice(&rng.bytes(1024)),
        }
    }
    out.truncate(len);
    out
}

const MIB: usize = 1 << 20;

/// 8 MiB of mixed content, the input of the hash and compression benchmarks.
static DATA: LazyLock<Arc<[u8]>> = LazyLock::new(|| mixed(&mut Rng(5), 8 * MIB).into());

/// One in-memory file holding [`DATA`]: compression cost with negligible tar overhead.
fn one_file() -> Vec<Entry> {
    vec![Entry::file(
        "app/data.bin",
        FileSource::Bytes(DATA.clone()),
        DATA.len() as u64,
        0o644,
        0,
        0,
    )]
}

/// Write a layer to a hashing sink, as a blob writer would (minus the disk).
fn build(writer: &LayerWriter, entries: Vec<Entry>) -> strata::Digest {
    let (stats, out) = writer
        .write(entries, HashingWriter::new(io::sink()))
        .expect("layer write");
    divan::black_box(stats);
    out.finish().0
}

#[divan::bench(sample_count = 20)]
fn sha256(bencher: Bencher) {
    let data = DATA.clone();
    bencher.counter(BytesCount::new(data.len())).bench(|| {
        let mut h = Hasher::new();
        h.update(&data);
        h.finish()
    });
}

#[divan::bench(consts = [1, 6], args = [1, 2], sample_count = 5)]
fn gzip<const LEVEL: i32>(bencher: Bencher, threads: u32) {
    let writer = LayerWriter::new()
        .compression(Compression::Gzip)
        .level(Some(LEVEL))
        .threads(threads);
    bencher
        .counter(BytesCount::new(DATA.len()))
        .with_inputs(one_file)
        .bench_values(|entries| build(&writer, entries));
}

#[divan::bench(args = [1, 2], sample_count = 10)]
fn zstd3(bencher: Bencher, threads: u32) {
    let writer = LayerWriter::new()
        .compression(Compression::Zstd)
        .level(Some(3))
        .threads(threads);
    bencher
        .counter(BytesCount::new(DATA.len()))
        .with_inputs(one_file)
        .bench_values(|entries| build(&writer, entries));
}

/// 2,000 small in-memory files (4 KiB each) written as an uncompressed tar: header and
/// padding cost, sorting, hashing of the tar stream.
#[divan::bench(sample_count = 20)]
fn tar_2000_files(bencher: Bencher) {
    let content: Arc<[u8]> = DATA[..4096].into();
    let entries = || -> Vec<Entry> {
        let mut v = vec![Entry::dir("app", 0o755, 0, 0)];
        for d in 0..20 {
            v.push(Entry::dir(format!("app/d{d:02}"), 0o755, 0, 0));
            for f in 0..100 {
                v.push(Entry::file(
                    format!("app/d{d:02}/file{f:03}.json"),
                    FileSource::Bytes(content.clone()),
                    4096,
                    0o644,
                    0,
                    0,
                ));
            }
        }
        v
    };
    let writer = LayerWriter::new().compression(Compression::None);
    bencher
        .counter(BytesCount::new(2000 * 4096usize))
        .with_inputs(entries)
        .bench_values(|e| build(&writer, e));
}

/// A 24 MiB tree of 600 files on disk (sizes 1 KiB – 200 KiB, the workload's mix), read
/// through `FileSource::Path` and written as a gzip -6 layer with 2 threads.
struct Tree {
    _dir: tempfile::TempDir,
    files: Vec<(PathBuf, PathBuf, u64)>,
    bytes: u64,
}

static TREE: LazyLock<Tree> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng(7);
    let pool = mixed(&mut rng, 24 * MIB);
    let mut files = Vec::new();
    let mut off = 0usize;
    let mut bytes = 0;
    for i in 0..600 {
        let len = 1024 + rng.below(80 * 1024) as usize;
        let len = len.min(pool.len() - off);
        let rel = PathBuf::from(format!("app/d{:02}/f{i:04}.bin", i % 12));
        let abs = dir.path().join(&rel);
        fs_err::create_dir_all(abs.parent().expect("has a parent")).expect("mkdir");
        fs_err::write(&abs, &pool[off..off + len]).expect("write");
        off = (off + len) % (pool.len() - 200 * 1024);
        bytes += len as u64;
        files.push((rel, abs, len as u64));
    }
    Tree {
        _dir: dir,
        files,
        bytes,
    }
});

#[divan::bench(args = [1, 2], sample_count = 5)]
fn layer_build_tree_gzip6(bencher: Bencher, threads: u32) {
    let tree = &*TREE;
    let entries = || -> Vec<Entry> {
        let mut v = vec![Entry::dir("app", 0o755, 0, 0)];
        v.extend((0..12).map(|d| Entry::dir(format!("app/d{d:02}"), 0o755, 0, 0)));
        v.extend(tree.files.iter().map(|(rel, abs, len)| {
            Entry::file(rel, FileSource::Path(abs.clone()), *len, 0o644, 0, 0)
        }));
        v
    };
    let writer = LayerWriter::new()
        .compression(Compression::Gzip)
        .level(Some(6))
        .threads(threads);
    bencher
        .counter(BytesCount::new(tree.bytes))
        .with_inputs(entries)
        .bench_values(|e| build(&writer, e));
}
