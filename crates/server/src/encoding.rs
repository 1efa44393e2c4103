//! PUT bodies as the client encoded them (`Content-Encoding`): plain bytes, or zstd frames
//! decoded as they arrive. ferry's OPTIONS answer offers `zstd` (`ferry_encodings`); an
//! encoding the server does not know is refused (415), never written as if it were data.
//!
//! A zstd body must decode to exactly the bytes its `Content-Range` names. Decoding never
//! produces more than that: output is made in steps of at most [`STEP`] bytes, and a body
//! that would decode past the declared end is refused as soon as it does, so a small body
//! cannot make the server decompress (or hold) more than it declared; the range's last step
//! is held back until the body has ended there. Frames are checked against their content
//! checksums (ferry's client always sends them) as each ends, so a corrupted body fails at
//! the latest at the end of its frame; what of the range was written before the failure is
//! written again by the client's next attempt. The decoder's window is
//! capped at [`WINDOW_LOG_MAX`] so a frame header cannot make it allocate much either.

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_ENCODING;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use crate::respond::HttpError;

/// Most bytes decoded at a time.
const STEP: usize = 256 << 10;
/// Largest window a zstd frame may use: 8 MiB (ferry's client needs at most 2 MiB).
const WINDOW_LOG_MAX: u32 = 23;

/// The encodings `Content-Encoding` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Zstd,
}

impl Encoding {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Zstd => "zstd",
        }
    }
}

/// The body's encoding, or 415 for one the server does not take.
pub(crate) fn of(headers: &HeaderMap) -> Result<Encoding, HttpError> {
    let mut found = Encoding::Identity;
    for v in headers.get_all(CONTENT_ENCODING) {
        let text = v.to_str().unwrap_or("<non-ascii>");
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "identity" => {}
                "zstd" if found == Encoding::Identity => found = Encoding::Zstd,
                _ => {
                    return Err(HttpError::new(
                        http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!(
                            "Unsupported Content-Encoding {text:?}: the server takes zstd or \
                             identity"
                        ),
                    ));
                }
            }
        }
    }
    Ok(found)
}

/// Why a body could not be read.
pub(crate) enum BodyFail {
    /// The connection or its framing failed.
    Transport(hyper::Error),
    /// The bytes arrived but do not decode to what was declared.
    Decode(String),
}

/// A PUT body's decoded bytes, frame by frame.
pub(crate) enum Source {
    Plain { body: Incoming, wire: u64 },
    Zstd(Box<ZstdBody>),
}

pub(crate) struct ZstdBody {
    body: Incoming,
    decoder: Decoder<'static>,
    input: Bytes,
    /// The declared length, and what is left of it.
    declared: u64,
    remaining: u64,
    /// The decoder may hold output it could not hand out yet.
    pending: bool,
    /// The last frame ended (and its checksum matched).
    frame_done: bool,
    /// The last bytes of the range, held until the body ends without more.
    held: Option<Bytes>,
    /// The body ended as declared.
    ended: bool,
    wire: u64,
}

impl Source {
    pub(crate) fn new(body: Incoming, encoding: Encoding, declared: u64) -> Result<Self, String> {
        Ok(match encoding {
            Encoding::Identity => Source::Plain { body, wire: 0 },
            Encoding::Zstd => {
                let mut decoder =
                    Decoder::new().map_err(|e| format!("cannot start a zstd decoder: {e}"))?;
                decoder
                    .set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
                    .map_err(|e| format!("cannot start a zstd decoder: {e}"))?;
                Source::Zstd(Box::new(ZstdBody {
                    body,
                    decoder,
                    input: Bytes::new(),
                    declared,
                    remaining: declared,
                    pending: false,
                    frame_done: false,
                    held: None,
                    ended: false,
                    wire: 0,
                }))
            }
        })
    }

    /// Bytes of the body as they came over the wire, so far.
    pub(crate) fn wire_bytes(&self) -> u64 {
        match self {
            Source::Plain { wire, .. } => *wire,
            Source::Zstd(z) => z.wire,
        }
    }

    /// The next bytes of data; `None` at the end of the body.
    pub(crate) async fn next(&mut self) -> Option<Result<Bytes, BodyFail>> {
        match self {
            Source::Plain { body, wire } => loop {
                match body.frame().await? {
                    Err(e) => return Some(Err(BodyFail::Transport(e))),
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            *wire += d.len() as u64;
                            return Some(Ok(d));
                        }
                    }
                }
            },
            Source::Zstd(z) => z.next().await,
        }
    }
}

impl ZstdBody {
    async fn next(&mut self) -> Option<Result<Bytes, BodyFail>> {
        loop {
            if self.ended {
                return self.held.take().map(Ok);
            }
            if !self.input.is_empty() || self.pending {
                match self.decode() {
                    // The range's last bytes wait until the body is known to end there.
                    Ok(Some(data)) if self.remaining == 0 => self.held = Some(data),
                    Ok(Some(data)) => return Some(Ok(data)),
                    Ok(None) => continue,
                    Err(m) => return Some(Err(BodyFail::Decode(m))),
                }
            }
            match self.body.frame().await {
                None => {
                    if !self.frame_done {
                        return Some(Err(BodyFail::Decode(format!(
                            "Invalid zstd body: it ends inside a frame ({} of {} bytes decoded)",
                            self.declared - self.remaining,
                            self.declared
                        ))));
                    }
                    if self.remaining > 0 {
                        return Some(Err(BodyFail::Decode(format!(
                            "The zstd body decodes to {} bytes, Content-Range declares {}",
                            self.declared - self.remaining,
                            self.declared
                        ))));
                    }
                    self.ended = true;
                }
                Some(Err(e)) => return Some(Err(BodyFail::Transport(e))),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.wire += d.len() as u64;
                        self.input = d;
                    }
                }
            }
        }
    }

    /// Decodes what the input gives, at most one step; `None` when it gave no bytes yet.
    fn decode(&mut self) -> Result<Option<Bytes>, String> {
        // One byte more than is left: a body that makes it is longer than declared.
        let room = STEP.min(usize::try_from(self.remaining).unwrap_or(usize::MAX - 1) + 1);
        let mut out = vec![0u8; room];
        let (used, made, hint) = {
            let mut input = InBuffer::around(&self.input[..]);
            let mut output = OutBuffer::around(&mut out[..]);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(|e| format!("Invalid zstd body: {e}"))?;
            (input.pos(), output.pos(), hint)
        };
        let _ = self.input.split_to(used);
        self.pending = made == room;
        self.frame_done = hint == 0;
        if made as u64 > self.remaining {
            return Err(format!(
                "The zstd body decodes to more than the {} bytes Content-Range declares",
                self.declared
            ));
        }
        self.remaining -= made as u64;
        if made == 0 {
            return Ok(None);
        }
        out.truncate(made);
        Ok(Some(Bytes::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn encodings() {
        assert_eq!(of(&headers(&[])).unwrap(), Encoding::Identity);
        assert_eq!(of(&headers(&["identity"])).unwrap(), Encoding::Identity);
        assert_eq!(of(&headers(&["ZSTD"])).unwrap(), Encoding::Zstd);
        let e = of(&headers(&["gzip"])).unwrap_err();
        assert_eq!(e.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // zstd twice would need two passes: refused.
        assert!(of(&headers(&["zstd, zstd"])).is_err());
        assert!(of(&headers(&["zstd", "br"])).is_err());
    }
}
