//! build (under construction).
