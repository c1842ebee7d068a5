//! The CLI's calls to the local node: `reqwest`'s blocking client over loopback (no proxy).
//! The operator commands run before any runtime exists, so the blocking client (which drives
//! its own) is simpler than building one for a single request. A node that serves HTTPS
//! (bound beyond loopback) is called over https, trusting only the certificate the daemon
//! serves ([`Endpoint::local`]).

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

/// How long one call may take, connection to last byte.
const TIMEOUT: Duration = Duration::from_secs(30);

/// An answer: status code and JSON body (`Value::Null` when the body is empty, a string when
/// it is not JSON).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// Where the local node answers: its port on 127.0.0.1, over https pinned to one certificate
/// (its SHA-256) when `pin` is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Endpoint {
    pub port: u16,
    pub pin: Option<[u8; 32]>,
}

impl Endpoint {
    /// Plain HTTP on `port`.
    pub fn plain(port: u16) -> Endpoint {
        Endpoint { port, pin: None }
    }

    /// The node of `data_dir` on `port`: https pinned to the certificate its daemon serves
    /// when it wrote one (`crate::tls::SERVED_FILE`), plain HTTP otherwise.
    pub fn local(data_dir: &std::path::Path, port: u16) -> anyhow::Result<Endpoint> {
        let served = data_dir.join(crate::tls::SERVED_FILE);
        if !served.exists() {
            return Ok(Endpoint::plain(port));
        }
        let chain = crate::tls::read_chain(&served)?;
        Ok(Endpoint {
            port,
            pin: Some(crate::tls::sha256(&chain[0])),
        })
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.pin.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }
}

/// Sends `method path` with an optional JSON body and bearer token to the node at `node`.
pub fn call(
    node: &Endpoint,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let port = node.port;
    let mut builder = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT);
    if let Some(pin) = node.pin {
        builder = builder.use_preconfigured_tls(crate::tls::pinned_client(pin)?);
    }
    let http = builder.build()?;
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut request = http.request(method, node.url(path));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.json(b);
    }
    let answer = request.send().map_err(|e| unreachable_node(e, port))?;
    let status = answer.status().as_u16();
    let raw = answer.bytes()?;
    Ok(Answer {
        status,
        body: parse_body(&raw),
    })
}

/// A failed connection reads "no node answering on 127.0.0.1:PORT" caused by the socket's own
/// error (e.g. "Connection refused (os error 111)"); any other failure is reqwest's error.
fn unreachable_node(e: reqwest::Error, port: u16) -> anyhow::Error {
    if !e.is_connect() {
        return e.into();
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            let io = match io.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(io.kind(), io.to_string()),
            };
            return anyhow::Error::new(io)
                .context(format!("no node answering on 127.0.0.1:{port}"));
        }
        cause = c.source();
    }
    anyhow::Error::new(e).context(format!("no node answering on 127.0.0.1:{port}"))
}

fn parse_body(raw: &[u8]) -> Value {
    if raw.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(raw).into_owned()))
}

/// As [`call`], failing with the contract error's message on a non-2xx answer.
pub fn call_ok(
    node: &Endpoint,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let a = call(node, method, path, token, body)?;
    if !(200..300).contains(&a.status) {
        let e = &a.body["error"];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(code), Some(msg)) => bail!("{code}: {msg} (HTTP {})", a.status),
            _ => bail!("HTTP {}: {}", a.status, a.body),
        }
    }
    Ok(a.body)
}

/// `GET path` with a bearer token for a download: no limit on the whole transfer (a model
/// can take minutes), 10 s to connect. Fails with the contract error's message on a non-2xx
/// answer; otherwise the answer, its body unread.
pub fn download(
    node: &Endpoint,
    path: &str,
    token: &str,
) -> anyhow::Result<reqwest::blocking::Response> {
    let mut builder = reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .timeout(None);
    if let Some(pin) = node.pin {
        builder = builder.use_preconfigured_tls(crate::tls::pinned_client(pin)?);
    }
    let answer = builder
        .build()?
        .get(node.url(path))
        .bearer_auth(token)
        .send()
        .map_err(|e| unreachable_node(e, node.port))?;
    let status = answer.status().as_u16();
    if !(200..300).contains(&status) {
        let body = parse_body(&answer.bytes()?);
        let e = &body["error"];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(code), Some(msg)) => bail!("{code}: {msg} (HTTP {status})"),
            _ => bail!("HTTP {status}: {body}"),
        }
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_text_or_null() {
        assert_eq!(parse_body(b""), Value::Null);
        assert_eq!(parse_body(br#"{"a":1}"#)["a"], 1);
        assert_eq!(parse_body(b"plain"), Value::String("plain".into()));
    }

    #[test]
    fn no_node_names_the_port_and_the_socket_error() {
        // A port that was just free: nothing listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let err = call(&Endpoint::plain(port), "GET", "/api/v1/status", None, None)
            .err()
            .unwrap();
        let refused = std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED);
        // What `main` prints: the message, then "Caused by:" and the socket's error.
        let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
        assert_eq!(
            chain,
            [
                format!("no node answering on 127.0.0.1:{port}"),
                refused.to_string()
            ]
        );
    }

    /// Serves one canned answer on a fresh port; the request it read comes back on join.
    fn serve_once(answer: impl Into<String>) -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let answer: String = answer.into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 4096];
            // Head, then the body its Content-Length announces.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            let head = text.find("\r\n\r\n").unwrap() + 4;
            while request.len() < head + length {
                let n = s.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(request).unwrap()
        });
        (port, server)
    }

    #[test]
    fn sends_token_and_json_and_renders_contract_errors() {
        let body = r#"{"error":{"code":"NOT_FOUND","message":"no such route"}}"#;
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (port, server) = serve_once(answer);
        let sent = serde_json::json!({"amount": 1.5});
        let err = call_ok(
            &Endpoint::plain(port),
            "POST",
            "/api/v1/x?limit=3",
            Some("nst_t"),
            Some(&sent),
        )
        .err()
        .unwrap();
        assert_eq!(err.to_string(), "NOT_FOUND: no such route (HTTP 404)");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /api/v1/x?limit=3 HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains("authorization: bearer nst_t\r\n"),
            "{request}"
        );
        assert!(
            lower.contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with(r#"{"amount":1.5}"#), "{request}");
    }

    #[test]
    fn other_errors_show_status_and_body_and_chunks_are_read() {
        let (port, server) = serve_once(
            "HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n4\r\n gw!\r\n0\r\n\r\n",
        );
        let err = call_ok(&Endpoint::plain(port), "GET", "/", None, None)
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "HTTP 502: \"bad gw!\"");
        let request = server.join().unwrap();
        assert!(
            !request.to_ascii_lowercase().contains("authorization"),
            "{request}"
        );
        let (port, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(
            call_ok(&Endpoint::plain(port), "DELETE", "/", None, None).unwrap(),
            Value::Null
        );
        server.join().unwrap();
    }
}
