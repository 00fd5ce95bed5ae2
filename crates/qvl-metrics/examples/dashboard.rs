//! Records a simulated workload into a collector, serves the dashboard for a
//! few seconds and prints the performance report.
//!
//! `cargo run -p qvl-metrics --example dashboard -- [seconds] [port]`
//! (defaults: 5 seconds, port 9464 on 127.0.0.1; open the printed URL).

use qvl_core::{MetricEvent, MetricsRecorder, TensorKind, Tier};
use qvl_metrics::{Collector, Dashboard, DashboardConfig, MetricsConfig, MetricsError};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_target(false).init();
    let mut args = std::env::args().skip(1);
    let seconds: u64 = match args.next() {
        Some(s) => s.parse().map_err(|e| format!("seconds: {s:?}: {e}"))?,
        None => 5,
    };
    let mut config = MetricsConfig::default();
    if let Some(p) = args.next() {
        config.dashboard.port = p.parse().map_err(|e| format!("port: {p:?}: {e}"))?;
    }
    config.dashboard.alerts.swap_latency_budget_ms = 2.0;
    config.validate()?;

    let collector = Arc::new(Collector::new());
    let _sampler = collector.start_sampler(config.sample_interval())?;
    let dashboard = serve(&collector, &config.dashboard)?;
    println!("dashboard: {} (for {seconds} s)", dashboard.url());

    // A small decode loop: KV blocks allocated, looked up, sometimes swapped.
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut step: u64 = 0;
    let mut live: u64 = 0;
    while Instant::now() < until {
        step += 1;
        let started = Instant::now();
        collector.record(&MetricEvent::Alloc {
            tier: Tier::Gpu,
            kind: TensorKind::KvCache,
            bytes: 64 << 10,
            latency: started.elapsed(),
        });
        live += 64 << 10;
        collector.record(&MetricEvent::CacheLookup {
            tier: if step % 4 == 0 {
                Tier::HostRam
            } else {
                Tier::Gpu
            },
            hit: step % 7 != 0,
        });
        if step % 16 == 0 {
            // Over budget now and then, to show an alert.
            let slow = (step / 400) % 2 == 1;
            collector.record(&MetricEvent::Swap {
                out: step % 32 == 0,
                bytes: 64 << 10,
                latency: Duration::from_micros(if slow { 4000 } else { 300 }),
            });
            collector.record(&MetricEvent::Compress {
                kind: TensorKind::KvCache,
                input_bytes: 64 << 10,
                output_bytes: 17 << 10,
                rel_error: 0.011,
            });
        }
        if live > 256 << 20 {
            collector.record(&MetricEvent::Free {
                tier: Tier::Gpu,
                bytes: live / 2,
            });
            collector.record(&MetricEvent::GcRun {
                freed: live / 2,
                pause: Duration::from_micros(150),
            });
            live -= live / 2;
        }
        collector.record(&MetricEvent::Memory {
            tier: Tier::HostRam,
            allocated: 512 << 20,
            reserved: 640 << 20,
        });
        std::thread::sleep(Duration::from_millis(2));
        collector.record(&MetricEvent::Tokens {
            count: 1,
            elapsed: started.elapsed(),
        });
    }
    dashboard.shutdown()?;
    print!("{}", collector.snapshot().report().table());
    Ok(())
}

fn serve(
    collector: &Arc<Collector>,
    config: &DashboardConfig,
) -> Result<qvl_metrics::DashboardHandle, MetricsError> {
    Dashboard::serve(Arc::clone(collector), config.socket_addr(), config.clone())
}
