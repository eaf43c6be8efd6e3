//! Reads `/proc/self/mountinfo`: what the kernel says is mounted at a path, so replies
//! report the kernel's view (type, source, options) rather than echo the request.

use std::path::Path;

/// One mount as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    /// Per-mount options, then per-superblock options, comma-joined.
    pub options: String,
}

/// The topmost mount at `path` in the current mount namespace, if any.
pub fn find(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find_in(&text, &path.to_string_lossy())
}

/// The last (topmost) entry of `text` mounted at `path`.
pub fn find_in(text: &str, path: &str) -> Option<MountEntry> {
    text.lines()
        .rev()
        .filter_map(parse_line)
        .find(|e| e.mount_point == path)
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let mount_point = unescape(left.nth(4)?);
    let mount_options = left.next()?;
    let mut right = right.split(' ');
    let fstype = unescape(right.next()?);
    let source = unescape(right.next()?);
    let super_options = right.next().unwrap_or("");
    let options = if super_options.is_empty() {
        mount_options.to_owned()
    } else {
        format!("{mount_options},{super_options}")
    };
    Some(MountEntry {
        mount_point,
        fstype,
        source,
        options,
    })
}

/// The kernel writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = octal(&bytes[i + 1..i + 4]) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Three octal digits as a byte, if they are that.
fn octal(digits: &[u8]) -> Option<u8> {
    let mut v: u32 = 0;
    for d in digits {
        if !(b'0'..=b'7').contains(d) {
            return None;
        }
        v = v * 8 + u32::from(d - b'0');
    }
    u8::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime - rootfs rootfs rw
30 22 0:26 / /run rw,nosuid,nodev - tmpfs tmpfs rw,mode=755
41 30 254:16 / /run/crx/storage/vol rw,relatime shared:5 - ext4 /dev/vdb rw
42 30 0:40 / /run/crx/storage/my\\040dir ro,relatime - virtiofs pod rw
43 30 0:41 / /run/crx/storage/vol ro,relatime - tmpfs tmpfs rw,size=1024k
";

    #[test]
    fn finds_the_topmost_mount_at_a_path() {
        let e = find_in(SAMPLE, "/run/crx/storage/vol").unwrap();
        assert_eq!(e.fstype, "tmpfs");
        assert_eq!(e.options, "ro,relatime,rw,size=1024k");
        let e = find_in(SAMPLE, "/run/crx/storage/my dir").unwrap();
        assert_eq!((e.fstype.as_str(), e.source.as_str()), ("virtiofs", "pod"));
        assert!(find_in(SAMPLE, "/run/crx").is_none());
        assert!(find_in("garbage\n\n1 2 3 - x\n", "/").is_none());
    }

    #[test]
    fn unescapes_octal_and_keeps_odd_backslashes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("x\\999"), "x\\999");
        assert_eq!(unescape("é\\é"), "é\\é");
    }

    #[test]
    fn reads_this_process_mounts() {
        let root = find(Path::new("/")).expect("/ is always mounted");
        assert!(!root.fstype.is_empty());
    }
}
