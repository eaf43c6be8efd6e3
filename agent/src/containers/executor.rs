//! The executor every container and exec process runs through: libcontainer's default
//! one, plus the terminal size set before the program starts and runc's rule for a
//! program named by path when the environment has no PATH.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

use super::tty::WindowSize;

/// libcontainer's default executor with the agent's two differences.
#[derive(Clone, Default)]
pub struct AgentExecutor {
    /// Applied to the terminal on fd 0 (the pty slave) just before exec: an exec's pty
    /// only exists once it runs, so a size asked for before StartContainer is applied
    /// by the process itself and the program never sees a 0x0 terminal.
    pub size: Option<WindowSize>,
}

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(size) = self.size {
            // Best effort: the program can still learn a size from a later ResizeTty.
            let _ = size.apply(0);
        }
        // execvp runs a name with a '/' as given, without consulting PATH.
        DefaultExecutor {}.exec(spec)
    }

    /// libcontainer 0.7 refuses any process whose env lacks PATH, even `/pause`;
    /// runc only needs PATH to look a bare name up. A name with a '/' is checked
    /// here (inside the container's root) and PATH is left out of the environment.
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        let program = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first());
        match program {
            Some(program) if !has_path && program.contains('/') => check_executable(program),
            _ => DefaultExecutor {}.validate(spec),
        }
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}

/// A regular file with an execute bit, as libcontainer checks a PATH lookup's result.
fn check_executable(program: &str) -> Result<(), ExecutorValidationError> {
    let refuse = |why: String| Err(ExecutorValidationError::ArgValidationError(why));
    match Path::new(program).metadata() {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => refuse(format!("{program:?} is not an executable file")),
        Err(e) => refuse(format!("executable {program:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &str, env: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":{args},"env":{env},"cwd":"/","user":{{"uid":0,"gid":0}}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_program_named_by_path_needs_no_path_variable() {
        let executor = AgentExecutor::default();
        executor.validate(&spec(r#"["/bin/sh"]"#, "[]")).unwrap();
        assert!(executor
            .validate(&spec(r#"["/no/such/program"]"#, "[]"))
            .is_err());
        assert!(executor.validate(&spec(r#"["/"]"#, "[]")).is_err());
        // A bare name still needs PATH to be found.
        assert!(executor.validate(&spec(r#"["sh"]"#, "[]")).is_err());
        executor
            .validate(&spec(r#"["sh"]"#, r#"["PATH=/bin:/usr/bin"]"#))
            .unwrap();
    }
}
