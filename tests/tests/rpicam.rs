//! `petcam-device run --source rpicam:` against a stand-in for `rpicam-vid` (the tests' own
//! `rpicam-vid-standin`), which writes I420 frames made from known photos, laid out as a Pi
//! lays them out, and dies or stalls on cue.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use petcam_tests::{binary, copy_first, photos_and_weights, run, train_tiny_model};

/// A model, and frame-sized photos with the label `classify` gives each.
struct Fixture {
    model: PathBuf,
    /// (photo at 640x480, the label `classify` gives it), cat and dog alternating.
    photos: Vec<(image::RgbImage, String)>,
}

/// The streaming tests share the machine's cores with nothing else in this binary, so the
/// share of frames classified measures petcam, not a neighbour.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture).as_ref()
}

fn build_fixture() -> Option<Fixture> {
    let (data, weights) = photos_and_weights()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rpicam");
    let _ = std::fs::remove_dir_all(&dir);
    let model = train_tiny_model(&data, &weights, &dir);

    // Photos the model has not seen, at the camera's size, classified by `classify`.
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut candidates = Vec::new();
    for class in ["cat", "dog"] {
        let src = dir.join("val").join(class);
        copy_first(&data.join("val").join(class), &src, 5);
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let img = image::open(&path).unwrap().to_rgb8();
            let img = image::imageops::resize(&img, 640, 480, image::imageops::Triangle);
            let png = frames.join(path.file_name().unwrap()).with_extension("png");
            img.save(&png).unwrap();
            candidates.push((png, img));
        }
    }
    let out = run(Command::new(binary("petcam-device"))
        .args(["classify", "--json", "--model"])
        .arg(&model)
        .arg(&frames));
    assert!(out.status.success());
    let mut by_label: [Vec<(image::RgbImage, String)>; 2] = Default::default();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // Confident ones only: I420's chroma subsampling must not be able to flip them.
        if v["confidence"].as_f64().unwrap() < 0.75 {
            continue;
        }
        let label = v["label"].as_str().unwrap().to_owned();
        let path = Path::new(v["path"].as_str().unwrap());
        let img = candidates
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, img)| img.clone())
            .unwrap();
        by_label[usize::from(label == "dog")].push((img, label));
    }
    let [cats, dogs] = by_label;
    assert!(
        !cats.is_empty() && !dogs.is_empty(),
        "the test model classifies no cat or no dog photo confidently: {} cats, {} dogs",
        cats.len(),
        dogs.len()
    );
    let photos = cats.into_iter().zip(dogs).take(2).flat_map(|(c, d)| [c, d]);
    Some(Fixture {
        model,
        photos: photos.collect(),
    })
}

/// `img` resized to `width` x `height` and converted to I420 (BT.601 limited range, chroma
/// averaged over 2x2) with rows padded to 64 bytes, padding filled with junk.
fn i420(img: &image::RgbImage, width: u32, height: u32) -> Vec<u8> {
    let img = image::imageops::resize(img, width, height, image::imageops::Triangle);
    let (w, h) = (width as usize, height as usize);
    let stride = w.next_multiple_of(64);
    let mut out = vec![0xA7u8; stride * h * 3 / 2];
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0.map(f64::from);
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = px(x, y);
            out[y * stride + x] =
                (16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0).round() as u8;
        }
    }
    let (u_base, v_base) = (stride * h, stride * h + (stride / 2) * (h / 2));
    for y in 0..h / 2 {
        for x in 0..w / 2 {
            let mut rgb = [0.0; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                for (c, v) in rgb.iter_mut().zip(px(2 * x + dx, 2 * y + dy)) {
                    *c += v / 4.0;
                }
            }
            let [r, g, b] = rgb;
            let at = y * (stride / 2) + x;
            out[u_base + at] =
                (128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0).round() as u8;
            out[v_base + at] =
                (128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0).round() as u8;
        }
    }
    out
}

/// The stand-in's frames: each photo `per_photo` times, in order. Returns the frames file and
/// the label of every frame.
fn frames_file(
    dir: &Path,
    fx: &Fixture,
    width: u32,
    height: u32,
    per_photo: usize,
) -> (PathBuf, Vec<String>) {
    let mut bytes = Vec::new();
    let mut labels = Vec::new();
    for (img, label) in &fx.photos {
        let frame = i420(img, width, height);
        for _ in 0..per_photo {
            bytes.extend_from_slice(&frame);
            labels.push(label.clone());
        }
    }
    let path = dir.join("frames.i420");
    std::fs::write(&path, bytes).unwrap();
    (path, labels)
}

/// `petcam-device run --source rpicam:` with the stand-in as `rpicam-vid`.
fn start(fx: &Fixture, state: &Path, env: &[(&str, String)], extra: &[&str]) -> Child {
    let mut cmd = Command::new(binary("petcam-device"));
    cmd.args(["run", "--source", "rpicam:", "--json", "--smooth", "1"])
        .args(["--threshold", "0", "--model"])
        .arg(&fx.model)
        .arg("--rpicam-bin")
        .arg(binary("rpicam-vid-standin"))
        .args(extra)
        .env("STANDIN_STATE", state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits for `path` to exist; panics after `limit` (a hung run, not a slow one).
fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM, then the exit code and the JSON lines.
fn stop(child: Child) -> (Output, Vec<serde_json::Value>) {
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out, lines)
}

/// The pids of the stand-in's launches, in order.
fn launches(state: &Path) -> Vec<u32> {
    std::fs::read_to_string(state.join("launches"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// Whether `pid` is a live process (a zombie is dead, waiting for a reaper).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(") ").next().unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn events<'a>(lines: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == kind).collect()
}

/// The label runs of a frame sequence: what the decisions must follow.
fn runs(labels: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = labels.iter().map(String::as_str).collect();
    out.dedup();
    out
}

/// Plays `loops` rounds of the photos at `width` x `height` and 30 fps and checks that the
/// decisions follow the photos, frame by frame, and how many frames were classified.
fn stream_photos(width: u32, height: u32, per_photo: usize, loops: usize) {
    let Some(fx) = fixture() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (frames, labels) = frames_file(dir.path(), fx, width, height, per_photo);
    let total = labels.len() * loops;
    let (w, h) = (width.to_string(), height.to_string());
    let child = start(
        fx,
        dir.path(),
        &[
            ("STANDIN_FRAMES", frames.display().to_string()),
            ("STANDIN_COUNT", total.to_string()),
        ],
        &[
            "--width",
            &w,
            "--height",
            &h,
            "--fps",
            "30",
            "--rpicam-arg=--awb",
            "--rpicam-arg=indoor",
        ],
    );
    wait_for(&dir.path().join("done"), Duration::from_secs(120));
    // The last frames leave the queue within a few inference times.
    std::thread::sleep(Duration::from_millis(500));
    let (out, lines) = stop(child);
    assert_eq!(out.status.code(), Some(0));

    // The options reached rpicam-vid, petcam's own and the passed-through ones.
    let log = std::fs::read_to_string(dir.path().join("launches")).unwrap();
    assert!(
        log.contains(&format!("--width {w} --height {h} --framerate 30"))
            && log.contains("--codec yuv420")
            && log.trim_end().ends_with("--awb indoor"),
        "{log}"
    );
    let camera = events(&lines, "camera");
    assert_eq!(camera.len(), 1, "one start, no loss: {camera:?}");
    assert!(
        camera[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("YU12 {w}x{h}")),
        "{}",
        camera[0]
    );

    // Every decision names the label of the photo its frame was made from, and together they
    // follow every change of photo.
    let decisions = events(&lines, "decision");
    let mut decided = Vec::new();
    for d in &decisions {
        let frame: usize = d["frame"].as_str().unwrap()["frame ".len()..]
            .parse()
            .unwrap();
        assert_eq!(
            d["to"].as_str().unwrap(),
            labels[frame % labels.len()],
            "frame {frame}: {d}"
        );
        decided.push(d["to"].as_str().unwrap());
    }
    let played: Vec<String> = labels.iter().cycle().take(total).cloned().collect();
    assert_eq!(decided, runs(&played));

    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    let classified = summary["frames"].as_u64().unwrap();
    let dropped = summary["dropped"].as_u64().unwrap();
    eprintln!("{width}x{height}: {classified} of {total} frames classified, {dropped} dropped");
    assert_eq!(summary["bad_frames"], 0, "{summary}");
    assert!(classified + dropped <= total as u64, "{summary}");
    assert!(
        classified as f64 >= 0.95 * total as f64,
        "{classified} of {total} frames classified: {summary}"
    );
}

#[test]
fn frames_at_640x480_and_30_fps_are_classified_like_the_photos() {
    stream_photos(640, 480, 15, 3);
}

#[test]
fn a_width_that_is_not_a_multiple_of_64_is_read_through_its_row_padding() {
    // 600 bytes of picture in rows of 640.
    stream_photos(600, 400, 10, 1);
}

/// The stand-in misbehaves on its first launch (`cue`); petcam-device reports the loss,
/// starts it again, frames flow again, and on SIGTERM no stand-in is left.
fn restarted_after(cue: &str, lost_because: &str) {
    let Some(fx) = fixture() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (frames, _) = frames_file(dir.path(), fx, 640, 480, 5);
    let child = start(
        fx,
        dir.path(),
        &[
            ("STANDIN_FRAMES", frames.display().to_string()),
            (cue, "10".into()),
            ("STANDIN_COUNT", "30".into()),
        ],
        &[],
    );
    wait_for(&dir.path().join("done"), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let (out, lines) = stop(child);
    assert_eq!(out.status.code(), Some(0));

    let states: Vec<&str> = events(&lines, "camera")
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["streaming", "lost", "streaming"], "{lines:?}");
    let lost = events(&lines, "camera")[1]["message"].as_str().unwrap();
    assert!(lost.contains(lost_because), "{lost}");
    // Frames from the second launch were classified too.
    let summary = lines.last().unwrap();
    assert!(summary["frames"].as_u64().unwrap() > 10, "{summary}");
    let pids = launches(dir.path());
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in pids {
        assert!(!alive(pid), "stand-in {pid} outlived petcam-device");
    }
}

#[test]
fn an_rpicam_vid_that_dies_is_started_again() {
    restarted_after("STANDIN_DIE_AFTER", "dying on cue");
}

#[test]
fn an_rpicam_vid_that_stalls_is_stopped_and_started_again() {
    restarted_after("STANDIN_STALL_AFTER", "no frame from");
}

#[test]
fn rpicam_vid_dies_with_a_killed_petcam_device() {
    let Some(fx) = fixture() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (frames, _) = frames_file(dir.path(), fx, 640, 480, 5);
    // It streams until killed.
    let mut child = start(
        fx,
        dir.path(),
        &[("STANDIN_FRAMES", frames.display().to_string())],
        &[],
    );
    wait_for(&dir.path().join("launches"), Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let pid = launches(dir.path())[0];
    assert!(alive(pid));
    signal(&child, "-KILL");
    child.wait().unwrap();
    // The kernel delivers the parent-death signal as the process goes; allow for scheduling.
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(pid),
        "stand-in {pid} outlived a SIGKILLed petcam-device"
    );
}

#[test]
fn a_missing_rpicam_vid_is_reported_and_waited_for() {
    let Some(fx) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(binary("petcam-device"));
    let child = cmd
        .args(["run", "--source", "rpicam:", "--json", "--model"])
        .arg(&fx.model)
        .arg("--rpicam-bin")
        .arg(dir.path().join("no-such-rpicam-vid"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Loading the model, then tries 0.5 s and 1 s apart.
    std::thread::sleep(Duration::from_secs(4));
    let (out, lines) = stop(child);
    assert_eq!(out.status.code(), Some(0));
    let camera = events(&lines, "camera");
    assert!(camera.len() >= 2, "retried with back-off: {camera:?}");
    for e in &camera {
        assert_eq!(e["state"], "unavailable", "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("rpicam-apps") && msg.contains("retrying in"),
            "{msg}"
        );
    }
    assert_eq!(lines.last().unwrap()["frames"], 0);
}
