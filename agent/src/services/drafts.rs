//! The Containers service of an agent built without its `containers` feature: registered
//! so that every method answers UNIMPLEMENTED with its name — never the generated
//! NOT_FOUND default, never a hang.

use async_trait::async_trait;
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::Containers;
use ttrpc::r#async::TtrpcContext;

/// The Containers service of an agent that cannot run containers.
pub struct DraftServices;

/// The UNIMPLEMENTED answer for `method` ("Service.Method").
pub(crate) fn unimplemented<T>(method: &str) -> ttrpc::Result<T> {
    Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::UNIMPLEMENTED,
        format!(
            "{method} is not implemented by this agent: it was built without its `containers` feature"
        ),
    )))
}

/// `impl Trait for DraftServices` whose every method answers UNIMPLEMENTED. (The impl
/// is generated whole: `#[async_trait]` must see the methods, so they cannot come from
/// a macro inside it.)
macro_rules! unimplemented_service {
    ($trait:ident, $service:literal; $($name:ident($req:ty) -> $resp:ty: $method:literal;)*) => {
        #[async_trait]
        impl $trait for DraftServices {
            $(
                async fn $name(&self, _ctx: &TtrpcContext, _req: $req) -> ttrpc::Result<$resp> {
                    unimplemented(concat!($service, ".", $method))
                }
            )*
        }
    };
}

unimplemented_service! { Containers, "Containers";
    create_container(CreateContainerRequest) -> CreateContainerResponse: "CreateContainer";
    start_container(StartContainerRequest) -> StartContainerResponse: "StartContainer";
    exec_process(ExecProcessRequest) -> ExecProcessResponse: "ExecProcess";
    signal_process(SignalProcessRequest) -> SignalProcessResponse: "SignalProcess";
    wait_process(WaitProcessRequest) -> WaitProcessResponse: "WaitProcess";
    resize_tty(ResizeTtyRequest) -> ResizeTtyResponse: "ResizeTty";
    close_stdin(CloseStdinRequest) -> CloseStdinResponse: "CloseStdin";
    remove_container(RemoveContainerRequest) -> RemoveContainerResponse: "RemoveContainer";
    update_container(UpdateContainerRequest) -> UpdateContainerResponse: "UpdateContainer";
    pause_container(PauseContainerRequest) -> PauseContainerResponse: "PauseContainer";
    resume_container(ResumeContainerRequest) -> ResumeContainerResponse: "ResumeContainer";
    stats_container(StatsContainerRequest) -> StatsContainerResponse: "StatsContainer";
    list_pids(ListPidsRequest) -> ListPidsResponse: "ListPids";
    get_events(GetEventsRequest) -> GetEventsResponse: "GetEvents";
}
