//! A stand-in for `rpicam-vid --codec yuv420 -o -`, for the tests of `petcam-device run
//! --source rpicam:`: it takes rpicam-vid's options, and writes raw I420 frames to stdout at
//! `--framerate`, frame after frame, from a file of frames made by the test. It can die or
//! stall on cue, on its first launch only, so a restarted one streams normally.
//!
//! Environment:
//! - `STANDIN_FRAMES`: the frames (each `stride * height * 3 / 2` bytes, the stride being the
//!   width rounded up to 64 bytes, as a Pi 4 lays them out); played in a loop.
//! - `STANDIN_STATE`: a folder; each launch appends `PID ARGS...` to `launches` there, and
//!   writes `done` when it has written `STANDIN_COUNT` frames.
//! - `STANDIN_COUNT`: after this many frames, stop writing and wait to be killed.
//! - `STANDIN_DIE_AFTER` / `STANDIN_STALL_AFTER`: on the first launch, exit 1 (or stop
//!   writing, without exiting) after this many frames.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn option(args: &[String], names: &[&str]) -> Option<String> {
    args.iter()
        .position(|a| names.contains(&a.as_str()))
        .and_then(|i| args.get(i + 1).cloned())
}

fn wait_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |msg: String| {
        eprintln!("ERROR: *** {msg} ***");
        ExitCode::from(255)
    };
    if option(&args, &["--codec"]).as_deref() != Some("yuv420") {
        return fail("the stand-in only writes --codec yuv420".into());
    }
    if option(&args, &["--output", "-o"]).as_deref() != Some("-") {
        return fail("the stand-in only writes to stdout (-o -)".into());
    }
    let num = |names: &[&str]| option(&args, names).and_then(|v| v.parse::<u64>().ok());
    let (Some(width), Some(height), Some(fps)) =
        (num(&["--width"]), num(&["--height"]), num(&["--framerate"]))
    else {
        return fail("--width, --height and --framerate are required".into());
    };
    let stride = width.next_multiple_of(64);
    let frame_len = (stride * height * 3 / 2) as usize;

    let state = std::env::var_os("STANDIN_STATE").map(std::path::PathBuf::from);
    let launch = match &state {
        Some(dir) => {
            let log = dir.join("launches");
            let before = std::fs::read_to_string(&log).unwrap_or_default();
            let line = format!("{} {}\n", std::process::id(), args.join(" "));
            std::fs::write(&log, before + &line).expect("write the launch log");
            before_count(&log)
        }
        None => 1,
    };
    let frames = match std::env::var_os("STANDIN_FRAMES").map(std::fs::read) {
        Some(Ok(f)) if !f.is_empty() && f.len().is_multiple_of(frame_len) => f,
        Some(Ok(f)) => {
            return fail(format!(
                "{} bytes of frames is not a multiple of {frame_len} ({width}x{height}, stride {stride})",
                f.len()
            ))
        }
        Some(Err(e)) => return fail(format!("cannot read STANDIN_FRAMES: {e}")),
        None => return fail("STANDIN_FRAMES is not set".into()),
    };
    eprintln!("[0:00:00.000000000] [1]  INFO Camera camera_manager.cpp:330 libcamera stand-in");
    eprintln!("Mode selection for {width}:{height}:8:P (launch {launch})");

    let first = launch == 1;
    let die_after = env_num("STANDIN_DIE_AFTER").filter(|_| first);
    let stall_after = env_num("STANDIN_STALL_AFTER").filter(|_| first);
    let count = env_num("STANDIN_COUNT");
    let period = Duration::from_secs_f64(1.0 / fps.max(1) as f64);
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    for (n, frame) in (0u64..).zip(frames.chunks_exact(frame_len).cycle()) {
        if die_after == Some(n) {
            eprintln!("ERROR: *** camera stand-in dying on cue after {n} frames ***");
            return ExitCode::from(1);
        }
        if stall_after == Some(n) {
            eprintln!("stalling on cue after {n} frames");
            wait_forever();
        }
        if count == Some(n) {
            if let Some(dir) = &state {
                std::fs::write(dir.join("done"), n.to_string()).expect("write done");
            }
            wait_forever();
        }
        let due = start + period * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if out.write_all(frame).and_then(|_| out.flush()).is_err() {
            // The reader went away.
            return ExitCode::SUCCESS;
        }
    }
    unreachable!("the frames cycle forever")
}

/// The number of launches logged so far, this one included.
fn before_count(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().count())
        .unwrap_or(1)
}
