//! The shim's process life: `start` (spawn the pod's shim or join it), `delete`
//! (release what a dead shim left) and the long-running task server.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{publisher::RemotePublisher, spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{api::DeleteResponse, Config, Error, Flags, StartOpts};

use crate::{bundle, cleanup, logging, task::TaskService};
use crx_shim::config::ShimConfig;

pub struct CrxShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for CrxShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // The log level comes from the host's config; a broken file is reported by
        // Create, where containerd shows it to the user.
        let level = ShimConfig::resolve(None)
            .map(|c| c.log_level)
            .unwrap_or_else(|_| "info".into());
        let level = if args.debug {
            "debug".to_owned()
        } else {
            level
        };
        match args.action.as_str() {
            "" => logging::init_server(&level),
            "delete" => logging::init_action(&level),
            // containerd 1.6 reads `start`'s stdout and stderr together as the
            // address: not a byte of log may go there.
            _ => {}
        }
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        CrxShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Starts the pod's shim, or finds the running one: a container whose spec names
    /// a sandbox id gets the address of that sandbox's shim (the socket address is
    /// derived from the sandbox id, and a second server on it steps aside).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let spec = bundle::read_spec(&self.bundle).map_err(|e| Error::Other(e.to_string()))?;
        let grouping = bundle::sandbox_id(&spec, &opts.id)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        tracing::info!(id = %opts.id, sandbox = %grouping, "start");
        let address = spawn(opts, &grouping, Vec::new()).await?;
        std::fs::write(self.bundle.join("address"), address.as_bytes())
            .map_err(|e| Error::Other(format!("writing the bundle's address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        tracing::info!(id = %self.id, namespace = %self.namespace, "delete action");
        let bundle = self.bundle.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || cleanup::delete_action(&bundle, &id))
            .await
            .map_err(|e| Error::Other(e.to_string()))?
            .map_err(Error::Other)?;
        // What a task killed with the VM reports (128 + SIGKILL), as runc's shim does.
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: MessageField::some(crate::process::now_timestamp()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(self.namespace.clone(), publisher, self.exit.clone())
    }
}
