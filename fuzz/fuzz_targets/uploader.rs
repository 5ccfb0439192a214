//! The uploader fed arbitrary replies and silences: whatever the device (or the line) answers,
//! it sends only pieces of the image, in bounds, no larger than its chunk size, and a window at
//! a time.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use petcam_shared::protocol::upload::{UploadConfig, Uploader};
use petcam_shared::protocol::Message;

fn check(image: &[u8], config: &UploadConfig, up: &Uploader, sent: &[Message]) {
    assert!(
        sent.len() <= config.window,
        "more than a window sent at once"
    );
    assert!(up.acked() <= image.len() as u64);
    for m in sent {
        let Message::Chunk(c) = m else {
            panic!("the uploader sent {m:?}");
        };
        let start = usize::try_from(c.offset).expect("offset fits");
        assert!(start + c.data.len() <= image.len(), "chunk past the image");
        assert!(c.data.len() <= config.max_chunk, "chunk over max_chunk");
        assert_eq!(
            c.data,
            image[start..start + c.data.len()],
            "chunk is not the image"
        );
    }
    // The timeout is computed after every step; it must not overflow.
    assert!(up.timeout() <= Duration::from_secs(10));
}

fuzz_target!(|data: &[u8]| {
    let [len_lo, len_hi, offset_lo, offset_hi, window, rest @ ..] = data else {
        return;
    };
    let image: Vec<u8> = (0..u16::from_le_bytes([*len_lo, *len_hi]))
        .map(|i| i as u8)
        .collect();
    let config = UploadConfig {
        window: usize::from(*window % 16) + 1,
        // Small chunks, so that a short input acknowledges its way through a whole image.
        max_chunk: 512,
        min_chunk: 32,
        ..UploadConfig::default()
    };
    let offset = u64::from(u16::from_le_bytes([*offset_lo, *offset_hi]));
    let mut up = Uploader::new(&image, offset, config);
    let mut now = Instant::now();
    let sent = up.transmit(now);
    check(&image, &config, &up, &sent);

    // Events: a tag byte, then for a reply its postcard encoding (what survived the CRC).
    let mut rest = rest;
    while let [tag, tail @ ..] = rest {
        now += Duration::from_millis(u64::from(*tag & 0x3f) * 7);
        let step = if tag & 0x40 != 0 {
            rest = tail;
            up.on_timeout(now)
        } else {
            let Ok((reply, tail)) = postcard::take_from_bytes::<Message>(tail) else {
                return;
            };
            rest = tail;
            up.on_reply(&reply, now)
        };
        match step {
            Ok(sent) => check(&image, &config, &up, &sent),
            Err(_) => return,
        }
        if up.is_done() {
            assert_eq!(up.acked(), image.len() as u64);
        }
    }
});
