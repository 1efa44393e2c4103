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
use std::sync::Mutex;
use std::sync::mpsc;

/// Bytes written but not yet dropped from the page cache, at most.
const WINDOW: u64 = 64 << 20;
/// Neighbouring writes are gathered into ranges of this size before writeback starts.
const RANGE: u64 = 2 << 20;

pub struct WriteBehind {
    written: mpsc::Sender<(u64, u64)>,
    /// Ranges being gathered, one per sequential writer (each pipeline writes its own work
    /// range in order). Only whole ranges reach the thread: a message per write would wake it
    /// for every request, and those wake-ups cost the writers more than the writeback saves.
    gathering: Mutex<[Option<(u64, u64)>; GATHER_SLOTS]>,
}

/// Sequential write streams followed at once; a further one evicts the least grown range.
const GATHER_SLOTS: usize = 8;

impl WriteBehind {
    /// Starts the helper thread on its own handle of `file`.
    pub fn start(file: &File) -> std::io::Result<WriteBehind> {
        let file = file.try_clone()?;
        let (tx, rx) = mpsc::channel::<(u64, u64)>();
        std::thread::Builder::new()
            .name("ferry-writeback".into())
            .spawn(move || run(file, rx))?;
        Ok(WriteBehind {
            written: tx,
            gathering: Mutex::new([None; GATHER_SLOTS]),
        })
    }

    /// Reports [offset, offset+len) as written. Never blocks on the disk.
    pub fn written(&self, offset: u64, len: u64) {
        let ready = {
            let mut slots = self.gathering.lock().unwrap_or_else(|p| p.into_inner());
            gather(&mut slots, offset, len)
        };
        if let Some(range) = ready {
            // The thread only ends when this handle is dropped, so a send cannot fail
            // earlier; a failure would only mean less write-behind.
            let _ = self.written.send(range);
        }
    }
}

/// Adds a write to the ranges being gathered; returns a range that is ready for writeback
/// (grown to [`RANGE`], or evicted to make room).
fn gather(
    slots: &mut [Option<(u64, u64)>; GATHER_SLOTS],
    offset: u64,
    len: u64,
) -> Option<(u64, u64)> {
    if let Some(slot) = slots
        .iter_mut()
        .find(|s| s.is_some_and(|(o, l)| o + l == offset))
    {
        let (o, l) = slot.expect("found a gathering range");
        let grown = (o, l + len);
        if grown.1 >= RANGE {
            *slot = None;
            return Some(grown);
        }
        *slot = Some(grown);
        return None;
    }
    if len >= RANGE {
        return Some((offset, len));
    }
    if let Some(slot) = slots.iter_mut().find(|s| s.is_none()) {
        *slot = Some((offset, len));
        return None;
    }
    let smallest = slots
        .iter_mut()
        .min_by_key(|s| s.map_or(0, |(_, l)| l))
        .expect("there are slots");
    smallest.replace((offset, len))
}

fn run(file: File, written: mpsc::Receiver<(u64, u64)>) {
    let fd = file.as_raw_fd();
    let mut window: VecDeque<(u64, u64)> = VecDeque::new();
    let mut in_window = 0u64;
    while let Ok((offset, len)) = written.recv() {
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
        window.push_back((offset, len));
        in_window += len;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_sequential_writers_are_gathered_into_whole_ranges() {
        let mut slots = [None; GATHER_SLOTS];
        let chunk = 256 << 10;
        let mut ready = Vec::new();
        // Two writers, 128 MiB apart, alternating 256 KiB writes.
        for i in 0..16u64 {
            for base in [0u64, 128 << 20] {
                ready.extend(gather(&mut slots, base + i * chunk, chunk));
            }
        }
        assert_eq!(
            ready,
            vec![
                (0, RANGE),
                (128 << 20, RANGE),
                (RANGE, RANGE),
                ((128 << 20) + RANGE, RANGE)
            ]
        );
        assert!(slots.iter().all(Option::is_none));
    }

    #[test]
    fn a_new_stream_evicts_the_least_grown_range() {
        let mut slots = [None; GATHER_SLOTS];
        for i in 0..GATHER_SLOTS as u64 {
            assert_eq!(gather(&mut slots, i << 30, 4096 * (i + 1)), None);
        }
        assert_eq!(gather(&mut slots, 100 << 30, 4096), Some((0, 4096)));
        assert_eq!(gather(&mut slots, 0, RANGE), Some((0, RANGE)));
    }
}
