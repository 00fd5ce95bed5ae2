//! The live web dashboard: one self-contained page with charts drawn on
//! `<canvas>`, fed by server-sent events; `/metrics` in the Prometheus text
//! format; `/api/snapshot` as JSON. Read-only (GET and HEAD), loopback by
//! default, no external assets.

use crate::alerts::{Alert, AlertEngine};
use crate::config::DashboardConfig;
use crate::snapshot::{PerformanceReport, Snapshot};
use crate::{prometheus, Collector, MetricsError};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const STYLE: &str = include_str!("dashboard.css");
const SCRIPT: &str = include_str!("dashboard.js");

/// How long a graceful shutdown may take before open connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `/events` pushes and `/api/snapshot` returns.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardPayload {
    /// Counters and gauges.
    pub snapshot: Snapshot,
    /// The performance report of the snapshot.
    pub report: PerformanceReport,
    /// Active alerts.
    pub alerts: Vec<Alert>,
    /// Milliseconds between pushes.
    pub update_interval_ms: u64,
}

struct AppState {
    collector: Arc<Collector>,
    /// The latest pushed payload, serialized.
    latest: watch::Receiver<Arc<str>>,
    stopping: watch::Receiver<bool>,
    alerts: Mutex<Vec<Alert>>,
    update_interval_ms: u64,
    page: Arc<str>,
    content_security_policy: HeaderValue,
}

/// The dashboard server.
#[derive(Debug)]
pub struct Dashboard;

impl Dashboard {
    /// Binds `addr` now (so a taken port is an error here) and serves the
    /// dashboard on a thread of its own until the handle is shut down or
    /// dropped.
    pub fn serve(
        collector: Arc<Collector>,
        addr: SocketAddr,
        config: DashboardConfig,
    ) -> Result<DashboardHandle, MetricsError> {
        config.validate()?;
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        if !local_addr.ip().is_loopback() {
            tracing::warn!(%local_addr, "the dashboard listens beyond loopback; it has no authentication");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| MetricsError::Io {
                what: "starting the dashboard's runtime",
                source,
            })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("qvl-dashboard".into())
            .spawn(move || runtime.block_on(run(listener, collector, config, stop_rx)))
            .map_err(|source| MetricsError::Io {
                what: "starting the dashboard thread",
                source,
            })?;
        tracing::info!(url = %format!("http://{local_addr}/"), "dashboard listening");
        Ok(DashboardHandle {
            local_addr,
            stop: stop_tx,
            thread: Some(thread),
        })
    }
}

/// A running dashboard. Dropping it shuts the server down.
#[derive(Debug)]
pub struct DashboardHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<(), MetricsError>>>,
}

impl DashboardHandle {
    /// The address the server listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.local_addr)
    }

    /// Stops accepting, ends the event streams, waits for open requests (up
    /// to 5 s) and joins the server thread.
    pub fn shutdown(mut self) -> Result<(), MetricsError> {
        self.stop_and_join()
    }

    /// Blocks until the server stops by itself (it only does on an error);
    /// for `qvl dashboard`, which serves until the process is ended.
    pub fn wait(mut self) -> Result<(), MetricsError> {
        match self.thread.take() {
            Some(thread) => join(thread),
            None => Ok(()),
        }
    }

    fn stop_and_join(&mut self) -> Result<(), MetricsError> {
        self.stop.send_replace(true);
        match self.thread.take() {
            Some(thread) => join(thread),
            None => Ok(()),
        }
    }
}

fn join(thread: JoinHandle<Result<(), MetricsError>>) -> Result<(), MetricsError> {
    thread
        .join()
        .map_err(|_| MetricsError::Server("the dashboard thread panicked".into()))?
}

impl Drop for DashboardHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!("dashboard shutdown: {e}");
        }
    }
}

fn csp_hash(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The page, with its style and script inline.
pub fn page_html() -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>qvl dashboard</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{BODY}\n\
         <script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
}

/// The Content-Security-Policy of the page: only this origin, and only the
/// page's own inline style and script (by hash).
pub fn content_security_policy() -> String {
    format!(
        "default-src 'self'; script-src {}; style-src {}; img-src 'self' data:; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        csp_hash(SCRIPT),
        csp_hash(STYLE)
    )
}

const BODY: &str = r#"<header>
<h1>qvl</h1><span id="status" class="status">connecting</span>
<span id="uptime" class="muted"></span>
</header>
<section id="alerts" class="alerts"><div class="ok">no alerts</div></section>
<section class="cards" id="cards"></section>
<section class="charts">
<figure><figcaption>memory per tier (allocated, reserved dashed)</figcaption><canvas id="chart-memory" data-chart="memory"></canvas></figure>
<figure><figcaption>cache hit rate per level (per interval)</figcaption><canvas id="chart-hits" data-chart="hits"></canvas></figure>
<figure><figcaption>swap traffic (bytes/s)</figcaption><canvas id="chart-swap" data-chart="swap"></canvas></figure>
<figure><figcaption>tokens/s</figcaption><canvas id="chart-tokens" data-chart="tokens"></canvas></figure>
</section>
<footer class="muted">live from <code>/events</code>; also <a href="/metrics">/metrics</a> and <a href="/api/snapshot">/api/snapshot</a></footer>"#;

async fn run(
    listener: std::net::TcpListener,
    collector: Arc<Collector>,
    config: DashboardConfig,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<(), MetricsError> {
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| MetricsError::Io {
            what: "handing the listener to the runtime",
            source,
        })?;
    let interval = config.update_interval();
    let mut engine = AlertEngine::new(config.alerts.clone());
    let first = payload(&collector, &mut engine, config.update_interval_ms);
    let (latest_tx, latest_rx) = watch::channel::<Arc<str>>(first.1);
    let state = Arc::new(AppState {
        collector: Arc::clone(&collector),
        latest: latest_rx,
        stopping: stop_rx.clone(),
        alerts: Mutex::new(first.0),
        update_interval_ms: config.update_interval_ms,
        page: page_html().into(),
        content_security_policy: HeaderValue::from_str(&content_security_policy())
            .map_err(|e| MetricsError::Server(format!("bad CSP header: {e}")))?,
    });

    let ticker_state = Arc::clone(&state);
    let mut ticker_stop = stop_rx.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = ticker_stop.wait_for(|s| *s) => return,
            }
            let (alerts, json) = payload(
                &ticker_state.collector,
                &mut engine,
                ticker_state.update_interval_ms,
            );
            if let Ok(mut a) = ticker_state.alerts.lock() {
                *a = alerts;
            }
            latest_tx.send_replace(json);
        }
    });

    let app = router(state);
    let mut graceful_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = graceful_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let _ = stop_rx.wait_for(|s| *s).await;
    ticker.abort();
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(MetricsError::Server(e.to_string())),
        Ok(Err(e)) => Err(MetricsError::Server(format!("server task failed: {e}"))),
        Err(_) => {
            tracing::warn!("dashboard connections still open after {SHUTDOWN_GRACE:?}; dropped");
            Ok(())
        }
    }
}

/// Takes a snapshot, judges alerts, and serializes the payload.
fn payload(
    collector: &Collector,
    engine: &mut AlertEngine,
    update_interval_ms: u64,
) -> (Vec<Alert>, Arc<str>) {
    let now = Instant::now();
    let snapshot = collector.snapshot_at(now);
    let alerts = engine.evaluate(&snapshot, now);
    let payload = DashboardPayload {
        report: snapshot.report(),
        snapshot,
        alerts: alerts.clone(),
        update_interval_ms,
    };
    // Plain data with string keys: serialization cannot fail.
    let json = serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_string());
    (alerts, json.into())
}

fn router(state: Arc<AppState>) -> Router {
    let csp = state.content_security_policy.clone();
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/api/snapshot", get(api_snapshot))
        .route("/events", get(events))
        .fallback(not_found)
        .layer(axum::middleware::map_response(
            move |mut response: Response| {
                let csp = csp.clone();
                async move {
                    let h = response.headers_mut();
                    h.insert(header::CONTENT_SECURITY_POLICY, csp);
                    h.insert(
                        header::X_CONTENT_TYPE_OPTIONS,
                        HeaderValue::from_static("nosniff"),
                    );
                    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
                    h.insert(
                        header::REFERRER_POLICY,
                        HeaderValue::from_static("no-referrer"),
                    );
                    response
                }
            },
        ))
        .with_state(state)
}

async fn index(State(state): State<Arc<AppState>>) -> Html<String> {
    Html(state.page.to_string())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = prometheus::render(&state.collector.snapshot());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(prometheus::CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

async fn api_snapshot(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.collector.snapshot();
    let alerts = state.alerts.lock().map(|a| a.clone()).unwrap_or_default();
    let payload = DashboardPayload {
        report: snapshot.report(),
        snapshot,
        alerts,
        update_interval_ms: state.update_interval_ms,
    };
    // Plain data with string keys: serialization cannot fail.
    let body = serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_string());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let latest = state.latest.clone();
    let stopping = state.stopping.clone();
    let stream = futures_util::stream::unfold(
        (latest, stopping, true),
        |(mut latest, mut stopping, first)| async move {
            if !first {
                tokio::select! {
                    changed = latest.changed() => changed.ok()?,
                    _ = stopping.wait_for(|s| *s) => return None,
                }
            }
            if *stopping.borrow() {
                return None;
            }
            let data = latest.borrow_and_update().clone();
            let event = Event::default().event("snapshot").data(&*data);
            Some((Ok(event), (latest, stopping, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}
