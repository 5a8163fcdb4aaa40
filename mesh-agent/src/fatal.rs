//! Parts the agent cannot run without (packet threads, watches, servers) report their
//! death here, and the agent stops with an error so its supervisor restarts it: a node
//! with a dead WireGuard queue or CNI server must not look healthy.

use std::panic::AssertUnwindSafe;

use tokio::sync::watch;

/// Reports the first death of a critical part; cheap to clone into every thread.
#[derive(Clone)]
pub struct Fatal(watch::Sender<Option<String>>);

/// Waits for a [`Fatal`] report.
pub struct FatalReceiver(watch::Receiver<Option<String>>);

/// A reporter and the receiver the agent waits on.
pub fn channel() -> (Fatal, FatalReceiver) {
    let (tx, rx) = watch::channel(None);
    (Fatal(tx), FatalReceiver(rx))
}

impl Fatal {
    /// Records that `part` died because of `reason` (the first report wins).
    pub fn report(&self, part: &str, reason: &str) {
        tracing::error!(
            part,
            reason,
            "a critical part of the agent died; stopping so the agent is restarted"
        );
        self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(format!("{part} died: {reason}"));
            true
        });
    }

    /// Starts OS thread `name` running `work`, which is meant to run for the agent's
    /// lifetime: if it returns or panics, that is reported.
    pub fn spawn_thread(
        &self,
        name: String,
        work: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let fatal = self.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let reason = match std::panic::catch_unwind(AssertUnwindSafe(work)) {
                    Ok(()) => "returned".to_string(),
                    Err(panic) => panic_message(&*panic),
                };
                fatal.report(&name, &reason);
            })
            .map(|_| ())
    }
}

impl FatalReceiver {
    /// Resolves with the first report. If every reporter is gone without a report, no
    /// report can come, so this never resolves.
    pub async fn died(&mut self) -> String {
        match self.0.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hardening_a_panicking_critical_thread_is_reported() {
        let (fatal, mut died) = channel();
        fatal
            .spawn_thread("wg-rx9".into(), || panic!("chunk size must be non-zero"))
            .unwrap();
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), died.died())
            .await
            .expect("the death is reported");
        assert_eq!(reason, "wg-rx9 died: panicked: chunk size must be non-zero");
    }

    #[tokio::test]
    async fn hardening_a_returning_critical_thread_is_reported_and_the_first_report_wins() {
        let (fatal, mut died) = channel();
        fatal.spawn_thread("wg-timers".into(), || {}).unwrap();
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), died.died())
            .await
            .expect("the death is reported");
        assert_eq!(reason, "wg-timers died: returned");
        fatal.report("later", "ignored");
        assert_eq!(died.died().await, "wg-timers died: returned");
    }
}
