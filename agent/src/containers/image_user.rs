//! Completes a process's user from the image, as runc does: HOME from the image's
//! /etc/passwd when the environment has none (`/` if the uid has no entry), and the
//! supplementary groups the user is listed in by the image's /etc/group ahead of the
//! spec's additionalGids.
//!
//! The files belong to the image, so they are opened with `openat2(RESOLVE_IN_ROOT)`:
//! a symlink (or `..`) in them resolves inside the rootfs, never to the agent's files;
//! only regular files are read, and only their first [`MAX_DB_BYTES`].

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use libcontainer::oci_spec::runtime::Process;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

/// Longest prefix of /etc/passwd or /etc/group read; entries past it are not seen.
const MAX_DB_BYTES: u64 = 1 << 20;
/// Most supplementary groups a process gets (the kernel's NGROUPS_MAX is 65536).
const MAX_GROUPS: usize = 1024;

/// The image's account entry of a uid.
#[derive(Debug, PartialEq)]
struct Account {
    name: String,
    home: String,
}

/// Adds HOME and the image's supplementary groups to `process` (see module doc).
pub fn complete(process: &mut Process, rootfs: &Path) {
    let uid = process.user().uid();
    let gid = process.user().gid();
    let account = read_db(rootfs, "etc/passwd").and_then(|text| find_account(&text, uid));

    let mut env = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = account.as_ref().map_or("/", |a| a.home.as_str());
        env.push(format!("HOME={home}"));
        process.set_env(Some(env));
    }

    let mut groups = match (&account, read_db(rootfs, "etc/group")) {
        (Some(account), Some(text)) => member_groups(&text, &account.name),
        _ => Vec::new(),
    };
    let mut user = process.user().clone();
    for extra in user.additional_gids().clone().unwrap_or_default() {
        groups.push(extra);
    }
    groups.retain(|g| *g != gid);
    let mut seen = std::collections::HashSet::new();
    groups.retain(|g| seen.insert(*g));
    groups.truncate(MAX_GROUPS);
    if !groups.is_empty() {
        user.set_additional_gids(Some(groups));
        process.set_user(user);
    }
}

/// The first [`MAX_DB_BYTES`] of `<rootfs>/<name>`, resolved inside the rootfs; None if
/// it is missing, not a regular file or unreadable.
fn read_db(rootfs: &Path, name: &str) -> Option<String> {
    let root = File::open(rootfs).ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(std::os::fd::AsRawFd::as_raw_fd(&root), name, how) {
        Ok(fd) => fd,
        Err(e) => {
            if e != nix::errno::Errno::ENOENT {
                tracing::warn!(file = name, error = %e, "cannot open the image's account file");
            }
            return None;
        }
    };
    // SAFETY: openat2 just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_DB_BYTES).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The passwd entry (`name:x:uid:gid:gecos:home:shell`) of `uid`.
fn find_account(passwd: &str, uid: u32) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some(Account {
            name: fields[0].to_owned(),
            home: fields[5].to_owned(),
        })
    })
}

/// The gids of the group entries (`name:x:gid:member,member`) that list `user`.
fn member_groups(group: &str, user: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || !fields[3].split(',').any(|m| m.trim() == user) {
                return None;
            }
            fields[2].parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(extra: &str) -> Process {
        serde_json::from_str(&format!(
            r#"{{"args":["true"],"cwd":"/","user":{{"uid":1000,"gid":1000{extra}}}}}"#
        ))
        .unwrap()
    }

    fn rootfs(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("crx-image-user-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        dir
    }

    #[test]
    fn home_and_groups_come_from_the_image() {
        let dir = rootfs("plain");
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "root:x:0:\nuser:x:1000:\nextra:x:2000:other,user\nnot:x:3000:users\n",
        )
        .unwrap();
        let mut p = process(r#","additionalGids":[5]"#);
        complete(&mut p, &dir);
        assert_eq!(p.env().clone().unwrap(), vec!["HOME=/home/user".to_owned()]);
        assert_eq!(p.user().additional_gids().clone().unwrap(), vec![2000, 5]);

        // A HOME the spec sets is kept.
        let mut p = process("");
        p.set_env(Some(vec!["HOME=/mine".into()]));
        complete(&mut p, &dir);
        assert_eq!(p.env().clone().unwrap(), vec!["HOME=/mine".to_owned()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn symlinks_out_of_the_rootfs_are_not_followed() {
        let dir = rootfs("escape");
        let outside = dir.with_extension("outside");
        std::fs::write(&outside, "user:x:1000:1000::/stolen:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc/group", dir.join("etc/group"))
            .unwrap();
        let mut p = process("");
        complete(&mut p, &dir);
        // The absolute link resolves inside the rootfs, where nothing is: HOME=/.
        assert_eq!(p.env().clone().unwrap(), vec!["HOME=/".to_owned()]);
        assert_eq!(p.user().additional_gids(), &None);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&outside);
    }
}
