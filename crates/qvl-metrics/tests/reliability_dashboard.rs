//! "Lets no one in": the dashboard binds loopback unless told otherwise,
//! answers every method but GET and HEAD with 405 on every path, keeps its
//! security headers on every answer (errors included), serves no file
//! outside its routes, and survives malformed and oversized requests and
//! many clients at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_core::{MetricEvent, MetricsRecorder, Tier};
use qvl_metrics::{Collector, Dashboard, DashboardConfig, MetricsConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn start() -> (Arc<Collector>, qvl_metrics::DashboardHandle) {
    let collector = Arc::new(Collector::new());
    collector.record(&MetricEvent::Memory {
        tier: Tier::HostRam,
        allocated: 1 << 20,
        reserved: 2 << 20,
    });
    let config = DashboardConfig {
        port: 0,
        ..DashboardConfig::default()
    };
    let handle = Dashboard::serve(Arc::clone(&collector), config.socket_addr(), config).unwrap();
    (collector, handle)
}

/// Sends `raw` and returns the status and headers of the answer, or None
/// when the server closed the connection without one.
/// With `half_close` the write side is shut after `raw` (for malformed
/// requests, so that a server waiting for more sees the end; hyper then
/// may close without answering, which is fine).
fn exchange(
    addr: SocketAddr,
    raw: &[u8],
    half_close: bool,
) -> Option<(u16, Vec<(String, String)>)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close before reading everything (an oversized head):
    // a failed write is an answer too.
    let _ = s.write_all(raw);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    Some((status, headers))
}

fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<(String, String)>) {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    exchange(addr, raw.as_bytes(), false).expect("no answer")
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn assert_hardened(what: &str, headers: &[(String, String)]) {
    let csp =
        header(headers, "content-security-policy").unwrap_or_else(|| panic!("{what}: no CSP"));
    assert!(csp.contains("default-src 'self'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-"), "{what}: {csp}");
    assert_eq!(
        header(headers, "x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(header(headers, "cache-control"), Some("no-store"), "{what}");
    assert!(
        header(headers, "access-control-allow-origin").is_none(),
        "{what}: CORS opened"
    );
}

#[test]
fn binds_loopback_by_default() {
    assert!(DashboardConfig::default().bind.is_loopback());
    assert!(MetricsConfig::default().dashboard.bind.is_loopback());
    let (_c, handle) = start();
    assert!(handle.local_addr().ip().is_loopback());
    handle.shutdown().unwrap();
}

#[test]
fn no_method_but_get_and_head_is_accepted_anywhere() {
    let (_c, handle) = start();
    let addr = handle.local_addr();
    let paths = ["/", "/metrics", "/api/snapshot", "/events", "/nope", "/api"];
    let methods = [
        "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND",
    ];
    let mut answers = 0;
    for path in paths {
        for method in methods {
            let (status, headers) = get(addr, method, path);
            assert!(
                status == 405 || status == 404 || status == 400 || status == 501,
                "{method} {path} answered {status}"
            );
            assert_hardened(&format!("{method} {path}"), &headers);
            answers += 1;
        }
        let (status, headers) = get(addr, "HEAD", path);
        assert!(status == 200 || status == 404, "HEAD {path}: {status}");
        assert_hardened(&format!("HEAD {path}"), &headers);
    }
    assert_eq!(answers, paths.len() * methods.len());
    // A CORS preflight opens nothing.
    let raw = format!("OPTIONS /api/snapshot HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n");
    let (status, headers) = exchange(addr, raw.as_bytes(), false).unwrap();
    assert_ne!(status / 100, 2, "preflight answered {status}");
    assert_hardened("preflight", &headers);
    handle.shutdown().unwrap();
}

#[test]
fn path_tricks_serve_no_file() {
    let (_c, handle) = start();
    let addr = handle.local_addr();
    for path in [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/../../Cargo.toml",
        "//etc/passwd",
        "/metrics/../../etc/shadow",
        "/api/snapshot%00.html",
        "/dashboard.js/..%2f..%2fCargo.toml",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut all = String::new();
        let _ = s.read_to_string(&mut all);
        assert!(!all.contains("root:"), "{path} leaked /etc/passwd");
        assert!(!all.contains("[workspace]"), "{path} leaked a file");
        let status: u16 = all.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
        assert!(
            status == 404 || status == 400 || status == 200,
            "{path}: {status}"
        );
        if status == 200 {
            // Only a normalized route may answer, never a file.
            assert!(!all.contains("passwd") && !all.contains("shadow"), "{path}");
        }
    }
    handle.shutdown().unwrap();
}

#[test]
fn malformed_and_oversized_requests_leave_the_server_serving() {
    let (_c, handle) = start();
    let addr = handle.local_addr();
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
        (0..2000)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let long_path = format!(
        "GET /{} HTTP/1.1\r\nHost: {addr}\r\n\r\n",
        "x".repeat(200_000)
    );
    let bad: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02garbage\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"POST /api/snapshot HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\nabc".to_vec(),
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        huge_header.into_bytes(),
        many_headers.into_bytes(),
        long_path.into_bytes(),
        vec![0xff; 70_000],
    ];
    for raw in &bad {
        if let Some((status, headers)) = exchange(addr, raw, true) {
            assert!(
                (400..500).contains(&status) || status == 505,
                "malformed request answered {status}"
            );
            // hyper answers its own parse errors before any middleware;
            // when the app answered, the headers are there.
            if header(&headers, "content-security-policy").is_some() {
                assert_hardened("malformed", &headers);
            }
        }
        let (status, headers) = get(addr, "GET", "/api/snapshot");
        assert_eq!(
            status, 200,
            "the server stopped serving after a bad request"
        );
        assert_hardened("after a bad request", &headers);
    }
    handle.shutdown().unwrap();
}

#[test]
fn many_clients_at_once_are_all_served() {
    let (_c, handle) = start();
    let addr = handle.local_addr();
    let ok = std::thread::scope(|s| {
        let workers: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(move || {
                    (0..10)
                        .filter(|_| get(addr, "GET", "/api/snapshot").0 == 200)
                        .count()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .sum::<usize>()
    });
    assert_eq!(ok, 160);
    // Idle half-open connections do not block shutdown.
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    handle.shutdown().unwrap();
    drop(idle);
}
