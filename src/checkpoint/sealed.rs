//! Checkpoint objects sealed at rest: an `ObjectStore` over another that
//! encrypts and authenticates every object with one 256-bit key, so that
//! whoever holds the storage (an NFS export, a bucket) can neither read a
//! checkpoint nor change one unnoticed. Owns the sealed object format and
//! the key. Keys of objects, listing and atomic replacement stay the inner
//! store's; sizes it reports are of the plaintext. It must never print the
//! key, nor hand a caller a byte that failed authentication.
//!
//! Format, version 1: a 28-byte header (`seamseal`, the version byte, the
//! object's random 19-byte nonce prefix), then the plaintext in segments of
//! 1 MiB, each sealed with XChaCha20-Poly1305 in the STREAM construction
//! (the last 5 nonce bytes are a big-endian segment counter and a
//! last-segment flag) and followed by its 16-byte tag. Every segment but
//! the last holds exactly 1 MiB and the last holds less, possibly nothing:
//! a reader tells the last segment by its length, and a cut at any byte
//! fails to open. Each segment's associated data is the header and the
//! object's key, so an object copied under another key does not open.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aead_stream::{DecryptorBE32, EncryptorBE32, StreamBE32};
use chacha20poly1305::aead::Generate;
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305};

use super::objects::{validate_key, ObjectError, ObjectStore, PutBatch};
use crate::error::{io_err, IoError};

const MAGIC: &[u8; 8] = b"seamseal";
const VERSION: u8 = 1;
/// XChaCha20's 24-byte nonce less STREAM's counter (4) and flag (1).
const NONCE_PREFIX_LEN: usize = 19;
const HEADER_LEN: usize = MAGIC.len() + 1 + NONCE_PREFIX_LEN;
/// Plaintext bytes per segment in format version 1: what a reader or
/// writer holds at once.
const SEGMENT: usize = 1 << 20;
const TAG_LEN: usize = 16;

type Encryptor = EncryptorBE32<XChaCha20Poly1305>;
type Decryptor = DecryptorBE32<XChaCha20Poly1305>;
type StreamNonce = aead_stream::Nonce<XChaCha20Poly1305, StreamBE32<XChaCha20Poly1305>>;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("encryption key must be 64 hex digits (32 bytes), got {0} characters")]
    KeyLength(usize),
    #[error("encryption key has a character other than a hex digit at position {0}")]
    KeyNotHex(usize),
    #[error("cannot be decrypted: wrong encryption key or damaged data")]
    Undecryptable,
    #[error("is truncated: damaged data")]
    Truncated,
    #[error("is not a sealed object: it was stored without encryption, or is damaged")]
    NotSealed,
    #[error("is sealed in format version {0}, which this daemon cannot read")]
    UnknownVersion(u8),
    #[error("is too large to seal")]
    TooLarge,
    #[error("cannot be sealed: no random nonce from the operating system: {0}")]
    Random(String),
    #[error("cannot be read after an earlier error")]
    Poisoned,
}

/// Objects of `inner`, sealed with one key. `put_file` seals into a
/// private file of a staging directory, then hands that to the inner
/// store, as the inner store takes whole files only; `open` decrypts as
/// the caller reads. Neither holds more than a segment in memory.
pub struct SealedStore {
    inner: Arc<dyn ObjectStore>,
    cipher: XChaCha20Poly1305,
    staging: PathBuf,
    staged: AtomicU64,
    /// `SEGMENT`, but in tests, whose stores seal small objects in many
    /// segments rather than large ones in unoptimized code.
    segment: usize,
}

impl fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedStore")
            .field("inner", &self.inner)
            .field("staging", &self.staging)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SealedStore {
    /// Seals the objects of `inner` with the 32-byte key `key_hex` spells
    /// in 64 hex digits (surrounding whitespace is ignored). Sealed copies
    /// of files are staged in `staging` (created 0700 when needed), which
    /// should be on the daemon's disk beside its other work files: /tmp may
    /// be memory, and beside the source may be a container's layer.
    pub fn new(inner: Arc<dyn ObjectStore>, key_hex: &str, staging: &Path) -> Result<SealedStore, SealError> {
        let key = parse_key(key_hex)?;
        Ok(SealedStore {
            inner,
            cipher: XChaCha20Poly1305::new(&key),
            staging: staging.to_path_buf(),
            staged: AtomicU64::new(0),
            segment: SEGMENT,
        })
    }

    #[cfg(test)]
    fn with_segment(mut self, segment: usize) -> SealedStore {
        self.segment = segment;
        self
    }

    /// Writes the sealed form of `input` to `output`, a segment at a time.
    fn seal(&self, key: &str, input: &mut impl Read, output: &mut impl Write) -> Result<(), Failure> {
        let prefix =
            <[u8; NONCE_PREFIX_LEN]>::try_generate().map_err(|e| Failure::Seal(SealError::Random(e.to_string())))?;
        let header = header(&prefix);
        output.write_all(&header).map_err(Failure::Write)?;
        let aad = associated_data(&header, key);
        let mut encryptor = Encryptor::from_aead(self.cipher.clone(), &StreamNonce::from(prefix));
        let mut segment = Vec::with_capacity(self.segment + TAG_LEN);
        loop {
            segment.clear();
            segment.resize(self.segment, 0);
            let n = read_full(input, &mut segment).map_err(Failure::Read)?;
            segment.truncate(n);
            // Only the STREAM counter's end (4 PiB) fails here.
            let too_large = |_| Failure::Seal(SealError::TooLarge);
            if n == self.segment {
                encryptor.encrypt_next_in_place(&aad, &mut segment).map_err(too_large)?;
                output.write_all(&segment).map_err(Failure::Write)?;
            } else {
                encryptor.encrypt_last_in_place(&aad, &mut segment).map_err(too_large)?;
                return output.write_all(&segment).map_err(Failure::Write);
            }
        }
    }

    /// A new private file in the staging directory, removed on drop.
    fn stage(&self) -> Result<Staged, ObjectError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.staging)
            .map_err(io_err("create directory", &self.staging))?;
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let path = self.staging.join(format!(".sealing-{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok(Staged { path, file })
    }

    fn opener<R: Read>(&self, key: &str, source: R) -> Opener<R> {
        Opener {
            source,
            cipher: self.cipher.clone(),
            key: key.to_string(),
            decryptor: None,
            started: false,
            aad: Vec::new(),
            segment_len: self.segment,
            plain: Vec::new(),
            offset: 0,
            poisoned: false,
        }
    }
}

impl SealedStore {
    /// `data` sealed for `key`, as `put` stores it.
    fn sealed(&self, key: &str, data: &[u8]) -> Result<Vec<u8>, ObjectError> {
        validate_key(key)?;
        let mut sealed = Vec::with_capacity(sealed_len(data.len(), self.segment));
        self.seal(key, &mut &data[..], &mut sealed)
            .map_err(|failure| match failure {
                Failure::Seal(e) => object_error(key, e),
                Failure::Read(e) | Failure::Write(e) => io_err("seal", Path::new(key))(e).into(),
            })?;
        Ok(sealed)
    }
}

/// A batch of the inner store, of sealed objects.
struct SealedBatch<'a> {
    store: &'a SealedStore,
    inner: Box<dyn PutBatch + 'a>,
}

impl PutBatch for SealedBatch<'_> {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        self.inner.put(key, &self.store.sealed(key, data)?)
    }

    fn commit(self: Box<Self>) -> Result<(), ObjectError> {
        self.inner.commit()
    }
}

impl ObjectStore for SealedStore {
    fn describe(&self) -> String {
        format!("{} (encrypted)", self.inner.describe())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectError> {
        self.inner.put(key, &self.sealed(key, data)?)
    }

    fn put_file(&self, key: &str, source: &Path) -> Result<(), ObjectError> {
        validate_key(key)?;
        let mut input = File::open(source).map_err(io_err("open", source))?;
        let mut staged = self.stage()?;
        self.seal(key, &mut input, &mut staged.file)
            .map_err(|failure| match failure {
                Failure::Seal(e) => object_error(key, e),
                Failure::Read(e) => io_err("read", source)(e).into(),
                Failure::Write(e) => io_err("write", &staged.path)(e).into(),
            })?;
        self.inner.put_file(key, &staged.path)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        let sealed = self.inner.get(key)?;
        let mut opener = self.opener(key, &sealed[..]);
        let mut plain = Vec::with_capacity(plaintext_len(sealed.len() as u64, self.segment).unwrap_or(0) as usize);
        while opener.next_segment().map_err(|f| f.into_object_error(key))? {
            plain.extend_from_slice(&opener.plain);
        }
        Ok(plain)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, ObjectError> {
        let mut opener = self.opener(key, self.inner.open(key)?);
        // The first segment now, so that a wrong key fails the open, not a
        // read somewhere in the caller.
        opener.next_segment().map_err(|f| f.into_object_error(key))?;
        Ok(Box::new(opener))
    }

    fn size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        match self.inner.size(key)? {
            Some(sealed) => plaintext_len(sealed, self.segment)
                .map(Some)
                .ok_or_else(|| object_error(key, SealError::NotSealed)),
            None => Ok(None),
        }
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.inner.delete(key)
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(SealedBatch {
            store: self,
            inner: self.inner.batch(),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ObjectError> {
        self.inner
            .list(prefix)?
            .into_iter()
            .map(|(key, sealed)| match plaintext_len(sealed, self.segment) {
                Some(size) => Ok((key, size)),
                None => Err(object_error(&key, SealError::NotSealed)),
            })
            .collect()
    }
}

/// Why sealing or opening stopped.
enum Failure {
    Seal(SealError),
    Read(io::Error),
    Write(io::Error),
}

impl Failure {
    fn into_object_error(self, key: &str) -> ObjectError {
        match self {
            Failure::Seal(e) => object_error(key, e),
            Failure::Read(e) | Failure::Write(e) => io_err("read", Path::new(key))(e).into(),
        }
    }
}

/// The plaintext of one object, a segment at a time, each checked before
/// any of its bytes is handed out.
struct Opener<R> {
    source: R,
    cipher: XChaCha20Poly1305,
    key: String,
    /// None before the header is read and after the last segment.
    decryptor: Option<Decryptor>,
    started: bool,
    aad: Vec<u8>,
    segment_len: usize,
    /// The current segment's plaintext, from `offset` on not yet read.
    plain: Vec<u8>,
    offset: usize,
    /// A failed segment leaves the stream's position unknown: every later
    /// read fails too.
    poisoned: bool,
}

impl<R: Read> Opener<R> {
    /// Decrypts the next segment into `plain`; false at the end.
    fn next_segment(&mut self) -> Result<bool, Failure> {
        if self.poisoned {
            return Err(Failure::Seal(SealError::Poisoned));
        }
        let more = self.decrypt_next();
        if more.is_err() {
            self.poisoned = true;
            self.decryptor = None;
            self.plain.clear();
        }
        more
    }

    fn decrypt_next(&mut self) -> Result<bool, Failure> {
        if !self.started {
            self.start()?;
        }
        self.offset = 0;
        self.plain.clear();
        if self.decryptor.is_none() {
            return Ok(false);
        }
        self.plain.resize(self.segment_len + TAG_LEN, 0);
        let n = read_full(&mut self.source, &mut self.plain).map_err(Failure::Read)?;
        self.plain.truncate(n);
        let damaged = |_| Failure::Seal(SealError::Undecryptable);
        if n == self.segment_len + TAG_LEN {
            if let Some(decryptor) = self.decryptor.as_mut() {
                decryptor
                    .decrypt_next_in_place(&self.aad, &mut self.plain)
                    .map_err(damaged)?;
            }
        } else if n < TAG_LEN {
            return Err(Failure::Seal(SealError::Truncated));
        } else if let Some(decryptor) = self.decryptor.take() {
            decryptor
                .decrypt_last_in_place(&self.aad, &mut self.plain)
                .map_err(damaged)?;
        }
        Ok(true)
    }

    fn start(&mut self) -> Result<(), Failure> {
        let mut header = [0u8; HEADER_LEN];
        let n = read_full(&mut self.source, &mut header).map_err(Failure::Read)?;
        let seen = n.min(MAGIC.len());
        if header[..seen] != MAGIC[..seen] {
            return Err(Failure::Seal(SealError::NotSealed));
        }
        if n < HEADER_LEN {
            return Err(Failure::Seal(SealError::Truncated));
        }
        if header[MAGIC.len()] != VERSION {
            return Err(Failure::Seal(SealError::UnknownVersion(header[MAGIC.len()])));
        }
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        prefix.copy_from_slice(&header[MAGIC.len() + 1..]);
        self.aad = associated_data(&header, &self.key);
        self.decryptor = Some(Decryptor::from_aead(self.cipher.clone(), &StreamNonce::from(prefix)));
        self.started = true;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.offset == self.plain.len() {
            match self.next_segment() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(Failure::Read(e) | Failure::Write(e)) => return Err(e),
                Err(Failure::Seal(e)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, object_error(&self.key, e)))
                }
            }
        }
        let rest = &self.plain[self.offset..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.offset += n;
        Ok(n)
    }
}

struct Staged {
    path: PathBuf,
    file: File,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn parse_key(key_hex: &str) -> Result<Key, SealError> {
    let hex = key_hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(SealError::KeyLength(hex.chars().count()));
    }
    let mut key = Key::default();
    for (i, byte) in key.iter_mut().enumerate() {
        let digit = |at: usize| {
            (hex.as_bytes()[at] as char)
                .to_digit(16)
                .ok_or(SealError::KeyNotHex(at))
        };
        // Both digits are below 16, so the byte cannot overflow.
        *byte = (digit(2 * i)? * 16 + digit(2 * i + 1)?) as u8;
    }
    Ok(key)
}

fn header(prefix: &[u8; NONCE_PREFIX_LEN]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    header[MAGIC.len()] = VERSION;
    header[MAGIC.len() + 1..].copy_from_slice(prefix);
    header
}

fn associated_data(header: &[u8; HEADER_LEN], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + key.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// The stored size of `plain` bytes sealed in segments of `segment`.
fn sealed_len(plain: usize, segment: usize) -> usize {
    HEADER_LEN + plain + TAG_LEN * (plain / segment + 1)
}

/// The plaintext size of an object stored in `sealed` bytes, in segments
/// of `segment`, or None when no sealed object has that size.
fn plaintext_len(sealed: u64, segment: usize) -> Option<u64> {
    let body = sealed.checked_sub(HEADER_LEN as u64)?;
    let stride = (segment + TAG_LEN) as u64;
    let last = (body % stride).checked_sub(TAG_LEN as u64)?;
    Some(body / stride * segment as u64 + last)
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// "object <key>: <what is wrong with it>".
fn object_error(key: &str, e: SealError) -> ObjectError {
    let kind = match e {
        SealError::Random(_) => io::ErrorKind::Other,
        _ => io::ErrorKind::InvalidData,
    };
    ObjectError::Io(IoError {
        op: "object",
        path: key.to_string(),
        source: io::Error::new(kind, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::objects::DirStore;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const OTHER_KEY: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const UNREADABLE: &str = "cannot be decrypted: wrong encryption key or damaged data";
    /// The segment size of most tests: many segments, little to encrypt.
    const SMALL: usize = 1000;

    struct Fixture {
        tmp: tempfile::TempDir,
        raw: Arc<DirStore>,
        sealed: SealedStore,
    }

    fn fixture(segment: usize) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let raw = Arc::new(DirStore::open(&tmp.path().join("store"), "local").unwrap());
        let sealed = SealedStore::new(raw.clone(), KEY, &tmp.path().join("staging"))
            .unwrap()
            .with_segment(segment);
        Fixture { tmp, raw, sealed }
    }

    /// Bytes with no repeats for a bug to hide in, and a marker to look
    /// for in what is stored.
    fn plaintext(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9 ^ len as u32;
        let mut data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let marker = b"secret container state";
        if len >= marker.len() {
            let at = len / 2 - marker.len() / 2;
            data[at..at + marker.len()].copy_from_slice(marker);
        }
        data
    }

    fn read_all(mut reader: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // Reads that end inside segments and span them.
        let mut buf = vec![0u8; 777];
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn open_error(store: &SealedStore, key: &str) -> ObjectError {
        match store.open(key) {
            Ok(_) => panic!("object {key} opened"),
            Err(e) => e,
        }
    }

    #[test]
    fn objects_round_trip_and_are_stored_sealed() {
        let f = fixture(SMALL);
        // One short segment; one full and an empty last; full, full, short; ...
        let sizes = [0, 5, 100, SMALL - 1, SMALL, SMALL + 1, 2 * SMALL + 3, 37 * SMALL + 123];
        for (i, size) in sizes.into_iter().enumerate() {
            let data = plaintext(size);
            let put = format!("blobs/put/{i}");
            let from_file = format!("blobs/file/{i}");
            f.sealed.put(&put, &data).unwrap();
            let source = f.tmp.path().join(format!("source-{i}"));
            std::fs::write(&source, &data).unwrap();
            f.sealed.put_file(&from_file, &source).unwrap();
            let batched = format!("blobs/batch/{i}");
            let batch = f.sealed.batch();
            batch.put(&batched, &data).unwrap();
            assert_eq!(f.sealed.size(&batched).unwrap(), None, "not before commit");
            batch.commit().unwrap();
            for key in [&put, &from_file, &batched] {
                assert!(f.sealed.get(key).unwrap() == data, "get {key} ({size} bytes)");
                let read = read_all(f.sealed.open(key).unwrap()).unwrap();
                assert!(read == data, "open {key} ({size} bytes): read {}", read.len());
                assert_eq!(f.sealed.size(key).unwrap(), Some(size as u64), "{key}");
                let stored = f.raw.get(key).unwrap();
                assert_eq!(stored.len(), sealed_len(size, SMALL), "{key}");
                assert!(
                    !stored.windows(22).any(|w| w == b"secret container state"),
                    "{key} is stored in the clear"
                );
            }
            // A fresh nonce each time: the same plaintext never seals alike.
            assert_ne!(f.raw.get(&put).unwrap(), f.raw.get(&from_file).unwrap());
        }
        let listed = f.sealed.list("blobs/").unwrap();
        assert_eq!(listed.len(), 3 * sizes.len());
        for (key, size) in listed {
            let i: usize = key.rsplit('/').next().unwrap().parse().unwrap();
            assert_eq!(size, sizes[i] as u64, "{key}");
        }
        assert_eq!(f.sealed.size("blobs/missing").unwrap(), None);
        assert!(f.sealed.get("blobs/missing").unwrap_err().is_not_found());
        assert!(open_error(&f.sealed, "blobs/missing").is_not_found());
        f.sealed.delete("blobs/put/0").unwrap();
        f.sealed.delete("blobs/put/0").unwrap();
        assert_eq!(f.sealed.size("blobs/put/0").unwrap(), None);
        // Nothing staged is left behind.
        let staged: Vec<_> = std::fs::read_dir(f.tmp.path().join("staging")).unwrap().collect();
        assert!(staged.is_empty(), "{staged:?}");
    }

    #[test]
    fn objects_round_trip_in_segments_of_the_format() {
        let f = fixture(SEGMENT);
        let data = plaintext(SEGMENT + 1);
        let source = f.tmp.path().join("source");
        std::fs::write(&source, &data).unwrap();
        f.sealed.put_file("blobs/a", &source).unwrap();
        assert_eq!(
            f.raw.size("blobs/a").unwrap(),
            Some((HEADER_LEN + SEGMENT + 1 + 2 * TAG_LEN) as u64)
        );
        assert_eq!(f.sealed.size("blobs/a").unwrap(), Some(data.len() as u64));
        assert!(read_all(f.sealed.open("blobs/a").unwrap()).unwrap() == data);
        f.sealed.put("blobs/b", &data[..SEGMENT]).unwrap();
        assert_eq!(
            f.raw.size("blobs/b").unwrap(),
            Some((HEADER_LEN + SEGMENT + 2 * TAG_LEN) as u64)
        );
        assert!(f.sealed.get("blobs/b").unwrap()[..] == data[..SEGMENT]);
    }

    #[test]
    fn a_wrong_key_is_a_clear_error() {
        let f = fixture(SMALL);
        let data = plaintext(3 * SMALL + 10);
        f.sealed.put("blobs/a", &data).unwrap();
        f.sealed.put("checkpoints/empty.json", b"").unwrap();
        let wrong = SealedStore::new(f.raw.clone(), OTHER_KEY, &f.tmp.path().join("staging"))
            .unwrap()
            .with_segment(SMALL);
        for key in ["blobs/a", "checkpoints/empty.json"] {
            for err in [wrong.get(key).unwrap_err(), open_error(&wrong, key)] {
                assert_eq!(err.to_string(), format!("object {key}: {UNREADABLE}"));
            }
            // Sizes do not need the key.
            assert!(wrong.size(key).unwrap().is_some());
        }
        // Nor does an object open under another key, with the right one.
        f.raw.put("blobs/b", &f.raw.get("blobs/a").unwrap()).unwrap();
        let err = f.sealed.get("blobs/b").unwrap_err();
        assert_eq!(err.to_string(), format!("object blobs/b: {UNREADABLE}"));
    }

    #[test]
    fn damaged_objects_never_read_as_data() {
        let f = fixture(SMALL);
        let data = plaintext(3 * SMALL + 500);
        let stored_len = sealed_len(data.len(), SMALL);
        // `damage` done to `key` as stored (under another key it would not
        // open at all), from a copy sealed once per key.
        let sealed: std::cell::RefCell<std::collections::HashMap<String, Vec<u8>>> = Default::default();
        let damaged = |key: &str, damage: &dyn Fn(&mut Vec<u8>)| {
            let mut stored = sealed
                .borrow_mut()
                .entry(key.to_string())
                .or_insert_with(|| {
                    f.sealed.put(key, &data).unwrap();
                    f.raw.get(key).unwrap()
                })
                .clone();
            damage(&mut stored);
            f.raw.put(key, &stored).unwrap();
        };

        // A byte flipped in the second segment: the first still reads, and
        // then the reader fails rather than hand out the damaged one.
        damaged("blobs/flipped", &|s| s[HEADER_LEN + SMALL + TAG_LEN + 100] ^= 0x01);
        let err = f.sealed.get("blobs/flipped").unwrap_err();
        assert_eq!(err.to_string(), format!("object blobs/flipped: {UNREADABLE}"));
        let mut reader = f.sealed.open("blobs/flipped").unwrap();
        let mut first = vec![0u8; SMALL];
        reader.read_exact(&mut first).unwrap();
        assert!(first[..] == data[..SMALL]);
        let err = reader.read(&mut first).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(err.to_string(), format!("object blobs/flipped: {UNREADABLE}"));
        assert!(reader.read(&mut first).is_err(), "a read after the error succeeded");

        // Flipped in the header (the nonce), in the first segment, in the
        // last tag.
        for at in [HEADER_LEN - 1, HEADER_LEN + 3, stored_len - 1] {
            damaged("blobs/flipped", &|s| s[at] ^= 0x80);
            assert!(f.sealed.get("blobs/flipped").is_err(), "byte {at}");
            let read = f
                .sealed
                .open("blobs/flipped")
                .map_err(|e| e.to_string())
                .and_then(|r| read_all(r).map_err(|e| e.to_string()));
            assert!(read.is_err(), "byte {at}");
        }

        // Cut anywhere, at a segment's end too, or lengthened.
        let segment_end = HEADER_LEN + SMALL + TAG_LEN;
        let cuts = [
            0,
            5,
            HEADER_LEN - 1,
            HEADER_LEN,
            HEADER_LEN + TAG_LEN,
            HEADER_LEN + 1000,
            segment_end,
            segment_end + 1,
            3 * segment_end - 2 * HEADER_LEN,
            stored_len - 1,
        ];
        for cut in cuts {
            damaged("blobs/cut", &|s| s.truncate(cut));
            assert!(f.sealed.get("blobs/cut").is_err(), "cut at {cut}");
            let read = f
                .sealed
                .open("blobs/cut")
                .map_err(|e| e.to_string())
                .and_then(|r| read_all(r).map_err(|e| e.to_string()));
            assert!(read.is_err(), "cut at {cut} read as {} bytes", read.unwrap().len());
        }
        damaged("blobs/cut", &|s| s.truncate(segment_end));
        let err = read_all(f.sealed.open("blobs/cut").unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "object blobs/cut: is truncated: damaged data");
        damaged("blobs/longer", &|s| s.push(0));
        assert!(f.sealed.get("blobs/longer").is_err());
        assert!(read_all(f.sealed.open("blobs/longer").unwrap()).is_err());

        // Sizes no sealed object has, and objects stored in the clear.
        damaged("blobs/cut", &|s| s.truncate(HEADER_LEN + 3));
        let err = f.sealed.size("blobs/cut").unwrap_err();
        assert!(
            err.to_string().starts_with("object blobs/cut: is not a sealed object"),
            "{err}"
        );
        assert!(f.sealed.list("blobs/").is_err());
        f.raw
            .put("checkpoints/plain.json", b"{\"id\": \"cp-1\", \"labels\": {}}")
            .unwrap();
        let err = f.sealed.get("checkpoints/plain.json").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("object checkpoints/plain.json: is not a sealed object"),
            "{err}"
        );
        damaged("blobs/newer", &|s| s[MAGIC.len()] = 2);
        let err = f.sealed.get("blobs/newer").unwrap_err();
        assert!(err.to_string().contains("format version 2"), "{err}");
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        let f = fixture(SMALL);
        assert!(format!("{:?}", f.sealed).contains("<redacted>"));
        for shown in [format!("{:?}", f.sealed), f.sealed.describe()] {
            assert!(!shown.contains(KEY) && !shown.contains("0d0e0f"), "{shown}");
        }
        assert!(f.sealed.describe().ends_with("(encrypted)"));
        let staging = f.tmp.path().join("staging");
        SealedStore::new(f.raw.clone(), &format!("  {}\n", KEY.to_uppercase()), &staging).unwrap();
        for (bad, message) in [
            ("", "got 0 characters"),
            (&KEY[..62], "got 62 characters"),
            (&format!("{}zz", &KEY[..62]), "position 62"),
            (&format!("{}é", &KEY[..62]), "got 63 characters"),
        ] {
            let err = SealedStore::new(f.raw.clone(), bad, &staging).unwrap_err();
            assert!(err.to_string().contains(message), "{bad:?}: {err}");
        }
        assert!(matches!(
            f.sealed.put("../escape", b"x"),
            Err(ObjectError::InvalidKey { .. })
        ));
    }
}
