//! Every ticket exported over NBD, under its ticket id as the export name. A client that knows
//! a ticket id reads (and, if the ticket allows, writes) the ticket's image with any NBD client,
//! next to the HTTP API and under the same rules: unknown, expired or cancelled names are
//! refused at NBD_OPT_GO, every request is authorized and counted as ticket activity, a DELETE
//! waits for requests in flight, and NBD_OPT_LIST reveals no ticket ids.

use std::sync::Arc;

use bytes::Bytes;
use disk::export::EndpointExport;
use nbd::proto::BlockSize;
use nbd::proto::consts::EPERM;
use nbd::server::{Export, ExportCaps, ExportError, ExportFut, Exports, ReadPiece};
use tokio::sync::OnceCell;

use crate::backend::Backend;
use crate::store::{Binding, OpGuard, Ticket, TicketStore};
use crate::ticket::Access;

/// The tickets of a store, as NBD exports.
pub struct TicketExports {
    pub store: Arc<TicketStore>,
}

impl Exports for TicketExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let ticket = self.store.get(name)?;
        ticket.check(Access::Read).ok()?;
        ticket.touch();
        Some(Arc::new(TicketExport {
            binding: ticket.bind(),
            ticket,
            backend: OnceCell::new(),
        }))
    }

    fn list(&self) -> Vec<(String, String)> {
        // Ticket ids are secrets: listing them would hand out access.
        Vec::new()
    }
}

/// One NBD client's view of one ticket.
struct TicketExport {
    ticket: Arc<Ticket>,
    /// Counts the NBD connection in the ticket's `connections` while it lasts.
    #[allow(dead_code)]
    binding: Binding,
    /// The ticket's shared backend, opened on the first request.
    backend: OnceCell<(Arc<Backend>, EndpointExport)>,
}

impl TicketExport {
    /// Authorizes one request and returns the backend's export and the operation's guard.
    async fn begin(
        &self,
        access: Access,
        offset: u64,
    ) -> Result<(&EndpointExport, OpGuard), ExportError> {
        self.ticket
            .check(access)
            .map_err(|f| ExportError::new(EPERM, f.0))?;
        let guard = self
            .ticket
            .begin(offset)
            .map_err(|f| ExportError::new(EPERM, f.0))?;
        let (_, export) = self
            .backend
            .get_or_try_init(|| async {
                let backend = self
                    .ticket
                    .backend(async |spec| Backend::open(spec).await)
                    .await
                    .map_err(|e| ExportError::new(nbd::proto::consts::EIO, e.to_string()))?;
                let export = EndpointExport::new(
                    backend.ep.clone(),
                    !self.ticket.spec.allows(Access::Write),
                    String::new(),
                );
                Ok::<_, ExportError>((backend, export))
            })
            .await?;
        Ok((export, guard))
    }
}

impl Export for TicketExport {
    fn size(&self) -> u64 {
        self.ticket.spec.size
    }

    fn caps(&self) -> ExportCaps {
        let write = self.ticket.spec.allows(Access::Write);
        ExportCaps {
            read_only: !write,
            flush: true,
            trim: true,
            zero: true,
            fast_zero: false,
            cache: true,
            // Every connection of a ticket shares one backend, so a flush covers them all.
            multi_conn: true,
            extents: true,
            block_size: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: disk::export::MAX_PAYLOAD,
            },
        }
    }

    fn read(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<ReadPiece>> {
        Box::pin(async move {
            let (export, guard) = self.begin(Access::Read, offset).await?;
            let pieces = export.read(offset, len).await?;
            guard.progress(len);
            Ok(pieces)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            let (export, guard) = self.begin(Access::Write, offset).await?;
            let len = data.len() as u64;
            export.write(offset, data, fua).await?;
            guard.progress(len);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fast: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            let (export, guard) = self.begin(Access::Write, offset).await?;
            // The ticket's `sparse` decides, as for PATCH zero.
            let punch = punch && self.ticket.spec.sparse;
            export.write_zeroes(offset, len, punch, fast).await?;
            guard.progress(len);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u64) -> ExportFut<'_, ()> {
        Box::pin(async move {
            let (export, _guard) = self.begin(Access::Write, offset).await?;
            export.trim(offset, len).await
        })
    }

    fn flush(&self) -> ExportFut<'_, ()> {
        Box::pin(async move {
            let (export, _guard) = self.begin(Access::Write, 0).await?;
            export.flush().await
        })
    }

    fn extents(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<(u64, u32)>> {
        Box::pin(async move {
            let (export, _guard) = self.begin(Access::Read, offset).await?;
            export.extents(offset, len).await
        })
    }

    fn is_cancelled(&self) -> bool {
        self.ticket.is_canceled()
    }
}
