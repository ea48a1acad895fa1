//! The one writer of OCI layer tar members: [`LayerTar`] wraps a
//! `tar::Builder` over the compressing stream, hashing the tar (the
//! `diff_id`) and the compressed bytes (the digest and size). Layers of
//! overlay upper directories ([`layer`](super::layer)) and of checkpoint
//! tree deltas (`checkpoint::archive::export`) both write through it; each
//! caller only walks its own source.
//!
//! The two callers' layers differ in how a header holds what does not fit
//! it, and their bytes are pinned, so that choice is a [`HeaderStyle`]
//! given to [`LayerTar::new`] rather than one answer for both.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::oci::compress::{Compression, Encoder};
use crate::oci::overlay::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// The PAX record key prefix of an extended attribute (`SCHILY.xattr.<name>`).
pub const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// The largest uid or gid the 8-byte octal field of a ustar header holds.
const MAX_USTAR_ID: u64 = 0o7777777;

/// How a member's header holds names and ids too long for its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// GNU headers: long names and link targets as GNU long-name members
    /// (what `tar::Builder` writes), ids in base-256. Markers are mode 0644.
    Gnu,
    /// ustar headers: a name or link target longer than its field, and a
    /// uid or gid over 0o7777777, also as PAX records (`path`,
    /// `linkpath`, `uid`, `gid`; the field keeps a truncated copy).
    /// Markers are mode 0600.
    Ustar,
}

/// The header of one member: what tar's fields hold.
#[derive(Debug, Clone)]
pub struct TarMember<'a> {
    /// The archive path (a directory's ends in `/`).
    pub path: &'a Path,
    pub kind: tar::EntryType,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// The bytes of data that follow (regular files only).
    pub size: u64,
    /// The target of a symlink or hard link.
    pub link: Option<&'a Path>,
    /// Major and minor device numbers, written only when given.
    pub device: Option<(u32, u32)>,
}

/// The digests of a finished layer, each `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// Of the compressed blob.
    pub digest: String,
    /// Of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of the compressed blob.
    pub size: u64,
}

/// `dir/.wh.name`, the whiteout of `dir/name`; None for a path without a
/// last component (the root cannot be removed).
pub fn whiteout_path(removed: &Path) -> Option<PathBuf> {
    let name = removed.file_name()?;
    let mut whiteout = std::ffi::OsString::from(WHITEOUT_PREFIX);
    whiteout.push(name);
    Some(removed.with_file_name(whiteout))
}

/// The PAX record key of extended attribute `name`.
pub fn xattr_record(name: &str) -> String {
    format!("{PAX_XATTR_PREFIX}{name}")
}

type TarStream<W> = Digesting<Encoder<Digesting<W>>>;

/// Writes the members of one OCI layer into `W`, compressed.
pub struct LayerTar<W: Write> {
    builder: tar::Builder<TarStream<W>>,
    style: HeaderStyle,
}

impl<W: Write> LayerTar<W> {
    /// A layer compressed with `compression` (`zstd_level` for zstd) into `out`.
    pub fn new(out: W, compression: Compression, zstd_level: i32, style: HeaderStyle) -> io::Result<LayerTar<W>> {
        let encoder = Encoder::new(Digesting::new(out), compression, zstd_level)?;
        Ok(LayerTar {
            builder: tar::Builder::new(Digesting::new(encoder)),
            style,
        })
    }

    /// The whiteout of `removed`: hides it in the layers below.
    pub fn whiteout(&mut self, removed: &Path) -> io::Result<()> {
        let path = whiteout_path(removed)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root cannot be removed"))?;
        self.marker(&path)
    }

    /// The opaque marker of directory `dir`: hides what the layers below
    /// hold in it.
    pub fn opaque(&mut self, dir: &Path) -> io::Result<()> {
        self.marker(&dir.join(OPAQUE_MARKER))
    }

    /// An empty regular file owned by root, mtime 0.
    fn marker(&mut self, path: &Path) -> io::Result<()> {
        let mode = match self.style {
            HeaderStyle::Gnu => 0o644,
            HeaderStyle::Ustar => 0o600,
        };
        let member = TarMember {
            path,
            kind: tar::EntryType::Regular,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: None,
            device: None,
        };
        self.member(&member, &[], io::empty())
    }

    /// Appends `member` with its PAX `records` (key, value; in this order,
    /// after any the [`HeaderStyle`] adds) and its `data`, which must hold
    /// `member.size` bytes.
    pub fn member(&mut self, member: &TarMember, records: &[(String, Vec<u8>)], data: impl Read) -> io::Result<()> {
        match self.style {
            HeaderStyle::Gnu => {
                let mut header = tar::Header::new_gnu();
                set_fields(&mut header, member)?;
                self.builder
                    .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
                match member.link {
                    Some(target) => self.builder.append_link(&mut header, member.path, target),
                    None => self.builder.append_data(&mut header, member.path, data),
                }
            }
            HeaderStyle::Ustar => {
                let mut header = tar::Header::new_ustar();
                let mut all: Vec<(&str, &[u8])> = Vec::new();
                let path = member.path.as_os_str().as_bytes();
                if set_name_field(&mut header.as_old_mut().name, path) {
                    all.push(("path", path));
                }
                if let Some(link) = member.link {
                    let link = link.as_os_str().as_bytes();
                    if set_name_field(&mut header.as_old_mut().linkname, link) {
                        all.push(("linkpath", link));
                    }
                }
                let (uid, gid) = (member.uid.to_string(), member.gid.to_string());
                if member.uid > MAX_USTAR_ID {
                    all.push(("uid", uid.as_bytes()));
                }
                if member.gid > MAX_USTAR_ID {
                    all.push(("gid", gid.as_bytes()));
                }
                all.extend(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
                set_fields(&mut header, member)?;
                self.builder.append_pax_extensions(all)?;
                header.set_cksum();
                self.builder.append(&header, data)
            }
        }
    }

    /// Ends the tar and the compressed stream; returns `out` (not
    /// flushed) and the layer's digests.
    pub fn finish(self) -> io::Result<(W, LayerDigests)> {
        let (encoder, diff_id, _) = self.builder.into_inner()?.finish();
        let (out, digest, size) = encoder.finish()?.finish();
        Ok((out, LayerDigests { digest, diff_id, size }))
    }
}

fn set_fields(header: &mut tar::Header, member: &TarMember) -> io::Result<()> {
    header.set_entry_type(member.kind);
    header.set_size(member.size);
    header.set_mode(member.mode);
    header.set_uid(member.uid);
    header.set_gid(member.gid);
    header.set_mtime(member.mtime);
    if let Some((major, minor)) = member.device {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    Ok(())
}

/// Copies `value` into a ustar name field; returns whether it did not fit
/// (then a PAX record holds it and the field a truncated copy).
fn set_name_field(field: &mut [u8], value: &[u8]) -> bool {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
    value.len() > field.len()
}

/// Passes bytes through while hashing them and counting them.
struct Digesting<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Digesting<W> {
    fn new(inner: W) -> Self {
        Digesting {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer, the `sha256:<hex>` digest and the byte count.
    fn finish(self) -> (W, String, u64) {
        let hex: String = self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        (self.inner, format!("sha256:{hex}"), self.written)
    }
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::sha256_hex;

    /// A member as read back: path, mode, uid and PAX record keys.
    type Seen = (String, u32, u64, Vec<String>);

    /// The members written in `style`, read back; the raw tar.
    fn write(style: HeaderStyle) -> (Vec<Seen>, Vec<u8>) {
        let mut tar = LayerTar::new(Vec::new(), Compression::Gzip, 3, style).unwrap();
        tar.whiteout(Path::new("dir/gone")).unwrap();
        tar.opaque(Path::new("dir")).unwrap();
        let long = format!("dir/{}", "n".repeat(120));
        let member = TarMember {
            path: Path::new(&long),
            kind: tar::EntryType::Regular,
            mode: 0o640,
            uid: 3_000_000,
            gid: 7,
            mtime: 1,
            size: 2,
            link: None,
            device: None,
        };
        let records = [(xattr_record("user.a"), b"1".to_vec())];
        tar.member(&member, &records, &b"hi"[..]).unwrap();
        assert!(whiteout_path(Path::new("")).is_none());
        assert!(tar.whiteout(Path::new("")).is_err());
        let (blob, digests) = tar.finish().unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut raw).unwrap();
        assert_eq!(digests.digest, format!("sha256:{}", sha256_hex(&blob)));
        assert_eq!(digests.diff_id, format!("sha256:{}", sha256_hex(&raw)));
        assert_eq!(digests.size, blob.len() as u64);
        let mut archive = tar::Archive::new(&raw[..]);
        let mut members = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let keys = match entry.pax_extensions().unwrap() {
                Some(pax) => pax.map(|r| r.unwrap().key().unwrap().to_string()).collect(),
                None => Vec::new(),
            };
            let header = entry.header();
            let (mode, uid) = (header.mode().unwrap(), header.uid().unwrap());
            members.push((entry.path().unwrap().display().to_string(), mode, uid, keys));
        }
        (members, raw)
    }

    #[test]
    fn both_styles_write_markers_and_long_members_their_own_way() {
        let long = format!("dir/{}", "n".repeat(120));
        let (gnu, gnu_raw) = write(HeaderStyle::Gnu);
        assert_eq!(
            gnu,
            [
                ("dir/.wh.gone".to_string(), 0o644, 0, vec![]),
                ("dir/.wh..wh..opq".to_string(), 0o644, 0, vec![]),
                (long.clone(), 0o640, 3_000_000, vec!["SCHILY.xattr.user.a".to_string()]),
            ]
        );
        // The long name as a GNU long-name member.
        assert!(gnu_raw.windows(13).any(|w| w == b"././@LongLink"));
        let (ustar, ustar_raw) = write(HeaderStyle::Ustar);
        assert_eq!(
            ustar,
            [
                ("dir/.wh.gone".to_string(), 0o600, 0, vec![]),
                ("dir/.wh..wh..opq".to_string(), 0o600, 0, vec![]),
                (
                    long,
                    0o640,
                    3_000_000,
                    ["path", "uid", "SCHILY.xattr.user.a"].map(String::from).to_vec()
                ),
            ]
        );
        assert!(!ustar_raw.windows(13).any(|w| w == b"././@LongLink"));
    }
}
