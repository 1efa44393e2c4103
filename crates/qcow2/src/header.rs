//! The image header and its extensions (qcow2 spec, "Header" and "Header extensions").

use crate::error::{ErrorKind, Qcow2Error, Result};
use crate::storage::Storage;

pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Autoclear bit 0: the bitmaps extension matches the image (cleared by writers that do not
/// know bitmaps, which makes them stale).
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Longest backing file name qemu writes or accepts.
const MAX_BACKING_NAME: u32 = 1023;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// Location of the bitmap directory, from the bitmaps extension.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    /// log2 of the refcount width in bits (4 in version 2).
    pub refcount_order: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads exactly `buf.len()` bytes at `offset` or fails naming what was being read.
pub(crate) fn read_exact(
    path: &str,
    storage: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    let n = storage
        .read_at(buf, offset)
        .map_err(|e| Qcow2Error::io(path, Some(offset), &format!("reading {what}"), e))?;
    if n < buf.len() {
        return Err(Qcow2Error::corrupt(
            path,
            offset,
            format!(
                "{what} of {} bytes extends past the end of the file",
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Is this the start of a qcow2 image? Used to probe a backing file of unknown format.
pub(crate) fn is_qcow2(storage: &dyn Storage) -> bool {
    let mut magic = [0u8; 4];
    matches!(storage.read_at(&mut magic, 0), Ok(4)) && magic == MAGIC
}

fn feature_name(names: &[(u8, u8, String)], kind: u8, bit: u8) -> String {
    names
        .iter()
        .find(|(k, b, _)| *k == kind && *b == bit)
        .map(|(_, _, n)| format!("'{n}' (bit {bit})"))
        .unwrap_or_else(|| format!("bit {bit}"))
}

pub(crate) fn parse(path: &str, storage: &dyn Storage, file_len: u64) -> Result<Header> {
    let corrupt = |off: u64, msg: String| Qcow2Error::corrupt(path, off, msg);
    if file_len < 72 {
        return Err(corrupt(
            0,
            format!("not a qcow2 image: file is only {file_len} bytes"),
        ));
    }
    let mut fixed = [0u8; 104];
    let got = storage
        .read_at(&mut fixed, 0)
        .map_err(|e| Qcow2Error::io(path, Some(0), "reading the header", e))?;
    if fixed[..4] != MAGIC {
        return Err(corrupt(0, "not a qcow2 image: bad magic".into()));
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::new(
            path,
            ErrorKind::Unsupported,
            format!("qcow2 version {version} is not supported (only 2 and 3)"),
        )
        .at(4));
    }
    let cluster_bits = be32(&fixed, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(
            20,
            format!("cluster_bits {cluster_bits} outside 9..=21"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let crypt_method = be32(&fixed, 32);
    if crypt_method != 0 {
        return Err(Qcow2Error::new(
            path,
            ErrorKind::Unsupported,
            format!("encrypted images are not supported (crypt_method {crypt_method})"),
        )
        .at(32));
    }
    let (incompatible, autoclear, header_length, compression_byte) = if version == 3 {
        if got < 104 {
            return Err(corrupt(0, "version 3 header is truncated".into()));
        }
        let header_length = be32(&fixed, 100);
        if header_length < 104 || u64::from(header_length) > cluster_size {
            return Err(corrupt(
                100,
                format!("header_length {header_length} outside 104..={cluster_size}"),
            ));
        }
        let compression_byte = if header_length > 104 {
            let mut b = [0u8; 1];
            read_exact(path, storage, &mut b, 104, "the compression type")?;
            b[0]
        } else {
            0
        };
        (
            be64(&fixed, 72),
            be64(&fixed, 88),
            header_length,
            compression_byte,
        )
    } else {
        (0, 0, 72, 0)
    };

    // Extensions live in the rest of the first cluster.
    let ext_area_len = cluster_size.min(file_len) as usize;
    let mut first = vec![0u8; ext_area_len];
    read_exact(path, storage, &mut first, 0, "the first cluster")?;
    let mut backing_format = None;
    let mut names: Vec<(u8, u8, String)> = Vec::new();
    let mut bitmaps = None;
    let mut pos = header_length as usize;
    loop {
        if pos + 8 > first.len() {
            // qemu stops at the end of the cluster too; a missing end marker is tolerated.
            break;
        }
        let ty = be32(&first, pos);
        let len = be32(&first, pos + 4) as usize;
        let data_at = pos + 8;
        if ty == EXT_END {
            break;
        }
        if len > first.len() - data_at {
            return Err(corrupt(
                pos as u64,
                format!("header extension 0x{ty:08x} of {len} bytes runs past the first cluster"),
            ));
        }
        let data = &first[data_at..data_at + len];
        match ty {
            EXT_BACKING_FORMAT => {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    let raw = &entry[2..];
                    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                    let name = String::from_utf8_lossy(&raw[..end]).into_owned();
                    names.push((entry[0], entry[1], name));
                }
            }
            EXT_BITMAPS => {
                if len < 24 {
                    return Err(corrupt(
                        pos as u64,
                        format!("bitmaps extension is {len} bytes, needs 24"),
                    ));
                }
                bitmaps = Some(BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                });
            }
            EXT_DATA_FILE => {
                let name = String::from_utf8_lossy(data).into_owned();
                return Err(Qcow2Error::new(
                    path,
                    ErrorKind::Unsupported,
                    format!("images with an external data file ('{name}') are not supported"),
                )
                .at(pos as u64));
            }
            _ => {}
        }
        pos = data_at + len.div_ceil(8) * 8;
    }

    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt(
            72,
            "image is marked corrupt; repair it with 'qemu-img check -r all' first".into(),
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Qcow2Error::new(
            path,
            ErrorKind::Unsupported,
            "images with an external data file are not supported",
        )
        .at(72));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let list: Vec<String> = (0..64u8)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| feature_name(&names, 0, b))
            .collect();
        return Err(Qcow2Error::new(
            path,
            ErrorKind::Unsupported,
            format!("unsupported incompatible feature {}", list.join(", ")),
        )
        .at(72));
    }
    let compression = match (incompatible & INCOMPAT_COMPRESSION != 0, compression_byte) {
        (false, 0) => Compression::Zlib,
        (true, 1) => Compression::Zstd,
        (true, 0) => {
            return Err(corrupt(
                104,
                "compression type bit set with compression type zlib".into(),
            ));
        }
        (false, t) => {
            return Err(corrupt(
                104,
                format!("compression type {t} without the compression type feature bit"),
            ));
        }
        (true, t) => {
            return Err(Qcow2Error::new(
                path,
                ErrorKind::Unsupported,
                format!("unknown compression type {t}"),
            )
            .at(104));
        }
    };

    let backing_file_offset = be64(&fixed, 8);
    let backing_file_size = be32(&fixed, 16);
    let backing_file = if backing_file_offset != 0 {
        if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt(
                16,
                format!(
                    "backing file name size {backing_file_size} outside 1..={MAX_BACKING_NAME}"
                ),
            ));
        }
        let end = backing_file_offset.checked_add(u64::from(backing_file_size));
        match end {
            Some(end) if end <= first.len() as u64 => {
                let raw = &first[backing_file_offset as usize..end as usize];
                Some(String::from_utf8_lossy(raw).into_owned())
            }
            _ => {
                return Err(corrupt(
                    8,
                    format!(
                        "backing file name at {backing_file_offset} ({backing_file_size} bytes) is outside the first cluster"
                    ),
                ));
            }
        }
    } else {
        None
    };

    Ok(Header {
        version,
        cluster_bits,
        size: be64(&fixed, 24),
        l1_size: be32(&fixed, 36),
        l1_table_offset: be64(&fixed, 40),
        refcount_table_offset: be64(&fixed, 48),
        refcount_table_clusters: be32(&fixed, 56),
        nb_snapshots: be32(&fixed, 60),
        refcount_order: if version == 3 { be32(&fixed, 96) } else { 4 },
        incompatible,
        autoclear,
        compression,
        backing_file,
        backing_format,
        bitmaps,
    })
}
