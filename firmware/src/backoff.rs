//! Reconnect back-off: exponential ceiling with full jitter.
//!
//! After the `n`-th consecutive failure the client sleeps a uniformly random time in
//! `[floor, min(max, base * 2^n)]` ("full jitter"). The jitter spreads a fleet that lost its
//! gateway at the same instant, so the cluster is not hit by every device at once when it
//! comes back. The floor keeps a device from spinning when the draw is near zero.
//!
//! The random source is a small seeded PRNG ([`Prng`], splitmix64), seeded from the device id
//! and boot number: devices differ from each other and from their own previous boot, and a
//! test run is reproducible. It is not cryptographic and is never used for security.

use embassy_time::Duration;

/// splitmix64: tiny, fast, statistically fine for jitter; the state is one `u64`.
#[derive(Debug, Clone)]
pub struct Prng {
    state: u64,
}

impl Prng {
    /// A generator seeded from a device identity (any `u64`s; zero is fine).
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The seed the client uses: device id and boot number mixed, so two devices (or two boots
    /// of one device) draw different delays.
    pub const fn from_device(device_id: u64, boot: u32) -> Self {
        Self::new(device_id ^ (((boot as u64) << 32) | boot as u64).rotate_left(17))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (returns `lo` when `hi <= lo`). Lemire's multiply-shift
    /// reduction; its bias is below 2^-32 for the ranges used here.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next_u64();
        }
        let r = ((self.next_u64() as u128 * (span as u128 + 1)) >> 64) as u64;
        lo + r
    }
}

/// Exponential back-off with full jitter. See the module documentation.
#[derive(Debug, Clone)]
pub struct Backoff {
    floor: Duration,
    base: Duration,
    max: Duration,
    failures: u32,
    rng: Prng,
}

impl Backoff {
    /// `floor <= base <= max` is expected; out-of-order values are clamped so the bounds hold.
    pub fn new(floor: Duration, base: Duration, max: Duration, rng: Prng) -> Self {
        let max = if max < floor { floor } else { max };
        Self {
            floor,
            base,
            max,
            failures: 0,
            rng,
        }
    }

    /// The upper bound of the next delay: `min(max, base * 2^failures)`, never below the floor.
    pub fn ceiling(&self) -> Duration {
        let shift = self.failures.min(32);
        let exp = self.base.as_ticks().saturating_mul(1u64 << shift);
        let ceil = exp.min(self.max.as_ticks()).max(self.floor.as_ticks());
        Duration::from_ticks(ceil)
    }

    /// Draw the delay before the next attempt and count one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceil = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        Duration::from_ticks(self.rng.between(self.floor.as_ticks(), ceil.as_ticks()))
    }

    /// Like [`Self::next_delay`] but never shorter than `at_least` (still capped at `max`):
    /// used when the gateway said it is overloaded.
    pub fn next_delay_at_least(&mut self, at_least: Duration) -> Duration {
        let d = self.next_delay();
        let at_least = if at_least > self.max {
            self.max
        } else {
            at_least
        };
        if d < at_least { at_least } else { d }
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A session got through (Welcome received): start again from `base`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(seed: u64) -> Backoff {
        Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(100),
            Duration::from_secs(30),
            Prng::new(seed),
        )
    }

    #[test]
    fn test_delays_stay_within_bounds() {
        for seed in 0..64 {
            let mut b = backoff(seed);
            for n in 0..80u32 {
                let ceil = 100u64.saturating_mul(1u64 << n.min(32)).clamp(50, 30_000);
                assert_eq!(
                    b.ceiling(),
                    Duration::from_millis(ceil),
                    "ceiling after {n}"
                );
                let d = b.next_delay();
                assert!(
                    d >= Duration::from_millis(50),
                    "seed {seed} n {n}: {d} below floor"
                );
                assert!(
                    d <= Duration::from_millis(ceil),
                    "seed {seed} n {n}: {d} above {ceil}"
                );
            }
            assert_eq!(b.ceiling(), Duration::from_secs(30));
        }
    }

    #[test]
    fn test_jitter_spreads_over_the_whole_window() {
        // At the cap the draws must cover low and high parts of [floor, max]: full jitter,
        // not "max plus a little".
        let mut b = backoff(7);
        for _ in 0..20 {
            b.next_delay();
        }
        let (mut low, mut high) = (0, 0);
        for _ in 0..1000 {
            let d = b.next_delay().as_millis();
            if d < 10_000 {
                low += 1;
            }
            if d > 20_000 {
                high += 1;
            }
        }
        assert!(low > 200 && high > 200, "low {low} high {high}");
    }

    #[test]
    fn test_reset_and_overloaded_floor() {
        let mut b = backoff(1);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        let d = b.next_delay_at_least(Duration::from_secs(5));
        assert!(d >= Duration::from_secs(5));
        let d = b.next_delay_at_least(Duration::from_secs(3600));
        assert_eq!(d, Duration::from_secs(30), "capped at max");
    }

    #[test]
    fn test_seeds_differ_per_device_and_boot() {
        let a = Prng::from_device(1, 1).next_u64();
        let b = Prng::from_device(2, 1).next_u64();
        let c = Prng::from_device(1, 2).next_u64();
        assert!(a != b && a != c && b != c);
        let mut p = Prng::new(3);
        for _ in 0..1000 {
            let v = p.between(10, 20);
            assert!((10..=20).contains(&v));
        }
        assert_eq!(p.between(5, 5), 5);
        assert_eq!(p.between(9, 5), 9);
    }
}
