//! The eBPF and policy-routing datapath: steers connections to covered pods into the
//! agent's transparent proxy, steers the pods' replies back to the proxy's upstream
//! sockets, and drops what pods send from addresses not theirs.

pub mod pod_counters;
