//! The control API (`/tickets/{id}`): installing, inspecting, extending and deleting tickets,
//! for vdsm, the engine or `ferry ticket`. It is served on its own listener (a Unix socket or
//! a loopback TCP port) and is never reachable through the data service.
//!
//! Extension: `GET /tickets/` lists every ticket (a JSON array of ticket info documents).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

use crate::conn::{ConnCtx, Handler};
use crate::request::read_small_body;
use crate::respond::{Body, HttpError, empty, json_text};
use crate::store::TicketStore;
use crate::ticket::{TicketError, TicketSpec};

pub struct ControlApi {
    pub store: Arc<TicketStore>,
    /// How long DELETE waits for a cancelled ticket's operations before answering 409.
    pub remove_timeout: Duration,
}

impl Handler for ControlApi {
    fn handle(
        &self,
        req: Request<Incoming>,
        ctx: Arc<ConnCtx>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>> {
        let ticket = req
            .uri()
            .path()
            .strip_prefix("/tickets/")
            .map(crate::request::decode)
            .unwrap_or_default();
        let span = tracing::info_span!("control", ticket = %ticket, conn = ctx.id);
        Box::pin(tracing::Instrument::instrument(
            async move {
                match self.dispatch(req, &ctx).await {
                    Ok(r) => r,
                    Err(e) => {
                        ctx.failed((!ticket.is_empty()).then_some(ticket.as_str()), &e);
                        tracing::info!(status = e.status.as_u16(), "{}", e.message);
                        e.into_response()
                    }
                }
            },
            span,
        ))
    }
}

impl ControlApi {
    async fn dispatch(
        &self,
        req: Request<Incoming>,
        ctx: &ConnCtx,
    ) -> Result<Response<Body>, HttpError> {
        let path = req.uri().path().to_owned();
        if let Some(resp) = crate::status::route(&path, req.method(), &self.store) {
            return resp;
        }
        let Some(raw_id) = path.strip_prefix("/tickets/") else {
            return Err(HttpError::not_found(format!("No handler for '{path}'")));
        };
        if raw_id.contains('/') {
            return Err(HttpError::not_found(format!("No handler for '{path}'")));
        }
        let id = crate::request::decode(raw_id);
        let method = req.method().clone();
        // An answer that leaves a request body unread closes the connection, or the body
        // would be parsed as the next request.
        let unread = crate::request::has_body(req.headers());
        let reject = |e: HttpError| if unread { e.closing() } else { e };
        if id.is_empty() && matches!(method, Method::PUT | Method::PATCH) {
            return Err(reject(HttpError::bad_request("Ticket id is required")));
        }
        match method {
            Method::PUT => {
                let body = read_small_body(req.into_body(), ctx.timeout()).await?;
                self.put(&id, &body)
            }
            Method::GET if id.is_empty() => {
                let all: Vec<String> = self
                    .store
                    .list()
                    .iter()
                    .map(|t| t.info_json().trim_end().to_string())
                    .collect();
                Ok(json_text(format!("[{}]\n", all.join(", "))))
            }
            Method::GET => match self.store.get(&id) {
                Some(t) => Ok(json_text(t.info_json())),
                None => Err(HttpError::not_found(format!("No such ticket '{id}'"))),
            },
            Method::PATCH => {
                let body = read_small_body(req.into_body(), ctx.timeout()).await?;
                self.patch(&id, &body)
            }
            Method::DELETE if id.is_empty() => {
                self.store.clear();
                Ok(empty(StatusCode::NO_CONTENT))
            }
            Method::DELETE => match self.store.remove(&id, self.remove_timeout).await {
                Ok(()) => Ok(empty(StatusCode::NO_CONTENT)),
                Err(still) => Err(HttpError::new(StatusCode::CONFLICT, still.to_string())),
            },
            Method::POST | Method::OPTIONS | Method::HEAD => Err(reject(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Method '{method}' not defined for '{path}'"),
            ))),
            _ => Err(reject(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Invalid method '{method}'"),
            ))),
        }
    }

    fn put(&self, id: &str, body: &[u8]) -> Result<Response<Body>, HttpError> {
        let spec = TicketSpec::from_json(body).map_err(|e| match e {
            TicketError::NotJson(_) | TicketError::Invalid(_) => {
                HttpError::bad_request(e.to_string())
            }
        })?;
        // The reference ignores the path id; a mismatch is a client bug worth reporting.
        if !id.is_empty() && id != spec.uuid {
            return Err(HttpError::bad_request(format!(
                "Invalid ticket: ticket id in the path '{id}' differs from uuid '{}'",
                spec.uuid
            )));
        }
        self.store.install(spec).map_err(|e| {
            tracing::error!("{e}");
            HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })?;
        Ok(empty(StatusCode::OK))
    }

    fn patch(&self, id: &str, body: &[u8]) -> Result<Response<Body>, HttpError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| HttpError::bad_request(format!("Invalid JSON message: {e}")))?;
        let timeout = match v.get("timeout") {
            None | Some(Value::Null) => {
                return Err(HttpError::bad_request(
                    "Missing required value for 'timeout'",
                ));
            }
            Some(t) => t.as_u64().ok_or_else(|| {
                HttpError::bad_request(format!("Invalid value for 'timeout': {t}"))
            })?,
        };
        let ticket = self
            .store
            .get(id)
            .ok_or_else(|| HttpError::not_found(format!("No such ticket: {id}")))?;
        ticket.extend(timeout);
        tracing::info!(ticket = %id, timeout, "ticket timeout changed");
        Ok(empty(StatusCode::OK))
    }
}
