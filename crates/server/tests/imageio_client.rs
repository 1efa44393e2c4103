//! Interoperability with the real ovirt-imageio 2.5.1 client library (from PyPI, in the venv
//! scripts/imageio-venv makes): `ovirt_imageio.client.upload` and `download` of raw and qcow2
//! images, with 1 and 4 workers, over TLS and over the local Unix socket (the client switches
//! to it by itself when OPTIONS advertises it), to file and NBD (qemu-nbd) tickets. Every
//! transfer is verified with `qemu-img compare`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestServer;
use testutil::imageio::imageio_python;

const MIB: u64 = 1 << 20;

/// Drives the client: `upload SRC URL CAFILE WORKERS` or `download DST URL CAFILE WORKERS FMT`.
const DRIVER: &str = r#"
import sys
from ovirt_imageio import client
op, path, url, cafile, workers = sys.argv[1:6]
if op == "upload":
    client.upload(path, url, cafile, max_workers=int(workers))
else:
    client.download(url, path, cafile, fmt=sys.argv[6], max_workers=int(workers))
"#;

struct Interop {
    srv: TestServer,
    python: PathBuf,
    driver: PathBuf,
    ca: PathBuf,
    _certs: testutil::Certs,
    raw: PathBuf,
    qcow2: PathBuf,
    size: u64,
}

impl Interop {
    fn new(local_socket: bool) -> Interop {
        let python = imageio_python();
        let certs = testutil::Certs::generate();
        let dir = certs.dir().to_path_buf();
        let srv = TestServer::start_with(|c| {
            c.tls = Some((dir.join("server-cert.pem"), dir.join("server-key.pem")));
            if !local_socket {
                c.local_socket = None;
            }
        });
        let driver = srv.dir.path().join("driver.py");
        std::fs::write(&driver, DRIVER).unwrap();
        // Data, explicit zeroes and holes, with odd boundaries, ending in a hole.
        let layout = testutil::Layout::new()
            .data(3 * MIB + 4096, 1)
            .hole(5 * MIB)
            .zero(2 * MIB)
            .data(MIB + 512, 2)
            .hole(3 * MIB - 4608)
            .data(64 << 10, 3)
            .hole(6 * MIB);
        let raw = srv.dir.path().join("src.raw");
        let size = testutil::make_sparse_image(&raw, &layout);
        let qcow2 = srv.dir.path().join("src.qcow2");
        testutil::image::convert_to_qcow2(&raw, &qcow2);
        Interop {
            ca: certs.ca_cert(),
            _certs: certs,
            srv,
            python,
            driver,
            raw,
            qcow2,
            size,
        }
    }

    fn client(&self, args: &[&str]) {
        let out = Command::new(&self.python)
            .arg(&self.driver)
            .args(args)
            .output()
            .expect("running the imageio client");
        assert!(
            out.status.success(),
            "imageio client {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn upload(&self, src: &Path, id: &str, workers: u32) {
        let ca = self.ca.display().to_string();
        self.client(&[
            "upload",
            &src.display().to_string(),
            &self.srv.url(id),
            &ca,
            &workers.to_string(),
        ]);
    }

    fn download(&self, id: &str, dst: &Path, fmt: &str, workers: u32) {
        let ca = self.ca.display().to_string();
        self.client(&[
            "download",
            &dst.display().to_string(),
            &self.srv.url(id),
            &ca,
            &workers.to_string(),
            fmt,
        ]);
    }

    /// A fresh raw destination file of the image's size, with a file ticket for it.
    fn file_target(&self, id: &str) -> PathBuf {
        let path = self.srv.dir.path().join(format!("{id}.raw"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(self.size).unwrap();
        self.srv
            .file_ticket(id, &path, self.size, &["read", "write"]);
        path
    }
}

fn assert_same(a: &Path, b: &Path) {
    let out = Command::new(testutil::require_binary("qemu-img"))
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Upload raw and qcow2 with 1 and 4 workers, download each back as raw and qcow2.
fn round_trips(t: &Interop) {
    for (n, (src, workers)) in [(&t.raw, 1), (&t.qcow2, 4), (&t.raw, 4), (&t.qcow2, 1)]
        .into_iter()
        .enumerate()
    {
        let id = format!("up{n}");
        let target = t.file_target(&id);
        t.upload(src, &id, workers);
        assert_same(&t.raw, &target);
        for fmt in ["raw", "qcow2"] {
            let back = t.srv.dir.path().join(format!("back{n}.{fmt}"));
            t.download(&id, &back, fmt, workers);
            assert_same(&t.raw, &back);
        }
    }
}

#[test]
fn upload_and_download_over_tls() {
    let t = Interop::new(false);
    round_trips(&t);
    let server = t.srv.server.as_ref().unwrap();
    assert!(server.accepted("remote") >= 8);
    assert_eq!(server.accepted("local"), 0);
}

#[test]
fn upload_and_download_over_the_local_socket() {
    let t = Interop::new(true);
    round_trips(&t);
    let server = t.srv.server.as_ref().unwrap();
    // Each transfer probes over TLS, then every worker connects to the Unix socket.
    assert!(
        server.accepted("local") >= 8,
        "local {} remote {}",
        server.accepted("local"),
        server.accepted("remote")
    );
}

#[test]
fn upload_and_download_through_an_nbd_ticket() {
    let t = Interop::new(true);
    let disk = t.srv.dir.path().join("nbd-disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(t.size)
        .unwrap();
    let qemu = testutil::QemuNbd::new(&disk).shared(8).start();
    let sock = qemu.socket().unwrap().display().to_string();
    for (id, url) in [
        ("legacy", format!("nbd:unix:{sock}")),
        ("modern", format!("nbd+unix:///?socket={sock}")),
    ] {
        t.srv.add_ticket(serde_json::json!({
            "uuid": id, "size": t.size, "ops": ["write"], "timeout": 300, "url": url,
        }));
    }
    t.upload(&t.qcow2, "legacy", 4);
    assert_same(&t.raw, &disk);
    let back = t.srv.dir.path().join("nbd-back.qcow2");
    t.download("modern", &back, "qcow2", 4);
    assert_same(&t.raw, &back);
    let back = t.srv.dir.path().join("nbd-back.raw");
    t.download("legacy", &back, "raw", 1);
    assert_same(&t.raw, &back);
}

#[test]
fn read_only_ticket_refuses_the_client_upload() {
    let t = Interop::new(false);
    let target = t.srv.dir.path().join("ro.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(t.size)
        .unwrap();
    t.srv.file_ticket("ro", &target, t.size, &["read"]);
    let out = Command::new(&t.python)
        .arg(&t.driver)
        .args([
            "upload",
            &t.raw.display().to_string(),
            &t.srv.url("ro"),
            &t.ca.display().to_string(),
            "4",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") || err.contains("forbids write"),
        "{err}"
    );
    assert!(std::fs::read(&target).unwrap().iter().all(|b| *b == 0));
}
