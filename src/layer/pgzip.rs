//! Parallel gzip whose bytes do not depend on the thread count, as pigz does it.
//!
//! The input is cut into blocks of about 128 KiB. Each block is deflated on its own, primed
//! with the previous 32 KiB of input as dictionary, and ended with a sync flush (the last one
//! with a final block), so the raw deflate streams concatenate into one valid stream inside a
//! single gzip member (<https://www.rfc-editor.org/rfc/rfc1952>). A block's bytes are a function
//! of its input and the 32 KiB before it only, so any number of threads gives the same output.
//!
//! **Content-defined cuts and block reuse.** Plain writers cut every 128 KiB of input. A layer
//! writer instead calls [`ParGzEncoder::cut`] at each tar entry and every 128 KiB of a file's
//! data, so block boundaries follow the entries rather than absolute offsets: a file that
//! grows by a line moves no boundary after the next entry, and the later blocks keep their
//! bytes. With [`BlockOptions::record`] each block gets a key (sha256 of the format, level,
//! dictionary and input) and its place in the output is recorded; a later build given those
//! records and the earlier blob ([`ReuseSource`]) copies a block whose key matches instead of
//! compressing it again. Copied bytes are exactly what compressing would give (a fresh deflate
//! state per block, same level, same dictionary), so reuse never changes the output; the
//! copied range is checked against its recorded length and CRC-32 first.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;

use flate2::{Compress, Crc, FlushCompress, Status};

use crate::digest::Hasher;

/// Input bytes per independently compressed block (pigz's default).
pub(crate) const BLOCK: usize = 128 * 1024;
/// The deflate window: how much preceding input primes each block.
const DICT: usize = 32 * 1024;
/// With cuts driven by the caller, a block is still cut at this size (a safety net: a layer
/// writer's blocks stay below about 2 × [`BLOCK`]).
const MAX_HINTED_BLOCK: usize = 8 * BLOCK;
/// Namespace of block keys: a new strata version may compress differently, so its keys differ.
const KEY_FORMAT: &str = concat!("strata-pgzip-block-v1 ", env!("CARGO_PKG_VERSION"));

/// Where a compressed block sits in a blob, and the key of the input it compresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    /// sha256 over the format, level, dictionary and block input.
    pub key: [u8; 32],
    /// Offset of the block's raw deflate bytes in the blob.
    pub offset: u64,
    /// Length of those bytes.
    pub len: u32,
    /// CRC-32 of those bytes.
    pub crc: u32,
}

/// An earlier blob and its block records: blocks a new layer may copy.
pub struct ReuseSource {
    blob: std::fs::File,
    blocks: HashMap<[u8; 32], BlockRecord>,
    hits: std::sync::atomic::AtomicUsize,
}

impl ReuseSource {
    /// `blob` (opened for reading) with the records made when it was written.
    pub fn new(blob: std::fs::File, records: &[BlockRecord]) -> ReuseSource {
        ReuseSource {
            blob,
            blocks: records.iter().map(|r| (r.key, *r)).collect(),
            hits: Default::default(),
        }
    }

    /// How many blocks were copied from this source so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The recorded bytes for `key`, if present and intact.
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        let r = self.blocks.get(key)?;
        let mut buf = vec![0; usize::try_from(r.len).ok()?];
        self.blob.read_exact_at(&mut buf, r.offset).ok()?;
        let mut crc = Crc::new();
        crc.update(&buf);
        let intact = crc.sum() == r.crc;
        if intact {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        intact.then_some(buf)
    }
}

impl std::fmt::Debug for ReuseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReuseSource")
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

/// How blocks are cut, recorded and reused.
#[derive(Clone, Debug, Default)]
pub struct BlockOptions {
    /// The caller cuts blocks with [`ParGzEncoder::cut`] (else every [`BLOCK`] bytes).
    pub hinted: bool,
    /// Key every block and record where it lands, for reuse by a later build.
    pub record: bool,
    /// Blocks of an earlier blob to copy when their key matches.
    pub reuse: Option<Arc<ReuseSource>>,
}

/// A block to compress: sequence number, its 32 KiB dictionary, its input.
type Job = (u64, Arc<Vec<u8>>, Arc<Vec<u8>>);
/// A compressed block: its raw deflate bytes, and its key when recording.
type Block = (Vec<u8>, Option<[u8; 32]>);
/// A finished job: sequence number and block.
type Done = (u64, io::Result<Block>);

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
    /// Cut at `cut` calls rather than every `BLOCK` bytes.
    hinted: bool,
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
    ready: BTreeMap<u64, Block>,
    /// Bytes written to `out` so far (the gzip header included).
    written: u64,
    /// Where each keyed block landed.
    records: Vec<BlockRecord>,
}

impl<W: Write> ParGzEncoder<W> {
    /// Start a gzip member (no name, mtime 0, OS byte `os`) on `out`, cutting every
    /// [`BLOCK`] bytes.
    #[cfg(test)]
    pub(crate) fn new(out: W, level: u32, threads: u32, os: u8) -> io::Result<Self> {
        Self::with_options(out, level, threads, os, BlockOptions::default())
    }

    /// Start a gzip member (no name, mtime 0, OS byte `os`) on `out`, with block cutting,
    /// recording and reuse as `opts` says.
    pub(crate) fn with_options(
        mut out: W,
        level: u32,
        threads: u32,
        os: u8,
        opts: BlockOptions,
    ) -> io::Result<Self> {
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
                let (record, reuse) = (opts.record, opts.reuse.clone());
                thread::spawn(move || {
                    // A fresh deflate state per block: a reset state was measured to give other
                    // bytes than a fresh one (zlib-rs), which would tie output to scheduling.
                    loop {
                        let job = job_rx.lock().ok().and_then(|rx| rx.recv().ok());
                        let Some((seq, dict, block)) = job else {
                            return;
                        };
                        let key = (record || reuse.is_some())
                            .then(|| block_key(level, tail(&dict), &block));
                        let copied = key.zip(reuse.as_deref()).and_then(|(k, r)| r.get(&k));
                        let out = match copied {
                            Some(bytes) => Ok(bytes),
                            None => deflate_block(level, tail(&dict), &block, false),
                        };
                        let out = out.map(|bytes| (bytes, key.filter(|_| record)));
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
            hinted: opts.hinted,
            current: Vec::with_capacity(BLOCK),
            previous: Arc::new(Vec::new()),
            crc: Crc::new(),
            jobs: Some(jobs),
            results,
            workers,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            written: 10,
            records: Vec::new(),
        })
    }

    /// A possible block boundary (the start of a tar entry: `force` false; a 128 KiB step
    /// inside a file's data: `force` true). Cuts when forced or when the block is full.
    pub(crate) fn cut(&mut self, force: bool) -> io::Result<()> {
        if !self.current.is_empty() && (force || self.current.len() >= BLOCK) {
            self.submit()?;
        }
        Ok(())
    }

    /// Wait for one compressed block and write out everything that is now in order.
    fn collect_one(&mut self) -> io::Result<()> {
        let (seq, block) = self
            .results
            .recv()
            .map_err(|_| io::Error::other("gzip compression workers stopped"))?;
        self.ready.insert(seq, block?);
        while let Some((bytes, key)) = self.ready.remove(&self.next_write) {
            self.out()?.write_all(&bytes)?;
            if let Some(key) = key {
                let mut crc = Crc::new();
                crc.update(&bytes);
                self.records.push(BlockRecord {
                    key,
                    offset: self.written,
                    len: u32::try_from(bytes.len()).map_err(io::Error::other)?,
                    crc: crc.sum(),
                });
            }
            self.written += bytes.len() as u64;
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
    #[cfg(test)]
    pub(crate) fn finish(self) -> io::Result<W> {
        self.finish_recorded().map(|(w, _)| w)
    }

    /// [`ParGzEncoder::finish`], also returning the records of keyed blocks (the final block
    /// is never recorded: it ends the stream).
    pub(crate) fn finish_recorded(mut self) -> io::Result<(W, Vec<BlockRecord>)> {
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
        Ok((out, std::mem::take(&mut self.records)))
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
        let max = if self.hinted { MAX_HINTED_BLOCK } else { BLOCK };
        let n = buf.len().min(max - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.current.len() == max {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing would cut a block early and change the bytes; `finish` writes everything.
        Ok(())
    }
}

/// The reuse key of a block: everything its compressed bytes depend on.
fn block_key(level: u32, dict: &[u8], input: &[u8]) -> [u8; 32] {
    let mut h = Hasher::new();
    for part in [KEY_FORMAT.as_bytes(), &level.to_le_bytes(), dict, input] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finish().as_bytes()
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
