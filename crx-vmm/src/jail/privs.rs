//! Dropping privileges at the end of the jail: every capability the VM does not need
//! leaves the bounding, ambient, inheritable, permitted and effective sets; the
//! optional gid and uid are taken; no_new_privs is set. Without virtio-fs crx-vmm
//! keeps no capability at all (its files are open or bound, `/dev/kvm` is an open
//! fd); the FUSE passthrough server keeps what it needs to act for the guest's users.

use crate::syscall::cvt;
use std::io;

/// Capabilities the FUSE passthrough server uses to act for the guest's users (the
/// list in `devices/virtio/fs/mod.rs`): permission checks on their behalf
/// (DAC_OVERRIDE, DAC_READ_SEARCH for `linkat(AT_EMPTY_PATH)`, FOWNER), ownership and
/// set-id bits (CHOWN, FSETID), and creating files as their uid/gid (SETUID,
/// SETGID). No MKNOD: the server refuses device nodes, FIFOs and sockets need none.
/// Numbers from <linux/capability.h>.
pub const FS_CAPS: [u32; 7] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
];

pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;

/// Highest capability number probed for the bounding set (the kernel's
/// `cap_last_cap` is 40 on 6.x; unknown numbers fail with EINVAL and are skipped).
const CAP_PROBE_MAX: u32 = 63;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn err(step: &'static str) -> impl FnOnce(io::Error) -> super::JailError {
    move |source| super::JailError::Privileges { step, source }
}

/// Sets the calling thread's effective, permitted and inheritable sets to `keep`
/// (inheritable empty).
fn set_caps(keep: &[u32]) -> io::Result<()> {
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let (word, bit) = ((cap / 32) as usize, cap % 32);
        data[word].effective |= 1 << bit;
        data[word].permitted |= 1 << bit;
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads a v3 header and two data words, which we pass.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })
    .map(drop)
}

/// Drops every capability but `FS_CAPS` (if `keep_fs_caps`) or all of them, takes
/// `gid`/`uid` if given, and sets no_new_privs. Per thread: call it before any
/// thread that must be confined starts.
pub fn drop_privileges(
    uid: Option<u32>,
    gid: Option<u32>,
    keep_fs_caps: bool,
) -> Result<(), super::JailError> {
    let keep: &[u32] = if keep_fs_caps { &FS_CAPS } else { &[] };
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in 0..=CAP_PROBE_MAX {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                continue; // not a capability of this kernel
            }
            return Err(err("drop a capability from the bounding set")(e));
        }
    }
    cvt(
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        },
    )
    .map_err(err("clear the ambient capabilities"))?;
    if let Some(gid) = gid {
        // SAFETY: an empty list; setgroups reads nothing.
        cvt(unsafe { libc::setgroups(0, std::ptr::null()) })
            .map_err(err("drop the supplementary groups"))?;
        // SAFETY: plain id arguments.
        cvt(unsafe { libc::setresgid(gid, gid, gid) }).map_err(err("switch to --jail-gid"))?;
    }
    if let Some(uid) = uid {
        // Keep the permitted set across the uid change; set_caps below restores the
        // effective set from it.
        // SAFETY: prctl with integer arguments only.
        cvt(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })
            .map_err(err("keep capabilities across the uid change"))?;
        // SAFETY: plain id arguments.
        cvt(unsafe { libc::setresuid(uid, uid, uid) }).map_err(err("switch to --jail-uid"))?;
        // SAFETY: prctl with integer arguments only.
        cvt(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })
            .map_err(err("reset keep-capabilities"))?;
    }
    set_caps(keep).map_err(err("drop capabilities"))?;
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(err("set no_new_privs"))?;
    Ok(())
}
