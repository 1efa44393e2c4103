//! `ferry copy` between every kind of endpoint, through the real binary and real peers: each
//! result is compared byte for byte with the sample image, and where the destination can be
//! sparse its allocated bytes (st_blocks, a qcow2 map, nbdkit's map) are checked too, so a copy
//! that writes every zero as data fails even though its contents are right.

mod common;

use std::fs::File;
use std::path::Path;

use common::*;
use testutil::tools::{nbdcopy_read, nbdinfo_map, qemu_img, qemu_img_map};
use testutil::{Nbdkit, QemuNbd};

/// A sparse file of `size` bytes for a server to export as a destination.
fn empty_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

#[test]
fn file_to_file() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    ferry(["copy".as_ref(), src.as_os_str(), dst.as_os_str()])
        .run()
        .expect_ok();
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn file_to_existing_larger_file_truncates_to_the_source_size() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    // An old, larger, fully written destination: the copy replaces it entirely.
    std::fs::write(&dst, vec![0x5au8; (layout.size() + MIB) as usize]).unwrap();
    ferry(["copy".as_ref(), src.as_os_str(), dst.as_os_str()])
        .run()
        .expect_ok();
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn file_to_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    empty_image(&dst, layout.size());
    // --discard=unmap: zero requests may punch holes, as a sparse destination needs.
    let server = QemuNbd::new(&dst).discard().start();
    ferry(["copy", src.to_str().unwrap(), &server.nbd_uri()])
        .run()
        .expect_ok();
    drop(server);
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn file_to_nbdkit_memory() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = Nbdkit::new("memory")
        .arg(&format!("size={}", layout.size()))
        .start();
    let uri = server.nbd_uri();
    ferry(["copy", src.to_str().unwrap(), &uri])
        .run()
        .expect_ok();
    // Read back with an independent client.
    let back = nbdcopy_read(&uri, dir.path());
    assert_same_bytes(
        &back,
        &layout.expected(),
        "nbdkit memory read back by nbdcopy",
    );
    let stored = allocated_in_map(&nbdinfo_map(&uri, None));
    let data = data_bytes(&layout);
    assert!(
        stored <= data + SPARSE_SLACK,
        "nbdkit memory holds {stored} bytes of data after the copy; the source has {data}"
    );
}

#[test]
fn qemu_nbd_to_file() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = QemuNbd::new(&src).read_only().start();
    let dst = dir.path().join("dst.raw");
    ferry(["copy", &server.nbd_uri(), dst.to_str().unwrap()])
        .run()
        .expect_ok();
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn qemu_nbd_to_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    empty_image(&dst, layout.size());
    let source = QemuNbd::new(&src).read_only().start();
    let destination = QemuNbd::new(&dst).discard().start();
    ferry(["copy", &source.nbd_uri(), &destination.nbd_uri()])
        .run()
        .expect_ok();
    drop(destination);
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn nbdkit_file_to_nbdkit_memory() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let source = Nbdkit::new("file")
        .arg(&format!("file={}", src.display()))
        .read_only()
        .start();
    let destination = Nbdkit::new("memory")
        .arg(&format!("size={}", layout.size()))
        .start();
    let uri = destination.nbd_uri();
    ferry(["copy", &source.nbd_uri(), &uri]).run().expect_ok();
    let back = nbdcopy_read(&uri, dir.path());
    assert_same_bytes(
        &back,
        &layout.expected(),
        "nbdkit memory read back by nbdcopy",
    );
    let stored = allocated_in_map(&nbdinfo_map(&uri, None));
    assert!(
        stored <= data_bytes(&layout) + SPARSE_SLACK,
        "{stored} bytes stored"
    );
}

#[test]
fn qcow2_source_through_socket_activated_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "src.raw");
    let qcow2 = dir.path().join("src.qcow2");
    testutil::image::convert_to_qcow2(&raw, &qcow2);
    let dst = dir.path().join("dst.raw");
    let q = qcow2.to_str().unwrap();
    // ferry's private socket directory goes here, to check it is removed.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    ferry([
        "copy",
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        q,
        "]",
        dst.to_str().unwrap(),
    ])
    .env("TMPDIR", &tmp)
    .run()
    .expect_ok();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "ferry left {left:?} behind");
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
    assert!(
        !process_with_arg(qcow2.as_os_str()),
        "the qemu-nbd ferry started for {q} is still running"
    );
}

#[test]
fn qcow2_destination_through_socket_activated_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let qcow2 = dir.path().join("dst.qcow2");
    let q = qcow2.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", q, &layout.size().to_string()]);
    ferry([
        "copy",
        src.to_str().unwrap(),
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        q,
        "]",
    ])
    .run()
    .expect_ok();
    assert!(
        !process_with_arg(qcow2.as_os_str()),
        "the qemu-nbd ferry started for {q} is still running"
    );
    let back = dir.path().join("back.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "qcow2",
        "-O",
        "raw",
        q,
        back.to_str().unwrap(),
    ]);
    assert_file_matches(&back, &layout);
    // Sparse in the qcow2 sense: only the data runs have data clusters.
    let data_clusters: u64 = qemu_img_map(q, "qcow2")
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum();
    let data = data_bytes(&layout);
    assert!(
        data_clusters <= data + SPARSE_SLACK,
        "{q} has {data_clusters} bytes of data clusters; the source has {data}"
    );
    assert!(
        allocated(&qcow2) <= data + 4 * SPARSE_SLACK,
        "{q} allocates {} bytes for {data} bytes of data",
        allocated(&qcow2)
    );
}

#[test]
fn stdin_pipe_to_file() {
    let dir = testutil::temp_dir();
    let layout = sample_layout();
    let dst = dir.path().join("dst.raw");
    // A real pipe: no size, no seeking, no extents.
    ferry(["copy", "-", dst.to_str().unwrap()])
        .stdin_bytes(layout.expected())
        .run()
        .expect_ok();
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn stdin_redirected_from_a_file_to_file() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    ferry(["copy", "-", dst.to_str().unwrap()])
        .stdin_file(File::open(&src).unwrap())
        .run()
        .expect_ok();
    assert_file_matches(&dst, &layout);
    assert_sparse(&dst, &layout);
}

#[test]
fn file_to_stdout_pipe() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let run = ferry(["copy", src.to_str().unwrap(), "-"]).run();
    run.expect_ok();
    // Holes arrive as zero bytes, in order, and nothing else is printed on stdout.
    assert_same_bytes(&run.stdout, &layout.expected(), "ferry's stdout");
}

#[test]
fn qemu_nbd_to_stdout_pipe() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = QemuNbd::new(&src).read_only().start();
    let run = ferry(["copy", &server.nbd_uri(), "-"]).run();
    run.expect_ok();
    assert_same_bytes(&run.stdout, &layout.expected(), "ferry's stdout");
}

#[test]
fn nbd_to_null_reads_every_data_byte() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let log = dir.path().join("nbdkit.log");
    let server = Nbdkit::new("file")
        .filter("log")
        .arg(&format!("file={}", src.display()))
        .arg(&format!("logfile={}", log.display()))
        .read_only()
        .start();
    let run = ferry(["copy", &server.nbd_uri(), "null:"]).run();
    run.expect_ok();
    assert!(
        run.stdout.is_empty(),
        "null: printed {} bytes",
        run.stdout.len()
    );
    drop(server);
    let log = read_log(&log);
    // Every data run of the source was read (extents let the holes be skipped).
    let mut covered = vec![false; layout.size() as usize];
    for r in logged(&log, "Read") {
        covered[r.offset as usize..(r.offset + r.count) as usize].fill(true);
    }
    for (offset, segment) in layout.placed() {
        if matches!(segment, testutil::Segment::Data { .. }) {
            let range = offset as usize..(offset + segment.len()) as usize;
            assert!(
                covered[range.clone()].iter().all(|c| *c),
                "data at {range:?} was never read:\n{log}"
            );
        }
    }
}

#[test]
fn failing_source_into_null_fails() {
    // null: discards what it gets, but the copy still reads the source and reports its errors.
    let server = Nbdkit::new("pattern")
        .filter("error")
        .args(&["size=4M", "error-pread=EIO", "error-pread-rate=100%"])
        .start();
    // EIO is retried (storage blips): one retry keeps the test short.
    let run = ferry(["copy", "--retries=1", &server.nbd_uri(), "null:"]).run();
    let stderr = run.expect_code(1);
    assert!(
        stderr.contains(&format!("read from {}", server.nbd_uri())) && stderr.contains("EIO"),
        "{stderr}"
    );
    assert!(stderr.contains("(after 2 attempts)"), "{stderr}");
}

/// More pipelines × requests than the single NBD connection has slots, with block-status calls
/// on the destination between writes: requests granted a slot but not yet polled must not
/// starve those calls (`ferry demo`'s qcow2 step hung that way; scripts/test runs the demo).
/// The run's timeout turns a hang into a failure.
#[test]
fn many_pipelines_into_one_nbd_connection_do_not_deadlock() {
    let dir = testutil::temp_dir();
    // Many data runs between holes: many block-status calls on the destination while writes
    // queue up behind the connection's slots.
    let mut layout = testutil::Layout::new();
    for i in 0..48 {
        layout = layout.data(3 << 20, i).hole(1 << 20);
    }
    let src = dir.path().join("src.raw");
    testutil::make_sparse_image(&src, &layout);
    let qcow2 = dir.path().join("dst.qcow2");
    let q = qcow2.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", q, &layout.size().to_string()]);
    ferry([
        "copy",
        "-T",
        "8",
        "-C",
        "8",
        "-R",
        "64",
        src.to_str().unwrap(),
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        q,
        "]",
    ])
    .run()
    .expect_ok();
    let back = dir.path().join("back.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "qcow2",
        "-O",
        "raw",
        q,
        back.to_str().unwrap(),
    ]);
    assert_file_matches(&back, &layout);
}

/// `xzcat disk.raw.xz | ferry copy - nbd://…`: a stream into an NBD export. The work range of a
/// stream reaches past the export's end, and asking the destination's extents for all of it
/// used to fail the copy ("goes past the end of the export").
#[test]
fn stdin_pipe_to_nbdkit_memory() {
    let dir = testutil::temp_dir();
    for size in [64u64 << 20, 65 << 20] {
        let image: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
        let server = Nbdkit::new("memory").arg(&format!("size={size}")).start();
        let uri = server.nbd_uri();
        ferry(["copy", "-", &uri])
            .stdin_bytes(image.clone())
            .run()
            .expect_ok();
        let back = nbdcopy_read(&uri, dir.path());
        assert_same_bytes(&back, &image, "a stream copied into nbdkit memory");
    }
}

/// A stream longer than the export it is copied into fails, naming the destination.
#[test]
fn stdin_pipe_longer_than_the_nbd_export_fails() {
    let server = Nbdkit::new("memory").arg("size=1M").start();
    let run = ferry(["copy", "-", &server.nbd_uri()])
        .stdin_bytes(vec![7u8; 2 << 20])
        .run();
    let err = run.expect_code(1);
    assert!(err.contains(&server.nbd_uri()), "{err}");
}
