//! Errors as containerd sees them: ttrpc statuses with a code containerd maps
//! (NOT_FOUND, FAILED_PRECONDITION, UNIMPLEMENTED, ...) and a message naming the cause.
//! An agent that does not implement a call yet answers UNIMPLEMENTED; that becomes
//! an UNIMPLEMENTED status saying which agent call, so `ctr` prints the reason rather
//! than a generic failure.

use ttrpc::{Code, Error};

pub fn status(code: Code, message: impl Into<String>) -> Error {
    Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// An error and its causes on one line, as containerd shows it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub fn not_found(what: impl std::fmt::Display) -> Error {
    status(Code::NOT_FOUND, format!("{what} not found"))
}

pub fn precondition(message: impl Into<String>) -> Error {
    status(Code::FAILED_PRECONDITION, message)
}

pub fn internal(message: impl Into<String>) -> Error {
    status(Code::INTERNAL, message)
}

/// A task API call crx does not offer.
pub fn unimplemented(call: &str, why: &str) -> Error {
    status(
        Code::UNIMPLEMENTED,
        format!("crx does not offer {call}: {why}"),
    )
}

/// The code of a ttrpc error (UNKNOWN for transport errors).
pub fn code_of(e: &Error) -> Code {
    match e {
        Error::RpcStatus(s) => s.code(),
        _ => Code::UNKNOWN,
    }
}

/// An agent call's failure, as the task API reports it: the agent's code kept
/// (UNIMPLEMENTED stays UNIMPLEMENTED), the message saying which agent call failed.
pub fn agent_error(call: &str, e: Error) -> Error {
    match &e {
        Error::RpcStatus(s) if is_unimplemented(s) => status(
            Code::UNIMPLEMENTED,
            format!(
                "the crx agent in the pod VM does not implement {call}: {}",
                s.message()
            ),
        ),
        Error::RpcStatus(s) => status(
            s.code(),
            format!("crx agent {call} failed: {}", s.message()),
        ),
        other => status(
            Code::UNAVAILABLE,
            format!("crx agent {call} failed (is the pod VM still running?): {other}"),
        ),
    }
}

/// UNIMPLEMENTED, or ttrpc's answer for a service the server does not register at all
/// (an agent older than the service: INVALID_ARGUMENT "<name> service does not exist").
fn is_unimplemented(s: &ttrpc::proto::Status) -> bool {
    s.code() == Code::UNIMPLEMENTED
        || (s.code() == Code::INVALID_ARGUMENT && s.message().ends_with(" service does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unimplemented_agent_call_stays_unimplemented_and_names_the_call() {
        let e = agent_error(
            "Sandbox.CreateSandbox",
            status(
                Code::UNIMPLEMENTED,
                "/crx.agent.v1.Sandbox/CreateSandbox is not supported",
            ),
        );
        assert_eq!(code_of(&e), Code::UNIMPLEMENTED);
        let Error::RpcStatus(s) = e else {
            panic!("not a status")
        };
        assert!(
            s.message().contains("Sandbox.CreateSandbox"),
            "{}",
            s.message()
        );
        assert!(
            s.message().contains("does not implement"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn an_agent_without_the_service_counts_as_unimplemented() {
        let e = agent_error(
            "Sandbox.CreateSandbox",
            status(
                Code::INVALID_ARGUMENT,
                "crx.agent.v1.Sandbox service does not exist",
            ),
        );
        assert_eq!(code_of(&e), Code::UNIMPLEMENTED);
        let other = agent_error(
            "Containers.CreateContainer",
            status(Code::INVALID_ARGUMENT, "bad spec"),
        );
        assert_eq!(code_of(&other), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn a_dead_transport_is_unavailable() {
        let e = agent_error("Containers.WaitProcess", Error::LocalClosed);
        assert_eq!(code_of(&e), Code::UNAVAILABLE);
    }
}
