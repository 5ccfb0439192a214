//! Decisions to output pins: each label can drive one pin, high while that label is decided.
//!
//! Generic over `embedded_hal::digital::OutputPin`, so the logic is the same for Linux GPIO
//! character devices, a microcontroller, or the mock pins of the tests; the back-end is
//! chosen in `main` only.

use embedded_hal::digital::OutputPin;

use crate::decide::Decision;

#[derive(Debug, thiserror::Error)]
pub enum PinSpecError {
    #[error("--pin {0:?} is not LABEL=LINE (e.g. cat=17)")]
    Syntax(String),
    #[error("--pin {spec:?}: the model has no label {label:?}; its labels are {labels}")]
    UnknownLabel {
        spec: String,
        label: String,
        labels: String,
    },
}

/// Parses `LABEL=LINE` against the model's labels: (label index, GPIO line offset).
pub fn parse_pin(spec: &str, labels: &[String]) -> Result<(usize, u32), PinSpecError> {
    let (label, line) = spec
        .split_once('=')
        .ok_or_else(|| PinSpecError::Syntax(spec.to_owned()))?;
    let line: u32 = line
        .trim()
        .parse()
        .map_err(|_| PinSpecError::Syntax(spec.to_owned()))?;
    let index = labels
        .iter()
        .position(|l| l == label.trim())
        .ok_or_else(|| PinSpecError::UnknownLabel {
            spec: spec.to_owned(),
            label: label.trim().to_owned(),
            labels: labels.join(", "),
        })?;
    Ok((index, line))
}

/// The pins of the labels that have one.
#[derive(Debug)]
pub struct Actuator<P: OutputPin> {
    pins: Vec<(usize, P)>,
}

impl<P: OutputPin> Actuator<P> {
    /// Takes `(label index, pin)` pairs and drives every pin low (inactive).
    pub fn new(pins: Vec<(usize, P)>) -> Result<Self, P::Error> {
        let mut a = Self { pins };
        a.release()?;
        Ok(a)
    }

    /// The decided label's pin high, every other pin low.
    pub fn apply(&mut self, decision: Decision) -> Result<(), P::Error> {
        for (label, pin) in &mut self.pins {
            if decision == Decision::Label(*label) {
                pin.set_high()?;
            } else {
                pin.set_low()?;
            }
        }
        Ok(())
    }

    /// Every pin low: what the outputs show when the program stops.
    pub fn release(&mut self) -> Result<(), P::Error> {
        for (_, pin) in &mut self.pins {
            pin.set_low()?;
        }
        Ok(())
    }
}

/// The pin type of a run without outputs: it has no values, so an `Actuator<NoPin>` is empty.
#[derive(Debug)]
pub enum NoPin {}

impl embedded_hal::digital::ErrorType for NoPin {
    type Error = std::convert::Infallible;
}

impl OutputPin for NoPin {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        match *self {}
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        match *self {}
    }
}

#[cfg(test)]
pub(crate) mod mock {
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A pin that records every level it was set to.
    #[derive(Debug, Clone, Default)]
    pub struct MockPin(pub Rc<RefCell<Vec<bool>>>);

    impl MockPin {
        pub fn level(&self) -> Option<bool> {
            self.0.borrow().last().copied()
        }
    }

    impl embedded_hal::digital::ErrorType for MockPin {
        type Error = std::convert::Infallible;
    }

    impl embedded_hal::digital::OutputPin for MockPin {
        fn set_low(&mut self) -> Result<(), Self::Error> {
            self.0.borrow_mut().push(false);
            Ok(())
        }
        fn set_high(&mut self) -> Result<(), Self::Error> {
            self.0.borrow_mut().push(true);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::MockPin;
    use super::*;
    use crate::decide::Decider;

    fn labels() -> Vec<String> {
        vec!["cat".into(), "dog".into()]
    }

    #[test]
    fn pin_specs_name_labels_and_lines() {
        assert_eq!(parse_pin("dog=27", &labels()).unwrap(), (1, 27));
        assert_eq!(parse_pin(" cat = 17", &labels()).unwrap(), (0, 17));
        assert!(matches!(
            parse_pin("cat:17", &labels()),
            Err(PinSpecError::Syntax(_))
        ));
        let e = parse_pin("bird=5", &labels()).unwrap_err().to_string();
        assert!(e.contains("bird") && e.contains("cat, dog"), "{e}");
    }

    #[test]
    fn pins_follow_the_decisions_of_a_frame_sequence() {
        let (cat, dog) = (MockPin::default(), MockPin::default());
        let mut act = Actuator::new(vec![(0, cat.clone()), (1, dog.clone())]).unwrap();
        assert_eq!((cat.level(), dog.level()), (Some(false), Some(false)));

        let mut decider = Decider::new(2, 0.8);
        let frames: [[f32; 2]; 6] = [
            [0.95, 0.05], // cat
            [0.9, 0.1],   // still cat
            [0.1, 0.9],   // mean 0.5: unsure
            [0.05, 0.95], // dog
            [0.5, 0.5],   // mean 0.275 / 0.725: unsure
            [0.5, 0.5],   // unsure
        ];
        let mut levels = Vec::new();
        for f in frames {
            if let Some(e) = decider.push(&f) {
                act.apply(e.to).unwrap();
            }
            levels.push((cat.level().unwrap(), dog.level().unwrap()));
        }
        assert_eq!(
            levels,
            vec![
                (true, false),
                (true, false),
                (false, false),
                (false, true),
                (false, false),
                (false, false),
            ]
        );
        act.apply(Decision::Label(1)).unwrap();
        act.release().unwrap();
        assert_eq!((cat.level(), dog.level()), (Some(false), Some(false)));
    }
}
