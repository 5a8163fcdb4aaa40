//! The CNI side of the agent: the specification's types, the plugin's logic, and the
//! socket protocol between the plugin and the agent.

pub mod plugin;
pub mod protocol;
pub mod spec;
