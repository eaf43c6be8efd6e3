//! A blocking CRI v1 client over containerd's socket (the `k8s-cri` crate's tonic
//! clients on a private tokio runtime), with a deadline on every call, so test code
//! reads like the sequence of CRI calls a kubelet makes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Deadline of a CRI call that may boot a VM (RunPodSandbox, CreateContainer, ...) on
/// a busy 2-core machine under TCG.
pub const SLOW_CALL: Duration = Duration::from_secs(240);
/// Deadline of the other calls.
pub const QUICK_CALL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("starting the client's tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error("connecting to the CRI socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {method} failed: {}: {}", .status.code(), .status.message())]
    Call {
        method: &'static str,
        status: tonic::Status,
    },
    #[error("CRI {method} did not answer within {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    #[error("CRI {method} answered without {what}")]
    Missing {
        method: &'static str,
        what: &'static str,
    },
    #[error("container {id} did not exit within {after:?} (state {state})")]
    StillRunning {
        id: String,
        after: Duration,
        state: String,
    },
}

impl CriError {
    /// The gRPC status code when the runtime answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A connected CRI client.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI service on the Unix socket `socket`.
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_owned();
        // The URI is a placeholder tonic requires; the connector dials the socket.
        let endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(QUICK_CALL);
        let channel = rt
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                })),
            )
            .map_err(|source| CriError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// Runs one call with a deadline.
    fn call<T, F>(&self, method: &'static str, after: Duration, fut: F) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self
            .rt
            .block_on(async { tokio::time::timeout(after, fut).await })
        {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(CriError::Call { method, status }),
            Err(_) => Err(CriError::Timeout { method, after }),
        }
    }

    pub fn version(&self) -> Result<cri::VersionResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("Version", QUICK_CALL, async move {
            c.version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
        })
    }

    pub fn status(&self, verbose: bool) -> Result<cri::StatusResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("Status", QUICK_CALL, async move {
            c.status(cri::StatusRequest { verbose }).await
        })
    }

    /// RunPodSandbox with `handler` (`runc`, `crx`); returns the sandbox id.
    pub fn run_pod_sandbox(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let reply = self.call("RunPodSandbox", SLOW_CALL, async move {
            c.run_pod_sandbox(req).await
        })?;
        Ok(reply.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::PodSandboxStatusResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        };
        self.call("PodSandboxStatus", QUICK_CALL, async move {
            c.pod_sandbox_status(req).await
        })
    }

    pub fn list_pod_sandboxes(&self) -> Result<Vec<cri::PodSandbox>, CriError> {
        let mut c = self.runtime.clone();
        let reply = self.call("ListPodSandbox", QUICK_CALL, async move {
            c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
        })?;
        Ok(reply.items)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("StopPodSandbox", SLOW_CALL, async move {
            c.stop_pod_sandbox(req).await
        })?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("RemovePodSandbox", SLOW_CALL, async move {
            c.remove_pod_sandbox(req).await
        })?;
        Ok(())
    }

    /// CreateContainer in the pod `pod_id` (created from `pod_config`); returns the
    /// container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        let reply = self.call("CreateContainer", SLOW_CALL, async move {
            c.create_container(req).await
        })?;
        Ok(reply.container_id)
    }

    /// CreateContainer then StartContainer, as the kubelet does for each container of a
    /// pod; returns the container id.
    pub fn run_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let id = self.create_container(pod_id, config, pod_config)?;
        self.start_container(&id)?;
        Ok(id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        self.call("StartContainer", SLOW_CALL, async move {
            c.start_container(req).await
        })?;
        Ok(())
    }

    /// StopContainer with a grace period of `grace_secs` before SIGKILL.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: grace_secs,
        };
        self.call("StopContainer", SLOW_CALL, async move {
            c.stop_container(req).await
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", SLOW_CALL, async move {
            c.remove_container(req).await
        })?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let reply = self.call("ContainerStatus", QUICK_CALL, async move {
            c.container_status(req).await
        })?;
        reply.status.ok_or(CriError::Missing {
            method: "ContainerStatus",
            what: "a status",
        })
    }

    pub fn list_containers(&self) -> Result<Vec<cri::Container>, CriError> {
        let mut c = self.runtime.clone();
        let reply = self.call("ListContainers", QUICK_CALL, async move {
            c.list_containers(cri::ListContainersRequest { filter: None })
                .await
        })?;
        Ok(reply.containers)
    }

    /// ExecSync of `cmd` in the container `id`, which the runtime kills after
    /// `timeout`.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        self.call("ExecSync", timeout + QUICK_CALL, async move {
            c.exec_sync(req).await
        })
    }

    /// The image references the CRI image service lists.
    pub fn image_refs(&self) -> Result<Vec<String>, CriError> {
        let mut c = self.images.clone();
        let reply = self.call("ListImages", QUICK_CALL, async move {
            c.list_images(cri::ListImagesRequest { filter: None }).await
        })?;
        Ok(reply.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    /// Polls ContainerStatus until the container has exited; returns that status.
    pub fn wait_exited(
        &self,
        id: &str,
        within: Duration,
    ) -> Result<cri::ContainerStatus, CriError> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.container_status(id)?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let state = cri::ContainerState::try_from(status.state)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| status.state.to_string());
                return Err(CriError::StillRunning {
                    id: id.into(),
                    after: within,
                    state,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// PortForward for `ports` of pod `pod_id`; returns the streaming server's URL.
    pub fn port_forward(&self, pod_id: &str, ports: &[i32]) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: ports.to_vec(),
        };
        let reply = self.call("PortForward", QUICK_CALL, async move {
            c.port_forward(req).await
        })?;
        Ok(reply.url)
    }

    // Streaming calls (tests/tests/cri_streaming.rs): each returns the streaming
    // server's URL, to open with `crate::cri::streaming`.

    /// Exec of `cmd` in the container `id` with the streams `streams` asks for.
    pub fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        streams: super::streaming::StreamFlags,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            tty: streams.tty,
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let reply = self.call("Exec", QUICK_CALL, async move { c.exec(req).await })?;
        Ok(reply.url)
    }

    /// Attach to the container `id`'s stdio with the streams `streams` asks for.
    pub fn attach(
        &self,
        id: &str,
        streams: super::streaming::StreamFlags,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::AttachRequest {
            container_id: id.into(),
            stdin: streams.stdin,
            tty: streams.tty,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let reply = self.call("Attach", QUICK_CALL, async move { c.attach(req).await })?;
        Ok(reply.url)
    }

    /// ReopenContainerLog: the runtime reopens the container's log file (after the
    /// kubelet rotated it away).
    pub fn reopen_container_log(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ReopenContainerLogRequest {
            container_id: id.into(),
        };
        self.call("ReopenContainerLog", QUICK_CALL, async move {
            c.reopen_container_log(req).await
        })?;
        Ok(())
    }

    // Resources and stats (tests/tests/cri_resources.rs).

    /// UpdateContainerResources of the container `id` to `linux`.
    pub fn update_container_resources(
        &self,
        id: &str,
        linux: &cri::LinuxContainerResources,
    ) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = cri::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(linux.clone()),
            ..Default::default()
        };
        self.call("UpdateContainerResources", QUICK_CALL, async move {
            c.update_container_resources(req).await
        })?;
        Ok(())
    }

    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ContainerStatsRequest {
            container_id: id.into(),
        };
        let reply = self.call("ContainerStats", QUICK_CALL, async move {
            c.container_stats(req).await
        })?;
        reply.stats.ok_or(CriError::Missing {
            method: "ContainerStats",
            what: "stats",
        })
    }

    /// ListContainerStats of the containers of pod `pod_id`.
    pub fn list_container_stats(&self, pod_id: &str) -> Result<Vec<cri::ContainerStats>, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::ListContainerStatsRequest {
            filter: Some(cri::ContainerStatsFilter {
                pod_sandbox_id: pod_id.into(),
                ..Default::default()
            }),
        };
        let reply = self.call("ListContainerStats", QUICK_CALL, async move {
            c.list_container_stats(req).await
        })?;
        Ok(reply.stats)
    }

    pub fn pod_sandbox_stats(&self, pod_id: &str) -> Result<cri::PodSandboxStats, CriError> {
        let mut c = self.runtime.clone();
        let req = cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.into(),
        };
        let reply = self.call("PodSandboxStats", QUICK_CALL, async move {
            c.pod_sandbox_stats(req).await
        })?;
        reply.stats.ok_or(CriError::Missing {
            method: "PodSandboxStats",
            what: "stats",
        })
    }
}
