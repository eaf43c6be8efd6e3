//! The system calls each thread role may make, as seccompiler rule maps.
//!
//! How the lists were found: `strace -f` of crx-vmm (glibc debug build and the shipped
//! musl static build) booting tiny guests on PVM with every device attached, of the
//! device unit tests (vsock, block, rng threads) and of the vhost-user-vsock back end
//! under QEMU; then `--seccomp log` runs (SECCOMP_RET_LOG, read back from the kernel
//! log) of the same and of the nested-KVM lane with a Linux guest. Both libc spellings
//! of a call are listed where they differ (musl: `open`, `stat`, `poll`, `clone`;
//! glibc: `openat`, `newfstatat`/`statx`, `ppoll`, `clone3`).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{SeccompError, ThreadRole};

/// A rule map under construction: an empty rule list allows the call outright, a
/// non-empty one allows it when any rule matches.
#[derive(Clone, Debug, Default)]
pub struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            // Unconditional wins over any argument rule already there.
            self.0.insert(nr, Vec::new());
        }
        self
    }

    fn allow_if(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) -> &mut Self {
        match self.0.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                self.0.insert(nr, rules);
            }
        }
        self
    }

    /// Everything `self` or `other` allows.
    fn merge(&mut self, other: Rules) -> &mut Self {
        for (nr, rules) in other.0 {
            if rules.is_empty() {
                self.0.insert(nr, rules);
            } else {
                self.allow_if(nr, rules);
            }
        }
        self
    }

    /// Whether `nr` is allowed in some form (for tests).
    pub fn contains(&self, nr: libc::c_long) -> bool {
        self.0.contains_key(&nr)
    }

    pub fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Build)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// One rule per value: argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// Linux's `_IOC` encoding of an ioctl request number.
const fn ioc(dir: u64, kind: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (kind << 8) | nr
}

const KVMIO: u64 = 0xAE;
/// `KVM_RUN`: the one ioctl a vCPU thread makes in its loop.
pub const KVM_RUN: u64 = ioc(IOC_NONE, KVMIO, 0x80, 0);
/// `KVM_GET_REGS` / `KVM_GET_SREGS`: read once to log where an internal error or a
/// triple fault happened.
pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, size_of::<kvm_bindings::kvm_regs>());
pub const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, size_of::<kvm_bindings::kvm_sregs>());
/// `BLKGETSIZE64`: the size of a block device backing a drive.
const BLKGETSIZE64: u64 = ioc(IOC_READ, 0x12, 114, size_of::<u64>());
/// `TUNGETVNETHDRSZ` / `TUNSETVNETHDRSZ` / `TUNSETOFFLOAD`: what a net device may ask
/// of its tap after start.
const TUNSETOFFLOAD: u64 = ioc(IOC_WRITE, b'T' as u64, 208, size_of::<u32>());
const TUNGETVNETHDRSZ: u64 = ioc(IOC_READ, b'T' as u64, 215, size_of::<i32>());
const TUNSETVNETHDRSZ: u64 = ioc(IOC_WRITE, b'T' as u64, 216, size_of::<i32>());
// From <asm-generic/ioctls.h>; libc types them differently for glibc and musl.
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

/// Heap, stack and thread exit, futexes, logging to stderr, time, entropy for hash
/// maps, closing files: what any crx thread does. Executable mappings are refused.
fn base() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_getrandom,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    let no_exec = || -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![rule(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    r.allow_if(libc::SYS_mmap, no_exec()?);
    r.allow_if(libc::SYS_mprotect, no_exec()?);
    // Duplicating (EventFd::try_clone), close-on-exec and non-blocking flags, and the
    // debug-build fd checks; never locks or leases.
    r.allow_if(
        libc::SYS_fcntl,
        arg_in(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    );
    Ok(r)
}

/// An epoll loop over eventfds: every device thread.
fn event_loop() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    r
}

/// Unix sockets only: the hybrid vsock's host side and the vhost-user channel.
fn unix_socket() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_getsockopt,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]);
    r.allow_if(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64])?);
    r.allow_if(libc::SYS_ioctl, arg_in(1, &[FIONBIO, FIOCLEX])?);
    Ok(r)
}

/// Reading and writing a drive's backing file at offsets, and flushing it.
fn block_io() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
    ]);
    r.allow_if(libc::SYS_ioctl, arg_in(1, &[BLKGETSIZE64])?);
    Ok(r)
}

/// The FUSE passthrough server: file operations relative to the share's fds,
/// credential switches per request, extended attributes.
fn fs_ops() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_fstatfs,
        libc::SYS_statfs,
        libc::SYS_getdents64,
        libc::SYS_lseek,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_preadv2,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_pwritev2,
        libc::SYS_readlinkat,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_utimensat,
        libc::SYS_copy_file_range,
        libc::SYS_flock,
        libc::SYS_fchdir,
        libc::SYS_getcwd,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fgetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_flistxattr,
        libc::SYS_fremovexattr,
        libc::SYS_getxattr,
        libc::SYS_setxattr,
        libc::SYS_listxattr,
        libc::SYS_removexattr,
        libc::SYS_lgetxattr,
        libc::SYS_lsetxattr,
        libc::SYS_llistxattr,
        libc::SYS_lremovexattr,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_getuid,
        libc::SYS_getgid,
        libc::SYS_geteuid,
        libc::SYS_getegid,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_umask,
    ]);
    // fcntl's lock commands serve the guest's POSIX locks.
    r.allow_if(
        libc::SYS_fcntl,
        arg_in(
            1,
            &[
                libc::F_GETLK as u64,
                libc::F_SETLK as u64,
                libc::F_SETLKW as u64,
                libc::F_OFD_GETLK as u64,
                libc::F_OFD_SETLK as u64,
                libc::F_OFD_SETLKW as u64,
                libc::F_DUPFD as u64,
            ],
        )?,
    );
    // Only the per-thread unshare of the fs context the server may do (umask, cwd).
    r.allow_if(libc::SYS_unshare, arg_in(0, &[libc::CLONE_FS as u64])?);
    Ok(r)
}

/// Starting threads: what a thread runs before its own filter is on (stack and guard
/// page, signal stack, name, robust list, rseq, then installing that filter) and the
/// clone of a thread (never a process: CLONE_THREAD must be set; glibc's clone3
/// hides its flags in memory).
fn thread_start() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_seccomp,
    ]);
    r.allow_if(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    r.allow_if(
        libc::SYS_prctl,
        arg_in(
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        )?,
    );
    Ok(r)
}

/// The vhost-user protocol as a server: the listener, QEMU's messages with fds
/// (memory regions, kick and call eventfds), and the back end's worker threads.
fn vhost_user() -> Result<Rules, SeccompError> {
    let mut r = base()?;
    r.merge(event_loop())
        .merge(unix_socket()?)
        .merge(thread_start()?);
    r.allow(&[
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigaction,
        libc::SYS_tgkill,
        libc::SYS_dup,
    ]);
    Ok(r)
}

/// The rule map of `role`.
pub fn for_role(role: ThreadRole) -> Result<Rules, SeccompError> {
    let mut r = base()?;
    match role {
        ThreadRole::Vmm => {
            // Waits for the VM's end, removes the sockets it created, exits.
            r.allow(&[
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_tgkill,
                libc::SYS_read,
                libc::SYS_poll,
                libc::SYS_ppoll,
            ]);
        }
        ThreadRole::Vcpu => {
            r.allow_if(libc::SYS_ioctl, arg_in(1, &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS])?);
            // MMIO handlers run here: a device's activation creates its eventfds and
            // hands its thread to the launcher; a reset stops it (eventfd write,
            // join) and closes its connections; the boot marker reads the exit count
            // from the KVM stats fd.
            r.allow(&[
                libc::SYS_eventfd2,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_shutdown,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
            ]);
        }
        ThreadRole::Signals => {
            r.allow(&[libc::SYS_rt_sigtimedwait]);
        }
        ThreadRole::Vsock => {
            r.merge(event_loop()).merge(unix_socket()?);
        }
        ThreadRole::Block => {
            r.merge(event_loop()).merge(block_io()?);
        }
        ThreadRole::Rng => {
            r.merge(event_loop());
        }
        ThreadRole::Net => {
            r.merge(event_loop());
            r.allow_if(
                libc::SYS_ioctl,
                arg_in(1, &[TUNSETOFFLOAD, TUNGETVNETHDRSZ, TUNSETVNETHDRSZ])?,
            );
        }
        ThreadRole::Fs => {
            r.merge(event_loop()).merge(fs_ops()?);
        }
        ThreadRole::Api => {
            // Accepts control connections, receives backing fds (SCM_RIGHTS; no path
            // is ever opened here), sizes them and flushes the backing they replace.
            r.merge(event_loop())
                .merge(unix_socket()?)
                .merge(block_io()?);
        }
        ThreadRole::Device => {
            for role in ThreadRole::DEVICES {
                r.merge(for_role(role)?);
            }
        }
        ThreadRole::Launcher => {
            // Its threads inherit its filter and add their own, so it must allow
            // everything any device thread does.
            r.merge(for_role(ThreadRole::Device)?)
                .merge(thread_start()?);
        }
        ThreadRole::VhostUserVsock => {
            r.merge(vhost_user()?);
        }
        ThreadRole::VhostUserFs => {
            r.merge(vhost_user()?).merge(fs_ops()?);
        }
        ThreadRole::VhostUserBlk => {
            // The drive's I/O, the API thread (which narrows itself to `Api`), and the
            // search for QEMU's backend channel among our fds: getsockname, and the fd
            // limit read (never set) through prlimit64.
            r.merge(vhost_user()?)
                .merge(block_io()?)
                .merge(for_role(ThreadRole::Api)?);
            r.allow(&[libc::SYS_getsockname]);
            r.allow_if(
                libc::SYS_prlimit64,
                vec![rule(vec![
                    cond(0, SeccompCmpOp::Eq, 0)?,
                    cond(2, SeccompCmpOp::Eq, 0)?,
                ])?],
            );
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        // From <linux/kvm.h> and <linux/fs.h> on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        // The casts matter on musl, whose libc types these as c_int.
        #[allow(clippy::unnecessary_cast)]
        let (fionbio, fioclex) = (libc::FIONBIO as u64, libc::FIOCLEX as u64);
        assert_eq!(FIONBIO, fionbio);
        assert_eq!(FIOCLEX, fioclex);
    }

    #[test]
    fn no_role_may_start_a_program_or_open_a_network_socket_except_where_needed() {
        for role in ThreadRole::ALL {
            let rules = for_role(role).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setns,
            ] {
                assert!(
                    !rules.contains(forbidden),
                    "{role:?} allows syscall {forbidden}"
                );
            }
        }
        let vcpu = for_role(ThreadRole::Vcpu).unwrap();
        assert!(!vcpu.contains(libc::SYS_socket));
        assert!(!vcpu.contains(libc::SYS_openat));
        assert!(!vcpu.contains(libc::SYS_clone));
        assert!(!for_role(ThreadRole::Rng)
            .unwrap()
            .contains(libc::SYS_socket));
        assert!(!for_role(ThreadRole::Api)
            .unwrap()
            .contains(libc::SYS_openat));
    }

    #[test]
    fn the_launcher_allows_everything_its_device_threads_do() {
        let launcher = for_role(ThreadRole::Launcher).unwrap().into_map();
        for role in ThreadRole::DEVICES {
            for (nr, rules) in for_role(role).unwrap().into_map() {
                let allowed = launcher
                    .get(&nr)
                    .unwrap_or_else(|| panic!("launcher lacks syscall {nr} that {role:?} needs"));
                assert!(
                    allowed.is_empty() || rules.iter().all(|r| allowed.contains(r)),
                    "launcher narrows syscall {nr} of {role:?}"
                );
            }
        }
    }
}
