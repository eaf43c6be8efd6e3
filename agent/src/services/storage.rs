//! `crx.agent.v1.Storage`: MountStorage, UnmountStorage, ListStorages over the agent's
//! [`StorageManager`], with storage errors mapped to ttrpc codes in one place.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use crx_protocols::v1::storage::{
    ListStoragesRequest, ListStoragesResponse, MountStorageRequest, MountStorageResponse,
    MountedStorage, UnmountStorageRequest, UnmountStorageResponse,
};
use crx_protocols::v1::storage_ttrpc::Storage;
use tokio::time::Instant;
use ttrpc::r#async::TtrpcContext;

use super::AgentState;
use crate::server::error_chain;
use crate::storage::{
    MountRecord, StorageError, StorageManager, DEFAULT_DEVICE_WAIT, MAX_DEVICE_WAIT,
};

/// The Storage service.
pub struct StorageService {
    state: Arc<AgentState>,
}

impl StorageService {
    /// Serves requests against `state`.
    pub fn new(state: Arc<AgentState>) -> StorageService {
        StorageService { state }
    }
}

/// The instant by which a reply must be ready.
fn request_deadline(ctx: &TtrpcContext) -> Instant {
    super::reply_deadline(ctx.timeout_nano)
}

/// The status code of a storage error (also inside a sandbox error).
pub(super) fn storage_code(e: &StorageError) -> ttrpc::Code {
    match e {
        StorageError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
        StorageError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        StorageError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        StorageError::Busy(_) => ttrpc::Code::FAILED_PRECONDITION,
        StorageError::TimedOut(_) => ttrpc::Code::DEADLINE_EXCEEDED,
        StorageError::Kernel { .. } | StorageError::Io { .. } => ttrpc::Code::INTERNAL,
    }
}

fn status(e: &StorageError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(storage_code(e), error_chain(e)))
}

/// The replies' view of `records`. Off the async runtime: statvfs on a virtio-fs mount
/// waits for the host's file server, and a stuck server must not stall other requests.
async fn describe(records: Vec<MountRecord>) -> ttrpc::Result<Vec<MountedStorage>> {
    tokio::task::spawn_blocking(move || records.iter().map(to_proto).collect())
        .await
        .map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INTERNAL,
                format!("reading the mounts' status failed: {e}"),
            ))
        })
}

fn to_proto(record: &MountRecord) -> MountedStorage {
    let status = StorageManager::status(record);
    let mut m = MountedStorage::new();
    m.storage = Some(record.storage.clone()).into();
    m.device = record.device.clone();
    m.kernel_fstype = status.fstype;
    m.kernel_options = status.options;
    m.total_bytes = status.total_bytes;
    m.free_bytes = status.free_bytes;
    m
}

#[async_trait]
impl Storage for StorageService {
    async fn mount_storage(
        &self,
        ctx: &TtrpcContext,
        req: MountStorageRequest,
    ) -> ttrpc::Result<MountStorageResponse> {
        let deadline = request_deadline(ctx);
        let Some(storage) = req.storage.as_ref() else {
            return Err(status(&StorageError::Invalid(
                "MountStorage needs a storage".to_owned(),
            )));
        };
        let wait = match req.device_timeout_ms {
            0 => DEFAULT_DEVICE_WAIT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if wait > MAX_DEVICE_WAIT {
            return Err(status(&StorageError::Invalid(format!(
                "device_timeout_ms {} is above the limit of {} ms",
                req.device_timeout_ms,
                MAX_DEVICE_WAIT.as_millis()
            ))));
        }
        if self.state.shutting_down() {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::UNAVAILABLE,
                "the agent is shutting down",
            )));
        }
        let record = self
            .state
            .storage()
            .mount(storage, Instant::now() + wait, deadline)
            .await
            .map_err(|e| {
                tracing::warn!(mount_point = %storage.mount_point, error = %error_chain(&e), "MountStorage refused");
                status(&e)
            })?;
        let mut resp = MountStorageResponse::new();
        resp.mounted = describe(vec![record]).await?.pop().into();
        Ok(resp)
    }

    async fn unmount_storage(
        &self,
        _ctx: &TtrpcContext,
        req: UnmountStorageRequest,
    ) -> ttrpc::Result<UnmountStorageResponse> {
        self.state
            .storage()
            .unmount(&req.mount_point, req.detach)
            .await
            .map_err(|e| {
                tracing::warn!(mount_point = %req.mount_point, error = %error_chain(&e), "UnmountStorage refused");
                status(&e)
            })?;
        Ok(UnmountStorageResponse::new())
    }

    async fn list_storages(
        &self,
        _ctx: &TtrpcContext,
        _req: ListStoragesRequest,
    ) -> ttrpc::Result<ListStoragesResponse> {
        let mut resp = ListStoragesResponse::new();
        resp.storages = describe(self.state.storage().list().await).await?;
        Ok(resp)
    }
}
