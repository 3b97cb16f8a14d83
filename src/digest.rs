//! Content digests: the typed `sha256:<hex>` identifier of every blob.
//!
//! Implements the digest grammar of the OCI image spec
//! (<https://github.com/opencontainers/image-spec/blob/main/descriptor.md#digests>) for the one
//! algorithm registries require, sha256. Digests are never passed around as `&str`.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Errors from parsing or verifying digests.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// The text is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {text:?}: {why}")]
    Invalid {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Content did not hash to the digest it was expected to have.
    #[error("digest mismatch: expected {expected}, found {found}")]
    Mismatch {
        /// The digest the content should have had.
        expected: Digest,
        /// The digest the content actually had.
        found: Digest,
    },
    /// Content was longer or shorter than its descriptor said.
    #[error("size mismatch for {digest}: expected {expected} bytes, found {found}")]
    SizeMismatch {
        /// Which blob.
        digest: Digest,
        /// The size the descriptor gave.
        expected: u64,
        /// The size actually read (or at least this many bytes, when too long).
        found: u64,
    },
}

/// A sha256 content digest, displayed and serialised as `sha256:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble < 16"));
            s.push(char::from_digit(u32::from(b & 0xf), 16).expect("nibble < 16"));
        }
        s
    }

    /// The algorithm name, always `sha256`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short form for humans: the first 12 hex digits.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Parse a bare 64-digit hex string (as found in a blob file name).
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        let invalid = |why| DigestError::Invalid {
            text: hex.to_string(),
            why,
        };
        if hex.len() != 64 {
            return Err(invalid("sha256 digests have 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let nib = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(invalid("hex digits must be 0-9 or a-f (lowercase)")),
            };
            out[i] = (nib(pair[0])? << 4) | nib(pair[1])?;
        }
        Ok(Digest(out))
    }

    /// Check that `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), DigestError> {
        let found = Digest::of(bytes);
        if found == *self {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: *self,
                found,
            })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Digest::from_hex(hex).map_err(|e| match e {
                DigestError::Invalid { why, .. } => DigestError::Invalid {
                    text: s.to_string(),
                    why,
                },
                other => other,
            }),
            Some((_, _)) => Err(DigestError::Invalid {
                text: s.to_string(),
                why: "only sha256 digests are supported",
            }),
            None => Err(DigestError::Invalid {
                text: s.to_string(),
                why: "expected sha256:<hex>",
            }),
        }
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<Digest> for oci_spec::image::Digest {
    fn from(d: Digest) -> Self {
        oci_spec::image::Digest::from_str(&d.to_string()).expect("a Digest is always valid OCI")
    }
}

impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = DigestError;
    fn try_from(d: &oci_spec::image::Digest) -> Result<Self, DigestError> {
        d.to_string().parse()
    }
}

/// An incremental sha256 that also counts bytes.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Hasher {
        Hasher::default()
    }
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }
    /// Feed `bytes` as one field of a key: its length (u64, little-endian), then the bytes,
    /// so that no two different field lists hash alike.
    pub fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }
    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// Hash everything `r` yields: its digest and length.
pub fn digest_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    // On the stack: this runs once per file of a context, and a fresh heap buffer per call
    // showed up in profiles as page-zeroing.
    let mut buf = [0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let len = h.len();
    Ok((h.finish(), len))
}

/// A writer that hashes and counts everything passing through to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
        }
    }
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }
    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }
    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
    /// The digest and size of what was written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        let len = self.hasher.len();
        (self.hasher.finish(), len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A buffered writer that passes everything through to `inner` while a second thread hashes
/// it, so hashing overlaps with whatever `inner` does (compressing, writing).
///
/// Bytes gather in 256 KiB chunks; a full chunk is written to `inner`, then handed (moved, not
/// copied) to the hashing thread, which sends the emptied buffer back for reuse. At most 16
/// chunks are in flight, so memory stays bounded, and no chunk is allocated twice.
pub struct ThreadedHashingWriter<W> {
    inner: W,
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    worker: Option<std::thread::JoinHandle<Hasher>>,
}

/// Bytes per chunk handed to the hashing thread.
const HASH_CHUNK: usize = 256 * 1024;

impl<W: Write> ThreadedHashingWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let (back_tx, back) = std::sync::mpsc::channel::<Vec<u8>>();
        let worker = std::thread::spawn(move || {
            let mut h = Hasher::new();
            for mut chunk in rx {
                h.update(&chunk);
                chunk.clear();
                // The writer may be gone (finishing): the buffer is then simply freed.
                let _ = back_tx.send(chunk);
            }
            h
        });
        ThreadedHashingWriter {
            inner,
            buf: Vec::with_capacity(HASH_CHUNK),
            tx: Some(tx),
            back,
            worker: Some(worker),
        }
    }

    /// Write the buffered bytes to the inner writer and hand them to the hashing thread.
    pub fn spill(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.inner.write_all(&self.buf)?;
        let fresh = self
            .back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(HASH_CHUNK));
        let full = std::mem::replace(&mut self.buf, fresh);
        self.tx
            .as_ref()
            .expect("open until finish")
            .send(full)
            .map_err(|_| io::Error::other("hashing thread stopped"))
    }

    /// Copy up to `n` bytes from `r`, reading straight into the chunk buffer (one copy, no
    /// intermediate buffer). Returns how many bytes were copied (fewer at end of input).
    pub fn read_from(&mut self, r: &mut impl Read, n: u64) -> io::Result<u64> {
        let mut copied = 0;
        while copied < n {
            if self.buf.len() >= HASH_CHUNK {
                self.spill()?;
            }
            let room = (HASH_CHUNK - self.buf.len()) as u64;
            let got = r.take(room.min(n - copied)).read_to_end(&mut self.buf)?;
            if got == 0 {
                break;
            }
            copied += got as u64;
        }
        Ok(copied)
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The inner writer, mutably. Call [`ThreadedHashingWriter::spill`] first for it to have
    /// everything written so far; what is written to it directly is not hashed.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The digest and size of what was written, and the inner writer.
    pub fn finish(mut self) -> io::Result<(Digest, u64, W)> {
        self.spill()?;
        self.tx = None;
        let h = self
            .worker
            .take()
            .expect("the hashing thread runs until finish")
            .join()
            .map_err(|_| io::Error::other("hashing thread panicked"))?;
        let len = h.len();
        Ok((h.finish(), len, self.inner))
    }
}

impl<W: Write> Write for ThreadedHashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= HASH_CHUNK {
            self.spill()?;
        }
        let n = buf.len().min(HASH_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.spill()?;
        self.inner.flush()
    }
}

/// A reader that refuses content whose size or digest differ from what was expected.
///
/// Reading past `size` bytes, or hitting end of stream with the wrong digest or too few
/// bytes, returns an `InvalidData` error wrapping a [`DigestError`]; a caller that streams into
/// a temp file therefore never commits bad content.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    size: u64,
    hasher: Hasher,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Expect exactly `size` bytes hashing to `expected`.
    pub fn new(inner: R, expected: Digest, size: u64) -> Self {
        VerifyingReader {
            inner,
            expected,
            size,
            hasher: Hasher::new(),
            done: false,
        }
    }
}

fn invalid(e: DigestError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let remaining = self.size - self.hasher.len();
        // Read one byte beyond the expected size so an over-long stream is detected.
        let want = buf
            .len()
            .min(usize::try_from(remaining + 1).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > remaining {
            return Err(invalid(DigestError::SizeMismatch {
                digest: self.expected,
                expected: self.size,
                found: self.hasher.len() + n as u64,
            }));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 {
            self.done = true;
            if self.hasher.len() != self.size {
                return Err(invalid(DigestError::SizeMismatch {
                    digest: self.expected,
                    expected: self.size,
                    found: self.hasher.len(),
                }));
            }
            let found = self.hasher.clone().finish();
            if found != self.expected {
                return Err(invalid(DigestError::Mismatch {
                    expected: self.expected,
                    found,
                }));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn threaded_hashing_writer_hashes_and_passes_everything_in_order() {
        let data: Vec<u8> = (0..(3 * HASH_CHUNK + 12_345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut w = ThreadedHashingWriter::new(Vec::new());
        // Small writes, a reader copy across chunk edges, spills in between, large writes.
        w.write_all(&data[..1000]).unwrap();
        let mut r = &data[1000..HASH_CHUNK + 5000];
        assert_eq!(
            w.read_from(&mut r, u64::MAX).unwrap(),
            (HASH_CHUNK + 4000) as u64
        );
        w.spill().unwrap();
        assert_eq!(w.get_ref().len(), HASH_CHUNK + 5000);
        let mut r = &data[HASH_CHUNK + 5000..];
        assert_eq!(w.read_from(&mut r, 10).unwrap(), 10);
        w.write_all(&data[HASH_CHUNK + 5010..]).unwrap();
        let (d, len, out) = w.finish().unwrap();
        assert_eq!(out, data);
        assert_eq!(len, data.len() as u64);
        assert_eq!(d, Digest::of(&data));
        let (d, len, out) = ThreadedHashingWriter::new(Vec::new()).finish().unwrap();
        assert_eq!((d.to_string().as_str(), len, out.len()), (EMPTY, 0, 0));
    }

    #[test]
    fn parse_and_display_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
        assert_eq!(d.short(), "e3b0c44298fc");
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:e3b0",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn verifying_reader_accepts_good_and_refuses_bad() {
        let data = b"hello world".to_vec();
        let d = Digest::of(&data);
        let mut out = Vec::new();
        VerifyingReader::new(&data[..], d, 11)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);

        let mut tampered = data.clone();
        tampered[0] = b'H';
        let err = VerifyingReader::new(&tampered[..], d, 11)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");

        let err = VerifyingReader::new(&data[..5], d, 11)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");

        let long = b"hello world!!".to_vec();
        let err = VerifyingReader::new(&long[..], d, 11)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");
    }

    #[test]
    fn hashing_writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (d, n, inner) = w.finish();
        assert_eq!(n, 3);
        assert_eq!(inner, b"abc");
        assert_eq!(d, Digest::of(b"abc"));
    }
}
