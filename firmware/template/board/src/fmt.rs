//! The fmt shim: log macros that forward to `defmt` when the `defmt` feature is on and
//! compile to nothing otherwise, so the same code builds with and without a logger (the
//! pattern of embassy's own `fmt.rs`; add a `log` arm for code shared with a host build).
#![allow(unused_macros)]

macro_rules! info {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::info!($($arg)*);
        #[cfg(not(feature = "defmt"))]
        let _ = ($($arg)*);
    }};
}

macro_rules! warn {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::warn!($($arg)*);
        #[cfg(not(feature = "defmt"))]
        let _ = ($($arg)*);
    }};
}

macro_rules! error {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::error!($($arg)*);
        #[cfg(not(feature = "defmt"))]
        let _ = ($($arg)*);
    }};
}
