//! The WireGuard receive path on arbitrary datagrams from a peer's address: raw bytes,
//! and real data packets of an established session with bytes flipped. Never a panic,
//! never a poisoned session, and nothing delivered whose inner source lies outside the
//! peer's pod CIDR.
#![no_main]

use std::sync::{Mutex, OnceLock};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use mesh_agent::wireguard::datapath::{decrypt_datagrams, Decrypted, Peer, PeerCounters};

/// Node A's session and node B's view of A, with a completed handshake.
struct Pair {
    a: Mutex<Tunn>,
    peer: Peer,
}

fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let sa = StaticSecret::random_from_rng(rand_core::OsRng);
        let sb = StaticSecret::random_from_rng(rand_core::OsRng);
        let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
        let mut a = Tunn::new(sa, pb, None, None, 1, None);
        let mut b = Tunn::new(sb, pa, None, None, 2, None);
        let mut buf = vec![0u8; 2048];
        let mut buf2 = vec![0u8; 2048];
        // A handshake: initiation to B, response to A.
        let init = match a.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            _ => panic!("no initiation"),
        };
        if let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, &init, &mut buf2) {
            let _ = a.decapsulate(None, resp, &mut buf);
        }
        Pair {
            a: Mutex::new(a),
            peer: Peer {
                name: "node-a".into(),
                endpoint: "198.18.0.2:51871".parse().unwrap(),
                pod_cidr: "198.19.1.0/24".parse().unwrap(),
                public_key: *pa.as_bytes(),
                index: 2,
                tunn: Mutex::new(b),
                counters: PeerCounters::default(),
            },
        }
    })
}

/// An IPv4 header whose source is chosen by the input.
fn inner_packet(src: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[198, 19, 2, 9]);
    p
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let pair = pair();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stride = rest.first().copied().unwrap_or(0) as usize * 8;
    let datagram = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        // A real data packet, then flipped where the input says.
        let src = [rest.get(1).copied().unwrap_or(198), 19, rest.get(2).copied().unwrap_or(1), 7];
        let mut out = vec![0u8; 2048];
        let mut a = pair.a.lock().unwrap();
        let mut packet = match a.encapsulate(&inner_packet(src), &mut out) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => return,
        };
        for pair_of in rest.chunks(2).skip(2) {
            if let [at, xor] = pair_of {
                if let Some(len) = packet.len().checked_sub(1) {
                    packet[*at as usize % (len + 1)] ^= xor;
                }
            }
        }
        packet
    };
    let peer = &pair.peer;
    let mut plain = vec![0u8; 65535];
    let mut tunn = mesh_agent::wireguard::datapath::lock_session(peer);
    decrypt_datagrams(peer, &mut tunn, peer.endpoint.ip(), &datagram, stride, &mut plain, |out| {
        if let Decrypted::Packet(p) = out {
            let src = std::net::Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            assert!(peer.pod_cidr.contains(&src), "delivered a spoofed source {src}");
        }
    });
    drop(tunn);
    assert!(!peer.tunn.is_poisoned());
});
