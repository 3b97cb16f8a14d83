//! Layers: deterministic tar writing, compression with one-pass digests, reading and applying
//! layers (whiteouts included) to an in-memory file-system tree.

mod entry;
pub use entry::{Entry, EntryKind, FileSource};
