//! Turns the OCI spec a CreateContainer request carries into the bundle libcontainer
//! builds from: bounded, parsed, checked and normalised (rootfs from the request,
//! libcontainer's `noNewPrivileges: false` quirk removed, the cgroup path always
//! `/crx/<id>` under the pod's cgroup, and — once
//! CreateSandbox made the pod — the pod's UTS, IPC and network namespaces (and its PID
//! namespace when shared) joined by path instead of the spec's hostname).

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{
    Linux, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Process, RootBuilder,
    Spec,
};

use crate::sandbox::PodNamespaces;

/// Largest accepted `oci_spec` (container.proto).
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Largest accepted exec `process` (container.proto).
pub const MAX_PROCESS_BYTES: usize = 256 << 10;
/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 128;
/// Parent of every container's cgroup (the pod cgroup).
const POD_CGROUP: &str = "/crx";

/// What is wrong with a request's spec or ids.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Larger than [`MAX_SPEC_BYTES`].
    #[error("oci_spec is {0} bytes; the limit is {MAX_SPEC_BYTES}")]
    TooLarge(usize),
    /// An exec's process larger than [`MAX_PROCESS_BYTES`].
    #[error("process is {0} bytes; the limit is {MAX_PROCESS_BYTES}")]
    ProcessTooLarge(usize),
    /// Not a runtime-spec Process object.
    #[error("process is not a valid OCI runtime-spec Process")]
    ParseProcess(#[source] serde_json::Error),
    /// Not a runtime-spec config.json.
    #[error("oci_spec is not a valid OCI runtime spec")]
    Parse(#[source] serde_json::Error),
    /// Parsed, but not something the agent can run.
    #[error("oci_spec: {0}")]
    Unsupported(String),
    /// A malformed container or exec id.
    #[error("bad {what} {id:?}: 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-], not starting with '.' or '-'")]
    BadId { what: &'static str, id: String },
    /// The rootfs is not an absolute path to a directory.
    #[error("rootfs {0:?} is not an existing directory (absolute guest path)")]
    Rootfs(String),
    /// The bundle could not be written.
    #[error("cannot write the bundle {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a container or exec id: it names directories, so no separators, no dot files.
pub fn check_id(what: &'static str, id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadId {
            what,
            id: id.chars().take(MAX_ID_LEN + 1).collect(),
        })
    }
}

/// Parses and normalises `raw` for container `id` with its root at `rootfs`.
pub fn prepare(id: &str, raw: &[u8], rootfs: &str) -> Result<Spec, SpecError> {
    if raw.len() > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge(raw.len()));
    }
    let mut spec: Spec = serde_json::from_slice(raw).map_err(SpecError::Parse)?;
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Unsupported(format!(
            "ociVersion {:?} is not 1.x",
            spec.version()
        )));
    }
    let root = Path::new(rootfs);
    if !root.is_absolute() || !root.is_dir() {
        return Err(SpecError::Rootfs(rootfs.to_owned()));
    }
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let new_root = RootBuilder::default()
        .path(root)
        .readonly(readonly)
        .build()
        .map_err(|e| SpecError::Unsupported(e.to_string()))?;
    spec.set_root(Some(new_root));

    let Some(process) = spec.process().clone() else {
        return Err(SpecError::Unsupported("no process".into()));
    };
    let mut process = normalise_process(process)?;
    super::image_user::complete(&mut process, root);
    spec.set_process(Some(process));

    let Some(mut linux) = spec.linux().clone() else {
        return Err(SpecError::Unsupported("no linux section".into()));
    };
    // The host's cgroup paths mean nothing here; under the pod cgroup the pod's limits
    // hold for every container.
    linux.set_cgroups_path(Some(PathBuf::from(format!("{POD_CGROUP}/{id}"))));
    own_cgroup_namespace(&mut linux)?;
    spec.set_linux(Some(linux));
    if let Some(pod) = crate::sandbox::current() {
        join_pod(&mut spec, &pod.namespaces)?;
    }
    Ok(spec)
}

/// Gives the container a cgroup namespace of its own, rooted at its cgroup, as runc does
/// on a cgroup v2 node: the cgroup2 mount at /sys/fs/cgroup then shows the container's
/// own limits (memory.max, cpu.max) instead of the guest's root cgroup. A host that is
/// cgroup v1 leaves it out of the spec, and a namespace path of the host's means nothing
/// in the guest.
fn own_cgroup_namespace(linux: &mut Linux) -> Result<(), SpecError> {
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| ns.typ() != LinuxNamespaceType::Cgroup)
        .collect();
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Cgroup)
            .build()
            .map_err(|e| SpecError::Unsupported(e.to_string()))?,
    );
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// Puts the container into the pod's namespaces: UTS, IPC and network always, PID when
/// the pod shares one. The spec's own hostname goes: the pod's UTS namespace has the
/// pod's, and setting another there would rename every container of the pod.
pub fn join_pod(spec: &mut Spec, pod: &PodNamespaces) -> Result<(), SpecError> {
    let mut joined: Vec<(LinuxNamespaceType, &Path)> = vec![
        (LinuxNamespaceType::Uts, &pod.uts),
        (LinuxNamespaceType::Ipc, &pod.ipc),
        (LinuxNamespaceType::Network, &pod.net),
    ];
    if let Some(pid) = &pod.pid {
        joined.push((LinuxNamespaceType::Pid, pid));
    }
    let Some(mut linux) = spec.linux().clone() else {
        return Err(SpecError::Unsupported("no linux section".into()));
    };
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| !joined.iter().any(|(typ, _)| *typ == ns.typ()))
        .collect();
    for (typ, path) in joined {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .path(path)
                .build()
                .map_err(|e| SpecError::Unsupported(e.to_string()))?,
        );
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    spec.set_hostname(None);
    Ok(())
}

/// Checks what the agent cannot run and removes libcontainer 0.7's
/// `noNewPrivileges: false` trap: it tests the key for presence, not value, and a
/// present `false` makes it load the seccomp filter too late to succeed
/// (agent/CONTAINERS.md).
fn normalise_process(mut process: Process) -> Result<Process, SpecError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::Unsupported("process.args is empty".into()));
    }
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
    Ok(process)
}

/// Parses and normalises an exec's Process object for a container whose root is
/// `rootfs` (HOME and groups come from its image as for the init).
pub fn prepare_process(raw: &[u8], rootfs: &Path) -> Result<Process, SpecError> {
    if raw.len() > MAX_PROCESS_BYTES {
        return Err(SpecError::ProcessTooLarge(raw.len()));
    }
    let process: Process = serde_json::from_slice(raw).map_err(SpecError::ParseProcess)?;
    let mut process = normalise_process(process)?;
    super::image_user::complete(&mut process, rootfs);
    Ok(process)
}

/// Writes an exec's process as `path` (libcontainer's tenant builder reads it).
pub fn write_process(path: &Path, process: &Process) -> Result<(), SpecError> {
    let write_err = |source| SpecError::Write {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec(process).map_err(|e| write_err(std::io::Error::other(e)))?;
    std::fs::write(path, json).map_err(write_err)
}

/// Writes `spec` as `<dir>/config.json` (the bundle libcontainer reads).
pub fn write_bundle(dir: &Path, spec: &Spec) -> Result<(), SpecError> {
    let write_err = |source| SpecError::Write {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let json = serde_json::to_vec(spec).map_err(|e| write_err(std::io::Error::other(e)))?;
    std::fs::write(dir.join("config.json"), json).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(extra_process: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"ignored"}},
               "process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}{extra_process}}},
               "linux":{{"namespaces":[{{"type":"mount"}}]}}}}"#
        )
    }

    #[test]
    fn normalises_root_cgroup_and_no_new_privileges() {
        let spec = prepare("c1", minimal(r#","noNewPrivileges":false"#).as_bytes(), "/").unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("/"));
        assert_eq!(spec.process().as_ref().unwrap().no_new_privileges(), None);
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/crx/c1"))
        );
        let host_path = r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0},"noNewPrivileges":true},
            "linux":{"cgroupsPath":"/kubepods/pod1/c1"}}"#;
        let spec = prepare("c1", host_path.as_bytes(), "/").unwrap();
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/crx/c1")),
            "the host's cgroupsPath is replaced"
        );
        assert_eq!(
            spec.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
        let cgroup_namespaces: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|ns| ns.typ() == LinuxNamespaceType::Cgroup)
            .collect();
        assert_eq!(cgroup_namespaces.len(), 1, "a cgroup namespace of its own");
        assert_eq!(cgroup_namespaces[0].path(), &None);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        assert!(matches!(prepare("c", b"{", "/"), Err(SpecError::Parse(_))));
        assert!(matches!(
            prepare("c", &vec![b' '; MAX_SPEC_BYTES + 1], "/"),
            Err(SpecError::TooLarge(_))
        ));
        assert!(matches!(
            prepare("c", minimal("").as_bytes(), "relative"),
            Err(SpecError::Rootfs(_))
        ));
        let no_args = r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{}}"#;
        assert!(matches!(
            prepare("c", no_args.as_bytes(), "/"),
            Err(SpecError::Unsupported(_))
        ));
    }

    #[test]
    fn joins_the_pods_namespaces_and_drops_the_hostname() {
        let raw = r#"{"ociVersion":"1.0.2","hostname":"own","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"namespaces":[{"type":"pid"},{"type":"mount"},{"type":"uts"},{"type":"ipc"},{"type":"network"}]}}"#;
        let mut spec: Spec = serde_json::from_str(raw).unwrap();
        let pod = PodNamespaces {
            uts: "/proc/7/ns/uts".into(),
            ipc: "/proc/7/ns/ipc".into(),
            net: "/proc/7/ns/net".into(),
            pid: None,
        };
        join_pod(&mut spec, &pod).unwrap();
        assert_eq!(spec.hostname(), &None);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let path_of = |typ| {
            let found: Vec<_> = namespaces.iter().filter(|n| n.typ() == typ).collect();
            assert_eq!(found.len(), 1, "{typ:?} once");
            found[0].path().clone()
        };
        assert_eq!(
            path_of(LinuxNamespaceType::Uts),
            Some(PathBuf::from("/proc/7/ns/uts"))
        );
        assert_eq!(
            path_of(LinuxNamespaceType::Ipc),
            Some(PathBuf::from("/proc/7/ns/ipc"))
        );
        assert_eq!(
            path_of(LinuxNamespaceType::Network),
            Some(PathBuf::from("/proc/7/ns/net"))
        );
        // Not shared: the container keeps a PID namespace of its own.
        assert_eq!(path_of(LinuxNamespaceType::Pid), None);
        assert_eq!(path_of(LinuxNamespaceType::Mount), None);

        let shared = PodNamespaces {
            pid: Some("/proc/7/ns/pid".into()),
            ..pod
        };
        join_pod(&mut spec, &shared).unwrap();
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::Pid
            && n.path().as_deref() == Some(Path::new("/proc/7/ns/pid"))));
        assert_eq!(namespaces.len(), 5);
    }

    #[test]
    fn checks_ids() {
        for good in ["a", "pod-1_x.y", &"a".repeat(MAX_ID_LEN)] {
            check_id("id", good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            "a/b",
            "a b",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
    }
}
