//! The dashboard server on 127.0.0.1:0, spoken to over plain HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use qvl_core::{MetricEvent, MetricsRecorder, Tier};
use qvl_metrics::{Collector, Dashboard, DashboardConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    assert!(addr.ip().is_loopback());
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body (None at the last chunk).
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    reader.read_line(&mut size_line).unwrap();
    let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap(), 16).unwrap();
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).unwrap();
    chunk.truncate(size);
    (size > 0).then_some(chunk)
}

fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    let mut stream = connect(addr);
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if method == "HEAD" {
    } else if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn start() -> (Arc<Collector>, qvl_metrics::DashboardHandle) {
    let collector = Arc::new(Collector::new());
    collector.record(&MetricEvent::Memory {
        tier: Tier::Gpu,
        allocated: 1 << 20,
        reserved: 2 << 20,
    });
    collector.record(&MetricEvent::CacheLookup {
        tier: Tier::Gpu,
        hit: true,
    });
    let config = DashboardConfig {
        port: 0,
        update_interval_ms: 100,
        ..DashboardConfig::default()
    };
    let addr = config.socket_addr();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    let handle = Dashboard::serve(Arc::clone(&collector), addr, config).unwrap();
    (collector, handle)
}

fn assert_security_headers(r: &Response) {
    let csp = r.header("content-security-policy").expect("no CSP");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn serves_page_metrics_snapshot_and_events() {
    let (collector, handle) = start();
    let addr = handle.local_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    let page = request(addr, "GET", "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert_security_headers(&page);
    assert!(page.body.contains("<canvas id=\"chart-memory\""));
    assert!(page.body.contains("new EventSource(\"/events\")"));
    let lower = page.body.to_lowercase();
    assert!(
        !lower.contains("http://") && !lower.contains("https://"),
        "external URL in the page"
    );
    assert!(!lower.contains("src="), "the page loads no assets");
    assert!(!lower.contains("<link"), "the page links no assets");
    // The inline script and style match the hashes the CSP allows.
    let csp = page.header("content-security-policy").unwrap();
    assert_eq!(csp, qvl_metrics::dashboard::content_security_policy());

    let head = request(addr, "HEAD", "/");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let metrics = request(addr, "GET", "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .contains("version=0.0.4"));
    assert!(metrics
        .body
        .contains("qvl:memory_allocated_bytes{tier=\"gpu\"} 1048576\n"));
    assert_security_headers(&metrics);

    collector.record(&MetricEvent::Tokens {
        count: 5,
        elapsed: Duration::from_millis(100),
    });
    let snap = request(addr, "GET", "/api/snapshot");
    assert_eq!(snap.status, 200);
    assert_eq!(snap.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&snap.body).unwrap();
    assert_eq!(v["snapshot"]["tokens"]["count"], 5);
    assert_eq!(v["report"]["tokens_per_second"], 50.0);
    assert!(v["alerts"].is_array());

    // /events: read the first event.
    let mut stream = connect(addr);
    write!(stream, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    assert_eq!(status, 200);
    let content_type = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(content_type, "text/event-stream");
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = read_chunk(&mut reader).expect("stream ended before an event");
        text.push_str(&String::from_utf8(chunk).unwrap());
    }
    let event = text.split("\n\n").next().unwrap();
    assert!(event.lines().any(|l| l == "event: snapshot"), "{event}");
    let data: String = event
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .collect();
    let v: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(v["snapshot"]["tiers"][0]["tier"], "gpu");
    assert_eq!(v["update_interval_ms"], 100);
    drop(reader);

    handle.shutdown().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
}

#[test]
fn read_only_and_unknown_paths() {
    let (_collector, handle) = start();
    let addr = handle.local_addr();
    for path in ["/", "/metrics", "/api/snapshot", "/events"] {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let r = request(addr, method, path);
            assert_eq!(r.status, 405, "{method} {path}");
            assert_security_headers(&r);
        }
    }
    let r = request(addr, "GET", "/nope");
    assert_eq!(r.status, 404);
    assert_security_headers(&r);
}

#[test]
fn open_event_stream_does_not_block_shutdown() {
    let (_collector, handle) = start();
    let addr = handle.local_addr();
    let mut stream = connect(addr);
    write!(stream, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    assert!(read_chunk(&mut reader).is_some());
    let started = std::time::Instant::now();
    handle.shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited on the stream"
    );
}

#[test]
fn taken_port_is_a_clear_error() {
    let (_collector, handle) = start();
    let addr = handle.local_addr();
    let config = DashboardConfig {
        port: addr.port(),
        ..DashboardConfig::default()
    };
    let err = Dashboard::serve(Arc::new(Collector::new()), addr, config).unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
