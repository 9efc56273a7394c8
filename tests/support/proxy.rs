//! A throttling HTTP/1.1 proxy in front of a real server: forwards each request as it is, paces
//! the response body, can cut the first `/file` response after N bytes, and records the status of
//! every upstream answer. Used to make a real Glance transfer slow enough to outlive a Keystone
//! token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct State {
    statuses: Vec<(String, u16)>,
    cut_first_file_after: Option<u64>,
}

#[derive(Clone)]
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Proxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT`), sending one 64 KiB chunk per `pace`.
    pub fn start(upstream: &str, pace: Duration, cut_first_file_after: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            cut_first_file_after,
            ..State::default()
        }));
        let up = upstream.trim_start_matches("http://").to_owned();
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (up, st) = (up.clone(), st.clone());
                thread::spawn(move || {
                    let _ = relay(conn, &up, &st, pace);
                });
            }
        });
        Proxy { url, state }
    }

    /// `(request line, upstream status)` of every request, in order.
    pub fn statuses(&self) -> Vec<(String, u16)> {
        self.state.lock().unwrap().statuses.clone()
    }
}

fn relay(
    client: TcpStream,
    upstream: &str,
    st: &Arc<Mutex<State>>,
    pace: Duration,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut request_line = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if request_line.is_empty() {
            request_line = line.trim().to_owned();
        }
        // One request per connection: ask both sides to close after it.
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut server = TcpStream::connect(upstream)?;
    server.write_all(&head)?;
    let mut resp = BufReader::new(server);
    let mut status_line = String::new();
    resp.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cut = {
        let mut s = st.lock().unwrap();
        s.statuses.push((request_line.clone(), status));
        if request_line.contains("/file") && status == 200 {
            s.cut_first_file_after.take()
        } else {
            None
        }
    };
    let mut out = client;
    out.write_all(status_line.as_bytes())?;
    loop {
        let mut line = String::new();
        if resp.read_line(&mut line)? == 0 {
            return Ok(());
        }
        out.write_all(line.as_bytes())?;
        if line == "\r\n" {
            break;
        }
    }
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Whole 64 KiB chunks (upstream reads can be much smaller), one per `pace`.
        let mut n = 0;
        while n < buf.len() {
            let k = resp.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            return Ok(());
        }
        thread::sleep(pace);
        out.write_all(&buf[..n])?;
        sent += n as u64;
        if cut.is_some_and(|c| sent >= c) {
            // Drop both connections mid-body.
            return Ok(());
        }
    }
}
