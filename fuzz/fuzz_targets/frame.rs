//! Bytes from the serial line: the reassembler, fed the input in pieces whose sizes the input
//! chooses, and the frame decoder. Every decoded message must encode back to a frame that
//! decodes to the same message. Messages hold floats, so they are compared by their encoding or
//! their `Debug` text (NaN is not equal to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use petcam_shared::protocol::{decode_frame, encode, Message, Reassembler, Received, MAX_ENCODED};

fn round_trip(msg: &Message) {
    let frame = encode(msg).expect("a decoded message encodes");
    assert_eq!(frame.last(), Some(&0), "a frame ends with its delimiter");
    let again = decode_frame(&frame[..frame.len() - 1]).expect("an encoded frame decodes");
    assert_eq!(encode(&again).unwrap(), frame);
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the rest is cut into reads, as a serial port cuts a stream.
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);

    let mut whole = Vec::new();
    let mut r = Reassembler::new();
    r.push(stream, |rx| whole.push(rx));

    let mut pieces = Vec::new();
    let mut r = Reassembler::new();
    for piece in stream.chunks(step) {
        r.push(piece, |rx| pieces.push(rx));
    }
    assert_eq!(
        format!("{whole:?}"),
        format!("{pieces:?}"),
        "the result depends on how reads cut the stream"
    );
    assert_eq!(r.capacity(), MAX_ENCODED, "the buffer grew");

    for rx in &whole {
        if let Received::Message(m) = rx {
            round_trip(m);
        }
    }
    for frame in stream.split(|&b| b == 0) {
        if let Ok(m) = decode_frame(frame) {
            round_trip(&m);
        }
    }
});
