//! The test image, built here from `/usr/bin/busybox` with no network: two
//! uncompressed OCI layers, an OCI config and manifest, packed as an OCI
//! archive that `ctr images import` reads. This module only produces bytes and
//! the digests the tests assert on; it never talks to containerd.
//!
//! Layer 1 (`base`) is a busybox root filesystem laid out like
//! `busybox --install -s` (every applet a symlink to `/bin/busybox`), minimal
//! `/etc`, and `/etc/removed-later`. Layer 2 (`app`) adds `/srv/seamless/` with
//! files of known content and modes and deletes `/etc/removed-later` through
//! an OCI whiteout, so the chain exercises overlay lowerdirs and whiteouts.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Repository path of the test image in the registry.
pub const REPOSITORY: &str = "seamless-test";
/// Tag of the test image.
pub const TAG: &str = "1";

/// A file the second layer adds: path in the image, content, mode.
pub const GREETING: (&str, &str, u32) = (
    "/srv/seamless/greeting.txt",
    "hello from the seamless test image\n",
    0o640,
);
/// An executable script the second layer adds.
pub const SCRIPT: (&str, &str, u32) = ("/srv/seamless/run.sh", "#!/bin/sh\necho script-ran-ok\n", 0o750);
/// A file of the first layer that the second layer's whiteout removes.
pub const REMOVED_LATER: &str = "/etc/removed-later";

const MTIME: u64 = 1_700_000_000;
const BUSYBOX: &str = "/usr/bin/busybox";

/// What the tests need to know about the built image.
pub struct BuiltImage {
    /// The OCI archive (a tar of an OCI image layout) for `ctr images import`.
    pub archive: Vec<u8>,
    /// Uncompressed layer digests, base first (layer digest == diff id here).
    pub diff_ids: Vec<String>,
    /// containerd chain ids of the layers, base first: the snapshot names.
    pub chain_ids: Vec<String>,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Size in bytes of `/bin/busybox`, for usage checks.
    pub busybox_size: u64,
}

/// Builds the image; `name` is the full reference the archive names it
/// (`io.containerd.image.name`), e.g. `127.0.0.1:5000/seamless-test:1`.
pub fn build_image(name: &str) -> Result<BuiltImage> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (install busybox-static)"))?;
    let base = base_layer(&busybox)?;
    let app = app_layer()?;
    let layers = [base, app];
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
    let chain_ids = chain_ids(&diff_ids);

    let config = json!({
        "architecture": oci_arch()?,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/"
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [
            { "created_by": "seamless integration test: busybox base", "created": "2023-11-14T22:13:20Z" },
            { "created_by": "seamless integration test: app files", "created": "2023-11-14T22:13:20Z" }
        ]
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
            .collect::<Vec<_>>()
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let mut manifest_desc = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_desc["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": TAG
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc]
    });

    let mut archive = TarWriter::default();
    archive.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
    archive.file("index.json", &serde_json::to_vec(&index)?, 0o644)?;
    archive.dir("blobs", 0o755)?;
    archive.dir("blobs/sha256", 0o755)?;
    let mut written = BTreeSet::new();
    for blob in [&config, &manifest, &layers[0], &layers[1]] {
        let hex = hex_sha256(blob);
        if written.insert(hex.clone()) {
            archive.file(&format!("blobs/sha256/{hex}"), blob, 0o644)?;
        }
    }
    Ok(BuiltImage {
        archive: archive.finish(),
        diff_ids,
        chain_ids,
        manifest_digest: sha256_digest(&manifest),
        busybox_size: busybox.len() as u64,
    })
}

fn base_layer(busybox: &[u8]) -> Result<Vec<u8>> {
    let mut tar = TarWriter::default();
    for (dir, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        tar.dir(dir, mode)?;
    }
    tar.file("bin/busybox", busybox, 0o755)?;
    for applet in busybox_applets()? {
        if applet != "bin/busybox" {
            tar.symlink(&applet, "/bin/busybox")?;
        }
    }
    tar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    tar.file("etc/group", b"root:x:0:\n", 0o644)?;
    tar.file(
        REMOVED_LATER.trim_start_matches('/'),
        b"the second layer deletes this file\n",
        0o644,
    )?;
    Ok(tar.finish())
}

fn app_layer() -> Result<Vec<u8>> {
    let mut tar = TarWriter::default();
    tar.dir("etc", 0o755)?;
    tar.file("etc/.wh.removed-later", b"", 0o644)?;
    tar.dir("srv", 0o755)?;
    tar.dir("srv/seamless", 0o755)?;
    for (path, content, mode) in [GREETING, SCRIPT] {
        tar.file(path.trim_start_matches('/'), content.as_bytes(), mode)?;
    }
    Ok(tar.finish())
}

/// Applet paths (`bin/sh`, `usr/bin/awk`, ...) where `busybox --install -s`
/// would put its symlinks.
fn busybox_applets() -> Result<Vec<String>> {
    let out = std::process::Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list-full"))?;
    ensure!(out.status.success(), "{BUSYBOX} --list-full failed: {}", out.status);
    let applets: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for needed in ["bin/sh", "bin/cat", "bin/sleep", "bin/stat", "bin/echo"] {
        ensure!(
            applets.iter().any(|a| a == needed),
            "{BUSYBOX} has no applet {needed}; the tests need it"
        );
    }
    Ok(applets)
}

fn oci_arch() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => bail!("no OCI architecture name for {other}"),
    })
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(blob), "size": blob.len() })
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(data))
}

/// containerd's chain ids: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    for diff in diff_ids {
        let next = match chain.last() {
            None => diff.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

/// A ustar writer for exactly what the image needs: directories, regular
/// files and symlinks, owned by root, with a fixed mtime.
#[derive(Default)]
struct TarWriter {
    out: Vec<u8>,
}

impl TarWriter {
    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.header(&format!("{path}/"), mode, 0, b'5', "")
    }

    fn file(&mut self, path: &str, content: &[u8], mode: u32) -> Result<()> {
        self.header(path, mode, content.len() as u64, b'0', "")?;
        self.out.extend_from_slice(content);
        let pad = (512 - content.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.header(path, 0o777, 0, b'2', target)
    }

    fn header(&mut self, path: &str, mode: u32, size: u64, kind: u8, link: &str) -> Result<()> {
        ensure!(
            path.len() < 100 && link.len() < 100,
            "tar name too long: {path} -> {link}"
        );
        ensure!(!Path::new(path).is_absolute(), "tar names are relative: {path}");
        let mut h = [0u8; 512];
        put(&mut h[0..100], path.as_bytes());
        put_octal(&mut h[100..108], u64::from(mode));
        put_octal(&mut h[108..116], 0);
        put_octal(&mut h[116..124], 0);
        put_octal(&mut h[124..136], size);
        put_octal(&mut h[136..148], MTIME);
        h[156] = kind;
        put(&mut h[157..257], link.as_bytes());
        put(&mut h[257..263], b"ustar\0");
        put(&mut h[263..265], b"00");
        put(&mut h[265..297], b"root");
        put(&mut h[297..329], b"root");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
        self.out.extend_from_slice(&h);
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
}

fn put(field: &mut [u8], value: &[u8]) {
    field[..value.len()].copy_from_slice(value);
}

/// Octal, zero padded, NUL terminated: the ustar numeric field format.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    put(field, format!("{value:0digits$o}\0").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_containerd() {
        let diffs = vec!["sha256:aa".to_string(), "sha256:bb".to_string()];
        let chain = chain_ids(&diffs);
        assert_eq!(chain[0], "sha256:aa");
        assert_eq!(chain[1], sha256_digest(b"sha256:aa sha256:bb"));
    }

    #[test]
    fn tar_round_trips_through_the_tar_command() {
        let mut tar = TarWriter::default();
        tar.dir("d", 0o755).unwrap();
        tar.file("d/f", b"content\n", 0o640).unwrap();
        tar.symlink("d/l", "/d/f").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("t.tar");
        std::fs::write(&archive, tar.finish()).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&archive)
            .output()
            .expect("tar");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("-rw-r----- root/root         8"), "{listing}");
        assert!(listing.contains("d/l -> /d/f"), "{listing}");
    }
}
