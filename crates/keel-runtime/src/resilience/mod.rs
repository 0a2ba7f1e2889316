//! Calling other services well: which instance ([`balance`]: weighted round robin, power
//! of two choices over a peak-EWMA cost, consistent hashing), what is known of each
//! ([`endpoint`]: requests in flight, latency, passive outlier ejection), when to stop
//! calling a struggling service ([`breaker`]), and when a failed call may be tried again
//! ([`retry`]: a budget, jittered backoff). The gateway's forwarding and the SDK's clients
//! share them.

pub mod balance;
pub mod breaker;
pub mod endpoint;
pub mod retry;
