//! Assembles payload directories for the L1 rig: files copied in, a `run.sh`, and the
//! pieces payloads share (a static KVM check, a QEMU bundle, a busybox initramfs for an
//! L2 guest, crx-vmm with its guest). The directory is removed when the [`Payload`] drops.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

use super::scripts_dir;

/// Where [`VmmLane::payload`] puts things, relative to the payload root (`/payload` in L1).
pub const VMM_BIN: &str = "bin/crx-vmm";
pub const PROBE_BIN: &str = "bin/crx-probe";
pub const GUEST_KERNEL: &str = "guest/vmlinux";
pub const GUEST_INITRAMFS: &str = "guest/initramfs.cpio";

/// What went wrong while assembling a payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("creating the payload directory")]
    TempDir(#[source] io::Error),
    #[error("payload path {0:?} must be relative and stay inside the payload")]
    BadDest(String),
    #[error("copying {src} into the payload as {dest}")]
    Copy {
        src: PathBuf,
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("writing {dest} in the payload")]
    Write {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {what}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Tool { what: String, stderr: String },
    #[error("the payload has no run.sh")]
    NoScript,
    #[error("{0}")]
    MissingArtifact(String),
}

/// A payload directory under construction.
pub struct PayloadBuilder {
    dir: TempDir,
}

/// A finished payload directory, removed on drop.
pub struct Payload {
    dir: TempDir,
}

impl Payload {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl PayloadBuilder {
    pub fn new() -> Result<Self, PayloadError> {
        let dir = tempfile::Builder::new()
            .prefix("crx-l1-payload.")
            .tempdir()
            .map_err(PayloadError::TempDir)?;
        Ok(PayloadBuilder { dir })
    }

    /// The directory being filled (for tools that write into it themselves).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies `src` to `dest` (relative to the payload root), keeping its mode.
    pub fn copy(&mut self, src: &Path, dest: &str) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        fs::copy(src, &to).map_err(|source| PayloadError::Copy {
            src: src.to_path_buf(),
            dest: dest.to_string(),
            source,
        })?;
        Ok(self)
    }

    /// Writes `contents` to `dest` with permission bits `mode`.
    pub fn write(
        &mut self,
        dest: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        let werr = |source| PayloadError::Write {
            dest: dest.to_string(),
            source,
        };
        fs::write(&to, contents).map_err(werr)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode)).map_err(werr)?;
        Ok(self)
    }

    /// The script L1 runs as `cd /payload && ./run.sh` (busybox sh; `#!/bin/sh`).
    pub fn run_script(&mut self, text: &str) -> Result<&mut Self, PayloadError> {
        self.write("run.sh", text.as_bytes(), 0o755)
    }

    /// Asks L1 to load vhost, vhost_vsock, vsock, tun, tap, veth and vhost_net too
    /// (~0.5 s of L1 time), e.g. for QEMU's vhost-vsock-device.
    pub fn extra_modules(&mut self) -> Result<&mut Self, PayloadError> {
        self.write("l1-extra-modules", b"", 0o644)
    }

    /// Bundles this host's QEMU (binary, libraries, loader, microvm firmware) under
    /// `dest`; run it in L1 as `./<dest>/qemu-system-x86_64`.
    pub fn qemu(&mut self, dest: &str) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        run_tool(
            "tests/l1/bundle-qemu.sh",
            Command::new("bash")
                .arg(scripts_dir().join("bundle-qemu.sh"))
                .arg(&to),
        )?;
        Ok(self)
    }

    /// Compiles tests/l1/kvm-check.c (`gcc -static`) to `dest`: opens /dev/kvm, checks
    /// the API version and runs a real-mode guest; prints `CRX-L1-RESULT {"check":"kvm",...}`.
    pub fn kvm_check(&mut self, dest: &str) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        run_tool(
            "gcc -static tests/l1/kvm-check.c (apt-get install gcc libc6-dev)",
            Command::new("gcc")
                .args(["-static", "-O2", "-Wall", "-o"])
                .arg(&to)
                .arg(scripts_dir().join("kvm-check.c")),
        )?;
        Ok(self)
    }

    /// Builds a newc initramfs at `dest` holding the host's static busybox as
    /// `/bin/busybox` and `init_script` as `/init` (it must call /bin/busybox by path).
    pub fn busybox_initramfs(
        &mut self,
        dest: &str,
        init_script: &str,
    ) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        let stage = tempfile::Builder::new()
            .prefix("crx-l2-root.")
            .tempdir()
            .map_err(PayloadError::TempDir)?;
        let root = stage.path();
        for d in ["bin", "proc", "dev", "sys", "tmp"] {
            fs::create_dir_all(root.join(d)).map_err(|source| PayloadError::Write {
                dest: dest.to_string(),
                source,
            })?;
        }
        let busybox = Path::new("/bin/busybox");
        fs::copy(busybox, root.join("bin/busybox")).map_err(|source| PayloadError::Copy {
            src: busybox.into(),
            dest: format!("{dest}:/bin/busybox"),
            source,
        })?;
        let init = root.join("init");
        let werr = |source| PayloadError::Write {
            dest: format!("{dest}:/init"),
            source,
        };
        fs::write(&init, init_script).map_err(werr)?;
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(werr)?;
        let out = fs::File::create(&to).map_err(|source| PayloadError::Write {
            dest: dest.to_string(),
            source,
        })?;
        let entries = b"bin\nbin/busybox\ndev\ninit\nproc\nsys\ntmp\n";
        let mut cpio = Command::new("cpio")
            .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
            .current_dir(root)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| PayloadError::Spawn {
                what: "cpio (apt-get install cpio)".into(),
                source,
            })?;
        if let Some(mut stdin) = cpio.stdin.take() {
            io::Write::write_all(&mut stdin, entries).map_err(|source| PayloadError::Write {
                dest: dest.to_string(),
                source,
            })?;
        }
        let out = cpio
            .wait_with_output()
            .map_err(|source| PayloadError::Spawn {
                what: "cpio".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(PayloadError::Tool {
                what: "cpio".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(self)
    }

    pub fn build(self) -> Result<Payload, PayloadError> {
        if !self.dir.path().join("run.sh").is_file() {
            return Err(PayloadError::NoScript);
        }
        Ok(Payload { dir: self.dir })
    }

    /// `dest` inside the payload, its parent created; no absolute paths, no `..`.
    fn dest(&self, dest: &str) -> Result<PathBuf, PayloadError> {
        let rel = Path::new(dest);
        if dest.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(PayloadError::BadDest(dest.to_string()));
        }
        let to = self.dir.path().join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|source| PayloadError::Write {
                dest: dest.to_string(),
                source,
            })?;
        }
        Ok(to)
    }
}

/// The `run.sh` of a payload kept in the repository, `tests/l1/payloads/<name>/run.sh`
/// (e.g. `vmm-lane`, the crx-vmm VM lane, for [`VmmLane::payload`]).
pub fn payload_script(name: &str) -> Result<String, PayloadError> {
    let path = scripts_dir().join("payloads").join(name).join("run.sh");
    fs::read_to_string(&path).map_err(|source| PayloadError::Copy {
        src: path,
        dest: "run.sh".into(),
        source,
    })
}

/// The rig's smoke check (tests/l1/payloads/kvm-smoke): kvm-check, then QEMU microvm on
/// L1's KVM boots `l2_kernel` with a busybox initramfs to user space. Results: `"kvm"`
/// and `"l2"` (`l2_to_userspace_s`: QEMU start to the L2 init's first line, L1 uptime).
pub fn kvm_smoke_payload(l2_kernel: &Path) -> Result<Payload, PayloadError> {
    let scripts = scripts_dir();
    let script = payload_script("kvm-smoke")?;
    let l2_init =
        fs::read_to_string(scripts.join("l2-init.sh")).map_err(|source| PayloadError::Copy {
            src: scripts.join("l2-init.sh"),
            dest: "l2/initrd.cpio:/init".into(),
            source,
        })?;
    let mut b = PayloadBuilder::new()?;
    b.run_script(&script)?
        .kvm_check("kvm-check")?
        .qemu("qemu")?
        .copy(l2_kernel, "l2/vmlinux")?
        .busybox_initramfs("l2/initrd.cpio", &l2_init)?;
    b.build()
}

/// What the crx-vmm VM lane puts into L1: crx-vmm, crx-probe, the guest kernel and the
/// guest initramfs (crx-agent as /init).
#[derive(Debug, Clone)]
pub struct VmmLane {
    pub crx_vmm: PathBuf,
    pub crx_probe: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl VmmLane {
    /// Finds the four where crate::artifacts looks (env overrides, then the usual build
    /// locations); the error names what is missing and how to build it.
    pub fn from_artifacts() -> Result<Self, PayloadError> {
        let found = |r: anyhow::Result<PathBuf>| {
            r.map_err(|e| PayloadError::MissingArtifact(format!("{e:#}")))
        };
        Ok(VmmLane {
            crx_vmm: found(crate::artifacts::static_binary("crx-vmm"))?,
            crx_probe: found(crate::artifacts::static_binary("crx-probe"))?,
            kernel: found(crate::artifacts::guest_kernel())?,
            initramfs: found(crate::artifacts::guest_initramfs())?,
        })
    }

    /// A builder holding the four at [`VMM_BIN`], [`PROBE_BIN`], [`GUEST_KERNEL`],
    /// [`GUEST_INITRAMFS`] and `script` as run.sh; add more (e.g. `.qemu("qemu")` and
    /// `.extra_modules()` for the QEMU side of a benchmark) before `build()`.
    pub fn payload(&self, script: &str) -> Result<PayloadBuilder, PayloadError> {
        let mut b = PayloadBuilder::new()?;
        b.copy(&self.crx_vmm, VMM_BIN)?
            .copy(&self.crx_probe, PROBE_BIN)?
            .copy(&self.kernel, GUEST_KERNEL)?
            .copy(&self.initramfs, GUEST_INITRAMFS)?
            .run_script(script)?;
        Ok(b)
    }
}

fn run_tool(what: &str, cmd: &mut Command) -> Result<(), PayloadError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PayloadError::Spawn {
            what: what.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(PayloadError::Tool {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl PayloadBuilder {
    /// Bundles dynamically linked host `binaries` under `dest` (tests/l1/bundle-bin.sh):
    /// each as `<dest>/bin/<name>`, their libraries and loader under `<dest>/sysroot` at
    /// their host paths. In L1, `cp -a <dest>/sysroot/. /` first; then they run as they are.
    pub fn bundle(&mut self, dest: &str, binaries: &[&Path]) -> Result<&mut Self, PayloadError> {
        let to = self.dest(dest)?;
        run_tool(
            "tests/l1/bundle-bin.sh",
            Command::new("bash")
                .arg(scripts_dir().join("bundle-bin.sh"))
                .arg(&to)
                .args(binaries),
        )?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_that_leave_the_payload() {
        let mut b = PayloadBuilder::new().expect("tempdir");
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./x"] {
            assert!(
                matches!(b.write(bad, b"", 0o644), Err(PayloadError::BadDest(_))),
                "{bad:?} accepted"
            );
        }
        b.write("a/b/c", b"hi", 0o640).expect("nested write");
        assert_eq!(fs::read(b.path().join("a/b/c")).expect("read back"), b"hi");
    }

    #[test]
    fn a_payload_needs_a_run_script() {
        let b = PayloadBuilder::new().expect("tempdir");
        assert!(matches!(b.build(), Err(PayloadError::NoScript)));
        let mut b = PayloadBuilder::new().expect("tempdir");
        b.run_script("#!/bin/sh\nexit 0\n").expect("script");
        let p = b.build().expect("payload");
        let mode = fs::metadata(p.path().join("run.sh"))
            .expect("run.sh")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let path = p.path().to_path_buf();
        drop(p);
        assert!(!path.exists(), "payload directory left behind");
    }
}
