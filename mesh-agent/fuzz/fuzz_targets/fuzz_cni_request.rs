//! The agent's request decoder and the plugin's configuration parser on arbitrary
//! bytes: never a panic, and whatever is accepted passes its own checks again (so the
//! agent never acts on a field it would refuse).
#![no_main]

use mesh_agent::cni::protocol::{decode_request, AgentRequest};
use mesh_agent::cni::spec::parse_netconf;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        match &request {
            AgentRequest::Add(a) | AgentRequest::Check(a) => assert!(a.validate(true).is_ok()),
            AgentRequest::Del(a) => assert!(a.validate(false).is_ok()),
            AgentRequest::Gc { valid } => {
                assert!(valid.iter().all(|k| k.validate().is_ok()))
            }
            _ => {}
        }
    }
    let _ = parse_netconf(data);
});
