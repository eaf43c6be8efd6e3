//! The API socket against real Block devices (no guest): attach, replace, detach over
//! the socket with fds passed, and every way a client can get it wrong.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::client::{self, ApiClientError};
use super::protocol::{Reply, Request, MAX_LINE};
use super::{ApiError, ApiServer, DriveHandle};
use crate::devices::virtio::block::{Backing, Block};
use crate::devices::virtio::test_utils::TestDir;

fn image(dir: &TestDir, name: &str, sectors: usize) -> PathBuf {
    let p = dir.0.join(name);
    std::fs::write(&p, vec![7u8; sectors * 512]).unwrap();
    p
}

/// Two drives: 0 an empty writable slot, 1 a read-only drive on an 8-sector image.
fn setup(dir: &TestDir) -> (Vec<Block>, PathBuf) {
    let empty = Block::new_empty("slot0").unwrap();
    let ro_img = image(dir, "ro.img", 8);
    let ro = Block::new("ro1", Backing::open(&ro_img, true).unwrap())
        .unwrap()
        .read_only();
    (vec![empty, ro], dir.0.join("api.sock"))
}

fn handles(blocks: &[Block]) -> Vec<DriveHandle> {
    blocks
        .iter()
        .map(|b| DriveHandle {
            slot: b.slot(),
            read_only: b.is_read_only(),
        })
        .collect()
}

fn refused(r: Result<u64, ApiClientError>) -> String {
    match r {
        Err(ApiClientError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn attach_replace_and_detach_over_the_socket() {
    let dir = TestDir::new("api-attach");
    let (blocks, sock) = setup(&dir);
    let thread = ApiServer::bind(&sock, handles(&blocks))
        .unwrap()
        .spawn()
        .unwrap();

    let vol = image(&dir, "vol.img", 64);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vol)
        .unwrap();
    assert_eq!(client::attach_drive(&sock, 0, &f, false).unwrap(), 64);
    assert_eq!(blocks[0].capacity(), 64);
    assert_eq!(blocks[0].slot().config_generation(), 1);
    let backing = blocks[0].slot().backing().unwrap();
    assert!(!backing.is_read_only());
    // The fd is crx-vmm's own copy: closing ours changes nothing.
    drop(f);
    let mut buf = [0u8; 512];
    backing.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 512]);

    // Replacing flushes the old backing, then reports the new size.
    let bigger = image(&dir, "bigger.img", 128);
    let f = std::fs::File::open(&bigger).unwrap();
    assert_eq!(client::attach_drive(&sock, 0, &f, true).unwrap(), 128);
    assert_eq!(backing.flush_count(), 1);
    assert!(blocks[0].slot().backing().unwrap().is_read_only());

    client::detach_drive(&sock, 0).unwrap();
    assert_eq!(blocks[0].capacity(), 0);
    assert!(blocks[0].slot().backing().is_none());
    assert_eq!(blocks[0].slot().config_generation(), 3);

    // A drive started read-only takes a backing read-only even when asked otherwise,
    // so a read-only fd is enough.
    let f = std::fs::File::open(&vol).unwrap();
    assert_eq!(client::attach_drive(&sock, 1, &f, false).unwrap(), 64);
    assert!(blocks[1].slot().backing().unwrap().is_read_only());

    assert!(matches!(thread.stop("api"), Ok(Some(()))));
}

#[test]
fn bad_requests_get_errors_that_name_the_cause_and_change_nothing() {
    let dir = TestDir::new("api-bad");
    let (blocks, sock) = setup(&dir);
    let thread = ApiServer::bind(&sock, handles(&blocks))
        .unwrap()
        .spawn()
        .unwrap();
    let vol = image(&dir, "vol.img", 16);

    let f = std::fs::File::open(&vol).unwrap();
    let why = refused(client::attach_drive(&sock, 5, &f, false));
    assert!(why.contains("no drive 5") && why.contains("has 2"), "{why}");
    // Writable attach of an fd opened read-only.
    let why = refused(client::attach_drive(&sock, 0, &f, false));
    assert!(why.contains("read-only"), "{why}");
    // A directory is no backing.
    let d = std::fs::File::open(&dir.0).unwrap();
    let why = refused(client::attach_drive(&sock, 0, &d, true));
    assert!(
        why.contains("neither a regular file nor a block device"),
        "{why}"
    );
    // attach without an fd, detach with one.
    let err = client::call(
        &sock,
        &Request::AttachDrive {
            index: 0,
            read_only: true,
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("refused") && format!("{err:?}").contains("SCM_RIGHTS"));
    let err = client::call(
        &sock,
        &Request::DetachDrive { index: 0 },
        Some(std::os::fd::AsRawFd::as_raw_fd(&f)),
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("takes no fd"), "{err:?}");
    assert_eq!(blocks[0].capacity(), 0);
    assert_eq!(blocks[0].slot().config_generation(), 0, "nothing changed");

    // Raw garbage, then an unknown request, on one connection; both answered.
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.write_all(b"not json\n{\"format_disk\":{}}\n").unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 1024];
    while got.matches('\n').count() < 2 {
        let n = conn.read(&mut buf).unwrap();
        assert_ne!(n, 0, "connection closed early: {got}");
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    let replies: Vec<Reply> = got
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(replies.iter().all(|r| !r.ok));
    assert!(replies[0]
        .error
        .as_deref()
        .unwrap()
        .contains("malformed request"));
    assert!(replies[1].error.as_deref().unwrap().contains("format_disk"));
    // Connections are served one at a time: hang up so the next one is taken at once.
    drop(conn);

    // A line longer than the limit is refused and the connection closed.
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
    let mut got = Vec::new();
    // The reply comes first; then the close (a reset, as our excess bytes went unread).
    while !got.contains(&b'\n') {
        let n = conn.read(&mut buf).unwrap();
        assert_ne!(n, 0);
        got.extend_from_slice(&buf[..n]);
    }
    let reply: Reply = serde_json::from_slice(got.trim_ascii_end()).unwrap();
    assert!(reply.error.unwrap().contains("longer than"));
    assert!(
        matches!(conn.read(&mut buf), Ok(0) | Err(_)),
        "connection closed"
    );

    // The server still works after all that.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vol)
        .unwrap();
    assert_eq!(client::attach_drive(&sock, 0, &f, false).unwrap(), 16);
    drop(thread);
}

#[test]
fn an_existing_path_is_refused_and_a_missing_socket_is_named() {
    let dir = TestDir::new("api-exists");
    let (blocks, sock) = setup(&dir);
    std::fs::write(&sock, b"").unwrap();
    assert!(matches!(
        ApiServer::bind(&sock, handles(&blocks)),
        Err(ApiError::PathExists(_))
    ));
    let f = std::fs::File::open(&sock).unwrap();
    let err = client::attach_drive(&dir.0.join("nothing.sock"), 0, &f, true).unwrap_err();
    assert!(matches!(err, ApiClientError::Connect { .. }));
    assert!(err.to_string().contains("nothing.sock"));
}

#[test]
fn the_wire_format_is_the_documented_one() {
    let req: Request =
        serde_json::from_str(r#"{"attach_drive":{"index":1,"read_only":false}}"#).unwrap();
    assert_eq!(
        req,
        Request::AttachDrive {
            index: 1,
            read_only: false
        }
    );
    let req: Request = serde_json::from_str(r#"{"attach_drive":{"index":2}}"#).unwrap();
    assert_eq!(
        req,
        Request::AttachDrive {
            index: 2,
            read_only: false
        }
    );
    assert!(
        serde_json::from_str::<Request>(r#"{"attach_drive":{"index":1,"path":"/x"}}"#).is_err()
    );
    assert_eq!(
        Reply::capacity(8).to_line(),
        b"{\"ok\":true,\"capacity_sectors\":8}\n"
    );
    assert_eq!(
        Reply::error("no").to_line(),
        b"{\"ok\":false,\"error\":\"no\"}\n"
    );
}
