//! `checkpointctl automanage --schedule-file`: the YAML policy parser, taken
//! from checkpointctl's own source so that the fuzzed code is the shipped one.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../src/bin/checkpointctl/policy.rs"]
mod policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let defaults = policy::Defaults {
        check_interval: Duration::from_secs(30),
        cpu_threshold: 80.0,
        mem_threshold: 80.0,
    };
    if let Ok(policy) = policy::Policy::parse(text, "fuzz.yaml", &defaults) {
        for rule in &policy.rules {
            let _ = rule.selects("web-1", &Default::default());
        }
    }
});
