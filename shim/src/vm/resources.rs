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
        let processes: Vec<ProcessFigures> = pids
            .iter()
            .filter_map(|&(name, pid)| measure_process(name, pid, guest_ram_kib))
            .collect();
        Self {
            guest_touched_kib: processes
                .iter()
                .map(|p| p.guest_ram_rss_kib)
                .max()
                .unwrap_or(0),
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
    let guest_window = if has_memfd {
        None
    } else {
        anonymous_guest_window(&mappings, guest_ram_kib)
    };
    let mut figures = ProcessFigures {
        name,
        pid,
        ..Default::default()
    };
    for (i, m) in mappings.iter().enumerate() {
        figures.rss_kib += m.rss_kib;
        figures.pss_kib += m.pss_kib;
        let guest_ram = if has_memfd {
            m.path.starts_with("/memfd:")
        } else {
            guest_window.as_ref().is_some_and(|w| w.contains(&i))
        };
        if guest_ram {
            figures.guest_ram_rss_kib += m.rss_kib;
        }
    }
    Some(figures)
}

/// crx-vmm's guest RAM is one anonymous mapping that the kernel and initramfs files
/// are mapped into, which splits it: the guest RAM is the run of address-contiguous
/// mappings around its largest anonymous piece whose sizes add up to exactly the
/// guest's size. Falls back to the large anonymous pieces alone (e.g. RAM split around
/// the 32-bit MMIO hole).
fn anonymous_guest_window(
    mappings: &[Mapping],
    guest_ram_kib: u64,
) -> Option<std::ops::RangeInclusive<usize>> {
    let anchor = (0..mappings.len())
        .filter(|&i| is_anonymous_guest_ram(&mappings[i].path, mappings[i].size_kib, guest_ram_kib))
        .max_by_key(|&i| mappings[i].size_kib)?;
    let contiguous = |a: usize, b: usize| mappings[a].end == mappings[b].start;
    let mut first = anchor;
    while first > 0 && contiguous(first - 1, first) {
        first -= 1;
    }
    let mut last = anchor;
    while last + 1 < mappings.len() && contiguous(last, last + 1) {
        last += 1;
    }
    for start in first..=anchor {
        let mut total = 0;
        for (end, m) in mappings.iter().enumerate().take(last + 1).skip(start) {
            total += m.size_kib;
            if end >= anchor && total == guest_ram_kib {
                return Some(start..=end);
            }
            if total > guest_ram_kib {
                break;
            }
        }
    }
    Some(anchor..=anchor)
}

struct Mapping {
    start: u64,
    end: u64,
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
            let (start, end) = mapping_range(first);
            mappings.push(Mapping {
                start,
                end,
                path,
                size_kib: (end - start) / 1024,
                rss_kib: 0,
                pss_kib: 0,
            });
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

fn mapping_range(range: &str) -> (u64, u64) {
    let mut parts = range
        .split('-')
        .map(|h| u64::from_str_radix(h, 16).unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(start), Some(end)) if end > start => (start, end),
        _ => (0, 0),
    }
}

/// Without a memfd, guest RAM is an anonymous mapping at least half the guest's size
/// (guest RAM may be split around the 32-bit MMIO hole; nothing else crx-vmm maps is
/// that large).
fn is_anonymous_guest_ram(path: &str, size_kib: u64, guest_ram_kib: u64) -> bool {
    path.is_empty()
        && guest_ram_kib > 0
        && size_kib >= guest_ram_kib / 2
        && size_kib <= guest_ram_kib
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_read() {
        let me = measure_process("test", std::process::id(), 0).unwrap();
        assert!(
            me.rss_kib > 0 && me.pss_kib > 0 && me.pss_kib <= me.rss_kib,
            "{me:?}"
        );
        assert_eq!(me.guest_ram_rss_kib, 0);
        assert!(measure_process("gone", u32::MAX / 2, 0).is_none());
    }

    #[test]
    fn guest_ram_is_recognised_by_name_or_size() {
        assert!(is_anonymous_guest_ram("", 262144, 262144));
        assert!(!is_anonymous_guest_ram("", 8192, 262144));
        assert!(!is_anonymous_guest_ram(
            "/usr/lib/libc.so.6",
            262144,
            262144
        ));
        let smaps = "7f00-7f10 rw-s 0 0:1 5 /memfd:mem (deleted)\nRss: 40 kB\nPss: 20 kB\n\
                     8f00-9f00 rw-p 0 0:0 0\nRss: 100 kB\nPss: 100 kB\n";
        let m = parse_smaps(smaps);
        assert_eq!(
            (m.len(), m[0].path.as_str(), m[0].rss_kib, m[1].pss_kib),
            (2, "/memfd:mem", 40, 100)
        );
        assert_eq!(mapping_range("1000-3000"), (0x1000, 0x3000));
        // crx-vmm: 1 MiB guest RAM split by a file mapping; a neighbour is not guest RAM.
        let smaps = "0-1000 rw-p 0 0:0 0\nRss: 4 kB\n\
                     100000-140000 rw-p 0 0:0 0\nRss: 8 kB\n\
                     140000-150000 rw-p 0 8:1 9 /var/cache/crx/vmlinux\nRss: 64 kB\n\
                     150000-200000 rw-p 0 0:0 0\nRss: 16 kB\n\
                     200000-210000 rw-p 0 0:0 0\nRss: 32 kB\n";
        let m = parse_smaps(smaps);
        assert_eq!(anonymous_guest_window(&m, 1024), Some(1..=3));
    }
}
