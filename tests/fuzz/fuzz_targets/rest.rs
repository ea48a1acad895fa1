//! The REST API's request parsing: a job listing's query (the input's first
//! line) and a commit request's JSON body (the rest), as a TCP caller may
//! send them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::api::rest::{parse_create, parse_list_query, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    let (query, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[..0]),
    };
    if let Ok(query) = std::str::from_utf8(query) {
        if let Ok(parsed) = parse_list_query(query) {
            assert!((1..=1000).contains(&parsed.limit));
        }
    }
    // The server never hands the parser more than this.
    if body.len() <= MAX_BODY {
        let _ = parse_create(body, "default");
    }
});
