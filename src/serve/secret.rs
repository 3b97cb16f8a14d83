//! Git tokens at rest: AES-256-GCM under a server key, bound to the build id, so a queued
//! build of a private repository can still be fetched after a restart while the database
//! never holds a token in clear. The row's ciphertext is wiped when the build ends.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;

use crate::registry::Secret;

/// The server key that seals tokens.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

/// Sealing or opening failed (a wrong key, or a tampered row).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SealError(&'static str);

impl SealKey {
    /// A key from 32 bytes.
    pub fn new(bytes: &[u8; 32]) -> SealKey {
        let key = UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 takes a 32-byte key");
        SealKey(LessSafeKey::new(key))
    }

    /// A fresh random key's bytes.
    pub fn generate() -> Result<[u8; 32], SealError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| SealError("the system random source failed"))?;
        Ok(k)
    }

    /// Seal `token` for the build `id`: base64 of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, id: &str, token: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError("the system random source failed"))?;
        let mut buf = token.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError("sealing the git token failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Open what [`SealKey::seal`] made for the same `id`.
    pub fn open(&self, id: &str, sealed: &str) -> Result<Secret, SealError> {
        let bad = SealError("the stored git token cannot be opened (another --secret-key?)");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| SealError("the stored git token is not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(bad);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError("bad nonce"))?;
        let mut ct = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut ct)
            .map_err(|_| bad)?;
        let s = String::from_utf8(plain.to_vec())
            .map_err(|_| SealError("the stored git token is not UTF-8"))?;
        Ok(Secret::new(s))
    }
}

/// Parse a key file: 64 hex digits (whitespace around them ignored).
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// 64 hex digits of `k`.
pub fn format_key(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_binds_the_id() {
        let k = SealKey::new(&SealKey::generate().expect("rng"));
        let sealed = k.seal("b1", "gitea-token").expect("seal");
        assert!(!sealed.contains("gitea-token"));
        assert_eq!(k.open("b1", &sealed).expect("open").expose(), "gitea-token");
        assert!(k.open("b2", &sealed).is_err(), "bound to its build");
        let other = SealKey::new(&[7; 32]);
        assert!(other.open("b1", &sealed).is_err());
    }

    #[test]
    fn key_files_are_hex() {
        let k = [0xab; 32];
        assert_eq!(parse_key(&format!("{}\n", format_key(&k))), Some(k));
        assert_eq!(parse_key("xyz"), None);
    }
}
