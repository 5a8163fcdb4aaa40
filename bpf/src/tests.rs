//! Checks that the Rust mirrors agree with the compiled objects: struct layouts read from
//! the objects' BTF, map and program names read from their ELF, and the event decoder.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

/// A struct's size and its members' byte offsets, as BTF describes it.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    size: usize,
    members: HashMap<String, usize>,
}

/// Reads every named struct of a `.BTF` blob (the kernel's format, `linux/btf.h`). A test
/// helper: the blob is our own compiler's output, so malformed input fails the test.
fn btf_structs(btf: &[u8]) -> HashMap<String, Layout> {
    let u32_at = |at: usize| u32::from_le_bytes(btf[at..at + 4].try_into().unwrap());
    assert_eq!(&btf[..2], &[0x9f, 0xeb], "BTF magic (little endian)");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |off: u32| {
        let start = strings + off as usize;
        let end = start + btf[start..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8(btf[start..end].to_vec()).unwrap()
    };
    let mut found = HashMap::new();
    let mut at = types;
    while at < types + type_len {
        let (name_off, info, size) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kflag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            other => panic!("unknown BTF kind {other}"),
        };
        if kind == 4 && name_off != 0 {
            let members = (0..vlen)
                .map(|i| {
                    let m = at + 12 * i;
                    let bits = u32_at(m + 8);
                    let bits = if kflag { bits & 0xff_ffff } else { bits };
                    assert_eq!(bits % 8, 0, "no bit fields in shared structs");
                    (name(u32_at(m)), bits as usize / 8)
                })
                .collect();
            found.insert(
                name(name_off),
                Layout {
                    size: size as usize,
                    members,
                },
            );
        }
        at += extra;
    }
    found
}

fn object_structs(object: &[u8]) -> HashMap<String, Layout> {
    let parsed = aya_obj::Object::parse(object).expect("our object parses");
    let btf = parsed.btf.expect("compiled with -g, so it has BTF");
    btf_structs(&btf.to_bytes())
}

macro_rules! layout_of {
    ($ty:ty { $($field:ident),* }) => {
        Layout {
            size: std::mem::size_of::<$ty>(),
            members: [$((stringify!($field).to_string(), std::mem::offset_of!($ty, $field))),*]
                .into_iter()
                .collect(),
        }
    };
}

#[test]
fn bpf_shared_structs_match_the_objects_btf() {
    let from_pod = object_structs(FROM_POD);
    let others = [
        object_structs(FROM_TUNNEL),
        object_structs(SK_LOOKUP),
        object_structs(NODE_CONNECT),
    ];
    let want = [
        (
            "pod_counters",
            layout_of!(PodCounters {
                packets,
                bytes,
                spoofed_packets,
                spoofed_bytes
            }),
        ),
        ("veil_pod", layout_of!(VeilPod { ipv4, flags })),
        (
            "veil_pod_port",
            layout_of!(PodPort {
                ipv4,
                port,
                reserved
            }),
        ),
        (
            "veil_spoof_event",
            layout_of!(RawSpoofEvent {
                ifindex,
                saddr,
                daddr,
                family,
                protocol,
                reserved
            }),
        ),
    ];
    for (name, rust) in want {
        assert_eq!(
            from_pod.get(name),
            Some(&rust),
            "struct {name} in from_pod.o"
        );
        // The other objects declare the same maps; where they carry a struct it must agree.
        for other in &others {
            if let Some(c) = other.get(name) {
                assert_eq!(c, &rust, "struct {name} in another object");
            }
        }
    }
}

#[test]
fn bpf_objects_hold_the_named_programs_and_every_map() {
    for (object, program) in [
        (FROM_POD, FROM_POD_PROGRAM),
        (FROM_TUNNEL, FROM_TUNNEL_PROGRAM),
        (SK_LOOKUP, SK_LOOKUP_PROGRAM),
        (NODE_CONNECT, NODE_CONNECT4_PROGRAM),
        (NODE_CONNECT, NODE_CONNECT6_PROGRAM),
    ] {
        assert_eq!(&object[..4], b"\x7fELF");
        // e_machine 247 is EM_BPF.
        assert_eq!(u16::from_le_bytes([object[18], object[19]]), 247);
        let parsed = aya_obj::Object::parse(object).expect("our object parses");
        assert!(parsed.programs.contains_key(program), "{program}");
        for map in ALL_MAPS {
            assert!(
                parsed.maps.contains_key(map),
                "{map} in the object of {program}"
            );
        }
    }
}

#[test]
fn bpf_constants_come_from_the_header() {
    assert_eq!(consts::UPSTREAM_MARK, 0x0a00);
    assert_eq!(consts::TO_PROXY_MARK, 0x0b00);
    assert_eq!(consts::UPSTREAM_MARK & !consts::MARK_MASK, 0);
    assert_eq!(consts::TO_PROXY_MARK & !consts::MARK_MASK, 0);
    assert_eq!(consts::NODE_MARK, 0x0c00);
    assert_eq!(consts::NODE_MARK & !consts::MARK_MASK, 0);
    assert_eq!(consts::COVERED_TABLE, 0x78);
    assert_eq!(consts::TO_PROXY_TABLE, 0x79);
}

#[test]
fn bpf_spoof_event_decodes_a_record() {
    let mut bytes = vec![0u8; SpoofEvent::SIZE + 4];
    bytes[..4].copy_from_slice(&7u32.to_ne_bytes());
    bytes[4..8].copy_from_slice(&[198, 18, 250, 9]);
    bytes[8..12].copy_from_slice(&[198, 18, 250, 3]);
    bytes[12] = consts::FAMILY_IPV4 as u8;
    bytes[13] = 6;
    assert_eq!(
        SpoofEvent::decode(&bytes),
        Some(SpoofEvent {
            ifindex: 7,
            family: SpoofedFamily::Ipv4 {
                src: Ipv4Addr::new(198, 18, 250, 9),
                dst: Ipv4Addr::new(198, 18, 250, 3)
            },
            protocol: 6
        })
    );
    assert_eq!(SpoofEvent::decode(&bytes[..SpoofEvent::SIZE - 1]), None);
    bytes[12] = 99;
    assert_eq!(SpoofEvent::decode(&bytes), None);
}

proptest! {
    #[test]
    fn bpf_spoof_event_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let event = SpoofEvent::decode(&bytes);
        if bytes.len() < SpoofEvent::SIZE {
            prop_assert_eq!(event, None);
        }
    }
}

#[test]
fn bpf_ipv4_keys_are_network_order() {
    let ip = Ipv4Addr::new(198, 18, 250, 2);
    assert_eq!(ipv4_key(ip).to_ne_bytes(), [198, 18, 250, 2]);
    assert_eq!(ipv4_from_key(ipv4_key(ip)), ip);
}

proptest! {
    #[test]
    fn bpf_pod_port_keys_hold_network_order_and_round_trip(a: u32, port: u16) {
        let ip = Ipv4Addr::from(a);
        let key = PodPort::new(ip, port);
        prop_assert_eq!(key.port.to_ne_bytes(), port.to_be_bytes());
        prop_assert_eq!(key.ipv4.to_ne_bytes(), ip.octets());
        prop_assert_eq!(key.endpoint(), (ip, port));
    }
}
