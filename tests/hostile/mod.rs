//! Hostile inputs built by hand, as an attacker would write them rather
//! than as this project's writers do: checkpoint archives whose layer holds
//! what no capture makes (a file beneath a symlink, a hard link out of the
//! tree, a `..` name). Shared by the daemon's tests and the containerd
//! integration tests (`#[path]`).

#![allow(dead_code)]

use std::path::Path;

use sha2::{Digest, Sha256};

/// One member of a layer, its name written as it is.
pub enum Member<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A ustar member with `name` and `link` copied into the header as they
/// are: the tar crate refuses to write `..` or absolute names itself.
fn append_raw(builder: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut header = tar::Header::new_ustar();
    let fields = header.as_ustar_mut().expect("a ustar header");
    assert!(name.len() <= fields.name.len() && link.len() <= fields.linkname.len());
    fields.name[..name.len()].copy_from_slice(name.as_bytes());
    fields.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_mtime(1_764_583_200);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data).expect("append a member");
}

fn tar_of(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        append_raw(&mut builder, name, tar::EntryType::Regular, "", data);
    }
    builder.into_inner().expect("finish the layout")
}

/// Writes at `path` a checkpoint archive (an OCI image layout in a tar) of
/// one checkpoint, `id` of container `container`, whose one uncompressed
/// layer holds the root directory and then `members`; every digest right,
/// so only what the layer holds can be refused.
pub fn checkpoint_archive(path: &Path, id: &str, container: &str, members: &[Member<'_>]) {
    let mut layer = tar::Builder::new(Vec::new());
    append_raw(&mut layer, "./", tar::EntryType::Directory, "", b"");
    for member in members {
        match member {
            Member::Dir(name) => append_raw(&mut layer, name, tar::EntryType::Directory, "", b""),
            Member::File(name, data) => append_raw(&mut layer, name, tar::EntryType::Regular, "", data),
            Member::Symlink(name, target) => append_raw(&mut layer, name, tar::EntryType::Symlink, target, b""),
            Member::HardLink(name, target) => append_raw(&mut layer, name, tar::EntryType::Link, target, b""),
        }
    }
    let layer = layer.into_inner().expect("finish the layer");
    let layer_digest = format!("sha256:{}", sha256(&layer));
    let prefix = "io.seamless.checkpoint.";
    let config = serde_json::to_vec(&serde_json::json!({
        "created": "2025-12-01T10:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    }))
    .expect("config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256(&config)),
            "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
            "annotations": {
                format!("{prefix}id"): id,
                format!("{prefix}created"): "2025-12-01T10:00:00Z"
            }
        }],
        "annotations": {
            format!("{prefix}archive-version"): "1",
            format!("{prefix}container"): container,
            format!("{prefix}id"): id
        }
    }))
    .expect("manifest");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256(&manifest)),
            "size": manifest.len()
        }]
    }))
    .expect("index");
    let outer = tar_of(&[
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".into(), index),
        (format!("blobs/sha256/{}", sha256(&manifest)), manifest),
        (format!("blobs/sha256/{}", sha256(&config)), config),
        (format!("blobs/sha256/{}", sha256(&layer)), layer),
    ]);
    std::fs::write(path, outer).expect("write the archive");
}

/// Every path under `dir`, relative to it, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(dir).expect("beneath").display().to_string());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            }
        }
    }
    out.sort();
    out
}
