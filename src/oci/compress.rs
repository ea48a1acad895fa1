//! Compression of layer and blob streams: the one place that turns a
//! [`Compression`] into a gzip or zstd encoder or decoder. OCI layers, the
//! checkpoint catalogue's blobs, checkpoint archives and Nydus base layers
//! all go through it.
//!
//! Callers choose the zstd level (it is part of what their output is);
//! gzip always uses flate2's default level and a header without name or
//! mtime, so the same input gives the same bytes.

use std::io::{self, BufReader, Read, Write};

use serde::{Deserialize, Serialize};

pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How a layer or blob is compressed. Stored (in checkpoint records) as
/// `none`, `gzip` or `zstd`. The default, gzip, is what every registry
/// client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    #[default]
    Gzip,
    Zstd,
}

impl Compression {
    /// The name records and the API use: `none`, `gzip` or `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_TYPE_TAR,
            Compression::Gzip => MEDIA_TYPE_TAR_GZIP,
            Compression::Zstd => MEDIA_TYPE_TAR_ZSTD,
        }
    }

    /// The compression of an OCI layer of `media_type`, if it is one.
    pub fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            MEDIA_TYPE_TAR => Some(Compression::None),
            MEDIA_TYPE_TAR_GZIP => Some(Compression::Gzip),
            MEDIA_TYPE_TAR_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// A writer that compresses into `W`; [`Encoder::finish`] ends the stream
/// and returns `W`.
pub struct Encoder<W: Write>(EncoderKind<W>);

enum EncoderKind<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// Compresses with `compression`; `zstd_level` is used by zstd only.
    pub fn new(inner: W, compression: Compression, zstd_level: i32) -> io::Result<Encoder<W>> {
        Ok(Encoder(match compression {
            Compression::None => EncoderKind::Plain(inner),
            Compression::Gzip => {
                EncoderKind::Gzip(flate2::write::GzEncoder::new(inner, flate2::Compression::default()))
            }
            Compression::Zstd => EncoderKind::Zstd(zstd::Encoder::new(inner, zstd_level)?),
        }))
    }

    /// Writes the end of the compressed stream; returns the inner writer
    /// (not flushed).
    pub fn finish(self) -> io::Result<W> {
        match self.0 {
            EncoderKind::Plain(w) => Ok(w),
            EncoderKind::Gzip(e) => e.finish(),
            EncoderKind::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            EncoderKind::Plain(w) => w.write(buf),
            EncoderKind::Gzip(e) => e.write(buf),
            EncoderKind::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            EncoderKind::Plain(w) => w.flush(),
            EncoderKind::Gzip(e) => e.flush(),
            EncoderKind::Zstd(e) => e.flush(),
        }
    }
}

/// A reader of what `R` holds compressed.
pub struct Decoder<R: Read>(DecoderKind<R>);

enum DecoderKind<R: Read> {
    Plain(R),
    Gzip(flate2::read::GzDecoder<R>),
    Zstd(zstd::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    pub fn new(inner: R, compression: Compression) -> io::Result<Decoder<R>> {
        Ok(Decoder(match compression {
            Compression::None => DecoderKind::Plain(inner),
            Compression::Gzip => DecoderKind::Gzip(flate2::read::GzDecoder::new(inner)),
            Compression::Zstd => DecoderKind::Zstd(zstd::Decoder::new(inner)?),
        }))
    }

    /// The compressed stream. Bytes the decoder read ahead are lost: a
    /// caller that needs all of them reads through a wrapper below it.
    pub fn into_inner(self) -> R {
        match self.0 {
            DecoderKind::Plain(r) => r,
            DecoderKind::Gzip(d) => d.into_inner(),
            DecoderKind::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            DecoderKind::Plain(r) => r.read(buf),
            DecoderKind::Gzip(d) => d.read(buf),
            DecoderKind::Zstd(d) => d.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compression_round_trips_and_names_itself() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|n| (n % 251).to_le_bytes()).collect();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut encoder = Encoder::new(Vec::new(), compression, 3).unwrap();
            encoder.write_all(&data).unwrap();
            let packed = encoder.finish().unwrap();
            let mut decoder = Decoder::new(&packed[..], compression).unwrap();
            let mut out = Vec::new();
            decoder.read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{compression:?}");
            assert_eq!(Compression::of_media_type(compression.media_type()), Some(compression));
            let json = serde_json::to_string(&compression).unwrap();
            assert_eq!(json, format!("\"{}\"", compression.as_str()));
        }
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+lz4"),
            None
        );
    }
}
