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
    let mut pinger = Pinger::new(every);
    loop {
        tick.tick().await;
        pinger.tick(alive().await, &notify);
    }
}

/// What [`run`] does on each tick, apart from the clock.
#[derive(Debug)]
struct Pinger {
    every: Duration,
    was_alive: bool,
}

impl Pinger {
    fn new(every: Duration) -> Self {
        Self { every, was_alive: true }
    }

    /// Pings when `alive`; logs once when the hub stops being alive.
    fn tick(&mut self, alive: bool, notify: &impl Fn(&str)) {
        if alive {
            notify("WATCHDOG=1");
        } else if self.was_alive {
            warn!(every_ms = self.every.as_millis() as u64, "Hub not alive; withholding the systemd watchdog ping.");
        }
        self.was_alive = alive;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
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

    #[test]
    fn pings_only_while_alive() {
        let pings = std::cell::Cell::new(0);
        let notify = |state: &str| {
            assert_eq!(state, "WATCHDOG=1");
            pings.set(pings.get() + 1);
        };
        let mut pinger = Pinger::new(Duration::from_secs(15));
        for _ in 0..3 {
            pinger.tick(true, &notify);
        }
        assert_eq!(pings.get(), 3);
        for _ in 0..4 {
            pinger.tick(false, &notify);
        }
        assert_eq!(pings.get(), 3, "no ping while not alive");
        pinger.tick(true, &notify);
        assert_eq!(pings.get(), 4, "pings resume");
    }

    /// The loop itself, on a short real interval: it asks `alive` on every tick and
    /// pings through `notify` (the clock is tokio's, so no virtual time is needed).
    #[tokio::test]
    async fn run_asks_alive_and_pings_each_tick() {
        let asked = Arc::new(AtomicUsize::new(0));
        let pings = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let (asked, pings) = (asked.clone(), pings.clone());
            tokio::spawn(run(
                Duration::from_millis(1),
                move || {
                    let n = asked.fetch_add(1, Ordering::SeqCst);
                    // alive, alive, dead, alive, …
                    async move { n % 3 != 2 }
                },
                move |state| {
                    assert_eq!(state, "WATCHDOG=1");
                    let _ = tx.send(pings.fetch_add(1, Ordering::SeqCst) + 1);
                },
            ))
        };
        // Four pings take five ticks: the third answer is "not alive", so no ping.
        while rx.recv().await.expect("the watchdog loop runs") < 4 {}
        task.abort();
        assert!(asked.load(Ordering::SeqCst) >= 5, "asked {} times for 4 pings", asked.load(Ordering::SeqCst));
    }
}
