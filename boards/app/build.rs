//! Turns the `CAIRN_*` environment variables into the compiled-in `BUILD` settings.
//! The parser is `src/settings.rs` itself, so build time and run time agree.

#[allow(dead_code)]
#[path = "src/settings.rs"]
mod settings;

use settings::Settings;
use std::fmt::Write as _;

/// (environment variable, setting key)
const VARS: &[(&str, &str)] = &[
    ("CAIRN_DEVICE_ID", "device-id"),
    ("CAIRN_KEY", "key"),
    ("CAIRN_GATEWAYS", "gateways"),
    ("CAIRN_PERIOD_MS", "period-ms"),
    ("CAIRN_SAMPLES", "samples"),
];

fn main() {
    let mut settings = Settings::defaults();
    for (var, key) in VARS {
        println!("cargo:rerun-if-env-changed={var}");
        if let Ok(value) = std::env::var(var)
            && let Err(e) = settings.apply(&format!("{key}={value}"))
        {
            panic!("{var}={value:?}: {e}");
        }
    }
    let mut gateways = String::new();
    for g in &settings.gateways {
        write!(gateways, "Gateway {{ ip: {:?}, port: {} }}, ", g.ip, g.port).unwrap();
    }
    let code = format!(
        "/// The settings this image was built with (`CAIRN_*` environment variables).\n\
         pub const BUILD: Settings = Settings {{ device_id: {}, key: {:?}, gateways: [{gateways}], \
         gateway_count: {}, period_ms: {}, samples: {} }};\n",
        settings.device_id,
        settings.key,
        settings.gateway_count,
        settings.period_ms,
        settings.samples,
    );
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("build_settings.rs");
    std::fs::write(out, code).unwrap();
}
