//! `null:`: a destination that discards everything. It reads as zeroes, so zeroing is free,
//! and it is as large as any source.

use bytes::Bytes;

use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op};

pub struct NullEndpoint {
    caps: Caps,
}

impl Default for NullEndpoint {
    fn default() -> Self {
        let mut caps = Caps::random_access(i64::MAX as u64);
        caps.efficient_zero = true;
        caps.flush = true;
        caps.known_zero = true;
        caps.max_request = u64::MAX;
        NullEndpoint { caps }
    }
}

impl Endpoint for NullEndpoint {
    fn name(&self) -> &str {
        "null:"
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(async move {
            Err(DiskError::new(
                "null:",
                Op::Read,
                ErrorKind::Unsupported,
                "null: is a destination only",
            )
            .at(offset, len))
        })
    }

    fn write(&self, _offset: u64, _data: Bytes) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn zero(&self, _offset: u64, _len: u64, _allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
