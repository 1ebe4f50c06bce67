//! The pure scheduling core of the queue runner.
//!
//! It owns the step graph and the dispatch queues. It takes events and
//! returns commands; it never reads the clock (time is a parameter) and
//! never performs IO. The tokio driver in `queue-runner` feeds it.
