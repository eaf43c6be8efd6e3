//! vCPU and exit handling with tiny real guests on this host's /dev/kvm (no Linux):
//! real-mode code driving the serial, boot-marker and i8042 ports; a triple fault;
//! two vCPUs; and the PVH boot path through `builder::build` with a minimal ELF.
//! Needs root and /dev/kvm: without them these tests fail, they do not skip.

mod common;

// Integration tests are a crate of their own; the module keeps the workspace's
// `tests_outside_test_module` lint meaningful.
#[cfg(test)]
mod tests {
    use super::common;

    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crx_vmm::arch::x86_64::regs::BootEntry;
    use crx_vmm::builder::{self, Vmm};
    use crx_vmm::config::{SerialMode, VmConfig};
    use crx_vmm::exit::{self, VmEnd};
    use crx_vmm::vstate::kvm::KvmHandle;
    use crx_vmm::vstate::vcpu::{self, Vcpu};
    use kvm_bindings::{kvm_mp_state, kvm_regs, KVM_MP_STATE_RUNNABLE};
    use vm_memory::{Bytes, GuestAddress};

    const CODE_ADDR: u64 = 0x1000;
    const WAIT: Duration = Duration::from_secs(10);

    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Console {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn kvm() -> KvmHandle {
        common::require_kvm();
        KvmHandle::open(std::path::Path::new("/dev/kvm")).expect("open /dev/kvm")
    }

    /// Starts `vcpu` in real mode at CS:IP = 0:CODE_ADDR.
    fn real_mode(vcpu: &Vcpu) {
        let fd = vcpu.fd();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&kvm_regs {
            rip: CODE_ADDR,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    }

    /// A VM with `vcpus` vCPUs in real mode running `code`, console captured.
    fn real_mode_vm(kvm: &KvmHandle, vcpus: u8, code: &[u8]) -> (Vmm, Console) {
        let console = Console::default();
        let vmm = Vmm::new(kvm, 64, vcpus, Some(Box::new(console.clone()))).unwrap();
        vmm.memory()
            .write_slice(code, GuestAddress(CODE_ADDR))
            .unwrap();
        for vcpu in vmm.vcpus() {
            vcpu.configure(kvm, vcpus, None).unwrap();
            real_mode(vcpu);
            if vcpu.index() > 0 {
                // Skip INIT/SIPI: the test's APs run the same code as the BSP.
                vcpu.fd()
                    .set_mp_state(kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    })
                    .unwrap();
            }
        }
        (vmm, console)
    }

    // Real-mode encodings used below.
    fn out_serial(c: &mut Vec<u8>, text: &[u8]) {
        c.extend_from_slice(&[0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for b in text {
            c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
        }
    }
    fn out_marker(c: &mut Vec<u8>, value: u8) {
        c.extend_from_slice(&[0xba, 0xf0, 0x03, 0xb0, value, 0xee]); // mov dx,0x3f0; mov al,v; out dx,al
    }
    fn i8042_reset(c: &mut Vec<u8>) {
        c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]); // mov al,0xfe; out 0x64,al; jmp $
    }

    #[test]
    fn serial_marker_unknown_port_then_clean_reset() {
        let kvm = kvm();
        let mut c = Vec::new();
        out_serial(&mut c, b"OK\n");
        out_marker(&mut c, 1);
        c.extend_from_slice(&[0xba, 0x34, 0x12, 0xec]); // mov dx, 0x1234; in al, dx
        c.extend_from_slice(&[0xa2, 0x00, 0x05]); // mov [0x500], al
        c.extend_from_slice(&[0xe4, 0x64]); // in al, 0x64 (i8042 status)
        c.extend_from_slice(&[0xa2, 0x01, 0x05]); // mov [0x501], al
        out_marker(&mut c, 2);
        i8042_reset(&mut c);
        let (vmm, console) = real_mode_vm(&kvm, 1, &c);
        let mem = vmm.memory().clone();
        mem.write_slice(&[0x5a, 0x5a], GuestAddress(0x500)).unwrap();
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        assert_eq!(end, VmEnd::I8042Reset);
        assert!(
            running.boot_marker().ready_us().is_some(),
            "ready marker seen"
        );
        let clean = running.boot_marker().shutdown_announced();
        running.stop();
        assert_eq!(console.text(), "OK\n");
        let mut read_back = [0u8; 2];
        mem.read_slice(&mut read_back, GuestAddress(0x500)).unwrap();
        assert_eq!(
            read_back,
            [0xff, 0x00],
            "unknown port reads all ones, i8042 status reads 0"
        );
        assert_eq!(exit::outcome(&end, clean).code, exit::EXIT_OK);
    }

    #[test]
    fn reset_without_shutdown_marker_is_reported_as_a_failure() {
        let kvm = kvm();
        let mut c = Vec::new();
        out_serial(&mut c, b"panic\n");
        i8042_reset(&mut c);
        let (vmm, console) = real_mode_vm(&kvm, 1, &c);
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        let clean = running.boot_marker().shutdown_announced();
        running.stop();
        assert_eq!(console.text(), "panic\n");
        let outcome = exit::outcome(&end, clean);
        assert_eq!(outcome.code, exit::EXIT_GUEST_RESET, "{outcome:?}");
    }

    #[test]
    fn triple_fault_ends_the_vm_with_a_shutdown_exit() {
        // Flat 32-bit protected mode with crx's boot GDT and its 1-entry IDT: ud2 raises
        // #UD, which does not fit the IDT, then #DF, then the CPU shuts down.
        let kvm = kvm();
        let vmm = Vmm::new(&kvm, 64, 1, None).unwrap();
        vmm.memory()
            .write_slice(&[0x0f, 0x0b, 0xeb, 0xfe], GuestAddress(CODE_ADDR))
            .unwrap();
        let entry = BootEntry::Pvh {
            entry: CODE_ADDR,
            start_info: 0,
        };
        vcpu::write_boot_tables(vmm.memory(), entry).unwrap();
        let v = &vmm.vcpus()[0];
        v.configure(&kvm, 1, Some(entry)).unwrap();
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        running.stop();
        assert_eq!(end, VmEnd::Shutdown { vcpu: 0 });
        let outcome = exit::outcome(&end, false);
        assert_eq!(outcome.code, exit::EXIT_TRIPLE_FAULT);
        assert!(
            outcome.message.contains("triple-faulted"),
            "{}",
            outcome.message
        );
    }

    #[test]
    fn two_vcpus_see_their_own_apic_ids_and_share_memory() {
        let kvm = kvm();
        let mut c = Vec::new();
        c.extend_from_slice(&[0x66, 0xb8, 0x01, 0x00, 0x00, 0x00]); // mov eax, 1
        c.extend_from_slice(&[0x0f, 0xa2]); // cpuid
        c.extend_from_slice(&[0x66, 0xc1, 0xeb, 0x18]); // shr ebx, 24 (initial APIC id)
        c.extend_from_slice(&[0x80, 0xfb, 0x00]); // cmp bl, 0
        let jne = c.len();
        c.extend_from_slice(&[0x75, 0x00]); // jne ap
                                            // BSP: wait for the AP's flag at 0x510, then print and reset.
        let wait = c.len();
        c.extend_from_slice(&[0xa0, 0x10, 0x05]); // mov al, [0x510]
        c.extend_from_slice(&[0x3c, 0x01]); // cmp al, 1
        let back = c.len();
        c.extend_from_slice(&[0x75, 0x00]); // jne wait
        c[back + 1] = (wait as isize - (back as isize + 2)) as i8 as u8;
        out_serial(&mut c, b"B");
        out_marker(&mut c, 2);
        i8042_reset(&mut c);
        let ap = c.len();
        c[jne + 1] = (ap - (jne + 2)) as u8;
        c.extend_from_slice(&[0x80, 0xc3, b'0']); // add bl, '0'
        c.extend_from_slice(&[0x88, 0xd8]); // mov al, bl
        c.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
        c.extend_from_slice(&[0xc6, 0x06, 0x10, 0x05, 0x01]); // mov byte [0x510], 1
        c.extend_from_slice(&[0xeb, 0xfe]); // jmp $
        let (vmm, console) = real_mode_vm(&kvm, 2, &c);
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        let clean = running.boot_marker().shutdown_announced();
        running.stop();
        assert_eq!(console.text(), "1B", "AP (APIC id 1) printed, then the BSP");
        assert_eq!(end, VmEnd::I8042Reset);
        assert_eq!(exit::outcome(&end, clean).code, exit::EXIT_OK);
    }

    #[test]
    fn stop_kicks_vcpus_out_of_a_spinning_guest() {
        let kvm = kvm();
        let (vmm, _console) = real_mode_vm(&kvm, 2, &[0xeb, 0xfe]);
        let running = vmm.start().unwrap();
        assert_eq!(running.wait_timeout(Duration::from_millis(200)), None);
        running.event_sender().send(VmEnd::HostSignal(15)).unwrap();
        assert_eq!(running.wait_timeout(WAIT), Some(VmEnd::HostSignal(15)));
        let started = std::time::Instant::now();
        running.stop();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "vCPUs stopped promptly"
        );
    }

    fn pvh_config(kernel: std::path::PathBuf, vcpus: u64) -> VmConfig {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline_extra: String::new(),
            vcpus,
            memory_mib: 128,
            vsock: None,
            serial: SerialMode::Off,
            drives: Vec::new(),
            rng: false,
            shares: Vec::new(),
            net: None,
            api_socket: None,
        }
    }

    #[test]
    fn pvh_boot_path_enters_32_bit_code_with_start_info() {
        let kvm = kvm();
        let dir = common::test_dir("pvh-lib");
        for (tail, want_end, want_code) in [
            (
                common::Tail::CleanShutdown,
                VmEnd::I8042Reset,
                exit::EXIT_OK,
            ),
            (
                common::Tail::TripleFault,
                VmEnd::Shutdown { vcpu: 0 },
                exit::EXIT_TRIPLE_FAULT,
            ),
        ] {
            let config = pvh_config(common::write_pvh_kernel(&dir, tail), 2);
            let format = config.validate(None).unwrap();
            let vmm = builder::build(&config, format, &kvm, None).unwrap();
            let running = vmm.start().unwrap();
            let end = running.wait_timeout(WAIT).expect("guest ended");
            let clean = running.boot_marker().shutdown_announced();
            assert!(
                running.boot_marker().ready_us().is_some(),
                "{tail:?}: start info checks passed"
            );
            running.stop();
            assert_eq!(end, want_end, "{tail:?}");
            assert_eq!(exit::outcome(&end, clean).code, want_code, "{tail:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn elf_without_pvh_note_is_refused_before_running() {
        let kvm = kvm();
        let dir = common::test_dir("nopvh");
        let mut elf = common::pvh_elf(&common::pvh_code(common::Tail::Spin));
        // Turn the PT_NOTE program header (the second) into PT_NULL.
        let second_phdr = 64 + 56;
        elf[second_phdr..second_phdr + 4].copy_from_slice(&0u32.to_le_bytes());
        let kernel = dir.join("vmlinux-nopvh");
        std::fs::write(&kernel, elf).unwrap();
        let config = pvh_config(kernel, 1);
        let format = config.validate(None).unwrap();
        let err = builder::build(&config, format, &kvm, None)
            .err()
            .expect("refused");
        assert_eq!(err.exit_code(), exit::EXIT_BAD_INPUT);
        let mut text = err.to_string();
        let mut src = std::error::Error::source(&err);
        while let Some(s) = src {
            text.push_str(&format!(": {s}"));
            src = s.source();
        }
        assert!(text.contains("without a PVH entry note"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bzimage_boot_path_enters_64_bit_code_with_the_zero_page() {
        let kvm = kvm();
        let dir = common::test_dir("bzimage-lib");
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, common::bzimage()).unwrap();
        let config = pvh_config(kernel, 1);
        let format = config.validate(None).unwrap();
        assert_eq!(format, crx_vmm::config::KernelFormat::BzImage);
        let vmm = builder::build(&config, format, &kvm, None).unwrap();
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        let clean = running.boot_marker().shutdown_announced();
        running.stop();
        assert_eq!(end, VmEnd::I8042Reset);
        assert_eq!(
            exit::outcome(&end, clean).code,
            exit::EXIT_OK,
            "zero page checks passed"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn initramfs_is_placed_high_and_listed_as_the_pvh_module() {
        let kvm = kvm();
        let dir = common::test_dir("initramfs-lib");
        let initramfs = dir.join("initramfs.cpio");
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&initramfs, &content).unwrap();
        let mut config = pvh_config(common::write_pvh_kernel(&dir, common::Tail::Spin), 1);
        config.initramfs = Some(initramfs);
        let format = config.validate(None).unwrap();
        let vmm = builder::build(&config, format, &kvm, None).unwrap();
        let mem = vmm.memory();
        let info = 0x6000u64;
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(info + 12)).unwrap(),
            1,
            "nr_modules"
        );
        let modlist: u64 = mem.read_obj(GuestAddress(info + 16)).unwrap();
        let paddr: u64 = mem.read_obj(GuestAddress(modlist)).unwrap();
        let size: u64 = mem.read_obj(GuestAddress(modlist + 8)).unwrap();
        assert_eq!(size, content.len() as u64);
        assert_eq!(paddr % 4096, 0, "page aligned");
        assert_eq!(paddr, (128 << 20) - 4096 * 3, "at the top of low RAM");
        let mut loaded = vec![0u8; content.len()];
        mem.read_slice(&mut loaded, GuestAddress(paddr)).unwrap();
        assert_eq!(loaded, content);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn queue_notify_ioeventfd_fires_in_kvm_only_for_its_queue_index() {
        // What the builder does for each virtio queue, seen from the guest: a 32-bit
        // write of the queue index to slot base + 0x50 signals that queue's eventfd
        // without a userspace exit; another index does not (it exits to the MMIO bus).
        let kvm = kvm();
        let vmm = Vmm::new(&kvm, 64, 1, None).unwrap();
        let notify = 0xd000_0050u32;
        let q0 = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let q1 = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vmm.vm()
            .register_mmio_ioevent(&q0, u64::from(notify), 0)
            .unwrap();
        vmm.vm()
            .register_mmio_ioevent(&q1, u64::from(notify), 1)
            .unwrap();
        let mut c = Vec::new();
        for value in [1u32, 1, 7] {
            c.extend_from_slice(&[0xc7, 0x05]); // mov dword [notify], value
            c.extend_from_slice(&notify.to_le_bytes());
            c.extend_from_slice(&value.to_le_bytes());
        }
        c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03, 0xb0, 0x02, 0xee]); // clean shutdown follows
        c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
        vmm.memory()
            .write_slice(&c, GuestAddress(CODE_ADDR))
            .unwrap();
        let entry = BootEntry::Pvh {
            entry: CODE_ADDR,
            start_info: 0,
        };
        vcpu::write_boot_tables(vmm.memory(), entry).unwrap();
        vmm.vcpus()[0].configure(&kvm, 1, Some(entry)).unwrap();
        let running = vmm.start().unwrap();
        let end = running.wait_timeout(WAIT).expect("guest ended");
        running.stop();
        assert_eq!(end, VmEnd::I8042Reset);
        assert_eq!(q1.read().unwrap(), 2, "two notifications of queue 1");
        assert!(q0.read().is_err(), "queue 0 was never notified");
    }
}
