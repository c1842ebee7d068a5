//! A small HTTP/1.1 client for the CLI's calls to the local node (no TLS: loopback only).

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// An answer: status code and JSON body (`Value::Null` when the body is empty).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// Sends `method path` with an optional JSON body and bearer token to 127.0.0.1:`port`.
pub fn call(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("no node answering on 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(payload.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("malformed HTTP status line {line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut raw = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).context("malformed chunk size")?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            raw.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = length {
        raw.resize(n, 0);
        r.read_exact(&mut raw)?;
    } else {
        r.read_to_end(&mut raw)?;
    }
    let body = if raw.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&raw) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&raw).into_owned()),
        }
    };
    Ok(Answer { status, body })
}

/// As [`call`], failing with the contract error's message on a non-2xx answer.
pub fn call_ok(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let a = call(port, method, path, token, body)?;
    if !(200..300).contains(&a.status) {
        let e = &a.body["error"];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(code), Some(msg)) => bail!("{code}: {msg} (HTTP {})", a.status),
            _ => bail!("HTTP {}: {}", a.status, a.body),
        }
    }
    Ok(a.body)
}
