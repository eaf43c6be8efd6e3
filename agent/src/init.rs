//! PID 1 duties: the file systems, cgroups, stdio and environment a container host
//! needs, set up before anything else runs. Nothing here is fatal: each failed step is
//! reported (after logging is up) and the agent carries on, since an init that exits
//! panics the kernel.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// One step of the set-up that failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount point could not be created.
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    /// A file system could not be mounted.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    /// A cgroup controller could not be enabled for child cgroups.
    #[error("cannot enable cgroup controller {controller} for child cgroups")]
    CgroupController {
        controller: &'static str,
        #[source]
        source: io::Error,
    },
    /// The cgroup root could not be read.
    #[error("cannot read the available cgroup controllers")]
    CgroupControllers(#[source] io::Error),
    /// fd 0, 1 or 2 was closed and could not be reopened.
    #[error("cannot open {path} for stdio")]
    Stdio {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    /// A conventional `/dev` symlink could not be made.
    #[error("cannot create symlink {link}")]
    DevSymlink {
        link: &'static str,
        #[source]
        source: io::Error,
    },
    /// A kernel setting could not be written.
    #[error("cannot write {path}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What [`setup`] did, for the log.
#[derive(Debug, Default)]
pub struct InitReport {
    /// Mount points mounted now.
    pub mounted: Vec<&'static str>,
    /// Mount points found already mounted (left alone).
    pub already_mounted: Vec<&'static str>,
    /// cgroup controllers enabled for child cgroups.
    pub cgroup_controllers: Vec<&'static str>,
    /// Steps that failed.
    pub failures: Vec<InitError>,
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    mode: u32,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: a later entry may live inside an earlier one.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mode: 0o555,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mode: 0o555,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        mode: 0o755,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
        mode: 0o755,
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mode: 0o1777,
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        mode: 0o555,
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        mode: 0o755,
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        mode: 0o1777,
    },
];

/// cgroup v2 controllers handed down to child cgroups (pod and containers), where the
/// kernel has them.
const CGROUP_CONTROLLERS: &[&str] = &["cpuset", "cpu", "io", "memory", "pids"];

/// The environment every process the agent starts inherits, unless told otherwise.
const CLEAN_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/"),
];

/// Runs every PID 1 set-up step. Call first thing, while the process has one thread
/// (it rewrites the environment).
pub fn setup() -> InitReport {
    let mut report = InitReport::default();
    // Files opened before /dev is mounted are closed again at once; right after it, a
    // closed fd 0-2 is reopened (fix_stdio) before anything keeps a file open, or that
    // file would become "stderr".
    let mut mounted_now = mounted_targets();
    for spec in MOUNTS {
        if mounted_now.iter().any(|t| t == spec.target) {
            report.already_mounted.push(spec.target);
        } else {
            match mount_one(spec) {
                Ok(()) => report.mounted.push(spec.target),
                Err(e) => report.failures.push(e),
            }
        }
        if spec.target == "/proc" {
            // Now the mount table is readable; anything mounted by the kernel shows up.
            mounted_now = mounted_targets();
        }
        if spec.target == "/dev" {
            fix_stdio(&mut report);
        }
    }
    dev_symlinks(&mut report);
    enable_cgroup_controllers(&mut report);
    unthrottle_kmsg(&mut report);
    clean_environment();
    report
}

fn mount_one(spec: &MountSpec) -> Result<(), InitError> {
    if !Path::new(spec.target).exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(spec.mode)
            .create(spec.target)
            .map_err(|source| InitError::MountPoint {
                path: spec.target,
                source,
            })?;
    }
    mount(
        Some(spec.source),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    )
    .map_err(|source| InitError::Mount {
        fstype: spec.fstype,
        target: spec.target,
        source,
    })?;
    if spec.mode & 0o1000 != 0 {
        // tmpfs honours mode=, but a umask-free explicit chmod keeps sticky dirs right
        // whatever the kernel's defaults.
        let _ = fs::set_permissions(spec.target, fs::Permissions::from_mode(spec.mode));
    }
    Ok(())
}

/// Mount points listed in `/proc/self/mounts` (empty before /proc is mounted).
fn mounted_targets() -> Vec<String> {
    fs::read_to_string("/proc/self/mounts")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Points any closed fd among 0, 1, 2 at the console (or /dev/null without one). The
/// kernel opens /dev/console for init only if the initramfs has that node.
fn fix_stdio(report: &mut InitReport) {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor's flags; no memory is involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let (path, file) = match open_rw("/dev/console") {
            Ok(f) => ("/dev/console", f),
            Err(_) => match open_rw("/dev/null") {
                Ok(f) => ("/dev/null", f),
                Err(source) => {
                    report.failures.push(InitError::Stdio {
                        path: "/dev/null",
                        source,
                    });
                    return;
                }
            },
        };
        if file.as_raw_fd() == fd {
            // open() already took the free slot: keep it open for good.
            std::mem::forget(file);
            continue;
        }
        // SAFETY: dup2 onto a closed descriptor number; `file` stays valid until it is
        // dropped after the call, and the new fd is owned by the process from now on.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } == -1 {
            report.failures.push(InitError::Stdio {
                path,
                source: io::Error::last_os_error(),
            });
        }
    }
}

fn open_rw(path: &str) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
}

/// devtmpfs has device nodes only; programs expect these links too.
fn dev_symlinks(report: &mut InitReport) {
    const LINKS: &[(&str, &str)] = &[
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ];
    for (target, link) in LINKS {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => report.failures.push(InitError::DevSymlink { link, source }),
        }
    }
}

fn enable_cgroup_controllers(report: &mut InitReport) {
    let available = match fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        Ok(text) => text,
        Err(e) => {
            report.failures.push(InitError::CgroupControllers(e));
            return;
        }
    };
    let available: Vec<&str> = available.split_whitespace().collect();
    for controller in CGROUP_CONTROLLERS {
        if !available.contains(controller) {
            continue;
        }
        // One write per controller, so one refusal does not cost the others.
        match fs::write(
            "/sys/fs/cgroup/cgroup.subtree_control",
            format!("+{controller}"),
        ) {
            Ok(()) => report.cgroup_controllers.push(controller),
            Err(source) => report
                .failures
                .push(InitError::CgroupController { controller, source }),
        }
    }
}

/// The kernel rate-limits writes to /dev/kmsg (10 lines per 5 s per opener) unless told
/// otherwise; the agent's log would lose lines exactly when there is most to say.
fn unthrottle_kmsg(report: &mut InitReport) {
    const PATH: &str = "/proc/sys/kernel/printk_devkmsg";
    if let Err(source) = fs::write(PATH, "on\n") {
        // EINVAL means `printk.devkmsg=` on the command line locked the setting: fine.
        if source.raw_os_error() != Some(libc::EINVAL) {
            report
                .failures
                .push(InitError::Sysctl { path: PATH, source });
        }
    }
}

/// The kernel hands init its unparsed command-line words as environment; none of that
/// should leak into containers.
fn clean_environment() {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for key in keys {
        std::env::remove_var(key);
    }
    for (key, value) in CLEAN_ENV {
        std::env::set_var(key, value);
    }
    let _ = std::env::set_current_dir("/");
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o022) };
}
