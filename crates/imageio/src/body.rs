//! Request bodies: nothing, one buffer, or a stream of pieces pushed by the copy engine into a
//! channel and handed to hyper in order, with the run's progress published as pieces go out.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use disk::DiskError;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, watch};

/// Where a streamed run stands: bytes handed to the connection (as an absolute offset), and
/// the outcome once the request is over.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    pub handed: u64,
    pub outcome: Option<Result<(), DiskError>>,
}

pub type RunWatch = Arc<watch::Sender<RunState>>;

pub enum ReqBody {
    Empty,
    Full(Option<Bytes>),
    Stream(StreamBody),
}

pub struct StreamBody {
    pub pieces: mpsc::UnboundedReceiver<Bytes>,
    pub remaining: u64,
    pub state: RunWatch,
}

impl ReqBody {
    pub fn full(data: Bytes) -> ReqBody {
        ReqBody::Full(Some(data))
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Stream(s) => {
                if s.remaining == 0 {
                    return Poll::Ready(None);
                }
                match s.pieces.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    // The sender went away before the run was complete: the copy stopped. The
                    // error makes hyper abort the request rather than send a short body.
                    Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::other(
                        "the data stream ended before the run was complete",
                    )))),
                    Poll::Ready(Some(piece)) => {
                        let n = piece.len() as u64;
                        if n > s.remaining {
                            return Poll::Ready(Some(Err(io::Error::other(
                                "more data pushed than the run holds",
                            ))));
                        }
                        s.remaining -= n;
                        s.state.send_modify(|st| st.handed += n);
                        Poll::Ready(Some(Ok(Frame::data(piece))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(data) => data.is_none(),
            ReqBody::Stream(s) => s.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Stream(s) => SizeHint::with_exact(s.remaining),
        }
    }
}
