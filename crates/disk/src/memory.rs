//! [`MemoryEndpoint`]: an image held in memory, for testing what drives endpoints (the copy
//! engine above all) in milliseconds and without peers. Its capabilities are whatever the test
//! sets; its requests complete after a pseudo-random number of scheduler turns, so their order
//! varies from run to run of a seed; it can cut reads short and fail requests of a chosen kind
//! at chosen offsets; and it records every request, the bytes in flight (on a [`Meter`] that
//! source and destination can share), and any request that reached outside the image.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op};
use crate::extents::{Extent, clip, merge_adjacent};

/// One request as the endpoint saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
}

/// A planted failure: requests of `op` covering byte `offset` fail with `kind`, `times` times.
#[derive(Debug, Clone)]
pub struct Fault {
    pub op: Op,
    pub offset: u64,
    pub kind: ErrorKind,
    pub times: usize,
}

/// Bytes of data in flight across endpoints that share it: reads from issue to completion,
/// writes while they run.
#[derive(Debug, Default)]
pub struct Meter {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Meter {
    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::SeqCst);
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Holds `n` bytes on the meter until dropped (a request abandoned mid-flight included).
struct Held<'a>(&'a Meter, u64);

impl<'a> Held<'a> {
    fn new(meter: &'a Meter, n: u64) -> Self {
        meter.add(n);
        Held(meter, n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.sub(self.1);
    }
}

pub struct MemoryEndpoint {
    name: String,
    caps: Caps,
    data: Mutex<Vec<u8>>,
    /// What `extents` reports; `None` derives nothing (one data extent).
    extents: Option<Vec<Extent>>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<Request>>,
    /// Requests that reached outside the image.
    outside: Mutex<Vec<Request>>,
    meter: Arc<Meter>,
    /// Reads return at most this many bytes (short reads); `None` for whole reads.
    short_reads: Option<u64>,
    /// Scheduler turns a request may wait before completing: 0 completes at once.
    max_turns: u64,
    seed: AtomicU64,
}

impl MemoryEndpoint {
    /// An endpoint holding `data`, with `caps` (whose size is set to the data's length).
    pub fn new(name: &str, data: Vec<u8>, mut caps: Caps) -> MemoryEndpoint {
        caps.size = Some(data.len() as u64);
        MemoryEndpoint {
            name: name.to_string(),
            caps,
            data: Mutex::new(data),
            extents: None,
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            outside: Mutex::new(Vec::new()),
            meter: Arc::new(Meter::default()),
            short_reads: None,
            max_turns: 0,
            seed: AtomicU64::new(1),
        }
    }

    /// Reports `extents` (which must cover the image) from `extents`, and sets `caps.extents`.
    pub fn with_extents(mut self, mut extents: Vec<Extent>) -> Self {
        merge_adjacent(&mut extents);
        self.extents = Some(extents);
        self.caps.extents = true;
        self
    }

    /// Requests wait up to `max_turns` scheduler turns, chosen pseudo-randomly from `seed`.
    pub fn with_latency(mut self, max_turns: u64, seed: u64) -> Self {
        self.max_turns = max_turns;
        self.seed = AtomicU64::new(seed | 1);
        self
    }

    pub fn with_meter(mut self, meter: Arc<Meter>) -> Self {
        self.meter = meter;
        self
    }

    /// Reads return at most `n` bytes.
    pub fn with_short_reads(mut self, n: u64) -> Self {
        self.short_reads = Some(n);
        self
    }

    pub fn fail(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn outside(&self) -> Vec<Request> {
        self.outside
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    /// xorshift: cheap, deterministic per seed, good enough to vary completion order.
    fn turns(&self) -> u64 {
        if self.max_turns == 0 {
            return 0;
        }
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x % (self.max_turns + 1)
    }

    /// Logs the request, waits its turns, and fails it if a fault is planted on it or it
    /// reaches outside the image.
    async fn begin(&self, op: Op, offset: u64, len: u64) -> Result<(), DiskError> {
        let req = Request { op, offset, len };
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(req);
        for _ in 0..self.turns() {
            tokio::task::yield_now().await;
        }
        let size = self.caps.size.unwrap_or(0);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            self.outside
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(req);
            return Err(DiskError::new(
                &self.name,
                op,
                ErrorKind::InvalidRequest,
                format!("beyond the end of the image ({size} bytes)"),
            )
            .at(offset, len));
        }
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = faults.iter_mut().find(|f| {
            f.op == op && f.times > 0 && f.offset >= offset && f.offset < offset + len.max(1)
        }) {
            f.times -= 1;
            return Err(DiskError::new(&self.name, op, f.kind, "planted fault").at(offset, len));
        }
        Ok(())
    }
}

impl Endpoint for MemoryEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(async move {
            let _held = Held::new(&self.meter, len);
            self.begin(Op::Read, offset, len).await?;
            let n = self.short_reads.map_or(len, |max| len.min(max));
            let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
            Ok(Bytes::copy_from_slice(
                &data[offset as usize..(offset + n) as usize],
            ))
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let _held = Held::new(&self.meter, len);
            self.begin(Op::Write, offset, len).await?;
            if self.caps.read_only {
                return Err(DiskError::new(
                    &self.name,
                    Op::Write,
                    ErrorKind::ReadOnly,
                    "read-only",
                )
                .at(offset, len));
            }
            let mut image = self.data.lock().unwrap_or_else(|p| p.into_inner());
            image[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            Ok(())
        })
    }

    fn zero(&self, offset: u64, len: u64, _allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.begin(Op::Zero, offset, len).await?;
            let mut image = self.data.lock().unwrap_or_else(|p| p.into_inner());
            image[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        Box::pin(async move {
            self.begin(Op::Extents, offset, len).await?;
            Ok(match &self.extents {
                Some(all) => clip(all, offset, len),
                None => vec![Extent::data(offset, len)],
            })
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move { self.begin(Op::Flush, 0, 0).await })
    }
}
