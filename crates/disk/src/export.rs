//! Serving an [`Endpoint`] over NBD: the adapter from the copy-side endpoint abstraction to the
//! server's [`nbd::server::Export`]. Reads report holes from the endpoint's extents so clients
//! get OFFSET_HOLE chunks instead of zero bytes.

use std::sync::Arc;

use bytes::Bytes;
use nbd::proto::BlockSize;
use nbd::proto::consts::*;
use nbd::server::{Export, ExportCaps, ExportError, ExportFut, ReadPiece};

use crate::endpoint::{DiskError, Endpoint, ErrorKind};

/// Largest request the server accepts (the de-facto maximum every client honours).
pub const MAX_PAYLOAD: u32 = 32 << 20;

pub struct EndpointExport {
    endpoint: Arc<dyn Endpoint>,
    read_only: bool,
    description: String,
}

impl EndpointExport {
    pub fn new(endpoint: Arc<dyn Endpoint>, read_only: bool, description: String) -> Self {
        let read_only = read_only || endpoint.caps().read_only;
        EndpointExport {
            endpoint,
            read_only,
            description,
        }
    }
}

fn export_error(e: DiskError) -> ExportError {
    // NBD has few error values: each kind goes to the one a client reads it as.
    let errno = match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => EPERM,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::InvalidRequest => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        _ if e.errno == Some(libc::ENOMEM) => ENOMEM,
        _ => EIO,
    };
    ExportError::new(errno, e.cause)
}

impl Export for EndpointExport {
    fn size(&self) -> u64 {
        self.endpoint.caps().size.unwrap_or(0)
    }

    fn caps(&self) -> ExportCaps {
        let c = self.endpoint.caps();
        let min = c.min_block.clamp(1, 64 << 10) as u32;
        ExportCaps {
            read_only: self.read_only,
            flush: c.flush,
            trim: c.efficient_zero,
            zero: true,
            fast_zero: c.fast_zero,
            cache: true,
            multi_conn: !c.sequential,
            extents: c.extents,
            block_size: BlockSize {
                minimum: min,
                preferred: (c.preferred_block as u32).clamp(min.max(512), 2 << 20),
                maximum: MAX_PAYLOAD.max(min),
            },
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<ReadPiece>> {
        Box::pin(async move {
            let ep = &self.endpoint;
            let extents = if ep.caps().extents {
                ep.extents(offset, len).await.map_err(export_error)?
            } else {
                vec![crate::Extent::data(offset, len)]
            };
            let mut pieces = Vec::with_capacity(extents.len());
            let mut pos = offset;
            for e in extents {
                let end = e.end().min(offset + len);
                if end <= pos {
                    continue;
                }
                if e.zero {
                    pieces.push(ReadPiece::Hole(end - pos));
                } else {
                    pieces.push(ReadPiece::Data(
                        ep.read(pos, end - pos).await.map_err(export_error)?,
                    ));
                }
                pos = end;
            }
            if pos < offset + len {
                pieces.push(ReadPiece::Data(
                    ep.read(pos, offset + len - pos)
                        .await
                        .map_err(export_error)?,
                ));
            }
            Ok(pieces)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            self.endpoint
                .write(offset, data)
                .await
                .map_err(export_error)?;
            if fua {
                self.endpoint.flush().await.map_err(export_error)?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fast: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            if fast {
                return match self.endpoint.fast_zero(offset, len).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ExportError::new(ENOTSUP, "zeroing would not be fast")),
                    Err(e) => Err(export_error(e)),
                };
            }
            self.endpoint
                .zero(offset, len, !punch)
                .await
                .map_err(export_error)
        })
    }

    fn trim(&self, offset: u64, len: u64) -> ExportFut<'_, ()> {
        Box::pin(async move {
            self.endpoint
                .zero(offset, len, false)
                .await
                .map_err(export_error)
        })
    }

    fn flush(&self) -> ExportFut<'_, ()> {
        Box::pin(async move { self.endpoint.flush().await.map_err(export_error) })
    }

    fn extents(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<(u64, u32)>> {
        Box::pin(async move {
            let extents = self
                .endpoint
                .extents(offset, len)
                .await
                .map_err(export_error)?;
            Ok(extents
                .into_iter()
                .map(|e| {
                    let mut flags = 0;
                    if e.hole {
                        flags |= STATE_HOLE;
                    }
                    if e.zero {
                        flags |= STATE_ZERO;
                    }
                    (e.length, flags)
                })
                .collect())
        })
    }
}
