//! A network namespace that a test or benchmark creates for its guest's tap, so every
//! address it uses stays inside (nothing touches the host's own network).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `name`, replacing a namespace a crashed run left behind.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        Ok(Self { name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has entered this namespace: sockets and taps it
    /// creates belong to the namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || -> Result<T> {
            let ns = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: setns(2) on an open namespace fd; it changes only this
            // short-lived thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace panicked"))?
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A tap in this namespace in the mode both VMMs need, with `host_cidr` (e.g.
    /// `10.77.0.1/24`) on the host end, `mtu`, and the link (and `lo`) up.
    pub fn tap(&self, tap_name: &str, host_cidr: &str, mtu: u16) -> Result<OwnedFd> {
        let owned = tap_name.to_string();
        let fd = self.enter(move || {
            crx_vmm::devices::virtio::net::open_tap(&owned)
                .with_context(|| format!("creating tap {owned}"))
        })?;
        self.ip(&["link", "set", "lo", "up"])?;
        self.ip(&["addr", "add", host_cidr, "dev", tap_name])?;
        self.ip(&["link", "set", tap_name, "mtu", &mtu.to_string(), "up"])?;
        Ok(fd)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
