//! Properties of the wire protocol through its public API: round trips, reassembly at any
//! split, corruption caught, bounded memory on garbage, version refusal, size limits and link
//! efficiency. (Known answers for CRC-32C and COBS, and byte-level layout, are next to that code.)

use super::*;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use proptest::collection::vec;
use proptest::prelude::*;
use std::println;

// ---------------------------------------------------------------------------------------------
// Strategies: one per message type.

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn label() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof!["cat", "dog", text()])
}

/// Any `f32` but NaN, which is never equal to itself.
fn float() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("NaN", |f| !f.is_nan())
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Host), Just(Role::Device)]
}

fn hello() -> impl Strategy<Value = Hello> {
    (role(), text(), text(), text())
        .prop_map(|(role, id, fw, model)| Hello::new(role, id, fw, model))
}

fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    (
        (any::<u64>(), any::<u64>(), float(), float(), float()),
        (any::<u64>(), any::<u64>(), proptest::option::of(float())),
        (text(), label(), float()),
    )
        .prop_map(
            |(
                (uptime_ms, frames, fps, infer_p50_ms, infer_p95_ms),
                (frames_dropped, telemetry_dropped, cpu_temp_c),
                (model_id, decision, confidence),
            )| Heartbeat {
                uptime_ms,
                frames,
                fps,
                infer_p50_ms,
                infer_p95_ms,
                frames_dropped,
                telemetry_dropped,
                cpu_temp_c,
                model_id,
                decision,
                confidence,
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    (any::<u64>(), any::<u64>(), label(), label(), float()).prop_map(
        |(at_ms, frame, from, to, confidence)| Event {
            at_ms,
            frame,
            from,
            to,
            confidence,
        },
    )
}

fn error_report() -> impl Strategy<Value = ErrorReport> {
    let source = prop_oneof![
        Just(ErrorSource::Camera),
        Just(ErrorSource::Model),
        Just(ErrorSource::Serial),
        Just(ErrorSource::Gpio),
        Just(ErrorSource::Upload),
        Just(ErrorSource::Other),
    ];
    (any::<u64>(), source, text()).prop_map(|(at_ms, source, message)| ErrorReport {
        at_ms,
        source,
        message,
    })
}

fn log() -> impl Strategy<Value = Log> {
    let level = prop_oneof![
        Just(LogLevel::Error),
        Just(LogLevel::Warn),
        Just(LogLevel::Info),
        Just(LogLevel::Debug),
    ];
    (any::<u64>(), level, "\\PC{0,200}").prop_map(|(at_ms, level, message)| Log {
        at_ms,
        level,
        message,
    })
}

fn begin() -> impl Strategy<Value = Begin> {
    let kind = prop_oneof![Just(ImageKind::Model), Just(ImageKind::Firmware)];
    (
        kind,
        any::<u64>(),
        any::<[u8; 32]>(),
        text(),
        vec(any::<u8>(), 0..=96),
    )
        .prop_map(|(kind, size, sha256, version, signature)| Begin {
            kind,
            size,
            sha256,
            version,
            signature,
        })
}

fn chunk() -> impl Strategy<Value = Chunk> {
    let data = prop_oneof![
        vec(any::<u8>(), 0..=64),
        vec(any::<u8>(), 0..=CHUNK_SIZE),
        vec(prop_oneof![Just(0u8), any::<u8>()], 0..=600),
    ];
    (any::<u64>(), data).prop_map(|(offset, data)| Chunk { offset, data })
}

fn nack() -> impl Strategy<Value = Nack> {
    let reason = prop_oneof![
        Just(NackReason::BadOffset),
        Just(NackReason::BadSignature),
        Just(NackReason::Unsigned),
        Just(NackReason::Downgrade),
        Just(NackReason::HashMismatch),
        Just(NackReason::SelfTestFailed),
        Just(NackReason::TooLarge),
        Just(NackReason::NoUpload),
        Just(NackReason::Busy),
        Just(NackReason::Storage),
        Just(NackReason::Version),
        Just(NackReason::Other),
    ];
    (reason, any::<u64>(), text()).prop_map(|(reason, expected_offset, detail)| Nack {
        reason,
        expected_offset,
        detail,
    })
}

fn image_info() -> impl Strategy<Value = ImageInfo> {
    (text(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(version, sha256, size)| ImageInfo {
        version,
        sha256,
        size,
    })
}

fn staged_info() -> impl Strategy<Value = StagedInfo> {
    (text(), any::<[u8; 32]>(), any::<u64>(), any::<u64>()).prop_map(
        |(version, sha256, size, received)| StagedInfo {
            version,
            sha256,
            size,
            received,
        },
    )
}

fn status() -> impl Strategy<Value = Status> {
    use proptest::option::of;
    (
        of(image_info()),
        of(staged_info()),
        of(image_info()),
        of(staged_info()),
        of(text()),
    )
        .prop_map(
            |(active_model, staged_model, active_firmware, staged_firmware, last_error)| Status {
                active_model,
                staged_model,
                active_firmware,
                staged_firmware,
                last_error,
            },
        )
}

/// Every variant of [`Message`].
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        heartbeat().prop_map(Message::Heartbeat),
        event().prop_map(Message::Event),
        error_report().prop_map(Message::Error),
        log().prop_map(Message::Log),
        begin().prop_map(Message::Begin),
        chunk().prop_map(Message::Chunk),
        Just(Message::Commit),
        Just(Message::Abort),
        any::<u64>().prop_map(|offset| Message::Ack { offset }),
        nack().prop_map(Message::Nack),
        Just(Message::StatusRequest),
        status().prop_map(Message::Status),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Pushes `pieces` in order; returns what came out.
fn feed<'a>(rx: &mut Reassembler, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Received> {
    let mut out = Vec::new();
    for piece in pieces {
        rx.push(piece, |r| out.push(r));
        assert_eq!(rx.capacity(), MAX_ENCODED, "the buffer never grows");
    }
    out
}

fn messages(received: &[Received]) -> Vec<&Message> {
    received
        .iter()
        .filter_map(|r| match r {
            Received::Message(m) => Some(m),
            Received::Rejected { .. } => None,
        })
        .collect()
}

fn log_line(text: &str) -> Message {
    Message::Log(Log {
        at_ms: 0,
        level: LogLevel::Info,
        message: text.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #[test]
    fn any_message_round_trips(msg in message()) {
        let frame = encode(&msg).unwrap();
        prop_assert!(frame.len() <= MAX_ENCODED);
        prop_assert_eq!(frame.iter().position(|&b| b == 0), Some(frame.len() - 1));
        prop_assert_eq!(decode_frame(&frame[..frame.len() - 1]).unwrap(), msg.clone());
        let mut appended = vec![0xAB];
        encode_into(&msg, &mut appended).unwrap();
        prop_assert_eq!(&appended[1..], &frame[..]);
    }

    #[test]
    fn split_stream_yields_the_same_messages(
        msgs in vec(message(), 1..8),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut stream = Vec::new();
        for msg in &msgs {
            encode_into(msg, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.extend([0, stream.len()]);
        cuts.sort_unstable();
        let pieces = cuts.windows(2).map(|w| &stream[w[0]..w[1]]);
        let mut rx = Reassembler::new();
        let received = feed(&mut rx, pieces);
        prop_assert_eq!(messages(&received), msgs.iter().collect::<Vec<_>>());
        prop_assert_eq!(received.len(), msgs.len());
        prop_assert_eq!(rx.frames_ok(), msgs.len() as u64);
        prop_assert_eq!((rx.frames_rejected(), rx.bytes_dropped(), rx.buffered()), (0, 0, 0));
    }

    /// A flipped bit may hide the delimiter (the frame merges with the next one) or create one
    /// (the frame splits in two); either way nothing but the intact neighbours comes out, and
    /// the damage is reported.
    #[test]
    fn a_flipped_bit_is_never_accepted(msg in message(), bit in any::<prop::sample::Index>()) {
        let (before, after) = (log_line("before"), log_line("after"));
        let mut frame = encode(&msg).unwrap();
        let bit = bit.index(frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        let mut stream = encode(&before).unwrap();
        stream.extend_from_slice(&frame);
        encode_into(&after, &mut stream).unwrap();
        let mut rx = Reassembler::new();
        let received = feed(&mut rx, [&stream[..]]);
        let got = messages(&received);
        prop_assert!(
            got == [&before] || got == [&before, &after],
            "flipping bit {} yielded {:?}", bit, got
        );
        prop_assert!(rx.frames_rejected() >= 1);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_grow_the_buffer(
        parts in vec(
            prop_oneof![
                4 => vec(any::<u8>(), 0..300),
                2 => vec(Just(0u8), 1..3),
                1 => vec(1u8..=255, MAX_ENCODED - 2..MAX_ENCODED + 2),
            ],
            0..24,
        ),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut stream: Vec<u8> = parts.concat();
        stream.truncate(3 * MAX_ENCODED);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.extend([0, stream.len()]);
        cuts.sort_unstable();
        let mut rx = Reassembler::new();
        let received = feed(&mut rx, cuts.windows(2).map(|w| &stream[w[0]..w[1]]));
        prop_assert_eq!(rx.frames_ok() + rx.frames_rejected(), received.len() as u64);
        prop_assert!(rx.buffered() < MAX_ENCODED);
        // A delimiter and a good frame bring it back in step, whatever came before.
        let good = log_line("resync");
        let mut tail = vec![0];
        encode_into(&good, &mut tail).unwrap();
        let received = feed(&mut rx, [&tail[..]]);
        prop_assert_eq!(received.last(), Some(&Received::Message(good)));
    }
}

// ---------------------------------------------------------------------------------------------
// Examples.

#[test]
fn hello_carries_our_version() {
    let hello = Hello::new(Role::Device, "pi-kitchen", "0.1.0", "sha256:ab12");
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(hello.check_version(), Ok(()));
}

#[test]
fn hello_of_another_version_is_refused() {
    let mut hello = Hello::new(Role::Host, "workstation", "9.0.0", "");
    hello.protocol_version = 2;
    let expected = ProtocolError::Version { ours: 1, theirs: 2 };
    assert_eq!(hello.check_version(), Err(expected.clone()));

    let frame = encode(&Message::Hello(hello)).unwrap();
    let err = decode_frame(&frame[..frame.len() - 1]).unwrap_err();
    assert_eq!(err, expected);
    let text = err.to_string();
    assert!(
        text.contains("version 1") && text.contains("version 2"),
        "{text}"
    );

    let mut rx = Reassembler::new();
    let received = feed(&mut rx, [&frame[..]]);
    assert_eq!(
        received,
        [Received::Rejected {
            bytes: frame.len() - 1,
            error: expected
        }]
    );
}

#[test]
fn largest_frame_passes_and_one_byte_more_is_rejected_once() {
    // Data without zero bytes is the worst case for COBS: the longest frame on the wire.
    let mut frame = encode(&Message::Chunk(Chunk {
        offset: 1,
        data: vec![0xEE; MAX_FRAME - 8],
    }))
    .unwrap();
    assert!(frame.len() <= MAX_ENCODED);
    let mut rx = Reassembler::new();
    assert!(matches!(
        feed(&mut rx, [&frame[..]])[..],
        [Received::Message(Message::Chunk(_))]
    ));

    // Same length as the longest legal frame plus one byte, then a good frame.
    let oversize = vec![0x01; MAX_ENCODED];
    let good = log_line("after");
    frame = encode(&good).unwrap();
    let received = feed(&mut rx, [&oversize[..100], &oversize[100..], &[0], &frame]);
    assert_eq!(
        received,
        [
            Received::Rejected {
                bytes: MAX_ENCODED,
                error: ProtocolError::TooLarge {
                    size: MAX_ENCODED + 1,
                    max: MAX_ENCODED
                }
            },
            Received::Message(good),
        ]
    );
    assert_eq!(rx.frames_rejected(), 1);
    assert_eq!(rx.bytes_dropped(), MAX_ENCODED as u64);
    assert_eq!(rx.frames_ok(), 2);
}

#[test]
fn empty_frames_are_ignored() {
    let mut stream = vec![0, 0, 0];
    encode_into(&Message::Commit, &mut stream).unwrap();
    stream.extend([0, 0]);
    let mut rx = Reassembler::default();
    assert_eq!(
        feed(&mut rx, [&stream[..]]),
        [Received::Message(Message::Commit)]
    );
    assert_eq!((rx.frames_ok(), rx.frames_rejected()), (1, 0));
}

#[test]
fn garbage_before_a_frame_is_reported_then_skipped() {
    let mut stream = vec![0x13, 0x37, 0x42, 0];
    encode_into(&Message::Abort, &mut stream).unwrap();
    let mut rx = Reassembler::new();
    let received = feed(&mut rx, [&stream[..]]);
    assert!(matches!(
        received[..],
        [
            Received::Rejected { bytes: 3, .. },
            Received::Message(Message::Abort)
        ]
    ));
    assert_eq!(rx.bytes_dropped(), 3);
}

/// Upload chunks are most of what crosses the link; framing must cost under 2 %.
#[test]
fn chunk_wire_efficiency() {
    // 0xFF data has no zero byte (the worst case for COBS); the offset of a chunk near the end
    // of an 18 MB model takes 4 varint bytes.
    let offset = 18 << 20;
    for (name, data) in [
        ("no zeros (worst case)", vec![0xFF; CHUNK_SIZE]),
        (
            "pseudo-random",
            (0..CHUNK_SIZE as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ] {
        let wire = encode(&Message::Chunk(Chunk { offset, data }))
            .unwrap()
            .len();
        let efficiency = CHUNK_SIZE as f64 / wire as f64;
        println!(
            "{CHUNK_SIZE}-byte chunk, {name}: {wire} bytes on the wire, efficiency {efficiency:.4}"
        );
        assert!(efficiency >= 0.98, "{efficiency}");
    }
}
