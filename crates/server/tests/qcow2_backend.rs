//! Tickets with `"format": "qcow2"`: the guest view of a qcow2 image (over a backing file)
//! is downloaded, uploaded into, zeroed and flushed over the data API; afterwards the image
//! passes `qemu-img check` with no leaks and equals what was sent.

mod common;

use std::path::Path;
use std::process::Command;

use common::{TestServer, curl};
use server::TicketSpec;

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !(cmd == "qemu-io" && text.contains("failed")),
        "{cmd} {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_qcow2_ticket_transfers_the_guest_view_and_takes_writes() {
    let srv = TestServer::start();
    let dir = srv.dir.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x31 0 3M", s(&base)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x41 1M 100k", s(&top)],
    );
    let expected_file = dir.join("expected.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", s(&top), s(&expected_file)],
    );
    let mut expected = std::fs::read(&expected_file).unwrap();
    srv.add_ticket(serde_json::json!({
        "uuid": "q", "size": 4 * MIB, "ops": ["read", "write"], "timeout": 300,
        "url": format!("file://{}", top.display()), "format": "qcow2",
    }));

    let r = curl(&[&srv.url("q")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == expected, "GET returns the guest view");

    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let up = dir.join("up.bin");
    std::fs::write(&up, &payload).unwrap();
    let at = 12345u64;
    let last = at + payload.len() as u64 - 1;
    let r = curl(&[
        "-T",
        s(&up),
        "-H",
        &format!("Content-Range: bytes {at}-{last}/*"),
        &format!("{}?flush=n", srv.url("q")),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    expected[at as usize..=last as usize].copy_from_slice(&payload);
    let r = curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"op": "zero", "offset": 2097152, "size": 524288, "flush": true}"#,
        &srv.url("q"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    expected[2 * MIB as usize..(2 * MIB + 512 * 1024) as usize].fill(0);

    let r = curl(&[&srv.url("q")]);
    assert!(r.body == expected, "GET sees the writes");
    // The zero request's flush wrote the tables back: the file is complete as it stands.

    let out = Command::new("qemu-img")
        .args(["check", s(&top)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "{text}"
    );
    let mirror = dir.join("mirror.raw");
    std::fs::write(&mirror, &expected).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(&mirror), s(&top)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn the_format_field_is_checked() {
    let doc = |format: &str, url: &str| {
        serde_json::json!({"uuid": "u", "size": 1, "ops": ["read"], "timeout": 1,
            "url": url, "format": format})
        .to_string()
    };
    let spec = TicketSpec::from_json(doc("qcow2", "file:///x").as_bytes()).unwrap();
    assert!(spec.qcow2);
    let spec = TicketSpec::from_json(doc("raw", "file:///x").as_bytes()).unwrap();
    assert!(!spec.qcow2);
    let e = TicketSpec::from_json(doc("vmdk", "file:///x").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("format"), "{e}");
    let e = TicketSpec::from_json(doc("qcow2", "nbd:unix:/x.sock").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("file://"), "{e}");
}
