//! The ticket store: every installed ticket with its live state (expiry, operations in flight,
//! connections bound to it, progress, cancellation) and the backend its connections share.
//!
//! The store is the one place that decides whether a request may touch an image
//! ([`TicketStore::authorize`]). It is shared as `Arc<TicketStore>` by the HTTP services and,
//! later, by the NBD export of tickets, so it knows nothing about HTTP.
//!
//! Operations register with [`Ticket::begin`]; the returned [`OpGuard`] counts bytes as they
//! move, and on drop records the range as transferred and slides the expiry. Deleting a ticket
//! cancels it: new requests are refused at once, running operations see
//! [`Ticket::is_canceled`] (or wait on [`Ticket::cancelled`]) and stop between chunks, and the
//! delete waits for them up to a deadline.
//!
//! A store made with [`TicketStore::persistent`] also keeps every ticket's document in a
//! directory (one file per ticket, replaced atomically, removed with the ticket) and installs
//! them again when the server starts, so a restarted server serves the same tickets and an
//! orchestrator need not notice. A restored ticket's expiry starts afresh; its transfer
//! counters start at zero.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::backend::Backend;
use crate::metrics::{Metrics, Traffic};
use crate::ticket::{Access, TicketSpec, monotonic_now};

/// Why a request may not touch a ticket: the text after "You are not allowed to access this
/// resource: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(pub String);

type TicketMap = Mutex<HashMap<String, Arc<Ticket>>>;

/// Every installed ticket.
pub struct TicketStore {
    tickets: Arc<TicketMap>,
    /// Where ticket documents are kept across restarts, if anywhere.
    persist: Option<PathBuf>,
    limits: Limits,
    /// The server's metrics; tickets count their bytes into them.
    pub metrics: Arc<Metrics>,
}

impl Default for TicketStore {
    fn default() -> Self {
        Self::build(None, Limits::default())
    }
}

/// A ticket store directory that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("ticket store {path}: {what}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Bandwidth limits of the data service, bytes per second (0: none). Both can change while
/// transfers run ([`TicketStore::set_limits`]), so every ticket has its limiters from the start;
/// an unlimited one costs an atomic load per request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Shared by every transfer, in equal shares ([`bwlimit::Flow`]).
    pub global: Arc<bwlimit::Limiter>,
    /// Each ticket's own limit when its document has no `bwlimit`.
    per_ticket: Arc<AtomicU64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(0, 0)
    }
}

impl Limits {
    /// `global` for all transfers together, `per_ticket` for each one (0: none).
    pub fn new(global: u64, per_ticket: u64) -> Limits {
        Limits {
            global: bwlimit::Limiter::new(global),
            per_ticket: Arc::new(AtomicU64::new(per_ticket)),
        }
    }

    /// Each ticket's limit unless its document sets one (0: none).
    pub fn per_ticket(&self) -> u64 {
        self.per_ticket.load(Ordering::Relaxed)
    }

    /// The limits one ticket's transfers move under.
    fn flow(&self, spec: &TicketSpec) -> bwlimit::Flow {
        let own = spec.bwlimit.unwrap_or(self.per_ticket());
        bwlimit::Flow::new(Some(bwlimit::Limiter::new(own)), Some(self.global.clone()))
    }
}

/// A ticket whose operations outlived the deadline of its removal: it stays, cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Timeout cancelling transfer {label}")]
pub struct StillRunning {
    /// The ticket's label, as messages show it.
    pub label: String,
}

impl TicketStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that keeps its tickets in `dir` (created if missing), with the tickets a
    /// previous server left there installed again. Documents that no longer parse are
    /// skipped with a warning, not fatal: one bad file must not keep the others from serving.
    pub fn persistent(dir: &Path) -> Result<TicketStore, StoreError> {
        Self::persistent_with_limits(dir, Limits::default())
    }

    /// [`TicketStore::persistent`], its tickets' transfers moving under `limits`.
    pub fn persistent_with_limits(dir: &Path, limits: Limits) -> Result<TicketStore, StoreError> {
        let err = |what, source| StoreError {
            path: dir.to_path_buf(),
            what,
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err("creating it", e))?;
        let store = Self::build(Some(dir.to_path_buf()), limits);
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| err("listing it", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for path in names {
            let spec = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|doc| TicketSpec::from_json(&doc).map_err(|e| e.to_string()));
            match spec {
                Ok(spec) => {
                    tracing::info!(ticket = %spec.uuid, "ticket restored");
                    store.insert(spec);
                }
                Err(e) => tracing::warn!("skipping ticket file {}: {e}", path.display()),
            }
        }
        Ok(store)
    }

    /// The file that keeps ticket `id`: its bytes in hex, so any id is a safe file name.
    fn document_path(dir: &Path, id: &str) -> PathBuf {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        dir.join(format!("{hex}.json"))
    }

    /// Writes `spec`'s document (tempfile, fsync, rename, fsync of the directory).
    fn keep(&self, spec: &TicketSpec) -> Result<(), StoreError> {
        let Some(dir) = &self.persist else {
            return Ok(());
        };
        let path = Self::document_path(dir, &spec.uuid);
        let err = |what, source| StoreError {
            path: path.clone(),
            what,
            source,
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err("creating", e))?;
        tmp.write_all(&spec.document)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| err("writing", e))?;
        tmp.persist(&path).map_err(|e| err("replacing", e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("syncing its directory", e))
    }

    fn discard(&self, id: &str) {
        if let Some(dir) = &self.persist {
            let path = Self::document_path(dir, id);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing ticket file {}: {e}", path.display());
            }
        }
    }

    /// Installs a ticket like [`TicketStore::add`], kept on disk first when the store is
    /// persistent: a ticket that could not be kept is not installed.
    pub fn install(&self, spec: TicketSpec) -> Result<Arc<Ticket>, StoreError> {
        self.keep(&spec)?;
        Ok(self.add(spec))
    }

    /// A store whose tickets' transfers move under `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self::build(None, limits)
    }

    fn build(persist: Option<PathBuf>, limits: Limits) -> Self {
        let tickets: Arc<TicketMap> = Arc::default();
        // Weak: the tickets hold the metrics, which must not keep the tickets alive.
        let listed = Arc::downgrade(&tickets);
        let metrics = Arc::new(Metrics::new(move || match listed.upgrade() {
            Some(map) => {
                let map = map.lock().unwrap_or_else(|p| p.into_inner());
                let mut all: Vec<Arc<Ticket>> = map.values().cloned().collect();
                all.sort_by(|a, b| a.id().cmp(b.id()));
                all
            }
            None => Vec::new(),
        }));
        TicketStore {
            tickets,
            persist,
            limits,
            metrics,
        }
    }

    /// The bandwidth limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits while transfers run: the global rate, and the rate of every ticket
    /// whose document does not set its own.
    pub fn set_limits(&self, global: u64, per_ticket: u64) {
        self.limits.global.set_rate(global);
        self.limits.per_ticket.store(per_ticket, Ordering::Relaxed);
        for t in self.list() {
            if t.spec.bwlimit.is_none()
                && let Some(own) = t.flow.own()
            {
                own.set_rate(per_ticket);
            }
        }
        tracing::info!(global, per_ticket, "bandwidth limits changed");
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Ticket>>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs a ticket, replacing one with the same id (as the reference does: the old one
    /// is cancelled so its connections stop using it).
    pub fn add(&self, spec: TicketSpec) -> Arc<Ticket> {
        let ticket = self.insert(spec);
        tracing::info!(ticket = %ticket.id(), transfer = %ticket.label(), "ticket added");
        ticket
    }

    fn insert(&self, spec: TicketSpec) -> Arc<Ticket> {
        let flow = self.limits.flow(&spec);
        let traffic = Arc::new(Traffic::new(self.metrics.clone()));
        let ticket = Arc::new(Ticket::new(spec, flow, traffic));
        let old = self.map().insert(ticket.id().to_owned(), ticket.clone());
        if let Some(old) = old {
            old.cancel();
        }
        ticket
    }

    pub fn get(&self, id: &str) -> Option<Arc<Ticket>> {
        self.map().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Ticket>> {
        let mut all: Vec<_> = self.map().values().cloned().collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        all
    }

    /// The ticket `id` if it allows `access` now; the reference's reason otherwise.
    pub fn authorize(&self, id: &str, access: Access) -> Result<Arc<Ticket>, Forbidden> {
        let ticket = self
            .get(id)
            .ok_or_else(|| Forbidden(format!("No such ticket {id}")))?;
        ticket.check(access)?;
        Ok(ticket)
    }

    /// Cancels the ticket, waits up to `timeout` for its operations to stop, then removes it.
    /// Unknown ids succeed (DELETE is idempotent). Err(label) when operations outlived the
    /// deadline; the ticket stays, cancelled, so the caller can retry.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), StillRunning> {
        let Some(ticket) = self.get(id) else {
            return Ok(());
        };
        ticket.cancel();
        if !ticket.wait_idle(timeout).await {
            tracing::warn!(ticket = %id, "timeout cancelling transfer");
            return Err(StillRunning {
                label: ticket.label(),
            });
        }
        self.forget(&ticket);
        tracing::info!(ticket = %id, "ticket removed");
        Ok(())
    }

    /// Flushes and closes every ticket's open backend (the server is stopping; nothing runs).
    pub async fn close_backends(&self) {
        for t in self.list() {
            let backend = t.backend.lock().await.take();
            if let Some(b) = backend {
                // Writes acknowledged with flush=n are made durable before the server goes.
                if !b.ep.caps().read_only
                    && let Err(e) = b.ep.flush().await
                {
                    tracing::warn!(ticket = %t.id(), "flush at shutdown failed: {e}");
                }
                b.close().await;
            }
        }
    }

    /// Removes every ticket without cancelling running operations (`DELETE /tickets/`).
    pub fn clear(&self) {
        let all: Vec<_> = self.map().drain().map(|(_, t)| t).collect();
        for t in all {
            self.discard(t.id());
            t.close_backend_if_unused();
        }
        tracing::info!("all tickets removed");
    }

    /// Removes `ticket` if it is still the one installed under its id.
    fn forget(&self, ticket: &Arc<Ticket>) {
        let mut map = self.map();
        if map.get(ticket.id()).is_some_and(|t| Arc::ptr_eq(t, ticket)) {
            map.remove(ticket.id());
            self.discard(ticket.id());
        }
        drop(map);
        ticket.close_backend_if_unused();
    }

    /// Removes tickets that expired more than `grace` ago and have nothing running.
    pub fn reap(&self, grace: Duration) -> usize {
        let now = monotonic_now();
        let victims: Vec<_> = self
            .map()
            .values()
            .filter(|t| {
                let s = t.state();
                s.active == 0 && s.expires + grace.as_secs_f64() <= now
            })
            .cloned()
            .collect();
        for t in &victims {
            t.cancel();
            self.forget(t);
            tracing::info!(ticket = %t.id(), "expired ticket reaped");
        }
        victims.len()
    }
}

/// Mutable state of one ticket, under its lock.
struct State {
    /// Monotonic seconds after which requests are refused.
    expires: f64,
    /// Operations in flight, by id: (start offset, bytes done so far).
    running: HashMap<u64, (u64, u64)>,
    active: usize,
    next_op: u64,
    connections: usize,
    /// When the last operation ended (or the ticket was added).
    idle_since: Instant,
    /// Completed byte ranges, sorted and disjoint (half-open).
    done: Vec<(u64, u64)>,
}

/// One installed ticket.
pub struct Ticket {
    pub spec: TicketSpec,
    state: Mutex<State>,
    canceled: AtomicBool,
    cancel_notify: Notify,
    idle_notify: Notify,
    /// The backend the ticket's connections share, opened on first use and closed when the
    /// last connection lets go.
    backend: tokio::sync::Mutex<Option<Arc<Backend>>>,
    /// The bandwidth limits its downloads and uploads wait for, shared by its connections.
    pub flow: bwlimit::Flow,
    /// Bytes moved on its backend, for the metrics and the status page.
    pub traffic: Arc<Traffic>,
}

impl Ticket {
    fn new(spec: TicketSpec, flow: bwlimit::Flow, traffic: Arc<Traffic>) -> Ticket {
        let expires = monotonic_now() + spec.timeout as f64;
        Ticket {
            spec,
            state: Mutex::new(State {
                expires,
                running: HashMap::new(),
                active: 0,
                next_op: 0,
                connections: 0,
                idle_since: Instant::now(),
                done: Vec::new(),
            }),
            canceled: AtomicBool::new(false),
            cancel_notify: Notify::new(),
            idle_notify: Notify::new(),
            backend: tokio::sync::Mutex::new(None),
            flow,
            traffic,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.spec.uuid
    }

    pub fn label(&self) -> String {
        self.spec.transfer_label()
    }

    /// Refuses cancelled or expired tickets and operations the ticket does not allow.
    pub fn check(&self, access: Access) -> Result<(), Forbidden> {
        let label = self.label();
        if self.is_canceled() {
            return Err(Forbidden(format!("Transfer={label} was canceled")));
        }
        if self.state().expires <= monotonic_now() {
            return Err(Forbidden(format!("Transfer={label} expired")));
        }
        if !self.spec.allows(access) {
            return Err(Forbidden(format!(
                "Transfer={label} forbids {}",
                access.name()
            )));
        }
        Ok(())
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::Acquire)
    }

    /// Completes when the ticket is cancelled (at once if it already is).
    pub async fn cancelled(&self) {
        loop {
            let wait = self.cancel_notify.notified();
            if self.is_canceled() {
                return;
            }
            wait.await;
        }
    }

    fn cancel(&self) {
        self.canceled.store(true, Ordering::Release);
        self.cancel_notify.notify_waiters();
    }

    /// Waits until no operation runs; false if `timeout` passed first.
    async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let wait = self.idle_notify.notified();
            if self.state().active == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                return self.state().active == 0;
            }
        }
    }

    /// Sets `expires = now + seconds` (PATCH /tickets/{id}); the next activity overrides it.
    pub fn extend(&self, seconds: u64) {
        self.state().expires = monotonic_now() + seconds as f64;
    }

    /// Slides the expiry window: any activity (OPTIONS, extents, completed operations).
    pub fn touch(&self) {
        self.state().expires = monotonic_now() + self.spec.timeout as f64;
    }

    /// Registers an operation starting at `offset`; refused once the ticket is cancelled.
    pub fn begin(self: &Arc<Self>, offset: u64) -> Result<OpGuard, Forbidden> {
        let mut s = self.state();
        if self.is_canceled() {
            return Err(Forbidden(format!("Transfer={} was canceled", self.label())));
        }
        let id = s.next_op;
        s.next_op += 1;
        s.active += 1;
        s.running.insert(id, (offset, 0));
        Ok(OpGuard {
            ticket: self.clone(),
            id,
        })
    }

    /// Binds an HTTP connection to the ticket until the returned guard drops.
    pub fn bind(self: &Arc<Self>) -> Binding {
        self.state().connections += 1;
        Binding {
            ticket: self.clone(),
        }
    }

    /// The shared backend, opened now if no connection holds one.
    pub async fn backend(
        &self,
        opener: impl AsyncFnOnce(&TicketSpec) -> Result<Backend, disk::DiskError>,
    ) -> Result<Arc<Backend>, disk::DiskError> {
        let mut slot = self.backend.lock().await;
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        let mut b = opener(&self.spec).await?;
        b.traffic = self.traffic.clone();
        let b = Arc::new(b);
        *slot = Some(b.clone());
        Ok(b)
    }

    /// Closes the shared backend when no connection is bound and nothing runs. Runs the close
    /// on the runtime, since drops happen in synchronous code.
    fn close_backend_if_unused(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ticket = self.clone();
        handle.spawn(async move {
            let mut slot = ticket.backend.lock().await;
            let unused = {
                let s = ticket.state();
                s.connections == 0 && s.active == 0
            };
            if unused && let Some(b) = slot.take() {
                drop(slot);
                b.close().await;
            }
        });
    }

    /// The ticket info document (GET /tickets/{id}).
    pub fn info(&self) -> serde_json::Value {
        serde_json::to_value(self.info_doc()).expect("ticket info serializes")
    }

    /// The ticket info document as JSON text, keys in the reference's order.
    pub fn info_json(&self) -> String {
        imageio::wire::to_json(&self.info_doc())
    }

    fn info_doc(&self) -> TicketInfo<'_> {
        let s = self.state();
        let active = s.active > 0;
        let transferred = self.spec.single_access().map(|_| {
            let done: u64 = s.done.iter().map(|(a, b)| b - a).sum();
            let running: u64 = s.running.values().map(|(_, n)| n).sum();
            done + running
        });
        TicketInfo {
            active,
            canceled: self.is_canceled(),
            connections: s.connections,
            expires: s.expires.max(0.0) as u64,
            idle_time: if active {
                0
            } else {
                s.idle_since.elapsed().as_secs()
            },
            inactivity_timeout: self.spec.inactivity_timeout,
            ops: &self.spec.ops,
            size: serde_json::value::RawValue::from_string(self.spec.size_text.clone())
                .expect("a size's text is a JSON number"),
            sparse: self.spec.sparse,
            dirty: self.spec.dirty,
            timeout: self.spec.timeout,
            url: &self.spec.url,
            uuid: &self.spec.uuid,
            transfer_id: self.label(),
            filename: self.spec.filename.as_deref(),
            transferred,
        }
    }

    #[cfg(test)]
    pub(crate) fn active(&self) -> usize {
        self.state().active
    }
}

/// Ticket info; field order is the reference's.
#[derive(serde::Serialize)]
struct TicketInfo<'a> {
    active: bool,
    canceled: bool,
    connections: usize,
    expires: u64,
    idle_time: u64,
    inactivity_timeout: u64,
    ops: &'a [String],
    size: Box<serde_json::value::RawValue>,
    sparse: bool,
    dirty: bool,
    timeout: u64,
    url: &'a str,
    uuid: &'a str,
    transfer_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transferred: Option<u64>,
}

/// One running operation; dropping it ends the operation.
pub struct OpGuard {
    ticket: Arc<Ticket>,
    id: u64,
}

impl OpGuard {
    /// Counts `n` more bytes moved by this operation.
    pub fn progress(&self, n: u64) {
        if let Some(r) = self.ticket.state().running.get_mut(&self.id) {
            r.1 += n;
        }
    }

    /// Counts `[offset, offset + n)` as moved, whatever the order its pieces complete in
    /// (an upload's backend writes). Ranges written twice count once.
    pub fn completed(&self, offset: u64, n: u64) {
        add_range(&mut self.ticket.state().done, offset, offset + n);
    }

    pub fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let t = &self.ticket;
        let mut s = t.state();
        if let Some((start, n)) = s.running.remove(&self.id)
            && n > 0
        {
            add_range(&mut s.done, start, start + n);
        }
        s.active -= 1;
        s.idle_since = Instant::now();
        s.expires = monotonic_now() + t.spec.timeout as f64;
        let idle = s.active == 0;
        drop(s);
        if idle {
            t.idle_notify.notify_waiters();
        }
    }
}

/// A connection's hold on a ticket's backend.
pub struct Binding {
    ticket: Arc<Ticket>,
}

impl Drop for Binding {
    fn drop(&mut self) {
        let last = {
            let mut s = self.ticket.state();
            s.connections -= 1;
            s.connections == 0
        };
        if last {
            self.ticket.close_backend_if_unused();
        }
    }
}

/// Adds [start, end) to a sorted list of disjoint ranges, merging what touches it.
fn add_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut start, mut end) = (start, end);
    let first = ranges.partition_point(|r| r.1 < start);
    let mut last = first;
    while last < ranges.len() && ranges[last].0 <= end {
        start = start.min(ranges[last].0);
        end = end.max(ranges[last].1);
        last += 1;
    }
    ranges.splice(first..last, [(start, end)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, ops: &[&str], timeout: u64) -> TicketSpec {
        let ops: Vec<String> = ops.iter().map(|s| s.to_string()).collect();
        let doc = serde_json::json!({"uuid": id, "size": 1 << 20, "ops": ops,
            "timeout": timeout, "url": "file:///nonexistent"});
        TicketSpec::from_json(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn ranges_merge() {
        let mut r = Vec::new();
        add_range(&mut r, 10, 20);
        add_range(&mut r, 30, 40);
        add_range(&mut r, 0, 5);
        assert_eq!(r, vec![(0, 5), (10, 20), (30, 40)]);
        add_range(&mut r, 15, 30);
        assert_eq!(r, vec![(0, 5), (10, 40)]);
        add_range(&mut r, 5, 10);
        assert_eq!(r, vec![(0, 40)]);
        add_range(&mut r, 0, 40);
        assert_eq!(r, vec![(0, 40)]);
    }

    #[test]
    fn authorize_reasons() {
        let store = TicketStore::new();
        assert_eq!(
            store.authorize("nope", Access::Read).err().unwrap().0,
            "No such ticket nope"
        );
        store.add(spec("r", &["read"], 100));
        assert!(store.authorize("r", Access::Read).is_ok());
        assert_eq!(
            store.authorize("r", Access::Write).err().unwrap().0,
            "Transfer=(ticket/r) forbids write"
        );
        let t = store.add(spec("e", &["write"], 0));
        assert_eq!(
            store.authorize("e", Access::Read).err().unwrap().0,
            "Transfer=(ticket/e) expired"
        );
        t.extend(100);
        assert!(store.authorize("e", Access::Write).is_ok());
    }

    #[test]
    fn transferred_counts_union_of_ranges_and_progress() {
        let store = TicketStore::new();
        let t = store.add(spec("w", &["write"], 100));
        {
            let op = t.begin(0).unwrap();
            op.progress(100);
            assert_eq!(t.info()["transferred"], 100);
            assert_eq!(t.info()["active"], true);
        }
        {
            let op = t.begin(50).unwrap();
            op.progress(100);
        }
        let info = t.info();
        assert_eq!(info["transferred"], 150);
        assert_eq!(info["active"], false);
        let rw = store.add(spec("rw", &["read", "write"], 100));
        assert!(rw.info().get("transferred").is_none());
    }

    #[test]
    fn completed_ranges_count_once_in_any_order() {
        let store = TicketStore::new();
        let t = store.add(spec("w", &["write"], 100));
        let op = t.begin(0).unwrap();
        op.completed(64, 64);
        assert_eq!(t.info()["transferred"], 64);
        op.completed(0, 64);
        op.completed(32, 64);
        drop(op);
        assert_eq!(t.info()["transferred"], 128);
    }

    #[tokio::test]
    async fn remove_cancels_and_waits_for_operations() {
        let store = Arc::new(TicketStore::new());
        let t = store.add(spec("x", &["write"], 100));
        let op = t.begin(0).unwrap();
        // The operation never ends in time: 409 path.
        let err = store.remove("x", Duration::from_millis(50)).await;
        assert_eq!(
            err,
            Err(StillRunning {
                label: "(ticket/x)".to_string()
            })
        );
        assert!(t.is_canceled());
        assert!(store.get("x").is_some());
        assert!(t.begin(0).is_err());
        // It ends while the second delete waits: removed.
        let s2 = store.clone();
        let waiter = tokio::spawn(async move { s2.remove("x", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(op);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(store.get("x").is_none());
        assert_eq!(t.active(), 0);
        // Unknown ids are fine.
        assert_eq!(store.remove("x", Duration::ZERO).await, Ok(()));
    }

    #[tokio::test]
    async fn cancelled_wakes_waiters() {
        let store = TicketStore::new();
        let t = store.add(spec("c", &["read"], 100));
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.cancelled().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(store.remove("c", Duration::from_secs(1)).await, Ok(()));
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn reaper_removes_only_long_expired_idle_tickets() {
        let store = TicketStore::new();
        store.add(spec("old", &["read"], 0));
        let busy = store.add(spec("busy", &["read"], 0));
        let _op = busy.begin(0).unwrap();
        store.add(spec("fresh", &["read"], 1000));
        assert_eq!(store.reap(Duration::ZERO), 1);
        assert!(store.get("old").is_none());
        assert!(store.get("busy").is_some());
        assert!(store.get("fresh").is_some());
    }
}
