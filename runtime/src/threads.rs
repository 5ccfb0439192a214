//! How an inference uses the cores: one thread, a pool, or a pool used only while it is the
//! faster of the two.
//!
//! On the camera computer inference shares the cores with the camera child, the frame
//! conversion, telemetry and the update agent. A pool splits each of the plan's ~100 operators
//! over its threads and waits for the slowest part, so one of its threads descheduled by other
//! work stalls every operator: measured on a 2-core machine with one core held by a busy loop,
//! 2 threads took 3x as long as 1. [`Threads::Auto`], the default, times every inference and
//! runs on one thread while that is faster, trying the pool again every few frames.

use std::fmt;
use std::str::FromStr;

/// How many threads an inference uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Every inference on the calling thread.
    One,
    /// Every inference split over a pool of this many threads (at least 2).
    Pool(usize),
    /// A pool of this many threads, used while inferences on it are measured faster than on
    /// one thread.
    Auto(usize),
}

impl Threads {
    /// [`Threads::Auto`] over every core this process may run on.
    pub fn auto() -> Self {
        Self::Auto(std::thread::available_parallelism().map_or(1, |n| n.get())).normalised()
    }

    /// `n` threads, always: one, or a pool of `n`.
    pub fn fixed(n: usize) -> Self {
        Self::Pool(n).normalised()
    }

    /// The same policy with a pool of one thread written as [`Threads::One`].
    fn normalised(self) -> Self {
        match self {
            Self::Pool(n) | Self::Auto(n) if n <= 1 => Self::One,
            other => other,
        }
    }

    /// Threads in the pool (1 without one).
    pub fn max(self) -> usize {
        match self {
            Self::One => 1,
            Self::Pool(n) | Self::Auto(n) => n,
        }
    }
}

impl Default for Threads {
    fn default() -> Self {
        Self::auto()
    }
}

impl fmt::Display for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::One => f.write_str("1"),
            Self::Pool(n) => write!(f, "{n}"),
            Self::Auto(n) => write!(f, "auto ({n})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("threads must be `auto` or a number of threads from 1 up, not {0:?}")]
pub struct ThreadsError(String);

impl FromStr for Threads {
    type Err = ThreadsError;

    /// `auto` (every core, the pool only while it is faster), `auto:N` (the same with N
    /// threads) or `N` (always N).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ThreadsError(s.to_owned());
        let count = |n: &str| match n.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(bad()),
        };
        match s.trim() {
            "auto" => Ok(Self::auto()),
            s => match s.strip_prefix("auto:") {
                Some(n) => Ok(Self::Auto(count(n)?).normalised()),
                None => Ok(Self::fixed(count(s)?)),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for Threads {
    /// A number, or a string as `--threads` takes it.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) if n >= 1 => Ok(Self::fixed(n)),
            Raw::Count(n) => Err(serde::de::Error::custom(ThreadsError(n.to_string()))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Where one inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    One,
    Pool,
}

impl Lane {
    fn other(self) -> Self {
        match self {
            Self::One => Self::Pool,
            Self::Pool => Self::One,
        }
    }
}

/// Recent inference times of one lane: the last [`Window::LEN`], so one inference delayed by
/// a page fault or a preempted thread does not move the estimate.
#[derive(Debug, Clone, Default)]
struct Window {
    ms: [f64; Window::LEN],
    len: usize,
    next: usize,
}

impl Window {
    const LEN: usize = 5;
    /// Samples a median needs.
    const ENOUGH: usize = 3;

    fn push(&mut self, ms: f64) {
        self.ms[self.next] = ms;
        self.next = (self.next + 1) % Self::LEN;
        self.len = (self.len + 1).min(Self::LEN);
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    fn median(&self) -> Option<f64> {
        if self.len < Self::ENOUGH {
            return None;
        }
        let mut v = self.ms[..self.len].to_vec();
        v.sort_by(f64::total_cmp);
        Some(v[self.len / 2])
    }

    fn min(&self) -> Option<f64> {
        self.ms[..self.len].iter().copied().min_by(f64::total_cmp)
    }
}

/// [`Threads::Auto`]'s choice of lane, from the inferences it timed.
///
/// Inferences run on one lane, and every so often a probe runs three on the other: the first
/// after a change of lane is slow (the pool's threads were asleep, its caches cold), so only
/// the other two are timed, and the probe wins when the faster of them beats the median of the
/// lane in use. A probe that loses doubles the wait for the next (8 to 64 inferences), so under
/// a lasting load the slower lane costs a few percent of the frames and never the median. The
/// pool's median getting 1.5x what it was when it was chosen (load arriving: it gets 2-3x
/// slower), or a lane chosen on one lucky probe proving no faster on its median than the lane
/// it replaced, starts a probe at once.
#[derive(Debug, Clone)]
pub struct Chooser {
    on: Lane,
    one: Window,
    pool: Window,
    last: Option<Lane>,
    /// The probe's lane and its inferences still to run.
    probe: Option<(Lane, u32)>,
    since_probe: u32,
    interval: u32,
    /// The median of the lane in use when it was chosen or last beat a probe.
    reference: Option<f64>,
    /// Inferences run on each lane so far: (one thread, pool).
    pub counts: (u64, u64),
}

impl Default for Chooser {
    fn default() -> Self {
        Self {
            on: Lane::One,
            one: Window::default(),
            pool: Window::default(),
            last: None,
            probe: None,
            // The pool is tried as soon as one thread has a median.
            since_probe: Self::MIN_INTERVAL,
            interval: Self::MIN_INTERVAL,
            reference: None,
            counts: (0, 0),
        }
    }
}

impl Chooser {
    const MIN_INTERVAL: u32 = 8;
    const MAX_INTERVAL: u32 = 64;
    const PROBE_RUNS: u32 = 3;
    /// How much slower the pool may get before it is probed against one thread.
    const SLOWDOWN: f64 = 1.5;

    fn window(&mut self, lane: Lane) -> &mut Window {
        match lane {
            Lane::One => &mut self.one,
            Lane::Pool => &mut self.pool,
        }
    }

    /// The lane the next inference runs on.
    pub fn choose(&mut self) -> Lane {
        // (Inferences of one model on several threads at once may call this twice in a row.)
        if let Some((lane, left @ 1..)) = self.probe {
            self.probe = Some((lane, left - 1));
            return lane;
        }
        let on = self.on;
        let Some(median) = self.window(on).median() else {
            return on;
        };
        self.since_probe += 1;
        let slower = match self.reference {
            // Other work slows one thread less than it slows the pool: only the pool's
            // slowing down is a reason to try the other lane.
            Some(r) => on == Lane::Pool && median > r * Self::SLOWDOWN,
            // Just chosen on one probe: it must beat the lane it replaced on its median too.
            None => {
                self.reference = Some(median);
                self.window(on.other())
                    .median()
                    .is_some_and(|m| median >= m)
            }
        };
        if self.since_probe >= self.interval || slower {
            let other = on.other();
            self.window(other).clear();
            self.probe = Some((other, Self::PROBE_RUNS - 1));
            return other;
        }
        on
    }

    /// Records how long an inference on `lane` took.
    pub fn record(&mut self, lane: Lane, ms: f64) {
        match lane {
            Lane::One => self.counts.0 += 1,
            Lane::Pool => self.counts.1 += 1,
        }
        // The first inference after a change of lane pays for the change.
        if self.last == Some(lane) {
            self.window(lane).push(ms);
        }
        self.last = Some(lane);
        if self.probe != Some((lane, 0)) {
            return;
        }
        self.probe = None;
        self.since_probe = 0;
        let on = self.on;
        let (probed, current) = (self.window(lane).min(), self.window(on).median());
        match (probed, current) {
            (Some(p), Some(c)) if p < c => {
                self.on = lane;
                self.interval = Self::MIN_INTERVAL;
                self.reference = None;
            }
            _ => {
                self.interval = (self.interval * 2).min(Self::MAX_INTERVAL);
                self.reference = current;
            }
        }
    }

    /// The lane inferences run on, between probes.
    pub fn lane(&self) -> Lane {
        self.on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_auto() {
        assert_eq!("1".parse(), Ok(Threads::One));
        assert_eq!("3".parse(), Ok(Threads::Pool(3)));
        assert_eq!("auto:4".parse(), Ok(Threads::Auto(4)));
        assert_eq!("auto:1".parse(), Ok(Threads::One));
        assert_eq!("auto".parse::<Threads>().unwrap(), Threads::auto());
        for bad in ["0", "auto:0", "two", "", "-1", "auto:"] {
            let e = bad.parse::<Threads>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn deserialises_a_number_or_a_string() {
        #[derive(serde::Deserialize)]
        struct C {
            threads: Threads,
        }
        let t = |s: &str| toml::from_str::<C>(s).map(|c| c.threads);
        assert_eq!(t("threads = 2").unwrap(), Threads::Pool(2));
        assert_eq!(t("threads = 1").unwrap(), Threads::One);
        assert_eq!(t("threads = \"auto:2\"").unwrap(), Threads::Auto(2));
        assert!(t("threads = 0")
            .unwrap_err()
            .to_string()
            .contains("not \"0\""));
        assert!(t("threads = \"many\"").is_err());
    }

    /// Runs `frames` inferences through a chooser; `ms(lane, changed)` is how long one takes
    /// on `lane`, `changed` when the one before ran on the other lane.
    fn drive(
        c: &mut Chooser,
        frames: usize,
        mut ms: impl FnMut(Lane, bool) -> f64,
    ) -> Vec<(Lane, f64)> {
        (0..frames)
            .map(|_| {
                let lane = c.choose();
                let t = ms(lane, c.last.is_some_and(|l| l != lane));
                c.record(lane, t);
                (lane, t)
            })
            .collect()
    }

    fn share(run: &[(Lane, f64)], lane: Lane) -> f64 {
        run.iter().filter(|(l, _)| *l == lane).count() as f64 / run.len() as f64
    }

    fn p50(run: &[(Lane, f64)]) -> f64 {
        let mut t: Vec<f64> = run.iter().map(|(_, t)| *t).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }

    /// The figures of a 2-core machine: the pool 1.5x faster than one thread when the cores
    /// are free, 2.5x slower with one core busy, and its first inference after one-thread
    /// ones slower still (threads asleep, caches cold).
    fn idle(lane: Lane, changed: bool) -> f64 {
        match (lane, changed) {
            (Lane::Pool, false) => 10.0,
            (Lane::Pool, true) => 22.0,
            (Lane::One, _) => 15.0,
        }
    }

    fn busy(lane: Lane, changed: bool) -> f64 {
        match (lane, changed) {
            (Lane::Pool, false) => 45.0,
            (Lane::Pool, true) => 60.0,
            (Lane::One, _) => 18.0,
        }
    }

    #[test]
    fn takes_the_pool_while_the_cores_are_free() {
        let mut c = Chooser::default();
        let start = drive(&mut c, 10, idle);
        assert_eq!(c.lane(), Lane::Pool, "{start:?}");
        let run = drive(&mut c, 200, idle);
        assert!(share(&run, Lane::Pool) >= 0.9, "{run:?}");
        assert_eq!(p50(&run), 10.0);
    }

    #[test]
    fn moves_to_one_thread_when_a_core_gets_busy_and_back_when_it_is_free() {
        let mut c = Chooser::default();
        drive(&mut c, 50, idle);
        assert_eq!(c.lane(), Lane::Pool);
        // Load arrives: one thread within a few inferences, and the probes of the pool that
        // follow stay out of the median.
        let run = drive(&mut c, 300, busy);
        let moved = run.iter().position(|(l, _)| *l == Lane::One).unwrap();
        assert!(moved <= 5, "{run:?}");
        assert!(p50(&run) <= 18.0 * 1.1, "{run:?}");
        assert!(share(&run[50..], Lane::Pool) <= 0.08, "{run:?}");
        assert_eq!(c.lane(), Lane::One);
        // Load goes: back on the pool within the longest wait between probes.
        let run = drive(&mut c, 100, idle);
        let back = (0..run.len())
            .find(|&i| run[i..].iter().filter(|(l, _)| *l == Lane::One).count() <= 10)
            .unwrap();
        assert!(back <= Chooser::MAX_INTERVAL as usize + 2, "{run:?}");
        assert_eq!(c.lane(), Lane::Pool);
        let total = c.counts.0 + c.counts.1;
        assert_eq!(total, 450);
    }

    #[test]
    fn one_slow_inference_or_one_lucky_probe_changes_little() {
        let mut c = Chooser::default();
        drive(&mut c, 50, idle);
        // One pool inference in twenty preempted for 100 ms: still the pool.
        let mut n = 0;
        let run = drive(&mut c, 40, |l, changed| {
            n += 1;
            if l == Lane::Pool && n % 20 == 5 {
                110.0
            } else {
                idle(l, changed)
            }
        });
        assert!(share(&run, Lane::Pool) >= 0.85, "{run:?}");
        assert_eq!(c.lane(), Lane::Pool);
        // Busy, and the first probe of the pool is lucky: back to one thread within a few.
        drive(&mut c, 100, busy);
        assert_eq!(c.lane(), Lane::One);
        let mut lucky = true;
        let run = drive(&mut c, 80, |l, changed| {
            if l == Lane::Pool && !changed && std::mem::take(&mut lucky) {
                5.0
            } else {
                busy(l, changed)
            }
        });
        let pool = run.iter().filter(|(l, _)| *l == Lane::Pool).count();
        assert!(pool <= 2 + 3 + 2 * 3, "{run:?}");
        assert_eq!(c.lane(), Lane::One);
        assert!(p50(&run) <= 18.0 * 1.1, "{run:?}");
    }
}
