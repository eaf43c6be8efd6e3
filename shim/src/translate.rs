//! What the shim turns into guest terms before the agent sees it: the OCI spec (guest
//! rootfs path, host bind-mount sources replaced by their copies in the pod share, no
//! host namespace paths, no host hooks, the pod's network namespace is the guest's
//! own) and containerd's runtime options (`ConfigPath`).

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use serde_json::Value;

use crate::host_cgroup;

/// A bind mount of a host path in the spec (`/etc/hosts`, a volume, ...): the guest
/// cannot see the host path, so the shim binds it into the pod share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBind {
    /// Index in the spec's `mounts`.
    pub index: usize,
    pub source: std::path::PathBuf,
    /// The mount is read-only (`ro` in its options): its copy in the share is made
    /// read-only on the host too, so the guest cannot write it whatever it runs.
    pub read_only: bool,
}

/// The spec's bind mounts of host paths.
pub fn host_binds(spec: &Value) -> Vec<HostBind> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Vec::new();
    };
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
            let opts = m.get("options").and_then(Value::as_array);
            let bind_opt = opts.is_some_and(|o| {
                o.iter()
                    .any(|v| matches!(v.as_str(), Some("bind") | Some("rbind")))
            });
            typ == "bind" || bind_opt
        })
        .filter_map(|(index, m)| {
            let source = m.get("source").and_then(Value::as_str)?;
            let source = std::path::PathBuf::from(source);
            // The last of `ro`/`rw` wins, as in mount(8).
            let read_only = m
                .get("options")
                .and_then(Value::as_array)
                .and_then(|o| {
                    o.iter().rev().find_map(|v| match v.as_str() {
                        Some("ro") => Some(true),
                        Some("rw") => Some(false),
                        _ => None,
                    })
                })
                .unwrap_or(false);
            source.is_absolute().then_some(HostBind {
                index,
                source,
                read_only,
            })
        })
        .collect()
}

/// Character devices the pod's kernel has under the same numbers as the host's
/// (numbers the kernel fixes): null, zero, full, random, urandom, kmsg, tty, ptmx,
/// net/tun, fuse. A container asking for one gets the pod's own.
const SAME_IN_GUEST: [(u64, u64); 10] = [
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (1, 11),
    (5, 0),
    (5, 2),
    (10, 200),
    (10, 229),
];

/// Why a container's `linux.devices` cannot be honoured in its pod VM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device {path} (char {major}:{minor} on the host) cannot be given to a crx pod: \
         its pod VM has its own kernel, and only devices it has under the same numbers \
         (null, zero, full, random, urandom, kmsg, tty, ptmx, net/tun, fuse) are passed"
    )]
    Char {
        path: String,
        major: u64,
        minor: u64,
    },
    #[error("linux.devices[{index}] is malformed: {reason}")]
    Malformed { index: usize, reason: &'static str },
}

/// One `linux.devices` entry, as far as the guest cares.
struct SpecDevice<'a> {
    path: &'a str,
    kind: &'a str,
    major: u64,
    minor: u64,
}

fn spec_device(index: usize, d: &Value) -> Result<SpecDevice<'_>, DeviceError> {
    let malformed = |reason| DeviceError::Malformed { index, reason };
    let path = d
        .get("path")
        .and_then(Value::as_str)
        .ok_or(malformed("no path"))?;
    let kind = d
        .get("type")
        .and_then(Value::as_str)
        .ok_or(malformed("no type"))?;
    let number = |k: &str| d.get(k).map_or(Some(0), Value::as_u64);
    let major = number("major").ok_or(malformed("major is not a number"))?;
    let minor = number("minor").ok_or(malformed("minor is not a number"))?;
    Ok(SpecDevice {
        path,
        kind,
        major,
        minor,
    })
}

impl SpecDevice<'_> {
    /// Whether the guest's node with these numbers is the device asked for (a FIFO
    /// names no device at all).
    fn same_in_guest(&self) -> bool {
        match self.kind {
            "p" => true,
            "c" | "u" => SAME_IN_GUEST.contains(&(self.major, self.minor)),
            _ => false,
        }
    }

    /// A host block device, which reaches the guest through a drive slot
    /// ([`block_devices`]).
    fn is_block(&self) -> bool {
        self.kind == "b"
    }
}

/// A host block device a container asks for (CRI `devices`, `volumeDevices`): its path
/// in the container, its numbers on the host, and whether the container may only read
/// it (its cgroup rule lacks "w"), which makes the guest's drive read-only too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    pub container_path: String,
    pub major: u64,
    pub minor: u64,
    pub read_only: bool,
}

/// The spec's host block devices, to be attached to the pod VM's drive slots. A
/// privileged container's wholesale list asks for none.
pub fn block_devices(spec: &Value) -> Result<Vec<BlockRequest>, DeviceError> {
    let Some(devices) = spec.pointer("/linux/devices").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    if all_devices_allowed(spec) {
        return Ok(Vec::new());
    }
    let mut requests = Vec::new();
    for (index, d) in devices.iter().enumerate() {
        let device = spec_device(index, d)?;
        if device.is_block() {
            requests.push(BlockRequest {
                container_path: device.path.to_owned(),
                major: device.major,
                minor: device.minor,
                read_only: !may_write(spec, device.major, device.minor),
            });
        }
    }
    Ok(requests)
}

/// Whether the spec's cgroup rules let the container write block device
/// `major:minor`: as in the device cgroup, the last rule that covers the device
/// decides.
fn may_write(spec: &Value, major: u64, minor: u64) -> bool {
    let Some(rules) = spec
        .pointer("/linux/resources/devices")
        .and_then(Value::as_array)
    else {
        return false;
    };
    let covers = |rule: &Value, key: &str, number: u64| match rule.get(key) {
        None | Some(Value::Null) => true,
        Some(v) => v.as_i64() == Some(-1) || v.as_u64() == Some(number),
    };
    rules
        .iter()
        .rev()
        .find(|r| {
            matches!(
                r.get("type").and_then(Value::as_str),
                None | Some("a" | "b")
            ) && covers(r, "major", major)
                && covers(r, "minor", minor)
                && r.get("access")
                    .and_then(Value::as_str)
                    .is_none_or(|a| a.contains('w'))
        })
        .is_some_and(|r| r.get("allow").and_then(Value::as_bool) == Some(true))
}

/// Whether the spec allows every device in its cgroup rules: a privileged container
/// (`ctr run --privileged`, or CRI without `privileged_without_host_devices`), whose
/// runtime listed all of the host's devices wholesale rather than by request.
fn all_devices_allowed(spec: &Value) -> bool {
    spec.pointer("/linux/resources/devices")
        .and_then(Value::as_array)
        .is_some_and(|rules| {
            rules.iter().any(|r| {
                r.get("allow").and_then(Value::as_bool) == Some(true)
                    && matches!(r.get("type").and_then(Value::as_str), None | Some("a"))
                    && r.get("major").is_none_or(Value::is_null)
                    && r.get("minor").is_none_or(Value::is_null)
            })
        })
}

/// Refuses a spec that asks for a host device the pod VM cannot give: the numbers
/// in `linux.devices` name host devices, and the same numbers in the guest are
/// another device or none, so passing them on would hand the container the wrong
/// one silently. Block devices are given through drive slots ([`block_devices`]);
/// character devices other than the kernel's fixed ones cannot be. A privileged
/// container's wholesale list is not a request: it gets the pod's own devices
/// ([`guest_spec`] drops the rest).
pub fn check_devices(spec: &Value) -> Result<(), DeviceError> {
    let Some(devices) = spec.pointer("/linux/devices").and_then(Value::as_array) else {
        return Ok(());
    };
    let wholesale = all_devices_allowed(spec);
    for (index, d) in devices.iter().enumerate() {
        let device = spec_device(index, d)?;
        if device.same_in_guest() || device.is_block() || wholesale {
            continue;
        }
        let (path, major, minor) = (device.path.to_owned(), device.major, device.minor);
        return Err(DeviceError::Char { path, major, minor });
    }
    Ok(())
}

/// Keeps the `linux.devices` entries whose numbers mean the same in the guest, and a
/// requested block device's (still with the host's numbers: the agent moves it and
/// its cgroup rule to the numbers of the drive slot the device is attached to).
fn retain_guest_devices(spec: &mut Value) {
    let keep_block = !all_devices_allowed(spec);
    let Some(devices) = spec
        .pointer_mut("/linux/devices")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let before = devices.len();
    let mut index = 0;
    devices.retain(|d| {
        let keep =
            spec_device(index, d).is_ok_and(|d| d.same_in_guest() || (keep_block && d.is_block()));
        index += 1;
        keep
    });
    if devices.len() < before {
        tracing::info!(
            dropped = before - devices.len(),
            "host devices left out of the container: its pod VM has its own"
        );
    }
}

/// Spells `linux.rootfsPropagation` the way the guest's libcontainer reads it.
/// containerd writes `rslave` (a HostToContainer volume) or `rshared` (a
/// Bidirectional one), as runc reads them; libcontainer knows only the plain names,
/// refuses the `r` ones ("failed to prepare rootfs") and always applies the
/// propagation recursively, so the plain name means the same there.
fn plain_rootfs_propagation(spec: &mut Value) {
    let Some(propagation) = spec.pointer_mut("/linux/rootfsPropagation") else {
        return;
    };
    let plain = match propagation.as_str() {
        Some("rslave") => "slave",
        Some("rshared") => "shared",
        Some("rprivate") => "private",
        Some("runbindable") => "unbindable",
        _ => return,
    };
    *propagation = Value::String(plain.to_owned());
}

/// The spec the agent gets for a container whose rootfs is `guest_rootfs`; `binds`
/// gives the guest path of each host bind mount (by index in `mounts`).
pub fn guest_spec(spec: &Value, guest_rootfs: &str, binds: &[(usize, String)]) -> Value {
    let mut spec = spec.clone();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (index, guest) in binds {
            if let Some(m) = mounts.get_mut(*index).and_then(Value::as_object_mut) {
                m.insert("source".into(), Value::String(guest.clone()));
            }
        }
    }
    let readonly = spec
        .pointer("/root/readonly")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(obj) = spec.as_object_mut() {
        obj.insert(
            "root".into(),
            serde_json::json!({"path": guest_rootfs, "readonly": readonly}),
        );
        // Hooks are host programs; the guest has none of them.
        obj.remove("hooks");
    }
    retain_guest_devices(&mut spec);
    plain_rootfs_propagation(&mut spec);
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        // The guest is the pod: its network is the pod's, and host namespace files
        // mean nothing inside it.
        namespaces.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
        for ns in namespaces.iter_mut() {
            if let Some(o) = ns.as_object_mut() {
                o.remove("path");
            }
        }
    }
    drop_network_sysctls(&mut spec);
    spec
}

/// Removes `net.*` sysctls: without a network namespace of its own the container is in
/// the guest's, where the sandbox already set the pod's, and the container runtime in
/// the guest refuses network sysctls for a container that shares a network namespace.
fn drop_network_sysctls(spec: &mut Value) {
    if let Some(map) = spec
        .pointer_mut("/linux/sysctl")
        .and_then(Value::as_object_mut)
    {
        map.retain(|key, _| !key.starts_with("net."));
    }
}

/// containerd 1.7+'s CRI plugin states the pod's limits on the sandbox spec.
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The most vCPUs a pod VM gets, whatever the spec says.
const MAX_VCPUS: u64 = 64;
/// The most memory a pod's limit adds to its VM (1 TiB).
const MAX_LIMIT_MIB: u64 = 1 << 20;

/// The pod VM's size from its sandbox spec: the configured size is the floor and the
/// fixed overhead; a CPU limit (quota/period, rounded up) raises the vCPUs, a memory
/// limit is added to the memory. From the CRI sandbox annotations when present, else
/// from the spec's own `linux.resources` (a plain `ctr run` container is its own pod).
/// Under a memory limit on the pod's host cgroup (`memory_cap`: bytes, and the cgroup
/// setting it) the memory shrinks to fit it with the VMM's reserve, or the pod is
/// refused (see [`host_cgroup::fit_guest_memory`]).
pub fn vm_size(
    spec: &Value,
    vcpus: u8,
    memory_mib: u32,
    memory_cap: Option<&(u64, std::path::PathBuf)>,
) -> Result<(u8, u32), host_cgroup::CgroupError> {
    let ann = |k: &str| {
        spec.pointer("/annotations")
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<i64>().ok())
    };
    let res = |p: &str| spec.pointer(p).and_then(Value::as_i64);
    let quota = ann(SANDBOX_CPU_QUOTA).or_else(|| res("/linux/resources/cpu/quota"));
    let period = ann(SANDBOX_CPU_PERIOD).or_else(|| res("/linux/resources/cpu/period"));
    let memory = ann(SANDBOX_MEMORY).or_else(|| res("/linux/resources/memory/limit"));
    let mut cpus = u64::from(vcpus);
    if let (Some(q), Some(p)) = (quota, period) {
        if let (Ok(q), Ok(p)) = (u64::try_from(q), u64::try_from(p)) {
            if q > 0 && p > 0 {
                cpus = cpus.max(q.div_ceil(p));
            }
        }
    }
    let cpus = u8::try_from(cpus.min(MAX_VCPUS)).unwrap_or(vcpus);
    let limit_mib = memory
        .and_then(|m| u64::try_from(m).ok())
        .map_or(0, |m| m.div_ceil(1 << 20).min(MAX_LIMIT_MIB));
    let mem = u64::from(memory_mib).saturating_add(limit_mib);
    let mem = host_cgroup::fit_guest_memory(u32::try_from(mem).unwrap_or(u32::MAX), memory_cap)?;
    Ok((cpus, mem))
}

/// containerd's runtime options: `runtimeoptions.v1.Options` (CRI's and `ctr
/// --runtime-config-path`'s), whose field 2 is `config_path`.
pub fn config_path(options: Option<&Any>) -> Option<String> {
    let any = options?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    proto_string_field(&any.value, 2).filter(|p| !p.is_empty())
}

/// Reads length-delimited field `want` of a protobuf message; None if absent or the
/// message is malformed (it comes from containerd, but is still bounded here).
fn proto_string_field(mut buf: &[u8], want: u64) -> Option<String> {
    let mut found = None;
    while !buf.is_empty() {
        let (tag, rest) = varint(buf)?;
        buf = rest;
        match tag & 7 {
            0 => buf = varint(buf)?.1,
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let (len, rest) = varint(buf)?;
                let len = usize::try_from(len).ok()?;
                let field = rest.get(..len)?;
                if tag >> 3 == want {
                    found = Some(String::from_utf8(field.to_vec()).ok()?);
                }
                buf = &rest[len..];
            }
            _ => return None,
        }
    }
    found
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_spec_has_the_guest_rootfs_and_no_host_namespace_paths() {
        let spec = serde_json::json!({
            "root": {"path": "rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}
            ]}
        });
        let g = guest_spec(&spec, "/run/crx/storage/share/c1/rootfs", &[]);
        assert_eq!(g["root"]["path"], "/run/crx/storage/share/c1/rootfs");
        assert_eq!(g["root"]["readonly"], true);
        assert!(g.get("hooks").is_none());
        let ns = g["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 2);
        assert!(ns.iter().all(|n| n.get("path").is_none()));
    }

    #[test]
    fn host_bind_mounts_are_found_and_pointed_at_the_share() {
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind"]},
            {"destination": "/rel", "type": "bind", "source": "relative"}
        ]});
        let binds = host_binds(&spec);
        assert_eq!(
            binds,
            vec![
                HostBind {
                    index: 1,
                    source: "/var/lib/x/hosts".into(),
                    read_only: true,
                },
                HostBind {
                    index: 2,
                    source: "/srv/data".into(),
                    read_only: false,
                },
            ]
        );
        let g = guest_spec(&spec, "/r", &[(1, "/g/1".into()), (2, "/g/2".into())]);
        assert_eq!(g["mounts"][1]["source"], "/g/1");
        assert_eq!(
            g["mounts"][1]["options"],
            serde_json::json!(["rbind", "ro"])
        );
        assert_eq!(g["mounts"][2]["source"], "/g/2");
        assert_eq!(g["mounts"][0]["source"], "proc");
    }

    #[test]
    fn devices_the_guest_cannot_give_are_refused_by_name() {
        let dev_null =
            serde_json::json!({"path": "/dev/null", "type": "c", "major": 1, "minor": 3});
        let fifo = serde_json::json!({"path": "/dev/pipe", "type": "p"});
        let disk = serde_json::json!({"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 4});
        let gpu =
            serde_json::json!({"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0});
        let spec = |devices: Vec<Value>| serde_json::json!({"linux": {"devices": devices}});

        let fine = spec(vec![dev_null.clone(), fifo.clone()]);
        check_devices(&fine).unwrap();
        assert_eq!(
            guest_spec(&fine, "/r", &[])["linux"]["devices"],
            serde_json::json!([dev_null, fifo])
        );
        // A block device goes through a drive slot: kept, with the host's numbers
        // for the agent to move.
        let with_disk = spec(vec![dev_null.clone(), disk.clone()]);
        check_devices(&with_disk).unwrap();
        assert_eq!(
            guest_spec(&with_disk, "/r", &[])["linux"]["devices"],
            serde_json::json!([dev_null, disk])
        );
        let err = check_devices(&spec(vec![gpu.clone()])).unwrap_err();
        assert!(
            err.to_string().contains("/dev/nvidia0 (char 195:0"),
            "{err}"
        );
        assert!(matches!(err, DeviceError::Char { major: 195, .. }), "{err}");
        let err = check_devices(&spec(vec![serde_json::json!({"type": "b"})])).unwrap_err();
        assert!(
            matches!(err, DeviceError::Malformed { index: 0, .. }),
            "{err}"
        );
        assert!(check_devices(&serde_json::json!({})).is_ok());
    }

    #[test]
    fn a_privileged_containers_host_devices_are_left_out_not_refused() {
        let privileged = serde_json::json!({"linux": {
            "devices": [
                {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5},
                {"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}
            ],
            "resources": {"devices": [{"allow": true, "access": "rwm"}]}
        }});
        check_devices(&privileged).unwrap();
        let g = guest_spec(&privileged, "/r", &[]);
        assert_eq!(
            g["linux"]["devices"],
            serde_json::json!([{"path": "/dev/zero", "type": "c", "major": 1, "minor": 5}])
        );
        assert_eq!(block_devices(&privileged).unwrap(), []);
        // A rule for one device type is not "everything".
        let mut scoped = privileged.clone();
        scoped["linux"]["resources"]["devices"] = serde_json::json!([{"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rw"}]);
        assert!(matches!(
            check_devices(&scoped),
            Err(DeviceError::Char { major: 10, .. })
        ));
        assert_eq!(
            block_devices(&scoped).unwrap(),
            [BlockRequest {
                container_path: "/dev/sda".into(),
                major: 8,
                minor: 0,
                read_only: false
            }]
        );
    }

    #[test]
    fn a_block_device_is_read_only_unless_its_cgroup_rule_allows_writes() {
        let spec = |rules: Value| {
            serde_json::json!({"linux": {
                "devices": [{"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 4}],
                "resources": {"devices": rules}
            }})
        };
        let read_only = |rules: Value| block_devices(&spec(rules)).unwrap()[0].read_only;
        let deny_all = serde_json::json!({"allow": false, "access": "rwm"});
        // containerd's CRI plugin: deny everything, then allow what `permissions` says.
        assert!(!read_only(serde_json::json!([deny_all,
            {"allow": true, "type": "b", "major": 7, "minor": 4, "access": "rw"}])));
        assert!(read_only(serde_json::json!([deny_all,
            {"allow": true, "type": "b", "major": 7, "minor": 4, "access": "r"}])));
        // Another device's rule, or a char rule with the same numbers, does not count.
        assert!(read_only(serde_json::json!([deny_all,
            {"allow": true, "type": "b", "major": 7, "minor": 5, "access": "rw"},
            {"allow": true, "type": "c", "major": 7, "minor": 4, "access": "rw"}])));
        // The last rule covering the device decides.
        assert!(read_only(serde_json::json!([
            {"allow": true, "type": "b", "major": 7, "minor": 4, "access": "rw"},
            {"allow": false, "type": "b", "major": 7, "access": "w"}])));
        assert!(read_only(serde_json::json!([])));
    }

    #[test]
    fn recursive_rootfs_propagation_is_spelled_for_libcontainer() {
        for (given, want) in [
            ("rslave", "slave"),
            ("rshared", "shared"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("slave", "slave"),
        ] {
            let spec = serde_json::json!({"linux": {"rootfsPropagation": given}});
            let g = guest_spec(&spec, "/r", &[]);
            assert_eq!(g["linux"]["rootfsPropagation"], want, "{given}");
        }
        let none = guest_spec(&serde_json::json!({"linux": {}}), "/r", &[]);
        assert!(none["linux"].get("rootfsPropagation").is_none());
    }

    #[test]
    fn network_sysctls_leave_the_container_with_its_network_namespace() {
        let spec = serde_json::json!({"linux": {
            "namespaces": [{"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shm_rmid_forced": "1"}
        }});
        let g = guest_spec(&spec, "/r", &[]);
        assert_eq!(g["linux"]["namespaces"], serde_json::json!([{"type": "ipc"}]));
        assert_eq!(
            g["linux"]["sysctl"],
            serde_json::json!({"kernel.shm_rmid_forced": "1"})
        );
    }

    #[test]
    fn the_vm_is_sized_from_the_pods_limits() {
        assert_eq!(
            vm_size(&serde_json::json!({}), 1, 256, None).unwrap(),
            (1, 256)
        );
        let cri = serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-quota": "250000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": "536870912"
        }});
        assert_eq!(vm_size(&cri, 1, 256, None).unwrap(), (3, 256 + 512));
        let plain = serde_json::json!({"linux": {"resources": {
            "cpu": {"quota": 50000, "period": 100000},
            "memory": {"limit": 1048577}
        }}});
        assert_eq!(vm_size(&plain, 2, 128, None).unwrap(), (2, 130));
        let silly = serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-quota": "-1",
            "io.kubernetes.cri.sandbox-cpu-period": "0",
            "io.kubernetes.cri.sandbox-memory": "-5"
        }});
        assert_eq!(vm_size(&silly, 1, 256, None).unwrap(), (1, 256));
        let huge = serde_json::json!({"linux": {"resources": {
            "cpu": {"quota": i64::MAX, "period": 1},
            "memory": {"limit": i64::MAX}
        }}});
        assert_eq!(vm_size(&huge, 1, 256, None).unwrap(), (64, 256 + (1 << 20)));
        // Under a 512 MiB pod cgroup the 768 MiB asked for shrinks to fit it with the
        // VMM's reserve; under 128 MiB the pod is refused.
        let cgroup = std::path::PathBuf::from("/sys/fs/cgroup/kubepods/pod1");
        let cap = (512 << 20, cgroup.clone());
        let reserve = u32::try_from(host_cgroup::VMM_RESERVE_MIB).unwrap();
        assert_eq!(
            vm_size(&cri, 1, 256, Some(&cap)).unwrap(),
            (3, 512 - reserve)
        );
        let tiny = (128 << 20, cgroup);
        assert!(matches!(
            vm_size(&cri, 1, 256, Some(&tiny)),
            Err(host_cgroup::CgroupError::TooSmall { limit_mib: 128, .. })
        ));
    }

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // field 1 "x", field 2 "/etc/crx/alt.toml"
        let mut value = vec![0x0a, 1, b'x', 0x12, 17];
        value.extend_from_slice(b"/etc/crx/alt.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path(Some(&any)).as_deref(),
            Some("/etc/crx/alt.toml")
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..any.clone()
        };
        assert_eq!(config_path(Some(&other)), None);
        let truncated = Any {
            value: vec![0x12, 40, b'/'],
            ..any
        };
        assert_eq!(config_path(Some(&truncated)), None);
        assert_eq!(config_path(None), None);
    }
}
