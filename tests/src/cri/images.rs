//! Local images for the CRI tests, built without a network: the pause image (the
//! static program in `pause.c`, one file) and the busybox image of
//! [`crate::containerd::build_busybox_image`], imported into containerd's CRI
//! namespace `k8s.io` with `ctr images import` (containerd's CRI plugin picks images up
//! from there by their reference).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The reference of the test pause image (the CRI plugin's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "localhost/crx/pause:test";
/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// How long one `ctr images import` may take.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("neither musl-gcc nor gcc could build the pause program: {0} (apt-get install musl-tools build-essential)")]
    NoCompiler(String),
    #[error("encoding an image JSON document")]
    Json(#[source] serde_json::Error),
    #[error("building the busybox image")]
    Busybox(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Compiles `pause.c` into a static binary at `out`: musl-gcc first (smallest), else
/// glibc's gcc -static.
pub fn build_pause_binary(out: &Path) -> Result<(), ImageError> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cri/pause.c");
    let mut failures = Vec::new();
    for cc in ["musl-gcc", "gcc"] {
        let built = run(Command::new(cc)
            .args(["-static", "-Os", "-Wall", "-Wextra", "-o"])
            .arg(out)
            .arg(&source));
        match built {
            Ok(_) => return Ok(()),
            Err(e) => failures.push(format!("{cc}: {e}")),
        }
    }
    Err(ImageError::NoCompiler(failures.join("; ")))
}

/// Stores the file `file` as a blob of the OCI layout `oci` (moving it); returns its
/// digest and size.
fn put_blob_file(oci: &Path, file: &Path) -> Result<(String, u64), ImageError> {
    let sum = run(Command::new("sha256sum").arg(file))?;
    let hex = match sum.split_whitespace().next() {
        Some(h) if h.len() == 64 => h.to_owned(),
        _ => {
            return Err(ImageError::Failed {
                command: format!("sha256sum {}", file.display()),
                status: "unexpected output".into(),
                stderr: sum,
            })
        }
    };
    let size = std::fs::metadata(file)
        .map_err(io_err("reading the size of", file))?
        .len();
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
    std::fs::rename(file, blobs.join(&hex)).map_err(io_err("moving a blob", file))?;
    Ok((format!("sha256:{hex}"), size))
}

fn put_json(oci: &Path, doc: &serde_json::Value) -> Result<(String, u64), ImageError> {
    let tmp = oci.join("blob.tmp");
    let bytes = serde_json::to_vec(doc).map_err(ImageError::Json)?;
    std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
    put_blob_file(oci, &tmp)
}

fn tar_dir(dir: &Path, out: &Path, entries: &[&str]) -> Result<(), ImageError> {
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(entries))?;
    Ok(())
}

/// Builds a single-layer OCI image tarball from the directory `layer` under `work`,
/// with image config `config` (the `config` object of an OCI image config), named
/// `reference`; returns the tarball's path.
pub fn build_oci_image(
    work: &Path,
    layer: &Path,
    reference: &str,
    config: serde_json::Value,
) -> Result<PathBuf, ImageError> {
    let oci = work.join("oci");
    let _ = std::fs::remove_dir_all(&oci);
    std::fs::create_dir_all(&oci).map_err(io_err("creating", &oci))?;
    let layer_tar = work.join("layer.tar");
    tar_dir(layer, &layer_tar, &["."])?;
    let (layer_digest, layer_size) = put_blob_file(&oci, &layer_tar)?;
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    });
    let (config_digest, config_size) = put_json(&oci, &image_config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": layer_size
        }]
    });
    let (manifest_digest, manifest_size) = put_json(&oci, &manifest)?;
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag
            }
        }]
    });
    let index_path = oci.join("index.json");
    let index_bytes = serde_json::to_vec(&index).map_err(ImageError::Json)?;
    std::fs::write(&index_path, index_bytes).map_err(io_err("writing", &index_path))?;
    let layout = oci.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io_err("writing", &layout))?;
    let tar = work.join("image-oci.tar");
    tar_dir(&oci, &tar, &["oci-layout", "index.json", "blobs"])?;
    Ok(tar)
}

/// Builds the pause image tarball under `work` (emptied first); returns its path.
pub fn build_pause_image(work: &Path) -> Result<PathBuf, ImageError> {
    let _ = std::fs::remove_dir_all(work);
    let layer = work.join("layer");
    std::fs::create_dir_all(&layer).map_err(io_err("creating", &layer))?;
    build_pause_binary(&layer.join("pause"))?;
    build_oci_image(
        work,
        &layer,
        PAUSE_IMAGE,
        // PATH as in Kubernetes' own pause image (the process needs none, but a
        // runtime may expect it).
        serde_json::json!({
            "Entrypoint": ["/pause"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/"
        }),
    )
}

/// Imports the image tarball `tar` into the CRI namespace of the containerd at
/// `socket`.
pub fn import(socket: &Path, tar: &Path) -> Result<(), ImageError> {
    run(Command::new("timeout")
        .arg("--kill-after=5")
        .arg(IMPORT_TIMEOUT.as_secs().to_string())
        .arg("ctr")
        .arg("-a")
        .arg(socket)
        .args(["-n", CRI_NAMESPACE, "images", "import"])
        .arg(tar))?;
    Ok(())
}

/// Builds the pause and busybox images under `work` and imports both into the
/// containerd at `socket`; returns the busybox reference.
pub fn import_test_images(socket: &Path, work: &Path) -> Result<&'static str, ImageError> {
    let pause = build_pause_image(&work.join("pause"))?;
    import(socket, &pause)?;
    let busybox = crate::containerd::build_busybox_image(&work.join("busybox"))
        .map_err(|e| ImageError::Busybox(e.into()))?;
    import(socket, &busybox)?;
    Ok(crate::containerd::BUSYBOX_IMAGE)
}
