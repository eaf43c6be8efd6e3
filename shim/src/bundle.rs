//! What the shim reads from an OCI bundle: the spec (`config.json`) and, from its
//! annotations, which pod a container belongs to.

use std::path::Path;

/// The annotation containerd's CRI plugin puts on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Longest id accepted (containerd's own limit).
const MAX_ID_LEN: usize = 76;

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read the OCI spec {path:?}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the OCI spec {path:?} is not valid JSON")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {id:?} is not a valid id (1-{MAX_ID_LEN} of [A-Za-z0-9._-], not starting with '.' or '-')")]
    BadId { what: &'static str, id: String },
}

/// Reads `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> Result<serde_json::Value, BundleError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| BundleError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| BundleError::Parse { path, source })
}

/// The pod a container belongs to: the sandbox-id annotation, or the container itself
/// (a sandbox, or a plain `ctr run`).
pub fn sandbox_id(spec: &serde_json::Value, container_id: &str) -> Result<String, BundleError> {
    let id = spec
        .get("annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(container_id);
    check_id("sandbox id", id)?;
    Ok(id.to_owned())
}

/// Ids end up in host paths (`/run/crx/<sandbox>/share/<container>`): only containerd's
/// id alphabet is accepted, so no id can name `..` or a slash.
pub fn check_id(what: &'static str, id: &str) -> Result<(), BundleError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !id.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadId {
            what,
            id: id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_joins_the_pod_its_annotation_names() {
        let spec = serde_json::json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod1"}});
        assert_eq!(sandbox_id(&spec, "c1").unwrap(), "pod1");
        let plain = serde_json::json!({"annotations": {}});
        assert_eq!(sandbox_id(&plain, "c1").unwrap(), "c1");
        assert_eq!(sandbox_id(&serde_json::json!({}), "c2").unwrap(), "c2");
    }

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            &"a".repeat(77),
            "a b",
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "a.b_c-d", "0123456789abcdef"] {
            check_id("id", good).unwrap();
        }
        let spec = serde_json::json!({"annotations": {SANDBOX_ID_ANNOTATION: "../etc"}});
        assert!(sandbox_id(&spec, "c1").is_err());
    }
}
