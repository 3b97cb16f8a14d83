//! A zstd frame writer on libzstd's own streaming API (`zstd-sys`), for layer blobs.
//!
//! The `zstd` crate's encoder cannot set libzstd's experimental parameters, and one of them
//! matters here: zstd 1.5.7 added a "pre-splitter" (`ZSTD_c_blockSplitterLevel`) that, on by
//! default, fingerprints every 128 KiB block to decide where to cut it. On the 78 MB app
//! tree of `benches/` it cost 13–20% more compression CPU at level 3 and made the blob larger
//! (28.07 MB vs 27.94 MB with 4 MiB jobs), so it is switched off (level 1, "no splitting"),
//! which also gives the block layout of the zstd 1.5.4 CLI that the benchmark compares with.
//!
//! Frames are always compressed by libzstd's worker pool (`nbWorkers >= 1`) with a fixed job
//! size: its output then depends only on the input and the parameters, not on the number of
//! workers. The context is freed on another thread: that joins the workers and unmaps their
//! buffers (several ms), work nobody waits for.

use std::ffi::CStr;
use std::io::{self, Write};
use std::ptr::NonNull;

use zstd_sys::{
    ZSTD_CCtx, ZSTD_CCtx_setParameter, ZSTD_EndDirective, ZSTD_cParameter, ZSTD_compressStream2,
    ZSTD_createCCtx, ZSTD_freeCCtx, ZSTD_getErrorName, ZSTD_inBuffer, ZSTD_isError, ZSTD_outBuffer,
};

/// Bytes of compressed output gathered per call before they are written on.
const OUT_CHUNK: usize = 256 * 1024;

/// Input bytes per worker job. zstd's default (4 × the window, 8 MiB at level 3) leaves one
/// worker idle for the last job of a layer of tens of MB, and 1 MiB jobs re-load a 256 KiB
/// overlap each time and compress 4% worse (78 MB app tree: 29.1 MB at 1 MiB, 27.9 MB at
/// 4 MiB, 27.7 MB at 8 MiB). Job boundaries are a function of the input only, so the bytes
/// do not depend on the number of workers.
pub(super) const JOB_SIZE: i32 = 4 << 20;

/// An owned compression context; freed on drop.
struct Context(NonNull<ZSTD_CCtx>);

// SAFETY: a ZSTD_CCtx may be used from any thread as long as one thread at a time does
// (libzstd's documented rule); `Context` is only reachable through `&mut`.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ZSTD_createCCtx and is freed exactly once, here.
        unsafe {
            ZSTD_freeCCtx(self.0.as_ptr());
        }
    }
}

fn check(code: usize) -> io::Result<usize> {
    // SAFETY: both functions accept any return code of the streaming API; the error name is
    // a static NUL-terminated string.
    unsafe {
        if ZSTD_isError(code) != 0 {
            let name = CStr::from_ptr(ZSTD_getErrorName(code));
            return Err(io::Error::other(format!(
                "zstd: {}",
                name.to_string_lossy()
            )));
        }
    }
    Ok(code)
}

/// Writes one zstd frame (with its content checksum) of everything written to it into
/// `inner`; [`ZstdWriter::finish`] ends the frame.
pub(super) struct ZstdWriter<W: Write> {
    ctx: Option<Context>,
    out: Vec<u8>,
    inner: W,
}

impl<W: Write> ZstdWriter<W> {
    /// A writer compressing at `level` with `workers` (at least 1) threads.
    pub(super) fn new(inner: W, level: i32, workers: u32) -> io::Result<ZstdWriter<W>> {
        // SAFETY: ZSTD_createCCtx has no preconditions; null means out of memory.
        let ctx = NonNull::new(unsafe { ZSTD_createCCtx() })
            .map(Context)
            .ok_or_else(|| io::Error::other("zstd: cannot allocate a compression context"))?;
        let workers = i32::try_from(workers.max(1)).unwrap_or(i32::MAX);
        let params = [
            (ZSTD_cParameter::ZSTD_c_compressionLevel, level),
            (ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
            (ZSTD_cParameter::ZSTD_c_nbWorkers, workers),
            (ZSTD_cParameter::ZSTD_c_jobSize, JOB_SIZE),
            // ZSTD_c_blockSplitterLevel: 1 = do not pre-split blocks (see the module docs).
            (ZSTD_cParameter::ZSTD_c_experimentalParam20, 1),
        ];
        for (param, value) in params {
            // SAFETY: a live context and a parameter libzstd knows; bad values are reported
            // through the return code.
            check(unsafe { ZSTD_CCtx_setParameter(ctx.0.as_ptr(), param, value) })
                .map_err(|e| io::Error::other(format!("{e} (setting {param:?} to {value})")))?;
        }
        Ok(ZstdWriter {
            ctx: Some(ctx),
            out: vec![0; OUT_CHUNK],
            inner,
        })
    }

    /// One call of the streaming compressor; writes what it produced. Returns libzstd's
    /// hint (for `ZSTD_e_end`: bytes still to flush, 0 when the frame is complete).
    fn step(&mut self, input: &mut ZSTD_inBuffer, end: ZSTD_EndDirective) -> io::Result<usize> {
        let ctx = self
            .ctx
            .as_ref()
            .ok_or_else(|| io::Error::other("zstd: the frame is already finished"))?;
        let mut output = ZSTD_outBuffer {
            dst: self.out.as_mut_ptr().cast(),
            size: self.out.len(),
            pos: 0,
        };
        // SAFETY: `input` describes a live slice (or is empty) and `output` describes
        // `self.out`, which outlives the call; libzstd only advances their `pos` fields.
        let hint = check(unsafe { ZSTD_compressStream2(ctx.0.as_ptr(), &mut output, input, end) })?;
        self.inner.write_all(&self.out[..output.pos])?;
        Ok(hint)
    }

    /// End the frame and return the inner writer.
    pub(super) fn finish(mut self) -> io::Result<W> {
        let mut input = ZSTD_inBuffer {
            src: std::ptr::null(),
            size: 0,
            pos: 0,
        };
        while self.step(&mut input, ZSTD_EndDirective::ZSTD_e_end)? != 0 {}
        if let Some(ctx) = self.ctx.take() {
            // Joining the workers and unmapping their buffers takes a few ms: off the
            // caller's path. If the process exits first, the memory goes with it.
            std::thread::spawn(move || drop(ctx));
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for ZstdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut input = ZSTD_inBuffer {
            src: buf.as_ptr().cast(),
            size: buf.len(),
            pos: 0,
        };
        // In multi-threaded mode libzstd may take the input in parts (it blocks while its
        // job buffers are full), so call until all of it is in.
        while input.pos < input.size {
            self.step(&mut input, ZSTD_EndDirective::ZSTD_e_continue)?;
        }
        Ok(buf.len())
    }

    /// Does nothing: a zstd flush would end a block early and change the output bytes.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &[u8], level: i32, workers: u32, pieces: usize) -> Vec<u8> {
        let mut w = ZstdWriter::new(Vec::new(), level, workers).unwrap();
        for part in data.chunks(data.len().div_ceil(pieces).max(1)) {
            w.write_all(part).unwrap();
        }
        w.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Half-compressible: a repeated word, then random bytes.
            out.extend_from_slice(b"strata layer ");
            out.extend_from_slice(&state.to_le_bytes()[..(state % 8) as usize]);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn round_trips_and_checksums() {
        let data = sample(9 << 20);
        let z = frame(&data, 3, 2, 7);
        assert_eq!(zstd::decode_all(&z[..]).unwrap(), data);
        // The frame header's descriptor byte has the content-checksum flag (bit 2).
        assert_eq!(&z[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_ne!(z[4] & 0b100, 0, "no content checksum");
        // The zstd CLI accepts it, checksum included.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.zst");
        std::fs::write(&path, &z).unwrap();
        let st = std::process::Command::new("zstd")
            .args(["-q", "-t"])
            .arg(&path)
            .status()
            .expect("the zstd CLI (Debian package zstd, installed by .ci/run)");
        assert!(st.success(), "zstd -t refused the frame");
    }

    #[test]
    fn bytes_depend_on_the_input_only() {
        // Several jobs' worth, written in different pieces with different worker counts.
        let data = sample(3 * JOB_SIZE as usize + 12345);
        let a = frame(&data, 3, 1, 1);
        assert_eq!(a, frame(&data, 3, 4, 13));
        assert_eq!(a, frame(&data, 3, 2, 1000));
        assert_ne!(a, frame(&data, 9, 2, 1), "the level is not applied");
    }
}
