//! Output pins: the Linux GPIO back-end is chosen here, in the binary, and nowhere else.

#[cfg(feature = "gpio")]
pub use linux::actuator;
#[cfg(not(feature = "gpio"))]
pub use unsupported::actuator;

/// The Linux GPIO back-end: character-device lines (`/dev/gpiochipN`).
#[cfg(feature = "gpio")]
mod linux {
    use std::path::Path;

    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    use linux_embedded_hal::CdevPin;
    use petcam_device::actuate::Actuator;

    pub fn actuator(chip: &Path, pins: &[(usize, u32)]) -> anyhow::Result<Actuator<CdevPin>> {
        let mut c = Chip::new(chip).map_err(|e| {
            anyhow::anyhow!(
                "cannot open GPIO chip {}: {e}; is the user in the gpio group?",
                chip.display()
            )
        })?;
        let mut out = Vec::new();
        for &(label, line) in pins {
            let handle = c
                .get_line(line)
                .and_then(|l| l.request(LineRequestFlags::OUTPUT, 0, "petcam"))
                .map_err(|e| {
                    anyhow::anyhow!("cannot claim GPIO line {line} of {}: {e}", chip.display())
                })?;
            out.push((label, CdevPin::new(handle)?));
        }
        Actuator::new(out).map_err(|e| anyhow::anyhow!("cannot drive a GPIO line: {e:?}"))
    }
}

#[cfg(not(feature = "gpio"))]
mod unsupported {
    use std::path::Path;

    use petcam_device::actuate::{Actuator, NoPin};

    pub fn actuator(_chip: &Path, _pins: &[(usize, u32)]) -> anyhow::Result<Actuator<NoPin>> {
        anyhow::bail!(
            "--pin needs GPIO support: build with `cargo build --release -p petcam-device --features gpio`"
        )
    }
}
