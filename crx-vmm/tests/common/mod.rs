//! Tiny hand-assembled guests for crx-vmm's tests: no Linux, just enough machine code
//! to drive the devices and exits under test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the PVH test kernel is loaded and entered.
pub const PVH_ENTRY: u32 = 0x10_0000;

/// What the PVH test guest does after it checked its boot info and said "ready".
#[derive(Clone, Copy, Debug)]
pub enum Tail {
    /// Spins forever (for stop/kill tests).
    Spin,
    /// Announces a clean shutdown, then resets through the i8042.
    CleanShutdown,
    /// Resets through the i8042 without announcing it (looks like a panic).
    Reset,
    /// Raises #UD with an IDT too small for any handler: triple fault.
    TripleFault,
}

/// 32-bit protected-mode code for the PVH entry. It checks that EBX points at an
/// `hvm_start_info` (magic) whose command line starts with "rebo" (crx-vmm's
/// `reboot=k`), prints "ready\n" on COM1, writes 1 to the boot-marker port, then
/// does `tail`. A failed check resets without the shutdown marker, which the tests
/// see as exit code 10.
pub fn pvh_code(tail: Tail) -> Vec<u8> {
    pvh_code_checking_virtio(tail, false)
}

/// Like [`pvh_code`]; with `virtio`, it also checks that the first virtio-mmio slot
/// (0xd000_0000) holds a virtio 1.x vsock device (magic "virt", version 2, device
/// 19) and that the empty second slot reads as all ones.
pub fn pvh_code_checking_virtio(tail: Tail, virtio: bool) -> Vec<u8> {
    let mut c = Vec::new();
    let mut to_bad = Vec::new();
    c.extend_from_slice(&[0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33]); // cmp dword [ebx], 0x336ec578
    to_bad.push(c.len());
    c.extend_from_slice(&[0x75, 0x00]); // jne bad
    c.extend_from_slice(&[0x8b, 0x73, 0x18]); // mov esi, [ebx+24]  (cmdline_paddr)
    c.extend_from_slice(&[0x81, 0x3e, b'r', b'e', b'b', b'o']); // cmp dword [esi], "rebo"
    to_bad.push(c.len());
    c.extend_from_slice(&[0x75, 0x00]); // jne bad
    if virtio {
        for (addr, value) in [
            (0xd000_0000u32, 0x7472_6976u32), // MagicValue "virt"
            (0xd000_0004, 2),                 // Version: modern
            (0xd000_0008, 19),                // DeviceID: vsock
            (0xd000_1000, 0xffff_ffff),       // empty slot: open bus
        ] {
            c.push(0xa1); // mov eax, [addr]
            c.extend_from_slice(&addr.to_le_bytes());
            c.push(0x3d); // cmp eax, value
            c.extend_from_slice(&value.to_le_bytes());
            to_bad.push(c.len());
            c.extend_from_slice(&[0x75, 0x00]); // jne bad
        }
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for b in b"ready\n" {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03]); // mov dx, 0x3f0
    c.extend_from_slice(&[0xb0, 0x01, 0xee]); // mov al, 1; out dx, al
    match tail {
        Tail::Spin => c.extend_from_slice(&[0xeb, 0xfe]),
        Tail::CleanShutdown => {
            c.extend_from_slice(&[0xb0, 0x02, 0xee]); // mov al, 2; out dx, al
            c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // reset; jmp $
        }
        Tail::Reset => c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]),
        Tail::TripleFault => c.extend_from_slice(&[0x0f, 0x0b, 0xeb, 0xfe]), // ud2: #UD, #DF, shutdown
    }
    let bad = c.len();
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    for jne in to_bad {
        c[jne + 1] = u8::try_from(bad - (jne + 2)).expect("short jump");
    }
    c
}

/// A minimal ELF64 executable: one PT_LOAD with `code` at [`PVH_ENTRY`] and a PT_NOTE
/// holding the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), like a PVH vmlinux.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&PVH_ENTRY.to_le_bytes());
    let code_off = 0x1000usize;

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&u64::from(PVH_ENTRY).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // no sections
    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, off: usize, addr: u64, size: usize, align: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&(off as u64).to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
    phdr(
        &mut f,
        1,
        5,
        code_off,
        u64::from(PVH_ENTRY),
        code.len(),
        0x1000,
    ); // PT_LOAD r-x
    phdr(&mut f, 4, 4, note_off, 0, note.len(), 4); // PT_NOTE
    f.extend_from_slice(&note);
    f.resize(code_off, 0);
    f.extend_from_slice(code);
    f
}

/// A bzImage-shaped test kernel: a setup header (boot protocol 2.15, loaded high)
/// and, 0x200 into the protected-mode part, 64-bit code for the 64-bit entry. The
/// code checks RSI is the zero page (0x7000) with "HdrS", loader type 0xff, two e820
/// entries and a command line starting "rebo", then says ready, announces a clean
/// shutdown and resets. A failed check resets without announcing it.
pub fn bzimage() -> Vec<u8> {
    let mut setup = vec![0u8; 1024];
    setup[0x1f1] = 1; // setup_sects: setup is (1 + 1) * 512 bytes
    setup[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    setup[0x202..0x206].copy_from_slice(b"HdrS");
    setup[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    setup[0x211] = 1; // LOADED_HIGH
    setup[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    setup[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    let mut c = Vec::new();
    let mut to_bad = Vec::new();
    let mut check = |c: &mut Vec<u8>, insn: &[u8]| {
        c.extend_from_slice(insn);
        to_bad.push(c.len());
        c.extend_from_slice(&[0x75, 0x00]); // jne bad
    };
    check(&mut c, &[0x48, 0x81, 0xfe, 0x00, 0x70, 0x00, 0x00]); // cmp rsi, 0x7000
    check(
        &mut c,
        &[0x81, 0xbe, 0x02, 0x02, 0x00, 0x00, b'H', b'd', b'r', b'S'],
    ); // cmp dword [rsi+0x202], "HdrS"
    check(&mut c, &[0x80, 0xbe, 0x10, 0x02, 0x00, 0x00, 0xff]); // cmp byte [rsi+0x210], 0xff
    check(&mut c, &[0x80, 0xbe, 0xe8, 0x01, 0x00, 0x00, 0x02]); // cmp byte [rsi+0x1e8], 2
    c.extend_from_slice(&[0x8b, 0x86, 0x28, 0x02, 0x00, 0x00]); // mov eax, [rsi+0x228]
    check(&mut c, &[0x81, 0x38, b'r', b'e', b'b', b'o']); // cmp dword [rax], "rebo"
    c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03, 0xb0, 0x01, 0xee]); // ready
    c.extend_from_slice(&[0xb0, 0x02, 0xee]); // clean shutdown follows
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let bad = c.len();
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    for jne in to_bad {
        c[jne + 1] = u8::try_from(bad - (jne + 2)).expect("short jump");
    }
    let mut image = setup;
    image.resize(1024 + 0x200, 0x90);
    image.extend_from_slice(&c);
    image
}

/// A fresh directory for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crx-vmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Writes the PVH test kernel for `tail` into `dir`.
pub fn write_pvh_kernel(dir: &Path, tail: Tail) -> PathBuf {
    let path = dir.join(format!("vmlinux-{tail:?}"));
    std::fs::write(&path, pvh_elf(&pvh_code(tail))).expect("write test kernel");
    path
}

/// Fails (never skips) when the host cannot run the guest tests.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests run tiny guests and need read/write access to /dev/kvm (run as root on a KVM host): {e}");
    }
}

/// Starts `crx-vmm` on a spinning tiny PVH guest with `extra` arguments and returns
/// once it reported the guest ready (every thread started, the devices built, the
/// filters installed). Its stderr keeps being drained so it never blocks on it.
pub fn start_spinning(dir: &Path, extra: &[&str]) -> Child {
    const READY_DEADLINE: Duration = Duration::from_secs(10);
    let kernel = write_pvh_kernel(dir, Tail::Spin);
    let mut child = Command::new(env!("CARGO_BIN_EXE_crx-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--allow-pvm", "--log-level", "info"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crx-vmm");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("guest agent ready") => break,
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => panic!("crx-vmm ended before the guest was ready: {seen:?}"),
        }
        assert!(
            start.elapsed() < READY_DEADLINE,
            "guest not ready in time: {seen:?}"
        );
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    child
}
