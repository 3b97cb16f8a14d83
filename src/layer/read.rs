//! Reading layers and archives back: compression sniffing and decompression.
//!
//! Layer blobs say their compression in the descriptor's media type, but registries and
//! `docker save` archives are not always truthful, and ADD's local-archive extraction has no
//! media type at all, so the stream's magic bytes decide.

use std::io::{self, Cursor, Read};

use super::{LayerError, Result};

/// How many bytes [`open_decompressed`] looks at before deciding.
const SNIFF: usize = 512;

/// What the first bytes of a stream say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// bzip2 (`BZh`).
    Bzip2,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// An uncompressed tar (a ustar or GNU header with a valid checksum).
    Tar,
}

/// Recognise a compressed stream by its magic bytes, or a plain tar by its first header.
pub fn detect_format(head: &[u8]) -> Option<ArchiveFormat> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(ArchiveFormat::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(ArchiveFormat::Zstd)
    } else if head.starts_with(b"BZh") {
        Some(ArchiveFormat::Bzip2)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(ArchiveFormat::Xz)
    } else if is_tar_header(head) {
        Some(ArchiveFormat::Tar)
    } else {
        None
    }
}

/// Whether `head`, the first bytes of a file, starts a tar archive, plain or compressed.
///
/// For a compressed stream this decompresses what `head` holds and checks the tar header inside,
/// so a gzipped text file is not an archive. Compressed formats decode in blocks (up to 900 KiB
/// for bzip2), so pass the first 1 MiB of the file, or use [`is_archive_reader`].
pub fn is_archive(head: &[u8]) -> bool {
    match detect_format(head) {
        Some(ArchiveFormat::Tar) => true,
        None => false,
        Some(_) => {
            // A truncated stream ends in an error after yielding what it could; what matters is
            // whether the first 512 decompressed bytes are a tar header.
            let mut block = Vec::with_capacity(SNIFF);
            let Ok(r) = decoder(Cursor::new(head), detect_format(head)) else {
                return false;
            };
            let _ = r.take(SNIFF as u64).read_to_end(&mut block);
            is_tar_header(&block)
        }
    }
}

/// Whether the stream `reader` is a tar archive, plain or compressed (reads at most what it
/// takes to decompress the first tar header).
pub fn is_archive_reader<R: Read + Send>(reader: R) -> Result<bool> {
    let mut block = Vec::with_capacity(SNIFF);
    match open_decompressed(reader)?
        .take(SNIFF as u64)
        .read_to_end(&mut block)
    {
        Ok(_) => Ok(is_tar_header(&block)),
        // Not valid compressed data after all.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(LayerError::ReadTar(e)),
    }
}

/// Wrap `reader` in the decompressor its magic bytes call for (gzip, zstd, bzip2, xz); anything
/// else is passed through unchanged. Multi-member gzip, bzip2 and xz streams are read whole.
pub fn open_decompressed<'a, R: Read + Send + 'a>(
    mut reader: R,
) -> Result<Box<dyn Read + Send + 'a>> {
    let mut head = Vec::with_capacity(SNIFF);
    (&mut reader)
        .take(SNIFF as u64)
        .read_to_end(&mut head)
        .map_err(LayerError::ReadTar)?;
    let format = detect_format(&head);
    decoder(Cursor::new(head).chain(reader), format).map_err(LayerError::ReadTar)
}

fn decoder<'a, R: Read + Send + 'a>(
    r: R,
    format: Option<ArchiveFormat>,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match format {
        Some(ArchiveFormat::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Some(ArchiveFormat::Zstd) => Box::new(zstd::stream::read::Decoder::new(r)?),
        Some(ArchiveFormat::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        Some(ArchiveFormat::Xz) => Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)),
        Some(ArchiveFormat::Tar) | None => Box::new(r),
    })
}

/// Whether `block` starts with a ustar or GNU tar header whose checksum is right.
pub(crate) fn is_tar_header(block: &[u8]) -> bool {
    let Some(h) = block.get(..512) else {
        return false;
    };
    if &h[257..262] != b"ustar" {
        return false;
    }
    let field = &h[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| (b'0'..=b'7').contains(&b))
        .collect();
    let Ok(text) = std::str::from_utf8(&digits) else {
        return false;
    };
    let Ok(stored) = i64::from_str_radix(text, 8) else {
        return false;
    };
    let spaces = 8 * i64::from(b' ');
    let outside = h[..148].iter().chain(&h[156..]);
    let unsigned: i64 = outside.clone().map(|&b| i64::from(b)).sum::<i64>() + spaces;
    // Some old writers summed the bytes as signed chars.
    let signed: i64 = outside.map(|&b| i64::from(b as i8)).sum::<i64>() + spaces;
    stored == unsigned || stored == signed
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::layer::{Entry, LayerWriter};
    use crate::media::Compression;

    fn tar() -> Vec<u8> {
        let e = vec![Entry::bytes("hello", b"world", 0o644, 0, 0)];
        let w = LayerWriter::new().compression(Compression::None);
        w.write(e, Vec::new()).unwrap().1
    }

    fn compressed(tar: &[u8]) -> Vec<(ArchiveFormat, Vec<u8>)> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(tar).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(tar).unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(tar).unwrap();
        vec![
            (ArchiveFormat::Gzip, gz.finish().unwrap()),
            (ArchiveFormat::Zstd, zstd::encode_all(tar, 3).unwrap()),
            (ArchiveFormat::Bzip2, bz.finish().unwrap()),
            (ArchiveFormat::Xz, xz.finish().unwrap()),
            (ArchiveFormat::Tar, tar.to_vec()),
        ]
    }

    #[test]
    fn every_format_is_sniffed_and_decompressed() {
        let tar = tar();
        for (format, bytes) in compressed(&tar) {
            assert_eq!(detect_format(&bytes), Some(format));
            let mut out = Vec::new();
            open_decompressed(&bytes[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, tar, "{format:?}");
            assert!(is_archive(&bytes), "{format:?}");
            assert!(is_archive_reader(&bytes[..]).unwrap(), "{format:?}");
        }
    }

    #[test]
    fn other_files_are_not_archives() {
        let text = b"just some text, longer than nothing at all".repeat(20);
        for (_, bytes) in compressed(&text) {
            assert!(!is_archive(&bytes));
            assert!(!is_archive_reader(&bytes[..]).unwrap());
        }
        assert!(!is_archive(b""));
        assert!(!is_archive(&[0; 1024]));
        // A tar header with a wrong checksum is not a tar.
        let mut t = tar();
        t[0] ^= 1;
        assert!(!is_archive(&t));
        // Short input passes through untouched.
        let mut out = Vec::new();
        open_decompressed(&b"hi"[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hi");
    }
}
