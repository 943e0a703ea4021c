//! A small TCP proxy on loopback for the etcd tests: the link between one rollcall server and
//! one etcd member, which a test can cut (every connection closed at once, new ones refused)
//! and restore, or on which it can hold back what etcd sends on watch streams (the server's
//! copy then lags while its other calls go through at full speed). A network fault, not a
//! mock: etcd and rollcall are the real ones on either side.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

struct State {
    target: SocketAddr,
    cut: AtomicBool,
    stop: AtomicBool,
    /// Milliseconds every chunk etcd sends on a watch stream is held back.
    watch_delay_ms: AtomicU64,
    /// Requests whose chunk holds `.0` are held back by `.1` on their way to etcd.
    hold_requests: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Both sockets of every open connection (to close them on a cut).
    conns: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` (`http://127.0.0.1:PORT` or
    /// `127.0.0.1:PORT`).
    pub fn start(target: &str) -> Proxy {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .parse()
            .expect("a loopback address:port");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            target,
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            watch_delay_ms: AtomicU64::new(0),
            hold_requests: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if st.stop.load(Relaxed) {
                    return;
                }
                let Ok(client) = c else { continue };
                if st.cut.load(Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(st.target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = st.conns.lock().unwrap();
                    conns.retain(|s| s.peer_addr().is_ok());
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                let watch = Arc::new(AtomicBool::new(false));
                // client -> etcd: marks the connection as a watch once it carries one.
                {
                    let (mut from, mut to) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let watch = watch.clone();
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if buf[..n].windows(9).any(|w| w == b"/v3/watch") {
                                watch.store(true, Relaxed);
                            }
                            let hold = st.hold_requests.lock().unwrap().clone();
                            if let Some((pat, d)) = hold {
                                if buf[..n].windows(pat.len()).any(|w| w == pat.as_slice()) {
                                    std::thread::sleep(d);
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                // etcd -> client: each chunk leaves `watch_delay_ms` after it arrived.
                {
                    let (mut from, mut to) = (server, client);
                    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                    });
                    let st = st.clone();
                    std::thread::spawn(move || {
                        for (at, data) in rx {
                            if watch.load(Relaxed) {
                                let hold = Duration::from_millis(st.watch_delay_ms.load(Relaxed));
                                let due = at + hold;
                                let now = Instant::now();
                                if due > now {
                                    std::thread::sleep(due - now);
                                }
                            }
                            if to.write_all(&data).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection now and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.cut.store(true, Relaxed);
        for s in self.state.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Relaxed);
    }

    /// Holds back requests whose path contains `path` (e.g. `/v3/lease/revoke`) by `d`.
    pub fn delay_requests(&self, path: &str, d: Duration) {
        *self.state.hold_requests.lock().unwrap() = Some((path.as_bytes().to_vec(), d));
    }

    /// Holds back what etcd sends on watch streams by `d` (zero: none).
    pub fn delay_watches(&self, d: Duration) {
        self.state
            .watch_delay_ms
            .store(d.as_millis() as u64, Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Relaxed);
        self.cut();
        let _ = TcpStream::connect(self.addr);
    }
}

/// One proxy per member of `endpoints` (comma-separated client URLs), and the endpoints
/// through them, in the same order.
pub fn proxies(endpoints: &str) -> (Vec<Proxy>, String) {
    let ps: Vec<Proxy> = endpoints.split(',').map(Proxy::start).collect();
    let eps = ps.iter().map(Proxy::url).collect::<Vec<_>>().join(",");
    (ps, eps)
}
