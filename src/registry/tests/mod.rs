//! Tests against hostile in-process servers and the real distribution registry.
