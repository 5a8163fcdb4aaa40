//! The spoof-event stream: `from_pod`'s ring buffer, read through tokio's `AsyncFd`.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use veil_bpf::{SpoofEvent, SPOOF_EVENTS_MAP};

use super::RedirectError;

/// Spoof events as `from_pod` reports them. Records that do not decode are counted in
/// [`SpoofEvents::malformed`] and skipped.
pub struct SpoofEvents {
    ring: AsyncFd<RingBuf<MapData>>,
    malformed: u64,
}

impl std::fmt::Debug for SpoofEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoofEvents")
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl SpoofEvents {
    /// Registers the ring with the current tokio reactor.
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<SpoofEvents, RedirectError> {
        // SAFETY: the ring owns its map descriptor and keeps it open, unchanged, for as long
        // as the AsyncFd owns the ring (it is never replaced nor closed underneath).
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| RedirectError::Map {
                map: SPOOF_EVENTS_MAP,
                key: "register with the reactor".into(),
                message: e.to_string(),
            })?;
        Ok(SpoofEvents { ring, malformed: 0 })
    }

    /// Records that did not decode (a bug on one side; never expected).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Takes whatever is in the ring now, without waiting.
    pub fn drain(&mut self) -> Vec<SpoofEvent> {
        let mut out = Vec::new();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match SpoofEvent::decode(&item) {
                Some(event) => out.push(event),
                None => self.malformed += 1,
            }
        }
        out
    }

    /// Waits until at least one event is there and returns all that are. Cancel-safe:
    /// events stay in the ring until returned.
    pub async fn next_batch(&mut self) -> Result<Vec<SpoofEvent>, RedirectError> {
        loop {
            let events = self.drain();
            if !events.is_empty() {
                return Ok(events);
            }
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|e| RedirectError::Map {
                    map: SPOOF_EVENTS_MAP,
                    key: "poll".into(),
                    message: e.to_string(),
                })?;
            // Drained above; the next epoll wake-up comes with the next record.
            guard.clear_ready();
        }
    }
}
