//! Throwaway Linux guests for device tests and benchmarks: a newc initramfs made of
//! Debian's static busybox, a shell script as `/init` and, when asked, host binaries
//! (fio, iperf3) with their shared libraries; a way to boot it on a pod-VM backend with
//! the console in a file; and the result lines the script prints.
//!
//! The script's contract: it prints `CRX-GUEST <key> <value>` lines on the console (the
//! prelude defines `result KEY VALUE` for that) and ends with `reboot -f`, which ends the
//! VM. Should it end without one, the prelude's epilogue reboots for it and reports
//! `CRX-GUEST script-exit <status>`.
//!
//! Initramfs files are cached by the hash of their content under
//! `target/crx-test-guests/`, so a test that asks for the same guest twice builds it once
//! and a changed script or binary gets a new file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use crx_shim::vm::{SerialOutput, Vm, VmBackend, VmConfig, VmDevices, VmExit};

use crate::artifacts;

pub mod bench;
pub mod netns;

/// Where Debian's `busybox-static` puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Every guest line meant for the test starts with this.
pub const RESULT_PREFIX: &str = "CRX-GUEST";

/// Runs before the test's script: the basic mounts, a PATH with the busybox applets and
/// the extra binaries, and the `result` helper.
const PRELUDE: &str = r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
result() { k=$1; shift; echo "CRX-GUEST $k $*"; }
"#;

/// After the test's script, in case it ends without rebooting: the VM must still end.
const EPILOGUE: &str = r#"
echo "CRX-GUEST script-exit $?"
reboot -f
"#;

/// Builds (or finds in the cache) an initramfs whose `/init` is `PRELUDE` +
/// `init_script` + `EPILOGUE`, with static busybox and its applet links, and each of
/// `extra_binaries` with its `ldd` libraries at the same paths as on the host.
pub fn initramfs(name: &str, init_script: &str, extra_binaries: &[&Path]) -> Result<PathBuf> {
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "guest name {name:?} must be non-empty [A-Za-z0-9_-]"
    );
    let busybox = static_busybox()?;
    let mut tree = Tree::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "mnt",
    ] {
        tree.dir(dir);
    }
    tree.device("dev/console", 0o600, 5, 1);
    tree.file("bin/busybox", busybox.clone(), 0o755);
    for applet in busybox_applets()? {
        if applet != "busybox" {
            tree.symlink(&format!("bin/{applet}"), "busybox");
        }
    }

    let mut lib_dirs = Vec::new();
    for binary in extra_binaries {
        add_host_file(&mut tree, binary, 0o755)?;
        for lib in shared_libraries(binary)? {
            if let Some(dir) = lib.parent() {
                if !lib_dirs.contains(&dir.to_path_buf()) {
                    lib_dirs.push(dir.to_path_buf());
                }
            }
            add_host_file(&mut tree, &lib, 0o755)?;
        }
    }
    let script = init_script.strip_prefix("#!").map_or(init_script, |rest| {
        rest.split_once('\n').map_or("", |x| x.1)
    });
    let mut init = PRELUDE.to_string();
    if !lib_dirs.is_empty() {
        // Without ld.so.cache the loader only searches its built-in directories; name the
        // ones ldd found so the guest resolves libraries exactly as the host did.
        let dirs: Vec<String> = lib_dirs.iter().map(|d| d.display().to_string()).collect();
        init.push_str(&format!("export LD_LIBRARY_PATH={}\n", dirs.join(":")));
    }
    init.push_str(script);
    init.push_str(EPILOGUE);
    tree.file("init", init.into_bytes(), 0o755);

    let cpio = tree.to_newc();
    let dir = guests_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}-{:016x}.cpio", fnv1a(&cpio)));
    if !path.is_file() {
        // Written aside and renamed: a parallel test never boots half a file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{unique}.tmp", std::process::id()));
        std::fs::write(&tmp, &cpio).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        remove_older_versions(&dir, name, &path);
    }
    Ok(path)
}

/// Removes the other `<name>-<hash>.cpio` files: a changed script or binary leaves its
/// old image behind, and the fio ones are ~90 MiB each.
fn remove_older_versions(dir: &Path, name: &str, keep: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let Some(hash) = file_name.to_str().and_then(|f| {
            f.strip_prefix(name)?
                .strip_prefix('-')?
                .strip_suffix(".cpio")
        }) else {
            continue;
        };
        if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) && entry.path() != keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `target/crx-test-guests` (or under `$CARGO_TARGET_DIR`).
fn guests_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| artifacts::workspace_root().join("target"))
        .join("crx-test-guests")
}

/// The static busybox, refusing a dynamic one (it would not run without its libc).
fn static_busybox() -> Result<Vec<u8>> {
    let bytes = std::fs::read(BUSYBOX).with_context(|| {
        format!(
            "{BUSYBOX} is missing: apt-get install busybox-static (scripts/test.sh installs it)"
        )
    })?;
    ensure!(
        !elf_has_interpreter(&bytes),
        "{BUSYBOX} is dynamically linked: apt-get install busybox-static"
    );
    Ok(bytes)
}

/// True for an ELF64 file with a PT_INTERP program header (a dynamic executable).
fn elf_has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            == Some(PT_INTERP)
    })
}

fn busybox_applets() -> Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list"))?;
    ensure!(out.status.success(), "{BUSYBOX} --list failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .map(str::to_string)
        .collect())
}

/// The libraries `ldd` resolves for `binary`, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: ldd says so and fails; it needs nothing else.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), text.trim());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)", or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("ldd {}: {}", binary.display(), line.trim());
        }
    }
    Ok(libs)
}

/// Adds a host file at the same absolute path, following symlinks for its content.
fn add_host_file(tree: &mut Tree, path: &Path, mode: u32) -> Result<()> {
    ensure!(
        path.is_absolute(),
        "{} must be an absolute path",
        path.display()
    );
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let rel = path.to_string_lossy().trim_start_matches('/').to_string();
    tree.file(&rel, bytes, mode);
    Ok(())
}

/// The entries of an initramfs, by path (parents created as needed).
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { mode: u32, major: u32, minor: u32 },
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            self.entries.entry(parent.to_string()).or_insert(Entry::Dir);
            at += i + 1;
        }
    }

    fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries.insert(path.to_string(), Entry::Dir);
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parents(path);
        self.entries
            .insert(path.to_string(), Entry::File { data, mode });
    }

    /// A symlink, unless something already lives at `path` (extra binaries win over
    /// busybox applet links of the same name).
    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entries
            .entry(path.to_string())
            .or_insert_with(|| Entry::Symlink(target.to_string()));
    }

    fn device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entries
            .insert(path.to_string(), Entry::CharDevice { mode, major, minor });
    }

    /// The newc ("070701") archive, parents before children (BTreeMap order), all
    /// owned by root, mtime 0, so equal trees give equal bytes.
    fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040_755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100_000 | mode, data, (0, 0)),
                Entry::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Entry::CharDevice { mode, major, minor } => {
                    (0o020_000 | mode, &[], (*major, *minor))
                }
            };
            newc_entry(&mut out, ino as u32 + 1, mode, path, data, rdev);
        }
        newc_entry(&mut out, 0, 0, "TRAILER!!!", &[], (0, 0));
        out
    }
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// FNV-1a, 64 bits: a stable content hash for cache names (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A VM config for a test guest: the real guest kernel, `initramfs`, and the crx
/// binaries, with no devices (the caller fills `devices`). The console goes to
/// `<run_dir>/console.log`.
pub fn guest_config(
    run_dir: &Path,
    name: &str,
    initramfs: &Path,
    memory_mib: u32,
) -> Result<VmConfig> {
    Ok(VmConfig {
        name: name.to_string(),
        run_dir: run_dir.to_path_buf(),
        kernel: artifacts::guest_kernel()?,
        initramfs: initramfs.to_path_buf(),
        vcpus: 1,
        memory_mib,
        kernel_cmdline: String::new(),
        serial: SerialOutput::File(run_dir.join("console.log")),
        crx_vmm_binary: artifacts::static_binary("crx-vmm")?,
        qemu_binary: artifacts::qemu_binary()?,
        devices: VmDevices::default(),
    })
}

/// Fails with the missing piece named when a QEMU/TCG test guest cannot boot here.
/// (TCG needs no `/dev/kvm`.)
pub fn require_qemu_guest_prerequisites() -> Result<()> {
    artifacts::qemu_binary()?;
    artifacts::guest_kernel()?;
    artifacts::static_binary("crx-vmm")?;
    static_busybox()?;
    Ok(())
}

/// How a test guest ended, and what it printed.
#[derive(Debug)]
pub struct GuestRun {
    pub console: String,
    pub exit: VmExit,
}

impl GuestRun {
    /// The value of the last `CRX-GUEST <key> <value>` line (value may be empty).
    pub fn result(&self, key: &str) -> Option<&str> {
        result_in(&self.console, key)
    }

    /// Every `CRX-GUEST` line, for failure messages.
    pub fn results(&self) -> Vec<&str> {
        self.console
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.contains(RESULT_PREFIX))
            .collect()
    }

    /// Asserts `key` was reported with `want`, naming the guest's report otherwise.
    pub fn expect(&self, key: &str, want: &str) -> Result<()> {
        match self.result(key) {
            Some(got) if got == want => Ok(()),
            got => bail!(
                "guest reported {key} = {got:?}, want {want:?}; guest results: {:#?}; VM: {}",
                self.results(),
                self.exit
            ),
        }
    }
}

fn result_in<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().rev().find_map(|line| {
        // The kernel may prefix a console line with its own output; match from the tag.
        let rest = &line[line.find(RESULT_PREFIX)? + RESULT_PREFIX.len()..];
        let rest = rest.trim_end_matches('\r').strip_prefix(' ')?;
        match rest.split_once(' ') {
            Some((k, v)) if k == key => Some(v),
            None if rest == key => Some(""),
            _ => None,
        }
    })
}

/// A started test guest whose console goes to a file.
pub struct RunningGuest {
    vm: Box<dyn Vm>,
    console_path: PathBuf,
}

/// Starts `config` on `backend` with the console in a file (the config's own file, or
/// `<run_dir>/console.log`).
pub fn start(backend: &dyn VmBackend, config: &VmConfig) -> Result<RunningGuest> {
    let mut config = config.clone();
    let console_path = match &config.serial {
        SerialOutput::File(p) => p.clone(),
        SerialOutput::Off => {
            let p = config.run_dir.join("console.log");
            config.serial = SerialOutput::File(p.clone());
            p
        }
    };
    // A console from an earlier run in the same directory would answer `wait_for_line`.
    let _ = std::fs::remove_file(&console_path);
    let vm = backend.start(&config).context("starting the test guest")?;
    Ok(RunningGuest { vm, console_path })
}

impl RunningGuest {
    pub fn console_path(&self) -> &Path {
        &self.console_path
    }

    /// The VM's processes (`qemu`, `vhost-user-*`, `crx-vmm`) and their pids.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.vm.pids()
    }

    pub fn vm_mut(&mut self) -> &mut dyn Vm {
        self.vm.as_mut()
    }

    /// Waits for the VM to end by itself; past `timeout` stops it and fails with the
    /// console's tail.
    pub fn wait(mut self, timeout: Duration) -> Result<GuestRun> {
        let ended = self.vm.wait_timeout(timeout)?;
        let console = std::fs::read_to_string(&self.console_path).unwrap_or_default();
        match ended {
            Some(exit) => Ok(GuestRun { console, exit }),
            None => {
                let exit = self.vm.stop(Duration::from_secs(1))?;
                bail!(
                    "the test guest did not end within {timeout:?} (stopped: {exit}); console tail:\n{}",
                    tail(&console, 25)
                )
            }
        }
    }
}

/// Boots a test guest and returns once the VM has ended (the script's `reboot -f`), or
/// fails after `timeout`.
pub fn run(backend: &dyn VmBackend, config: &VmConfig, timeout: Duration) -> Result<GuestRun> {
    start(backend, config)?.wait(timeout)
}

/// Waits until a line containing `needle` appears in the console file; returns that line.
pub fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    let mut partial = String::new();
    loop {
        if let Ok(mut file) = std::fs::File::open(path) {
            file.seek(SeekFrom::Start(offset))?;
            let mut reader = BufReader::new(file.by_ref());
            loop {
                let mut buf = Vec::new();
                let n = reader.read_until(b'\n', &mut buf)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                partial.push_str(&String::from_utf8_lossy(&buf));
                if partial.ends_with('\n') {
                    if partial.contains(needle) {
                        return Ok(partial.trim_end().to_string());
                    }
                    partial.clear();
                }
            }
        }
        if Instant::now() >= deadline {
            let console = std::fs::read_to_string(path).unwrap_or_default();
            bail!(
                "no console line with {needle:?} within {timeout:?} in {}; tail:\n{}",
                path.display(),
                tail(&console, 25)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_from_the_last_matching_line() {
        let console = "boot noise\nCRX-GUEST a 1\r\n[ 1.0] CRX-GUEST b two words\nCRX-GUEST a 2\nCRX-GUEST flag\nCRX-GUESTX c 3\n";
        assert_eq!(result_in(console, "a"), Some("2"));
        assert_eq!(result_in(console, "b"), Some("two words"));
        assert_eq!(result_in(console, "flag"), Some(""));
        assert_eq!(result_in(console, "c"), None);
        assert_eq!(result_in(console, "missing"), None);
    }

    #[test]
    fn newc_archive_has_parents_first_and_a_trailer() {
        let mut tree = Tree::default();
        tree.file("usr/bin/x", b"abc".to_vec(), 0o755);
        tree.symlink("bin/sh", "busybox");
        tree.symlink("usr/bin/x", "busybox");
        let cpio = tree.to_newc();
        let text = String::from_utf8_lossy(&cpio);
        let at = |s: &str| text.find(s).unwrap_or(usize::MAX);
        assert!(at("usr\0") < at("usr/bin\0") && at("usr/bin\0") < at("usr/bin/x\0"));
        assert!(text.contains("abc"), "file data missing");
        assert!(
            text.ends_with("TRAILER!!!\0\0\0\0"),
            "no padded trailer at the end"
        );
        assert_eq!(cpio.len() % 4, 0);
        // The file won over the later applet link of the same name.
        assert!(matches!(
            tree.entries.get("usr/bin/x"),
            Some(Entry::File { .. })
        ));
    }

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        if let Ok(bb) = std::fs::read(BUSYBOX) {
            assert!(!elf_has_interpreter(&bb), "{BUSYBOX} should be static");
        }
        let ls = std::fs::read("/bin/ls").unwrap();
        assert!(elf_has_interpreter(&ls), "/bin/ls should be dynamic");
        assert!(!elf_has_interpreter(b"#!/bin/sh\n"));
    }
}
