//! [`SsdStore`]: the SSD tier's [`BlockStore`], with batched writes and
//! asynchronous, checksummed reads.

use crate::config::SwapConfig;
use crate::dir::{clean_stale_files, prepare_directory};
use crate::engine::{EngineSnapshot, IoClock, IoEngine, Job, Ticket};
use crate::error::{Result, SwapError};
use crate::extent::{lock, Extent, ExtentAllocator};
use crate::file::{ActiveIo, FaultPlan, SwapFile};
use crate::format::{
    bare_checksum, bare_record_pages, encode_header, record_pages, verify_bare, verify_record,
    AlignedBuf, RecordHeader, HEADER_LEN, PAGE,
};
use qvl_core::{
    Block, BlockKey, BlockStore, ByteSize, CodecId, MetricEvent, MetricsRecorder, NoopRecorder,
    TensorMeta, Tier,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Turns a verified payload (with the block's meta and codec) into what the
/// reader wants, on the I/O thread.
pub type DecodeFn<T> = dyn Fn(&TensorMeta, CodecId, &[u8]) -> Result<T> + Send + Sync;

#[allow(clippy::type_complexity)]
type LocalDecode<'a, T> = &'a dyn Fn(&TensorMeta, CodecId, &[u8]) -> Result<T>;
/// A shared [`DecodeFn`].
pub type Decoder<T> = Arc<DecodeFn<T>>;

/// Where a block lives in the file and what its record must say.
struct Record {
    /// Freed (back to the allocator) when the last [`Entry`] of the record
    /// drops: the index's, or a read's still in flight.
    extent: Extent,
    header: RecordHeader,
    meta: TensorMeta,
    /// Some for a bare record (payload only on disk): its checksum, kept
    /// here instead of in an on-disk header.
    bare: Option<u64>,
}

/// A shared handle to a [`Record`]: every read plan clones the entries it
/// reads (a layer of a small model is dozens of records), so a clone is
/// one reference count, not a copy of the fields.
#[derive(Clone)]
struct Entry(Arc<Record>);

impl std::ops::Deref for Entry {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.0
    }
}

impl Record {
    /// Bytes to read: the record's pages, without the extent's padding.
    fn read_len(&self) -> usize {
        let payload = self.header.payload_len as usize;
        let pages = match self.bare {
            Some(_) => bare_record_pages(payload),
            None => record_pages(payload).max(1),
        };
        (pages * PAGE).min(self.extent.byte_len())
    }

    /// Checks the record's bytes and returns the payload.
    fn verify<'a>(&self, record: &'a [u8]) -> std::result::Result<&'a [u8], String> {
        match self.bare {
            Some(sum) => verify_bare(record, &self.header, sum),
            None => verify_record(record, &self.header),
        }
    }
}

/// Pages a stream has reserved and not yet filled.
#[derive(Debug, Clone, Copy)]
struct StreamCursor {
    next_page: u64,
    end_page: u64,
}

/// Pages a stream reserves at a time (4 MiB; smaller in a file under
/// 64 MiB or one without a free run that long): records of one stream written one after another land
/// next to each other, so that reading them back in the same order merges
/// into long reads. A multiple of 1 MiB, so that bare KV chunks of a
/// power-of-two size tile the merged reads exactly.
const STREAM_SEGMENT_PAGES: [u64; 3] = [1024, 256, 64];
/// Longest merged read: on the virtio and NVMe disks measured, 1 MiB
/// requests with a few in flight reach the sequential figure, and a
/// pooled buffer of this size is reused without page faults.
pub const MAX_MERGED_READ: usize = 1 << 20;
/// Most read buffers kept for reuse (of [`MAX_MERGED_READ`] bytes each).
const POOLED_READ_BUFS: usize = 32;

/// Read buffers of [`MAX_MERGED_READ`] bytes kept for reuse: a fresh
/// buffer per read costs page faults (the kernel zeroes and maps every
/// page, then pins it for the O_DIRECT transfer) on every read.
type BufPool = Arc<Mutex<Vec<AlignedBuf>>>;

fn take_buf(pool: &BufPool, len: usize) -> AlignedBuf {
    if len > MAX_MERGED_READ {
        return AlignedBuf::zeroed(len);
    }
    if let Some(b) = lock(pool).pop() {
        return b;
    }
    // Pool empty: a new huge-page set, one for us and the rest pooled.
    let mut set = AlignedBuf::huge_set(MAX_MERGED_READ);
    let mine = set
        .pop()
        .unwrap_or_else(|| AlignedBuf::zeroed(MAX_MERGED_READ));
    for b in set {
        give_buf(pool, b);
    }
    mine
}

fn give_buf(pool: &BufPool, buf: AlignedBuf) {
    if buf.len() == MAX_MERGED_READ {
        let mut bufs = lock(pool);
        if bufs.len() < POOLED_READ_BUFS {
            bufs.push(buf);
        }
    }
}

/// The buffer of one read, shared by the verified records it holds
/// ([`LandedRecord`]); back to the store's pool when the last holder drops
/// it. Lending it (instead of copying each record out) is what
/// [`SsdStore::read_many_landed`] is for.
pub struct LandedRead {
    buf: Option<AlignedBuf>,
    pool: BufPool,
}

impl LandedRead {
    /// The bytes read (whole pages; records sit at their offsets in it).
    pub fn bytes(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AlignedBuf::as_slice)
    }
}

impl Drop for LandedRead {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(&self.pool, b);
        }
    }
}

/// One record's verified payload, in place in the buffer it was read into.
#[derive(Clone)]
pub struct LandedRecord {
    read: Arc<LandedRead>,
    start: usize,
    len: usize,
    codec: CodecId,
}

impl LandedRecord {
    /// The payload (checked against the index's checksum; page-aligned).
    pub fn payload(&self) -> &[u8] {
        &self.read.bytes()[self.start..self.start + self.len]
    }

    /// The codec the payload was written with.
    pub fn codec(&self) -> CodecId {
        self.codec
    }

    /// The shared buffer holding the payload; keeping a clone keeps
    /// [`LandedRecord::payload`]'s bytes alive and unchanged.
    pub fn buffer(&self) -> &Arc<LandedRead> {
        &self.read
    }
}

/// A record of [`SsdStore::read_many_landed`], in its read buffer but not
/// yet checked: its payload is reachable only through
/// [`LandedUnverified::verify`]. The I/O threads only read; the caller
/// checks where it is about to use the bytes. A caller whose compute keeps
/// every core busy can then spread the checksums over its own worker
/// threads, right before the bytes are used (so they are in cache for it),
/// instead of having I/O threads compete with its compute for the cores.
pub struct LandedUnverified {
    read: Arc<LandedRead>,
    /// The record's bytes in the buffer: `start..end`.
    start: usize,
    end: usize,
    entry: Entry,
    inner: Arc<Inner>,
}

impl LandedUnverified {
    /// Checks the record (header or index fields, length, checksum) and
    /// gives its payload in place, or [`SwapError::Corrupt`] naming the
    /// key, the swap file and the offset (counted in
    /// [`StoreStats::integrity_failures`]).
    pub fn verify(self) -> Result<LandedRecord> {
        let payload = self.checked()?;
        let start = payload.as_ptr() as usize - self.read.bytes().as_ptr() as usize;
        let len = payload.len();
        Ok(LandedRecord {
            start,
            len,
            codec: self.entry.header.codec,
            read: self.read,
        })
    }

    /// Runs the checks of [`LandedUnverified::verify`] in place, leaving
    /// the record as it is: for a caller that reads
    /// [`LandedUnverified::unverified_payload`] and checks right before it
    /// uses anything computed from it.
    pub fn check(&self) -> Result<()> {
        self.checked().map(|_| ())
    }

    /// The checked payload, or the error naming key, file and offset.
    fn checked(&self) -> Result<&[u8]> {
        let bytes = &self.read.bytes()[self.start..self.end];
        self.entry.verify(bytes).map_err(|reason| {
            self.inner
                .integrity_failures
                .fetch_add(1, Ordering::Relaxed);
            SwapError::Corrupt {
                key: self.entry.header.key,
                path: self.inner.file.path().to_path_buf(),
                offset: self.entry.extent.offset(),
                reason,
            }
        })
    }

    /// Where the payload would be if the record is sound, as read and not
    /// yet checked (None when the bytes read cannot hold it). Nothing
    /// computed from it may be used before [`LandedUnverified::check`]
    /// passes.
    pub fn unverified_payload(&self) -> Option<&[u8]> {
        let skip = if self.entry.bare.is_some() {
            0
        } else {
            HEADER_LEN
        };
        let from = self.start + skip;
        let to = from.checked_add(usize::try_from(self.entry.header.payload_len).ok()?)?;
        (to <= self.end).then(|| &self.read.bytes()[from..to])
    }

    /// The codec the index says the payload was written with.
    pub fn codec(&self) -> CodecId {
        self.entry.header.codec
    }

    /// The shared buffer the record sits in; keeping a clone keeps
    /// [`LandedUnverified::unverified_payload`]'s bytes alive and unchanged.
    pub fn buffer(&self) -> &Arc<LandedRead> {
        &self.read
    }
}

/// The results of one (merged) read, filled once by the I/O thread: one
/// wake-up per read instead of one per record.
struct RunSlot {
    results: Mutex<Option<Vec<Option<Result<LandedUnverified>>>>>,
    done: Condvar,
}

/// A record of [`SsdStore::read_many_landed`] to wait for.
pub struct LandedTicket {
    slot: Arc<RunSlot>,
    index: usize,
}

impl LandedTicket {
    /// Blocks until the read holding this record is done and returns the
    /// record, still to be verified, or the read's error.
    pub fn wait(self) -> Result<LandedUnverified> {
        match self.try_wait() {
            Ok(done) => done,
            Err(ticket) => ticket.wait_blocking(),
        }
    }

    /// The record if its read is done, else the ticket back (without
    /// blocking), so that a caller can time only the waits that block.
    pub fn try_wait(self) -> std::result::Result<Result<LandedUnverified>, LandedTicket> {
        let mut results = lock(&self.slot.results);
        match results.as_mut() {
            Some(v) => Ok(v
                .get_mut(self.index)
                .and_then(Option::take)
                .unwrap_or(Err(SwapError::EngineStopped))),
            None => {
                drop(results);
                Err(self)
            }
        }
    }

    fn wait_blocking(self) -> Result<LandedUnverified> {
        let mut results = lock(&self.slot.results);
        loop {
            if let Some(v) = results.as_mut() {
                return v
                    .get_mut(self.index)
                    .and_then(Option::take)
                    .unwrap_or(Err(SwapError::EngineStopped));
            }
            results = self
                .slot
                .done
                .wait(results)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Fills a [`RunSlot`]; if dropped unfilled (the engine stopped before
/// running the read), every ticket gets [`SwapError::EngineStopped`]
/// rather than waiting forever.
struct RunCompleter {
    slot: Arc<RunSlot>,
    records: usize,
}

impl RunCompleter {
    fn complete(&self, results: Vec<Result<LandedUnverified>>) {
        *lock(&self.slot.results) = Some(results.into_iter().map(Some).collect());
        self.slot.done.notify_all();
    }
}

impl Drop for RunCompleter {
    fn drop(&mut self) {
        let mut results = lock(&self.slot.results);
        if results.is_none() {
            *results = Some(
                (0..self.records)
                    .map(|_| Some(Err(SwapError::EngineStopped)))
                    .collect(),
            );
            drop(results);
            self.slot.done.notify_all();
        }
    }
}

struct Inner {
    file: SwapFile,
    read_bufs: BufPool,
    streams: Mutex<HashMap<u32, StreamCursor>>,
    allocator: Arc<Mutex<ExtentAllocator>>,
    index: RwLock<HashMap<BlockKey, Entry, foldhash::fast::RandomState>>,
    generation: AtomicU64,
    engine: IoEngine,
    recorder: Arc<dyn MetricsRecorder>,
    blocks_written: AtomicU64,
    blocks_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    integrity_failures: AtomicU64,
}

/// What a store has done, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreStats {
    /// The I/O path in use.
    pub io: ActiveIo,
    /// Blocks written.
    pub blocks_written: u64,
    /// Blocks read back.
    pub blocks_read: u64,
    /// Record bytes written (headers and padding included).
    pub bytes_written: u64,
    /// Record bytes read (headers and padding included).
    pub bytes_read: u64,
    /// Reads that failed a check (magic, key, generation, checksum, length).
    pub integrity_failures: u64,
    /// The I/O engine's counters (busy time, latency, throttling).
    pub engine: EngineSnapshot,
}

/// The swap space on SSD: one preallocated file in a private directory,
/// checksummed records, I/O on a bounded thread pool.
///
/// A block becomes visible (to `get`, `contains`, reads) only after its
/// record is completely written: a reader can never see a torn block. A
/// replaced or removed block's pages are reused only after the reads of it
/// that are in flight finish.
#[derive(Clone)]
pub struct SsdStore {
    inner: Arc<Inner>,
}

impl SsdStore {
    /// Prepares the directory (0700, not a symlink, ours), removes swap
    /// files of dead processes, and creates this store's file.
    pub fn open(config: &SwapConfig) -> Result<SsdStore> {
        config.validate()?;
        prepare_directory(&config.swap_directory)?;
        clean_stale_files(&config.swap_directory)?;
        let file = SwapFile::create(
            &config.swap_directory,
            config.capacity_bytes,
            config.io_mode,
        )?;
        let pages = file.capacity() / PAGE as u64;
        let engine = IoEngine::start(
            config.max_inflight,
            Duration::from_micros(config.target_read_latency_us),
        )?;
        tracing::debug!(path = %file.path().display(), io = file.io().name(), "swap file ready");
        Ok(SsdStore {
            inner: Arc::new(Inner {
                file,
                streams: Mutex::new(HashMap::new()),
                read_bufs: Arc::new(Mutex::new(Vec::new())),
                allocator: Arc::new(Mutex::new(ExtentAllocator::new(pages))),
                index: RwLock::new(HashMap::default()),
                generation: AtomicU64::new(1),
                engine,
                recorder: Arc::new(NoopRecorder),
                blocks_written: AtomicU64::new(0),
                blocks_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                integrity_failures: AtomicU64::new(0),
            }),
        })
    }

    /// The same store reporting swap events to `recorder`. Call before
    /// sharing the store (it needs the only handle).
    pub fn with_recorder(mut self, recorder: Arc<dyn MetricsRecorder>) -> Result<SsdStore> {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.recorder = recorder;
                Ok(self)
            }
            None => Err(SwapError::InvalidConfig(
                "with_recorder needs the only handle of the store".to_string(),
            )),
        }
    }

    /// The swap file's path.
    pub fn path(&self) -> &Path {
        self.inner.file.path()
    }

    /// The I/O path in use (O_DIRECT, buffered or mmap).
    pub fn io(&self) -> ActiveIo {
        self.inner.file.io()
    }

    /// Injects faults (tests).
    pub fn set_faults(&self, plan: FaultPlan) {
        self.inner.file.set_faults(plan);
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let i = &self.inner;
        StoreStats {
            io: i.file.io(),
            blocks_written: i.blocks_written.load(Ordering::Relaxed),
            blocks_read: i.blocks_read.load(Ordering::Relaxed),
            bytes_written: i.bytes_written.load(Ordering::Relaxed),
            bytes_read: i.bytes_read.load(Ordering::Relaxed),
            integrity_failures: i.integrity_failures.load(Ordering::Relaxed),
            engine: i.engine.snapshot(),
        }
    }

    /// Writes `blocks` as neighbouring records in one I/O (one contiguous
    /// extent), then publishes them all. On error nothing is published
    /// and earlier versions of the keys stay readable.
    pub fn put_batch(&self, blocks: Vec<Block>) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let i = &self.inner;
        i.file.check_present()?;
        let pages: Vec<u64> = blocks
            .iter()
            .map(|b| record_pages(b.data.len()) as u64)
            .collect();
        let total: u64 = pages.iter().sum();
        let extents = self.allocate_run(&pages, total)?;
        let mut buf = AlignedBuf::zeroed(total as usize * PAGE);
        let mut headers = Vec::with_capacity(blocks.len());
        let mut at = 0usize;
        for (b, p) in blocks.iter().zip(&pages) {
            let header = RecordHeader {
                codec: b.codec,
                key: b.key,
                payload_len: b.data.len() as u64,
                generation: i.generation.fetch_add(1, Ordering::Relaxed),
            };
            let rec = &mut buf.as_mut_slice()[at..at + *p as usize * PAGE];
            encode_header(&header, &b.data, rec);
            rec[HEADER_LEN..HEADER_LEN + b.data.len()].copy_from_slice(&b.data);
            headers.push(header);
            at += *p as usize * PAGE;
        }
        let offset = extents[0].offset();
        let start = Instant::now();
        i.engine.run_here(|clock: &IoClock| {
            clock.time_write(buf.len() as u64, || i.file.write_at(buf.as_slice(), offset))
        })?;
        let latency = start.elapsed();
        i.recorder.record(&MetricEvent::Swap {
            out: true,
            bytes: buf.len() as u64,
            latency,
        });
        i.blocks_written
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        i.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        // Publish only now that every byte is written.
        let mut index = i.index.write().unwrap_or_else(|p| p.into_inner());
        for ((b, header), extent) in blocks.into_iter().zip(headers).zip(extents) {
            index.insert(
                b.key,
                Entry(Arc::new(Record {
                    extent,
                    header,
                    meta: b.meta,
                    bare: None,
                })),
            );
        }
        Ok(())
    }

    /// Writes `blocks`, each into the stream its tag names (one write per
    /// record): records of one stream written in order sit next to each
    /// other in the file, so that [`SsdStore::read_many_async`] of them in
    /// the same order merges into long reads. Records are bare (payload
    /// only, checksum in the index; see [`crate::format`]), so that chunks
    /// of whole pages tile a merged read with nothing between them. Each
    /// record is published once written; on error the failed record and
    /// the rest are not.
    pub fn put_streamed(&self, blocks: Vec<(u32, Block)>) -> Result<()> {
        let i = &self.inner;
        i.file.check_present()?;
        for (stream, b) in blocks {
            let pages = bare_record_pages(b.data.len()) as u64;
            let extent = self.allocate_in_stream(stream, pages)?;
            let mut buf = AlignedBuf::zeroed(pages as usize * PAGE);
            let header = RecordHeader {
                codec: b.codec,
                key: b.key,
                payload_len: b.data.len() as u64,
                generation: i.generation.fetch_add(1, Ordering::Relaxed),
            };
            buf.as_mut_slice()[..b.data.len()].copy_from_slice(&b.data);
            let sum = bare_checksum(&header, &b.data);
            let offset = extent.offset();
            let start = Instant::now();
            i.engine.run_here(|clock: &IoClock| {
                clock.time_write(buf.len() as u64, || i.file.write_at(buf.as_slice(), offset))
            })?;
            i.recorder.record(&MetricEvent::Swap {
                out: true,
                bytes: buf.len() as u64,
                latency: start.elapsed(),
            });
            i.blocks_written.fetch_add(1, Ordering::Relaxed);
            i.bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            i.index.write().unwrap_or_else(|p| p.into_inner()).insert(
                b.key,
                Entry(Arc::new(Record {
                    extent,
                    header,
                    meta: b.meta,
                    bare: Some(sum),
                })),
            );
        }
        Ok(())
    }

    fn allocate_in_stream(&self, stream: u32, pages: u64) -> Result<Extent> {
        let i = &self.inner;
        let mut streams = lock(&i.streams);
        let cursor = streams.get(&stream).copied();
        if let Some(c) = cursor {
            if c.end_page - c.next_page >= pages {
                streams.insert(
                    stream,
                    StreamCursor {
                        next_page: c.next_page + pages,
                        end_page: c.end_page,
                    },
                );
                return Ok(Extent::adopt(&i.allocator, c.next_page, pages));
            }
        }
        let mut alloc = lock(&i.allocator);
        if let Some(c) = cursor {
            // The segment's unused tail goes back.
            if c.end_page > c.next_page {
                alloc.release(c.next_page, c.end_page - c.next_page);
            }
            streams.remove(&stream);
        }
        // A segment takes at most 1/16 of the file, so that a small file
        // still has room for several streams.
        let cap = alloc.total_pages() / 16;
        let mut got = STREAM_SEGMENT_PAGES
            .iter()
            .filter(|&&s| s <= cap)
            .map(|&s| s.max(pages))
            .chain(std::iter::once(pages))
            .find_map(|segment| alloc.allocate(segment).map(|start| (start, segment)));
        if got.is_none() {
            // The free pages may all sit in other streams' reserved tails:
            // give those back and try once more.
            for (_, c) in streams.drain() {
                if c.end_page > c.next_page {
                    alloc.release(c.next_page, c.end_page - c.next_page);
                }
            }
            got = alloc.allocate(pages).map(|start| (start, pages));
        }
        let Some((start, got)) = got else {
            return Err(SwapError::OutOfSpace {
                path: i.file.path().to_path_buf(),
                needed: ByteSize(pages * PAGE as u64),
                free: ByteSize(alloc.free_pages() * PAGE as u64),
                capacity: ByteSize(alloc.total_pages() * PAGE as u64),
            });
        };
        drop(alloc);
        streams.insert(
            stream,
            StreamCursor {
                next_page: start + pages,
                end_page: start + got,
            },
        );
        Ok(Extent::adopt(&i.allocator, start, pages))
    }

    /// Reads `keys` on the I/O threads, merging records that sit next to
    /// each other in the file into single reads of up to 1 MiB; each key's
    /// verified payload goes to `decode` there. None for keys not stored.
    pub fn read_many_async<T: Send + 'static>(
        &self,
        keys: &[BlockKey],
        urgent: bool,
        decode: Decoder<T>,
    ) -> Vec<Option<Ticket<T>>> {
        let (places, runs) = self.plan_runs(keys);
        let mut tickets: Vec<Vec<Option<Ticket<T>>>> = Vec::with_capacity(runs.len());
        let mut jobs: Vec<Job> = Vec::with_capacity(runs.len());
        for run in runs {
            let mut items = Vec::with_capacity(run.len());
            let mut mine = Vec::with_capacity(run.len());
            for e in run {
                let (tx, t) = Ticket::channel();
                items.push((e, tx));
                mine.push(Some(t));
            }
            tickets.push(mine);
            let inner = Arc::clone(&self.inner);
            let decode = Arc::clone(&decode);
            jobs.push(Box::new(move |clock: &IoClock| {
                read_run(&inner, items, clock, &*decode)
            }));
        }
        // A stopped engine drops the jobs, and with them the senders,
        // which fail the tickets.
        self.inner.engine.submit_jobs(urgent, jobs);
        places
            .into_iter()
            .map(|p| p.and_then(|(run, pos)| tickets[run][pos].take()))
            .collect()
    }

    /// Reads `keys` like [`SsdStore::read_many_async`], into pooled,
    /// page-aligned (huge-page backed where the kernel allows) buffers that
    /// are lent, not copied: each ticket gives the record in place in the
    /// buffer of its (merged) read, as a [`LandedUnverified`] whose payload
    /// only [`LandedUnverified::verify`] hands out. The I/O threads only
    /// read, and wake the waiter once per read; the buffer goes back to the
    /// pool when the last record of it is dropped.
    pub fn read_many_landed(&self, keys: &[BlockKey], urgent: bool) -> Vec<Option<LandedTicket>> {
        let (places, runs) = self.plan_runs(keys);
        let mut slots = Vec::with_capacity(runs.len());
        let mut jobs: Vec<Job> = Vec::with_capacity(runs.len());
        for run in runs {
            let slot = Arc::new(RunSlot {
                results: Mutex::new(None),
                done: Condvar::new(),
            });
            slots.push(Arc::clone(&slot));
            let completer = RunCompleter {
                slot,
                records: run.len(),
            };
            let inner = Arc::clone(&self.inner);
            jobs.push(Box::new(move |clock: &IoClock| {
                completer.complete(read_run_landed(&inner, run, clock));
            }));
        }
        // A stopped engine drops the jobs, and with them the completers,
        // which fail the tickets.
        self.inner.engine.submit_jobs(urgent, jobs);
        places
            .into_iter()
            .map(|p| {
                p.map(|(run, index)| LandedTicket {
                    slot: Arc::clone(&slots[run]),
                    index,
                })
            })
            .collect()
    }

    /// Groups the stored entries of `keys` into runs of neighbouring
    /// records (up to [`MAX_MERGED_READ`] bytes), in file order; for each
    /// key, its run and place in it (None when not stored).
    #[allow(clippy::type_complexity)]
    fn plan_runs(&self, keys: &[BlockKey]) -> (Vec<Option<(usize, usize)>>, Vec<Vec<Entry>>) {
        let mut found = Vec::with_capacity(keys.len());
        {
            let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
            for (n, key) in keys.iter().enumerate() {
                if let Some(e) = index.get(key) {
                    found.push((n, e.clone()));
                }
            }
        }
        found.sort_by_key(|(_, e)| e.extent.offset());
        let mut places = vec![None; keys.len()];
        let mut runs: Vec<Vec<Entry>> = Vec::new();
        let mut run_len = 0usize;
        for (n, e) in found {
            let extend = runs.last().and_then(|r| r.last()).is_some_and(|last| {
                last.extent.offset() + last.extent.byte_len() as u64 == e.extent.offset()
                    && run_len + e.extent.byte_len() <= MAX_MERGED_READ
            });
            if !extend {
                runs.push(Vec::new());
                run_len = 0;
            }
            run_len += e.extent.byte_len();
            let at = runs.len() - 1;
            if let Some(run) = runs.last_mut() {
                places[n] = Some((at, run.len()));
                run.push(e);
            }
        }
        (places, runs)
    }

    fn allocate_run(&self, pages: &[u64], total: u64) -> Result<Vec<Extent>> {
        let i = &self.inner;
        let mut alloc = lock(&i.allocator);
        let Some(start) = alloc.allocate(total) else {
            return Err(SwapError::OutOfSpace {
                path: i.file.path().to_path_buf(),
                needed: ByteSize(total * PAGE as u64),
                free: ByteSize(alloc.free_pages() * PAGE as u64),
                capacity: ByteSize(alloc.total_pages() * PAGE as u64),
            });
        };
        drop(alloc);
        // Split the run into one extent per record, so that each frees on
        // its own when its block is removed.
        let mut out = Vec::with_capacity(pages.len());
        let mut at = start;
        for &p in pages {
            out.push(Extent::adopt(&i.allocator, at, p));
            at += p;
        }
        Ok(out)
    }

    fn entry(&self, key: &BlockKey) -> Option<Entry> {
        self.inner
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Reads `key` on an I/O thread and hands its verified payload and
    /// codec to `decode` there (so conversion runs beside the I/O, not on
    /// the caller's thread). None when the key is not stored. `urgent`
    /// reads jump the queue (a caller is waiting for them).
    pub fn read_async<T: Send + 'static>(
        &self,
        key: &BlockKey,
        urgent: bool,
        decode: Decoder<T>,
    ) -> Option<Ticket<T>> {
        let entry = self.entry(key)?;
        let inner = Arc::clone(&self.inner);
        Some(self.inner.engine.submit(urgent, move |clock| {
            read_entry(&inner, &entry, clock, &*decode)
        }))
    }

    /// Reads `key` on the calling thread.
    pub fn read_with<T>(
        &self,
        key: &BlockKey,
        decode: impl Fn(&TensorMeta, CodecId, &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(entry) = self.entry(key) else {
            return Ok(None);
        };
        let inner = &self.inner;
        inner
            .engine
            .run_here(|clock| read_entry(inner, &entry, clock, &decode))
            .map(Some)
    }

    /// Removes `key`; its pages are reused once no read of it is running.
    pub fn remove_key(&self, key: &BlockKey) -> bool {
        self.inner
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .is_some()
    }

    /// Where `key`'s record starts in the file (tests and tools).
    pub fn record_offset(&self, key: &BlockKey) -> Option<u64> {
        self.entry(key).map(|e| e.extent.offset())
    }
}

/// Reads neighbouring records in one I/O and completes each one's ticket.
fn read_run<T>(
    inner: &Inner,
    items: Vec<(Entry, SyncSender<Result<T>>)>,
    clock: &IoClock,
    decode: LocalDecode<'_, T>,
) {
    if items.len() == 1 || inner.file.io() == ActiveIo::Mmap {
        for (e, tx) in items {
            let _ = tx.send(read_entry(inner, &e, clock, decode));
        }
        return;
    }
    let first = items[0].0.extent.offset();
    let len: usize = items.iter().map(|(e, _)| e.extent.byte_len()).sum();
    let start = Instant::now();
    let mut buf = take_buf(&inner.read_bufs, len);
    let read = inner.file.check_present().and_then(|()| {
        clock.time(len as u64, || {
            inner
                .file
                .read_exact_at(&mut buf.as_mut_slice()[..len], first)
        })
    });
    if let Err(e) = read {
        give_buf(&inner.read_bufs, buf);
        fail_all(inner, items, e);
        return;
    }
    inner.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
    inner.recorder.record(&MetricEvent::Swap {
        out: false,
        bytes: len as u64,
        latency: start.elapsed(),
    });
    for (entry, tx) in items {
        let at = (entry.extent.offset() - first) as usize;
        let rec = &buf.as_slice()[at..at + entry.extent.byte_len()];
        let result = match entry.verify(rec) {
            Ok(payload) => decode(&entry.meta, entry.header.codec, payload),
            Err(reason) => {
                inner.integrity_failures.fetch_add(1, Ordering::Relaxed);
                Err(SwapError::Corrupt {
                    key: entry.header.key,
                    path: inner.file.path().to_path_buf(),
                    offset: entry.extent.offset(),
                    reason,
                })
            }
        };
        inner.blocks_read.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(result);
    }
    give_buf(&inner.read_bufs, buf);
}

/// Sends `e` to every ticket of a failed read (the first gets the
/// original, the others a copy of its message).
fn fail_all<T>(inner: &Inner, items: Vec<(Entry, SyncSender<Result<T>>)>, e: SwapError) {
    let text = e.to_string();
    let mut e = Some(e);
    for (_, tx) in items {
        let err = e.take().unwrap_or_else(|| SwapError::Io {
            what: format!("merged read failed: {text}; reading"),
            path: inner.file.path().to_path_buf(),
            source: std::io::Error::other("merged read failed"),
        });
        let _ = tx.send(Err(err));
    }
}

/// Reads a run of neighbouring records into one pooled buffer and returns
/// each record in place (no copy), in run order, for its reader to verify.
fn read_run_landed(
    inner: &Arc<Inner>,
    run: Vec<Entry>,
    clock: &IoClock,
) -> Vec<Result<LandedUnverified>> {
    let Some(first) = run.first().map(|e| e.extent.offset()) else {
        return Vec::new();
    };
    // The last record is read without its extent's padding.
    let len: usize = run
        .iter()
        .enumerate()
        .map(|(n, e)| {
            if n + 1 == run.len() {
                e.read_len()
            } else {
                e.extent.byte_len()
            }
        })
        .sum();
    let start = Instant::now();
    let mut buf = take_buf(&inner.read_bufs, len);
    let read = inner.file.check_present().and_then(|()| {
        if inner.file.io() == ActiveIo::Mmap {
            // Copy out of the map: the timed part is where its page
            // faults (the device reads) happen.
            let mapped = inner.file.mapped(first, len)?.unwrap_or(&[]);
            clock.time(len as u64, || {
                buf.as_mut_slice()[..mapped.len()].copy_from_slice(mapped)
            });
            Ok(())
        } else {
            clock.time(len as u64, || {
                inner
                    .file
                    .read_exact_at(&mut buf.as_mut_slice()[..len], first)
            })
        }
    });
    if let Err(e) = read {
        give_buf(&inner.read_bufs, buf);
        let text = e.to_string();
        let mut e = Some(e);
        return run
            .iter()
            .map(|_| {
                Err(e.take().unwrap_or_else(|| SwapError::Io {
                    what: format!("merged read failed: {text}; reading"),
                    path: inner.file.path().to_path_buf(),
                    source: std::io::Error::other("merged read failed"),
                }))
            })
            .collect();
    }
    inner.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
    inner.recorder.record(&MetricEvent::Swap {
        out: false,
        bytes: len as u64,
        latency: start.elapsed(),
    });
    let landed = Arc::new(LandedRead {
        buf: Some(buf),
        pool: Arc::clone(&inner.read_bufs),
    });
    inner
        .blocks_read
        .fetch_add(run.len() as u64, Ordering::Relaxed);
    run.into_iter()
        .map(|entry| {
            let start = (entry.extent.offset() - first) as usize;
            Ok(LandedUnverified {
                read: Arc::clone(&landed),
                start,
                end: (start + entry.extent.byte_len()).min(len),
                entry,
                inner: Arc::clone(inner),
            })
        })
        .collect()
}

fn read_entry<T>(
    inner: &Inner,
    entry: &Entry,
    clock: &IoClock,
    decode: LocalDecode<'_, T>,
) -> Result<T> {
    inner.file.check_present()?;
    let len = entry.extent.byte_len();
    let offset = entry.extent.offset();
    let start = Instant::now();
    let corrupt = |reason: String| {
        inner.integrity_failures.fetch_add(1, Ordering::Relaxed);
        SwapError::Corrupt {
            key: entry.header.key,
            path: inner.file.path().to_path_buf(),
            offset,
            reason,
        }
    };
    // Read only the record's pages, not the extent's padding beyond them.
    let want = entry.read_len().min(len);
    let out = if inner.file.io() == ActiveIo::Mmap {
        // The checksum pass touches every mapped byte first, so it is where
        // the page faults (the device reads) happen: the timed part.
        let mapped = inner.file.mapped(offset, want)?.unwrap_or(&[]);
        let payload = clock
            .time(want as u64, || entry.verify(mapped))
            .map_err(corrupt)?;
        decode(&entry.meta, entry.header.codec, payload)?
    } else {
        let mut buf = AlignedBuf::zeroed(want);
        clock.time(want as u64, || {
            inner.file.read_exact_at(buf.as_mut_slice(), offset)
        })?;
        let payload = entry.verify(buf.as_slice()).map_err(corrupt)?;
        decode(&entry.meta, entry.header.codec, payload)?
    };
    inner.blocks_read.fetch_add(1, Ordering::Relaxed);
    inner.bytes_read.fetch_add(want as u64, Ordering::Relaxed);
    inner.recorder.record(&MetricEvent::Swap {
        out: false,
        bytes: want as u64,
        latency: start.elapsed(),
    });
    Ok(out)
}

impl BlockStore for SsdStore {
    fn tier(&self) -> Tier {
        Tier::Ssd
    }

    fn put(&self, block: Block) -> qvl_core::Result<()> {
        Ok(self.put_batch(vec![block])?)
    }

    fn get(&self, key: &BlockKey) -> qvl_core::Result<Option<Block>> {
        let k = *key;
        Ok(self.read_with(key, |meta, codec, payload| {
            Ok(Block {
                key: k,
                meta: meta.clone(),
                codec,
                data: Arc::from(payload),
            })
        })?)
    }

    fn remove(&self, key: &BlockKey) -> qvl_core::Result<bool> {
        Ok(self.remove_key(key))
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.entry(key).is_some()
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.file.capacity()
    }

    fn used_bytes(&self) -> u64 {
        let a = lock(&self.inner.allocator);
        (a.total_pages() - a.free_pages()) * PAGE as u64
    }

    fn len(&self) -> usize {
        self.inner
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
