//! The checksum resources of the data API: `GET /images/{id}/checksum[?algorithm=&block_size=]`
//! (imageio's block checksum of the ticket's image) and `GET /images/{any}/checksum/algorithms`
//! (no ticket needed).
//!
//! Same JSON, parameters, defaults and error texts as ovirt-imageio 2.5, with its quirks fixed
//! as the reference suggests: the list holds only algorithms that work, block digests are
//! computed on all cores, zero extents of the backend are never read, and an authorization
//! failure closes the connection like every other 403 of the data API. The value is the
//! reference's: it covers the backend's size. Computing never writes to the image.

use std::sync::Arc;

use blkhash::endpoint::{ReadOptions, checksum};
use blkhash::{Algorithm, Kind, Spec};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::conn::ConnCtx;
use crate::data::DataApi;
use crate::request::{query_pairs, query_value};
use crate::respond::{Body, HttpError, json};
use crate::store::Forbidden;
use crate::ticket::Access;

/// `{"algorithms": [...]}`, sorted.
pub(crate) fn algorithms() -> Response<Body> {
    json(&imageio::wire::Algorithms {
        algorithms: Algorithm::imageio_names()
            .into_iter()
            .map(str::to_string)
            .collect(),
    })
}

/// The spec a checksum request asks for, with the reference's messages for bad parameters.
fn requested_spec(req: &Request<Incoming>) -> Result<Spec, HttpError> {
    let q = query_pairs(req.uri());
    let names = Algorithm::imageio_names();
    let algorithm = match query_value(&q, "algorithm") {
        None => Algorithm::BLAKE2B,
        // Only the listed names: `blake2b-512` parses but is not imageio's vocabulary.
        Some(a) if names.contains(&a) => a.parse().expect("listed names parse"),
        Some(other) => {
            let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
            return Err(HttpError::bad_request(format!(
                "Unsupported value '{other}' for 'algorithm', expecting one of [{}]",
                list.join(", ")
            )));
        }
    };
    let block_size = match query_value(&q, "block_size") {
        None => None,
        Some(b) => Some(
            b.parse::<u64>()
                .map_err(|_| HttpError::bad_request(format!("Invalid block size: '{b}'")))?,
        ),
    };
    Spec::new(Kind::Imageio, Some(algorithm), block_size)
        .map_err(|e| HttpError::bad_request(e.to_string()))
}

pub(crate) async fn image_checksum(
    api: &DataApi,
    req: &Request<Incoming>,
    id: &str,
    ctx: &ConnCtx,
) -> Result<Response<Body>, HttpError> {
    // Parameters are checked before the ticket, as the reference does.
    let spec = requested_spec(req)?;
    let (ticket, backend) = api.open(id, Access::Read, ctx).await?;
    // Registered as an operation, so cancelling the ticket knows it runs and ends it.
    let op = ticket.begin(0).map_err(|f| HttpError::forbidden(&f))?;
    ticket.touch();
    let opts = ReadOptions::default();
    let work = checksum(Arc::clone(&backend.ep), spec, &opts);
    let digest = tokio::select! {
        r = work => r.map_err(HttpError::internal)?,
        _ = ticket.cancelled() => {
            return Err(HttpError::forbidden(&Forbidden(format!(
                "Transfer={} was canceled",
                ticket.label()
            ))));
        }
    };
    drop(op);
    // A checksum of a large image takes a while; it counts as activity like a download.
    ticket.touch();
    Ok(json(&imageio::wire::Checksum {
        algorithm: spec.algorithm.name(),
        block_size: spec.block_size,
        checksum: digest.to_hex(),
    }))
}
