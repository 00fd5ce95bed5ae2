//! Asynchronous I/O on a small pool of threads, with a latency controller.
//!
//! `max_inflight` threads take jobs from one queue; demand reads (a caller
//! is waiting) go to its front, prefetches to its back. The controller
//! bounds how many jobs run at once: it starts at `max_inflight`, halves
//! when a read takes longer than the latency target (the disk is
//! saturated, so more parallel reads only queue in the device and delay
//! the demand reads behind them) and grows back by one per fast read
//! (additive increase, multiplicative decrease).

use crate::error::{Result, SwapError};
use crate::extent::lock;
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A queued operation.
pub type Job = Box<dyn FnOnce(&IoClock) + Send>;

/// The result of an asynchronous operation, to wait for.
pub struct Ticket<T> {
    rx: Receiver<Result<T>>,
}

impl<T> Ticket<T> {
    /// Blocks until the operation is done and returns its result.
    pub fn wait(self) -> Result<T> {
        self.rx.recv().unwrap_or(Err(SwapError::EngineStopped))
    }

    /// The result if the operation is done, else the ticket back (without
    /// blocking).
    pub fn try_wait(self) -> std::result::Result<Result<T>, Ticket<T>> {
        match self.rx.try_recv() {
            Ok(done) => Ok(done),
            Err(std::sync::mpsc::TryRecvError::Empty) => Err(self),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Ok(Err(SwapError::EngineStopped)),
        }
    }

    /// A ticket and the sender that completes it.
    pub fn channel() -> (SyncSender<Result<T>>, Ticket<T>) {
        let (tx, rx) = sync_channel(1);
        (tx, Ticket { rx })
    }

    /// A ticket with a result already there.
    pub fn ready(value: Result<T>) -> Ticket<T> {
        let (tx, rx) = sync_channel(1);
        let _ = tx.send(value);
        Ticket { rx }
    }
}

/// Counters of the engine, read by [`IoEngine::snapshot`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Seconds during which at least one read was running.
    pub busy_secs: f64,
    /// Bytes moved by timed reads.
    pub bytes: u64,
    /// Reads completed.
    pub ops: u64,
    /// Bytes moved by timed writes (kept out of the read figures).
    pub write_bytes: u64,
    /// Writes completed.
    pub write_ops: u64,
    /// Most operations running at once.
    pub peak_running: usize,
    /// The controller's current limit on running operations.
    pub limit: usize,
    /// Times the controller lowered its limit.
    pub throttles: u64,
    /// Smoothed read latency in microseconds.
    pub ewma_latency_us: f64,
}

#[derive(Debug)]
struct Gate {
    running: usize,
    timing: usize,
    limit: usize,
    max: usize,
    busy_since: Option<Instant>,
    busy: Duration,
    bytes: u64,
    ops: u64,
    write_bytes: u64,
    write_ops: u64,
    peak_running: usize,
    throttles: u64,
    ewma_us: f64,
}

struct Shared {
    queue: Mutex<(VecDeque<Job>, bool)>,
    queue_cv: Condvar,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    target_us: f64,
}

/// Brackets the device time of one operation, so that the engine measures
/// how long the disk was busy (for bandwidth) and how long each read took
/// (for the controller).
pub struct IoClock {
    shared: Arc<Shared>,
}

impl IoClock {
    /// Runs the write `io` (moving `bytes`): counted apart from reads, so
    /// that swap-outs during decode do not enter the read bandwidth, and
    /// not used by the latency controller (which paces reads).
    pub fn time_write<R>(&self, bytes: u64, io: impl FnOnce() -> R) -> R {
        let out = io();
        let mut g = lock(&self.shared.gate);
        g.write_bytes += bytes;
        g.write_ops += 1;
        out
    }

    /// Runs the read `io` (moving `bytes`) as timed device work.
    pub fn time<R>(&self, bytes: u64, io: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        {
            let mut g = lock(&self.shared.gate);
            if g.timing == 0 {
                g.busy_since = Some(start);
            }
            g.timing += 1;
        }
        let out = io();
        let end = Instant::now();
        let mut g = lock(&self.shared.gate);
        g.bytes += bytes;
        g.ops += 1;
        let lat = (end - start).as_secs_f64() * 1e6;
        g.ewma_us = if g.ops == 1 {
            lat
        } else {
            0.8 * g.ewma_us + 0.2 * lat
        };
        if lat > self.shared.target_us {
            if g.limit > 1 {
                g.limit = (g.limit / 2).max(1);
                g.throttles += 1;
            }
        } else if g.limit < g.max {
            g.limit += 1;
            self.shared.gate_cv.notify_one();
        }
        // Busy time: the union of the timed sections, so overlapping reads
        // are not counted twice.
        g.timing -= 1;
        if g.timing == 0 {
            if let Some(s) = g.busy_since.take() {
                g.busy += end - s;
            }
        }
        out
    }
}

/// The I/O thread pool.
pub struct IoEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl IoEngine {
    /// Starts `threads` I/O threads; reads slower than `target` throttle.
    pub fn start(threads: usize, target: Duration) -> Result<IoEngine> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new((VecDeque::new(), false)),
            queue_cv: Condvar::new(),
            gate: Mutex::new(Gate {
                running: 0,
                timing: 0,
                limit: threads,
                max: threads,
                busy_since: None,
                busy: Duration::ZERO,
                bytes: 0,
                ops: 0,
                write_bytes: 0,
                write_ops: 0,
                peak_running: 0,
                throttles: 0,
                ewma_us: 0.0,
            }),
            gate_cv: Condvar::new(),
            target_us: target.as_secs_f64() * 1e6,
        });
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let s = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("qvl-swap-io-{i}"))
                .spawn(move || worker(s))
                .map_err(|e| SwapError::Io {
                    what: "starting a swap I/O thread for".to_string(),
                    path: std::path::PathBuf::from("the swap space"),
                    source: e,
                })?;
            workers.push(handle);
        }
        Ok(IoEngine { shared, workers })
    }

    /// Queues jobs that report through their own channels (reads that
    /// complete several tickets each), planned together, and wakes one
    /// worker; each worker that takes a job wakes the next while
    /// jobs are left. So the caller pays for one wake-up, however many jobs:
    /// waking a sleeping thread on another core costs an inter-processor
    /// interrupt (a VM exit under a hypervisor), and the caller is the
    /// decode loop. Returns false when the engine stopped.
    pub fn submit_jobs(&self, urgent: bool, jobs: Vec<Job>) -> bool {
        if jobs.is_empty() {
            return true;
        }
        {
            let mut q = lock(&self.shared.queue);
            if q.1 {
                return false;
            }
            if urgent {
                for job in jobs.into_iter().rev() {
                    q.0.push_front(job);
                }
            } else {
                q.0.extend(jobs);
            }
        }
        self.shared.queue_cv.notify_one();
        true
    }

    /// Queues `op`; `urgent` ops (a caller is blocked on them) go first.
    pub fn submit<T: Send + 'static>(
        &self,
        urgent: bool,
        op: impl FnOnce(&IoClock) -> Result<T> + Send + 'static,
    ) -> Ticket<T> {
        let (tx, rx): (SyncSender<Result<T>>, _) = sync_channel(1);
        let job: Job = Box::new(move |clock| {
            let _ = tx.send(op(clock));
        });
        {
            let mut q = lock(&self.shared.queue);
            if q.1 {
                return Ticket::ready(Err(SwapError::EngineStopped));
            }
            if urgent {
                q.0.push_front(job);
            } else {
                q.0.push_back(job);
            }
        }
        self.shared.queue_cv.notify_one();
        Ticket { rx }
    }

    /// Runs `op` on the calling thread, timed like an engine job (for
    /// synchronous writes and reads).
    pub fn run_here<T>(&self, op: impl FnOnce(&IoClock) -> T) -> T {
        let clock = IoClock {
            shared: Arc::clone(&self.shared),
        };
        {
            let mut g = lock(&self.shared.gate);
            g.running += 1;
            g.peak_running = g.peak_running.max(g.running);
        }
        let out = op(&clock);
        lock(&self.shared.gate).running -= 1;
        // Workers may be waiting for `running` to drop under the limit
        // (a synchronous write counted against it): wake them, or queued
        // reads would wait for a wake-up that never comes.
        self.shared.gate_cv.notify_all();
        out
    }

    /// Jobs queued and not yet started.
    pub fn queued(&self) -> usize {
        lock(&self.shared.queue).0.len()
    }

    /// The engine's counters.
    pub fn snapshot(&self) -> EngineSnapshot {
        let g = lock(&self.shared.gate);
        EngineSnapshot {
            busy_secs: g.busy.as_secs_f64(),
            bytes: g.bytes,
            ops: g.ops,
            write_bytes: g.write_bytes,
            write_ops: g.write_ops,
            peak_running: g.peak_running,
            limit: g.limit,
            throttles: g.throttles,
            ewma_latency_us: g.ewma_us,
        }
    }
}

fn worker(s: Arc<Shared>) {
    let clock = IoClock {
        shared: Arc::clone(&s),
    };
    loop {
        let job = {
            let mut q = lock(&s.queue);
            loop {
                if let Some(job) = q.0.pop_front() {
                    if !q.0.is_empty() {
                        // Chained wake-up (see `submit_jobs`).
                        s.queue_cv.notify_one();
                    }
                    break job;
                }
                if q.1 {
                    return;
                }
                q = s.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        {
            let mut g = lock(&s.gate);
            while g.running >= g.limit {
                g = s.gate_cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.running += 1;
            g.peak_running = g.peak_running.max(g.running);
        }
        job(&clock);
        lock(&s.gate).running -= 1;
        s.gate_cv.notify_one();
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        lock(&self.shared.queue).1 = true;
        self.shared.queue_cv.notify_all();
        self.shared.gate_cv.notify_all();
        let me = std::thread::current().id();
        for w in self.workers.drain(..) {
            // A job may hold the last reference to whatever owns the engine
            // (a store dropped while its prefetch ran): the engine is then
            // dropped on one of its own workers, which cannot join itself
            // (std panics on EDEADLK). That worker leaves its loop by
            // itself once the queue is empty (it holds `shared`).
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_and_the_limit_bounds_concurrency() {
        let e = IoEngine::start(3, Duration::from_secs(10)).unwrap();
        let tickets: Vec<_> = (0..20u64)
            .map(|i| {
                e.submit(i % 5 == 0, move |clock| {
                    Ok(clock.time(100, || {
                        std::thread::sleep(Duration::from_millis(2));
                        i * 2
                    }))
                })
            })
            .collect();
        let sum: u64 = tickets.into_iter().map(|t| t.wait().unwrap()).sum();
        assert_eq!(sum, (0..20u64).map(|i| i * 2).sum::<u64>());
        let s = e.snapshot();
        assert_eq!(s.ops, 20);
        assert_eq!(s.bytes, 2000);
        assert!(s.peak_running <= 3 && s.peak_running >= 1);
        assert!(s.busy_secs > 0.0);
    }

    #[test]
    fn slow_reads_throttle_the_limit() {
        let e = IoEngine::start(4, Duration::from_micros(1)).unwrap();
        let t: Vec<_> = (0..4)
            .map(|_| {
                e.submit(false, |c| {
                    c.time(1, || std::thread::sleep(Duration::from_millis(1)));
                    Ok(())
                })
            })
            .collect();
        for t in t {
            t.wait().unwrap();
        }
        let s = e.snapshot();
        assert!(s.throttles >= 1);
        assert!(s.limit < 4);
    }

    #[test]
    fn a_synchronous_op_at_the_limit_wakes_the_waiting_workers() {
        // Limit 1 (throttled by a slow read), then a synchronous op holds
        // the only slot while a job is queued: the job must run once the
        // op ends (it used to wait for a wake-up that never came).
        let e = IoEngine::start(2, Duration::from_micros(1)).unwrap();
        e.submit(true, |c| {
            c.time(1, || std::thread::sleep(Duration::from_millis(2)));
            Ok(())
        })
        .wait()
        .unwrap();
        assert_eq!(e.snapshot().limit, 1);
        let (started_tx, started_rx) = sync_channel::<()>(1);
        let (release_tx, release_rx) = sync_channel::<()>(1);
        std::thread::scope(|s| {
            let e = &e;
            s.spawn(move || {
                e.run_here(|_| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
            });
            started_rx.recv().unwrap();
            let t = e.submit(false, |_| Ok(7));
            // Give a worker time to take the job and block on the gate.
            std::thread::sleep(Duration::from_millis(20));
            release_tx.send(()).unwrap();
            assert_eq!(t.wait().unwrap(), 7);
        });
    }

    #[test]
    fn errors_pass_through_and_a_stopped_engine_says_so() {
        let e = IoEngine::start(1, Duration::from_secs(1)).unwrap();
        let t = e.submit::<()>(true, |_| Err(SwapError::EngineStopped));
        assert!(t.wait().is_err());
        drop(e);
        let (tx, rx) = sync_channel::<Result<()>>(1);
        drop(tx);
        assert!(matches!(
            Ticket { rx }.wait(),
            Err(SwapError::EngineStopped)
        ));
    }

    #[test]
    fn an_engine_dropped_by_its_own_job_stops_without_a_panic() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Once;
        // Panics of the engine's threads, counted by a hook that then
        // prints as the default one does (other tests are not affected).
        static IO_PANICS: AtomicUsize = AtomicUsize::new(0);
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("qvl-swap-io"))
                {
                    IO_PANICS.fetch_add(1, Ordering::SeqCst);
                }
                default(info);
            }));
        });
        for _ in 0..20 {
            let engine = Arc::new(IoEngine::start(2, Duration::from_secs(10)).unwrap());
            let (go_tx, go_rx) = sync_channel::<()>(0);
            let (done_tx, done_rx) = sync_channel::<()>(1);
            let held = Arc::clone(&engine);
            // Dropped when the job has run, on the worker: the last
            // reference once the caller's is gone.
            let _ticket = engine.submit(false, move |_| {
                let _ = go_rx.recv();
                let _keep = held;
                let _ = done_tx.send(());
                Ok(())
            });
            drop(engine);
            go_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            // Let the worker finish dropping the engine.
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(IO_PANICS.load(Ordering::SeqCst), 0);
    }
}
