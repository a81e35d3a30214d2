//! The sweep that forgets sensors gone for `--forget-after` (see `crate::state`, *Forgetting*):
//! a sensor that was removed, renamed or forged does not stay on every page and in every
//! API answer for good.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{hub::Hub, metrics::Metrics};

/// How often to look, for a given `--forget-after`: a tenth of it, so a sensor goes at most
/// 10 % late, between 100 ms (tests give a second) and a minute.
fn sweep_interval(forget_after: Duration) -> Duration {
    (forget_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Forgets gone sensors every [`sweep_interval`] until `shutdown`; `forget_after` zero: never.
pub(crate) async fn run(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    forget_after: Duration,
    shutdown: CancellationToken,
) {
    if forget_after.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(sweep_interval(forget_after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (forgotten, sent) = hub.forget(forget_after);
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                ?forget_after,
                "forgot sensors gone (not online, nothing new) for --forget-after"
            );
            metrics.sensors_forgotten.inc_by(forgotten as u64);
            metrics.ws_messages_sent.inc_by(sent as u64);
            metrics.sensors.set(hub.sensor_count() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_a_tenth_of_forget_after_within_bounds() {
        assert_eq!(
            sweep_interval(Duration::from_secs(24 * 3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(200)),
            Duration::from_millis(100)
        );
    }
}
