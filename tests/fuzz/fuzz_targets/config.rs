//! The daemon's TOML configuration file: parsed and validated, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, "fuzz.toml") {
        if config.validate().is_ok() {
            let _ = config.nydus_base_cache_bytes();
            let _ = config.pool_size();
        }
    }
});
