//! The pod's devices on QEMU's command line. virtio-fs goes to crx's own back end over
//! vhost-user (one `crx-vmm vhost-user-fs` process per share, started by the backend);
//! so does an empty drive slot (one `crx-vmm vhost-user-blk` process per slot, whose
//! API socket attaches a backing later: QEMU's own virtio-blk cannot start without
//! one). Drives with a backing, virtio-net and virtio-rng are QEMU's own devices on the
//! same backing files and tap fd crx-vmm would use.
//!
//! Order: drives, rng, NIC, shares, then the agent's vsock (added by the caller) — the
//! order crx-vmm's builder attaches them. What the guest can observe is the order of
//! the drives among themselves (the first drive is /dev/vda, the next /dev/vdb, ...):
//! on microvm each `-device` takes the next free virtio-mmio transport, and the guest
//! probes transports in command-line order, so slot order is kept on both VMMs.
//! Shares are found by tag and there is one NIC, so their place does not matter.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::config::{format_mac, VmDevices};
use super::VmError;

/// The `-drive`/`-device`/`-object`/`-chardev`/`-netdev` arguments for `devices`;
/// `fs_sockets[i]` is the vhost-user socket of share `i`, `slot_socket(i)` that of
/// drive `i` when it is an empty slot. The tap fd is passed by its number in the shim,
/// which QEMU inherits (see [`super::child::inherit_fd`]).
pub(super) fn device_args(
    devices: &VmDevices,
    fs_sockets: &[PathBuf],
    slot_socket: impl Fn(usize) -> PathBuf,
) -> Result<Vec<String>, VmError> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |a: &str, b: String| {
        args.push(a.to_string());
        args.push(b);
    };
    for (i, drive) in devices.drives.iter().enumerate() {
        // QEMU's virtio-blk cannot start without a medium, and swapping the backing of
        // a non-removable drive later would need QMP blockdev surgery: an empty slot is
        // crx's own virtio-blk behind vhost-user, which serves the serial itself.
        let Some(path) = &drive.path else {
            push(
                "-chardev",
                format!("socket,id=blk{i},path={}", slot_socket(i).display()),
            );
            push(
                "-device",
                format!("vhost-user-blk,chardev=blk{i},num-queues=1"),
            );
            continue;
        };
        // cache=writeback: host page cache, with the guest told the drive has a volatile
        // write cache, so its FLUSH becomes an fdatasync of the backing before QEMU
        // acknowledges it (crx-vmm's contract too). cache=none would add O_DIRECT,
        // which tmpfs backings refuse.
        push(
            "-drive",
            format!(
                "if=none,id=blk{i},file={},format=raw,cache=writeback,aio=threads,readonly={}",
                path.display(),
                if drive.read_only { "on" } else { "off" }
            ),
        );
        let serial = if drive.serial.is_empty() {
            String::new()
        } else {
            format!(",serial={}", drive.serial)
        };
        push("-device", format!("virtio-blk-device,drive=blk{i}{serial}"));
    }
    if devices.rng {
        push(
            "-object",
            "rng-random,filename=/dev/urandom,id=rng0".to_string(),
        );
        push("-device", "virtio-rng-device,rng=rng0".to_string());
    }
    if let Some(net) = &devices.net {
        push("-netdev", format!("tap,id=net0,fd={}", net.tap.as_raw_fd()));
        push(
            "-device",
            format!(
                "virtio-net-device,netdev=net0,mac={},host_mtu={}",
                format_mac(&net.mac),
                net.mtu
            ),
        );
    }
    if fs_sockets.len() != devices.shares.len() {
        return Err(VmError::InvalidConfig(format!(
            "{} shares but {} vhost-user-fs sockets",
            devices.shares.len(),
            fs_sockets.len()
        )));
    }
    for (i, (share, socket)) in devices.shares.iter().zip(fs_sockets).enumerate() {
        push(
            "-chardev",
            format!("socket,id=fs{i},path={}", socket.display()),
        );
        push(
            "-device",
            format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
        );
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use super::*;
    use crate::vm::{Drive, NetDevice, SharedDir};

    #[test]
    fn every_device_kind_becomes_qemu_arguments_in_slot_order() {
        let tap: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        let devices = VmDevices {
            shares: vec![SharedDir {
                tag: "pod".into(),
                host_dir: "/srv/pod".into(),
            }],
            drives: vec![
                Drive {
                    path: Some("/a.img".into()),
                    read_only: false,
                    serial: "first".into(),
                },
                Drive {
                    path: Some("/b.img".into()),
                    read_only: true,
                    serial: String::new(),
                },
            ],
            net: Some(NetDevice {
                tap: Arc::new(tap),
                mac: [0x02, 0, 0, 0, 0, 0x2a],
                mtu: 1400,
            }),
            rng: true,
        };
        let args = device_args(&devices, &["/run/x/fs-0.sock".into()], |_| {
            unreachable!("no empty slot")
        })
        .unwrap();
        let values: Vec<&str> = args.iter().skip(1).step_by(2).map(String::as_str).collect();
        let expected = [
            "if=none,id=blk0,file=/a.img,format=raw,cache=writeback,aio=threads,readonly=off",
            "virtio-blk-device,drive=blk0,serial=first",
            "if=none,id=blk1,file=/b.img,format=raw,cache=writeback,aio=threads,readonly=on",
            "virtio-blk-device,drive=blk1",
            "rng-random,filename=/dev/urandom,id=rng0",
            "virtio-rng-device,rng=rng0",
            &format!("tap,id=net0,fd={fd}"),
            "virtio-net-device,netdev=net0,mac=02:00:00:00:00:2a,host_mtu=1400",
            "socket,id=fs0,path=/run/x/fs-0.sock",
            "vhost-user-fs-device,chardev=fs0,tag=pod",
        ];
        assert_eq!(values, expected);
    }

    #[test]
    fn an_empty_slot_is_a_vhost_user_blk_device_in_its_drive_place() {
        let devices = VmDevices {
            drives: vec![
                Drive {
                    path: Some("/a.img".into()),
                    read_only: true,
                    serial: String::new(),
                },
                Drive {
                    path: None,
                    read_only: false,
                    serial: "crx-slot-0".into(),
                },
            ],
            ..Default::default()
        };
        let args = device_args(&devices, &[], |i| format!("/run/x/blk-{i}.sock").into()).unwrap();
        let values: Vec<&str> = args.iter().skip(1).step_by(2).map(String::as_str).collect();
        assert_eq!(
            values[2..],
            [
                "socket,id=blk1,path=/run/x/blk-1.sock",
                "vhost-user-blk,chardev=blk1,num-queues=1"
            ]
        );
    }
}
