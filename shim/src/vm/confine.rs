//! How a pod VM's crx-vmm processes are confined: crx-vmm's own `--jail` (a mount
//! namespace whose root holds only the VM's paths, capabilities dropped) and
//! `--seccomp`. Both backends pass the same flags, to crx-vmm itself or to each of its
//! vhost-user back ends. QEMU is not crx code and gets neither.
//!
//! The jail directory is `<run dir>/jail`: every process mounts its own tmpfs on it
//! inside its own namespace, so one empty directory serves all of a pod's processes
//! and the host never sees anything in it. Inside, crx-vmm binds the run directory
//! (sockets, logs) and the pod share recursively as slaves of the host's mounts, so
//! sockets it creates are the host's and container rootfs bound into the share after
//! boot still reach the guest.

use std::path::{Path, PathBuf};

use super::VmError;

/// crx-vmm's `--seccomp` modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// A call outside a thread's filter kills the process (crx-vmm's default).
    #[default]
    Kill,
    /// Allowed, but written to the kernel log: for finding a missing call.
    Log,
    Off,
}

impl Seccomp {
    fn flag_value(self) -> &'static str {
        match self {
            Seccomp::Kill => "kill",
            Seccomp::Log => "log",
            Seccomp::Off => "off",
        }
    }
}

impl std::str::FromStr for Seccomp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Seccomp::Kill),
            "log" => Ok(Seccomp::Log),
            "off" => Ok(Seccomp::Off),
            other => Err(format!(
                "unknown seccomp mode {other:?}: expected \"kill\", \"log\" or \"off\""
            )),
        }
    }
}

/// The confinement a backend gives the crx-vmm processes of each VM it starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// Jail every crx-vmm process in `<run dir>/jail`.
    pub jail: bool,
    /// User and group ids to switch to inside the jail (None: stay root, with the
    /// capabilities the jail does not need dropped).
    pub jail_ids: Option<(u32, u32)>,
    pub seccomp: Seccomp,
}

/// The jail directory of a VM whose run directory is `run_dir`.
pub fn jail_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("jail")
}

impl Confinement {
    /// Creates what the flags name (the jail directory, mode 0700) and returns the
    /// flags for one crx-vmm process of the VM in `run_dir`. crx-vmm takes them before
    /// or after a back end's subcommand alike.
    pub fn prepare(&self, run_dir: &Path) -> Result<Vec<String>, VmError> {
        let mut args = vec!["--seccomp".to_string(), self.seccomp.flag_value().into()];
        if self.jail {
            let dir = jail_dir(run_dir);
            create_private_dir(&dir)?;
            args.extend(["--jail".into(), dir.display().to_string()]);
            if let Some((uid, gid)) = self.jail_ids {
                args.extend([
                    "--jail-uid".into(),
                    uid.to_string(),
                    "--jail-gid".into(),
                    gid.to_string(),
                ]);
            }
        }
        Ok(args)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(source) => Err(VmError::RunDir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_the_jail_under_the_run_dir_and_the_seccomp_mode() {
        let run = std::env::temp_dir().join(format!("crx-confine-{}", std::process::id()));
        std::fs::create_dir_all(&run).unwrap();
        let off = Confinement::default().prepare(&run).unwrap();
        assert_eq!(off, ["--seccomp", "kill"]);
        assert!(!jail_dir(&run).exists());

        let jailed = Confinement {
            jail: true,
            jail_ids: Some((65534, 65534)),
            seccomp: Seccomp::Log,
        };
        let args = jailed.prepare(&run).unwrap();
        let jail = jail_dir(&run).display().to_string();
        assert_eq!(
            args,
            [
                "--seccomp",
                "log",
                "--jail",
                jail.as_str(),
                "--jail-uid",
                "65534",
                "--jail-gid",
                "65534"
            ]
        );
        assert!(jail_dir(&run).is_dir());
        // A second VM process of the same pod reuses the directory.
        assert!(jailed.prepare(&run).is_ok());
        std::fs::remove_dir_all(&run).unwrap();
        assert_eq!("off".parse::<Seccomp>(), Ok(Seccomp::Off));
        assert!("strict".parse::<Seccomp>().is_err());
    }
}
