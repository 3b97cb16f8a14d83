//! image (under construction).
