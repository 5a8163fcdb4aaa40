//! Flow records: one per verdict the proxy gives (a request, a spliced connection, a refusal),
//! kept in a bounded ring that `meshctl observe` replays and then follows.

mod record;
mod ring;

pub use record::{Endpoint, FlowKind, FlowRecord, FlowVerdict};
pub use ring::{Filter, FlowEvent, Flows, FlowsStats, DEFAULT_CAPACITY};
