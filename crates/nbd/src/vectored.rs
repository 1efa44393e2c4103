//! Writing a list of buffers to a stream in as few `writev` calls as it allows, without
//! copying them together first: NBD headers with their payloads, on both ends.

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// Writes every piece in order, as few syscalls as the stream allows; empties `pieces`.
pub(crate) async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    pieces: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    // Linux takes at most 1024 slices per writev.
    const MAX_SLICES: usize = 64;
    let mut first = 0;
    while first < pieces.len() {
        let slices: Vec<std::io::IoSlice<'_>> = pieces[first..]
            .iter()
            .take(MAX_SLICES)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let len = pieces[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                let _ = pieces[first].split_to(n);
                n = 0;
            }
        }
        while first < pieces.len() && pieces[first].is_empty() {
            first += 1;
        }
    }
    pieces.clear();
    Ok(())
}
