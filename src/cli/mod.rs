//! cli (under construction).
