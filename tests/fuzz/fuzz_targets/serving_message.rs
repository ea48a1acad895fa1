//! A message between the daemon and a FUSE serving process (a request, or
//! an answer such as the status a serving process reports when a restarted
//! daemon takes it over): whatever the bytes, parsing either refuses or
//! gives a spec whose paths are absolute and whose registry scheme is http
//! or https.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::nydus::fuse::{BlobBackend, FuseSpec};
use seamless_snapshotter::nydus::serving::{Reply, Request, WireSpec};

fn check(wire: WireSpec) {
    let Ok(spec) = FuseSpec::try_from(wire) else {
        return;
    };
    for path in [&spec.bootstrap, &spec.mountpoint, &spec.cache_dir] {
        assert!(path.is_absolute(), "{}", path.display());
    }
    match spec.backend {
        BlobBackend::Local { dir } => assert!(dir.is_absolute()),
        BlobBackend::Registry { scheme, .. } => assert!(scheme == "http" || scheme == "https"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Reply::Status(status)) = serde_json::from_slice::<Reply>(data) {
        check(status.spec);
    }
    if let Ok(Request::Serve { spec, .. }) = serde_json::from_slice::<Request>(data) {
        check(*spec);
    }
});
