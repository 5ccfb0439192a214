//! From per-frame probabilities to a decision: "cat", "dog" or nothing sure.
//!
//! One frame is noisy (motion blur, a paw at the edge of the picture), so the decision uses
//! the mean probabilities of the last `smooth` frames, and a label is only decided when its
//! smoothed probability reaches the threshold. A change of decision is an event; a steady
//! decision is not, so outputs do not chatter.

use std::collections::VecDeque;

/// What the camera currently sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A label index, sure enough.
    Label(usize),
    /// No label reaches the threshold.
    Unsure,
}

/// A change of decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub from: Decision,
    pub to: Decision,
    /// Smoothed probability of the top label when the change happened.
    pub confidence: f32,
}

#[derive(Debug, Clone)]
pub struct Decider {
    smooth: usize,
    threshold: f32,
    recent: VecDeque<Vec<f32>>,
    current: Decision,
    confidence: f32,
}

impl Decider {
    /// `smooth` frames of history (at least 1); `threshold` in `0..=1`.
    pub fn new(smooth: usize, threshold: f32) -> Self {
        Self {
            smooth: smooth.max(1),
            threshold,
            recent: VecDeque::new(),
            current: Decision::Unsure,
            confidence: 0.0,
        }
    }

    pub fn current(&self) -> Decision {
        self.current
    }

    /// The smoothed probability of the top label after the last frame.
    pub fn confidence(&self) -> f32 {
        self.confidence
    }

    /// Takes one frame's probabilities; returns the event when the decision changes.
    pub fn push(&mut self, probabilities: &[f32]) -> Option<Event> {
        if self.recent.len() == self.smooth {
            self.recent.pop_front();
        }
        self.recent.push_back(probabilities.to_vec());
        let n = self.recent.len() as f32;
        let mean: Vec<f32> = (0..probabilities.len())
            .map(|c| {
                self.recent
                    .iter()
                    .map(|p| p.get(c).copied().unwrap_or(0.0))
                    .sum::<f32>()
                    / n
            })
            .collect();
        let (top, confidence) = mean
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        self.confidence = confidence;
        let next = if confidence >= self.threshold {
            Decision::Label(top)
        } else {
            Decision::Unsure
        };
        (next != self.current).then(|| {
            let from = std::mem::replace(&mut self.current, next);
            Event {
                from,
                to: next,
                confidence,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_confident_frame_is_not_enough_when_smoothing() {
        let mut d = Decider::new(3, 0.8);
        // Two unsure frames, then a confident cat: the mean (0.5+0.5+1)/3 = 0.67 stays unsure.
        assert_eq!(d.push(&[0.5, 0.5]), None);
        assert_eq!(d.push(&[0.5, 0.5]), None);
        assert_eq!(d.push(&[1.0, 0.0]), None);
        // Another: (0.5+1+1)/3 = 0.83 decides cat.
        let e = d.push(&[1.0, 0.0]).unwrap();
        assert_eq!((e.from, e.to), (Decision::Unsure, Decision::Label(0)));
        assert!((e.confidence - 2.5 / 3.0).abs() < 1e-6);
        // Steady: no event.
        assert_eq!(d.push(&[0.9, 0.1]), None);
        assert_eq!(d.current(), Decision::Label(0));
    }

    #[test]
    fn a_dog_replaces_the_cat_through_unsure() {
        let mut d = Decider::new(2, 0.8);
        assert_eq!(d.push(&[0.9, 0.1]).unwrap().to, Decision::Label(0));
        // Mean 0.5/0.5: nothing sure.
        assert_eq!(d.push(&[0.1, 0.9]).unwrap().to, Decision::Unsure);
        let e = d.push(&[0.1, 0.9]).unwrap();
        assert_eq!((e.from, e.to), (Decision::Unsure, Decision::Label(1)));
    }

    #[test]
    fn without_smoothing_each_frame_decides() {
        let mut d = Decider::new(1, 0.8);
        assert_eq!(d.push(&[0.79, 0.21]), None);
        assert_eq!(d.push(&[0.8, 0.2]).unwrap().to, Decision::Label(0));
        assert_eq!(d.push(&[0.2, 0.8]).unwrap().to, Decision::Label(1));
    }
}
