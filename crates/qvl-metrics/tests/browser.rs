//! The dashboard in a real browser: headless Chromium loads the page, the
//! charts render with live data from `/events`, and a screenshot is saved.
//!
//! Chromium is driven over the DevTools protocol on `--remote-debugging-pipe`
//! (file descriptors 3 and 4): `--dump-dom` and `--virtual-time-budget`
//! cannot be used, since the page's event stream never finishes loading.
//!
//! Ignored by default (it needs Debian's `chromium` package and takes tens
//! of seconds): `cargo test -p qvl-metrics --test browser -- --ignored`.
//! Set `QVL_CHROMIUM` to use another binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use base64::Engine as _;
use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
use qvl_metrics::{Collector, Dashboard, DashboardConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("QVL_CHROMIUM") {
        return PathBuf::from(p);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("no chromium found: `apt-get install chromium` or set QVL_CHROMIUM");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("qvl-metrics-browser-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A headless Chromium spoken to over the DevTools pipe.
struct Browser {
    child: Child,
    to_browser: UnixStream,
    from_browser: Receiver<Value>,
    next_id: u64,
    profile: PathBuf,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempdir("profile");
        // fd 3: what chromium reads; fd 4: what it writes.
        let (to_browser, browser_reads) = UnixStream::pair().unwrap();
        let (browser_writes, from_browser) = UnixStream::pair().unwrap();
        let (read_fd, write_fd) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        let mut command = Command::new(chromium());
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-pipe",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: runs in the forked child before exec; dup2 is
        // async-signal-safe and the descriptors are open in the parent (the
        // streams live until after spawn returns).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(read_fd, 3) < 0 || libc::dup2(write_fd, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting chromium");
        drop((browser_reads, browser_writes));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_browser);
            let mut message = Vec::new();
            loop {
                message.clear();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Browser {
            child,
            to_browser,
            from_browser: rx,
            next_id: 0,
            profile,
        }
    }

    /// Sends a command and waits for its result (events are skipped).
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method}: {e}"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
#[ignore = "needs chromium; run with --ignored"]
fn charts_render_live_data_in_headless_chromium() {
    let collector = Arc::new(Collector::new());
    let config = DashboardConfig {
        port: 0,
        update_interval_ms: 200,
        ..DashboardConfig::default()
    };
    let handle = Dashboard::serve(Arc::clone(&collector), config.socket_addr(), config).unwrap();
    let url = handle.url();
    assert!(url.starts_with("http://127.0.0.1:"));

    // A workload that keeps the counters moving while the page is open.
    let running = Arc::new(AtomicBool::new(true));
    let worker = {
        let collector = Arc::clone(&collector);
        let running = Arc::clone(&running);
        std::thread::spawn(move || {
            let mut step = 0u64;
            while running.load(Ordering::Relaxed) {
                step += 1;
                collector.record(&MetricEvent::Alloc {
                    tier: Tier::Gpu,
                    kind: TensorKind::KvCache,
                    bytes: 1 << 20,
                    latency: Duration::from_micros(1),
                });
                collector.record(&MetricEvent::CacheLookup {
                    tier: Tier::Gpu,
                    hit: step % 5 != 0,
                });
                collector.record(&MetricEvent::Swap {
                    out: step % 2 == 0,
                    bytes: 64 << 10,
                    latency: Duration::from_micros(200),
                });
                collector.record(&MetricEvent::Tokens {
                    count: 1,
                    elapsed: Duration::from_millis(5),
                });
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut browser = Browser::start();
    let target = browser.call(None, "Target.createTarget", json!({"url": url}));
    let target_id = target["targetId"].as_str().unwrap().to_string();
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        json!({"targetId": target_id, "flatten": true}),
    );
    let session = attached["sessionId"].as_str().unwrap().to_string();

    let probe = "JSON.stringify({updates: Number(document.body.dataset.updates || 0), \
                 points: Array.from(document.querySelectorAll('canvas')).map(c => Number(c.dataset.points || 0)), \
                 status: document.getElementById('status').className, \
                 cards: document.querySelectorAll('.card').length})";
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let r = browser.call(
            Some(&session),
            "Runtime.evaluate",
            json!({"expression": probe, "returnByValue": true}),
        );
        let state: Value =
            serde_json::from_str(r["result"]["value"].as_str().unwrap_or("{}")).unwrap();
        if state["updates"].as_u64().unwrap_or(0) >= 5 || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        state["updates"].as_u64().unwrap_or(0) >= 5,
        "the page got fewer than 5 live updates in 60 s: {state}"
    );
    let points: Vec<u64> = state["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(points.len(), 4, "not every chart is there: {state}");
    assert!(
        points.iter().all(|&p| p >= 2),
        "charts without data: {state}"
    );
    assert_eq!(state["status"], "status live", "{state}");
    assert!(state["cards"].as_u64().unwrap() >= 8, "{state}");

    let shot = browser.call(
        Some(&session),
        "Page.captureScreenshot",
        json!({"format": "png"}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    assert!(png.len() > 10_000, "the screenshot is nearly empty");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qvl-dashboard.png");
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());

    drop(browser);
    running.store(false, Ordering::Relaxed);
    worker.join().unwrap();
    handle.shutdown().unwrap();
}
