//! A Glance-shaped HTTP server with switches, for faults a real Glance will not produce on
//! demand: 503s, 429 with Retry-After, bodies cut short, ignored Range, 204, stalls, wrong
//! hashes. Serves one image; records every request.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What to do with the next `/file` request. Requests past the script are served normally.
#[derive(Debug, Clone)]
pub enum Action {
    /// Serve the data, honouring Range.
    Normal,
    /// Answer with this status and an empty body.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooMany(u64),
    /// Send headers for the full length, then only this many bytes, then close.
    CutAfter(u64),
    /// Answer a Range request with 200 and the whole body.
    IgnoreRange,
    /// 204 No Content.
    NoContent,
    /// Send headers and this many bytes, then stall for the duration before closing.
    StallAfter(u64, Duration),
    /// 302 to this absolute URL.
    Redirect(String),
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub body_bytes: u64,
    /// The `X-Auth-Token` the request carried.
    pub token: Option<String>,
}

/// The image the server serves.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub data: Vec<u8>,
    pub status: String,
    pub disk_format: String,
    /// `(algo, hex)` sent as os_hash; `None` sends nulls (then `checksum` is used).
    pub os_hash: Option<(String, String)>,
    pub checksum: Option<String>,
    /// Size sent in the record (defaults to the data length).
    pub size: u64,
    /// Serve this image under any id (each request's id is echoed in the record).
    pub any_id: bool,
    /// `direct_url` in the record, if any.
    pub direct_url: Option<String>,
    /// Send `"size": null` in the record.
    pub null_size: bool,
    /// Send this id in the record instead of the image's.
    pub record_id: Option<String>,
    /// Extra record fields (kernel_id, ...).
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// Send this instead of the record.
    pub record_body: Option<String>,
}

impl Image {
    /// A raw active image whose record matches its data (sha512 + md5).
    pub fn raw(id: &str, data: Vec<u8>) -> Image {
        Image {
            id: id.into(),
            os_hash: Some(("sha512".into(), super::sha512_hex(&data))),
            checksum: Some(super::md5_hex(&data)),
            size: data.len() as u64,
            data,
            status: "active".into(),
            disk_format: "raw".into(),
            any_id: false,
            direct_url: None,
            null_size: false,
            record_id: None,
            properties: serde_json::Map::new(),
            record_body: None,
        }
    }
}

struct State {
    /// The image without its data, which is shared: a request never copies it (images of a
    /// GiB, mostly zeros that were never touched, stay cheap).
    image: Image,
    data: Arc<Vec<u8>>,
    script: VecDeque<Action>,
    seen: Vec<Seen>,
    /// Sleep between 64 KiB chunks, to make a transfer slow enough to interrupt.
    pace: Option<Duration>,
}

/// The running server; it lives until the test process ends.
#[derive(Clone)]
pub struct FaultServer {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FaultServer {
    pub fn start(mut image: Image) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let data = Arc::new(std::mem::take(&mut image.data));
        let state = Arc::new(Mutex::new(State {
            image,
            data,
            script: VecDeque::new(),
            seen: Vec::new(),
            pace: None,
        }));
        let s = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        FaultServer { url, state }
    }

    /// Queues actions for the next `/file` requests.
    pub fn script(&self, actions: impl IntoIterator<Item = Action>) {
        self.state.lock().unwrap().script.extend(actions);
    }

    /// Slows data down: one 64 KiB chunk per `pace`.
    pub fn pace(&self, pace: Option<Duration>) {
        self.state.lock().unwrap().pace = pace;
    }

    /// Every request, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests for the image data, in order.
    pub fn file_requests(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.path.ends_with("/file"))
            .cloned()
            .collect()
    }
}

fn serve(conn: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    let mut token = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_owned());
            } else if k.eq_ignore_ascii_case("x-auth-token") {
                token = Some(v.trim().to_owned());
            }
        }
    }
    let mut out = conn;
    // Logged on arrival (in arrival order); status and bytes are filled in when done.
    let index = {
        let mut st = state.lock().unwrap();
        st.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
            status: 0,
            body_bytes: 0,
            token,
        });
        st.seen.len() - 1
    };
    let (image, action, pace, data) = {
        let mut st = state.lock().unwrap();
        let action = if path.ends_with("/file") {
            st.script.pop_front().unwrap_or(Action::Normal)
        } else {
            Action::Normal
        };
        (st.image.clone(), action, st.pace, st.data.clone())
    };
    let mut image = image;
    if image.any_id
        && let Some(id) = path
            .strip_prefix("/v2/images/")
            .map(|rest| rest.trim_end_matches("/file"))
    {
        image.id = id.to_owned();
    }
    let record_path = format!("/v2/images/{}", image.id);
    let (status, sent) = if path == record_path {
        let body = image
            .record_body
            .clone()
            .unwrap_or_else(|| record_json(&image));
        respond(
            &mut out,
            200,
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
            None,
            None,
        )?
    } else if path == format!("{record_path}/file") {
        serve_file(&mut out, &data, range.as_deref(), action, pace)?
    } else {
        respond(&mut out, 404, &[], b"not found", None, None)?
    };
    let mut st = state.lock().unwrap();
    st.seen[index].status = status;
    st.seen[index].body_bytes = sent;
    Ok(())
}

fn serve_file(
    out: &mut TcpStream,
    data: &[u8],
    range: Option<&str>,
    action: Action,
    pace: Option<Duration>,
) -> std::io::Result<(u16, u64)> {
    let total = data.len() as u64;
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    match action {
        Action::Status(code) => return respond(out, code, &[], b"", None, None),
        Action::TooMany(secs) => {
            return respond(
                out,
                429,
                &[("Retry-After", secs.to_string())],
                b"",
                None,
                None,
            );
        }
        Action::NoContent => return respond(out, 204, &[], b"", None, None),
        Action::Redirect(to) => {
            return respond(out, 302, &[("Location", to.clone())], b"", None, None);
        }
        _ => {}
    }
    let (code, from) = match (start, &action) {
        (Some(s), a) if !matches!(a, Action::IgnoreRange) && s < total => (206, s),
        (Some(_), a) if !matches!(a, Action::IgnoreRange) => {
            return respond(out, 416, &[], b"", None, None);
        }
        _ => (200, 0),
    };
    let body = &data[from as usize..];
    let mut headers = vec![("Content-Type", "application/octet-stream".to_owned())];
    if code == 206 {
        headers.push((
            "Content-Range",
            format!("bytes {from}-{}/{total}", total - 1),
        ));
    }
    let (limit, stall) = match action {
        Action::CutAfter(n) => (Some(n), None),
        Action::StallAfter(n, d) => (Some(n), Some(d)),
        _ => (None, None),
    };
    let (_, sent) = respond(out, code, &headers, body, limit, pace)?;
    if let Some(d) = stall {
        // Keep the connection open and silent.
        thread::sleep(d);
    }
    Ok((code, sent))
}

/// Writes a response with `Content-Length` of the whole body, sending at most `limit` bytes.
fn respond(
    out: &mut TcpStream,
    code: u16,
    headers: &[(&str, String)],
    body: &[u8],
    limit: Option<u64>,
    pace: Option<Duration>,
) -> std::io::Result<(u16, u64)> {
    let mut head = format!("HTTP/1.1 {code} X\r\nConnection: close\r\n");
    if code != 204 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    let n = limit.map_or(body.len(), |l| (l as usize).min(body.len()));
    let mut sent = 0u64;
    for chunk in body[..n].chunks(64 * 1024) {
        if let Some(p) = pace {
            thread::sleep(p);
        }
        if out.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
    }
    out.flush()?;
    Ok((code, sent))
}

fn record_json(image: &Image) -> String {
    let (algo, value) = match &image.os_hash {
        Some((a, v)) => (serde_json::json!(a), serde_json::json!(v)),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let mut record = serde_json::json!({
        "id": image.record_id.as_ref().unwrap_or(&image.id),
        "name": "fault-image",
        "status": image.status,
        "disk_format": image.disk_format,
        "container_format": "bare",
        "size": if image.null_size { None } else { Some(image.size) },
        "virtual_size": image.size,
        "checksum": image.checksum,
        "os_hash_algo": algo,
        "os_hash_value": value,
        "visibility": "public",
        "direct_url": image.direct_url,
    });
    if let Some(obj) = record.as_object_mut() {
        obj.extend(image.properties.clone());
    }
    record.to_string()
}
