//! What a crx pod takes from its sandbox spec beyond the VM's size, and what it refuses:
//! a crx pod is a VM with its own kernel, so it cannot share the host's network, PID or
//! IPC namespace, and its network namespace is the guest's own, so the pod's `net.*`
//! sysctls are set once for the whole guest rather than per container.

use std::collections::HashMap;

use serde_json::Value;

/// The namespaces a crx pod must have of its own, with the Kubernetes field that asks
/// to share the host's.
const OWN_NAMESPACES: [(&str, &str); 3] = [
    ("network", "hostNetwork"),
    ("pid", "hostPID"),
    ("ipc", "hostIPC"),
];

/// The most sysctls passed on (the agent refuses more).
const MAX_SYSCTLS: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodSpecError {
    #[error(
        "a crx pod cannot share the host's {namespace} namespace ({field}: true): each crx pod runs in its own VM with its own kernel; run this pod with a RuntimeClass that shares the host's namespaces"
    )]
    HostNamespace {
        namespace: &'static str,
        field: &'static str,
    },
}

/// Refuses a spec that leaves out one of the pod's own namespaces: containerd (and
/// `ctr run --net-host`) omit a namespace from the spec to share the host's.
pub fn refuse_host_namespaces(spec: &Value) -> Result<(), PodSpecError> {
    let listed: Vec<&str> = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(|nss| {
            nss.iter()
                .filter_map(|ns| ns.get("type").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    for (namespace, field) in OWN_NAMESPACES {
        if !listed.contains(&namespace) {
            return Err(PodSpecError::HostNamespace { namespace, field });
        }
    }
    Ok(())
}

/// The sandbox spec's sysctls, for the agent to set in the pod's namespaces (it
/// checks each is namespaced and well formed).
pub fn pod_sysctls(spec: &Value) -> HashMap<String, String> {
    spec.pointer("/linux/sysctl")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .take(MAX_SYSCTLS)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec_with(namespaces: &[&str]) -> Value {
        json!({"linux": {"namespaces": namespaces.iter().map(|t| json!({"type": t})).collect::<Vec<_>>()}})
    }

    #[test]
    fn a_spec_without_its_own_network_pid_or_ipc_namespace_is_refused_by_name() {
        let all = ["pid", "ipc", "uts", "mount", "network"];
        assert_eq!(refuse_host_namespaces(&spec_with(&all)), Ok(()));
        for (missing, field) in [
            ("network", "hostNetwork"),
            ("pid", "hostPID"),
            ("ipc", "hostIPC"),
        ] {
            let rest: Vec<&str> = all.iter().copied().filter(|t| *t != missing).collect();
            let err = refuse_host_namespaces(&spec_with(&rest)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("host's {missing} namespace")),
                "{text}"
            );
            assert!(text.contains(field), "{text}");
        }
        assert!(refuse_host_namespaces(&json!({})).is_err());
    }

    #[test]
    fn the_pods_sysctls_are_its_valid_string_ones() {
        let spec = json!({"linux": {"sysctl": {
            "net.ipv4.ip_unprivileged_port_start": "80",
            "kernel.shm_rmid_forced": "1",
            "bad": 5
        }}});
        let pod = pod_sysctls(&spec);
        assert_eq!(pod.len(), 2);
        assert_eq!(pod["net.ipv4.ip_unprivileged_port_start"], "80");
        assert!(pod_sysctls(&json!({})).is_empty());
    }
}
