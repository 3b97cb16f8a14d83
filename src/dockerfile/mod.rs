//! dockerfile (under construction).
