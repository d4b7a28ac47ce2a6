//! A fake sensor whose readings are a pure function of the device id and the sample
//! number, so a test can recompute every value the gateway stored.

/// Stream of [`Environment`] readings: temperature, humidity, pressure (three `f32`).
pub const STREAM_ENVIRONMENT: u16 = 1;
/// Stream of [`Power`] readings: battery millivolts (`i64`) and whether it is charging.
pub const STREAM_POWER: u16 = 2;
/// A [`Power`] reading is taken on every this many samples (the battery changes slowly).
pub const POWER_EVERY: u32 = 5;

/// One environment reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Environment {
    pub temperature_c: f32,
    pub humidity_pct: f32,
    pub pressure_hpa: f32,
}

/// One power reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Power {
    pub battery_mv: i64,
    pub charging: bool,
}

/// The readings of sample number `n` (counted from 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub n: u32,
    pub environment: Environment,
    /// Present on every [`POWER_EVERY`]th sample.
    pub power: Option<Power>,
}

/// A sensor that produces the same sequence of readings for the same device id.
#[derive(Clone, Debug)]
pub struct FakeSensor {
    device_id: u64,
    next: u32,
}

impl FakeSensor {
    pub const fn new(device_id: u64) -> Self {
        Self { device_id, next: 0 }
    }

    /// Takes the next sample.
    pub fn sample(&mut self) -> Sample {
        let sample = reading(self.device_id, self.next);
        self.next = self.next.wrapping_add(1);
        sample
    }
}

/// Sample `n` of device `device_id`: values in plausible ranges with two decimals.
pub fn reading(device_id: u64, n: u32) -> Sample {
    let h = mix(device_id ^ (u64::from(n) << 32 | u64::from(n)));
    let hundredths = |shift: u32, range: u64| ((h >> shift) % range) as f32 / 100.0;
    let environment = Environment {
        temperature_c: 15.0 + hundredths(0, 1500),
        humidity_pct: 30.0 + hundredths(16, 5000),
        pressure_hpa: 980.0 + hundredths(32, 6000),
    };
    let power = n.is_multiple_of(POWER_EVERY).then(|| Power {
        battery_mv: 3300 + ((h >> 48) % 900) as i64,
        charging: h & (1 << 63) != 0,
    });
    Sample {
        n,
        environment,
        power,
    }
}

/// SplitMix64's finaliser: cheap and well spread.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_same_device_same_values() {
        let mut a = FakeSensor::new(7);
        let mut b = FakeSensor::new(7);
        for _ in 0..100 {
            assert_eq!(a.sample(), b.sample());
        }
    }

    #[test]
    fn test_devices_differ_and_ranges_hold() {
        let mut same = 0;
        for n in 0..200 {
            let a = reading(1, n);
            let b = reading(2, n);
            if a.environment == b.environment {
                same += 1;
            }
            for s in [a, b] {
                assert!((15.0..30.0).contains(&s.environment.temperature_c));
                assert!((30.0..80.0).contains(&s.environment.humidity_pct));
                assert!((980.0..1040.0).contains(&s.environment.pressure_hpa));
                assert_eq!(s.power.is_some(), n.is_multiple_of(POWER_EVERY));
            }
        }
        assert_eq!(same, 0);
    }
}
