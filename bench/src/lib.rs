//! Keel's load harnesses (one binary per component under `src/bin/`) and what they share:
//! process figures from `/proc`, latency percentiles and a reader for Prometheus text.
//!
//! Results are recorded in `bench/README.md` with the date and the command; nothing here
//! asserts timings in tests.

pub mod procfs;
pub mod prometheus;
pub mod stats;
