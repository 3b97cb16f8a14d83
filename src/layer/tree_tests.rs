use std::io::Read;
use std::path::Path;

use super::*;
use crate::layer::LayerWriter;
use crate::media::Compression;

/// A plain tar of `entries`, written by strata's writer.
fn layer(entries: Vec<Entry>) -> Vec<u8> {
    LayerWriter::new()
        .compression(Compression::None)
        .write(entries, Vec::new())
        .unwrap()
        .1
}

/// A tar with hand-made headers (name bytes verbatim, no validation), for hostile input.
fn raw_tar(entries: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, typeflag, link) in entries {
        let mut h = ::tar::Header::new_ustar();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name);
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_entry_type(::tar::EntryType::new(*typeflag));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn paths(tree: &FsTree) -> Vec<String> {
    tree.walk(Path::new(""))
        .map(|(p, _)| p.to_string_lossy().into_owned())
        .collect()
}

fn content(tree: &FsTree, path: &str) -> String {
    let mut s = String::new();
    tree.open(path).unwrap().read_to_string(&mut s).unwrap();
    s
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_content() {
    let mut tree = FsTree::new();
    let lower = vec![
        Entry::dir("a", 0o755, 0, 0),
        Entry::bytes("a/x", b"x", 0o644, 0, 0),
        Entry::bytes("a/y", b"y", 0o644, 0, 0),
        Entry::dir("b", 0o755, 0, 0),
        Entry::dir("b/sub", 0o755, 0, 0),
        Entry::bytes("b/sub/z", b"z", 0o644, 0, 0),
        Entry::bytes("b/old", b"o", 0o644, 0, 0),
        Entry::bytes("c", b"c", 0o644, 0, 0),
        Entry::dir("d", 0o755, 0, 0),
        Entry::bytes("d/inner", b"i", 0o644, 0, 0),
    ];
    tree.apply_tar(&layer(lower)[..], None).unwrap();
    let upper = vec![
        Entry::dir("a", 0o755, 0, 0),
        Entry::bytes("a/.wh.x", b"", 0o644, 0, 0),
        Entry::dir("b", 0o700, 0, 0),
        // Sorts before the marker, and must survive it.
        Entry::bytes("b/.new", b"n", 0o644, 0, 0),
        Entry::bytes("b/.wh..wh..opq", b"", 0o644, 0, 0),
        Entry::dir("c", 0o755, 0, 0),
        Entry::bytes("c/now-a-dir", b"", 0o644, 0, 0),
        Entry::bytes("d", b"file now", 0o644, 0, 0),
        Entry::bytes(".wh.missing", b"", 0o644, 0, 0),
    ];
    let spool = tempfile::tempdir().unwrap();
    tree.apply_tar(&layer(upper)[..], Some(spool.path()))
        .unwrap();
    assert_eq!(
        paths(&tree),
        ["a", "a/y", "b", "b/.new", "c", "c/now-a-dir", "d"]
    );
    assert_eq!(tree.get("b").unwrap().mode, 0o700);
    assert!(!tree.get("d").unwrap().is_dir());
    assert_eq!(content(&tree, "b/.new"), "n");
    assert_eq!(content(&tree, "/d"), "file now");
    // Lower content was applied without a spool: metadata only.
    assert!(matches!(
        tree.open("a/y"),
        Err(LayerError::ContentUnavailable { .. })
    ));
}

#[test]
fn entries_whiteouts_apply_too() {
    let mut tree = FsTree::new();
    tree.apply_entries(&[
        Entry::dir("etc", 0o755, 0, 0),
        Entry::bytes("etc/a", b"a", 0o644, 0, 0),
    ])
    .unwrap();
    tree.apply_entries(&[Entry::bytes("etc/.wh.a", b"", 0o644, 0, 0)])
        .unwrap();
    assert_eq!(paths(&tree), ["etc"]);
}

#[test]
fn escaping_entries_are_refused() {
    for name in [&b"../evil"[..], b"a/../../evil", b"./../x", b"/../x"] {
        let mut tree = FsTree::new();
        let r = tree.apply_tar(&raw_tar(&[(name, b'0', b"")])[..], None);
        assert!(
            matches!(r, Err(LayerError::InvalidPath { .. })),
            "{} accepted",
            String::from_utf8_lossy(name)
        );
    }
    let mut tree = FsTree::new();
    let r = tree.apply_tar(
        &raw_tar(&[(b"f", b'0', b""), (b"link", b'1', b"../f")])[..],
        None,
    );
    assert!(matches!(r, Err(LayerError::InvalidPath { .. })), "{r:?}");
    // Leading `/` and `./` are normal and stripped.
    let mut tree = FsTree::new();
    tree.apply_tar(
        &raw_tar(&[(b"/abs", b'0', b""), (b"./rel/", b'5', b"")])[..],
        None,
    )
    .unwrap();
    assert_eq!(paths(&tree), ["abs", "rel"]);
}

#[test]
fn entries_never_land_behind_a_symlink() {
    let mut tree = FsTree::new();
    tree.apply_entries(&[Entry::symlink("etc", "/outside", 0, 0)])
        .unwrap();
    tree.apply_entries(&[Entry::bytes("etc/passwd", b"", 0o644, 0, 0)])
        .unwrap();
    assert!(tree.get("etc").unwrap().is_dir());
    assert!(tree.get("etc/passwd").is_some());
    assert!(tree.get("outside").is_none());
}

#[test]
fn unsupported_and_special_entries() {
    let mut tree = FsTree::new();
    let r = tree.apply_tar(&raw_tar(&[(b"volume", b'M', b"")])[..], None);
    assert!(matches!(r, Err(LayerError::UnsupportedEntry { .. })));
    tree.apply_tar(
        &raw_tar(&[(b"dev/null", b'3', b""), (b"fifo", b'6', b"")])[..],
        None,
    )
    .unwrap();
    assert!(matches!(
        tree.get("dev/null").unwrap().kind,
        NodeKind::Special {
            kind: SpecialKind::Char,
            major: 1,
            minor: 3
        }
    ));
    assert!(matches!(
        tree.entries_under("dev"),
        Err(LayerError::SpecialFile { .. })
    ));
    let r = tree.apply_tar(&raw_tar(&[(b"h", b'1', b"nowhere")])[..], None);
    assert!(matches!(r, Err(LayerError::BadHardlink { .. })));
}

fn link_tree() -> FsTree {
    let mut tree = FsTree::new();
    tree.apply_entries(&[
        Entry::dir("usr", 0o755, 0, 0),
        Entry::dir("usr/lib", 0o755, 0, 0),
        Entry::bytes("usr/lib/libc.so", b"elf", 0o755, 0, 0),
        Entry::symlink("lib", "usr/lib", 0, 0),
        Entry::symlink("abs", "/usr/lib/libc.so", 0, 0),
        Entry::symlink("usr/lib/up", "../../../../..", 0, 0),
        Entry::symlink("usr/lib/etc", "/../../etc", 0, 0),
        Entry::symlink("loop1", "loop2", 0, 0),
        Entry::symlink("loop2", "/loop1", 0, 0),
        Entry::symlink("dangling", "usr/nothing/here", 0, 0),
    ])
    .unwrap();
    tree
}

#[test]
fn symlinks_resolve_inside_the_root() {
    let tree = link_tree();
    let r = |p: &str, follow| {
        tree.resolve(p, follow)
            .unwrap()
            .map(|p| p.to_string_lossy().into_owned())
    };
    assert_eq!(r("lib/libc.so", true).as_deref(), Some("usr/lib/libc.so"));
    assert_eq!(r("/abs", true).as_deref(), Some("usr/lib/libc.so"));
    assert_eq!(r("abs", false).as_deref(), Some("abs"));
    assert_eq!(r("lib/up", true).as_deref(), Some(""));
    assert_eq!(r("lib/up/usr/../../../lib", false).as_deref(), Some("lib"));
    assert_eq!(r("lib/etc", true), None);
    assert_eq!(
        tree.resolve_lenient("lib/etc/passwd", true).unwrap(),
        Path::new("etc/passwd")
    );
    assert_eq!(r("dangling", true), None);
    assert_eq!(
        tree.resolve_lenient("dangling", true).unwrap(),
        Path::new("usr/nothing/here")
    );
    assert!(matches!(
        tree.resolve("loop1", true),
        Err(LayerError::SymlinkLoop { .. })
    ));
    assert_eq!(r("loop1", false).as_deref(), Some("loop1"));
    assert!(matches!(
        tree.resolve("abs/x", true),
        Err(LayerError::NotADirectory { .. })
    ));
    assert_eq!(content(&tree, "lib/libc.so"), "elf");
}

#[test]
fn children_walk_and_entries_under() {
    let tree = link_tree();
    let kids: Vec<_> = tree
        .children(Path::new("usr/lib"))
        .map(|(p, _)| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(kids, ["usr/lib/etc", "usr/lib/libc.so", "usr/lib/up"]);
    let entries = tree.entries_under("usr").unwrap();
    let names: Vec<_> = entries.iter().map(|e| e.path.to_string_lossy()).collect();
    assert_eq!(
        names,
        [
            "usr",
            "usr/lib",
            "usr/lib/etc",
            "usr/lib/libc.so",
            "usr/lib/up"
        ]
    );
    // The subtree copies into a fresh tree through a written layer.
    let mut copy = FsTree::new();
    copy.apply_tar(&layer(entries)[..], None).unwrap();
    assert_eq!(copy.get("usr/lib/up"), tree.get("usr/lib/up"));
    assert_eq!(tree.entries_under("/").unwrap().len(), paths(&tree).len());
    assert!(matches!(
        tree.entries_under("nope"),
        Err(LayerError::NotFound { .. })
    ));
}

#[test]
fn users_and_groups_come_from_the_tree() {
    let mut tree = FsTree::new();
    assert_eq!(tree.lookup_user("root").unwrap(), None);
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1001::/home/app:/bin/false\nbad:x:z:1::/:/bin/sh\n";
    let group = b"root:x:0:\nstaff:x:50:app\n";
    let tar = layer(vec![
        Entry::dir("etc", 0o755, 0, 0),
        Entry::bytes("etc/passwd", passwd, 0o644, 0, 0),
        Entry::bytes("etc/group", group, 0o644, 0, 0),
    ]);
    let spool = tempfile::tempdir().unwrap();
    tree.apply_tar(&tar[..], Some(spool.path())).unwrap();
    let app = tree.lookup_user("app").unwrap().unwrap();
    assert_eq!(
        (app.uid, app.gid, app.home.as_str()),
        (1000, 1001, "/home/app")
    );
    assert_eq!(tree.lookup_user("nobody").unwrap(), None);
    assert!(matches!(
        tree.lookup_user("bad"),
        Err(LayerError::BadDatabase { line: 4, .. })
    ));
    assert_eq!(tree.lookup_group("staff").unwrap(), Some(50));
    assert_eq!(tree.lookup_group("wheel").unwrap(), None);
}

#[test]
fn entry_link_keys_are_remapped_per_layer() {
    let mut tree = FsTree::new();
    let f = |p: &str| Entry::bytes(p, b"1", 0o644, 0, 0).with_link_key(1);
    tree.apply_entries(&[f("a"), f("b")]).unwrap();
    tree.apply_entries(&[f("c")]).unwrap();
    let key = |p| match tree.get(p).unwrap().kind {
        NodeKind::File { link_key, .. } => link_key,
        _ => None,
    };
    assert_eq!(key("a"), key("b"));
    assert_ne!(key("a"), key("c"));
}

#[test]
fn tree_keys_order_like_paths() {
    // Byte order with `/` lowest must agree with Path's component order for every pair of
    // normalised paths, or a subtree would not be one contiguous range.
    let names = [
        "", "a", "a-b", "a.b", "a/b", "a/b/c", "a/b-c", "a/b.c", "a/bc", "ab", "a b", "a\u{1}",
        "a/\u{7f}", "a/\u{e9}", "b", "a/b/c/d", "a0", "a/", "z/a", "a/-", "a!/b",
    ];
    let norm = |s: &str| -> PathBuf { s.split('/').filter(|c| !c.is_empty()).collect() };
    for x in names {
        for y in names {
            let (px, py) = (norm(x), norm(y));
            assert_eq!(
                KeyRef::new(&px).cmp(KeyRef::new(&py)),
                px.as_path().cmp(py.as_path()),
                "{x:?} vs {y:?}"
            );
        }
    }
}
