//! Parallel gzip whose bytes do not depend on the thread count, as pigz does it.
//!
//! The input is cut into fixed 128 KiB blocks. Each block is deflated on its own, primed with
//! the previous 32 KiB of input as dictionary, and ended with a sync flush (the last one with a
//! final block), so the raw deflate streams concatenate into one valid stream inside a single
//! gzip member (<https://www.rfc-editor.org/rfc/rfc1952>). A block's bytes are a function of its
//! input and the 32 KiB before it only, so any number of threads gives the same output.

use std::io::{self, Write};
use std::thread;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Input bytes per independently compressed block (pigz's default).
const BLOCK: usize = 128 * 1024;
/// The deflate window: how much preceding input primes each block.
const DICT: usize = 32 * 1024;

/// A gzip writer compressing `threads` blocks at a time.
pub(crate) struct ParGzEncoder<W: Write> {
    out: W,
    level: u32,
    threads: usize,
    /// Full blocks waiting for a batch.
    pending: Vec<Vec<u8>>,
    /// The block being filled.
    current: Vec<u8>,
    /// The last 32 KiB of input before `pending[0]` (or `current`).
    dict: Vec<u8>,
    crc: Crc,
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
        Ok(ParGzEncoder {
            out,
            level,
            threads,
            pending: Vec::with_capacity(threads),
            current: Vec::with_capacity(BLOCK),
            dict: Vec::new(),
            crc: Crc::new(),
        })
    }

    /// Compress what is pending, write the final block and the trailer, and return the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.flush_batch()?;
        let last = deflate_block(self.level, &self.dict, &self.current, true)?;
        self.out.write_all(&last)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(self.out)
    }

    /// Compress the pending full blocks in parallel and write them out in order.
    fn flush_batch(&mut self) -> io::Result<()> {
        let Some(last) = self.pending.last() else {
            return Ok(());
        };
        let next_dict = tail(last).to_vec();
        let level = self.level;
        let dicts: Vec<&[u8]> = std::iter::once(self.dict.as_slice())
            .chain(self.pending.iter().map(|b| tail(b)))
            .collect();
        let compressed: Vec<io::Result<Vec<u8>>> = if self.pending.len() == 1 {
            vec![deflate_block(level, dicts[0], &self.pending[0], false)]
        } else {
            thread::scope(|s| {
                let handles: Vec<_> = self
                    .pending
                    .iter()
                    .zip(&dicts)
                    .map(|(block, dict)| s.spawn(move || deflate_block(level, dict, block, false)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(io::Error::other("gzip compression thread panicked"))
                        })
                    })
                    .collect()
            })
        };
        for block in compressed {
            self.out.write_all(&block?)?;
        }
        self.pending.clear();
        self.dict = next_dict;
        Ok(())
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.current.len() == BLOCK {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(BLOCK));
            self.pending.push(full);
            if self.pending.len() == self.threads {
                self.flush_batch()?;
            }
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
