//! `ferry ticket add|show|mod|del|list`: the admin client of `ferry serve`'s control API (the
//! counterpart of `ovirt-imageioctl`), over its Unix socket or TCP address.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use server::ControlListen;
use server::client::{Method, Reply, request};

use crate::{Failure, usage};

#[derive(clap::Args, Debug)]
pub struct TicketArgs {
    /// The control service's Unix socket (`@NAME` = abstract).
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        conflicts_with = "control_listen"
    )]
    pub control_socket: Option<String>,
    /// The control service's TCP address.
    #[arg(long, value_name = "ADDR:PORT", global = true)]
    pub control_listen: Option<String>,
    #[command(subcommand)]
    pub action: TicketAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum TicketAction {
    /// Install a ticket: imageio ticket JSON from FILE (`-` = stdin), or built from flags.
    Add(AddArgs),
    /// Print a ticket's state as JSON.
    Show { id: String },
    /// Change when a ticket expires: now + TIMEOUT seconds.
    Mod {
        id: String,
        #[arg(long)]
        timeout: u64,
    },
    /// Cancel and remove a ticket (waits for running transfers to stop).
    Del { id: String },
    /// Print every ticket as a JSON array.
    List,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Ticket JSON file; `-` reads standard input.
    #[arg(conflicts_with_all = ["uuid", "url", "size"])]
    pub file: Option<PathBuf>,
    /// Ticket id (the `/images/ID` part of transfer URLs).
    #[arg(long, requires_all = ["url", "size"])]
    pub uuid: Option<String>,
    /// Backend: file:///path, nbd:unix:/path[:exportname=X], nbd://host:port/export.
    #[arg(long)]
    pub url: Option<String>,
    /// Bytes the client may address (K, M, G, T suffixes: powers of 1024).
    #[arg(long, value_parser = units::parse_size)]
    pub size: Option<u64>,
    /// Allowed operations, comma separated: read, write.
    #[arg(long, default_value = "read,write")]
    pub ops: String,
    /// Sliding expiry window in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Zero by punching holes.
    #[arg(long)]
    pub sparse: bool,
    /// Filename for downloads (content-disposition).
    #[arg(long)]
    pub filename: Option<String>,
}

fn ticket_body(args: AddArgs) -> Result<Vec<u8>, Failure> {
    if let Some(path) = args.file {
        let mut text = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut text)?;
        } else {
            text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        }
        return Ok(text);
    }
    let (Some(uuid), Some(url), Some(size)) = (args.uuid, args.url, args.size) else {
        return Err(usage("give a ticket FILE, or --uuid, --url and --size"));
    };
    let ops: Vec<&str> = args.ops.split(',').filter(|s| !s.is_empty()).collect();
    let mut doc = serde_json::json!({
        "uuid": uuid, "url": url, "size": size, "ops": ops, "timeout": args.timeout,
        "sparse": args.sparse,
    });
    if let Some(f) = args.filename {
        doc["filename"] = f.into();
    }
    Ok(doc.to_string().into_bytes())
}

/// The ticket's uuid, for the request path.
fn uuid_of(body: &[u8]) -> Result<String, Failure> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| usage(format!("ticket is not JSON: {e}")))?;
    v.get("uuid")
        .and_then(|u| u.as_str())
        .map(str::to_owned)
        .ok_or_else(|| usage("ticket has no \"uuid\" string"))
}

fn path_of(id: &str) -> String {
    let mut out = String::from("/tickets/");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn check(reply: Reply) -> Result<Reply, Failure> {
    if reply.status.is_success() {
        Ok(reply)
    } else {
        Err(Failure::from(anyhow::anyhow!(
            "control service answered {}: {}",
            reply.status.as_u16(),
            reply.text()
        )))
    }
}

fn print_json(reply: &Reply) {
    match serde_json::from_slice::<serde_json::Value>(&reply.body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => println!("{}", reply.text()),
    }
}

pub async fn run(args: TicketArgs) -> Result<(), Failure> {
    let addr = match (args.control_socket, args.control_listen) {
        (Some(p), None) => ControlListen::Unix(p),
        (None, Some(a)) => ControlListen::Tcp(a),
        _ => {
            return Err(usage(
                "give --control-socket PATH or --control-listen ADDR:PORT",
            ));
        }
    };
    let call = |method: Method, path: String, body: Option<Vec<u8>>| {
        let addr = addr.clone();
        async move {
            let reply = request(&addr, method, &path, body)
                .await
                .with_context(|| format!("contacting the control service at {addr:?}"))?;
            check(reply)
        }
    };
    match args.action {
        TicketAction::Add(a) => {
            let body = ticket_body(a)?;
            let id = uuid_of(&body)?;
            call(Method::PUT, path_of(&id), Some(body)).await?;
            println!("{id}");
        }
        TicketAction::Show { id } => {
            print_json(&call(Method::GET, path_of(&id), None).await?);
        }
        TicketAction::Mod { id, timeout } => {
            let body = serde_json::json!({ "timeout": timeout }).to_string();
            call(Method::PATCH, path_of(&id), Some(body.into_bytes())).await?;
        }
        TicketAction::Del { id } => {
            call(Method::DELETE, path_of(&id), None).await?;
        }
        TicketAction::List => {
            print_json(&call(Method::GET, "/tickets/".into(), None).await?);
        }
    }
    Ok(())
}
