//! User-namespace id maps: which container ids exist and which host ids back them.
//!
//! As real root the container gets 0..65536 mapped to the same host ids. An unprivileged caller
//! with ranges in `/etc/subuid` and `/etc/subgid` (and the setuid `newuidmap`/`newgidmap`) gets
//! itself as container root plus the subordinate range from container id 1; otherwise only
//! itself, as container root ([user_namespaces(7)](https://man7.org/linux/man-pages/man7/user_namespaces.7.html)).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Result, SandboxError};

/// One contiguous range of an id map, as in `/proc/<pid>/uid_map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the namespace.
    pub inside: u32,
    /// First host id it stands for.
    pub outside: u32,
    /// Number of ids.
    pub count: u32,
}

/// The uid and gid maps of a sandbox's user namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// Uid ranges.
    pub uids: Vec<IdRange>,
    /// Gid ranges.
    pub gids: Vec<IdRange>,
}

fn to_inside(ranges: &[IdRange], host: u32) -> Option<u32> {
    ranges.iter().find_map(|r| {
        let off = host.checked_sub(r.outside)?;
        (off < r.count).then(|| r.inside + off)
    })
}

fn to_outside(ranges: &[IdRange], inside: u32) -> Option<u32> {
    ranges.iter().find_map(|r| {
        let off = inside.checked_sub(r.inside)?;
        (off < r.count).then(|| r.outside + off)
    })
}

fn describe(ranges: &[IdRange]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| match r.count {
            1 => format!("{}", r.inside),
            n => format!("{}..{}", r.inside, u64::from(r.inside) + u64::from(n)),
        })
        .collect();
    parts.join(", ")
}

impl IdMap {
    /// Host ids `0..count` mapped to themselves.
    pub fn identity(count: u32) -> IdMap {
        let r = IdRange {
            inside: 0,
            outside: 0,
            count,
        };
        IdMap {
            uids: vec![r],
            gids: vec![r],
        }
    }

    /// The container uid a host uid (as stored on disk) stands for.
    pub fn uid_to_container(&self, host: u32) -> Option<u32> {
        to_inside(&self.uids, host)
    }

    /// The container gid a host gid stands for.
    pub fn gid_to_container(&self, host: u32) -> Option<u32> {
        to_inside(&self.gids, host)
    }

    /// The host uid backing a container uid.
    pub fn uid_to_host(&self, inside: u32) -> Option<u32> {
        to_outside(&self.uids, inside)
    }

    /// The host gid backing a container gid.
    pub fn gid_to_host(&self, inside: u32) -> Option<u32> {
        to_outside(&self.gids, inside)
    }

    /// Fail unless `uid`, `gid` and `groups` all exist in the namespace.
    pub(super) fn check_user(&self, uid: u32, gid: u32, groups: &[u32]) -> Result<()> {
        if self.uid_to_host(uid).is_none() {
            return Err(SandboxError::UnmappedId {
                kind: "uid",
                id: uid,
                mapped: describe(&self.uids),
            });
        }
        for &g in std::iter::once(&gid).chain(groups) {
            if self.gid_to_host(g).is_none() {
                return Err(SandboxError::UnmappedId {
                    kind: "gid",
                    id: g,
                    mapped: describe(&self.gids),
                });
            }
        }
        Ok(())
    }
}

/// How the maps get written once the child has unshared its user namespace.
#[derive(Clone, Debug)]
pub struct MapPlan {
    /// The uid and gid maps.
    pub map: IdMap,
    /// `newuidmap`/`newgidmap` when subordinate ranges are used.
    helpers: Option<(PathBuf, PathBuf)>,
    /// Whether `setgroups` must be denied (a single-id map written without privileges).
    pub deny_setgroups: bool,
}

impl MapPlan {
    /// Pick the map for the current process's effective ids.
    pub fn for_current_user() -> MapPlan {
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid == 0 {
            // Ids 0..65536 as themselves. Root of a rootless user namespace (whose own map is
            // split, e.g. 0 → the caller, 1.. → a subordinate range) must give one extent per
            // extent of its own map: the kernel refuses an extent that spans two.
            let own = |file: &str| {
                std::fs::read_to_string(file)
                    .ok()
                    .map(|m| identity_within(&m, 65536))
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| IdMap::identity(65536).uids)
            };
            return MapPlan {
                map: IdMap {
                    uids: own("/proc/self/uid_map"),
                    gids: own("/proc/self/gid_map"),
                },
                helpers: None,
                deny_setgroups: false,
            };
        }
        let single = |host: u32| IdRange {
            inside: 0,
            outside: host,
            count: 1,
        };
        let helpers = super::find_program("newuidmap").zip(super::find_program("newgidmap"));
        let name = user_name(uid);
        let sub_u = subordinate(Path::new("/etc/subuid"), uid, name.as_deref());
        let sub_g = subordinate(Path::new("/etc/subgid"), uid, name.as_deref());
        if let (Some(helpers), Some((us, uc)), Some((gs, gc))) = (helpers, sub_u, sub_g) {
            let range = |outside, count| IdRange {
                inside: 1,
                outside,
                count,
            };
            return MapPlan {
                map: IdMap {
                    uids: vec![single(uid), range(us, uc)],
                    gids: vec![single(gid), range(gs, gc)],
                },
                helpers: Some(helpers),
                deny_setgroups: false,
            };
        }
        MapPlan {
            map: IdMap {
                uids: vec![single(uid)],
                gids: vec![single(gid)],
            },
            helpers: None,
            deny_setgroups: true,
        }
    }

    /// Write the maps of process `pid`, which has just unshared its user namespace.
    pub fn apply(&self, pid: libc::pid_t) -> Result<()> {
        let err = |what: String| move |source| SandboxError::IdMap { what, source };
        if let Some((newuidmap, newgidmap)) = &self.helpers {
            for (helper, ranges) in [(newuidmap, &self.map.uids), (newgidmap, &self.map.gids)] {
                let mut cmd = Command::new(helper);
                cmd.arg(pid.to_string());
                for r in ranges {
                    cmd.args([r.inside, r.outside, r.count].map(|n| n.to_string()));
                }
                let out = cmd
                    .output()
                    .map_err(err(format!("running {}", helper.display())))?;
                if !out.status.success() {
                    return Err(SandboxError::IdMap {
                        what: format!(
                            "{} {}: {}",
                            helper.display(),
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                        source: std::io::Error::other("id map helper failed"),
                    });
                }
            }
            return Ok(());
        }
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let lines = |ranges: &[IdRange]| -> String {
            ranges
                .iter()
                .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
                .collect()
        };
        if self.deny_setgroups {
            let p = proc.join("setgroups");
            fs_err::write(&p, "deny").map_err(err(format!("writing {}", p.display())))?;
        }
        for (file, ranges) in [("uid_map", &self.map.uids), ("gid_map", &self.map.gids)] {
            let p = proc.join(file);
            fs_err::write(&p, lines(ranges)).map_err(err(format!("writing {}", p.display())))?;
        }
        Ok(())
    }
}

/// Identity ranges for the ids below `limit` that the `/proc/self/uid_map`-style `map` has,
/// split where its extents are.
pub(super) fn identity_within(map: &str, limit: u32) -> Vec<IdRange> {
    let mut out: Vec<IdRange> = map
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace().map(|n| n.parse::<u64>().ok());
            let (inside, _, count) = (f.next()??, f.next()??, f.next()??);
            let end = (inside + count).min(u64::from(limit));
            (inside < end).then(|| IdRange {
                inside: inside as u32,
                outside: inside as u32,
                count: (end - inside) as u32,
            })
        })
        .collect();
    out.sort_by_key(|r| r.inside);
    out
}

/// The login name of `uid`, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwuid_r fills it with pointers into `buf`, which outlives
    // every use below.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The first subordinate range `(start, count)` of the user in `/etc/subuid`-style `file`.
fn subordinate(file: &Path, uid: u32, name: Option<&str>) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    parse_subordinate(&text, uid, name)
}

pub(super) fn parse_subordinate(text: &str, uid: u32, name: Option<&str>) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let (who, start, count) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = who == uid.to_string() || Some(who) == name;
        let (start, count) = (start.parse().ok()?, count.parse::<u32>().ok()?);
        (ours && count > 0).then_some((start, count))
    })
}
