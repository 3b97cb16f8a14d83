use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::layer::{FsTree, NodeKind, open_decompressed};

fn write(w: &LayerWriter, entries: Vec<Entry>) -> (LayerStats, Vec<u8>) {
    w.write(entries, Vec::new()).unwrap()
}

fn decompress(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    open_decompressed(bytes)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// (path bytes, typeflag, mode, uid, gid, mtime, linkname, content) of every entry.
type Row = (Vec<u8>, u8, u32, u64, u64, u64, Vec<u8>, Vec<u8>);

fn list(tar: &[u8]) -> Vec<Row> {
    let mut a = ::tar::Archive::new(tar);
    let mut rows = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        assert_eq!(h.username_bytes(), Some(&b""[..]), "no uname");
        assert_eq!(h.groupname_bytes(), Some(&b""[..]), "no gname");
        assert!(h.as_ustar().is_some(), "ustar header");
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        rows.push((
            e.path_bytes().into_owned(),
            h.entry_type().as_byte(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            e.link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default(),
            content,
        ));
    }
    rows
}

fn long_dir() -> String {
    (0..12)
        .map(|i| format!("directory{i:02}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn sample() -> Vec<Entry> {
    let long = long_dir();
    let target = format!("/{}/{}", long, "t".repeat(40));
    vec![
        Entry::dir("bin", 0o755, 0, 0),
        Entry::bytes("bin/su", b"#!/bin/sh\n", 0o4755, 0, 0),
        Entry::dir("tmp", 0o1777, 0, 0),
        Entry::dir("etc", 0o755, 0, 0),
        Entry::bytes("etc/shadow", b"root:*:1::::::\n", 0o600, 0, 42),
        Entry::bytes("etc/hosts", b"127.0.0.1 localhost\n", 0o644, 0, 0),
        Entry::symlink("etc/long-link", &target, 0, 0),
        Entry::dir("home", 0o755, 0, 0),
        Entry::dir("home/user", 0o750, 1000, 1000),
        Entry::bytes("home/user/café ñ.txt", "été".as_bytes(), 0o640, 1000, 1000),
        Entry::dir(long.clone(), 0o755, 0, 0),
        Entry::bytes(format!("{long}/{}", "f".repeat(120)), b"deep", 0o644, 0, 0),
    ]
    .into_iter()
    // The long directory's ancestors.
    .chain((1..12).map(|n| {
        let p = long.split('/').take(n).collect::<Vec<_>>().join("/");
        Entry::dir(p, 0o755, 0, 0)
    }))
    .collect()
}

#[test]
fn same_entries_in_any_order_give_the_same_bytes() {
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let w = LayerWriter::new().compression(c).mtime(1_700_000_000);
        let (s1, a) = write(&w, sample());
        let mut rev = sample();
        rev.reverse();
        let (s2, b) = write(&w, rev);
        assert_eq!(a, b, "{c:?}");
        assert_eq!(s1, s2);
    }
}

#[test]
fn thread_count_does_not_change_bytes() {
    // Enough compressible, non-repeating data for zstd to split into several jobs.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let words = [
        &b"layer "[..],
        b"tar ",
        b"digest ",
        b"zstd ",
        b"gzip\n",
        b"strata ",
    ];
    let mut data = Vec::with_capacity(24 << 20);
    while data.len() < 24 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(words[(state % 6) as usize]);
        data.extend_from_slice(&state.to_le_bytes()[..(state >> 60) as usize % 3]);
    }
    let entries = || vec![Entry::bytes("big", &data, 0o644, 0, 0)];
    for c in [Compression::Gzip, Compression::Zstd] {
        let (s1, one) = write(&LayerWriter::new().compression(c).threads(1), entries());
        let (s4, four) = write(&LayerWriter::new().compression(c).threads(4), entries());
        assert_eq!(s1, s4);
        assert!(one == four, "{c:?}: 1 and 4 threads differ");
        assert_eq!(decompress(&one).len() as u64, s1.uncompressed_size);
    }
}

#[test]
fn headers_keep_modes_ids_and_configured_mtime() {
    let w = LayerWriter::new()
        .compression(Compression::Zstd)
        .mtime(1234567890);
    let (_, blob) = write(&w, sample());
    let rows = list(&decompress(&blob));
    let find = |p: &str| rows.iter().find(|r| r.0 == p.as_bytes()).unwrap();
    assert_eq!(find("bin/").2, 0o755);
    assert_eq!(find("bin/su").2, 0o4755);
    assert_eq!(find("tmp/").2, 0o1777);
    assert_eq!(find("etc/shadow").2, 0o600);
    assert_eq!((find("etc/shadow").3, find("etc/shadow").4), (0, 42));
    assert_eq!(find("etc/hosts").2, 0o644);
    assert_eq!(find("home/user/").2, 0o750);
    assert_eq!((find("home/user/").3, find("home/user/").4), (1000, 1000));
    assert_eq!(find("home/user/café ñ.txt").7, "été".as_bytes());
    assert!(rows.iter().all(|r| r.5 == 1234567890));
    // Sorted bytewise, directories with a trailing slash.
    let paths: Vec<&[u8]> = rows
        .iter()
        .map(|r| r.0.strip_suffix(b"/").unwrap_or(&r.0))
        .collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
}

#[test]
fn default_mtime_is_zero_and_atime_ctime_absent() {
    let (_, tar) = write(
        &LayerWriter::new().compression(Compression::None),
        vec![Entry::bytes("a", b"x", 0o644, 0, 0)],
    );
    assert_eq!(list(&tar)[0].5, 0);
    // One header, one content block, two end blocks: no PAX header.
    assert_eq!(tar.len(), 4 * 512);
    assert!(!tar.windows(5).any(|w| w == b"atime"));
}

#[test]
fn long_names_round_trip_through_tar_and_fstree() {
    let (_, blob) = write(&LayerWriter::new(), sample());
    let tar = decompress(&blob);
    let rows = list(&tar);
    let long = long_dir();
    let deep = format!("{long}/{}", "f".repeat(120));
    let row = rows.iter().find(|r| r.0 == deep.as_bytes()).unwrap();
    assert_eq!(row.7, b"deep");
    let target = format!("/{}/{}", long, "t".repeat(40));
    let link = rows.iter().find(|r| r.0 == b"etc/long-link").unwrap();
    assert_eq!((link.1, link.6.as_slice()), (b'2', target.as_bytes()));
    // A 134-byte directory name fits ustar's prefix split: no PAX header for it.
    let mid = long.split('/').take(10).collect::<Vec<_>>().join("/") + "/";
    assert!(mid.len() > 100 && ustar_split(mid.as_bytes()).is_some());
    assert!(ustar_split(deep.as_bytes()).is_none());

    let mut tree = FsTree::new();
    tree.apply_tar(&tar[..], None).unwrap();
    assert!(matches!(
        tree.get(&deep).unwrap().kind,
        NodeKind::File { size: 4, .. }
    ));
    assert_eq!(
        tree.get("etc/long-link").unwrap().kind,
        NodeKind::Symlink {
            target: PathBuf::from(&target)
        }
    );
    assert_eq!(tree.get("bin/su").unwrap().mode, 0o4755);
}

#[test]
fn non_utf8_long_names_use_binary_pax() {
    let mut name = b"x/".to_vec();
    name.extend(std::iter::repeat_n(0xff, 120));
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&name));
    let (_, tar) = write(
        &LayerWriter::new().compression(Compression::None),
        vec![
            Entry::dir("x", 0o755, 0, 0),
            Entry::bytes(&path, b"z", 0o644, 0, 0),
        ],
    );
    assert!(tar.windows(17).any(|w| w == b"hdrcharset=BINARY"));
    assert_eq!(list(&tar)[1].0, name);
}

#[test]
fn large_ids_use_pax_and_round_trip() {
    let (_, tar) = write(
        &LayerWriter::new().compression(Compression::None),
        vec![Entry::bytes("a", b"x", 0o644, 1 << 32, 3_000_000)],
    );
    let row = &list(&tar)[0];
    assert_eq!((row.3, row.4), (1 << 32, 3_000_000));
}

#[test]
fn huge_sizes_get_a_pax_size_record() {
    let h = HeaderFields {
        name: b"big".to_vec(),
        typeflag: b'0',
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: 9 << 30,
        mtime: 0,
        linkname: Vec::new(),
    };
    let mut out = Vec::new();
    write_header(&mut out, &h).unwrap();
    assert_eq!(out.len(), 3 * 512);
    assert_eq!(out[156], b'x');
    let record = format!("size={}\n", 9u64 << 30);
    assert!(out.windows(record.len()).any(|w| w == record.as_bytes()));
    assert_eq!(pax_records(&[("path", b"a".to_vec())]), b"9 path=a\n");
    // The length field's own digits count: 9 bytes + 2 digits.
    assert_eq!(pax_records(&[("path", vec![b'a'; 2])]), b"11 path=aa\n");
}

#[test]
fn hardlinks_store_content_once_under_the_first_path() {
    let f = |p: &str| Entry::bytes(p, b"shared", 0o755, 0, 0).with_link_key(7);
    let a = vec![f("usr/bin/c"), f("usr/bin/a"), f("usr/bin/b")];
    let b = vec![f("usr/bin/b"), f("usr/bin/a"), f("usr/bin/c")];
    let w = LayerWriter::new().compression(Compression::None);
    let (_, ta) = write(&w, a);
    let (_, tb) = write(&w, b);
    assert_eq!(ta, tb);
    let rows = list(&ta);
    assert_eq!((rows[0].0.as_slice(), rows[0].1), (&b"usr/bin/a"[..], b'0'));
    assert_eq!(rows[0].7, b"shared");
    for r in &rows[1..] {
        assert_eq!((r.1, r.6.as_slice()), (b'1', &b"usr/bin/a"[..]));
    }
    let mut tree = FsTree::new();
    let spool = tempfile::tempdir().unwrap();
    tree.apply_tar(&ta[..], Some(spool.path())).unwrap();
    let key = |p| match &tree.get(p).unwrap().kind {
        NodeKind::File { link_key, .. } => *link_key,
        _ => panic!("not a file"),
    };
    assert!(key("usr/bin/a").is_some());
    assert_eq!(key("usr/bin/a"), key("usr/bin/c"));
    let mut s = String::new();
    tree.open("usr/bin/c")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "shared");
}

#[test]
fn file_sources_must_match_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ten");
    std::fs::write(&p, b"0123456789").unwrap();
    let w = LayerWriter::new();
    let entry = |size| Entry::file("f", FileSource::Path(p.clone()), size, 0o644, 0, 0);
    let (_, ok) = write(&w, vec![entry(10)]);
    assert_eq!(list(&decompress(&ok))[0].7, b"0123456789");
    for size in [5, 20] {
        let err = w.write(vec![entry(size)], Vec::new()).unwrap_err();
        assert!(matches!(err, LayerError::SizeMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&*p.to_string_lossy()), "{err}");
    }
    let mut bad = Entry::bytes("b", b"abc", 0o644, 0, 0);
    if let EntryKind::File { size, .. } = &mut bad.kind {
        *size = 4;
    }
    assert!(w.write(vec![bad], Vec::new()).is_err());
    // A symlink where a file was expected is not followed.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let e = Entry::file("f", FileSource::Path(link), 10, 0o644, 0, 0);
    assert!(w.write(vec![e], Vec::new()).is_err());
}

#[test]
fn diff_id_is_the_sha256_of_the_uncompressed_tar() {
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let (stats, blob) = write(&LayerWriter::new().compression(c), sample());
        let tar = decompress(&blob);
        assert_eq!(stats.diff_id, Digest::of(&tar), "{c:?}");
        assert_eq!(stats.uncompressed_size, tar.len() as u64);
        assert_eq!(tar.len() % 512, 0);
    }
}

#[test]
fn gzip_header_is_fixed() {
    let (_, gz) = write(&LayerWriter::new(), sample());
    // magic, deflate, no flags (no name), mtime 0, XFL, OS 255.
    assert_eq!(&gz[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    assert_eq!(gz[9], 255);
}

#[test]
fn bad_input_is_refused() {
    let w = LayerWriter::new();
    let dup = vec![
        Entry::dir("a", 0o755, 0, 0),
        Entry::bytes("a", b"", 0o644, 0, 0),
    ];
    assert!(matches!(
        w.write(dup, Vec::new()),
        Err(LayerError::DuplicatePath { .. })
    ));
    for p in ["../x", "/abs", "a/../b", "a/", "a//b", "./a", ""] {
        let r = w.write(vec![Entry::dir(p, 0o755, 0, 0)], Vec::new());
        assert!(
            matches!(r, Err(LayerError::InvalidPath { .. })),
            "{p:?} accepted"
        );
    }
    let bad_level = LayerWriter::new().level(Some(10)).write(vec![], Vec::new());
    assert!(matches!(bad_level, Err(LayerError::InvalidLevel { .. })));
    let bad_level = LayerWriter::new()
        .compression(Compression::Zstd)
        .level(Some(0))
        .write(vec![], Vec::new());
    assert!(matches!(bad_level, Err(LayerError::InvalidLevel { .. })));
}

#[test]
fn gnu_tar_lists_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    let mut entries = sample();
    entries.push(Entry::bytes("bin/a", b"x", 0o755, 0, 0).with_link_key(1));
    entries.push(Entry::bytes("bin/b", b"x", 0o755, 0, 0).with_link_key(1));
    let (_, tar) = write(&LayerWriter::new().compression(Compression::None), entries);
    std::fs::write(&file, &tar).unwrap();
    let out = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-tvf")
        .arg(&file)
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .output()
        .expect("GNU tar is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |p: &str| {
        stdout
            .lines()
            .find(|l| l.ends_with(p) || l.contains(&format!(" {p} ")))
            .unwrap_or_else(|| panic!("{p} missing from:\n{stdout}"))
            .to_string()
    };
    assert!(
        line("bin/su").starts_with("-rwsr-xr-x 0/0"),
        "{}",
        line("bin/su")
    );
    assert!(line("tmp/").starts_with("drwxrwxrwt 0/0"));
    assert!(line("etc/shadow").starts_with("-rw------- 0/42"));
    assert!(line("bin/b link to bin/a").starts_with("hrwxr-xr-x"));
    assert!(line("etc/long-link").contains(&"t".repeat(40)));
    assert!(line(&"f".repeat(120)).contains("1970-01-01 00:00"));
    // And it extracts: content and a long path land where they should.
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let st = Command::new("tar")
        .args(["--no-same-owner", "-xf"])
        .arg(&file)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let deep = x.join(long_dir()).join("f".repeat(120));
    assert_eq!(std::fs::read(deep).unwrap(), b"deep");
    assert!(Path::new(&x.join("bin/su")).is_file());
    // The parallel gzip and zstd outputs are readable by the real tools too.
    for (c, flag) in [(Compression::Gzip, "-tzf"), (Compression::Zstd, "--zstd")] {
        let w = LayerWriter::new().compression(c).threads(3);
        let (_, blob) = write(&w, sample());
        let f = dir.path().join("layer.blob");
        std::fs::write(&f, &blob).unwrap();
        let mut cmd = Command::new("tar");
        if flag == "--zstd" {
            cmd.args(["--zstd", "-tf"]);
        } else {
            cmd.arg(flag);
        }
        let out = cmd.arg(&f).output().unwrap();
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            sample().len()
        );
    }
}

/// A tree shaped like a published app: many files, some larger than a gzip block, with
/// pseudo-random but compressible content. `grow` appends to one file near the front.
fn app_tree(grow: &[u8]) -> Vec<Entry> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut entries = vec![Entry::dir("app", 0o755, 0, 0)];
    for i in 0..60 {
        let len = [300usize, 5_000, 40_000, 150_000, 300_000][i % 5];
        let content: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b"abcdefgh  ,;{}\n0123"[(state % 19) as usize]
            })
            .collect();
        let mut content = content;
        if i == 7 {
            content.extend_from_slice(grow);
        }
        entries.push(Entry::bytes(format!("app/f{i:03}"), &content, 0o644, 0, 0));
    }
    entries
}

#[test]
fn reused_gzip_blocks_give_the_bytes_of_a_fresh_build() {
    let dir = tempfile::tempdir().unwrap();
    let w = LayerWriter::new().threads(2);
    // First build: record where the blocks land.
    let (s1, first, records) = w
        .clone()
        .block_reuse(true, None)
        .write_recorded(app_tree(b""), Vec::new())
        .unwrap();
    assert_eq!(
        write(&w, app_tree(b"")),
        (s1, first.clone()),
        "recording changes nothing"
    );
    assert!(records.len() > 30, "{} blocks recorded", records.len());
    let blob = dir.path().join("blob");
    std::fs::write(&blob, &first).unwrap();

    // One file grows by a line: most blocks come from the first blob, and the bytes are
    // exactly those of a build that compresses everything.
    let reuse = std::sync::Arc::new(ReuseSource::new(
        std::fs::File::open(&blob).unwrap(),
        &records,
    ));
    let (s2, second, _) = w
        .clone()
        .block_reuse(true, Some(reuse.clone()))
        .write_recorded(app_tree(b"{ \"x\": 1 }\n"), Vec::new())
        .unwrap();
    let fresh = write(&w, app_tree(b"{ \"x\": 1 }\n"));
    assert_eq!((s2, second.clone()), fresh);
    assert_ne!(second, first);
    assert!(
        reuse.hits() + 8 >= records.len(),
        "only {} of {} blocks reused",
        reuse.hits(),
        records.len()
    );

    // A damaged source block is compressed again, never copied.
    let mut damaged = first.clone();
    for r in &records {
        let at = usize::try_from(r.offset).unwrap() + 5;
        damaged[at] ^= 0xff;
    }
    std::fs::write(&blob, &damaged).unwrap();
    let reuse = std::sync::Arc::new(ReuseSource::new(
        std::fs::File::open(&blob).unwrap(),
        &records,
    ));
    let (_, third, _) = w
        .clone()
        .block_reuse(false, Some(reuse.clone()))
        .write_recorded(app_tree(b""), Vec::new())
        .unwrap();
    assert_eq!(third, first);
    assert_eq!(reuse.hits(), 0);
}

#[test]
fn a_set_stop_flag_ends_the_write_with_cancelled() {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = LayerWriter::new().stop_on(Some(flag.clone()));
    // Not set: the layer is written as without a flag.
    assert_eq!(
        write(&w, sample()).1,
        write(&LayerWriter::new(), sample()).1
    );
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = w.write(sample(), Vec::new()).unwrap_err();
    assert!(matches!(err, LayerError::Cancelled), "{err:?}");
}
