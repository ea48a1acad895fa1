//! A checkpoint's stored filesystem delta, decoded from JSON as shared
//! storage or another node hands it over, then applied and composed as
//! restore, merge and prune do, and checked as restore and import check
//! every tree before writing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seamless_snapshotter::checkpoint::tree::{diff, validate_tree, Delta, Tree};

fuzz_target!(|data: &[u8]| {
    // Two deltas: the input split at its first NUL (none: the same twice).
    let (first, second) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    let Ok(parent) = serde_json::from_slice::<Delta>(first) else {
        return;
    };
    let child = serde_json::from_slice::<Delta>(second).unwrap_or_default();
    let mut tree = Tree::new();
    parent.apply(&mut tree);
    child.apply(&mut tree);
    // Composing, as merge and prune do, must give the tree that applying
    // both in turn gives.
    let mut composed = Tree::new();
    parent.then(&child).apply(&mut composed);
    assert_eq!(tree, composed, "parent.then(child) differs from applying both");
    // The check restore and import make before a byte is written.
    let _ = validate_tree(&tree);
    let _ = diff(&Tree::new(), &tree);
    let _ = Delta::between(&Tree::new(), &tree);
    let _ = parent.content_bytes();
});
