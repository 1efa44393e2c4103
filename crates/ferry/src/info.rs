//! `ferry info`: what an NBD export (or a local file) is and offers.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::Context;
use nbd::Negotiated;
use nbd::proto::HeaderMode;
use nbd::proto::consts::{TFLAG_CAN_MULTI_CONN, transmission_flag_names};
use serde_json::json;

use endpoints::{Role, Spec};

use crate::endpoint::{HttpArgs, NbdArgs, failure, read_options, spec};
use crate::{Failure, usage};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or a local file or block device.
    pub target: String,
    /// How a local file or block device is read: `raw` (its bytes, the default), `qcow2`
    /// (the disk it holds, backing files followed) or `auto` (qcow2 by its magic, without
    /// backing files).
    #[arg(long, value_name = "FORMAT", default_value = "raw", value_parser = crate::copy_cmd::parse_format)]
    pub src_format: endpoints::Format,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// List the server's exports instead of describing one.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

pub async fn run(args: InfoArgs) -> Result<(), Failure> {
    let target = spec(&args.target)?;
    match &target {
        Spec::Http(url) => {
            if args.list {
                return Err(usage("--list needs an NBD URI"));
            }
            let opts = read_options(&args.nbd, &args.http, 1);
            let opened = crate::endpoint::open(&target, Role::Source, &opts).await?;
            let ep = opened.http.expect("an http spec opens an HTTP endpoint");
            print_http(url, &ep, args.json);
            Ok(())
        }
        Spec::Nbd(uri) => {
            let mut opts = args.nbd.options().connect_options(uri).map_err(failure)?;
            if args.list {
                let exports = opts
                    .list_exports()
                    .await
                    .with_context(|| format!("listing exports of {uri}"))?;
                print_list(&exports, args.json);
                return Ok(());
            }
            opts.settings.list_meta_contexts = true;
            opts.settings.full_info = true;
            let conn = opts
                .connect()
                .await
                .with_context(|| format!("connecting to {uri}"))?;
            print_nbd(&uri.to_string(), conn.info(), args.json);
            conn.disconnect().await;
            Ok(())
        }
        Spec::Path(path) if crate::map::qcow2_source(path, args.src_format)? => {
            let image = crate::map::open_qcow2(path, args.src_format)?;
            print_qcow2(&path.display().to_string(), &image, args.json);
            Ok(())
        }
        Spec::Path(path) => {
            if args.list {
                return Err(usage("--list needs an NBD URI"));
            }
            let meta = std::fs::metadata(path)
                .with_context(|| format!("reading metadata of {}", path.display()))?;
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let size = disk::file_extents::file_size(&file)
                .with_context(|| format!("reading the size of {}", path.display()))?;
            print_file(&path.display().to_string(), &meta, size, args.json);
            Ok(())
        }
        _ => Err(usage(format!(
            "{}: info describes an NBD export, an http(s) URL or a local file",
            args.target
        ))),
    }
}

fn print_qcow2(name: &str, image: &qcow2::Image, json: bool) {
    let compression = format!("{:?}", image.compression()).to_lowercase();
    if json {
        let doc = json!({
            "file": name,
            "format": "qcow2",
            "size": image.size(),
            "version": image.version(),
            "cluster_size": image.cluster_size(),
            "extended_l2": image.extended_l2(),
            "compression": compression,
            "backing_file": image.backing_file(),
            "chain_length": image.chain_len(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
        return;
    }
    println!("file: {name}");
    println!("format: qcow2 (version {})", image.version());
    println!("size: {} ({})", image.size(), units::size(image.size()));
    println!("cluster size: {}", image.cluster_size());
    println!("extended L2: {}", image.extended_l2());
    println!("compression: {compression}");
    if let Some(b) = image.backing_file() {
        println!("backing file: {b} (chain of {})", image.chain_len());
    }
}

fn print_http(url: &str, ep: &imageio::HttpEndpoint, json: bool) {
    use disk::Endpoint;
    let info = ep.server();
    let size = ep.caps().size.unwrap_or(0);
    if json {
        let doc = json!({
            "url": url,
            "protocol": if info.imageio { "imageio" } else { "http" },
            "size": size,
            "writable": info.writable,
            "features": info.features,
            "max_readers": info.max_readers,
            "max_writers": info.max_writers,
            "unix_socket": info.unix_socket.as_ref().map(|s| s.replace('\0', "@")),
            "ranges": info.ranges,
            "transport": info.transport,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
        return;
    }
    println!("url: {url}");
    println!(
        "protocol: {}",
        if info.imageio { "imageio" } else { "http" }
    );
    println!("size: {size} ({})", units::size(size));
    println!("writable: {}", info.writable);
    if info.imageio {
        println!("features: {}", info.features.join(" "));
        let limit = |v: Option<u64>| v.map_or("not given (1)".to_string(), |n| n.to_string());
        println!("max_readers: {}", limit(info.max_readers));
        println!("max_writers: {}", limit(info.max_writers));
        if let Some(socket) = &info.unix_socket {
            println!("unix_socket: {}", socket.replace('\0', "@"));
        }
    } else {
        println!("ranges: {}", info.ranges);
    }
    println!("transport: {}", info.transport);
}

fn replies_name(mode: HeaderMode) -> &'static str {
    match mode {
        HeaderMode::Simple => "simple",
        HeaderMode::Structured => "structured",
        HeaderMode::Extended => "extended",
    }
}

fn print_nbd(uri: &str, info: &Negotiated, json: bool) {
    let flags = transmission_flag_names(info.flags);
    let multi_conn = info.has_flag(TFLAG_CAN_MULTI_CONN);
    let b = info.block_size;
    if json {
        let value = json!({
            "uri": uri,
            "export": info.export,
            "canonical_name": info.canonical_name,
            "description": info.description,
            "size": info.size,
            "block_size": {
                "minimum": b.minimum,
                "preferred": b.preferred,
                "maximum": b.maximum,
                "advertised": info.block_size_advertised,
            },
            "transmission_flags": info.flags,
            "flags": flags,
            "negotiated": {
                "tls": info.tls,
                "replies": replies_name(info.mode),
                "structured_replies": info.mode != HeaderMode::Simple,
                "extended_headers": info.mode == HeaderMode::Extended,
                "export_name_fallback": info.export_name_fallback,
            },
            "multi_conn": multi_conn,
            "contexts": info.offered_contexts,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON value")
        );
        return;
    }
    println!("uri:          {uri}");
    println!("export:       {:?}", info.export);
    if let Some(name) = &info.canonical_name {
        println!("canonical:    {name:?}");
    }
    if let Some(desc) = info.description.as_deref().filter(|d| !d.is_empty()) {
        println!("description:  {desc}");
    }
    println!("size:         {} ({})", info.size, units::size(info.size));
    println!(
        "block sizes:  minimum {}, preferred {}, maximum {}{}",
        b.minimum,
        b.preferred,
        b.maximum,
        if info.block_size_advertised {
            ""
        } else {
            " (not advertised: protocol defaults)"
        }
    );
    println!(
        "negotiated:   {} replies, TLS {}{}",
        replies_name(info.mode),
        if info.tls { "yes" } else { "no" },
        if info.export_name_fallback {
            ", via NBD_OPT_EXPORT_NAME (server lacks NBD_OPT_GO)"
        } else {
            ""
        }
    );
    println!("multi-conn:   {}", if multi_conn { "yes" } else { "no" });
    println!("flags:        {:#06x} {}", info.flags, flags.join(" "));
    if info.mode == HeaderMode::Simple {
        println!("contexts:     (none: no structured replies)");
    } else if info.offered_contexts.is_empty() {
        println!("contexts:     (none offered)");
    } else {
        println!("contexts:");
        for c in &info.offered_contexts {
            println!("  {c}");
        }
    }
}

fn print_list(exports: &[(String, String)], json: bool) {
    if json {
        let list: Vec<_> = exports
            .iter()
            .map(|(name, description)| json!({"name": name, "description": description}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("JSON value")
        );
        return;
    }
    for (name, description) in exports {
        if description.is_empty() {
            println!("{name:?}");
        } else {
            println!("{name:?}\t{description}");
        }
    }
}

fn print_file(path: &str, meta: &std::fs::Metadata, size: u64, json: bool) {
    let kind = if meta.file_type().is_block_device() {
        "block device"
    } else {
        "regular file"
    };
    let allocated = meta.blocks() * 512;
    if json {
        let value = json!({
            "path": path,
            "kind": kind,
            "size": size,
            "allocated": allocated,
            "preferred_block_size": meta.blksize(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON value")
        );
        return;
    }
    println!("path:         {path}");
    println!("kind:         {kind}");
    println!("size:         {size} ({})", units::size(size));
    println!("allocated:    {allocated} ({})", units::size(allocated));
    println!("block size:   preferred {}", meta.blksize());
}
