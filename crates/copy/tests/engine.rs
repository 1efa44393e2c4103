//! The engine against in-memory endpoints: random layouts, capabilities and options, with the
//! properties every copy must keep. No peer is needed; the whole file runs in seconds.

use std::sync::Arc;

use copy::{Cancel, CopyError, CopyOptions, Job, Progress, Settings};
use disk::memory::{Fault, MemoryEndpoint, Meter};
use disk::{Caps, Endpoint, ErrorKind, Extent, Op};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    /// Zero bytes the source reports as data (a guest wrote zeroes).
    ZeroData,
    Hole,
}

/// A source image: its bytes and the extents it reports.
fn build(layout: &[(u64, Kind)], seed: u64) -> (Vec<u8>, Vec<Extent>) {
    let mut data = Vec::new();
    let mut extents = Vec::new();
    let mut x = seed | 1;
    for &(len, kind) in layout {
        let offset = data.len() as u64;
        match kind {
            Kind::Data => data.extend((0..len).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Never a zero byte, so no block of real data reads as zero.
                (x % 255 + 1) as u8
            })),
            Kind::ZeroData | Kind::Hole => data.resize(data.len() + len as usize, 0),
        }
        extents.push(if kind == Kind::Hole {
            Extent::hole(offset, len)
        } else {
            Extent::data(offset, len)
        });
    }
    (data, extents)
}

fn layout_strategy() -> impl Strategy<Value = Vec<(u64, Kind)>> {
    let kind = prop_oneof![3 => Just(Kind::Data), 1 => Just(Kind::ZeroData), 2 => Just(Kind::Hole)];
    let len = prop_oneof![1 => 1u64..5000, 3 => (1u64..64).prop_map(|b| b * 4096)];
    prop::collection::vec((len, kind), 1..24)
}

#[derive(Debug, Clone)]
struct Scene {
    layout: Vec<(u64, Kind)>,
    seed: u64,
    settings: Settings,
    dst_extents: bool,
    dst_known_zero: bool,
    dst_queue_depth: usize,
    turns: u64,
}

fn scene_strategy() -> impl Strategy<Value = Scene> {
    (
        layout_strategy(),
        any::<u64>(),
        prop_oneof![Just(4096u64), Just(65536), Just(256 << 10)],
        prop_oneof![Just(4096u64), Just(65536), Just(1 << 20)],
        prop_oneof![Just(1usize), Just(2), Just(8), Just(64)],
        1usize..5,
        prop_oneof![Just(256u64 << 10), Just(1 << 20), Just(16 << 20)],
        prop_oneof![Just(0u64), Just(4096), Just(65536)],
        (any::<bool>(), any::<bool>(), any::<bool>()),
        (prop_oneof![Just(1usize), Just(4), Just(64)], 0u64..4),
    )
        .prop_map(
            |(
                layout,
                seed,
                src_req,
                dst_req,
                requests,
                connections,
                queue,
                sparse,
                (allocated, dst_extents, dst_known_zero),
                (dst_queue_depth, turns),
            )| Scene {
                layout,
                seed,
                settings: Settings {
                    src_request: Some(src_req),
                    dst_request: Some(dst_req),
                    requests,
                    connections,
                    threads: connections,
                    queue_bytes: Some(queue),
                    sparse,
                    allocated,
                    ..Settings::default()
                },
                dst_extents,
                dst_known_zero,
                dst_queue_depth,
                turns,
            },
        )
}

struct Endpoints {
    src: Arc<MemoryEndpoint>,
    dst: Arc<MemoryEndpoint>,
    meter: Arc<Meter>,
    image: Vec<u8>,
    extents: Vec<Extent>,
}

fn endpoints(scene: &Scene) -> Endpoints {
    let (image, extents) = build(&scene.layout, scene.seed);
    let meter = Arc::new(Meter::default());
    let src = MemoryEndpoint::new("mem:src", image.clone(), Caps::random_access(0))
        .with_extents(extents.clone())
        .with_latency(scene.turns, scene.seed)
        .with_meter(meter.clone());
    let mut caps = Caps::random_access(0);
    caps.efficient_zero = true;
    // With extents, zeroes are learned from them rather than claimed up front.
    caps.known_zero = scene.dst_known_zero && !scene.dst_extents;
    caps.queue_depth = scene.dst_queue_depth;
    // A destination that starts with garbage unless it knows it reads as zeroes.
    let initial = if scene.dst_known_zero {
        vec![0u8; image.len()]
    } else {
        vec![0xa5u8; image.len()]
    };
    let mut dst = MemoryEndpoint::new("mem:dst", initial, caps)
        .with_latency(scene.turns, scene.seed.rotate_left(17))
        .with_meter(meter.clone());
    if scene.dst_extents {
        // A destination that says where it reads as zero: all of it when it is known to
        // (the engine then asks its extents only where it must), else none of it.
        let len = image.len() as u64;
        dst = dst.with_extents(vec![if scene.dst_known_zero {
            Extent::hole(0, len)
        } else {
            Extent::data(0, len)
        }]);
    }
    Endpoints {
        src: Arc::new(src),
        dst: Arc::new(dst),
        meter,
        image,
        extents,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn run(e: &Endpoints, settings: &Settings) -> Result<copy::Report, CopyError> {
    let size = e.src.caps().size;
    copy::run(
        e.src.clone(),
        e.dst.clone(),
        settings,
        Arc::new(Progress::new(size)),
        Cancel::default(),
    )
    .await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_copy_is_exact_sparse_and_bounded(scene in scene_strategy()) {
        let e = endpoints(&scene);
        let opts = CopyOptions::resolve(e.src.caps(), e.dst.caps(), &scene.settings);
        let report = runtime().block_on(run(&e, &scene.settings));
        let report = report.map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(report.stats.size, e.image.len() as u64);
        prop_assert!(e.dst.contents() == e.image, "destination differs from the source");
        prop_assert!(e.src.outside().is_empty(), "read outside: {:?}", e.src.outside());
        prop_assert!(e.dst.outside().is_empty(), "written outside: {:?}", e.dst.outside());
        // Memory: every pipeline stays within its budget.
        let bound = opts.workers as u64 * opts.queue_bytes;
        prop_assert!(e.meter.peak() <= bound, "{} bytes in flight, bound {}", e.meter.peak(), bound);
        prop_assert_eq!(e.meter.now(), 0);
        // Sparseness: holes are never sent as data, nor zero blocks found in what was read.
        if !scene.settings.allocated {
            for w in e.dst.requests().iter().filter(|r| r.op == Op::Write) {
                for h in e.extents.iter().filter(|x| x.hole) {
                    prop_assert!(
                        w.offset >= h.end() || w.offset + w.len <= h.offset,
                        "write {:?} covers hole {:?}", w, h
                    );
                }
                let block = opts.sparse;
                if block > 0 {
                    let mut b = w.offset.div_ceil(block) * block;
                    while b + block <= w.offset + w.len {
                        let zero = e.image[b as usize..(b + block) as usize].iter().all(|&x| x == 0);
                        prop_assert!(!zero, "write {:?} sends the zero block at {}", w, b);
                        b += block;
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_error_is_reported_with_its_offset_and_nothing_is_left_in_flight(
        scene in scene_strategy(),
        pick in any::<prop::sample::Index>(),
        op in prop_oneof![Just(Op::Read), Just(Op::Write), Just(Op::Zero)],
        kind in prop::sample::select(vec![
            ErrorKind::ConnectionLost, ErrorKind::Timeout, ErrorKind::Protocol,
            ErrorKind::NoSpace, ErrorKind::ReadOnly, ErrorKind::PermissionDenied,
            ErrorKind::NotFound, ErrorKind::InvalidRequest, ErrorKind::Unsupported,
            ErrorKind::Changed, ErrorKind::Io, ErrorKind::Server, ErrorKind::Other,
        ]),
    ) {
        let mut scene = scene;
        // Zero requests are sent only where the destination may hold something else.
        scene.dst_known_zero = false;
        scene.dst_extents = false;
        let e = endpoints(&scene);
        // A byte the planted request surely covers: data for reads and writes, a hole for zeroes.
        let want = if op == Op::Zero { Kind::Hole } else { Kind::Data };
        let candidates: Vec<u64> = e.extents.iter().zip(&scene.layout)
            .filter(|(_, (_, k))| *k == want)
            .map(|(x, _)| x.offset + x.length / 2)
            .collect();
        prop_assume!(!candidates.is_empty());
        let offset = candidates[pick.index(candidates.len())];
        let target = if op == Op::Read { &e.src } else { &e.dst };
        target.fail(Fault { op, offset, kind, times: 1 });
        let err = runtime().block_on(run(&e, &scene.settings)).expect_err("the fault must stop the copy");
        match err {
            CopyError::Disk(d) => {
                prop_assert_eq!(d.kind(), kind);
                prop_assert_eq!(d.op, op);
                let (o, l) = (d.offset.expect("offset"), d.length.expect("length"));
                prop_assert!(o <= offset && offset < o + l.max(1), "{} not in [{}, {})", offset, o, o + l);
                let where_ = format!("at offset {} length {}", o, l);
                prop_assert!(d.to_string().contains(&where_));
            }
            other => prop_assert!(false, "unexpected error {other}"),
        }
        prop_assert_eq!(e.meter.now(), 0, "requests still in flight after the copy returned");
    }
}

#[test]
fn cancelling_drains_every_pipeline() {
    let layout: Vec<(u64, Kind)> = (0..64)
        .map(|i| (64 << 10, if i % 3 == 0 { Kind::Hole } else { Kind::Data }))
        .collect();
    let scene = Scene {
        layout,
        seed: 7,
        settings: Settings {
            src_request: Some(4096),
            connections: 4,
            threads: 4,
            ..Settings::default()
        },
        dst_extents: false,
        dst_known_zero: false,
        dst_queue_depth: 64,
        turns: 3,
    };
    let e = endpoints(&scene);
    let cancel = Cancel::default();
    let progress = Arc::new(Progress::new(e.src.caps().size));
    let result = runtime().block_on(async {
        let copy = copy::run(
            e.src.clone(),
            e.dst.clone(),
            &scene.settings,
            progress.clone(),
            cancel.clone(),
        );
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => break r,
                _ = tokio::task::yield_now() => {
                    if progress.done() > 0 {
                        cancel.cancel();
                    }
                }
            }
        }
    });
    assert!(matches!(result, Err(CopyError::Cancelled)), "{result:?}");
    assert_eq!(e.meter.now(), 0, "requests left in flight");
    assert!(
        progress.done() < e.image.len() as u64,
        "it stopped before the end"
    );
}

#[test]
fn a_short_read_from_a_source_of_known_size_is_an_error() {
    let scene = Scene {
        layout: vec![(1 << 20, Kind::Data)],
        seed: 3,
        settings: Settings::default(),
        dst_extents: false,
        dst_known_zero: true,
        dst_queue_depth: 64,
        turns: 0,
    };
    let mut e = endpoints(&scene);
    let (image, extents) = build(&scene.layout, scene.seed);
    e.src = Arc::new(
        MemoryEndpoint::new("mem:src", image, Caps::random_access(0))
            .with_extents(extents)
            .with_short_reads(1000),
    );
    let err = runtime()
        .block_on(run(&e, &scene.settings))
        .expect_err("short");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("short read: 1000 of"), "{err}");
}

#[test]
fn a_destination_smaller_than_the_source_is_refused_before_any_request() {
    let (image, _) = build(&[(8192, Kind::Data)], 1);
    let src = Arc::new(MemoryEndpoint::new(
        "mem:src",
        image,
        Caps::random_access(0),
    ));
    let dst = Arc::new(MemoryEndpoint::new(
        "mem:dst",
        vec![0; 4096],
        Caps::random_access(0),
    ));
    let job = Job::new(src.clone(), dst.clone());
    let err = runtime()
        .block_on(copy::copy(
            job,
            CopyOptions::default(),
            Arc::new(Progress::new(Some(8192))),
            Cancel::default(),
        ))
        .expect_err("too small");
    assert!(
        matches!(
            err,
            CopyError::DestinationTooSmall {
                src: 8192,
                dst: 4096
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert!(src.requests().is_empty() && dst.requests().is_empty());
}

#[test]
fn verify_finds_a_destination_that_differs() {
    let (image, extents) = build(&[(1 << 20, Kind::Data), (1 << 20, Kind::Hole)], 5);
    let src = Arc::new(
        MemoryEndpoint::new("mem:src", image.clone(), Caps::random_access(0)).with_extents(extents),
    );
    let dst = Arc::new(MemoryEndpoint::new(
        "mem:dst",
        vec![0; image.len()],
        Caps::random_access(0),
    ));
    let settings = Settings {
        verify: true,
        ..Settings::default()
    };
    let e = Endpoints {
        src,
        dst: dst.clone(),
        meter: Arc::new(Meter::default()),
        image,
        extents: Vec::new(),
    };
    let ok = runtime()
        .block_on(run(&e, &settings))
        .expect("identical copy verifies");
    assert!(ok.verified.is_some());
    // A destination that claims to read as zeroes but does not: the copy writes nothing to
    // it, and only the verification can tell.
    let lying = Arc::new(MemoryEndpoint::new("mem:lying", vec![1; e.image.len()], {
        let mut c = Caps::random_access(0);
        c.known_zero = true;
        c
    }));
    let (zeros, zero_extents) = build(&[(2 << 20, Kind::Hole)], 1);
    let zero_src = Arc::new(
        MemoryEndpoint::new("mem:zeros", zeros, Caps::random_access(0)).with_extents(zero_extents),
    );
    let e2 = Endpoints {
        src: zero_src,
        dst: lying,
        meter: Arc::new(Meter::default()),
        image: Vec::new(),
        extents: Vec::new(),
    };
    let err = runtime()
        .block_on(run(&e2, &settings))
        .expect_err("mismatch");
    assert_eq!(err.kind(), ErrorKind::VerifyMismatch, "{err}");
    assert!(
        err.to_string()
            .starts_with("verification failed: the destination mem:lying"),
        "{err}"
    );
}

/// A copy that fails half-way keeps a journal of what it completed; run again with the same
/// journal (the fault gone), it copies only the rest and removes the journal.
#[test]
fn a_failed_copy_resumes_from_its_journal_and_copies_only_the_rest() {
    let layout: Vec<(u64, Kind)> = (0..32)
        .map(|i| (256 << 10, if i % 4 == 3 { Kind::Hole } else { Kind::Data }))
        .collect();
    let (image, extents) = build(&layout, 11);
    let src = Arc::new(
        MemoryEndpoint::new("mem:src", image.clone(), Caps::random_access(0)).with_extents(extents),
    );
    let mut caps = Caps::random_access(0);
    caps.efficient_zero = true;
    caps.flush = true;
    let dst = Arc::new(MemoryEndpoint::new(
        "mem:dst",
        vec![0xa5; image.len()],
        caps,
    ));
    // The fault sits past the middle: the copy stops there, having completed some of the rest.
    let fault_at = 5 << 20;
    dst.fail(Fault {
        op: Op::Write,
        offset: fault_at,
        kind: ErrorKind::NoSpace,
        times: 1,
    });
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("copy.journal");
    let settings = Settings {
        connections: 1,
        threads: 1,
        journal: Some(journal.clone()),
        ..Settings::default()
    };
    let e = Endpoints {
        src: src.clone(),
        dst: dst.clone(),
        meter: Arc::new(Meter::default()),
        image: image.clone(),
        extents: Vec::new(),
    };
    let err = runtime()
        .block_on(run(&e, &settings))
        .expect_err("the fault stops it");
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(journal.exists(), "an interrupted copy keeps its journal");
    let first: u64 = dst
        .requests()
        .iter()
        .filter(|r| r.op == Op::Write)
        .map(|r| r.len)
        .sum();
    let writes_before = dst.requests().len();
    let report = runtime().block_on(run(&e, &settings)).expect("resumed");
    assert!(
        dst.contents() == image,
        "the resumed copy differs from the source"
    );
    assert!(!journal.exists(), "a completed copy removes its journal");
    let again: Vec<_> = dst.requests()[writes_before..]
        .iter()
        .filter(|r| r.op == Op::Write)
        .copied()
        .collect();
    let resent: u64 = again.iter().map(|r| r.len).sum();
    assert!(
        again
            .iter()
            .all(|r| r.offset + r.len > fault_at - (2 << 20)),
        "the resumed copy wrote what the journal recorded: {again:?}"
    );
    assert!(resent < first + (1 << 20), "{resent} bytes written again");
    assert!(report.stats.bytes_skipped > 0);
}

#[test]
fn a_journal_for_another_destination_is_refused() {
    let (image, extents) = build(&[(1 << 20, Kind::Data)], 2);
    let src = Arc::new(
        MemoryEndpoint::new("mem:src", image.clone(), Caps::random_access(0)).with_extents(extents),
    );
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let settings = Settings {
        journal: Some(journal.clone()),
        ..Settings::default()
    };
    let dst = Arc::new(MemoryEndpoint::new(
        "mem:one",
        vec![0; image.len()],
        Caps::random_access(0),
    ));
    // Leave a journal behind: a write that fails for good.
    dst.fail(Fault {
        op: Op::Write,
        offset: 512 << 10,
        kind: ErrorKind::PermissionDenied,
        times: 1,
    });
    let e = Endpoints {
        src: src.clone(),
        dst,
        meter: Arc::new(Meter::default()),
        image: image.clone(),
        extents: Vec::new(),
    };
    runtime().block_on(run(&e, &settings)).expect_err("fails");
    assert!(journal.exists());
    let other = Endpoints {
        src,
        dst: Arc::new(MemoryEndpoint::new(
            "mem:two",
            vec![0; image.len()],
            Caps::random_access(0),
        )),
        meter: Arc::new(Meter::default()),
        image,
        extents: Vec::new(),
    };
    let err = runtime()
        .block_on(run(&other, &settings))
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Changed, "{err}");
    assert!(err.to_string().contains("destination mem:one"), "{err}");
}
