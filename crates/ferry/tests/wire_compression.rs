//! `ferry copy --wire-compression`: uploads to `ferry serve` with zstd bodies land byte for
//! byte and take fewer bytes on the wire than they write (the server's metrics count both);
//! `auto` lands too; the real ovirt-imageio daemon, which offers no encodings, gets plain
//! bodies and a warning.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use testutil::imageio::{ImageioServer, ServerOptions};

const MIB: usize = 1 << 20;

/// An image with text-like data (compresses well), random data, explicit zeroes and holes.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = Vec::new();
    let mut i = 0u64;
    while data.len() < 12 * MIB + 777 {
        data.extend_from_slice(format!("{i:08} a line of a config file = {}\n", i % 97).as_bytes());
        i += 1;
    }
    data.truncate(12 * MIB + 777);
    let mut image = vec![0u8; 40 * MIB];
    image[..data.len()].copy_from_slice(&data);
    let random = testutil::pseudo_random(3, 3 * MIB);
    image[20 * MIB..23 * MIB].copy_from_slice(&random);
    image[30 * MIB..30 * MIB + data.len() / 4].copy_from_slice(&data[..data.len() / 4]);
    let path = dir.join("src.raw");
    std::fs::write(&path, &image).unwrap();
    // Punch the zero tail back into a hole.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len((34 * MIB) as u64).unwrap();
    f.set_len((40 * MIB) as u64).unwrap();
    (path, image)
}

fn metric(server: &ImageioServer, name: &str) -> u64 {
    let (status, text) = server.control("GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn upload(
    server: &ImageioServer,
    dir: &Path,
    id: &str,
    src: &Path,
    expected: &[u8],
    mode: &str,
) -> Run {
    let dst = dir.join(format!("{id}.raw"));
    std::fs::write(&dst, vec![0xEE; expected.len()]).unwrap();
    server.file_ticket(id, &dst, expected.len() as u64, &["write"]);
    let run = ferry([
        "copy",
        "--wire-compression",
        mode,
        &src.display().to_string(),
        &server.url(id),
    ])
    .env("RUST_LOG", "warn")
    .run();
    assert!(
        run.status.success(),
        "{}: {}\nserver log:\n{}",
        run.line,
        run.stderr,
        server.log()
    );
    run.assert_no_panic();
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        expected,
        &format!("{id} ({mode})"),
    );
    run
}

#[test]
fn zstd_uploads_to_ferry_serve_land_and_save_wire_bytes() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let (src, expected) = image(d);
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());

    let run = upload(&serve, d, "zstd", &src, &expected, "zstd");
    assert!(!run.stderr.contains("ignored"), "{}", run.stderr);
    let wire = metric(&serve, "ferry_upload_wire_bytes_total{encoding=\"zstd\"}");
    let written = metric(&serve, "ferry_bytes_total{op=\"write\"}");
    assert!(wire > 0, "no zstd bodies were sent");
    assert!(
        wire * 3 < written,
        "{wire} bytes on the wire for {written} written"
    );
    assert_eq!(
        metric(
            &serve,
            "ferry_upload_wire_bytes_total{encoding=\"identity\"}"
        ),
        0,
        "every run went compressed"
    );

    // Plain by default.
    upload(&serve, d, "off", &src, &expected, "off");
    assert!(
        metric(
            &serve,
            "ferry_upload_wire_bytes_total{encoding=\"identity\"}"
        ) > 0
    );

    upload(&serve, d, "auto", &src, &expected, "auto");
}

#[test]
fn the_imageio_daemon_gets_plain_bodies_and_a_warning() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let (src, expected) = image(d);
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let run = upload(&daemon, d, "daemon", &src, &expected, "zstd");
    assert!(
        run.stderr.contains("does not take zstd bodies"),
        "{}",
        run.stderr
    );
}
