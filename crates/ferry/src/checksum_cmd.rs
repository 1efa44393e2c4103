//! `ferry checksum ENDPOINT`: the block checksum of a file, block device, NBD export,
//! `[ CMD ARGS … ]` server or HTTP/imageio URL, in ovirt-imageio's construction (the value its
//! `/checksum` returns) or nbdcopy's (`--blkhash`). Parses and validates the arguments, opens
//! the endpoint, and hands it to [`checksum_endpoint`]; the work is `blkhash::endpoint`'s.
//!
//! Exit codes: 0 the checksum was printed; 1 opening, reading or hashing failed; 2 usage error
//! (unknown algorithm, block size out of the construction's range, malformed URI).

use std::sync::Arc;

use blkhash::endpoint::{ReadOptions, checksum};
use blkhash::{Algorithm, Digest, Kind, Spec};
use disk::Endpoint;
use endpoints::{Opened, Role};
use units::parse_size;

use crate::endpoint::{HttpArgs, NbdArgs, read_options};
use crate::{Failure, usage};

/// Connections to use when the server allows several (NBD multi-conn, imageio readers).
const CONNECTIONS: usize = 4;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "ENDPOINT: FILE | DEVICE | NBD-URI | [ CMD ARGS ... ] (an NBD server \
                  started with socket activation) | http(s) URL (imageio transfer URL).\n\
                  Prints the hex digest (--json: algorithm, block_size, checksum, kind, size).\n\
                  --kind imageio (default): ovirt-imageio's /checksum, blake2b over 4M blocks; \
                  algorithms: blake2b, blake2s, md5, sha1, sha224, sha256, sha384, sha512, \
                  sha512_224, sha512_256, sha3_224, sha3_256, sha3_384, sha3_512 (and \
                  blake2b-BITS, blake2s-BITS); block size 1M-16M, a multiple of 4096.\n\
                  --kind blkhash: nbdcopy's --blkhash, sha256 over 64k blocks; algorithms md5, \
                  sha1, sha256, sha512.\n\
                  Exit status: 0 printed, 1 failed, 2 usage error."
)]
pub struct ChecksumArgs {
    pub endpoint: String,
    /// How a local file or block device is read: `raw` (its bytes, the default), `qcow2`
    /// (the disk it holds, backing files followed) or `auto` (qcow2 by its magic, without
    /// backing files).
    #[arg(long, value_name = "FORMAT", default_value = "raw", value_parser = crate::copy_cmd::parse_format)]
    pub src_format: endpoints::Format,
    /// Hash algorithm (default: blake2b for imageio, sha256 for blkhash).
    #[arg(long, value_name = "A")]
    pub algorithm: Option<String>,
    /// Block size, with K, M, G, T suffixes (default: 4M for imageio, 64k for blkhash).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Which construction: imageio (ovirt-imageio's /checksum) or blkhash (nbdcopy's).
    #[arg(long, value_name = "imageio|blkhash", default_value = "imageio")]
    pub kind: String,
    /// Print JSON instead of the bare digest.
    #[arg(long)]
    pub json: bool,
    /// Bytes per read (default: whole blocks, at least 4M, within the endpoint's maximum).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub request_size: Option<u64>,
    /// Reads in flight.
    #[arg(short = 'R', long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Ignore the endpoint's extents and read everything (same result, slower).
    #[arg(long)]
    pub no_extents: bool,
    /// Read and hash an imageio URL here even when its server offers /checksum.
    #[arg(long)]
    pub read: bool,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// The validated spec of the arguments.
fn spec(args: &ChecksumArgs) -> Result<Spec, Failure> {
    let kind: Kind = args.kind.parse().map_err(usage)?;
    let algorithm = args
        .algorithm
        .as_deref()
        .map(str::parse::<Algorithm>)
        .transpose()
        .map_err(usage)?;
    Spec::new(kind, algorithm, args.block_size).map_err(usage)
}

pub async fn run(args: ChecksumArgs) -> Result<(), Failure> {
    let spec = spec(&args)?;
    let Opened { endpoint: ep, http } = open(&args).await?;
    let opts = ReadOptions {
        request_size: args.request_size.unwrap_or(0),
        in_flight: args.requests as usize,
        extents: !args.no_extents,
    };
    // An imageio server that offers /checksum computes it next to the data: nothing crosses
    // the network but the digest. Any failure there falls back to reading.
    let from_server = match (&http, spec.kind) {
        (Some(server), Kind::Imageio) if !args.read => {
            match server
                .server_checksum(&spec.algorithm.name(), spec.block_size)
                .await
            {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!("{e}; reading the image instead");
                    None
                }
            }
        }
        _ => None,
    };
    let (hex, computed_by) = match from_server {
        Some(hex) => (hex, "server"),
        None => {
            let result = checksum_endpoint(ep.clone(), spec, &opts).await;
            if let Err(e) = ep.close().await {
                tracing::warn!("closing {}: {e}", ep.name());
            }
            (result?.to_hex(), "ferry")
        }
    };
    if args.json {
        let doc = serde_json::json!({
            "algorithm": spec.algorithm.name(),
            "block_size": spec.block_size,
            "checksum": hex,
            "computed_by": computed_by,
            "kind": spec.kind.name(),
            "size": ep.caps().size,
        });
        println!("{doc}");
    } else {
        println!("{hex}");
    }
    Ok(())
}

/// The checksum of everything `ep` holds: the one entry point for every endpoint kind, so an
/// endpoint type added to `disk` (or the imageio crate) is checksummed without changes here.
///
/// (Imageio URLs whose server offers `/checksum` are asked first, in [`run`].)
pub async fn checksum_endpoint(
    ep: Arc<dyn Endpoint>,
    spec: Spec,
    opts: &ReadOptions,
) -> Result<Digest, Failure> {
    Ok(checksum(ep, spec, opts).await?)
}

/// Opens the endpoint read-only, with extents unless they are turned off.
async fn open(args: &ChecksumArgs) -> Result<Opened, Failure> {
    let word = args.endpoint.as_str();
    let target = crate::endpoint::spec(word)?;
    if matches!(target, endpoints::Spec::Stdio | endpoints::Spec::Null) {
        return Err(usage(format!(
            "{word}: a checksum needs an image with a size (a file, device, NBD export or URL)"
        )));
    }
    let mut opts = read_options(&args.nbd, &args.http, CONNECTIONS);
    opts.extents = !args.no_extents;
    opts.src_format = args.src_format;
    crate::endpoint::open(&target, Role::Source, &opts).await
}
