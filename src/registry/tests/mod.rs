//! Tests against hostile in-process servers and the real distribution registry.

mod distribution;
mod fake;
mod hostile;
mod server;
