//! Write-behind for buffered file destinations. A copy dirties pages far faster than the disk
//! takes them; left to the kernel, every new page of the destination must first be reclaimed
//! from the (usually full) page cache, which costs the writer CPU, and the dirty pages pile up
//! until writeback throttles. A helper thread instead starts writeback of each range soon
//! after it is written and, once a window of ranges is in flight, waits for the oldest and
//! drops its pages, so the copy keeps reusing a bounded set of pages. The waits happen on
//! that thread, never in the write path.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;

/// Bytes written but not yet dropped from the page cache, at most.
const WINDOW: u64 = 64 << 20;
/// Neighbouring writes are gathered into ranges of this size before writeback starts.
const RANGE: u64 = 2 << 20;

pub struct WriteBehind {
    written: mpsc::Sender<(u64, u64)>,
}

impl WriteBehind {
    /// Starts the helper thread on its own handle of `file`.
    pub fn start(file: &File) -> std::io::Result<WriteBehind> {
        let file = file.try_clone()?;
        let (tx, rx) = mpsc::channel::<(u64, u64)>();
        std::thread::Builder::new()
            .name("ferry-writeback".into())
            .spawn(move || run(file, rx))?;
        Ok(WriteBehind { written: tx })
    }

    /// Reports [offset, offset+len) as written. Never blocks.
    pub fn written(&self, offset: u64, len: u64) {
        // The thread only ends when this handle is dropped, so a send cannot fail earlier; a
        // failure would only mean less write-behind.
        let _ = self.written.send((offset, len));
    }
}

fn run(file: File, written: mpsc::Receiver<(u64, u64)>) {
    let fd = file.as_raw_fd();
    let mut window: VecDeque<(u64, u64)> = VecDeque::new();
    let mut in_window = 0u64;
    // The range being gathered.
    let mut open: Option<(u64, u64)> = None;
    let start_writeback = |(offset, len): (u64, u64)| {
        // SAFETY: sync_file_range only reads its integer arguments; `fd` belongs to `file`,
        // which this thread owns for its whole life.
        unsafe {
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    };
    while let Ok((offset, len)) = written.recv() {
        match &mut open {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                if let Some(done) = open.replace((offset, len)) {
                    start_writeback(done);
                    window.push_back(done);
                    in_window += done.1;
                }
            }
        }
        if let Some(range) = open.filter(|r| r.1 >= RANGE) {
            open = None;
            start_writeback(range);
            window.push_back(range);
            in_window += range.1;
        }
        while in_window > WINDOW {
            let (o, l) = window.pop_front().expect("window holds the bytes counted");
            in_window -= l;
            // SAFETY: as above; both calls only take integers and this thread's descriptor.
            unsafe {
                libc::sync_file_range(
                    fd,
                    o as libc::off64_t,
                    l as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(
                    fd,
                    o as libc::off64_t,
                    l as libc::off64_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }
    // The endpoint is gone: what is still dirty is left to the kernel (and to a flush).
}
