//! The report's pictures, drawn pixel by pixel: anti-aliased lines, filled rectangles and text from
//! the `font8x8` bitmap glyphs. Doing it by hand keeps the host free of font files and plotting
//! crates, and makes the pictures the same on every machine.

use font8x8::{legacy::BASIC_LEGACY, UnicodeFonts, BASIC_FONTS, LATIN_FONTS};
use image::{imageops, Rgb, RgbImage};

use super::{EpochMetrics, Evaluation, Misclassified, TrainingInfo};

/// Size of `training_curves.png`.
pub(super) const CURVES_SIZE: (u32, u32) = (1200, 520);
/// Size of `confusion_matrix.png`.
pub(super) const CONFUSION_SIZE: (u32, u32) = (760, 640);
/// Side of the square each photo is letterboxed into on the contact sheet.
pub(super) const THUMB: u32 = 200;
/// Gap around and between contact sheet cells.
pub(super) const SHEET_PAD: u32 = 12;
/// Height of the two caption lines under each contact sheet photo.
pub(super) const CAPTION: u32 = 30;
/// Photos per row on the contact sheet.
pub(super) const SHEET_COLUMNS: usize = 4;
/// Size of the placeholder written when no photo was misclassified.
pub(super) const EMPTY_SHEET_SIZE: (u32, u32) = (420, 72);

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const PAPER: Rgb<u8> = Rgb([246, 247, 249]);
const INK: Rgb<u8> = Rgb([33, 37, 41]);
const MUTED: Rgb<u8> = Rgb([108, 117, 125]);
const GRID: Rgb<u8> = Rgb([226, 230, 234]);
const LETTERBOX: Rgb<u8> = Rgb([222, 226, 230]);
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const VAL: Rgb<u8> = Rgb([230, 110, 20]);
const BEST: Rgb<u8> = Rgb([150, 155, 160]);
const WRONG: Rgb<u8> = Rgb([196, 36, 36]);

/// Glyph side in pixels at scale 1.
const GLYPH: i32 = 8;

// ---------------------------------------------------------------------------------------------
// Primitives. Coordinates are signed so shapes may hang off the canvas; everything clips.

fn fill_rect(img: &mut RgbImage, x: i32, y: i32, w: i32, h: i32, color: Rgb<u8>) {
    let (iw, ih) = (img.width() as i32, img.height() as i32);
    for py in y.max(0)..(y + h).min(ih) {
        for px in x.max(0)..(x + w).min(iw) {
            img.put_pixel(px as u32, py as u32, color);
        }
    }
}

fn blend(img: &mut RgbImage, x: i32, y: i32, color: Rgb<u8>, alpha: f32) {
    if x < 0 || y < 0 || x >= img.width() as i32 || y >= img.height() as i32 {
        return;
    }
    let pixel = img.get_pixel_mut(x as u32, y as u32);
    for (dst, src) in pixel.0.iter_mut().zip(color.0) {
        let (d, s) = (f32::from(*dst), f32::from(src));
        *dst = (d + (s - d) * alpha).round() as u8;
    }
}

fn distance_to_segment(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 == 0.0 {
        0.0
    } else {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

/// A segment `width` pixels wide. Each pixel is shaded by the distance from its centre to the
/// segment, which anti-aliases the edges and rounds the ends, so polylines join without notches.
/// A zero-length segment is a filled disc.
fn line(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), width: f32, color: Rgb<u8>) {
    let r = width / 2.0;
    let x0 = ((a.0.min(b.0) - r - 1.0).floor() as i32).max(0);
    let x1 = ((a.0.max(b.0) + r + 1.0).ceil() as i32).min(img.width() as i32 - 1);
    let y0 = ((a.1.min(b.1) - r - 1.0).floor() as i32).max(0);
    let y1 = ((a.1.max(b.1) + r + 1.0).ceil() as i32).min(img.height() as i32 - 1);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = distance_to_segment((x as f32 + 0.5, y as f32 + 0.5), a, b);
            let coverage = (r + 0.5 - d).clamp(0.0, 1.0);
            if coverage > 0.0 {
                blend(img, x, y, color, coverage);
            }
        }
    }
}

/// A vertical dashed line, 2 pixels wide.
fn dashed_vline(img: &mut RgbImage, x: i32, top: i32, bottom: i32, color: Rgb<u8>) {
    for y in (top..bottom).step_by(10) {
        fill_rect(img, x - 1, y, 2, 6.min(bottom - y), color);
    }
}

fn glyph(c: char) -> [u8; 8] {
    BASIC_FONTS
        .get(c)
        .or_else(|| LATIN_FONTS.get(c))
        .unwrap_or(BASIC_LEGACY[usize::from(b'?')])
}

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * GLYPH * scale
}

/// Writes `s` with its top-left corner at (`x`, `y`), each glyph pixel a `scale`-sided square.
fn text(img: &mut RgbImage, x: i32, y: i32, s: &str, scale: i32, color: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let left = x + i as i32 * GLYPH * scale;
        for (row, bits) in (0..).zip(glyph(c)) {
            for col in 0..GLYPH {
                if bits >> col & 1 == 1 {
                    fill_rect(
                        img,
                        left + col * scale,
                        y + row * scale,
                        scale,
                        scale,
                        color,
                    );
                }
            }
        }
    }
}

fn text_centered(img: &mut RgbImage, cx: i32, y: i32, s: &str, scale: i32, color: Rgb<u8>) {
    text(img, cx - text_width(s, scale) / 2, y, s, scale, color);
}

fn text_right(img: &mut RgbImage, right: i32, y: i32, s: &str, scale: i32, color: Rgb<u8>) {
    text(img, right - text_width(s, scale), y, s, scale, color);
}

/// Writes `s` turned a quarter left, reading bottom to top: glyph tops face `x`, and the run is
/// centred vertically on `cy`.
fn text_up(img: &mut RgbImage, x: i32, cy: i32, s: &str, scale: i32, color: Rgb<u8>) {
    let bottom = cy + text_width(s, scale) / 2;
    for (i, c) in s.chars().enumerate() {
        for (row, bits) in (0..).zip(glyph(c)) {
            for col in 0..GLYPH {
                if bits >> col & 1 == 1 {
                    let along = i as i32 * GLYPH + col + 1;
                    fill_rect(
                        img,
                        x + row * scale,
                        bottom - along * scale,
                        scale,
                        scale,
                        color,
                    );
                }
            }
        }
    }
}

/// Shortens `s` with a trailing ".." so that it is at most `max_px` wide at `scale`.
fn fit(s: &str, max_px: i32, scale: i32) -> String {
    let max_chars = (max_px / (GLYPH * scale)).max(0) as usize;
    if s.chars().count() <= max_chars {
        s.to_owned()
    } else if max_chars < 3 {
        s.chars().take(max_chars).collect()
    } else {
        s.chars().take(max_chars - 2).chain("..".chars()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Training curves.

/// An axis range whose ends are multiples of a round step (1, 2 or 5 times a power of ten).
#[derive(Debug, Clone, Copy)]
struct NiceRange {
    lo: f64,
    hi: f64,
    step: f64,
}

impl NiceRange {
    fn new(lo: f64, hi: f64, target_ticks: f64) -> NiceRange {
        let raw = (hi - lo) / target_ticks;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * magnitude)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * magnitude);
        NiceRange {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            step,
        }
    }

    fn ticks(self) -> impl Iterator<Item = f64> {
        let n = ((self.hi - self.lo) / self.step).round() as usize;
        (0..=n).map(move |i| self.lo + i as f64 * self.step)
    }

    fn label(self, value: f64, unit: &str) -> String {
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        format!("{value:.decimals$}{unit}")
    }
}

/// One panel: a title, a y unit, the y range the values must lie in, the range shown when there
/// are none, and the train and validation series.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    limits: (f64, f64),
    empty: (f64, f64),
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
}

impl Panel<'_> {
    fn y_range(&self) -> NiceRange {
        let (floor, ceiling) = self.limits;
        let values = || {
            self.train
                .iter()
                .chain(&self.val)
                .map(|p| p.1.clamp(floor, ceiling))
                .filter(|v| v.is_finite())
        };
        let lo = values().fold(f64::INFINITY, f64::min);
        let hi = values().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo > hi {
            self.empty
        } else if hi - lo < 1e-9 {
            // A flat series still needs a visible range around it.
            let pad = if lo.abs() > 1e-9 {
                lo.abs() * 0.05
            } else {
                1.0
            };
            ((lo - pad).max(floor), (hi + pad).min(ceiling))
        } else {
            (lo, hi)
        };
        let range = NiceRange::new(lo, hi, 5.0);
        NiceRange {
            lo: range.lo.max(floor),
            hi: range.hi.min(ceiling),
            ..range
        }
    }
}

/// A rectangle in pixels.
#[derive(Debug, Clone, Copy)]
struct Area {
    left: i32,
    top: i32,
    right: i32,
    bottom: i32,
}

/// Pixels kept free at both ends of the epoch axis so end markers are not cut in half.
const X_INSET: f64 = 12.0;

/// Loss and accuracy per epoch, train and validation, side by side.
pub(super) fn training_curves(training: &TrainingInfo) -> RgbImage {
    let (w, h) = CURVES_SIZE;
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let (w, h) = (w as i32, h as i32);
    let history = &training.history;

    let title = format!(
        "training: {} of {} epochs run, best epoch {}",
        training.epochs_run, training.epochs_requested, training.best_epoch
    );
    text_centered(&mut img, w / 2, 14, &title, 2, INK);
    draw_legend(&mut img, w / 2, 46);

    let loss = Panel {
        title: "loss",
        unit: "",
        limits: (0.0, f64::INFINITY),
        empty: (0.0, 1.0),
        train: history
            .iter()
            .map(|m| (m.epoch as f64, m.train_loss))
            .collect(),
        val: history
            .iter()
            .map(|m| (m.epoch as f64, m.val_loss))
            .collect(),
    };
    // Accuracy is plotted in percent: "92.5%" reads better than "0.925" on a tick.
    let accuracy = Panel {
        title: "accuracy",
        unit: "%",
        limits: (0.0, 100.0),
        empty: (0.0, 100.0),
        train: history
            .iter()
            .map(|m| (m.epoch as f64, m.train_accuracy * 100.0))
            .collect(),
        val: history
            .iter()
            .map(|m| (m.epoch as f64, m.val_accuracy * 100.0))
            .collect(),
    };

    let epochs = history.iter().map(|m| m.epoch as f64);
    let first = epochs.clone().fold(f64::INFINITY, f64::min);
    let last = epochs.fold(f64::NEG_INFINITY, f64::max);
    let x_range = if first > last {
        None
    } else if last - first < 0.5 {
        Some((first - 0.5, last + 0.5))
    } else {
        Some((first, last))
    };
    let best = history
        .iter()
        .any(|m| m.epoch == training.best_epoch)
        .then_some(training.best_epoch as f64);

    let mut panels = vec![loss, accuracy];
    // Fine-tuning: both learning rates per epoch, in the train and validation colours.
    if history.iter().any(|m| m.backbone_lr.is_some()) {
        let series = |f: fn(&EpochMetrics) -> Option<f64>| {
            history
                .iter()
                .filter_map(|m| f(m).map(|v| (m.epoch as f64, v * 1e3)))
                .collect()
        };
        panels.push(Panel {
            title: "lr x1e3 head/backbone",
            unit: "",
            limits: (0.0, f64::INFINITY),
            empty: (0.0, 1.0),
            train: series(|m| m.lr),
            val: series(|m| m.backbone_lr),
        });
    }
    let part = w / panels.len() as i32;
    for (i, panel) in panels.iter().enumerate() {
        let left = i as i32 * part;
        let bounds = Area {
            left,
            top: 84,
            right: left + part,
            bottom: h,
        };
        draw_panel(&mut img, bounds, panel, x_range, best);
    }
    img
}

fn draw_legend(img: &mut RgbImage, cx: i32, y: i32) {
    // `None` is the dashed best-epoch marker rather than a series colour.
    let entries = [
        ("train", Some(TRAIN)),
        ("validation", Some(VAL)),
        ("best epoch", None),
    ];
    let sample = 28;
    let gap = 32;
    let total: i32 = entries
        .iter()
        .map(|(name, _)| sample + 8 + text_width(name, 2))
        .sum::<i32>()
        + gap * (entries.len() as i32 - 1);
    let mut x = cx - total / 2;
    for (name, color) in entries {
        let mid = (y + 8) as f32;
        let centre = (x + sample / 2) as f32;
        match color {
            Some(color) => {
                line(img, (x as f32, mid), ((x + sample) as f32, mid), 3.0, color);
                line(img, (centre, mid), (centre, mid), 7.0, color);
            }
            None => dashed_vline(img, x + sample / 2, y - 2, y + 18, BEST),
        }
        text(img, x + sample + 8, y, name, 2, INK);
        x += sample + 8 + text_width(name, 2) + gap;
    }
}

/// Draws `panel` inside `bounds`: title, y ticks with grid lines, epoch ticks, the best-epoch
/// marker and both series.
fn draw_panel(
    img: &mut RgbImage,
    bounds: Area,
    panel: &Panel,
    x_range: Option<(f64, f64)>,
    best: Option<f64>,
) {
    let y_range = panel.y_range();
    let y_labels: Vec<(f64, String)> = y_range
        .ticks()
        .map(|v| (v, y_range.label(v, panel.unit)))
        .collect();
    let label_w = y_labels
        .iter()
        .map(|(_, s)| text_width(s, 2))
        .max()
        .unwrap_or(0);
    let area = Area {
        left: bounds.left + 24 + label_w,
        top: bounds.top + 32,
        right: bounds.right - 28,
        bottom: bounds.bottom - 56,
    };
    text_centered(
        img,
        (area.left + area.right) / 2,
        bounds.top,
        panel.title,
        2,
        INK,
    );

    let y_px = |v: f64| {
        let t = (v - y_range.lo) / (y_range.hi - y_range.lo);
        area.bottom as f64 - t * f64::from(area.bottom - area.top)
    };
    for (v, label) in &y_labels {
        let y = y_px(*v).round() as i32;
        fill_rect(img, area.left, y, area.right - area.left, 1, GRID);
        fill_rect(img, area.left - 5, y, 5, 1, MUTED);
        text_right(img, area.left - 10, y - 8, label, 2, MUTED);
    }
    text_centered(
        img,
        (area.left + area.right) / 2,
        area.bottom + 36,
        "epoch",
        2,
        MUTED,
    );

    let Some((x_lo, x_hi)) = x_range else {
        text_centered(
            img,
            (area.left + area.right) / 2,
            (area.top + area.bottom) / 2 - 8,
            "no epochs recorded",
            2,
            MUTED,
        );
        draw_axes(img, area);
        return;
    };
    let x_px = |e: f64| {
        let span = f64::from(area.right - area.left) - 2.0 * X_INSET;
        f64::from(area.left) + X_INSET + (e - x_lo) / (x_hi - x_lo) * span
    };

    // Whole epochs only; the step grows so labels never touch.
    let x_step = NiceRange::new(x_lo, x_hi, 10.0).step.max(1.0).round();
    let mut epoch = (x_lo / x_step).ceil() * x_step;
    while epoch <= x_hi {
        let x = x_px(epoch).round() as i32;
        fill_rect(img, x, area.bottom, 1, 5, MUTED);
        text_centered(img, x, area.bottom + 10, &format!("{epoch}"), 2, MUTED);
        epoch += x_step;
    }

    if let Some(best) = best {
        dashed_vline(img, x_px(best).round() as i32, area.top, area.bottom, BEST);
    }
    draw_axes(img, area);

    for (series, color) in [(&panel.train, TRAIN), (&panel.val, VAL)] {
        let points: Vec<Option<(f32, f32)>> = series
            .iter()
            .map(|&(e, v)| v.is_finite().then(|| (x_px(e) as f32, y_px(v) as f32)))
            .collect();
        for pair in points.windows(2) {
            if let [Some(a), Some(b)] = pair {
                line(img, *a, *b, 3.0, color);
            }
        }
        // Markers show where each epoch's value is; on long runs they would merge into a blob.
        if points.len() <= 40 {
            for p in points.iter().flatten() {
                line(img, *p, *p, 7.0, color);
            }
        }
    }
}

fn draw_axes(img: &mut RgbImage, area: Area) {
    fill_rect(
        img,
        area.left,
        area.top,
        1,
        area.bottom - area.top + 1,
        MUTED,
    );
    fill_rect(
        img,
        area.left,
        area.bottom,
        area.right - area.left + 1,
        1,
        MUTED,
    );
}

// ---------------------------------------------------------------------------------------------
// Confusion matrix.

/// Side of the square the matrix cells share, whatever the number of classes.
const GRID_SIDE: i32 = 480;

/// Shade for a share in 0..=1, from near-white to dark blue.
fn shade(t: f64) -> Rgb<u8> {
    const STOPS: [[f64; 3]; 5] = [
        [247.0, 251.0, 255.0],
        [198.0, 219.0, 239.0],
        [107.0, 174.0, 214.0],
        [33.0, 113.0, 181.0],
        [8.0, 48.0, 107.0],
    ];
    let pos = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    Rgb([0, 1, 2].map(|c| (a[c] + (b[c] - a[c]) * f).round() as u8))
}

/// Counts per (true, predicted) pair, each cell shaded by its share of the true class's photos.
pub(super) fn confusion_matrix(evaluation: &Evaluation) -> RgbImage {
    let (w, h) = CONFUSION_SIZE;
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let w = w as i32;
    let grid_left = 244;
    let grid_top = 116;

    let title = format!("confusion matrix: {} validation photos", evaluation.images);
    text_centered(&mut img, w / 2, 14, &fit(&title, w - 20, 2), 2, INK);
    text_centered(
        &mut img,
        grid_left + GRID_SIDE / 2,
        grid_top - 60,
        "predicted",
        2,
        MUTED,
    );
    text_centered(
        &mut img,
        w / 2,
        grid_top + GRID_SIDE + 22,
        "rows: true class, columns: predicted class, shade: share of the row",
        1,
        MUTED,
    );

    let labels = &evaluation.labels;
    let n = labels.len() as i32;
    if n == 0 {
        text_centered(
            &mut img,
            grid_left + GRID_SIDE / 2,
            grid_top + GRID_SIDE / 2 - 8,
            "no classes",
            2,
            MUTED,
        );
        return img;
    }
    let cell = GRID_SIDE / n;
    let distinct = |texts: &[String]| {
        let mut sorted: Vec<&String> = texts.iter().collect();
        sorted.sort();
        sorted.windows(2).all(|w| w[0] != w[1])
    };

    let col_room = cell - 8;
    let col_scale = if col_room >= 6 * 2 * GLYPH { 2 } else { 1 };
    let mut col_texts: Vec<String> = labels.iter().map(|l| fit(l, col_room, col_scale)).collect();
    let row_room = grid_left - 52;
    let mut row_scale = if cell >= 2 * GLYPH + 4 { 2 } else { 1 };
    let mut row_texts: Vec<String> = labels.iter().map(|l| fit(l, row_room, row_scale)).collect();
    // Names cut to the same stub ("breed_1", "breed_2" -> "br..") would hide which is which:
    // number the classes instead and spell them out, smaller, in the row labels.
    if !distinct(&col_texts) || !distinct(&row_texts) {
        col_texts = (0..labels.len())
            .map(|i| fit(&i.to_string(), col_room, 1))
            .collect();
        row_scale = 1;
        row_texts = (0..)
            .zip(labels)
            .map(|(i, l): (usize, _)| fit(&format!("{i}: {l}"), row_room, 1))
            .collect();
    }
    let col_scale = if col_texts
        .iter()
        .all(|t| text_width(t, col_scale) <= col_room)
    {
        col_scale
    } else {
        1
    };

    let widest = row_texts
        .iter()
        .map(|t| text_width(t, row_scale))
        .max()
        .unwrap_or(0);
    // The axis title sits just left of the widest row label, not at the image edge.
    let true_x = (grid_left - 12 - widest - 16 - 2 * GLYPH).max(8);
    text_up(&mut img, true_x, grid_top + GRID_SIDE / 2, "true", 2, MUTED);
    for (i, (row_text, col_text)) in (0..).zip(row_texts.iter().zip(&col_texts)) {
        let y = grid_top + i * cell + cell / 2 - GLYPH * row_scale / 2;
        text_right(&mut img, grid_left - 12, y, row_text, row_scale, INK);
        let x = grid_left + i * cell + cell / 2;
        text_centered(&mut img, x, grid_top - 28, col_text, col_scale, INK);
    }

    // One text size for every count, the largest at which the biggest count fits its cell.
    let widest_count = evaluation
        .confusion
        .iter()
        .flatten()
        .max()
        .map_or(1, |c| c.to_string().len() as i32);
    let count_scale = [3, 2, 1]
        .into_iter()
        .find(|s| widest_count * GLYPH * s + 8 <= cell && GLYPH * s + 8 <= cell);
    let with_share = cell >= 90;
    for (r, row) in (0..).zip(&evaluation.confusion) {
        let row_total: usize = row.iter().sum();
        for (c, &count) in (0..).zip(row) {
            let share = if row_total == 0 {
                0.0
            } else {
                count as f64 / row_total as f64
            };
            let (x, y) = (grid_left + c * cell, grid_top + r * cell);
            // A white gutter between cells instead of grid lines.
            fill_rect(&mut img, x + 1, y + 1, cell - 2, cell - 2, shade(share));
            let Some(scale) = count_scale else {
                continue;
            };
            let ink = if share > 0.55 { WHITE } else { INK };
            let count = count.to_string();
            let block = GLYPH * scale + if with_share { 14 } else { 0 };
            let top = y + (cell - block) / 2;
            text_centered(&mut img, x + cell / 2, top, &count, scale, ink);
            if with_share {
                let pct = format!("{:.1}%", share * 100.0);
                text_centered(
                    &mut img,
                    x + cell / 2,
                    top + GLYPH * scale + 6,
                    &pct,
                    1,
                    ink,
                );
            }
        }
    }
    img
}

// ---------------------------------------------------------------------------------------------
// Contact sheet.

/// The photos in a grid of [`SHEET_COLUMNS`], each letterboxed into a [`THUMB`]-sided square with
/// its true and predicted label underneath. With no photos, a small placeholder says so.
pub(super) fn contact_sheet(photos: &[&Misclassified]) -> RgbImage {
    if photos.is_empty() {
        let (w, h) = EMPTY_SHEET_SIZE;
        let mut img = RgbImage::from_pixel(w, h, PAPER);
        text_centered(
            &mut img,
            w as i32 / 2,
            h as i32 / 2 - GLYPH,
            "no misclassified photos",
            2,
            MUTED,
        );
        return img;
    }
    let columns = photos.len().min(SHEET_COLUMNS) as u32;
    let rows = photos.len().div_ceil(SHEET_COLUMNS) as u32;
    let pitch_x = THUMB + SHEET_PAD;
    let pitch_y = THUMB + CAPTION + SHEET_PAD;
    let mut img = RgbImage::from_pixel(
        columns * pitch_x + SHEET_PAD,
        rows * pitch_y + SHEET_PAD,
        PAPER,
    );
    for (i, photo) in (0u32..).zip(photos) {
        let x = SHEET_PAD + (i % columns) * pitch_x;
        let y = SHEET_PAD + (i / columns) * pitch_y;
        fill_rect(
            &mut img,
            x as i32,
            y as i32,
            THUMB as i32,
            THUMB as i32,
            LETTERBOX,
        );
        let (tw, th) = photo.thumbnail.dimensions();
        if tw > 0 && th > 0 {
            let s = f64::from(THUMB) / f64::from(tw.max(th));
            let fw = ((f64::from(tw) * s).round() as u32).clamp(1, THUMB);
            let fh = ((f64::from(th) * s).round() as u32).clamp(1, THUMB);
            let fitted = imageops::resize(&photo.thumbnail, fw, fh, imageops::FilterType::Triangle);
            let ox = x + (THUMB - fw) / 2;
            let oy = y + (THUMB - fh) / 2;
            imageops::replace(&mut img, &fitted, i64::from(ox), i64::from(oy));
        }
        let room = THUMB as i32;
        let truth = fit(&format!("true: {}", photo.true_label), room, 1);
        let confidence = format!(" {:.2}", photo.confidence);
        let predicted = fit(
            &format!("pred: {}", photo.predicted_label),
            room - text_width(&confidence, 1),
            1,
        );
        let (cx, cy) = (x as i32, (y + THUMB) as i32);
        text(&mut img, cx, cy + 6, &truth, 1, INK);
        text(
            &mut img,
            cx,
            cy + 18,
            &format!("{predicted}{confidence}"),
            1,
            WRONG,
        );
    }
    img
}
