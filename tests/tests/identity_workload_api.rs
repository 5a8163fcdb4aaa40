//! The SPIFFE Workload API checked with a real client: the `spiffe` crate's `X509Source`
//! (and its `WorkloadApiClient`) run in processes inside two pod network namespaces,
//! fetch their SVID and bundle, and see a rotation arrive on the stream. Each gets its
//! own pod's identity, never its neighbour's; a process in no pod gets nothing; and a
//! connection handed on to another process gets nothing once its opener has exited, even
//! when the opener's PID is recycled into a pod (issue 11).
//!
//! The processes are this test binary re-run under `ip netns exec` (SO_PEERCRED names a
//! process, and `/proc/<pid>/ns/net` is its main thread's namespace, so the client must
//! be its own process for netns attestation to see it).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use veil_identity::bundle::CaSet;
use veil_identity::ca::{CertificateAuthority, DEFAULT_CA_LIFETIME};
use veil_identity::client::{ClientError, PodRef};
use veil_identity::manager::{SvidManager, SvidSource};
use veil_identity::peer::start_time;
use veil_identity::svid::new_key_and_csr;
use veil_identity::tls::CertificateDer;
use veil_identity::workload_api::{self, NetnsAttestor, WorkloadApi};
use veil_identity::{trust_domain, workload_id, Svid};
use veil_testbed::net::{child_field, Netns};

const SOCKET_ENV: &str = "VEIL_IDENTITY_TEST_SOCKET";
/// SVID lifetime in this test: short, so a renewal (at half-life) arrives within seconds.
const TTL: Duration = Duration::from_secs(6);

/// Signs with an in-process CA: the issuer's signing path without the API server (the
/// issuer itself is tested against the real one in identity_issuer.rs).
struct DirectCa(CertificateAuthority);

#[veil_identity::async_trait]
impl SvidSource for DirectCa {
    async fn fetch(
        &self,
        pod: &PodRef,
    ) -> Result<(Svid, Vec<CertificateDer<'static>>), ClientError> {
        let id = workload_id(self.0.trust_domain(), &pod.namespace, &pod.service_account).unwrap();
        let (key, csr) = new_key_and_csr().unwrap();
        let cert = self.0.sign_csr(&csr, &id, TTL, SystemTime::now()).unwrap();
        Ok((
            Svid::new(vec![cert], key.serialize_der()).unwrap(),
            vec![self.0.cert_der().clone()],
        ))
    }
}

/// The client side, run as a child process inside a pod's namespace.
#[test]
#[ignore = "run by identity_workload_api_serves_each_pod_its_own_svid in a pod namespace"]
fn identity_workload_api_child() {
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = format!("unix:{socket}");
        let source = spiffe::X509Source::builder()
            .endpoint(&endpoint)
            .build()
            .await
            .expect("X509Source syncs");
        let first = source.svid().unwrap();
        println!("SPIFFE_ID={}", first.spiffe_id());
        let bundles = source.bundle_set().unwrap();
        let td = first.spiffe_id().trust_domain().clone();
        let bundle = bundles.get(&td).expect("bundle for own trust domain");
        println!("BUNDLE_ROOTS={}", bundle.authorities().len());

        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .unwrap();
        let direct = client.fetch_x509_bundles().await.unwrap();
        println!("DIRECT_BUNDLES={}", direct.len());

        // The rotation arrives on the stream, before the first SVID expires.
        let mut updates = source.updated();
        let rotated = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                updates.changed().await.unwrap();
                let now = source.svid().unwrap();
                if now.leaf().as_bytes() != first.leaf().as_bytes() {
                    return now;
                }
            }
        })
        .await
        .expect("rotation within 20 s");
        let first_end = veil_identity::parse_svid(first.leaf().as_bytes())
            .unwrap()
            .not_after;
        assert!(
            SystemTime::now() < first_end,
            "renewed SVID served before the old one expired"
        );
        println!("ROTATED_ID={}", rotated.spiffe_id());
    });
}

/// Two pod namespaces, `shop/a` (ServiceAccount alice) and `shop/b` (bob), and a
/// Workload API server for them on `socket`, signing with an in-process CA.
struct TwoPods {
    ns_a: Netns,
    ns_b: Netns,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl TwoPods {
    /// `suffix` keeps namespace names apart between tests of this binary.
    fn start(rt: &tokio::runtime::Runtime, suffix: &str) -> TwoPods {
        let td = trust_domain("cluster.local").unwrap();
        let ca =
            CertificateAuthority::generate(&td, DEFAULT_CA_LIFETIME, SystemTime::now()).unwrap();
        let bundle =
            CaSet::new(CertificateAuthority::from_pem(&td, ca.cert_pem(), ca.key_pem()).unwrap())
                .bundle();
        let tag = std::process::id() % 100_000;
        let ns_a = Netns::create(&format!("veilid{tag}a{suffix}")).unwrap();
        let ns_b = Netns::create(&format!("veilid{tag}b{suffix}")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("workload.sock");

        let attestor = NetnsAttestor::new();
        attestor
            .register(&ns_a.path(), ("shop".into(), "a".into()))
            .unwrap();
        attestor
            .register(&ns_b.path(), ("shop".into(), "b".into()))
            .unwrap();
        let (stop, server) = rt.block_on(async {
            let manager = SvidManager::new(Arc::new(DirectCa(ca)), bundle);
            for (name, sa) in [("a", "alice"), ("b", "bob")] {
                manager.pod_added(PodRef {
                    namespace: "shop".into(),
                    name: name.into(),
                    uid: String::new(),
                    service_account: sa.into(),
                });
            }
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let server = workload_api::serve(
                &socket,
                WorkloadApi::new(manager, attestor.clone()),
                async {
                    let _ = rx.await;
                },
            )
            .unwrap();
            (tx, server)
        });
        TwoPods {
            ns_a,
            ns_b,
            socket,
            _dir: dir,
            _stop: stop,
            server,
        }
    }
}

impl Drop for TwoPods {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn run_child(ns: &Netns, socket: &Path) -> String {
    ns.run_test_child(
        "identity_workload_api_child",
        &[(SOCKET_ENV, socket.as_os_str())],
    )
}

#[test]
fn identity_workload_api_serves_each_pod_its_own_svid() {
    veil_testbed::require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bed = TwoPods::start(&rt, "");
    let (ns_a, ns_b, socket) = (&bed.ns_a, &bed.ns_b, &bed.socket);

    // Both pods at once, each in its own namespace.
    let (out_a, out_b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_child(ns_a, socket));
        let b = s.spawn(|| run_child(ns_b, socket));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        child_field(&out_a, "SPIFFE_ID"),
        "spiffe://cluster.local/ns/shop/sa/alice"
    );
    assert_eq!(
        child_field(&out_a, "ROTATED_ID"),
        "spiffe://cluster.local/ns/shop/sa/alice"
    );
    assert_eq!(
        child_field(&out_b, "SPIFFE_ID"),
        "spiffe://cluster.local/ns/shop/sa/bob"
    );
    assert_eq!(
        child_field(&out_b, "ROTATED_ID"),
        "spiffe://cluster.local/ns/shop/sa/bob"
    );
    for out in [&out_a, &out_b] {
        assert_eq!(child_field(out, "BUNDLE_ROOTS"), "1");
        assert_eq!(child_field(out, "DIRECT_BUNDLES"), "1");
    }

    // This process runs in no pod: refused.
    let err = rt.block_on(veil_testbed::issuer::workload_api_refusal(socket));
    assert!(err.contains("PermissionDenied"), "{err}");
}

// --- A connection handed on after its opener exits (issue 11, PID reuse) ---

/// The hand-off socket between the two processes of the hand-off test.
const HANDOFF_ENV: &str = "VEIL_IDENTITY_TEST_HANDOFF";
/// The namespace of pod 1 (`shop/a`), whose processes the handed-on connection must not
/// be mistaken for.
const POD1_NETNS_ENV: &str = "VEIL_IDENTITY_TEST_POD1_NETNS";
/// How long either side of the hand-off waits for the other.
const HANDOFF_DEADLINE: Duration = Duration::from_secs(30);

/// Sends `fd` and `pid` over `sock` (SCM_RIGHTS).
fn send_fd(sock: &std::os::unix::net::UnixStream, fd: RawFd, pid: u32) -> std::io::Result<()> {
    let mut data = pid.to_ne_bytes();
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr points at live buffers for the whole call; the cmsg header and data
    // are written inside `control`, which CMSG_SPACE sized for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives what [`send_fd`] sent: the descriptor and the sender's PID.
fn recv_fd(sock: &std::os::unix::net::UnixStream) -> std::io::Result<(OwnedFd, u32)> {
    let mut data = [0u8; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in send_fd; the descriptor read from the cmsg is new and ours.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n != data.len() as isize {
            return Err(std::io::Error::other(format!("recvmsg returned {n}")));
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("no descriptor received"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok((OwnedFd::from_raw_fd(fd), u32::from_ne_bytes(data)))
    }
}

fn netns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Process A, in pod 1: opens a Workload API connection, hands it and its PID to B, and
/// exits once B has it.
#[test]
#[ignore = "run by hardening_workload_api_connection_handed_on_after_owner_exits_gets_no_svid"]
fn identity_workload_api_handoff_giver() {
    let (Ok(socket), Ok(handoff)) = (std::env::var(SOCKET_ENV), std::env::var(HANDOFF_ENV)) else {
        return;
    };
    let conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let to_b = veil_testbed::eventually("B listens for the hand-off", HANDOFF_DEADLINE, || {
        Ok(std::os::unix::net::UnixStream::connect(&handoff).ok())
    })
    .unwrap();
    send_fd(&to_b, conn.as_raw_fd(), std::process::id()).unwrap();
    // B closes its end once it holds the connection.
    let mut rest = Vec::new();
    let _ = (&to_b).read_to_end(&mut rest);
    println!("GIVER_PID={}", std::process::id());
}

/// Process B, in pod 2: takes the connection A hands on, waits until A has exited and
/// its PID names a process in pod 1, then asks for an SVID on A's connection and on a
/// fresh one of its own.
#[test]
#[ignore = "run by hardening_workload_api_connection_handed_on_after_owner_exits_gets_no_svid"]
fn identity_workload_api_handoff_taker() {
    let (Ok(socket), Ok(handoff), Ok(pod1)) = (
        std::env::var(SOCKET_ENV),
        std::env::var(HANDOFF_ENV),
        std::env::var(POD1_NETNS_ENV),
    ) else {
        return;
    };
    let listener = std::os::unix::net::UnixListener::bind(&handoff).unwrap();
    let (from_a, _) = listener.accept().unwrap();
    let (fd, giver) = recv_fd(&from_a).unwrap();
    // A waits for this end to close, so it is alive here.
    let giver_started = start_time(giver as i32).unwrap();
    drop(from_a);
    let pod1 = netns_id(Path::new(&pod1)).unwrap();
    veil_testbed::eventually(
        "A has exited and its PID runs another process in pod 1",
        HANDOFF_DEADLINE,
        || {
            let other = start_time(giver as i32).is_ok_and(|t| t != giver_started);
            let in_pod1 = netns_id(Path::new(&format!("/proc/{giver}/ns/net"))) == Some(pod1);
            Ok((other && in_pod1).then_some(()))
        },
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = format!("unix:{socket}");
        let handed = std::os::unix::net::UnixStream::from(fd);
        handed.set_nonblocking(true).unwrap();
        let slot = std::sync::Mutex::new(Some(tokio::net::UnixStream::from_std(handed).unwrap()));
        let slot = Arc::new(slot);
        let channel = tonic::transport::Endpoint::from_static("http://handed-on")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = slot.lock().unwrap().take();
                async move {
                    io.map(hyper_util::rt::TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("the handed-on connection is used up"))
                }
            }))
            .await
            .unwrap();
        let client = spiffe::WorkloadApiClient::new_with_channel(
            spiffe::transport::Endpoint::parse(&endpoint).unwrap(),
            channel,
        );
        match client.fetch_x509_svid().await {
            Ok(svid) => println!("HANDED_ON=SVID {}", svid.spiffe_id()),
            Err(e) => println!("HANDED_ON=REFUSED {e:?}"),
        }
        let own = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .unwrap();
        let svid = own.fetch_x509_svid().await.unwrap();
        println!("FRESH_ID={}", svid.spiffe_id());
    });
}

/// A process with exactly PID `pid` (clone3 `set_tid`, root only) that sleeps in the
/// network namespace `netns`: the kernel recycling a PID, made deterministic. Returns
/// its PID; the caller kills and reaps it.
fn recycle_pid_into(pid: i32, netns: &Path) -> std::io::Result<i32> {
    let ns = std::fs::File::open(netns)?;
    let prog = std::ffi::CString::new("/bin/sleep").unwrap();
    let arg = std::ffi::CString::new("300").unwrap();
    let argv = [prog.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let tids = [pid as libc::pid_t];
    // SAFETY: clone3 without CLONE_VM is a fork; the child only makes raw syscalls
    // (setns, prctl, execv, _exit) on memory prepared before the call.
    unsafe {
        let mut args: libc::clone_args = std::mem::zeroed();
        args.exit_signal = libc::SIGCHLD as u64;
        args.set_tid = tids.as_ptr() as u64;
        args.set_tid_size = 1;
        let r = libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        );
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r == 0 {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::execv(prog.as_ptr(), argv.as_ptr());
            }
            libc::_exit(127);
        }
        Ok(r as i32)
    }
}

/// Issue 11: a Workload API connection is bound to the process that opened it. A (pod 1)
/// connects and hands the connection to B (pod 2), then exits; its PID is then taken by
/// a process in pod 1 (as the kernel may recycle it). Before, attestation read
/// `/proc/<SO_PEERCRED pid>/ns/net` per call, so B got pod 1's SVID; now the pidfd
/// shows the opener gone and B gets PermissionDenied, while B's own connection still
/// gets pod 2's SVID.
#[test]
fn hardening_workload_api_connection_handed_on_after_owner_exits_gets_no_svid() {
    veil_testbed::require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bed = TwoPods::start(&rt, "h");
    let handoff = bed.socket.with_file_name("handoff.sock");
    let pod1 = bed.ns_a.path();
    let taker_env = [
        (SOCKET_ENV, bed.socket.as_os_str()),
        (HANDOFF_ENV, handoff.as_os_str()),
        (POD1_NETNS_ENV, pod1.as_os_str()),
    ];
    let giver_env = [
        (SOCKET_ENV, bed.socket.as_os_str()),
        (HANDOFF_ENV, handoff.as_os_str()),
    ];
    let (taker_out, recycled) = std::thread::scope(|s| {
        let taker = s.spawn(|| {
            bed.ns_b
                .run_test_child("identity_workload_api_handoff_taker", &taker_env)
        });
        let giver_out = bed
            .ns_a
            .run_test_child("identity_workload_api_handoff_giver", &giver_env);
        // A has exited and been reaped: a process in pod 1 takes its PID.
        let giver: i32 = child_field(&giver_out, "GIVER_PID").trim().parse().unwrap();
        let recycled = recycle_pid_into(giver, &pod1).expect("clone3 with set_tid");
        (taker.join().unwrap(), recycled)
    });
    // SAFETY: kill and reap our own child.
    unsafe {
        libc::kill(recycled, libc::SIGKILL);
        libc::waitpid(recycled, std::ptr::null_mut(), 0);
    }
    let handed_on = child_field(&taker_out, "HANDED_ON");
    assert!(
        handed_on.starts_with("REFUSED") && handed_on.contains("PermissionDenied"),
        "the handed-on connection must get no SVID once its opener exited: {handed_on}"
    );
    assert!(handed_on.contains("exited"), "{handed_on}");
    assert_eq!(
        child_field(&taker_out, "FRESH_ID"),
        "spiffe://cluster.local/ns/shop/sa/bob"
    );
}
