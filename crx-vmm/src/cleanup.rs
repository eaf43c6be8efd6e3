//! Removing what crx-vmm created on the host (its vsock socket) however it ends,
//! SIGKILL included: a tiny child process forked before any thread exists holds the
//! read end of a pipe; crx-vmm tells it each path it creates. When the pipe closes —
//! crx-vmm exited, crashed or was killed — the child unlinks those of the paths that
//! are sockets (all crx-vmm creates) and exits.

use crate::syscall::cvt;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Most bytes of paths the cleaner keeps (a few socket paths need far less).
const MAX_RECORDS_BYTES: usize = 64 * 1024;

/// The parent's side of the cleaner.
pub struct Cleaner {
    pipe: File,
    pid: libc::pid_t,
}

impl Cleaner {
    /// Forks the cleaner child.
    ///
    /// # Safety
    /// The process must be single-threaded (call it first thing in `main`): the child
    /// runs ordinary Rust code after `fork`.
    pub unsafe fn spawn() -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        let (read_fd, write_fd) = (fds[0], fds[1]);
        // SAFETY: the caller guarantees no other thread exists, so the child's copy of
        // the address space is consistent (no lock held by a vanished thread).
        let pid = cvt(unsafe { libc::fork() })?;
        if pid == 0 {
            // SAFETY: we are the freshly forked child; `read_fd` is our pipe end.
            unsafe { child_main(read_fd) }
        }
        // SAFETY: `read_fd` is ours and only the child needs it.
        unsafe { libc::close(read_fd) };
        // SAFETY: `write_fd` is a fresh pipe end owned by nobody else.
        let pipe = unsafe { File::from_raw_fd(write_fd) };
        Ok(Self { pipe, pid })
    }

    /// Asks the cleaner to unlink `path` when crx-vmm ends. Call before creating it.
    pub fn register(&self, path: &Path) -> std::io::Result<()> {
        let mut record = path.as_os_str().as_bytes().to_vec();
        record.push(0);
        // One write of less than PIPE_BUF bytes is atomic: the child never sees half.
        (&self.pipe).write_all(&record)
    }

    /// The cleaner's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

/// The cleaner child: waits for EOF, unlinks, exits. Never returns.
unsafe fn child_main(read_fd: libc::c_int) -> ! {
    // SAFETY: plain syscalls on our own process; the name is a NUL-terminated literal.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"crx-vmm-cleanup".as_ptr());
        // Signals meant for crx-vmm (Ctrl-C reaches the whole process group) must not
        // take the cleaner down before it did its job.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Hold nothing of the parent's open: no stdio pipe stays open because of us.
        libc::syscall(
            libc::SYS_close_range,
            0u32,
            (read_fd - 1).max(0) as u32,
            0u32,
        );
        libc::syscall(libc::SYS_close_range, (read_fd + 1) as u32, u32::MAX, 0u32);
    }
    // SAFETY: `read_fd` is the open read end of the pipe, owned by this process alone.
    let mut pipe = unsafe { File::from_raw_fd(read_fd) };
    let mut records = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if records.len() + n <= MAX_RECORDS_BYTES {
                    records.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    for path in records.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let path = Path::new(OsStr::from_bytes(path));
        // Only sockets: a path is registered before its socket is bound, so if crx-vmm
        // ended before binding, whatever is there now (a file someone else wrote after
        // crx-vmm refused to start) is not ours.
        let is_socket = std::fs::symlink_metadata(path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if is_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    // SAFETY: ends this process without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

impl AsRawFd for Cleaner {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.pipe.as_raw_fd()
    }
}
