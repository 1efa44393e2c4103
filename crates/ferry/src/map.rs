//! `ferry map`: the extents of an NBD export (any meta context) or a local file, printed with
//! `nbdinfo --map`'s columns or as its JSON list. Output streams window by window, so a
//! many-TiB image never holds its whole map in memory.

use std::io::Write;

use anyhow::Context;
use nbd::proto::consts::{
    CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX, STATE_HOLE,
    STATE_ZERO,
};

use endpoints::{Role, Spec};

use crate::endpoint::{HttpArgs, NbdArgs, failure, read_options, spec};
use crate::{Failure, usage};

/// Bytes of the image examined per step.
const WINDOW: u64 = 8 << 30;

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// NBD URI or a local file or block device.
    pub target: String,
    /// How a local file or block device is read: `raw` (its bytes, the default), `qcow2`
    /// (the disk it holds, backing files followed) or `auto` (qcow2 by its magic, without
    /// backing files).
    #[arg(long, value_name = "FORMAT", default_value = "raw", value_parser = crate::copy_cmd::parse_format)]
    pub src_format: endpoints::Format,
    /// Print a JSON list of {"offset","length","type","description"} objects.
    #[arg(long)]
    pub json: bool,
    /// Meta context to map: base:allocation, qemu:allocation-depth, qemu:dirty-bitmap:NAME.
    #[arg(long, value_name = "NAME", default_value = CONTEXT_BASE_ALLOCATION)]
    pub context: String,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// One output row; consecutive rows of equal type are merged before printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub offset: u64,
    pub length: u64,
    pub kind: u64,
}

/// What a status value means in `context`, as nbdinfo words it.
pub fn describe(context: &str, kind: u64) -> String {
    if context == CONTEXT_BASE_ALLOCATION {
        let hole = kind & u64::from(STATE_HOLE) != 0;
        let zero = kind & u64::from(STATE_ZERO) != 0;
        return match (hole, zero) {
            (false, false) => "data",
            (true, false) => "hole",
            (false, true) => "zero",
            (true, true) => "hole,zero",
        }
        .into();
    }
    if context == CONTEXT_ALLOCATION_DEPTH {
        return match kind {
            0 => "absent".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        };
    }
    if context.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX) {
        return if kind & 1 != 0 { "dirty" } else { "clean" }.into();
    }
    String::new()
}

/// Prints rows as they come, merging neighbours of equal type.
struct Printer<'a> {
    out: std::io::BufWriter<std::io::StdoutLock<'a>>,
    context: String,
    json: bool,
    printed: usize,
    held: Option<Row>,
}

impl Printer<'_> {
    fn push(&mut self, row: Row) -> std::io::Result<()> {
        match &mut self.held {
            Some(h) if h.kind == row.kind && h.offset + h.length == row.offset => {
                h.length += row.length;
                Ok(())
            }
            _ => {
                if let Some(prev) = self.held.replace(row) {
                    self.emit(prev)?;
                }
                Ok(())
            }
        }
    }

    fn emit(&mut self, row: Row) -> std::io::Result<()> {
        let description = describe(&self.context, row.kind);
        if self.json {
            let sep = if self.printed == 0 { "[\n" } else { ",\n" };
            let desc = serde_json::to_string(&description).expect("string");
            write!(
                self.out,
                "{sep}{{ \"offset\": {}, \"length\": {}, \"type\": {}, \"description\": {desc}}}",
                row.offset, row.length, row.kind
            )?;
        } else {
            writeln!(
                self.out,
                "{:>10}  {:>10}  {:>3}  {description}",
                row.offset, row.length, row.kind
            )?;
        }
        self.printed += 1;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        if let Some(row) = self.held.take() {
            self.emit(row)?;
        }
        if self.json {
            let open = if self.printed == 0 { "[" } else { "" };
            writeln!(self.out, "{open}\n]")?;
        }
        self.out.flush()
    }
}

pub async fn run(args: MapArgs) -> Result<(), Failure> {
    let stdout = std::io::stdout();
    let mut printer = Printer {
        out: std::io::BufWriter::new(stdout.lock()),
        context: args.context.clone(),
        json: args.json,
        printed: 0,
        held: None,
    };
    let target = spec(&args.target)?;
    match &target {
        Spec::Nbd(uri) => map_nbd(uri, &args, &mut printer).await?,
        Spec::Http(url) => map_http(&target, url, &args, &mut printer).await?,
        Spec::Path(path) if qcow2_source(path, args.src_format)? => {
            map_qcow2(path, args.src_format, &args.context, &mut printer)?;
        }
        Spec::Path(path) => {
            if args.context != CONTEXT_BASE_ALLOCATION {
                return Err(usage(format!(
                    "a local file has only the {CONTEXT_BASE_ALLOCATION} context, not {}",
                    args.context
                )));
            }
            map_file(path, &mut printer)?;
        }
        _ => {
            return Err(usage(format!(
                "{}: map reads an NBD export, an http(s) URL or a local file",
                args.target
            )));
        }
    }
    printer.finish().context("writing the map")?;
    Ok(())
}

async fn map_nbd(
    uri: &nbd::uri::NbdUri,
    args: &MapArgs,
    printer: &mut Printer<'_>,
) -> Result<(), Failure> {
    let mut opts = args.nbd.options().connect_options(uri).map_err(failure)?;
    opts.settings.meta_contexts = vec![args.context.clone()];
    opts.settings.list_meta_contexts = true;
    let client = nbd::Client::connect(&opts, 1)
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let size = client.size();
    if client.info().context_id(&args.context).is_none() {
        if args.context == CONTEXT_BASE_ALLOCATION {
            // Servers without block status (e.g. nbd-server) hold data everywhere as far as
            // anyone can tell: say so instead of failing.
            eprintln!(
                "ferry: {uri} offers no {CONTEXT_BASE_ALLOCATION}; reporting the whole export as data"
            );
            if size > 0 {
                printer.push(Row {
                    offset: 0,
                    length: size,
                    kind: 0,
                })?;
            }
            client.disconnect().await;
            return Ok(());
        }
        let offered = &client.info().offered_contexts;
        return Err(anyhow::anyhow!(
            "{uri} does not offer meta context {:?} (offered: {})",
            args.context,
            if offered.is_empty() {
                "none".to_string()
            } else {
                offered.join(", ")
            }
        )
        .into());
    }
    let mut offset = 0;
    while offset < size {
        let len = WINDOW.min(size - offset);
        let extents = client
            .block_status(&args.context, offset, len)
            .await
            .with_context(|| format!("block status of {uri} at offset {offset} length {len}"))?;
        for e in extents {
            printer.push(Row {
                offset: e.offset,
                length: e.length,
                kind: e.flags,
            })?;
        }
        offset += len;
    }
    client.disconnect().await;
    Ok(())
}

/// An imageio URL's extents: `zero` context as base:allocation values (a qcow2 hole is
/// `hole,zero`), `dirty` context (or a dirty bitmap name) as dirty/clean.
async fn map_http(
    target: &Spec,
    url: &str,
    args: &MapArgs,
    printer: &mut Printer<'_>,
) -> Result<(), Failure> {
    use disk::Endpoint;
    let dirty = args.context == "dirty" || args.context.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX);
    if !dirty && args.context != CONTEXT_BASE_ALLOCATION {
        return Err(usage(format!(
            "an imageio URL has the {CONTEXT_BASE_ALLOCATION} (zero) and dirty contexts, not {}",
            args.context
        )));
    }
    if dirty {
        // Rows are described as dirty/clean.
        printer.context = format!("{CONTEXT_DIRTY_BITMAP_PREFIX}imageio");
    }
    let opts = read_options(&args.nbd, &args.http, 1);
    let opened = crate::endpoint::open(target, Role::Source, &opts).await?;
    let ep = opened.http.expect("an http spec opens an HTTP endpoint");
    let size = ep.caps().size.unwrap_or(0);
    if !dirty && !ep.caps().extents {
        return Err(anyhow::anyhow!("{url}: the server does not offer extents").into());
    }
    let mut offset = 0;
    while offset < size {
        let len = WINDOW.min(size - offset);
        if dirty {
            for (e, is_dirty) in ep.dirty_extents(offset, len).await? {
                printer.push(Row {
                    offset: e.offset,
                    length: e.length,
                    kind: u64::from(is_dirty),
                })?;
            }
        } else {
            for e in ep.extents(offset, len).await? {
                printer.push(allocation_row(&e))?;
            }
        }
        offset += len;
    }
    Ok(())
}

/// An extent as a `base:allocation` row: data 0, zero 2, hole and zero 3.
fn allocation_row(e: &disk::Extent) -> Row {
    let kind = match (e.zero, e.hole) {
        (false, _) => 0,
        (true, false) => u64::from(STATE_ZERO),
        (true, true) => u64::from(STATE_HOLE | STATE_ZERO),
    };
    Row {
        offset: e.offset,
        length: e.length,
        kind,
    }
}

/// Is `path` to be read as qcow2 under `format`?
pub fn qcow2_source(path: &std::path::Path, format: endpoints::Format) -> Result<bool, Failure> {
    use std::io::Read;
    Ok(match format {
        endpoints::Format::Raw => false,
        endpoints::Format::Qcow2 => true,
        endpoints::Format::Auto => {
            let mut magic = [0u8; 4];
            let mut f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            f.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb"
        }
    })
}

/// Opens a qcow2 image for `info` and `map`: with its backing chain only when the user said
/// qcow2 (a probed image may not name other files).
pub fn open_qcow2(
    path: &std::path::Path,
    format: endpoints::Format,
) -> Result<qcow2::Image, Failure> {
    let opts = qcow2::OpenOptions {
        follow_backing: format == endpoints::Format::Qcow2,
        ..qcow2::OpenOptions::default()
    };
    Ok(qcow2::Image::open(path, &opts)?)
}

/// The guest view's extents from a qcow2 image's tables: `base:allocation` (data, zero, and
/// holes where no image of the chain allocates) or `qemu:allocation-depth` (0 unallocated, 1
/// the image itself, 2 its backing file, ...), as qemu-nbd serves them.
fn map_qcow2(
    path: &std::path::Path,
    format: endpoints::Format,
    context: &str,
    printer: &mut Printer<'_>,
) -> Result<(), Failure> {
    let depth = match context {
        CONTEXT_BASE_ALLOCATION => false,
        CONTEXT_ALLOCATION_DEPTH => true,
        other => {
            return Err(usage(format!(
                "a qcow2 image has the {CONTEXT_BASE_ALLOCATION} and \
                 {CONTEXT_ALLOCATION_DEPTH} contexts, not {other}"
            )));
        }
    };
    let image = open_qcow2(path, format)?;
    let size = image.size();
    let mut offset = 0;
    while offset < size {
        let len = WINDOW.min(size - offset);
        for e in image.extents(offset, len)? {
            let kind = match (depth, e.kind) {
                (false, qcow2::ExtentKind::Data) => 0,
                (false, _) => u64::from(STATE_HOLE | STATE_ZERO),
                (true, qcow2::ExtentKind::Unallocated) => 0,
                (true, _) => u64::from(e.depth) + 1,
            };
            printer.push(Row {
                offset: e.offset,
                length: e.length,
                kind,
            })?;
        }
        offset += len;
    }
    Ok(())
}

fn map_file(path: &std::path::Path, printer: &mut Printer<'_>) -> Result<(), Failure> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = disk::file_extents::file_size(&file)
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let mut offset = 0;
    while offset < size {
        let len = WINDOW.min(size - offset);
        let extents = disk::file_extents::file_extents(&file, offset, len).with_context(|| {
            format!(
                "finding extents of {} at offset {offset} length {len}",
                path.display()
            )
        })?;
        for e in extents {
            printer.push(allocation_row(&e))?;
        }
        offset += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn descriptions_match_nbdinfo() {
        assert_eq!(describe("base:allocation", 0), "data");
        assert_eq!(describe("base:allocation", 1), "hole");
        assert_eq!(describe("base:allocation", 2), "zero");
        assert_eq!(describe("base:allocation", 3), "hole,zero");
        assert_eq!(describe("qemu:allocation-depth", 0), "absent");
        assert_eq!(describe("qemu:allocation-depth", 1), "local");
        assert_eq!(describe("qemu:allocation-depth", 2), "backing depth 2");
        assert_eq!(describe("qemu:dirty-bitmap:b0", 1), "dirty");
        assert_eq!(describe("qemu:dirty-bitmap:b0", 0), "clean");
    }
}
