//! Writing frames to a serial port whose timeout is short.
//!
//! Serial ports are opened with short timeouts so a reader notices silence quickly, but the
//! same timeout bounds each write: a full UART transmit buffer (4 KiB drains in 44 ms at
//! 921 600 baud) or a peer that is briefly busy makes a write time out although the line is
//! fine. [`write_frame`] keeps writing until the frame is out or the line has taken nothing for
//! `patience`.

use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

/// Writes all of `frame` and flushes, retrying writes that time out for as long as the port
/// keeps taking bytes within `patience` of the last progress.
pub fn write_frame(port: &mut impl Write, frame: &[u8], patience: Duration) -> std::io::Result<()> {
    let mut rest = frame;
    let mut last_progress = Instant::now();
    while !rest.is_empty() {
        match port.write(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                rest = &rest[n..];
                last_progress = Instant::now();
            }
            Err(e) if retryable(&e) && last_progress.elapsed() < patience => {}
            Err(e) if retryable(&e) => {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    alloc::format!(
                        "the line took none of the last {} of {} bytes for {:.1} s",
                        rest.len(),
                        frame.len(),
                        patience.as_secs_f64()
                    ),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    port.flush()
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that times out on every other write and takes at most 3 bytes at a time.
    struct Stuttering {
        written: alloc::vec::Vec<u8>,
        calls: usize,
        stuck: bool,
    }

    impl Write for Stuttering {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.stuck || self.calls.is_multiple_of(2) {
                return Err(ErrorKind::TimedOut.into());
            }
            let n = buf.len().min(3);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_that_times_out_is_retried_until_the_frame_is_out() {
        let mut port = Stuttering {
            written: alloc::vec::Vec::new(),
            calls: 0,
            stuck: false,
        };
        let frame: alloc::vec::Vec<u8> = (0..20).collect();
        write_frame(&mut port, &frame, Duration::from_secs(5)).unwrap();
        assert_eq!(port.written, frame);
        assert!(port.calls > 7, "{} writes", port.calls);
    }

    #[test]
    fn a_line_that_takes_nothing_fails_after_the_patience() {
        let mut port = Stuttering {
            written: alloc::vec::Vec::new(),
            calls: 0,
            stuck: true,
        };
        let e = write_frame(&mut port, &[1, 2, 3], Duration::from_millis(30)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert!(alloc::format!("{e}").contains("3 of 3 bytes"), "{e}");
    }
}
