//! Request bodies: nothing, one buffer, or a run's pieces handed to hyper in order. Bodies are
//! rebuilt from kept buffers for every attempt, so a request can always be sent again.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use disk::Permit;
use hyper::body::{Body, Frame, SizeHint};

pub enum ReqBody {
    Empty,
    Full(Option<Bytes>),
    /// A run's pieces, sent in order as they are (clones of the engine's buffers); `sent` is
    /// released once a body has handed its last piece to the connection.
    Pieces {
        pieces: VecDeque<Bytes>,
        sent: Arc<Mutex<Option<Permit>>>,
    },
}

impl ReqBody {
    pub fn full(data: Bytes) -> ReqBody {
        ReqBody::Full(Some(data))
    }

    pub fn pieces(pieces: &[Bytes], sent: &Arc<Mutex<Option<Permit>>>) -> ReqBody {
        ReqBody::Pieces {
            pieces: pieces.iter().filter(|p| !p.is_empty()).cloned().collect(),
            sent: sent.clone(),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Pieces { pieces, sent } => {
                let piece = pieces.pop_front();
                if pieces.is_empty() {
                    // Every byte is with the connection: the run's budget may go to the next
                    // reads, while the run itself stays kept for a retry until it is answered.
                    drop(sent.lock().unwrap_or_else(|p| p.into_inner()).take());
                }
                Poll::Ready(piece.map(|p| Ok(Frame::data(p))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(data) => data.is_none(),
            ReqBody::Pieces { pieces, .. } => pieces.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Pieces { pieces, .. } => {
                SizeHint::with_exact(pieces.iter().map(|p| p.len() as u64).sum())
            }
        }
    }
}
