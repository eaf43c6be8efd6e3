//! Host memory figures of a pod VM's processes, from procfs: what the operator pays
//! per pod, split into the VMM's own memory and the guest memory the guest touched.

/// Memory of one process, in KiB.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessFigures {
    pub name: &'static str,
    pub pid: u32,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Resident pages of the guest-RAM mapping in this process (touched guest memory).
    pub guest_ram_rss_kib: u64,
}

impl ProcessFigures {
    /// The process's own memory: its RSS without the guest RAM it maps.
    pub fn own_rss_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_ram_rss_kib)
    }
}

/// Figures for the whole VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmResources {
    pub processes: Vec<ProcessFigures>,
    /// Guest memory backed by host pages (the largest guest-RAM figure of any process:
    /// the VMM and a vhost-user back end map the same pages).
    pub guest_touched_kib: u64,
    /// Sum of the processes' own memory (RSS minus guest RAM).
    pub vmm_own_rss_kib: u64,
    /// Sum of PSS: the host memory the pod really costs, shared pages split fairly.
    pub total_pss_kib: u64,
}

impl VmResources {
    pub fn measure(pids: &[(&'static str, u32)], guest_ram_kib: u64) -> Self {
        let processes: Vec<ProcessFigures> =
            pids.iter().filter_map(|&(name, pid)| measure_process(name, pid, guest_ram_kib)).collect();
        Self {
            guest_touched_kib: processes.iter().map(|p| p.guest_ram_rss_kib).max().unwrap_or(0),
            vmm_own_rss_kib: processes.iter().map(|p| p.own_rss_kib()).sum(),
            total_pss_kib: processes.iter().map(|p| p.pss_kib).sum(),
            processes,
        }
    }
}

/// Reads one process's figures; None if it is gone.
pub fn measure_process(name: &'static str, pid: u32, guest_ram_kib: u64) -> Option<ProcessFigures> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mappings = parse_smaps(&smaps);
    // A process that maps a memfd keeps guest RAM there (QEMU, vhost-user back ends);
    // only otherwise is a large anonymous mapping taken for guest RAM (a TCG code buffer
    // is anonymous and can be as large as a small guest).
    let has_memfd = mappings.iter().any(|m| m.path.starts_with("/memfd:"));
    let mut figures = ProcessFigures { name, pid, ..Default::default() };
    for m in &mappings {
        figures.rss_kib += m.rss_kib;
        figures.pss_kib += m.pss_kib;
        let guest_ram = if has_memfd {
            m.path.starts_with("/memfd:")
        } else {
            is_anonymous_guest_ram(&m.path, m.size_kib, guest_ram_kib)
        };
        if guest_ram {
            figures.guest_ram_rss_kib += m.rss_kib;
        }
    }
    Some(figures)
}

struct Mapping {
    path: String,
    size_kib: u64,
    rss_kib: u64,
    pss_kib: u64,
}

fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let path = line.split_whitespace().nth(5).unwrap_or("").to_string();
            mappings.push(Mapping { path, size_kib: mapping_size_kib(first), rss_kib: 0, pss_kib: 0 });
            continue;
        }
        let value: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(m) = mappings.last_mut() {
            match first {
                "Rss:" => m.rss_kib += value,
                "Pss:" => m.pss_kib += value,
                _ => {}
            }
        }
    }
    mappings
}

fn mapping_size_kib(range: &str) -> u64 {
    let mut parts = range.split('-').map(|h| u64::from_str_radix(h, 16).unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(start), Some(end)) if end > start => (end - start) / 1024,
        _ => 0,
    }
}

/// Without a memfd, guest RAM is an anonymous mapping at least half the guest's size
/// (guest RAM may be split around the 32-bit MMIO hole; nothing else crx-vmm maps is
/// that large).
fn is_anonymous_guest_ram(path: &str, size_kib: u64, guest_ram_kib: u64) -> bool {
    path.is_empty() && guest_ram_kib > 0 && size_kib >= guest_ram_kib / 2 && size_kib <= guest_ram_kib
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_read() {
        let me = measure_process("test", std::process::id(), 0).unwrap();
        assert!(me.rss_kib > 0 && me.pss_kib > 0 && me.pss_kib <= me.rss_kib, "{me:?}");
        assert_eq!(me.guest_ram_rss_kib, 0);
        assert!(measure_process("gone", u32::MAX / 2, 0).is_none());
    }

    #[test]
    fn guest_ram_is_recognised_by_name_or_size() {
        assert!(is_anonymous_guest_ram("", 262144, 262144));
        assert!(!is_anonymous_guest_ram("", 8192, 262144));
        assert!(!is_anonymous_guest_ram("/usr/lib/libc.so.6", 262144, 262144));
        let smaps = "7f00-7f10 rw-s 0 0:1 5 /memfd:mem (deleted)\nRss: 40 kB\nPss: 20 kB\n\
                     8f00-9f00 rw-p 0 0:0 0\nRss: 100 kB\nPss: 100 kB\n";
        let m = parse_smaps(smaps);
        assert_eq!((m.len(), m[0].path.as_str(), m[0].rss_kib, m[1].pss_kib), (2, "/memfd:mem", 40, 100));
        assert_eq!(mapping_size_kib("1000-3000"), 8);
    }
}
