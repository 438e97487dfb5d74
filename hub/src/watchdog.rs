//! The systemd watchdog: `WATCHDOG=1` at half of `WATCHDOG_USEC`, only while the hub
//! is alive.
//!
//! systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`) for a unit with `WatchdogSec=`.
//! [`run`] asks its `alive` check every half interval and pings only when it says yes,
//! so a hub whose accept loop or admin server ended, or whose sink stopped answering,
//! misses its pings and systemd restarts it. Without `WATCHDOG_USEC` nothing runs.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

/// The ping interval from the environment: half of `WATCHDOG_USEC`, or `None` when it
/// is unset, unparsable or zero, or when `WATCHDOG_PID` names another process.
pub fn interval(env: &dyn Fn(&str) -> Option<String>, pid: u32) -> Option<Duration> {
    if let Some(p) = env("WATCHDOG_PID") {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    let usec: u64 = env("WATCHDOG_USEC")?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Every `every`, calls `alive` and sends `WATCHDOG=1` through `notify` when it returns
/// true. Never returns: run it beside the shutdown signal.
pub async fn run<A, F>(every: Duration, mut alive: A, notify: impl Fn(&str))
where
    A: FnMut() -> F,
    F: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_alive = true;
    loop {
        tick.tick().await;
        let now_alive = alive().await;
        if now_alive {
            notify("WATCHDOG=1");
        } else if was_alive {
            warn!(every_ms = every.as_millis() as u64, "Hub not alive; withholding the systemd watchdog ping.");
        }
        was_alive = now_alive;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn interval_is_half_of_watchdog_usec_for_this_process() {
        assert_eq!(interval(&env(&[("WATCHDOG_USEC", "30000000")]), 7), Some(Duration::from_secs(15)));
        assert_eq!(
            interval(&env(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "7")]), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval(&env(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "8")]), 7), None);
        assert_eq!(interval(&env(&[("WATCHDOG_USEC", "0")]), 7), None);
        assert_eq!(interval(&env(&[("WATCHDOG_USEC", "soon")]), 7), None);
        assert_eq!(interval(&env(&[]), 7), None);
    }

    #[tokio::test(start_paused = true)]
    async fn pings_only_while_alive() {
        let alive = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicUsize::new(0));
        let task = {
            let (alive, pings) = (alive.clone(), pings.clone());
            tokio::spawn(run(
                Duration::from_secs(15),
                move || {
                    let alive = alive.clone();
                    async move { alive.load(Ordering::SeqCst) }
                },
                move |state| {
                    assert_eq!(state, "WATCHDOG=1");
                    pings.fetch_add(1, Ordering::SeqCst);
                },
            ))
        };
        // Ticks at 0, 15 and 30 s.
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 3);
        alive.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 3, "no ping while not alive");
        alive.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 4, "pings resume");
        task.abort();
    }
}
