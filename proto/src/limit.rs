//! Rate limiting for log lines about bad input, without a clock of its own.
//!
//! A peer that sends garbage in a loop must not flood the log: per kind of event, at
//! most one line per interval, and that line says how many were suppressed since.

use std::collections::HashMap;
use std::time::Duration;

/// Per-key rate limiter; time is passed in.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    every: Duration,
    last: HashMap<&'static str, (Duration, u64)>,
}

impl LogLimiter {
    /// At most one line per `every` per key.
    pub fn new(every: Duration) -> Self {
        Self { every, last: HashMap::new() }
    }

    /// `Some(suppressed)` when a line for `key` may be logged at `now` (with the number
    /// of events suppressed since the last line), `None` when it is suppressed.
    pub fn allow(&mut self, key: &'static str, now: Duration) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, suppressed)) if now < *at + self.every => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.allow("frame", Duration::from_secs(0)), Some(0));
        assert_eq!(l.allow("frame", Duration::from_secs(1)), None);
        assert_eq!(l.allow("frame", Duration::from_secs(2)), None);
        assert_eq!(l.allow("other", Duration::from_secs(2)), Some(0), "keys are independent");
        assert_eq!(l.allow("frame", Duration::from_secs(10)), Some(2));
        assert_eq!(l.allow("frame", Duration::from_secs(11)), None);
    }
}
