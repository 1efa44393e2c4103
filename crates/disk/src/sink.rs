//! The write half of the engine ↔ endpoint contract, and the budget that bounds it.
//!
//! The copy engine hands each pipeline's [`Sink`] an ordered stream of [`Segment`]s — data
//! it read, or ranges to zero — and the destination decides how to turn them into requests:
//! [`RequestSink`] (every endpoint's default) sends each data segment as writes of the
//! destination's request size and each zero segment as one zero request; an HTTP endpoint
//! gathers segments into one long PUT per data run instead.
//!
//! Memory is bounded by a per-pipeline [`Budget`]. Every read takes a [`Permit`] for its bytes
//! and one request slot; the permit moves with the data into the segment and into the request
//! that sends it, and is released when that request is dropped — done, failed or abandoned.
//! No path can leak the budget or release it twice, because no path counts it by hand.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::endpoint::{BoxFut, DiskError, Endpoint};

/// The in-flight bound of one pipeline: bytes of data held, and requests outstanding.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    ops: Arc<Semaphore>,
    bytes_limit: u64,
    ops_limit: usize,
}

/// The largest byte budget a pipeline can have (semaphores count in `u32` steps).
pub const MAX_BUDGET_BYTES: u64 = u32::MAX as u64;

impl Budget {
    /// A budget of `bytes` (clamped to [`MAX_BUDGET_BYTES`]) and `ops` requests (at least 1).
    pub fn new(bytes: u64, ops: usize) -> Budget {
        let bytes_limit = bytes.min(MAX_BUDGET_BYTES);
        let ops_limit = ops.max(1);
        Budget {
            bytes: Arc::new(Semaphore::new(bytes_limit as usize)),
            ops: Arc::new(Semaphore::new(ops_limit)),
            bytes_limit,
            ops_limit,
        }
    }

    /// A permit for `bytes` and one request, if both are free now. Asking for more bytes
    /// than the whole budget is asking for the whole budget.
    pub fn try_take(&self, bytes: u64) -> Option<Permit> {
        let want = bytes.min(self.bytes_limit) as u32;
        let ops = self.ops.clone().try_acquire_owned().ok()?;
        let bytes = self.bytes.clone().try_acquire_many_owned(want).ok()?;
        Some(Permit {
            bytes: Some(bytes),
            ops: Some(ops),
        })
    }

    /// Bytes held by permits now.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_limit - self.bytes.available_permits() as u64
    }

    /// Requests held by permits now.
    pub fn ops_in_flight(&self) -> usize {
        self.ops_limit - self.ops.available_permits()
    }

    pub fn bytes_limit(&self) -> u64 {
        self.bytes_limit
    }
}

/// A share of a [`Budget`], released when dropped.
#[derive(Debug, Default)]
pub struct Permit {
    bytes: Option<OwnedSemaphorePermit>,
    ops: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// A permit holding nothing (segments that cost no memory, tests).
    pub fn none() -> Permit {
        Permit::default()
    }

    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.bytes.as_ref().map_or(0, |p| p.num_permits() as u64)
    }

    /// Moves `n` of this permit's bytes (all it has, if fewer) into a new permit, which holds
    /// no request slot: the slot stays with the original.
    pub fn split_bytes(&mut self, n: u64) -> Permit {
        let n = n.min(self.bytes()) as usize;
        Permit {
            bytes: self.bytes.as_mut().and_then(|p| p.split(n)),
            ops: None,
        }
    }

    /// Releases `n` of this permit's bytes now (data that turned out to need no memory).
    pub fn release_bytes(&mut self, n: u64) {
        drop(self.split_bytes(n));
    }

    /// Takes over everything `other` holds.
    pub fn merge(&mut self, other: Permit) {
        fn join(into: &mut Option<OwnedSemaphorePermit>, from: Option<OwnedSemaphorePermit>) {
            match (into.as_mut(), from) {
                (Some(a), Some(b)) => a.merge(b),
                (None, b) => *into = b,
                (Some(_), None) => {}
            }
        }
        join(&mut self.bytes, other.bytes);
        join(&mut self.ops, other.ops);
    }
}

/// What a segment asks the destination to hold.
#[derive(Debug, Clone)]
pub enum Body {
    /// These bytes.
    Data(Bytes),
    /// This many zero bytes (never sent as bytes where the destination can zero).
    Zero(u64),
}

/// One piece of a pipeline's ordered output: `body` at `offset`, with the budget it holds.
#[derive(Debug)]
pub struct Segment {
    pub offset: u64,
    pub body: Body,
    pub permit: Permit,
}

impl Segment {
    pub fn data(offset: u64, data: Bytes, permit: Permit) -> Segment {
        Segment {
            offset,
            body: Body::Data(data),
            permit,
        }
    }

    pub fn zero(offset: u64, len: u64, permit: Permit) -> Segment {
        Segment {
            offset,
            body: Body::Zero(len),
            permit,
        }
    }

    pub fn len(&self) -> u64 {
        match &self.body {
            Body::Data(d) => d.len() as u64,
            Body::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len()
    }

    pub fn is_zero(&self) -> bool {
        matches!(self.body, Body::Zero(_))
    }
}

/// What one completed destination request did: the range it made hold what the source holds,
/// and how (every request is either data or zeroes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub offset: u64,
    /// Bytes written as data (zero bytes sent inside a data run count here).
    pub written: u64,
    /// Bytes zeroed by zero requests.
    pub zeroed: u64,
}

impl Done {
    /// The range this request completed.
    pub fn range(&self) -> (u64, u64) {
        (self.offset, self.offset + self.written + self.zeroed)
    }
}

/// How the engine will use a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkOptions {
    /// Largest write request.
    pub request: u64,
    /// Zeroed ranges stay allocated (`--allocated`).
    pub allocate: bool,
    /// Bytes the engine may have in flight in this pipeline: a sink that holds segments back
    /// to gather them must send before it holds more than half of this, or the engine stalls.
    pub window: u64,
}

/// One pipeline's writer. Segments arrive in strictly increasing offset order; the sink turns
/// them into requests, which the engine drives by polling [`Sink::poll_done`] (on the
/// engine's own task: no hand-off per request).
pub trait Sink: Send {
    /// Queues the next segment. Never waits: the engine bounds what is queued with permits.
    fn push(&mut self, segment: Segment);
    /// Nothing more arrives until queued work completes: send anything held back now.
    fn idle(&mut self);
    /// Drops segments held back and not yet sent (the copy stopped); requests already sent
    /// still complete through [`Sink::poll_done`], so the destination ends in a known state.
    fn cancel(&mut self);
    /// The next completed request; `Ready(None)` once nothing is queued or in flight.
    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Done, DiskError>>>;
    /// True when nothing is held back, queued or in flight.
    fn is_empty(&self) -> bool;
    /// Requests sent and not yet complete (the engine keeps it within the endpoint's
    /// `queue_depth`).
    fn in_flight(&self) -> usize;
}

/// Waits for a sink's next completion.
pub async fn next_done(sink: &mut (dyn Sink + '_)) -> Option<Result<Done, DiskError>> {
    std::future::poll_fn(|cx| sink.poll_done(cx)).await
}

/// One zero request holding `permit` until it is done: the zero segment of every sink.
pub fn zero_request<'a>(
    ep: &'a dyn Endpoint,
    offset: u64,
    len: u64,
    allocate: bool,
    permit: Permit,
) -> BoxFut<'a, Done> {
    Box::pin(async move {
        ep.zero(offset, len, allocate).await?;
        drop(permit);
        Ok(Done {
            offset,
            written: 0,
            zeroed: len,
        })
    })
}

/// The sink of endpoints that take requests one by one (files, NBD, pipes): each data segment
/// becomes writes of at most the request size, each zero segment one zero request.
pub struct RequestSink<'a> {
    endpoint: &'a dyn Endpoint,
    request: u64,
    allocate: bool,
    inflight: FuturesUnordered<BoxFut<'a, Done>>,
}

impl<'a> RequestSink<'a> {
    pub fn new(endpoint: &'a dyn Endpoint, opts: &SinkOptions) -> RequestSink<'a> {
        RequestSink {
            endpoint,
            request: opts.request.max(1),
            allocate: opts.allocate,
            inflight: FuturesUnordered::new(),
        }
    }
}

impl Sink for RequestSink<'_> {
    fn push(&mut self, mut seg: Segment) {
        let ep = self.endpoint;
        match seg.body {
            Body::Zero(len) => {
                if len == 0 {
                    return;
                }
                let zero = zero_request(ep, seg.offset, len, self.allocate, seg.permit);
                self.inflight.push(zero);
            }
            Body::Data(data) => {
                let step = self.request as usize;
                let mut pos = 0;
                while pos < data.len() {
                    let n = step.min(data.len() - pos);
                    let piece = data.slice(pos..pos + n);
                    // The last piece keeps the rest of the permit, request slot included.
                    let permit = if pos + n < data.len() {
                        seg.permit.split_bytes(n as u64)
                    } else {
                        std::mem::take(&mut seg.permit)
                    };
                    let at = seg.offset + pos as u64;
                    self.inflight.push(Box::pin(async move {
                        ep.write(at, piece).await?;
                        drop(permit);
                        Ok(Done {
                            offset: at,
                            written: n as u64,
                            zeroed: 0,
                        })
                    }));
                    pos += n;
                }
            }
        }
    }

    // Every segment became requests at once: nothing is held back.
    fn idle(&mut self) {}

    fn cancel(&mut self) {}

    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Done, DiskError>>> {
        self.inflight.poll_next_unpin(cx)
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_release_on_drop_and_split_keeps_the_total() {
        let budget = Budget::new(100, 2);
        let mut a = budget.try_take(60).expect("free");
        assert_eq!((budget.bytes_in_flight(), budget.ops_in_flight()), (60, 1));
        assert!(budget.try_take(50).is_none(), "only 40 bytes are left");
        let b = a.split_bytes(25);
        assert_eq!((a.bytes(), b.bytes()), (35, 25));
        assert_eq!(budget.bytes_in_flight(), 60);
        drop(b);
        assert_eq!(budget.bytes_in_flight(), 35);
        a.release_bytes(1000);
        assert_eq!((budget.bytes_in_flight(), budget.ops_in_flight()), (0, 1));
        drop(a);
        assert_eq!((budget.bytes_in_flight(), budget.ops_in_flight()), (0, 0));
    }

    #[test]
    fn request_slots_bound_permits_and_merge_moves_them() {
        let budget = Budget::new(100, 1);
        let a = budget.try_take(10).expect("free");
        assert!(
            budget.try_take(0).is_none(),
            "the one request slot is taken"
        );
        let mut none = Permit::none();
        none.merge(a);
        assert_eq!(budget.ops_in_flight(), 1);
        drop(none);
        assert!(
            budget.try_take(200).is_some(),
            "more than the budget asks for all of it"
        );
    }
}
