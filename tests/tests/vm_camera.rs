//! `petcam-device run` against real kernel drivers, in the test VM (`tools/vm`, see
//! `tests/vm/README.md`): vivid's YUYV frames, MJPEG frames through v4l2loopback, a camera
//! that is unplugged and plugged in again, and output pins on gpio-sim.
//!
//! Inference under emulation takes about a second a frame, so every test classifies few
//! frames, and the guest scripts move on as soon as the event they wait for is printed
//! instead of sleeping for a guessed time.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use petcam_shared::protocol::{ErrorSource, Message, Reassembler, Received};
use petcam_tests::vm::{self, Share, TinyModel, Vm};
use petcam_tests::{binary, run};
use serde_json::Value;

/// A photo with a known label that the model classifies as that label, confidently.
#[derive(Debug, Clone)]
struct Photo {
    path: PathBuf,
    label: String,
    confidence: f64,
}

/// Below this on the host a photo is not used: `run`'s default threshold is 0.8, and the
/// frame the guest decodes from the same bytes must clear it too.
const CONFIDENT: f64 = 0.95;

/// The model's most confident photo of each label, from `petcam-device classify` on the host:
/// what the guest must decide comes from the model, not from a list in the test.
fn confident_photos(model: &TinyModel) -> &'static [Photo; 2] {
    static PHOTOS: OnceLock<[Photo; 2]> = OnceLock::new();
    PHOTOS.get_or_init(|| {
        let out = run(Command::new(binary("petcam-device"))
            .arg("classify")
            .arg("--model")
            .arg(&model.model)
            .args(["--threads", "1", "--json"])
            .arg(&model.photos));
        assert!(out.status.success());
        let mut best: Vec<Photo> = Vec::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let path = PathBuf::from(v["path"].as_str().unwrap());
            let known = path.parent().unwrap().file_name().unwrap().to_str().unwrap();
            let (label, confidence) = (v["label"].as_str().unwrap(), v["confidence"].as_f64().unwrap());
            if label != known || confidence < CONFIDENT {
                continue;
            }
            match best.iter_mut().find(|p| p.label == label) {
                Some(p) if p.confidence >= confidence => {}
                Some(p) => *p = Photo { path, label: label.into(), confidence },
                None => best.push(Photo { path, label: label.into(), confidence }),
            }
        }
        let pick = |label: &str| {
            best.iter()
                .find(|p| p.label == label)
                .cloned()
                .unwrap_or_else(|| panic!("the model classifies none of its {label} photos as {label} with >= {CONFIDENT}"))
        };
        [pick("cat"), pick("dog")]
    })
}

/// A share with the stripped `petcam-device` and `model.onnx`, and the model; `None` when
/// the test is skipped.
fn setup(name: &str) -> Option<(Share, &'static TinyModel)> {
    if !vm::available() {
        return None;
    }
    let model = vm::tiny_model()?;
    let share = Share::with_device(name);
    share.add(&model.model, "model.onnx");
    Some((share, model))
}

/// A line of `log.txt`, which the guest scripts write: `/proc/uptime` seconds (when the script
/// read the line; printed for a reader of a failure), then a JSON line of `petcam-device run
/// --json` or a note of the script's own.
#[derive(Debug)]
struct Logged {
    json: Option<Value>,
    text: String,
}

fn read_log(share: &Share) -> Vec<Logged> {
    let text = share.read("log.txt");
    eprintln!("--- guest log.txt (uptime, line)\n{text}---");
    text.lines()
        .map(|l| {
            let (_uptime, text) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("log line {l:?}"));
            Logged {
                json: text
                    .starts_with('{')
                    .then(|| serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))),
                text: text.to_owned(),
            }
        })
        .collect()
}

fn events<'a>(log: &'a [Logged], kind: &str) -> Vec<&'a Value> {
    log.iter()
        .filter_map(|l| l.json.as_ref())
        .filter(|j| j["event"] == kind)
        .collect()
}

fn summary(log: &[Logged]) -> &Value {
    let s = events(log, "summary");
    assert_eq!(s.len(), 1, "one summary expected: {log:#?}");
    s[0]
}

/// The shell functions every guest script starts with: `note TEXT` appends a time-stamped line
/// to `log.txt`.
const PRELUDE: &str = r#"set -u
note() { read up idle < /proc/uptime; echo "$up $*" >> log.txt; }
: > log.txt
"#;

/// `run`'s common options in the guest: one inference thread (the guest has one vCPU), no
/// smoothing, so each frame decides.
const RUN: &str = "./petcam-device run --model model.onnx --threads 1 --smooth 1 --json";

fn write_script(share: &Share, body: &str) -> &'static str {
    std::fs::write(share.path().join("test.sh"), format!("{PRELUDE}{body}")).unwrap();
    "sh test.sh"
}

/// One `VIDIOC_DQBUF` of the kernel's V4L2 ioctl log (`dev_debug`): a frame vivid delivered.
#[derive(Debug)]
struct Dequeued {
    sequence: u64,
    bytesused: u64,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
    Some(rest.split([',', ' ']).next().unwrap_or(rest))
}

/// vivid's YUYV webcam: `camera:` negotiates YUYV 640x480 (vivid has no MJPEG) and classifies
/// its frames; the summary accounts for every frame vivid delivered. The kernel logs each
/// buffer petcam dequeued (`dev_debug`), with vivid's sequence numbers: those frames are
/// either classified, dropped (counted), or among the few still queued when the run stopped.
#[test]
fn vivid_yuyv_frames_are_classified_and_every_frame_is_accounted_for() {
    let Some((share, _)) = setup("yuyv") else {
        return;
    };
    // 0x0a: V4L2_DEV_DEBUG_IOCTL_ARG | V4L2_DEV_DEBUG_STREAMING (QBUF/DQBUF too). The lines
    // are KERN_DEBUG: kept off the console; read from /proc/kmsg as they come, so none is lost
    // to the ring buffer.
    let script = format!(
        r#"echo 0x0a > /sys/class/video4linux/video0/dev_debug
cat /proc/kmsg > /tmp/kmsg &
kpid=$!
{RUN} --source camera:/dev/video0 --threshold 0 --max-frames 3 > /tmp/ev 2> run.err
note "exit $?"
while read -r l; do note "$l"; done < /tmp/ev
echo 0 > /sys/class/video4linux/video0/dev_debug
sleep 0.3
kill $kpid
grep 'video0: VIDIOC_' /tmp/kmsg > v4l2.log
"#
    );
    let out = Vm::new().share(&share).run(write_script(&share, &script));
    out.assert_success();
    let log = read_log(&share);
    assert!(
        log.iter().any(|l| l.text == "exit 0"),
        "{log:#?}\n{}",
        share.read("run.err")
    );

    let camera = events(&log, "camera");
    assert_eq!(camera.len(), 1, "{camera:?}");
    assert_eq!(camera[0]["state"], "streaming");
    let message = camera[0]["message"].as_str().unwrap();
    assert!(
        message.contains("/dev/video0: streaming YUYV 640x480"),
        "{message}"
    );
    // Threshold 0: the first frame classified decides.
    let decisions = events(&log, "decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");

    let s = summary(&log);
    let (frames, dropped) = (
        s["frames"].as_u64().unwrap(),
        s["dropped"].as_u64().unwrap(),
    );
    let (seconds, fps) = (s["seconds"].as_f64().unwrap(), s["fps"].as_f64().unwrap());
    assert_eq!(frames, 3, "{s}");
    assert_eq!(s["bad_frames"], 0, "{s}");
    assert!((fps * seconds - frames as f64).abs() < 1e-6, "{s}");

    // What vivid delivered, from the kernel's side.
    let v4l2 = share.read("v4l2.log");
    let lines: Vec<&str> = v4l2.lines().collect();
    // petcam asked for 30 fps; vivid's webcam offers 25 at most at 640x480, and says so.
    let s_parm = lines
        .iter()
        .find(|l| l.contains("VIDIOC_S_PARM"))
        .expect("VIDIOC_S_PARM logged");
    assert!(s_parm.contains("timeperframe=1/25"), "{s_parm}");
    let s_fmt = lines
        .iter()
        .find(|l| l.contains("VIDIOC_S_FMT"))
        .expect("VIDIOC_S_FMT logged");
    assert!(
        s_fmt.contains("pixelformat=YUYV") && s_fmt.contains("width=640"),
        "{s_fmt}"
    );
    let dq: Vec<Dequeued> = lines
        .iter()
        .filter(|l| l.contains("VIDIOC_DQBUF") && !l.contains("error"))
        .map(|l| Dequeued {
            sequence: field(l, "sequence").unwrap().parse().unwrap(),
            bytesused: field(l, "bytesused").unwrap().parse().unwrap(),
        })
        .collect();
    assert!(!dq.is_empty(), "{v4l2}");
    assert!(dq.iter().all(|d| d.bytesused == 640 * 480 * 2), "{v4l2}");
    assert!(
        dq.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "{v4l2}"
    );
    let delivered = dq.len() as u64;
    let tail = &lines[lines.len().saturating_sub(8)..];
    eprintln!(
        "the end of the stream in the kernel's log:\n{}",
        tail.join("\n")
    );
    let skipped = dq.last().unwrap().sequence - dq[0].sequence + 1 - delivered;
    eprintln!(
        "vivid delivered {delivered} frames (sequence {}..={}, {skipped} skipped by vivid); \
         summary: {frames} classified, {dropped} dropped in {seconds:.2} s ({fps:.2} fps)",
        dq[0].sequence,
        dq.last().unwrap().sequence
    );
    // Every frame delivered was classified or counted as dropped, except those left at the
    // end: up to 2 still in the queue (its capacity) and the one dequeued after the stop.
    assert!(frames + dropped <= delivered, "{s}\n{v4l2}");
    assert!(delivered <= frames + dropped + 3, "{s}\n{v4l2}");
}

/// A small guest program feeds MJPEG frames into v4l2loopback's output side, as a USB webcam
/// would: `camera:` takes MJPEG (preferred over YUYV) and the decisions follow the photos
/// shown. A frame that is not a JPEG is reported by the inference loop, which shows frames
/// travel undecoded from the camera to inference.
#[test]
fn mjpeg_from_v4l2loopback_decisions_follow_the_photos() {
    let Some((share, model)) = setup("mjpeg") else {
        return;
    };
    let [cat, dog] = confident_photos(model);
    share.add(&cat.path, "cat.jpg");
    share.add(&dog.path, "dog.jpg");
    std::fs::write(share.path().join("bad.jpg"), b"this frame is not a JPEG").unwrap();
    let feed = Feed {
        steps: vec![
            ("cat.jpg", Until::Decision("cat")),
            ("dog.jpg", Until::Decision("dog")),
            ("bad.jpg", Until::BadFrame),
        ],
        pins: None,
    };
    let log = feed.run(&share);

    let camera = events(&log, "camera");
    let streaming: Vec<_> = camera
        .iter()
        .filter(|c| c["state"] == "streaming")
        .collect();
    assert_eq!(streaming.len(), 1, "{camera:?}");
    let message = streaming[0]["message"].as_str().unwrap();
    assert!(
        message.contains("/dev/video1: streaming MJPG 640x480"),
        "{message}"
    );
    let decisions: Vec<(&str, &str)> = events(&log, "decision")
        .iter()
        .map(|d| (d["from"].as_str().unwrap(), d["to"].as_str().unwrap()))
        .collect();
    assert_eq!(decisions, [("none", "cat"), ("cat", "dog")], "{log:#?}");
    let bad = events(&log, "bad_frame");
    assert!(!bad.is_empty(), "{log:#?}");
    assert!(
        bad[0]["frame"].as_str().unwrap().starts_with("frame "),
        "{}",
        bad[0]
    );
    let s = summary(&log);
    assert!(s["frames"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["bad_frames"].as_u64().unwrap(), bad.len() as u64, "{s}");
}

/// `--pin cat=17 --pin dog=27` on gpio-sim, over the loopback camera showing a cat, then a
/// dog: while the decision is cat, line 17 reads 1 and line 27 reads 0, then the reverse.
/// The lines are pulled up, so a line nobody drives reads 1: after SIGTERM both read 1 again,
/// released (not merely driven low).
#[test]
fn pins_on_gpio_sim_follow_the_decision_and_are_released_on_sigterm() {
    let Some((share, model)) = setup("gpio") else {
        return;
    };
    let [cat, dog] = confident_photos(model);
    share.add(&cat.path, "cat.jpg");
    share.add(&dog.path, "dog.jpg");
    let feed = Feed {
        steps: vec![
            ("cat.jpg", Until::Decision("cat")),
            ("dog.jpg", Until::Decision("dog")),
        ],
        pins: Some([("cat", 17), ("dog", 27)]),
    };
    let log = feed.run(&share);
    let pins: Vec<&str> = log
        .iter()
        .filter_map(|l| l.text.strip_prefix("pins "))
        .collect();
    // Before the run, at the cat decision, at the dog decision, after the exit.
    assert_eq!(pins, ["1 1", "1 0", "0 1", "1 1"], "{log:#?}");
    let decisions: Vec<&str> = events(&log, "decision")
        .iter()
        .map(|d| d["to"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["cat", "dog"]);
}

/// What the guest waits for before it shows the next photo.
#[derive(Debug)]
enum Until {
    Decision(&'static str),
    BadFrame,
}

/// A guest script: `vm-v4l2-out` writes the current photo into `/dev/video1` at 25 fps while
/// `petcam-device run` reads the loopback's capture side; each step's photo is shown until
/// its event is printed, then the next; after the last, SIGTERM.
#[derive(Debug)]
struct Feed {
    steps: Vec<(&'static str, Until)>,
    pins: Option<[(&'static str, u32); 2]>,
}

impl Feed {
    fn run(&self, share: &Share) -> Vec<Logged> {
        let mut script = String::from(
            "G=/sys/devices/platform/gpio-sim.0/gpiochip0\n\
             show() { cp \"$1\" /tmp/next.jpg && mv /tmp/next.jpg /tmp/frame.jpg; }\n",
        );
        let mut run = format!("{RUN} --source camera:/dev/video1 --max-frames 12");
        match self.pins {
            Some(pins) => {
                let values: Vec<String> = pins
                    .iter()
                    .map(|(_, n)| format!("$(cat $G/sim_gpio{n}/value)"))
                    .collect();
                script += &format!("pins() {{ note \"pins {}\"; }}\n", values.join(" "));
                for (label, n) in pins {
                    script += &format!("echo pull-up > $G/sim_gpio{n}/pull\n");
                    run += &format!(" --pin {label}={n}");
                }
                script += "pins\n";
            }
            None => script += "pins() { :; }\n",
        }
        script += &format!(
            r#"show {first}
vm-v4l2-out /dev/video1 MJPG 640 480 25 /tmp/frame.jpg 2> writer.log &
wpid=$!
until grep -q 'first frame' writer.log; do sleep 0.05; done
mkfifo /tmp/ev
{run} > /tmp/ev 2> run.err &
pid=$!
step=0
while IFS= read -r l; do
  note "$l"
  case "$l" in
    *'"event":"decision"'*) got=$(echo "$l" | sed 's/.*"to":"\([^"]*\)".*/\1/') ;;
    *'"event":"bad_frame"'*) got=bad_frame ;;
    *) got= ;;
  esac
  case "$step:$got" in
"#,
            first = self.steps[0].0
        );
        for (i, (_, until)) in self.steps.iter().enumerate() {
            let want = match until {
                Until::Decision(label) => label,
                Until::BadFrame => "bad_frame",
            };
            let next = match self.steps.get(i + 1) {
                Some((photo, _)) => format!("show {photo}"),
                None => "kill -TERM $pid".to_owned(),
            };
            script += &format!("    {i}:{want}) pins; {next}; step={} ;;\n", i + 1);
        }
        script += r#"  esac
done < /tmp/ev
wait $pid
note "exit $?"
pins
kill $wpid
"#;
        let out = Vm::new()
            .share(share)
            .args(["--loopback"])
            .run(write_script(share, &script));
        out.assert_success();
        let log = read_log(share);
        assert!(
            log.iter().any(|l| l.text == "exit 0"),
            "{log:#?}\n{}",
            share.read("run.err")
        );
        log
    }
}

/// The camera unplugged while `run` streams from it, and plugged in again: the camera is
/// reported lost, then unavailable (naming the video devices still there) with a back-off
/// that doubles, then streaming again, and frames are classified again; SIGTERM then ends
/// the run with exit code 0. The classified-frame count comes from the telemetry heartbeats
/// on the guest's UART, read here through the host pty.
///
/// The unplug is vivid's platform device unbound from its driver, as a USB camera's is when
/// its cable is pulled: `rmmod vivid` is refused while the device is open (the open
/// character device holds a reference to the module). Once `run` has let go of the lost
/// camera the module is removed, and `modprobe vivid` brings a new camera.
#[test]
fn a_camera_unplugged_and_plugged_in_again_is_reopened() {
    let Some((share, _)) = setup("hotplug") else {
        return;
    };
    // Unplugged at the first decision, i.e. right after the first frame is classified: the
    // frames captured before the camera went away are at most that one, the one being
    // classified, and the 2 in the queue. A 5th classified frame came from the new camera.
    let script = format!(
        r#"mkfifo /tmp/ev
{RUN} --source camera:/dev/video0 --threshold 0 --port /dev/ttyS1 --baud 115200 > /tmp/ev 2> run.err &
pid=$!
step=0
unavailable=0
while IFS= read -r l; do
  note "$l"
  case "$step:$l" in
    0:*'"event":"decision"'*)
      echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind && note unplugged; step=1 ;;
    1:*'"state":"lost"'*) rmmod vivid && note rmmod; step=2 ;;
    2:*'"state":"unavailable"'*)
      unavailable=$((unavailable + 1))
      if [ $unavailable = 2 ]; then modprobe vivid n_devs=1 node_types=0x1 && note modprobe; step=3; fi ;;
  esac
done < /tmp/ev &
until [ -e stop ]; do sleep 0.1; done
note sigterm
kill -TERM $pid
wait $pid
note "exit $?"
wait
"#
    );
    let vm = Vm::new()
        .share(&share)
        .args(["--loopback", "--serial-pty"])
        .spawn(write_script(&share, &script));
    let pty = vm.serial_pty();
    let mut port = serialport::new(pty.to_string_lossy(), 115_200)
        .timeout(Duration::from_millis(200))
        .open_native()
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", pty.display()));
    let mut r = Reassembler::new();
    let mut buf = [0u8; 4096];
    let (mut frames, mut camera_errors) = (0u64, Vec::new());
    // The guest's own limit (tools/vm --timeout) ends a run that never gets there.
    let started = Instant::now();
    while frames < 5 && started.elapsed() < Duration::from_secs(280) {
        match port.read(&mut buf) {
            Ok(n) if n > 0 => r.push(&buf[..n], |m| match m {
                Received::Message(Message::Heartbeat(h)) => frames = h.frames,
                Received::Message(Message::Error(e)) if e.source == ErrorSource::Camera => {
                    camera_errors.push((e.at_ms, e.message))
                }
                _ => {}
            }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading {}: {e}\n{}", pty.display(), vm.stderr()),
        }
    }
    assert!(
        frames >= 5,
        "heartbeats stopped at {frames} frames\n{}",
        vm.stderr()
    );
    std::fs::write(share.path().join("stop"), b"").unwrap();
    let out = vm.wait();
    out.assert_success();
    let log = read_log(&share);
    assert!(
        log.iter().any(|l| l.text == "exit 0"),
        "{log:#?}\n{}",
        share.read("run.err")
    );

    let notes: Vec<&str> = log
        .iter()
        .filter(|l| l.json.is_none())
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(
        notes,
        ["unplugged", "rmmod", "modprobe", "sigterm", "exit 0"],
        "{log:#?}"
    );
    // Streaming, lost, unavailable until vivid is back (twice, or more when modprobe took
    // longer than the second wait), streaming again.
    let states: Vec<&str> = events(&log, "camera")
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    let n = states.len();
    assert!(n >= 5, "{states:?}");
    assert_eq!(states[..2], ["streaming", "lost"], "{states:?}");
    assert!(
        states[2..n - 1].iter().all(|s| *s == "unavailable"),
        "{states:?}"
    );
    assert_eq!(states[n - 1], "streaming", "{states:?}");
    let unavailable: Vec<&Logged> = log
        .iter()
        .filter(|l| l.json.as_ref().is_some_and(|j| j["state"] == "unavailable"))
        .collect();
    for u in &unavailable {
        let j = u.json.as_ref().unwrap();
        // The loopback is still there, and is listed as what the operator could use.
        assert_eq!(
            j["devices"],
            serde_json::json!(["/dev/video1 (petcam-loopback)"]),
            "{j}"
        );
        assert!(
            j["message"].as_str().unwrap().contains("/dev/video0"),
            "{j}"
        );
    }
    // Back-off: 0.5 s, then doubling.
    let retry = |m: &str| -> f64 {
        let s = m.split("retrying in ").nth(1).expect("retrying in");
        s.trim_end_matches(" s").parse().unwrap()
    };
    let waits: Vec<f64> = unavailable
        .iter()
        .map(|u| retry(u.json.as_ref().unwrap()["message"].as_str().unwrap()))
        .collect();
    assert_eq!(waits[0], 0.5, "{waits:?}");
    assert!(waits.windows(2).all(|w| w[1] == 2.0 * w[0]), "{waits:?}");
    // Each camera error also went over the telemetry link, stamped by the device when it
    // happened (the guest script's stamps are when it read the line): each try came no
    // sooner than the one before said.
    let over_link: Vec<&str> = camera_errors.iter().map(|(_, m)| m.as_str()).collect();
    let printed: Vec<&str> = events(&log, "camera")
        .iter()
        .filter(|c| c["state"] != "streaming")
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    assert_eq!(over_link, printed);
    let tries: Vec<(u64, f64)> = camera_errors
        .iter()
        .filter(|(_, m)| m.contains("unavailable"))
        .map(|(at, m)| (*at, retry(m)))
        .collect();
    for w in tries.windows(2) {
        // at_ms is whole milliseconds.
        let apart = (w[1].0 - w[0].0) as f64 / 1000.0;
        assert!(apart >= w[0].1 - 0.001, "{camera_errors:?}");
    }
    let s = summary(&log);
    assert!(s["frames"].as_u64().unwrap() >= 5, "{s}");
}
