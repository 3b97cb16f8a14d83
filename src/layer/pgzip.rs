//! Parallel gzip whose bytes do not depend on the thread count, as pigz does it.
//!
//! The input is cut into fixed 128 KiB blocks. Each block is deflated on its own, primed with
//! the previous 32 KiB of input as dictionary, and ended with a sync flush (the last one with a
//! final block), so the raw deflate streams concatenate into one valid stream inside a single
//! gzip member (<https://www.rfc-editor.org/rfc/rfc1952>). A block's bytes are a function of its
//! input and the 32 KiB before it only, so any number of threads gives the same output.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Input bytes per independently compressed block (pigz's default).
const BLOCK: usize = 128 * 1024;
/// The deflate window: how much preceding input primes each block.
const DICT: usize = 32 * 1024;

/// A block to compress: sequence number, its 32 KiB dictionary, its input.
type Job = (u64, Arc<Vec<u8>>, Arc<Vec<u8>>);
/// A compressed block: sequence number and raw deflate bytes.
type Done = (u64, io::Result<Vec<u8>>);

/// A gzip writer whose blocks are compressed by a pool of `threads` workers while the caller
/// keeps producing input (tar headers, file reads, the diff_id hash): the producer and the
/// compressors overlap, and compressed blocks are written in order as they complete. At most
/// `2 × threads` blocks are in flight, so memory stays bounded whatever the input size.
pub(crate) struct ParGzEncoder<W: Write> {
    /// The destination; taken by `finish`.
    out: Option<W>,
    level: u32,
    /// Blocks in flight before the producer waits.
    window: usize,
    /// The block being filled.
    current: Vec<u8>,
    /// The block before `current` (its tail primes `current`).
    previous: Arc<Vec<u8>>,
    crc: Crc,
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    workers: Vec<thread::JoinHandle<()>>,
    /// Next sequence number to hand out / to write.
    next_seq: u64,
    next_write: u64,
    /// Compressed blocks that finished out of order.
    ready: BTreeMap<u64, Vec<u8>>,
}

impl<W: Write> ParGzEncoder<W> {
    /// Start a gzip member (no name, mtime 0, OS byte `os`) on `out`.
    pub(crate) fn new(mut out: W, level: u32, threads: u32, os: u8) -> io::Result<Self> {
        // XFL as zlib sets it: 2 for maximum compression, 4 for the fastest levels.
        let xfl = match level {
            9 => 2,
            0 | 1 => 4,
            _ => 0,
        };
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, os])?;
        let threads = usize::try_from(threads).unwrap_or(1).max(1);
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, results) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                thread::spawn(move || {
                    // A fresh deflate state per block: a reset state was measured to give other
                    // bytes than a fresh one (zlib-rs), which would tie output to scheduling.
                    loop {
                        let job = job_rx.lock().ok().and_then(|rx| rx.recv().ok());
                        let Some((seq, dict, block)) = job else {
                            return;
                        };
                        let out = deflate_block(level, tail(&dict), &block, false);
                        if done_tx.send((seq, out)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Ok(ParGzEncoder {
            out: Some(out),
            level,
            window: 2 * threads,
            current: Vec::with_capacity(BLOCK),
            previous: Arc::new(Vec::new()),
            crc: Crc::new(),
            jobs: Some(jobs),
            results,
            workers,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
        })
    }

    /// Wait for one compressed block and write out everything that is now in order.
    fn collect_one(&mut self) -> io::Result<()> {
        let (seq, block) = self
            .results
            .recv()
            .map_err(|_| io::Error::other("gzip compression workers stopped"))?;
        self.ready.insert(seq, block?);
        while let Some(block) = self.ready.remove(&self.next_write) {
            self.out()?.write_all(&block)?;
            self.next_write += 1;
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        while self.next_seq - self.next_write >= self.window as u64 {
            self.collect_one()?;
        }
        let block = Arc::new(std::mem::replace(
            &mut self.current,
            Vec::with_capacity(BLOCK),
        ));
        let dict = std::mem::replace(&mut self.previous, Arc::clone(&block));
        self.jobs
            .as_ref()
            .expect("jobs are open until finish")
            .send((self.next_seq, dict, block))
            .map_err(|_| io::Error::other("gzip compression workers stopped"))?;
        self.next_seq += 1;
        Ok(())
    }

    /// Compress what is pending, write the final block and the trailer, and return the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        while self.next_write < self.next_seq {
            self.collect_one()?;
        }
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let last = deflate_block(self.level, tail(&self.previous), &self.current, true)?;
        let (sum, amount) = (self.crc.sum(), self.crc.amount());
        let mut out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("gzip writer already finished"))?;
        out.write_all(&last)?;
        out.write_all(&sum.to_le_bytes())?;
        out.write_all(&amount.to_le_bytes())?;
        Ok(out)
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip writer already finished"))
    }
}

impl<W: Write> Drop for ParGzEncoder<W> {
    fn drop(&mut self) {
        // Closing the job channel stops the workers (also after an error).
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.current.len() == BLOCK {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing would cut a block early and change the bytes; `finish` writes everything.
        Ok(())
    }
}

fn tail(block: &[u8]) -> &[u8] {
    &block[block.len().saturating_sub(DICT)..]
}

/// Raw-deflate `input` primed with `dict`, ending in a sync flush, or in the final block.
fn deflate_block(level: u32, dict: &[u8], input: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(input.len() / 2 + 1024);
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let consumed = usize::try_from(c.total_in()).map_err(io::Error::other)?;
        let status = c
            .compress_vec(&input[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() == input.len() as u64;
        // zlib's contract: a flush is complete once it returns with output space to spare.
        let done = match flush {
            FlushCompress::Finish => status == Status::StreamEnd,
            _ => all_in && out.len() < out.capacity(),
        };
        if done {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn output_is_one_valid_member_for_any_thread_count() {
        let data: Vec<u8> = (0..(5 * BLOCK + 777))
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        let mut outs = Vec::new();
        for threads in [1, 2, 3, 8] {
            let mut gz = ParGzEncoder::new(Vec::new(), 6, threads, 255).unwrap();
            // Odd write sizes: block boundaries must not depend on them.
            for chunk in data.chunks(10_007) {
                gz.write_all(chunk).unwrap();
            }
            outs.push(gz.finish().unwrap());
        }
        assert!(outs.windows(2).all(|w| w[0] == w[1]));
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&outs[0][..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        assert!(outs[0].len() < data.len() / 4);
        // Empty input, and input that ends exactly on a block boundary.
        for len in [0, BLOCK, 2 * BLOCK] {
            let mut gz = ParGzEncoder::new(Vec::new(), 9, 2, 255).unwrap();
            gz.write_all(&data[..len]).unwrap();
            let out = gz.finish().unwrap();
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data[..len]);
        }
    }
}
