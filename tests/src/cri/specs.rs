//! CRI request bodies the way a kubelet fills them for a plain pod, for tests to start
//! from and change what they test.

use std::path::Path;

use k8s_cri::v1 as cri;

/// The Kubernetes namespace test pods claim to belong to.
pub const POD_NAMESPACE: &str = "crx-cri-test";

/// A pod named `name` (also its hostname) logging under `log_dir`: its own network
/// namespace, pod-shared IPC, a PID namespace per container (Kubernetes' defaults).
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: POD_NAMESPACE.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container `name` of `image` running `command`, its log at `log_path` (relative
/// to the pod's log directory).
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        log_path: log_path.into(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}
