//! Masked cross-entropy.
