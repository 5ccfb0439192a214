//! Where frames come from: `dir:PATH` (images in name order), `mjpeg:FILE` (concatenated JPEG
//! frames, as a camera streams them; read as they arrive from `-` or a FIFO), and
//! `camera:/dev/videoN` (a V4L2 camera, in [`camera`], delivering MJPEG or YUYV frames) and
//! `rpicam:` (a Raspberry Pi Camera Module through `rpicam-vid`, in [`rpicam`], delivering
//! I420).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::preprocess::{self, PhotoError};

pub mod camera;
pub mod rpicam;
pub mod yuv;

pub use yuv::{I420Layout, YuvMatrix};

/// A frame as the capture thread hands it over. Camera frames stay undecoded until inference
/// takes them, so frames dropped because inference is busy cost no decoding.
#[derive(Debug)]
pub enum FrameData {
    Image(Result<RgbImage, PhotoError>),
    Camera {
        format: PixelFormat,
        width: u32,
        height: u32,
        data: Vec<u8>,
    },
}

impl FrameData {
    pub fn decode(self) -> Result<RgbImage, PhotoError> {
        match self {
            FrameData::Image(img) => img,
            FrameData::Camera {
                format,
                width,
                height,
                data,
            } => frame_to_rgb(format, &data, width, height),
        }
    }

    /// The frame decoded and resized to the model's `width` x `height` with the shared resize.
    /// An I420 frame is converted on its way into the resize, without a full-size RGB image.
    pub fn into_input(self, width: u32, height: u32) -> Result<RgbImage, PhotoError> {
        match self {
            FrameData::Camera {
                format: PixelFormat::I420(layout),
                data,
                ..
            } => layout
                .to_input(&data, width, height)
                .map_err(|e| PhotoError::CameraFrame(e.to_string())),
            other => Ok(preprocess::resize(&other.decode()?, width, height)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("unknown source {0:?}: use dir:PATH, mjpeg:FILE (or mjpeg:- for stdin), camera:/dev/videoN or rpicam: (rpicam:N for camera N)")]
    Unknown(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no images")]
    Empty { path: PathBuf },
    #[error("YUYV frame of {got} bytes, expected {expected} for {width}x{height}")]
    YuyvSize {
        got: usize,
        expected: usize,
        width: u32,
        height: u32,
    },
}

/// A parsed `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Dir(PathBuf),
    Mjpeg(PathBuf),
    Camera(PathBuf),
    /// A Camera Module through `rpicam-vid`; `rpicam:N` picks camera N.
    Rpicam(Option<u32>),
}

impl std::str::FromStr for SourceSpec {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", p)) if !p.is_empty() => Ok(Self::Dir(p.into())),
            Some(("mjpeg", p)) if !p.is_empty() => Ok(Self::Mjpeg(p.into())),
            Some(("camera", p)) if !p.is_empty() => Ok(Self::Camera(p.into())),
            Some(("rpicam", "")) => Ok(Self::Rpicam(None)),
            Some(("rpicam", n)) => n
                .parse()
                .map(|n| Self::Rpicam(Some(n)))
                .map_err(|_| SourceError::Unknown(s.to_owned())),
            _ => Err(SourceError::Unknown(s.to_owned())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SourceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Image files under `path` (recursively) or `path` itself, in name order; hidden files are
/// left out.
pub fn image_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    fn walk(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        if !path.is_dir() {
            out.push(path.to_owned());
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if p.is_dir() {
                walk(&p, out)?;
            } else if !hidden {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(path, &mut out).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(out)
}

/// Splits a stream of concatenated JPEG frames into frames (SOI to EOI). Markers are walked
/// segment by segment, so an EXIF thumbnail (a JPEG inside a frame) does not end the frame
/// early. Bytes between frames and frames with a broken marker are skipped; a frame cut off at
/// the end is dropped.
pub fn split_jpeg_frames(data: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    let mut i = 0;
    while let Some(start) = find_soi(data, i) {
        match jpeg_end(data, start) {
            Ok(end) => {
                frames.push(&data[start..end]);
                i = end;
            }
            Err(JpegEnd::Corrupt) => i = start + 2,
            Err(JpegEnd::Incomplete) => break,
        }
    }
    frames
}

fn find_soi(data: &[u8], from: usize) -> Option<usize> {
    data.get(from..)?
        .windows(2)
        .position(|w| w == [0xFF, 0xD8])
        .map(|p| from + p)
}

/// Why no frame end was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JpegEnd {
    /// The bytes stop before the frame does: a stream waits for more.
    Incomplete,
    /// A byte where a marker must be: the frame is broken and is skipped.
    Corrupt,
}

/// The index just past the EOI of the JPEG starting at `start`.
fn jpeg_end(data: &[u8], start: usize) -> Result<usize, JpegEnd> {
    let at = |j: usize| data.get(j).copied().ok_or(JpegEnd::Incomplete);
    let mut j = start + 2;
    loop {
        // Fill bytes (0xFF repeated) may precede a marker.
        while at(j)? == 0xFF && at(j + 1)? == 0xFF {
            j += 1;
        }
        if at(j)? != 0xFF {
            return Err(JpegEnd::Corrupt);
        }
        let marker = at(j + 1)?;
        match marker {
            0xD9 => return Ok(j + 2),
            0x01 | 0xD0..=0xD7 => j += 2,
            _ => {
                let len = u16::from_be_bytes([at(j + 2)?, at(j + 3)?]) as usize;
                j += 2 + len;
                if marker == 0xDA {
                    // Entropy-coded data: runs to the next marker that is not a stuffed 0xFF00
                    // or a restart marker.
                    loop {
                        if at(j)? == 0xFF {
                            let next = at(j + 1)?;
                            if next != 0x00 && !(0xD0..=0xD7).contains(&next) {
                                break;
                            }
                            j += 2;
                        } else {
                            j += 1;
                        }
                    }
                }
            }
        }
    }
}

/// The largest JPEG frame a stream may hold: a buffer that grows past it without a frame end
/// is dropped, so a stream of garbage never grows memory without bound.
pub const MAX_STREAM_FRAME: usize = 16 << 20;

/// MJPEG frames read from a pipe, a FIFO or stdin as the bytes arrive (`mjpeg:-`, or
/// `mjpeg:PATH` on a FIFO): ffmpeg, GStreamer or `rpicam-vid --codec mjpeg` can feed it. Frames
/// stay undecoded until inference takes them. Ends when the writer closes its end.
#[derive(Debug)]
pub struct StreamSource<R> {
    reader: R,
    name: String,
    buf: Vec<u8>,
    /// Where the scan for the next frame starts in `buf`.
    scan: usize,
    max_frame: usize,
    frame: u64,
    ended: bool,
}

impl<R: std::io::Read> StreamSource<R> {
    pub fn new(reader: R, name: impl Into<String>) -> Self {
        Self::with_limit(reader, name, MAX_STREAM_FRAME)
    }

    /// A stream whose frames may be at most `max_frame` bytes.
    pub fn with_limit(reader: R, name: impl Into<String>, max_frame: usize) -> Self {
        Self {
            reader,
            name: name.into(),
            buf: Vec::new(),
            scan: 0,
            max_frame,
            frame: 0,
            ended: false,
        }
    }

    fn item(&mut self, data: FrameData) -> (String, FrameData) {
        let name = format!("frame {}", self.frame);
        self.frame += 1;
        (name, data)
    }

    /// A complete frame at the front of the buffer, or `None` when more bytes are needed.
    fn take_frame(&mut self) -> Option<Result<Vec<u8>, String>> {
        loop {
            let Some(start) = find_soi(&self.buf, self.scan) else {
                // Keep a trailing 0xFF: it may be the first half of the next SOI.
                let keep = usize::from(self.buf.last() == Some(&0xFF));
                self.buf.drain(..self.buf.len() - keep);
                self.scan = 0;
                return None;
            };
            self.buf.drain(..start);
            self.scan = 0;
            match jpeg_end(&self.buf, 0) {
                Ok(end) => return Some(Ok(self.buf.drain(..end).collect())),
                Err(JpegEnd::Corrupt) => self.scan = 2,
                Err(JpegEnd::Incomplete) if self.buf.len() > self.max_frame => {
                    let dropped = self.buf.len();
                    self.scan = 2;
                    return Some(Err(format!(
                        "{}: no end of frame within {dropped} bytes (more than {} bytes \
                         allowed); skipped to the next frame start",
                        self.name, self.max_frame
                    )));
                }
                Err(JpegEnd::Incomplete) => return None,
            }
        }
    }
}

impl<R: std::io::Read> Iterator for StreamSource<R> {
    /// The frame's name (`frame N`) and its undecoded JPEG bytes.
    type Item = (String, FrameData);

    fn next(&mut self) -> Option<Self::Item> {
        const CHUNK: usize = 64 << 10;
        loop {
            match self.take_frame() {
                Some(Ok(data)) => {
                    return Some(self.item(FrameData::Camera {
                        format: PixelFormat::Mjpeg,
                        width: 0,
                        height: 0,
                        data,
                    }))
                }
                Some(Err(e)) => {
                    return Some(self.item(FrameData::Image(Err(PhotoError::CameraFrame(e)))))
                }
                None if self.ended => return None,
                None => {}
            }
            // Read straight into the buffer's tail: no second copy of the bytes.
            let filled = self.buf.len();
            self.buf.resize(filled + CHUNK, 0);
            let read = self.reader.read(&mut self.buf[filled..]);
            self.buf.truncate(filled + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => {
                    // What is left is a frame cut off by the writer: dropped, as in a file.
                    self.ended = true;
                    self.buf.clear();
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.ended = true;
                    self.buf.clear();
                    let msg = format!("cannot read {}: {e}", self.name);
                    return Some(self.item(FrameData::Image(Err(PhotoError::CameraFrame(msg)))));
                }
            }
        }
    }
}

/// Whether `mjpeg:PATH` names a stream (stdin as `-`, a FIFO, a socket or a character device)
/// rather than a file that can be read whole and looped.
pub fn is_stream(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    path == Path::new("-")
        || std::fs::metadata(path).is_ok_and(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_socket() || t.is_char_device()
        })
}

/// The pixel formats of camera frames. A V4L2 camera is asked for [`PixelFormat::PREFERRED`];
/// `rpicam-vid` sends I420.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    /// Planar YUV 4:2:0 with padded rows, from `rpicam-vid --codec yuv420`.
    I420(I420Layout),
}

impl PixelFormat {
    /// What petcam asks a V4L2 camera for, in order of preference: MJPEG costs the USB bus a
    /// tenth of YUYV, so it is the one that reaches 30 fps at 640x480 on a Pi's shared bus.
    pub const PREFERRED: [PixelFormat; 2] = [PixelFormat::Mjpeg, PixelFormat::Yuyv];

    /// The V4L2 four-character code.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuyv => *b"YUYV",
            PixelFormat::I420(_) => *b"YU12",
        }
    }

    pub fn from_fourcc(code: [u8; 4]) -> Option<Self> {
        Self::PREFERRED.into_iter().find(|f| f.fourcc() == code)
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.fourcc()).unwrap_or("?"))
    }
}

/// One camera frame (the bytes the driver filled) to RGB.
pub fn frame_to_rgb(
    format: PixelFormat,
    data: &[u8],
    width: u32,
    height: u32,
) -> Result<RgbImage, PhotoError> {
    match format {
        PixelFormat::Mjpeg => {
            // Some webcams send MJPEG without the Huffman tables (DHT) every decoder needs; the
            // frame then fails to decode and is reported as a bad frame, not a crash.
            preprocess::decode_rgb(data)
        }
        PixelFormat::Yuyv => {
            // Drivers may report a buffer larger than the picture; the picture is its start.
            let size = width as usize * height as usize * 2;
            let data = data.get(..size).unwrap_or(data);
            yuyv_to_rgb(data, width, height).map_err(|e| PhotoError::CameraFrame(e.to_string()))
        }
        PixelFormat::I420(layout) => layout
            .to_rgb(data)
            .map_err(|e| PhotoError::CameraFrame(e.to_string())),
    }
}

/// The video devices this machine has (`/dev/video*`, with the driver's name from sysfs when
/// known), for error messages about a camera that is not there.
pub fn video_devices() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.strip_prefix("video")?.parse::<u32>().ok()?;
            let sys = format!("/sys/class/video4linux/{name}/name");
            Some(match std::fs::read_to_string(sys) {
                Ok(n) => format!("/dev/{name} ({})", n.trim()),
                Err(_) => format!("/dev/{name}"),
            })
        })
        .collect();
    found.sort();
    found
}

/// A YUYV (YUV 4:2:2, `Y0 U Y1 V`) frame to RGB, BT.601 limited range as webcams send it.
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32) -> Result<RgbImage, SourceError> {
    let expected = width as usize * height as usize * 2;
    if data.len() != expected || !width.is_multiple_of(2) {
        return Err(SourceError::YuyvSize {
            got: data.len(),
            expected,
            width,
            height,
        });
    }
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for px in data.chunks_exact(4) {
        for y in [px[0], px[2]] {
            rgb.extend_from_slice(&YuvMatrix::Bt601.to_rgb(y, px[1], px[3]));
        }
    }
    Ok(RgbImage::from_raw(width, height, rgb).expect("3 bytes per pixel"))
}

/// Frames from files: `dir:` images in name order, or the frames of an `mjpeg:` stream.
#[derive(Debug)]
pub struct FileSource {
    frames: Vec<Frame>,
    next: usize,
    looping: bool,
}

#[derive(Debug, Clone)]
enum Frame {
    File(PathBuf),
    Jpeg(std::sync::Arc<Vec<u8>>, std::ops::Range<usize>, usize),
}

impl FileSource {
    pub fn dir(path: &Path, looping: bool) -> Result<Self, SourceError> {
        let files = image_files(path)?;
        if files.is_empty() {
            return Err(SourceError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            frames: files.into_iter().map(Frame::File).collect(),
            next: 0,
            looping,
        })
    }

    pub fn mjpeg(path: &Path, looping: bool) -> Result<Self, SourceError> {
        let data = std::fs::read(path).map_err(|source| SourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base = data.as_ptr() as usize;
        let ranges: Vec<std::ops::Range<usize>> = split_jpeg_frames(&data)
            .into_iter()
            .map(|f| {
                let s = f.as_ptr() as usize - base;
                s..s + f.len()
            })
            .collect();
        if ranges.is_empty() {
            return Err(SourceError::Empty {
                path: path.to_owned(),
            });
        }
        let data = std::sync::Arc::new(data);
        Ok(Self {
            frames: ranges
                .into_iter()
                .enumerate()
                .map(|(i, r)| Frame::Jpeg(data.clone(), r, i))
                .collect(),
            next: 0,
            looping,
        })
    }

    /// Frames in the source.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl Iterator for FileSource {
    /// A frame's name (file path, or stream frame number) and its decoded image.
    type Item = (String, FrameData);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.frames.len() {
            if !self.looping {
                return None;
            }
            self.next = 0;
        }
        let frame = &self.frames[self.next];
        self.next += 1;
        Some(match frame {
            Frame::File(p) => (
                p.display().to_string(),
                FrameData::Image(preprocess::load_rgb(p)),
            ),
            Frame::Jpeg(data, range, i) => (
                format!("frame {i}"),
                FrameData::Image(preprocess::decode_rgb(&data[range.clone()])),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u16, h: u16, rgb: [u8; 3]) -> Vec<u8> {
        let pixels: Vec<u8> = (0..w as usize * h as usize).flat_map(|_| rgb).collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 90)
            .encode(&pixels, w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    #[test]
    fn source_specs_parse() {
        assert_eq!(
            "dir:/photos".parse::<SourceSpec>().unwrap(),
            SourceSpec::Dir("/photos".into())
        );
        assert_eq!(
            "mjpeg:a.mjpeg".parse::<SourceSpec>().unwrap(),
            SourceSpec::Mjpeg("a.mjpeg".into())
        );
        assert_eq!(
            "camera:/dev/video0".parse::<SourceSpec>().unwrap(),
            SourceSpec::Camera("/dev/video0".into())
        );
        for bad in ["photos", "dir:", "rtsp://cam"] {
            assert!(bad.parse::<SourceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_mjpeg_stream_splits_into_its_frames() {
        let frames = [
            jpeg(32, 24, [200, 10, 10]),
            jpeg(32, 24, [10, 200, 10]),
            jpeg(16, 8, [10, 10, 200]),
        ];
        // Junk between frames and a frame cut off at the end, as a dropped connection leaves.
        let mut stream = b"junk".to_vec();
        for f in &frames {
            stream.extend_from_slice(f);
            stream.extend_from_slice(&[0, 0]);
        }
        stream.extend_from_slice(&frames[0][..frames[0].len() / 2]);
        let split = split_jpeg_frames(&stream);
        assert_eq!(split.len(), 3);
        for (got, want) in split.iter().zip(&frames) {
            assert_eq!(*got, &want[..]);
        }
        let img = preprocess::decode_rgb(split[1]).unwrap();
        let p = img.get_pixel(16, 12);
        assert!(p[1] > 150 && p[0] < 60 && p[2] < 60, "{p:?}");
    }

    /// A reader that hands out its bytes in chunks of the given sizes, in turn, as a pipe does.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl std::io::Read for Chunked {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let size = self.sizes[self.turn % self.sizes.len()].min(out.len());
            self.turn += 1;
            let n = size.min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn stream_frames(source: StreamSource<Chunked>) -> Vec<Result<Vec<u8>, String>> {
        source
            .map(|(_, f)| match f {
                FrameData::Camera { format, data, .. } => {
                    assert_eq!(format, PixelFormat::Mjpeg);
                    Ok(data)
                }
                FrameData::Image(img) => Err(img.unwrap_err().to_string()),
            })
            .collect()
    }

    #[test]
    fn a_piped_mjpeg_stream_yields_frames_as_they_arrive_in_any_chunking() {
        let frames = [
            jpeg(32, 24, [200, 10, 10]),
            jpeg(32, 24, [10, 200, 10]),
            jpeg(16, 8, [10, 10, 200]),
        ];
        // Junk before, between and after frames, a lone 0xFF, and a frame cut off at the end.
        let mut stream = b"junk\xFF".to_vec();
        for f in &frames {
            stream.extend_from_slice(f);
            stream.extend_from_slice(&[0xFF, 0, 0x12]);
        }
        stream.extend_from_slice(&frames[0][..frames[0].len() / 2]);
        for sizes in [vec![1], vec![7, 3, 1000], vec![64 << 10], vec![2, 5000]] {
            let reader = Chunked {
                data: stream.clone(),
                pos: 0,
                sizes: sizes.clone(),
                turn: 0,
            };
            let got = stream_frames(StreamSource::new(reader, "stdin"));
            let want: Vec<Result<Vec<u8>, String>> = frames.iter().cloned().map(Ok).collect();
            assert_eq!(got, want, "chunks {sizes:?}");
        }
    }

    #[test]
    fn a_piped_stream_first_frame_comes_before_the_writer_finishes() {
        // The writer keeps its end open: the first frame must come out without waiting for EOF.
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let frame = jpeg(16, 16, [0, 0, 255]);
        use std::io::Write;
        writer.write_all(&frame).unwrap();
        let mut source = StreamSource::new(&mut reader, "fifo");
        let (name, data) = source.next().unwrap();
        assert_eq!(name, "frame 0");
        let img = data.decode().unwrap();
        assert_eq!(img.dimensions(), (16, 16));
        drop(writer);
        assert!(source.next().is_none());
    }

    #[test]
    fn a_stream_of_garbage_stays_within_its_bound_and_recovers() {
        // An SOI followed by endless entropy-coded bytes, then a good frame.
        let good = jpeg(8, 8, [255, 255, 255]);
        let mut stream = vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02];
        stream.extend(std::iter::repeat_n(0x55, 10_000));
        stream.extend_from_slice(&good);
        let reader = Chunked {
            data: stream,
            pos: 0,
            sizes: vec![100],
            turn: 0,
        };
        let source = StreamSource::with_limit(reader, "stdin", 4096);
        let got = stream_frames(source);
        assert_eq!(got.len(), 2, "{got:?}");
        let err = got[0].as_ref().unwrap_err();
        assert!(err.contains("stdin") && err.contains("4096"), "{err}");
        assert_eq!(got[1].as_ref().unwrap(), &good);
    }

    #[test]
    fn stdin_and_fifos_are_streams_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.mjpeg");
        std::fs::write(&file, b"x").unwrap();
        assert!(!is_stream(&file));
        assert!(is_stream(Path::new("-")));
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert!(is_stream(&fifo));
        }
    }

    #[test]
    fn an_exif_thumbnail_does_not_end_the_frame() {
        let thumb = jpeg(8, 8, [0, 0, 0]);
        let main = jpeg(16, 16, [255, 255, 255]);
        // APP1 segment holding a whole JPEG (with its own SOI/EOI) right after the SOI.
        let mut frame = vec![0xFF, 0xD8, 0xFF, 0xE1];
        frame.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        frame.extend_from_slice(&thumb);
        frame.extend_from_slice(&main[2..]);
        let mut stream = frame.clone();
        stream.extend_from_slice(&main);
        let split = split_jpeg_frames(&stream);
        assert_eq!(split.len(), 2);
        assert_eq!(split[0], &frame[..]);
    }

    #[test]
    fn yuyv_converts_known_colours() {
        // Two pixels per 4 bytes: white and black share U = V = 128; then saturated red.
        let data = [235, 128, 16, 128, 81, 90, 81, 240];
        let img = yuyv_to_rgb(&data, 4, 1).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [0, 0, 0]);
        let red = img.get_pixel(2, 0).0;
        assert!(red[0] >= 250 && red[1] <= 5 && red[2] <= 5, "{red:?}");
        assert!(matches!(
            yuyv_to_rgb(&data, 4, 2),
            Err(SourceError::YuyvSize { expected: 16, .. })
        ));
    }

    #[test]
    fn a_dir_source_goes_in_name_order_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.jpg"), jpeg(8, 8, [0, 0, 0])).unwrap();
        std::fs::write(dir.path().join("a.jpg"), jpeg(8, 8, [0, 0, 0])).unwrap();
        std::fs::write(dir.path().join(".hidden.jpg"), b"x").unwrap();
        let names: Vec<String> = FileSource::dir(dir.path(), true)
            .unwrap()
            .take(3)
            .map(|(n, img)| {
                assert!(img.decode().is_ok());
                n
            })
            .collect();
        assert!(names[0].ends_with("a.jpg") && names[1].ends_with("b.jpg"));
        assert!(names[2].ends_with("a.jpg"));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileSource::dir(empty.path(), false),
            Err(SourceError::Empty { .. })
        ));
    }
}
