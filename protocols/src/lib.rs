//! Generated protocol code (placeholder).
