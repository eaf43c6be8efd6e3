//! crx's hybrid-vsock muxer as a vhost-user-vsock back end, so QEMU's
//! `vhost-user-vsock-device` gives the guest the same vsock and the host the same
//! `CONNECT <port>\n` / `OK <hostport>\n` socket that crx-vmm gives in process.
//!
//! The vhost-user-backend crate owns the protocol and the vrings; this module moves
//! packets between those vrings and [`VsockMuxer`] exactly as crx-vmm's device thread
//! does, and adds the muxer's one fd to the back end's epoll loop.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{
    config_bytes, drain_vring, note_unoffered_event_idx, run_daemon, DaemonError, ExitEvent, Mem,
    Vring,
};

use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::vsock::{MuxerConfig, VsockError, VsockMuxer, MAX_PKT_DATA};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// QEMU sizes vhost-user-vsock queues itself (1024 on virtio-mmio, 128 on PCI in
/// QEMU 7.2) and refuses to start if the back end's maximum is smaller.
const MAX_QUEUE_SIZE: usize = 1024;
const RX: usize = 0;
const TX: usize = 1;
const NUM_QUEUES: usize = 3;
/// Epoll token of the muxer's fd: tokens up to `NUM_QUEUES` belong to the queues
/// and the exit event.
const MUXER_TOKEN: u16 = NUM_QUEUES as u16 + 1;

/// Why the vhost-user-vsock back end stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error(
        "vhost-user socket {0} already exists (another back end, or a stale socket to remove)"
    )]
    SocketExists(PathBuf),
    #[error("cannot set up the vsock muxer")]
    Muxer(#[source] VsockError),
    #[error("cannot create the back end's exit event")]
    ExitEvent(#[source] io::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("cannot watch the muxer's fd in the back end's event loop")]
    Register(#[source] io::Error),
}

/// The vhost-user-vsock device state: the muxer plus the guest memory QEMU shared.
pub struct VhostUserVsockBackend {
    guest_cid: u64,
    muxer: VsockMuxer,
    mem: Option<Mem>,
    exit: ExitEvent,
    warn: WarnLimiter,
}

impl VhostUserVsockBackend {
    pub fn new(muxer: VsockMuxer) -> Result<Self, VhostUserVsockError> {
        let exit = ExitEvent::new().map_err(VhostUserVsockError::ExitEvent)?;
        Ok(Self {
            guest_cid: muxer.guest_cid(),
            muxer,
            mem: None,
            exit,
            warn: WarnLimiter::new(),
        })
    }

    fn queue_usable(vring: &Vring) -> bool {
        let state = vring.get_ref();
        state.is_enabled() && state.get_queue().ready()
    }

    /// Hands every packet on the tx vring to the muxer.
    fn process_tx(&mut self, vring: &Vring) -> io::Result<()> {
        let (muxer, warn) = (&mut self.muxer, &mut self.warn);
        drain_vring(vring, self.mem.as_ref(), |mem, mut chain| {
            match VsockPacket::from_tx_virtq_chain(&**mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => muxer.send_pkt(&pkt),
                Err(e) => warn.warn(format_args!(
                    "vhost-user-vsock: dropped malformed tx packet: {e}"
                )),
            }
            0
        })
    }

    /// Fills rx buffers while the muxer has packets and the guest has buffers.
    fn process_rx(&mut self, vring: &Vring) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        if !Self::queue_usable(vring) {
            return Ok(());
        }
        let mem = atomic.memory();
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            // No buffers: the guest's next rx kick brings us back.
            let Some(mut chain) = chain else { break };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    if !self.muxer.recv_pkt(&mut pkt) {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        break;
                    }
                    PKT_HEADER_SIZE as u32 + pkt.len()
                }
                Err(e) => {
                    self.warn.warn(format_args!(
                        "vhost-user-vsock: dropped malformed rx buffer: {e}"
                    ));
                    0
                }
            };
            vring.add_used(head, len).map_err(io::Error::other)?;
            used = true;
        }
        if used {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&mut self) {
        self.muxer.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        note_unoffered_event_idx("vhost-user-vsock", enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(&self.guest_cid.to_le_bytes(), offset, size)
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if vrings.len() != NUM_QUEUES {
            return Err(io::Error::other("vhost-user-vsock: wrong number of vrings"));
        }
        match device_event {
            d if usize::from(d) == TX => self.process_tx(&vrings[TX])?,
            MUXER_TOKEN => self.muxer.process_events(),
            // rx kick (new buffers) and event queue: only rx work below.
            _ => {}
        }
        self.process_rx(&vrings[RX])
    }
}

/// Serves one QEMU connection on the vhost-user socket `socket`, with the hybrid
/// vsock socket at `uds_path`; returns when QEMU disconnects.
///
/// Both socket files are removed on return.
pub fn serve_vhost_user_vsock(
    socket: &Path,
    guest_cid: u64,
    uds_path: PathBuf,
) -> Result<(), VhostUserVsockError> {
    // vhost's listener would silently replace whatever is there; a live back end's
    // socket must not be stolen.
    if socket.symlink_metadata().is_ok() {
        return Err(VhostUserVsockError::SocketExists(socket.to_path_buf()));
    }
    let muxer = VsockMuxer::new(MuxerConfig::new(guest_cid, uds_path))
        .map_err(VhostUserVsockError::Muxer)?;
    let muxer_fd = muxer.as_raw_fd();
    let backend = Arc::new(RwLock::new(VhostUserVsockBackend::new(muxer)?));
    run_daemon("crx-vhost-vsock", backend, socket, |handlers| {
        let handler = handlers.first().ok_or(DaemonError {
            step: "creating the daemon",
            detail: "no worker thread".into(),
        })?;
        handler
            .register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_TOKEN))
            .map_err(VhostUserVsockError::Register)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::TestDir;

    #[test]
    fn advertises_vsock_features_and_config() {
        let dir = TestDir::new("vhu");
        let muxer = VsockMuxer::new(MuxerConfig::new(7, dir.0.join("v.sock"))).unwrap();
        let b = VhostUserVsockBackend::new(muxer).unwrap();
        assert_eq!(b.num_queues(), 3);
        assert_ne!(b.features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(
            b.features() & (1 << 30),
            0,
            "VHOST_USER_F_PROTOCOL_FEATURES"
        );
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(b.get_config(0, 8), 7u64.to_le_bytes().to_vec());
        assert_eq!(b.get_config(4, 8), vec![0; 8]);
        assert_eq!(b.get_config(u32::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn refuses_an_existing_socket_path_and_leaves_it_alone() {
        let dir = TestDir::new("vhu-exists");
        let sock = dir.0.join("vhu.sock");
        std::fs::write(&sock, b"someone else's").unwrap();
        let err = serve_vhost_user_vsock(&sock, 3, dir.0.join("v.sock")).unwrap_err();
        assert!(matches!(err, VhostUserVsockError::SocketExists(_)));
        assert_eq!(std::fs::read(&sock).unwrap(), b"someone else's");
        assert!(!dir.0.join("v.sock").exists());
    }

    /// Builds an initramfs whose `/init` runs `test_guest.c` (static, with busybox for
    /// the mounts and the final reboot).
    fn build_test_initrd(dir: &Path) -> PathBuf {
        use std::process::Command;
        let root = dir.join("root");
        for d in ["bin", "proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let src = dir.join("guest.c");
        std::fs::write(&src, include_str!("test_guest.c")).unwrap();
        let ok = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(root.join("bin/vsock-guest"))
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "gcc -static failed (needs gcc and glibc's static libc)");
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))
            .expect("needs a static /usr/bin/busybox (Debian busybox-static)");
        let init = "#!/bin/busybox sh\n\
            /bin/busybox mount -t proc proc /proc\n\
            /bin/busybox mount -t sysfs sys /sys\n\
            /bin/busybox mount -t devtmpfs dev /dev\n\
            /bin/vsock-guest\n\
            echo \"GUEST exit $?\"\n\
            /bin/busybox reboot -f\n";
        std::fs::write(root.join("init"), init).unwrap();
        std::fs::set_permissions(
            root.join("init"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let initrd = dir.join("initrd.cpio");
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && find . | cpio -o -H newc 2>/dev/null > '{}'",
                root.display(),
                initrd.display()
            ))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "building the initramfs needs cpio");
        initrd
    }

    /// The newest crx guest kernel the kernel-config build script cached.
    fn cached_crx_kernel() -> Option<String> {
        let mut found: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir("/var/cache/crx/kernel")
                .ok()?
                .flatten()
                .map(|e| e.path().join("vmlinux"))
                .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
                .collect();
        found.sort();
        found.pop().map(|(_, p)| p.display().to_string())
    }

    /// A real guest under QEMU (TCG) driving this back end, the way the QEMU VM backend
    /// runs pods: microvm, `vhost-user-vsock-device`, memory from a shared memfd.
    ///
    /// Kernel: `CRX_VHU_KERNEL`, else the newest `/var/cache/crx/kernel/*/vmlinux` (it
    /// needs virtio-mmio command-line devices and vsock built in). Initramfs:
    /// `CRX_VHU_INITRD`, else one built from `test_guest.c`. `CRX_VHU_DEVICE` may pick
    /// `vhost-user-vsock-pci` (q35) instead, e.g. for a distribution kernel.
    /// Run: `cargo test -p crx-vmm --lib qemu_guest -- --ignored --nocapture`.
    #[test]
    #[ignore = "boots a guest under QEMU TCG (a few seconds); needs qemu, gcc, busybox-static"]
    fn qemu_guest_talks_through_the_back_end() {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::time::{Duration, Instant};

        let dir = TestDir::new("vhu-qemu");
        let kernel = std::env::var("CRX_VHU_KERNEL")
            .ok()
            .or_else(cached_crx_kernel)
            .expect("no guest kernel: set CRX_VHU_KERNEL or build kernel-config/");
        let initrd = std::env::var("CRX_VHU_INITRD")
            .unwrap_or_else(|_| build_test_initrd(&dir.0).display().to_string());
        let device =
            std::env::var("CRX_VHU_DEVICE").unwrap_or_else(|_| "vhost-user-vsock-device".into());
        let vhu = dir.0.join("vhu.sock");
        let uds = dir.0.join("v.sock");
        let mut port_path = uds.clone().into_os_string();
        port_path.push("_1025");
        let host_listener = UnixListener::bind(&port_path).unwrap();

        let (vhu2, uds2) = (vhu.clone(), uds.clone());
        let backend = std::thread::spawn(move || serve_vhost_user_vsock(&vhu2, 3, uds2));
        let t0 = Instant::now();
        while !vhu.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "back end socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (machine, console) = if device.ends_with("-pci") {
            ("q35", "console=ttyS0")
        } else {
            ("microvm,acpi=off", "console=ttyS0 acpi=off")
        };
        let console_log = dir.0.join("console.log");
        let mut qemu = std::process::Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", machine, "-m", "256", "-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-machine", "memory-backend=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vhu,path={}", vhu.display()))
            .arg("-device")
            .arg(format!("{device},chardev=vhu"))
            .args(["-kernel", &kernel, "-initrd", &initrd])
            .args(["-append", &format!("{console} panic=-1 quiet")])
            .args(["-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", console_log.display()))
            .spawn()
            .unwrap();

        // Guest → host: the guest connects to host port 1025.
        host_listener.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut from_guest = loop {
            match host_listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(180) => {
                    if let Some(st) = qemu.try_wait().unwrap() {
                        let log = std::fs::read_to_string(&console_log).unwrap_or_default();
                        panic!("qemu exited early ({st}); console:\n{log}");
                    }
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    let _ = qemu.kill();
                    let log = std::fs::read_to_string(&console_log).unwrap_or_default();
                    let served = backend.is_finished().then(|| backend.join());
                    panic!("guest never connected ({e}); back end: {served:?}; console:\n{log}");
                }
            }
        };
        let guest_connected = t0.elapsed();
        from_guest.set_nonblocking(false).unwrap();
        from_guest
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&from_guest).read_line(&mut line).unwrap();
        assert_eq!(line, "guest-hello\n");
        from_guest.write_all(b"host-reply\n").unwrap();

        // Host → guest: CONNECT to the guest's echo server, retrying until it listens.
        let t1 = Instant::now();
        let mut c = loop {
            let mut c = UnixStream::connect(&uds).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c.write_all(b"CONNECT 1024\n").unwrap();
            let mut reply = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b).unwrap_or(0) == 1 {
                reply.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            if reply.starts_with(b"OK ") {
                break c;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(60),
                "guest never listened on 1024"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let t2 = Instant::now();
        let writer = {
            let mut w = c.try_clone().unwrap();
            let p = payload.clone();
            std::thread::spawn(move || {
                w.write_all(&p).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut echoed = Vec::new();
        c.read_to_end(&mut echoed).unwrap();
        let echo_time = t2.elapsed();
        writer.join().unwrap();
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload, "echo differs");

        let t3 = Instant::now();
        let status = loop {
            if let Some(st) = qemu.try_wait().unwrap() {
                break st;
            }
            if t3.elapsed() > Duration::from_secs(60) {
                let _ = qemu.kill();
                panic!("guest did not power off");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let served = backend.join().unwrap();
        let log = std::fs::read_to_string(&console_log).unwrap_or_default();
        eprintln!(
            "guest connected after {guest_connected:?}; 1 MB echo in {echo_time:?}; qemu {status}"
        );
        assert!(
            log.contains("GUEST got from host: host-reply"),
            "console:\n{log}"
        );
        assert!(
            log.contains("GUEST echo done, 1000000 bytes"),
            "console:\n{log}"
        );
        served.unwrap();
        assert!(!vhu.exists() && !uds.exists(), "sockets left behind");
    }
}
