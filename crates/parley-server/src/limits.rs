//! Token-bucket rate limits, kept in memory per key (device, user, or the whole server).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Keys idle for this long are forgotten, bounding memory.
const IDLE_SECS: f64 = 600.0;
/// Past this many keys, idle ones are swept.
const SWEEP_AT: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `rate` tokens per second up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate_per_second: f64, burst: f64) -> Self {
        Self {
            rate: rate_per_second.max(0.0),
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn per_minute(count: f64) -> Self {
        Self::new(count / 60.0, count)
    }

    /// Takes one token for `key`; false when the key is over its rate.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if buckets.len() > SWEEP_AT {
            buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() < IDLE_SECS);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_key() {
        let l = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow_at("a", t0)));
        assert!(!l.allow_at("a", t0));
        assert!(l.allow_at("b", t0), "keys are independent");
        assert!(l.allow_at("a", t0 + Duration::from_millis(500)));
        assert!(!l.allow_at("a", t0 + Duration::from_millis(500)));
    }
}
