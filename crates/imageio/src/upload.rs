//! How an imageio upload turns the engine's ordered segments into requests ([`RunSink`]): each
//! contiguous run of data becomes one `PUT ?flush=n` of its pieces, sent once the run has ended (at
//! a long zero gap or a break) or grown to the commit size; long zero runs become zero
//! requests (`PATCH zero`); short zero runs between data travel inside the PUT as zero bytes,
//! since ending the PUT there would cost two requests to save less than they cost. All the
//! tuning of uploads lives here, not in the engine.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use disk::sink::{Body, Done, Permit, Segment, Sink, SinkOptions, zero_request};
use disk::{BoxFut, DiskError, Endpoint};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::stream::RunWriter;

/// A run is sent once this much of it has gathered, without waiting for its end.
const COMMIT: u64 = 8 << 20;
/// The smallest commit size, whatever the engine's window.
const MIN_COMMIT: u64 = 64 << 10;
/// Zero runs inside streamed data shorter than this are sent as zero bytes: a shorter gap would
/// cost two requests (a zero request and a new PUT) to save less than it costs to send.
pub(crate) const MIN_GAP: u64 = 256 << 10;

/// One pipeline's upload: segments gather until a run can be sent as one PUT.
pub(crate) struct RunSink<'a> {
    endpoint: &'a dyn Endpoint,
    writer: Option<RunWriter>,
    allocate: bool,
    /// Segments waiting for their run to end; zero segments merged with their neighbours.
    pending: VecDeque<Segment>,
    inflight: FuturesUnordered<BoxFut<'a, Done>>,
    commit: u64,
}

impl<'a> RunSink<'a> {
    pub(crate) fn new(endpoint: &'a dyn Endpoint, writer: RunWriter, opts: &SinkOptions) -> Self {
        RunSink {
            endpoint,
            writer: Some(writer),
            allocate: opts.allocate,
            pending: VecDeque::new(),
            inflight: FuturesUnordered::new(),
            // Half the engine's window at most, so the next run's reads can gather meanwhile.
            commit: COMMIT.min(opts.window / 2).max(MIN_COMMIT),
        }
    }

    fn send_zero(&mut self, seg: Segment) {
        let len = seg.len();
        let zero = zero_request(self.endpoint, seg.offset, len, self.allocate, seg.permit);
        self.inflight.push(zero);
    }

    /// Sends what is ready: zero runs as zero requests, and each run of contiguous data as
    /// one PUT once it has ended or reached the commit size; with `flush`, everything now.
    fn form_requests(&mut self, flush: bool) {
        loop {
            while self.pending.front().is_some_and(Segment::is_zero) {
                // A zero run at the end may still grow with the next segment.
                if self.pending.len() == 1 && !flush {
                    return;
                }
                let seg = self.pending.pop_front().expect("front");
                self.send_zero(seg);
            }
            let Some(first) = self.pending.front() else {
                return;
            };
            let start = first.offset;
            let mut end = start;
            let mut count = 0;
            let mut ended = false;
            let last = self.pending.len() - 1;
            for (i, seg) in self.pending.iter().enumerate() {
                if seg.offset != end {
                    ended = true;
                    break;
                }
                if seg.is_zero() {
                    // A long zero run ends the PUT; one at the end may still grow: wait for
                    // the next segment unless flushing.
                    if seg.len() >= MIN_GAP || (i == last && flush) {
                        ended = true;
                        break;
                    }
                    if i == last {
                        break;
                    }
                }
                end += seg.len();
                count += 1;
            }
            if !(ended || flush || end - start >= self.commit) {
                return;
            }
            let Some(writer) = self.writer.as_mut() else {
                return;
            };
            let mut permit = Permit::none();
            let mut pieces = Vec::with_capacity(count);
            for seg in self.pending.drain(..count) {
                pieces.push(match seg.body {
                    Body::Data(data) => data,
                    // Zero bytes come from shared memory.
                    Body::Zero(n) => disk::endpoint::zero_bytes(n as usize),
                });
                permit.merge(seg.permit);
            }
            let put = writer.send(start, pieces, permit);
            let written = end - start;
            self.inflight.push(Box::pin(async move {
                put.await?;
                Ok(Done {
                    offset: start,
                    written,
                    zeroed: 0,
                })
            }));
        }
    }
}

impl Sink for RunSink<'_> {
    fn push(&mut self, seg: Segment) {
        if seg.is_empty() || self.writer.is_none() {
            return;
        }
        if let (Body::Zero(n), Some(last)) = (&seg.body, self.pending.back_mut())
            && last.end() == seg.offset
            && let Body::Zero(m) = &mut last.body
        {
            *m += n;
            last.permit.merge(seg.permit);
            return;
        }
        self.pending.push_back(seg);
        self.form_requests(false);
    }

    fn idle(&mut self) {
        self.form_requests(true);
    }

    fn cancel(&mut self) {
        // An unfinished run is abandoned: its PUT fails instead of waiting for data that will
        // not come, and what was held back is released.
        self.pending.clear();
        if let Some(writer) = self.writer.take() {
            writer.abandon();
        }
    }

    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Done, DiskError>>> {
        self.inflight.poll_next_unpin(cx)
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.inflight.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}
