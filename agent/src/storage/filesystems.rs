//! Which file-system types the running kernel supports (`/proc/filesystems`), so a bad
//! fstype is refused by name before anything waits for a device or calls mount(2).

/// A file-system type the kernel knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFs {
    pub name: String,
    /// `nodev`: needs no block device (tmpfs, virtiofs, proc...).
    pub nodev: bool,
}

/// The kernel's list, empty if it cannot be read.
pub fn known() -> Vec<KernelFs> {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses `nodev\tproc` / `\text4` lines.
pub fn parse(text: &str) -> Vec<KernelFs> {
    text.lines()
        .filter_map(|line| {
            let (flag, name) = line.split_once('\t')?;
            let name = name.trim();
            (!name.is_empty()).then(|| KernelFs {
                name: name.to_owned(),
                nodev: flag.trim() == "nodev",
            })
        })
        .collect()
}

/// The block-device file systems in `list`, comma-joined, for error messages.
pub fn block_names(list: &[KernelFs]) -> String {
    let names: Vec<&str> = list
        .iter()
        .filter(|f| !f.nodev)
        .map(|f| f.name.as_str())
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_list() {
        let list = parse("nodev\tsysfs\nnodev\ttmpfs\n\text4\n\txfs\nnodev\tvirtiofs\nbad\n");
        assert_eq!(list.len(), 5);
        assert!(list.contains(&KernelFs {
            name: "ext4".into(),
            nodev: false
        }));
        assert!(list.contains(&KernelFs {
            name: "virtiofs".into(),
            nodev: true
        }));
        assert_eq!(block_names(&list), "ext4, xfs");
        assert_eq!(block_names(&[]), "none");
    }

    #[test]
    fn reads_this_kernel_list() {
        assert!(known().iter().any(|f| f.name == "tmpfs" && f.nodev));
    }
}
