//! Shared pieces of the interoperability tests against real peers (qemu-nbd, nbdkit,
//! nbd-server): connection options from a peer's URI, the header modes every feature is tried
//! in, sample image layouts, and comparisons with independent tools.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbd::client::StatusExtent;
use nbd::proto::HeaderMode;
use nbd::uri::NbdUri;
use nbd::{Client, ConnectOptions, Error};
use testutil::{Layout, MapExtent, Peer};

/// Every test body runs under this guard, so a hang fails the test instead of the suite.
pub const GUARD: Duration = Duration::from_secs(30);
/// The client's own stall timeout in these tests.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Runs `fut`, failing the test if it takes longer than [`GUARD`].
pub async fn guarded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {GUARD:?}"))
}

/// The three header layouts a client can end up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    /// EXTENDED_HEADERS requested (the default).
    Extended,
    /// Structured replies with compact headers (`extended_headers = false`).
    Compact,
    /// Simple replies only (`structured_replies = false, extended_headers = false`).
    Simple,
}

pub const ALL_HEADERS: [Headers; 3] = [Headers::Extended, Headers::Compact, Headers::Simple];

impl Headers {
    pub fn apply(self, opts: &mut ConnectOptions) {
        let (structured, extended) = match self {
            Headers::Extended => (true, true),
            Headers::Compact => (true, false),
            Headers::Simple => (false, false),
        };
        opts.settings.structured_replies = structured;
        opts.settings.extended_headers = extended;
    }

    /// The mode a server that supports everything ends up in.
    pub fn full_mode(self) -> HeaderMode {
        match self {
            Headers::Extended => HeaderMode::Extended,
            Headers::Compact => HeaderMode::Structured,
            Headers::Simple => HeaderMode::Simple,
        }
    }
}

/// Options for `uri` (parsed with [`NbdUri`]) with a short stall timeout.
pub fn opts(uri: &str) -> ConnectOptions {
    let parsed: NbdUri = uri
        .parse()
        .unwrap_or_else(|e| panic!("peer URI {uri} does not parse: {e}"));
    let mut o = ConnectOptions::from_uri(&parsed);
    o.settings.timeout = CLIENT_TIMEOUT;
    o
}

/// Options for the peer's default export in `headers` mode, selecting `contexts`.
pub fn peer_opts(peer: &Peer, headers: Headers, contexts: &[&str]) -> ConnectOptions {
    let mut o = opts(&peer.nbd_uri());
    headers.apply(&mut o);
    o.settings.meta_contexts = contexts.iter().map(|c| c.to_string()).collect();
    o
}

/// One connection to the peer's default export.
pub async fn connect(peer: &Peer, headers: Headers, contexts: &[&str]) -> Client {
    let o = peer_opts(peer, headers, contexts);
    Client::connect(&o, 1).await.unwrap_or_else(|e| {
        panic!(
            "connecting to {} ({headers:?}): {e}\nserver log:\n{}",
            peer.nbd_uri(),
            peer.log()
        )
    })
}

/// A mixed image of 6 MiB: data, holes and explicit zero runs, all 64 KiB aligned so raw and
/// qcow2 exports report the same boundaries.
pub fn mixed_layout() -> Layout {
    Layout::new()
        .data(MIB, 1)
        .hole(2 * MIB)
        .zero(256 * KIB)
        .data(320 * KIB, 2)
        .hole(MIB)
        .data(64 * KIB, 3)
        .hole(1472 * KIB)
}

/// A 36 MiB image: reading it whole needs more than one 32 MiB request.
pub fn big_layout() -> Layout {
    Layout::new()
        .data(MIB, 4)
        .hole(30 * MIB)
        .data(3 * MIB, 5)
        .hole(2 * MIB)
}

/// Writes `layout` as raw (and as qcow2 if `format` is "qcow2") in `dir`; returns the image the
/// server should serve.
pub fn image(dir: &Path, layout: &Layout, format: &str) -> PathBuf {
    let raw = dir.join("image.raw");
    testutil::make_sparse_image(&raw, layout);
    match format {
        "raw" => raw,
        "qcow2" => {
            let q = dir.join("image.qcow2");
            testutil::image::convert_to_qcow2(&raw, &q);
            q
        }
        other => panic!("unknown image format {other}"),
    }
}

/// Ranges that start and end off any 512-byte or 4 KiB boundary, and ranges that straddle
/// the layout's run boundaries.
pub fn odd_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![
        (0, 1),
        (1, 4095),
        (4095, 2),
        (12345, 67891),
        (MIB - 1000, 5000),
        (3 * MIB - 7, 300 * KIB + 13),
        (size - 1, 1),
        (size - 100_000, 100_000),
    ];
    ranges.retain(|(o, l)| o + l <= size);
    ranges
}

/// Reads every range in `ranges` and compares with `expected`.
pub async fn check_reads(client: &Client, expected: &[u8], ranges: &[(u64, u64)]) {
    for &(offset, length) in ranges {
        let got = client
            .read(offset, length)
            .await
            .unwrap_or_else(|e| panic!("read at {offset} length {length}: {e}"));
        let want = &expected[offset as usize..(offset + length) as usize];
        assert_eq!(
            got.len() as u64,
            length,
            "read at {offset} returned {} bytes",
            got.len()
        );
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "read at {offset} length {length} differs first at byte {}",
                offset + first as u64
            );
        }
    }
}

/// Asserts two byte slices are equal, naming the first difference instead of dumping them.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// The client's extents in the form the tool helpers use.
pub fn as_map(extents: &[StatusExtent]) -> Vec<MapExtent> {
    extents
        .iter()
        .map(|e| MapExtent {
            offset: e.offset,
            length: e.length,
            flags: e.flags,
        })
        .collect()
}

/// Asserts extents tile [0, size) without gaps.
pub fn assert_tiles(extents: &[StatusExtent], size: u64) {
    let mut pos = 0;
    for e in extents {
        assert_eq!(e.offset, pos, "extents leave a gap or overlap: {extents:?}");
        assert!(e.length > 0, "empty extent in {extents:?}");
        pos += e.length;
    }
    assert_eq!(pos, size, "extents do not cover the export: {extents:?}");
}

/// The flags of the extent covering `offset`.
pub fn flags_at(extents: &[StatusExtent], offset: u64) -> u64 {
    extents
        .iter()
        .find(|e| e.offset <= offset && offset < e.offset + e.length)
        .unwrap_or_else(|| panic!("no extent covers {offset}: {extents:?}"))
        .flags
}

/// Asserts `err` is a failed command with `errno` for exactly [offset, offset+length).
pub fn assert_command_error(err: &Error, command: u16, errno: u32, offset: u64, length: u64) {
    match err {
        Error::Command {
            command: c,
            offset: o,
            length: l,
            errno: e,
            ..
        } => {
            assert_eq!(
                (*c, *e, *o, *l),
                (command, errno, offset, length),
                "unexpected command error: {err}"
            );
            assert!(
                !err.is_fatal(),
                "a command error must leave the connection usable"
            );
        }
        other => panic!("expected a command error with errno {errno}, got {other:?} ({other})"),
    }
}
