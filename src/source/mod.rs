//! source (under construction).
