//! The retry policy of Glance requests: which failures are retried (the classification lives
//! in [`crate::glance::Error::retryable`]), how long to wait (exponential backoff from
//! `--retry-backoff`, or the server's `Retry-After`), and how many times.

use std::thread;
use std::time::Duration;

use super::Options;
use crate::glance;
use crate::progress::Reporter;

/// Longest `Retry-After` honoured; beyond it the server is treated as unavailable.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs `f` until it succeeds, fails for good, or the retries are spent.
pub fn with_retries<T>(
    opts: &Options,
    rep: &dyn Reporter,
    what: &str,
    mut f: impl FnMut() -> Result<T, glance::Error>,
) -> Result<T, glance::Error> {
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && attempt < opts.retries => {
                attempt += 1;
                let wait = backoff(opts, attempt, &e)?;
                rep.warn(&format!(
                    "{what}: {e}; retry {attempt}/{} in {:.1}s",
                    opts.retries,
                    wait.as_secs_f64()
                ));
                thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Exponential backoff from `retry_backoff`, or the server's `Retry-After` when it sent one.
pub fn backoff(opts: &Options, attempt: u32, e: &glance::Error) -> Result<Duration, glance::Error> {
    if let Some(after) = e.retry_after() {
        if after > MAX_RETRY_AFTER {
            return Err(glance::Error::Status {
                url: String::new(),
                status: 429,
                body: format!(
                    "server asks to retry after {after:?}, longer than {MAX_RETRY_AFTER:?}"
                ),
                retry_after: None,
            });
        }
        return Ok(after);
    }
    let factor = 1u32 << (attempt - 1).min(16);
    Ok(opts.retry_backoff.saturating_mul(factor).min(MAX_BACKOFF))
}
