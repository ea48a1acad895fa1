//! `container.json` of a Docker checkpoint (a `docker-checkpoint` directory
//! or a catalogue record): whatever the bytes, `create_body` either refuses
//! or builds a create body that asks for none of the host (no privileges,
//! host paths, devices, capabilities or host namespaces).
#![no_main]

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::docker::record::{create_body, LIMITS, NETWORK_MODES};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(body) = create_body(&record) else {
        return;
    };
    let host = body["HostConfig"].as_object().expect("a body always has a HostConfig");
    for key in host.keys() {
        assert!(
            key == "NetworkMode" || LIMITS.contains(&key.as_str()),
            "HostConfig.{key} passed through"
        );
    }
    if let Some(mode) = host.get("NetworkMode") {
        assert!(NETWORK_MODES.contains(&mode.as_str().unwrap_or("?")), "{mode}");
    }
    assert!(body["Image"].as_str().is_some_and(|i| !i.is_empty()));
});
