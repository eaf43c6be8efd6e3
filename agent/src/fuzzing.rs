//! What the fuzz targets (`agent/fuzz`) do with one input, kept here so the targets and
//! the agent cannot drift apart: the fuzz crate compiles the agent's modules and this
//! one itself (the agent has no library target), and the tests below run the same
//! functions on deterministic pseudo-random inputs and the seed corpus without nightly.
//!
//! Each function feeds untrusted bytes through the agent's own decoding and checks, and
//! panics only when the agent breaks a promise it makes about what it accepted (an id
//! that could name another directory, a mount point outside the storage root, a bundle
//! that does not read back as the spec that was checked, a reply frame over the
//! protocol's limit). A panic is what the fuzzer reports, so these are assertions by
//! design.

#[cfg(feature = "containers")]
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use crx_protocols::service_names;
use crx_protocols::v1::{agent, container, health, sandbox as sandbox_proto, storage};
use protobuf::Message;

use crate::sandbox::validate;
use crate::storage::spec::{self as storage_spec, PlanSource};

/// The storage root a guest agent mounts under (`<state dir>/storage`).
const STORAGE_ROOT: &str = "/run/crx/storage";

/// The id `oci_spec` prepares containers under.
#[cfg(feature = "containers")]
const FUZZ_CONTAINER_ID: &str = "fuzz-1";

/// The agent's checks of one decoded request body.
type Check = fn(&[u8]);

/// Every request the agent's ttrpc services decode: (service, method, check).
const REQUESTS: &[(&str, &str, Check)] = &[
    (
        service_names::HEALTH,
        "Check",
        decode_only::<health::CheckRequest>,
    ),
    (
        service_names::HEALTH,
        "Version",
        decode_only::<health::VersionRequest>,
    ),
    (
        service_names::AGENT,
        "Shutdown",
        decode_only::<agent::ShutdownRequest>,
    ),
    (service_names::STORAGE, "MountStorage", mount_storage),
    (
        service_names::STORAGE,
        "UnmountStorage",
        decode_only::<storage::UnmountStorageRequest>,
    ),
    (
        service_names::STORAGE,
        "ListStorages",
        decode_only::<storage::ListStoragesRequest>,
    ),
    (service_names::SANDBOX, "CreateSandbox", create_sandbox),
    (service_names::SANDBOX, "DestroySandbox", destroy_sandbox),
    (
        service_names::CONTAINERS,
        "CreateContainer",
        create_container,
    ),
    (
        service_names::CONTAINERS,
        "StartContainer",
        decode_only::<container::StartContainerRequest>,
    ),
    (service_names::CONTAINERS, "ExecProcess", exec_process),
    (
        service_names::CONTAINERS,
        "SignalProcess",
        decode_only::<container::SignalProcessRequest>,
    ),
    (
        service_names::CONTAINERS,
        "WaitProcess",
        decode_only::<container::WaitProcessRequest>,
    ),
    (
        service_names::CONTAINERS,
        "ResizeTty",
        decode_only::<container::ResizeTtyRequest>,
    ),
    (
        service_names::CONTAINERS,
        "CloseStdin",
        decode_only::<container::CloseStdinRequest>,
    ),
    (
        service_names::CONTAINERS,
        "RemoveContainer",
        decode_only::<container::RemoveContainerRequest>,
    ),
    (
        service_names::CONTAINERS,
        "UpdateContainer",
        decode_only::<container::UpdateContainerRequest>,
    ),
    (
        service_names::CONTAINERS,
        "PauseContainer",
        decode_only::<container::PauseContainerRequest>,
    ),
    (
        service_names::CONTAINERS,
        "ResumeContainer",
        decode_only::<container::ResumeContainerRequest>,
    ),
    (
        service_names::CONTAINERS,
        "StatsContainer",
        decode_only::<container::StatsContainerRequest>,
    ),
    (
        service_names::CONTAINERS,
        "ListPids",
        decode_only::<container::ListPidsRequest>,
    ),
    (
        service_names::CONTAINERS,
        "GetEvents",
        decode_only::<container::GetEventsRequest>,
    ),
];

/// Target `request_decode`. The first byte picks a request type (one past the last
/// picks a whole ttrpc `Request` envelope, dispatched by service and method as the
/// server does); the rest is the protobuf body.
pub fn request_decode(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let index = usize::from(selector) % (REQUESTS.len() + 1);
    match REQUESTS.get(index) {
        Some((_, _, check)) => check(body),
        None => envelope(body),
    }
}

/// The selector byte `request_decode` gives `method` of `service`, for seed files.
pub fn request_selector(service: &str, method: &str) -> Option<u8> {
    let index = REQUESTS
        .iter()
        .position(|(s, m, _)| *s == service && *m == method)?;
    u8::try_from(index).ok()
}

/// The selector byte of a whole ttrpc envelope.
pub fn envelope_selector() -> u8 {
    u8::try_from(REQUESTS.len()).unwrap_or(u8::MAX)
}

fn envelope(body: &[u8]) {
    let Some(request) = decode::<ttrpc::Request>(body) else {
        return;
    };
    if let Some((_, _, check)) = REQUESTS
        .iter()
        .find(|(s, m, _)| *s == request.service && *m == request.method)
    {
        check(&request.payload);
    }
}

/// Decodes `body` and checks that encoding the result decodes to the same message: the
/// agent acts on exactly what the bytes said, whatever their field order or repeats.
fn decode<M: Message + PartialEq>(body: &[u8]) -> Option<M> {
    let message = M::parse_from_bytes(body).ok()?;
    let encoded = match message.write_to_bytes() {
        Ok(e) => e,
        Err(e) => panic!("a decoded {} does not encode: {e}", M::NAME),
    };
    match M::parse_from_bytes(&encoded) {
        Ok(again) => assert!(again == message, "{} changes on re-encoding", M::NAME),
        Err(e) => panic!("a re-encoded {} does not decode: {e}", M::NAME),
    }
    Some(message)
}

fn decode_only<M: Message + PartialEq>(body: &[u8]) {
    let _ = decode::<M>(body);
}

fn mount_storage(body: &[u8]) {
    if let Some(storage) = decode::<storage::MountStorageRequest>(body)
        .as_ref()
        .and_then(|r| r.storage.as_ref())
    {
        check_storage(storage);
    }
}

fn create_sandbox(body: &[u8]) {
    let Some(req) = decode::<sandbox_proto::CreateSandboxRequest>(body) else {
        return;
    };
    let Ok(pod) = validate::check_request(&req) else {
        return;
    };
    assert!(
        validate::check_sandbox_id(&pod.sandbox_id).is_ok(),
        "accepted sandbox id {:?}",
        pod.sandbox_id
    );
    if let Some(name) = &pod.hostname {
        assert!(
            name.len() <= validate::MAX_HOSTNAME_LEN,
            "accepted hostname {name:?}"
        );
    }
    assert!(pod.storages.len() <= validate::MAX_STORAGES);
    for storage in &pod.storages {
        check_storage(storage);
    }
}

fn destroy_sandbox(body: &[u8]) {
    if let Some(req) = decode::<sandbox_proto::DestroySandboxRequest>(body) {
        if let Ok(grace) = validate::check_grace(req.grace_period_ms) {
            assert!(grace.as_millis() <= u128::from(validate::MAX_GRACE_MS));
        }
    }
}

#[cfg(feature = "containers")]
fn create_container(body: &[u8]) {
    use crate::containers::spec;
    let Some(req) = decode::<container::CreateContainerRequest>(body) else {
        return;
    };
    for storage in &req.storages {
        check_storage(storage);
    }
    if check_id(&req.container_id) {
        // `prepare` only stats the rootfs; the request's path is as good as any.
        if let Ok(prepared) = spec::prepare(&req.container_id, &req.oci_spec, &req.rootfs) {
            check_prepared(&req.container_id, &req.rootfs, &prepared);
        }
    }
}

#[cfg(not(feature = "containers"))]
fn create_container(body: &[u8]) {
    decode_only::<container::CreateContainerRequest>(body);
}

#[cfg(feature = "containers")]
fn exec_process(body: &[u8]) {
    let Some(req) = decode::<container::ExecProcessRequest>(body) else {
        return;
    };
    let _ = check_id(&req.container_id);
    if check_id(&req.exec_id) {
        if let Ok(process) = crate::containers::spec::prepare_process(
            &req.process,
            std::path::Path::new("/nonexistent"),
        ) {
            check_process(&process);
        }
    }
}

#[cfg(not(feature = "containers"))]
fn exec_process(body: &[u8]) {
    decode_only::<container::ExecProcessRequest>(body);
}

/// Runs the agent's id check; an accepted id must name exactly one directory entry.
#[cfg(feature = "containers")]
fn check_id(id: &str) -> bool {
    if crate::containers::spec::check_id("id", id).is_err() {
        return false;
    }
    let mut components = Path::new(id).components();
    assert!(
        matches!(components.next(), Some(Component::Normal(c)) if c == id)
            && components.next().is_none(),
        "accepted id {id:?} is not one plain path component"
    );
    true
}

/// Plans a mount the way MountStorage does; an accepted plan must stay strictly inside
/// the storage root and within the kernel's data limit.
fn check_storage(storage: &storage::Storage) {
    let root = Path::new(STORAGE_ROOT);
    let Ok(plan) = storage_spec::plan(storage, root) else {
        return;
    };
    assert!(
        plan.mount_point.starts_with(root) && plan.mount_point != root,
        "mount point {:?} is not strictly under {STORAGE_ROOT}",
        plan.mount_point
    );
    assert!(
        is_plain_absolute(&plan.mount_point),
        "mount point {:?} is not normalised",
        plan.mount_point
    );
    assert!(
        plan.data.len() <= storage_spec::MAX_DATA && !plan.data.contains('\0'),
        "file-system data {:?} over the limit or with NUL",
        plan.data
    );
    if let PlanSource::Bind { path } = &plan.source {
        assert!(
            is_plain_absolute(path),
            "bind source {path:?} not normalised"
        );
    }
}

/// Absolute, with no `.`/`..` components.
fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// A scratch directory for `oci_spec`: an empty rootfs and the bundles written there.
#[cfg(feature = "containers")]
pub struct SpecScratch {
    rootfs: PathBuf,
    bundles: PathBuf,
}

#[cfg(feature = "containers")]
impl SpecScratch {
    /// Makes `<dir>/rootfs` and `<dir>/bundles`.
    pub fn new(dir: &Path) -> std::io::Result<SpecScratch> {
        let scratch = SpecScratch {
            rootfs: dir.join("rootfs"),
            bundles: dir.join("bundles"),
        };
        std::fs::create_dir_all(&scratch.rootfs)?;
        std::fs::create_dir_all(&scratch.bundles)?;
        Ok(scratch)
    }
}

/// Target `oci_spec`: the bytes as a CreateContainer `oci_spec` (prepared and written as
/// a bundle, then read back) and as an ExecProcess `process`.
#[cfg(feature = "containers")]
pub fn oci_spec(scratch: &SpecScratch, data: &[u8]) {
    use crate::containers::spec;
    use libcontainer::oci_spec::runtime::Spec;

    if let Ok(process) = spec::prepare_process(data, std::path::Path::new("/nonexistent")) {
        check_process(&process);
    }
    let Some(rootfs) = scratch.rootfs.to_str() else {
        return;
    };
    let Ok(prepared) = spec::prepare(FUZZ_CONTAINER_ID, data, rootfs) else {
        return;
    };
    check_prepared(FUZZ_CONTAINER_ID, rootfs, &prepared);
    let bundle = scratch.bundles.join(FUZZ_CONTAINER_ID);
    if let Err(e) = spec::write_bundle(&bundle, &prepared) {
        panic!("an accepted spec could not be written: {e}");
    }
    let config = bundle.join("config.json");
    let written = match std::fs::read(&config) {
        Ok(w) => w,
        Err(e) => panic!("cannot read back {}: {e}", config.display()),
    };
    // What libcontainer reads must be what was checked.
    match serde_json::from_slice::<Spec>(&written) {
        Ok(read_back) => assert!(
            read_back == prepared,
            "the bundle's config.json does not read back as the prepared spec"
        ),
        Err(e) => panic!("the bundle's config.json is not a spec: {e}"),
    }
}

/// Checks the promises `prepare` makes about a spec it accepted.
#[cfg(feature = "containers")]
fn check_prepared(id: &str, rootfs: &str, prepared: &libcontainer::oci_spec::runtime::Spec) {
    let root = prepared.root().as_ref().map(|r| r.path());
    assert!(
        root.is_some_and(|p| p == Path::new(rootfs)),
        "root {root:?} is not the request's rootfs"
    );
    match prepared.process() {
        Some(process) => check_process(process),
        None => panic!("an accepted spec has no process"),
    }
    let cgroup = prepared
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone());
    assert!(
        cgroup.is_some(),
        "an accepted spec for {id:?} has no cgroup path"
    );
}

/// Checks the promises `normalise_process` makes.
#[cfg(feature = "containers")]
fn check_process(process: &libcontainer::oci_spec::runtime::Process) {
    assert!(
        process.args().as_ref().is_some_and(|a| !a.is_empty()),
        "an accepted process has no args"
    );
    assert!(
        process.no_new_privileges() != Some(false),
        "noNewPrivileges: false reaches libcontainer"
    );
}

/// Target `stream_header`: the bytes as what a host sends on a new stdio connection.
/// Whatever arrives, the agent's reply (a refusal naming the cause, or the ids of a
/// header it could not place) must fit the protocol's 1-512 byte frame.
#[cfg(feature = "containers")]
pub fn stream_header(data: &[u8]) {
    use crate::containers::stdio;

    let refusal = match stdio::read_header(&mut Cursor::new(data)) {
        Ok(header) => {
            assert!(
                data.starts_with(b"CRXS"),
                "a header without the magic was accepted"
            );
            format!("{:?}{:?}", header.container_id, header.exec_id)
        }
        Err(cause) => cause,
    };
    let mut frame = Vec::new();
    if let Err(e) = stdio::reply(&mut frame, Some(&refusal)) {
        panic!("the refusal {refusal:?} could not be framed: {e}");
    }
    check_reply_frame(&frame);
    frame.clear();
    if let Err(e) = stdio::reply(&mut frame, None) {
        panic!("the acceptance could not be framed: {e}");
    }
    check_reply_frame(&frame);
}

#[cfg(feature = "containers")]
fn check_reply_frame(frame: &[u8]) {
    use crx_protocols::v1::stdio::StreamAccept;

    let Some((len, body)) = frame.split_first_chunk::<2>() else {
        panic!("a reply frame of {} bytes has no length", frame.len());
    };
    let len = usize::from(u16::from_be_bytes(*len));
    assert!(
        len == body.len() && (1..=512).contains(&len),
        "reply length prefix {len} for a {}-byte body: the protocol allows 1-512",
        body.len()
    );
    assert!(
        StreamAccept::parse_from_bytes(body).is_ok(),
        "the reply body is not a StreamAccept"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs per target besides the corpus and its mutations.
    const RANDOM_INPUTS: usize = 3000;
    /// Mutations of each seed file.
    const MUTATIONS_PER_SEED: usize = 200;

    /// splitmix64: deterministic, so a failing input is found again on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
        }

        fn bytes(&mut self, max_len: usize) -> Vec<u8> {
            let len = self.below(max_len + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// A copy of `seed` with a few byte flips, insertions, deletions or a cut.
        fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
            let mut out = seed.to_vec();
            for _ in 0..=self.below(4) {
                let at = self.below(out.len());
                match self.below(4) {
                    0 if !out.is_empty() => out[at] ^= 1 << self.below(8),
                    1 => out.insert(at, self.next() as u8),
                    2 if !out.is_empty() => {
                        out.remove(at);
                    }
                    _ => out.truncate(at),
                }
            }
            out
        }
    }

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds in {}", dir.display());
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    }

    /// The seeds, their mutations and random bytes, all through `run`.
    fn exercise(target: &str, seed: u64, max_random_len: usize, mut run: impl FnMut(&[u8])) {
        let mut rng = Rng(seed);
        for file in corpus(target) {
            run(&file);
            for _ in 0..MUTATIONS_PER_SEED {
                run(&rng.mutate(&file));
            }
        }
        for _ in 0..RANDOM_INPUTS {
            run(&rng.bytes(max_random_len));
        }
    }

    #[test]
    fn request_decode_holds_on_corpus_and_random_inputs() {
        exercise("request_decode", 1, 512, request_decode);
        // Every request type, with random bodies.
        let mut rng = Rng(2);
        for selector in 0..=envelope_selector() {
            for _ in 0..100 {
                let mut input = vec![selector];
                input.extend(rng.bytes(256));
                request_decode(&input);
            }
        }
    }

    /// The requests the agent does more than decode have a seed each, as does the envelope.
    #[test]
    fn seeds_cover_the_checked_requests() {
        let mut seen: Vec<u8> = corpus("request_decode")
            .iter()
            .filter_map(|f| f.first().copied())
            .map(|s| s % (envelope_selector() + 1))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        for (service, method, _) in REQUESTS {
            let selector = request_selector(service, method).unwrap();
            let has_checks = [
                "MountStorage",
                "CreateSandbox",
                "CreateContainer",
                "ExecProcess",
            ];
            if has_checks.contains(method) {
                assert!(seen.contains(&selector), "no seed for {service}/{method}");
            }
        }
        assert!(
            seen.contains(&envelope_selector()),
            "no ttrpc envelope seed"
        );
    }

    #[cfg(feature = "containers")]
    #[test]
    fn oci_spec_holds_on_corpus_and_random_inputs() {
        let dir = std::env::temp_dir().join(format!("crx-fuzz-inputs-{}", std::process::id()));
        let scratch = SpecScratch::new(&dir).unwrap();
        exercise("oci_spec", 3, 256, |data| oci_spec(&scratch, data));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(feature = "containers")]
    #[test]
    fn stream_header_holds_on_corpus_and_random_inputs() {
        exercise("stream_header", 4, 600, stream_header);
        // Headers with the magic and a plausible length, so parsing is reached.
        let mut rng = Rng(5);
        for _ in 0..RANDOM_INPUTS {
            let body = rng.bytes(520);
            let mut input = b"CRXS".to_vec();
            input.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            input.extend(body);
            stream_header(&input);
        }
    }

    /// Two-byte characters filling the 512-byte header: 400 characters of refusal text
    /// are then more than 512 bytes.
    #[cfg(feature = "containers")]
    #[test]
    fn refusal_naming_long_multibyte_ids_fits_the_frame() {
        use crx_protocols::v1::stdio::StreamHeader;
        let mut header = StreamHeader::new();
        header.container_id = "é".repeat(127);
        header.exec_id = "é".repeat(126);
        let body = header.write_to_bytes().unwrap();
        assert_eq!(body.len(), 512);
        let mut input = b"CRXS".to_vec();
        input.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        input.extend(body);
        stream_header(&input);
    }
}
