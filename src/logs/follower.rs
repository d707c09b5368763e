//! The follower: one task per running workflow that reads each step container's log through the
//! Kubernetes API and appends masked LogLines to the workflow's file.
//!
//! Steps are followed one at a time in plan order, so lines never interleave and every step's
//! `start` precedes its data and its `end` follows it. Where a step runs:
//! - per-step layout: the TaskRun labelled `tekton.dev/pipelineTask=<plan task>`; its step
//!   containers (`step-run` for user steps, `step-setup`/`step-clone` for system steps) in order;
//! - packed layout: the one TaskRun whose Tekton steps include `<plan task>`; container
//!   `step-<plan task>`.
//!
//! The stream is `pods/log?follow=true&timestamps=true`. kube ≥ 4 has no read timeout, so an idle
//! stream is detected here and reopened with `sinceTime`; lines already written are skipped by
//! (timestamp, count at that timestamp). The position is persisted with the file offset it covers;
//! after a restart the file is cut back to that offset and following resumes from the position,
//! so no line is lost or written twice.
//!
//! Secret values are read by the follower itself from the run's Secret (`spec.secretName`), so
//! a resumed follower masks exactly like the first one; a missing Secret means the steps could not
//! have started with it either.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncBufRead, AsyncBufReadExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Secret};
use kube::api::{Api, ListParams, LogParams};
use serde::{Deserialize, Serialize};

use super::file::{LogFile, log_path};
use super::hub::{Appended, LogHub};
use super::line::{DataLineEncoder, LogLine, StepStatus, step_kind_code};
use super::mask::Masker;
use super::{LogError, LogSettings};
use crate::crd::WorkflowRun;
use crate::model::WorkflowId;
use crate::plan::Plan;
use crate::store::Store;
use crate::store::log_positions::LogPosition;
use crate::tekton::types::{LABEL_PIPELINE_RUN, LABEL_PIPELINE_TASK, succeeded};
use crate::tekton::{PipelineRun, TaskRun};

/// A logged step as the follower needs it (from the plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedStep {
    pub log_id: i64,
    pub name: String,
    /// Go's `step_kind`: 0 system, 1 user.
    pub kind: i64,
    pub command: String,
    /// Pipeline task (per-step) or Tekton step (packed) name.
    pub task: String,
}

/// Everything a follower needs to know about one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTarget {
    pub id: WorkflowId,
    /// The WorkflowRun uid: tells a new run of the same workflow from a resumed one.
    pub run_uid: String,
    pub namespace: String,
    pub pipeline_run: String,
    pub steps: Vec<LoggedStep>,
    pub secret_name: Option<String>,
}

impl RunTarget {
    /// Build from a WorkflowRun and its plan. The run must have been created by the API server
    /// (it needs a uid).
    pub fn new(
        run: &WorkflowRun,
        plan: &Plan,
        pipeline_run: &str,
        default_namespace: &str,
    ) -> Result<Self, LogError> {
        let run_uid =
            run.metadata.uid.clone().ok_or_else(|| {
                LogError::Invalid("the WorkflowRun has no uid (it was never stored)".into())
            })?;
        if pipeline_run.is_empty() {
            return Err(LogError::Invalid("the PipelineRun name is empty".into()));
        }
        let steps = plan
            .logged()
            .filter_map(|s| {
                Some(LoggedStep {
                    log_id: s.log_id? as i64,
                    name: s.name.clone(),
                    kind: step_kind_code(s.kind),
                    command: s.command.clone(),
                    task: s.task.clone(),
                })
            })
            .collect();
        Ok(RunTarget {
            id: run.workflow_id(),
            run_uid,
            namespace: run.metadata.namespace.clone().unwrap_or_else(|| default_namespace.to_owned()),
            pipeline_run: pipeline_run.to_owned(),
            steps,
            secret_name: run.spec.secret_name.clone(),
        })
    }

    pub fn log_file(&self) -> String {
        self.id.log_file_name()
    }
}

/// The follower's persisted progress (the `state` JSON of a [`LogPosition`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Index into [`RunTarget::steps`] of the step being followed.
    pub step: usize,
    /// Its `start` line is written.
    pub started: bool,
    /// Index of the container being followed within the step.
    pub container: usize,
    /// Timestamp of the last complete kubelet line written for that container.
    pub last_ts: Option<jiff::Timestamp>,
    /// How many lines with exactly `last_ts` were written.
    pub seen_at_ts: u64,
    /// Lines written for that container (0 means nothing was read yet).
    pub container_lines: u64,
    /// Time of the last line written, to keep control-line times from going backwards.
    pub last_time: Option<jiff::Timestamp>,
    /// Every step is done.
    pub done: bool,
}

// ---------------------------------------------------------------------------------------------
// Line assembly: bytes → (timestamp, masked content) segments.

/// A piece of one kubelet line: the whole line, or a part of an over-long one. Its content
/// borrows the bytes being assembled when no secret had to be masked out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    /// The kubelet timestamp of the line (absent when the prefix is missing or malformed).
    pub ts: Option<jiff::Timestamp>,
    /// Masked content, trailing `\r` removed.
    pub content: Cow<'a, [u8]>,
    /// First piece of its line.
    pub first: bool,
    /// Last piece of its line.
    pub last: bool,
}

/// Splits a byte stream into lines, strips the `--timestamps` prefix, cuts over-long lines at
/// safe points and masks secrets, all on complete data so that chunk boundaries never matter.
#[derive(Debug)]
pub struct LineAssembler {
    cap: usize,
    masker: Masker,
    timestamps: bool,
    /// The unfinished end of what was pushed (never a complete line).
    pending: Vec<u8>,
    /// Segments of the current line were already emitted.
    in_line: bool,
    /// The current line's prefix is parsed.
    prefix_done: bool,
    ts: Option<jiff::Timestamp>,
    ts_parser: TsParser,
}

/// The longest `--timestamps` prefix we wait for before giving up on one.
const MAX_PREFIX: usize = 40;

/// Parses `--timestamps` prefixes. The kubelet writes `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, and
/// consecutive lines mostly share their second, so the first 19 bytes are parsed once per second
/// (by jiff) and only the fraction per line; anything else goes through jiff.
#[derive(Debug, Default, Clone)]
struct TsParser {
    /// The last second parsed: its text and Unix second.
    second: Option<([u8; 19], i64)>,
}

impl TsParser {
    fn parse(&mut self, text: &[u8]) -> Option<jiff::Timestamp> {
        if let Some((prefix, second)) = &self.second
            && text.len() > 19
            && text[..19] == prefix[..]
            && let Some(nanos) = fraction_nanos(&text[19..])
        {
            return jiff::Timestamp::new(*second, nanos).ok();
        }
        let t: jiff::Timestamp = std::str::from_utf8(text).ok()?.parse().ok()?;
        // Remember the second only for the plain shape the fast path reads (no leap second,
        // not before the epoch, where the fraction would borrow from the second).
        if text.len() > 19
            && fraction_nanos(&text[19..]).is_some()
            && &text[17..19] != b"60"
            && t.as_second() >= 0
            && t.subsec_nanosecond() >= 0
        {
            let mut prefix = [0u8; 19];
            prefix.copy_from_slice(&text[..19]);
            self.second = Some((prefix, t.as_second()));
        }
        Some(t)
    }
}

/// `Z` or `.` + 1–9 digits + `Z`, as nanoseconds.
fn fraction_nanos(rest: &[u8]) -> Option<i32> {
    match rest {
        [b'Z'] => Some(0),
        [b'.', digits @ .., b'Z']
            if (1..=9).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) =>
        {
            let n = digits.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0'));
            Some(n * 10i32.pow(9 - digits.len() as u32))
        }
        _ => None,
    }
}

impl LineAssembler {
    /// `cap`: longest line content kept whole; `timestamps`: lines start with `<RFC 3339> `.
    pub fn new(cap: usize, masker: Masker, timestamps: bool) -> Self {
        LineAssembler {
            cap: cap.max(1),
            masker,
            timestamps,
            pending: Vec::new(),
            in_line: false,
            prefix_done: false,
            ts: None,
            ts_parser: TsParser::default(),
        }
    }

    /// Feed bytes; complete pieces go to `sink`. Complete lines are read in place: only the
    /// unfinished end of `bytes` is copied (and joined with the next push).
    pub fn push(&mut self, bytes: &[u8], sink: &mut impl FnMut(Segment<'_>)) {
        let mut pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            let used = self.scan(bytes, sink);
            pending.extend_from_slice(&bytes[used..]);
        } else {
            pending.extend_from_slice(bytes);
            let used = self.scan(&pending, sink);
            pending.drain(..used);
        }
        self.pending = pending;
    }

    /// Emit every complete piece at the start of `buf`; returns how many bytes they used.
    fn scan(&mut self, buf: &[u8], sink: &mut impl FnMut(Segment<'_>)) -> usize {
        let mut at = 0;
        // The next secret occurrence, searched once for many lines (see `line_is_clean`).
        let mut hit = None;
        loop {
            if self.timestamps && !self.prefix_done {
                let rest = &buf[at..];
                match memchr::memchr2(b' ', b'\n', &rest[..rest.len().min(MAX_PREFIX)]) {
                    Some(i) if rest[i] == b' ' => {
                        let parsed = self.ts_parser.parse(&rest[..i]);
                        if parsed.is_some() {
                            at += i + 1;
                        }
                        self.ts = parsed;
                        self.prefix_done = true;
                    }
                    Some(_) => {
                        self.ts = None;
                        self.prefix_done = true;
                    }
                    None if rest.len() >= MAX_PREFIX => {
                        self.ts = None;
                        self.prefix_done = true;
                    }
                    None => break,
                }
            }
            let rest = &buf[at..];
            if let Some(i) = memchr::memchr(b'\n', rest) {
                let mut end = i;
                while end > 0 && rest[end - 1] == b'\r' {
                    end -= 1;
                }
                if end > self.cap {
                    // A whole over-long line: cut it like a partial one (all of it is here, so
                    // every occurrence is visible to the cut).
                    let cut = self.masker.safe_cut(&rest[..end], self.cap).max(1);
                    if cut < end {
                        let content = self.masker.mask(&rest[..cut]);
                        sink(Segment { ts: self.ts, content, first: !self.in_line, last: false });
                        at += cut;
                        self.in_line = true;
                        continue;
                    }
                }
                let content = if self.line_is_clean(buf, &mut hit, at, at + end) {
                    Cow::Borrowed(&rest[..end])
                } else {
                    self.masker.mask(&rest[..end])
                };
                sink(Segment { ts: self.ts, content, first: !self.in_line, last: true });
                at += i + 1;
                self.in_line = false;
                self.prefix_done = false;
                continue;
            }
            if rest.len() >= self.cap.saturating_add(self.masker.longest()) {
                let cut = self.masker.safe_cut(rest, self.cap).max(1);
                let content = self.masker.mask(&rest[..cut]);
                sink(Segment { ts: self.ts, content, first: !self.in_line, last: false });
                at += cut;
                self.in_line = true;
                continue;
            }
            break;
        }
        at
    }

    /// The stream ended: emit what is left as the last piece of its line.
    pub fn finish(&mut self, sink: &mut impl FnMut(Segment<'_>)) {
        if self.timestamps && !self.prefix_done && !self.pending.is_empty() {
            if let Some(i) = memchr::memchr(b' ', &self.pending) {
                let parsed = self.ts_parser.parse(&self.pending[..i]);
                if parsed.is_some() {
                    self.pending.drain(..=i);
                }
                self.ts = parsed;
            } else {
                self.ts = None;
            }
        }
        if !self.pending.is_empty() || self.in_line {
            let mut end = self.pending.len();
            while end > 0 && self.pending[end - 1] == b'\r' {
                end -= 1;
            }
            let content = self.masker.mask(&self.pending[..end]);
            sink(Segment { ts: self.ts, content, first: !self.in_line, last: true });
        }
        self.reset();
    }

    /// Whether `buf[start..end]` certainly holds no secret, so masking it would change nothing.
    /// `hit` caches `(searched from, first occurrence from there)` across the lines of one
    /// scan: the occurrence that ends first after `from` starts before the end of any range
    /// after `from` that holds an occurrence ([`Masker::first_match`]), so every line ending at
    /// or before its start is clean and one search serves all of them. Lines it does not clear
    /// are masked as usual.
    fn line_is_clean(
        &self,
        buf: &[u8],
        hit: &mut Option<(usize, Option<(usize, usize)>)>,
        start: usize,
        end: usize,
    ) -> bool {
        if self.masker.is_empty() {
            return true;
        }
        let valid = hit.is_some_and(|(from, m)| from <= start && m.is_none_or(|(s, _)| s >= start));
        if !valid {
            let found = self.masker.first_match(&buf[start..]).map(|(s, e)| (start + s, start + e));
            *hit = Some((start, found));
        }
        match hit {
            Some((_, Some((s, _)))) => *s >= end,
            _ => true,
        }
    }

    /// Drop a partial line (the connection broke; the kubelet will send it again).
    pub fn reset(&mut self) {
        self.pending.clear();
        self.in_line = false;
        self.prefix_done = false;
        self.ts = None;
    }

    /// Segments of the current line were already emitted.
    pub fn mid_line(&self) -> bool {
        self.in_line
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: LogLines → file + hub.

/// The write side of one workflow's log. The follower queues lines into a [`Batch`] (data line
/// contents as they came, masked; other lines already encoded); a writer thread encodes the
/// batch, appends it to the file and then publishes it to viewers (file first, so a viewer
/// reading the file never misses a published line). Reading and assembling the stream, and
/// encoding and writing, thus run on two cores; when the writer falls [`WRITE_QUEUE`] batches
/// behind, the follower encodes the next batch itself instead of waiting idle, which shares the
/// work out evenly whichever side is slower. Waiting for room in the queue is async, so a slow
/// disk holds up only its own follower, never a runtime thread. [`RunLog::sync`] waits for
/// everything queued, so a saved position never covers bytes not yet written.
#[derive(Debug)]
pub struct RunLog {
    batch: Batch,
    /// For the batches the follower encodes itself.
    encoder: DataLineEncoder,
    tx: tokio::sync::mpsc::Sender<WriteMsg>,
    /// Encode every batch here, as when the writer is behind (tests of that path).
    #[cfg(test)]
    encode_here: bool,
    /// Batches the writer is done with, to be filled again (their buffers keep their capacity).
    recycled: tokio::sync::mpsc::UnboundedReceiver<Batch>,
}

/// Batches the follower may queue ahead of the writer.
const WRITE_QUEUE: usize = 8;
/// Queued bytes after which [`RunLog::should_flush`] says to hand the batch over.
const BATCH: usize = 64 * 1024;

/// Lines queued for the writer: their bytes back to back and what each one is, and once
/// encoded (`out` is never empty then: every line ends in `\n`) the file bytes of all of them.
#[derive(Debug, Default)]
struct Batch {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    out: Vec<u8>,
}

#[derive(Debug)]
enum Entry {
    /// A data line whose content (masked, not yet checked for UTF-8) ends at `end`.
    Data { step_id: i64, time: jiff::Timestamp, end: usize },
    /// An encoded line (without its newline) ending at `end`.
    Encoded { end: usize },
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
        self.out.clear();
    }

    /// Encode every line, each followed by `\n`, into `out` (once).
    fn encode(&mut self, encoder: &mut DataLineEncoder) {
        if !self.out.is_empty() {
            return;
        }
        let out = &mut self.out;
        let mut start = 0;
        for entry in &self.entries {
            start = match *entry {
                Entry::Data { step_id, time, end } => {
                    // Invalid UTF-8 is replaced (as Go's encoder does), never fatal.
                    encoder.encode(out, step_id, &self.bytes[start..end], time);
                    end
                }
                Entry::Encoded { end } => {
                    out.extend_from_slice(&self.bytes[start..end]);
                    end
                }
            };
            out.push(b'\n');
        }
    }
}

#[derive(Debug)]
enum WriteMsg {
    Batch(Batch),
    /// Reply with the file offset once everything before is written, or the first write error.
    Sync(tokio::sync::oneshot::Sender<Result<u64, LogError>>),
}

impl RunLog {
    pub fn new(file: LogFile, hub: LogHub, key: String) -> Result<Self, LogError> {
        Self::with_queue(file, hub, key, WRITE_QUEUE)
    }

    /// `queue` (at least 1): batches the follower may queue ahead of the writer before encoding
    /// them itself.
    fn with_queue(file: LogFile, hub: LogHub, key: String, queue: usize) -> Result<Self, LogError> {
        let (tx, rx) = tokio::sync::mpsc::channel(queue.max(1));
        let (recycle, recycled) = tokio::sync::mpsc::unbounded_channel();
        let path = file.path().to_path_buf();
        std::thread::Builder::new()
            .name("bobbin-log-writer".into())
            .spawn(move || write_batches(file, hub, key, rx, recycle))
            .map_err(|e| LogError::File { path, source: e })?;
        Ok(RunLog {
            batch: Batch::default(),
            encoder: DataLineEncoder::default(),
            tx,
            recycled,
            #[cfg(test)]
            encode_here: false,
        })
    }

    /// Queue one line.
    pub fn push(&mut self, line: &LogLine) {
        line.encode_into(&mut self.batch.bytes);
        self.batch.entries.push(Entry::Encoded { end: self.batch.bytes.len() });
    }

    /// Queue one data line: the same bytes as `push(&LogLine::data(step_id, content, time))` for
    /// UTF-8 content; each byte that does not begin a valid UTF-8 sequence becomes U+FFFD, as in
    /// Go's encoder.
    pub fn push_data(&mut self, step_id: i64, content: &[u8], time: jiff::Timestamp) {
        self.batch.bytes.extend_from_slice(content);
        self.batch.entries.push(Entry::Data { step_id, time, end: self.batch.bytes.len() });
    }

    /// Enough is queued that handing it over now beats collecting more.
    pub fn should_flush(&self) -> bool {
        self.batch.bytes.len() >= BATCH
    }

    /// Hand queued lines to the writer. When it is [`WRITE_QUEUE`] batches behind, encode them
    /// here first (the writer then only appends them), and wait for room.
    pub async fn flush(&mut self) -> Result<(), LogError> {
        use tokio::sync::mpsc::error::TrySendError;
        if self.batch.is_empty() {
            return Ok(());
        }
        let next = self.recycled.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, next);
        #[cfg(test)]
        let batch = {
            let mut batch = batch;
            if self.encode_here {
                batch.encode(&mut self.encoder);
            }
            batch
        };
        let msg = match self.tx.try_send(WriteMsg::Batch(batch)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(writer_gone()),
            Err(TrySendError::Full(WriteMsg::Batch(mut batch))) => {
                batch.encode(&mut self.encoder);
                WriteMsg::Batch(batch)
            }
            Err(TrySendError::Full(other)) => other,
        };
        self.tx.send(msg).await.map_err(|_| writer_gone())
    }

    /// Flush, wait until every queued line is in the file, and return the file's end offset (or
    /// the first write error).
    pub async fn sync(&mut self) -> Result<u64, LogError> {
        self.flush().await?;
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx.send(WriteMsg::Sync(reply)).await.map_err(|_| writer_gone())?;
        done.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> LogError {
    LogError::Invalid("the log writer thread stopped".into())
}

/// The writer thread: encode, append, count, publish, hand the batch back for reuse; after a
/// failed write, drop batches and report the error at the next sync. Ends when the [`RunLog`]
/// is dropped.
fn write_batches(
    mut file: LogFile,
    hub: LogHub,
    key: String,
    mut rx: tokio::sync::mpsc::Receiver<WriteMsg>,
    recycle: tokio::sync::mpsc::UnboundedSender<Batch>,
) {
    let mut failed: Option<LogError> = None;
    let mut encoder = DataLineEncoder::default();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            WriteMsg::Batch(mut batch) => {
                if failed.is_none() {
                    batch.encode(&mut encoder);
                    let out = &batch.out;
                    match file.append(out) {
                        Ok(offset) => {
                            let metrics = hub.metrics();
                            metrics.lines_written.inc_by(batch.entries.len() as u64);
                            metrics.bytes_written.inc_by(out.len() as u64);
                            hub.publish_with(&key, || Appended { offset, bytes: Arc::from(out.as_slice()) });
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                batch.clear();
                // The follower may be gone already; the batch is then simply dropped.
                let _ = recycle.send(batch);
            }
            WriteMsg::Sync(reply) => {
                let _ = reply.send(match failed.take() {
                    Some(e) => Err(e),
                    None => Ok(file.offset()),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The follower.

/// Runs one workflow's follower to completion.
pub struct Follower {
    client: kube::Client,
    store: Store,
    hub: LogHub,
    settings: LogSettings,
    target: RunTarget,
    progress: Progress,
    log: Option<RunLog>,
    masker: Masker,
    last_persist: std::time::Instant,
    /// The current step's start time, once its first container is seen running.
    pending_start: Option<jiff::Timestamp>,
}

/// Where a step's output comes from right now.
enum Source {
    /// Not created yet.
    Wait,
    /// It will never run (skipped, or the run ended before it).
    NeverRan,
    Pod {
        pod: String,
        containers: Vec<String>,
        taskrun: Box<TaskRun>,
    },
}

/// How a container's log ended.
enum Ended {
    Terminated {
        finished: Option<jiff::Timestamp>,
    },
    NeverStarted,
    /// The pod disappeared; `streamed` says whether we had its log open before (then everything
    /// it printed was read) or never got to read anything.
    Gone {
        streamed: bool,
    },
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Follower {
    pub fn new(
        client: kube::Client,
        store: Store,
        hub: LogHub,
        settings: LogSettings,
        target: RunTarget,
    ) -> Self {
        Follower {
            client,
            store,
            hub,
            settings,
            target,
            progress: Progress::default(),
            log: None,
            masker: Masker::none(),
            last_persist: std::time::Instant::now(),
            pending_start: None,
        }
    }

    /// Follow until every step is done. Returns early (Ok) if this run was already followed to the
    /// end.
    pub async fn run(mut self) -> Result<(), LogError> {
        let key = self.target.log_file();
        let path = log_path(&self.settings.dir, &self.target.id);
        let stored = self.store.log_position(&key).await?;
        let (mut keep, mut progress) = match &stored {
            Some(pos) if pos.run_uid == self.target.run_uid => {
                if pos.done {
                    return Ok(());
                }
                let progress: Progress = serde_json::from_str(&pos.state)
                    .map_err(|e| LogError::Invalid(format!("stored log position of {key}: {e}")))?;
                (pos.file_offset, progress)
            }
            _ => {
                // A new run of this workflow: the file starts over (B15), and viewers still on the
                // previous run's file are told it is gone.
                if stored.is_some() || std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
                    self.hub.reset(&key);
                }
                (0, Progress::default())
            }
        };
        let file = match LogFile::open(&path, keep) {
            Ok(f) => f,
            Err(e) if keep > 0 => {
                tracing::warn!(error = %e, file = %key, "log file changed behind our back; starting it over");
                self.hub.reset(&key);
                keep = 0;
                progress = Progress::default();
                LogFile::open(&path, keep)?
            }
            Err(e) => return Err(e),
        };
        self.progress = progress;
        self.log = Some(RunLog::new(file, self.hub.clone(), key.clone())?);
        self.hub.writer_active(&key);
        self.persist(true).await?;

        let result = self.follow_all().await;
        if let Some(log) = self.log.as_mut() {
            // Every line is written and published before the writer is reported done.
            let _ = log.sync().await;
        }
        if result.is_ok() {
            self.progress.done = true;
            self.persist(true).await?;
        }
        self.hub.writer_done(&key);
        result
    }

    async fn follow_all(&mut self) -> Result<(), LogError> {
        self.masker = self.load_masker().await;
        while self.progress.step < self.target.steps.len() {
            let step = self.target.steps[self.progress.step].clone();
            let source = loop {
                match self.resolve(&step).await {
                    Ok(Source::Wait) => tokio::time::sleep(self.settings.poll_interval).await,
                    Ok(other) => break other,
                    Err(e) => {
                        tracing::debug!(error = %e, step = %step.name, "looking up the step's pod failed");
                        tokio::time::sleep(self.settings.poll_interval).await;
                    }
                }
            };
            let mut finished = None;
            let mut ran = false;
            match source {
                Source::NeverRan | Source::Wait => {}
                Source::Pod { pod, containers, taskrun } => {
                    while self.progress.container < containers.len() {
                        let container = containers[self.progress.container].clone();
                        match self.follow_container(&step, &pod, &container).await? {
                            Ended::Terminated { finished: f } => {
                                ran = true;
                                finished = f.or(finished);
                            }
                            Ended::NeverStarted => {}
                            Ended::Gone { streamed } => {
                                let (start, finish) = self.taskrun_step_times(&taskrun, &container).await;
                                // Tekton saw it start, or we read from it: it ran. Otherwise it
                                // never started (e.g. its image never pulled) and has no log.
                                let started =
                                    start.is_some() || streamed || self.progress.container_lines > 0;
                                ran |= started;
                                if !self.progress.started && self.pending_start.is_none() {
                                    self.pending_start = start;
                                }
                                if started && !streamed && self.progress.container_lines == 0 {
                                    let at = self
                                        .clamp_forward(start.or(finish).unwrap_or_else(jiff::Timestamp::now));
                                    self.write_start(&step, at);
                                    let msg = format!(
                                        "log unavailable: pod {pod} was deleted before its output could be read"
                                    );
                                    self.write_data(&step, msg.as_bytes(), at);
                                }
                                finished = finish.or(finished);
                            }
                        }
                        self.progress.container += 1;
                        self.progress.last_ts = None;
                        self.progress.seen_at_ts = 0;
                        self.progress.container_lines = 0;
                        self.persist(true).await?;
                    }
                }
            }
            if ran || self.progress.started {
                let end = self.clamp_forward(finished.unwrap_or_else(jiff::Timestamp::now));
                self.write_start(&step, end);
                self.push_line(
                    LogLine::control(step.log_id, StepStatus::End, &step.name, step.kind, &step.command, end),
                    end,
                );
            }
            self.progress.step += 1;
            self.pending_start = None;
            self.progress.started = false;
            self.progress.container = 0;
            self.progress.last_ts = None;
            self.progress.seen_at_ts = 0;
            self.progress.container_lines = 0;
            self.flush().await?;
            self.persist(true).await?;
        }
        Ok(())
    }

    /// The run's secret values, retried until the Secret is read or known to be absent: streaming
    /// without them could leak them.
    async fn load_masker(&self) -> Masker {
        let Some(name) = self.target.secret_name.clone() else { return Masker::none() };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.target.namespace);
        let mut delay = self.settings.poll_interval;
        loop {
            match api.get_opt(&name).await {
                Ok(Some(secret)) => {
                    let mut values: Vec<String> = Vec::new();
                    for v in secret.data.unwrap_or_default().into_values() {
                        values.push(String::from_utf8_lossy(&v.0).into_owned());
                    }
                    values.extend(secret.string_data.unwrap_or_default().into_values());
                    return Masker::new(values);
                }
                Ok(None) => return Masker::none(),
                Err(e) => {
                    tracing::warn!(error = %e, secret = %name, "cannot read the run's secrets for masking; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn resolve(&self, step: &LoggedStep) -> Result<Source, kube::Error> {
        let trs: Api<TaskRun> = Api::namespaced(self.client.clone(), &self.target.namespace);
        let list = trs
            .list(
                &ListParams::default().labels(&format!("{LABEL_PIPELINE_RUN}={}", self.target.pipeline_run)),
            )
            .await?;
        let per_step = list.items.iter().find(|tr| {
            tr.metadata.labels.as_ref().and_then(|l| l.get(LABEL_PIPELINE_TASK)) == Some(&step.task)
        });
        let (taskrun, containers) = if let Some(tr) = per_step {
            let status = tr.status.clone().unwrap_or_default();
            let containers: Vec<String> = status
                .steps
                .iter()
                .map(
                    |s| if s.container.is_empty() { format!("step-{}", s.name) } else { s.container.clone() },
                )
                .collect();
            if containers.is_empty() {
                return Ok(if taskrun_done(tr) { Source::NeverRan } else { Source::Wait });
            }
            (tr.clone(), containers)
        } else if let Some((tr, index)) = list.items.iter().find_map(|tr| {
            let status = tr.status.as_ref()?;
            status.steps.iter().position(|s| s.name == step.task).map(|i| (tr, i))
        }) {
            let steps = tr.status.as_ref().map(|s| s.steps.as_slice()).unwrap_or_default();
            let state = &steps[index];
            // Tekton skips every step after a failed one (its entrypoint then only prints
            // "Skipping step…"); Go shows nothing for steps that did not run.
            let earlier_failed =
                steps[..index].iter().any(|s| s.terminated.as_ref().is_some_and(|t| t.exit_code != 0));
            if state.termination_reason.as_deref() == Some("Skipped") || earlier_failed {
                return Ok(Source::NeverRan);
            }
            let container = if state.container.is_empty() {
                format!("step-{}", step.task)
            } else {
                state.container.clone()
            };
            (tr.clone(), vec![container])
        } else {
            let prs: Api<PipelineRun> = Api::namespaced(self.client.clone(), &self.target.namespace);
            return Ok(match prs.get_opt(&self.target.pipeline_run).await? {
                None => Source::NeverRan,
                Some(pr) => {
                    let done = pr
                        .status
                        .as_ref()
                        .and_then(|s| succeeded(&s.conditions))
                        .is_some_and(|c| c.status != "Unknown");
                    if done { Source::NeverRan } else { Source::Wait }
                }
            });
        };
        match taskrun.status.as_ref().and_then(|s| s.pod_name.clone()).filter(|p| !p.is_empty()) {
            Some(pod) => Ok(Source::Pod { pod, containers, taskrun: Box::new(taskrun) }),
            None if taskrun_done(&taskrun) => Ok(Source::NeverRan),
            None => Ok(Source::Wait),
        }
    }

    /// The step's start and finish as Tekton recorded them (fresh TaskRun), for a pod that is gone.
    async fn taskrun_step_times(
        &self,
        taskrun: &TaskRun,
        container: &str,
    ) -> (Option<jiff::Timestamp>, Option<jiff::Timestamp>) {
        let trs: Api<TaskRun> = Api::namespaced(self.client.clone(), &self.target.namespace);
        let fresh = match taskrun.metadata.name.as_deref() {
            Some(name) => trs.get_opt(name).await.ok().flatten(),
            None => None,
        };
        let Some(status) = fresh.and_then(|t| t.status).or_else(|| taskrun.status.clone()) else {
            return (None, None);
        };
        let step = status.steps.iter().find(|s| s.container == container);
        let terminated = step.and_then(|s| s.terminated.as_ref());
        let start = terminated
            .and_then(|t| t.started_at.as_ref())
            .or_else(|| step.and_then(|s| s.running.as_ref()).and_then(|r| r.started_at.as_ref()))
            .map(|t| t.0);
        let finish = terminated
            .and_then(|t| t.finished_at.as_ref())
            .map(|t| t.0)
            .or(status.completion_time.map(|t| t.0));
        (start, finish)
    }

    /// Follow one container until it terminates (or its pod disappears).
    async fn follow_container(
        &mut self,
        step: &LoggedStep,
        pod_name: &str,
        container: &str,
    ) -> Result<Ended, LogError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.target.namespace);
        // Wait for the container to start.
        loop {
            match pods.get_opt(pod_name).await {
                Ok(None) => return Ok(Ended::Gone { streamed: false }),
                Ok(Some(pod)) => {
                    let status = container_status(&pod, container);
                    let state = status.and_then(|s| s.state.clone()).unwrap_or_default();
                    if state.running.is_some() || state.terminated.is_some() {
                        if !self.progress.started && self.pending_start.is_none() {
                            self.pending_start = started_time(status);
                        }
                        break;
                    }
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    if phase == "Succeeded" || phase == "Failed" || pod.metadata.deletion_timestamp.is_some()
                    {
                        return Ok(Ended::NeverStarted);
                    }
                }
                Err(e) => tracing::debug!(error = %e, pod = pod_name, "reading the pod failed"),
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }

        let mut asm = LineAssembler::new(self.settings.max_line_bytes, self.masker.clone(), true);
        let mut backoff = self.settings.poll_interval.min(Duration::from_millis(200));
        let mut streamed = false;
        loop {
            let params = LogParams {
                container: Some(container.to_owned()),
                follow: true,
                timestamps: true,
                // The API server rounds sinceTime to seconds; floor it ourselves so rounding up
                // never skips a line, and drop what we already have below.
                since_time: self
                    .progress
                    .last_ts
                    .and_then(|t| jiff::Timestamp::from_second(t.as_second()).ok()),
                ..LogParams::default()
            };
            let mut skip_at_ts = self.progress.seen_at_ts;
            let mut skipping = false;
            let reader = match pods.log_stream(pod_name, &params).await {
                Ok(r) => {
                    streamed = true;
                    Some(r)
                }
                Err(e) if is_not_found(&e) => return Ok(Ended::Gone { streamed }),
                Err(e) => {
                    tracing::debug!(error = %e, pod = pod_name, container, "opening the log stream failed");
                    None
                }
            };
            if let Some(reader) = reader {
                let mut reader = std::pin::pin!(reader);
                loop {
                    match self.read_some(&mut reader).await? {
                        Some(Ok([])) => break,
                        Some(Ok(bytes)) => {
                            backoff = self.settings.poll_interval.min(Duration::from_millis(200));
                            let n = bytes.len();
                            asm.push(bytes, &mut |seg| {
                                self.take_segment(step, seg, &mut skipping, &mut skip_at_ts)
                            });
                            reader.as_mut().consume(n);
                            self.persist(false).await?;
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, pod = pod_name, container, "log stream broke");
                            break;
                        }
                        None => {
                            tracing::debug!(pod = pod_name, container, "log stream idle; reconnecting");
                            break;
                        }
                    }
                }
            }
            // The stream ended: finished, dropped, or idle. Ask the pod which.
            match pods.get_opt(pod_name).await {
                Ok(None) => {
                    self.end_partial(step, &mut asm, &mut skipping, &mut skip_at_ts);
                    self.flush().await?;
                    return Ok(Ended::Gone { streamed });
                }
                Ok(Some(pod)) => {
                    let status = container_status(&pod, container);
                    let state = status.and_then(|s| s.state.clone()).unwrap_or_default();
                    if let Some(t) = state.terminated {
                        if !self.progress.started {
                            self.pending_start = started_time(status).or(self.pending_start);
                        }
                        // Terminated: what we read is complete unless the stream broke, so read
                        // once more from the last position to be sure, then stop.
                        if self.drain_terminated(step, &pods, pod_name, container, &mut asm).await? {
                            let finished = t.finished_at.map(|f| f.0);
                            self.flush().await?;
                            return Ok(Ended::Terminated { finished });
                        }
                        continue;
                    }
                    // Still running: drop a partial line (it will be sent again) unless pieces of
                    // it were already written, in which case count it as written.
                    self.end_partial(step, &mut asm, &mut skipping, &mut skip_at_ts);
                    self.flush().await?;
                }
                Err(e) => tracing::debug!(error = %e, pod = pod_name, "reading the pod failed"),
            }
            self.hub.metrics().stream_reconnects.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The next bytes of a log stream, read in place from the HTTP client's buffer (empty at
    /// the end; the caller consumes what it used): `None` when the stream stayed idle for
    /// `idle_timeout`. Queued lines go to the writer whenever the stream has nothing ready (and
    /// once a batch is full), so they reach the file and viewers as soon as the step pauses, and
    /// in large batches while it prints fast.
    async fn read_some<'r, R: AsyncBufRead + Unpin>(
        &mut self,
        reader: &'r mut R,
    ) -> Result<Option<std::io::Result<&'r [u8]>>, LogError> {
        // Filling is cancel-safe: bytes that arrived stay buffered for the fill below. An error
        // is returned from here: the stream reports it once, then only its end.
        let peek = if self.log.as_ref().is_some_and(RunLog::should_flush) {
            None
        } else {
            futures::FutureExt::now_or_never(reader.fill_buf()).map(|r| r.map(|bytes| !bytes.is_empty()))
        };
        match peek {
            Some(Ok(true)) => {}
            Some(Err(e)) => {
                self.flush().await?;
                return Ok(Some(Err(e)));
            }
            // Waiting, at the end, or a full batch: what is queued goes out first.
            Some(Ok(false)) | None => self.flush().await?,
        }
        Ok(tokio::time::timeout(self.settings.idle_timeout, reader.fill_buf()).await.ok())
    }

    /// After the container terminated: read the log (not following) from the last position to
    /// EOF and write what is new. Returns false when that read failed and must be retried.
    async fn drain_terminated(
        &mut self,
        step: &LoggedStep,
        pods: &Api<Pod>,
        pod_name: &str,
        container: &str,
        asm: &mut LineAssembler,
    ) -> Result<bool, LogError> {
        if asm.mid_line() {
            let (mut skipping, mut skip) = (false, 0);
            self.end_partial(step, asm, &mut skipping, &mut skip);
        } else {
            asm.reset();
        }
        let params = LogParams {
            container: Some(container.to_owned()),
            follow: false,
            timestamps: true,
            since_time: self.progress.last_ts.and_then(|t| jiff::Timestamp::from_second(t.as_second()).ok()),
            ..LogParams::default()
        };
        let mut reader = match pods.log_stream(pod_name, &params).await {
            Ok(r) => std::pin::pin!(r),
            Err(e) if is_not_found(&e) => return Ok(true),
            Err(e) => {
                tracing::debug!(error = %e, pod = pod_name, container, "reading the final log failed");
                return Ok(false);
            }
        };
        let mut skip_at_ts = self.progress.seen_at_ts;
        let mut skipping = false;
        loop {
            match self.read_some(&mut reader).await? {
                Some(Ok([])) => break,
                Some(Ok(bytes)) => {
                    let n = bytes.len();
                    asm.push(bytes, &mut |seg| self.take_segment(step, seg, &mut skipping, &mut skip_at_ts));
                    reader.as_mut().consume(n);
                }
                Some(Err(_)) | None => {
                    asm.reset();
                    return Ok(false);
                }
            }
        }
        asm.finish(&mut |seg| self.take_segment(step, seg, &mut skipping, &mut skip_at_ts));
        Ok(true)
    }

    /// A connection ended with a partial line buffered.
    fn end_partial(
        &mut self,
        step: &LoggedStep,
        asm: &mut LineAssembler,
        skipping: &mut bool,
        skip_at_ts: &mut u64,
    ) {
        if asm.mid_line() {
            // Pieces of an over-long line are out: finish it so it counts as written; the
            // kubelet's resend of the whole line is then skipped instead of duplicated.
            asm.finish(&mut |seg| self.take_segment(step, seg, skipping, skip_at_ts));
        } else {
            asm.reset();
        }
    }

    /// Dedupe, then write one segment.
    fn take_segment(
        &mut self,
        step: &LoggedStep,
        seg: Segment<'_>,
        skipping: &mut bool,
        skip_at_ts: &mut u64,
    ) {
        if seg.first {
            *skipping = match (seg.ts, self.progress.last_ts) {
                (Some(ts), Some(last)) if ts < last => true,
                (Some(ts), Some(last)) if ts == last && *skip_at_ts > 0 => {
                    *skip_at_ts -= 1;
                    true
                }
                _ => false,
            };
        }
        if *skipping {
            return;
        }
        let time = seg.ts.or(self.progress.last_time).unwrap_or_else(jiff::Timestamp::now);
        self.write_start(step, time);
        self.write_data(step, &seg.content, time);
        if seg.last {
            if let Some(ts) = seg.ts {
                if Some(ts) == self.progress.last_ts {
                    self.progress.seen_at_ts += 1;
                } else {
                    self.progress.last_ts = Some(ts);
                    self.progress.seen_at_ts = 1;
                }
            }
            self.progress.container_lines += 1;
        }
    }

    /// Write the step's `start` line once. Its time is the container's start, but never after the
    /// first output and never before the previous line.
    fn write_start(&mut self, step: &LoggedStep, first_output: jiff::Timestamp) {
        if self.progress.started {
            return;
        }
        let started = self.pending_start.take();
        let time = self.clamp_forward(started.map_or(first_output, |s| s.min(first_output)));
        self.push_line(
            LogLine::control(step.log_id, StepStatus::Start, &step.name, step.kind, &step.command, time),
            time,
        );
        self.progress.started = true;
    }

    fn write_data(&mut self, step: &LoggedStep, content: &[u8], time: jiff::Timestamp) {
        self.note_time(time);
        if let Some(log) = self.log.as_mut() {
            log.push_data(step.log_id, content, time);
        }
    }

    /// `line` was built with `time`.
    fn push_line(&mut self, line: LogLine, time: jiff::Timestamp) {
        self.note_time(time);
        if let Some(log) = self.log.as_mut() {
            log.push(&line);
        }
    }

    fn note_time(&mut self, t: jiff::Timestamp) {
        self.progress.last_time = Some(self.progress.last_time.map_or(t, |l| l.max(t)));
    }

    fn clamp_forward(&self, t: jiff::Timestamp) -> jiff::Timestamp {
        self.progress.last_time.map_or(t, |l| l.max(t))
    }

    async fn flush(&mut self) -> Result<(), LogError> {
        match self.log.as_mut() {
            Some(log) => log.flush().await,
            None => Ok(()),
        }
    }

    /// Record the position (throttled unless `now`).
    async fn persist(&mut self, now: bool) -> Result<(), LogError> {
        if !now && self.last_persist.elapsed() < self.settings.persist_interval {
            return Ok(());
        }
        // The saved offset must cover every line the saved progress accounts for.
        let Some(log) = self.log.as_mut() else { return Ok(()) };
        let file_offset = log.sync().await?;
        let state = serde_json::to_string(&self.progress)
            .map_err(|e| LogError::Invalid(format!("encoding the log position: {e}")))?;
        self.store
            .save_log_position(LogPosition {
                log_file: self.target.log_file(),
                run_uid: self.target.run_uid.clone(),
                file_offset,
                state,
                done: self.progress.done,
            })
            .await?;
        self.last_persist = std::time::Instant::now();
        Ok(())
    }
}

fn taskrun_done(tr: &TaskRun) -> bool {
    tr.status.as_ref().and_then(|s| succeeded(&s.conditions)).is_some_and(|c| c.status != "Unknown")
}

fn container_status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|c| c.name == container)
}

/// When the container started: Tekton's entrypoint records the real step start in the
/// termination message (milliseconds); otherwise the kubelet's (seconds).
fn started_time(status: Option<&ContainerStatus>) -> Option<jiff::Timestamp> {
    let state = status?.state.as_ref()?;
    if let Some(t) = &state.terminated {
        if let Some(msg) = &t.message
            && let Ok(entries) = serde_json::from_str::<Vec<BTreeMap<String, serde_json::Value>>>(msg)
        {
            for e in entries {
                if e.get("key").and_then(|k| k.as_str()) == Some("StartedAt")
                    && let Some(v) = e.get("value").and_then(|v| v.as_str())
                    && let Ok(ts) = v.parse()
                {
                    return Some(ts);
                }
            }
        }
        return t.started_at.as_ref().map(|t| t.0);
    }
    state.running.as_ref()?.started_at.as_ref().map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::logs::fake::{FakeCluster, LogMode, workflow_run};
    use crate::plan::PlanSettings;

    const BUILD: (&str, &str) = ("Build", "echo building; cat README; ls");
    const TEST: (&str, &str) = ("Test", "for i in 1 2 3; do echo test $i; sleep 0.3; done");

    struct Harness {
        _tmp: tempfile::TempDir,
        store: Store,
        hub: LogHub,
        settings: LogSettings,
        dir: PathBuf,
    }

    /// Whichever thread encodes a batch (the writer; the follower when the writer is behind,
    /// here forced for every batch; or either, with a one-batch queue), the file holds exactly
    /// the lines in order, as `LogLine` encodes them.
    #[tokio::test]
    async fn batches_encoded_by_either_thread_write_the_same_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t0: jiff::Timestamp = "2026-11-21T12:00:00.5Z".parse().expect("ts");
        let mut want = Vec::new();
        for (queue, encode_here) in [(WRITE_QUEUE, false), (WRITE_QUEUE, true), (1, false)] {
            let path = tmp.path().join(format!("q{queue}-{encode_here}.log"));
            let hub = LogHub::new(8);
            let mut log = RunLog::with_queue(LogFile::open(&path, 0).expect("open"), hub, "k".into(), queue)
                .expect("writer");
            log.encode_here = encode_here;
            want.clear();
            for i in 0..3000i64 {
                let time = t0 + jiff::SignedDuration::from_millis(i);
                let json = if i % 500 == 0 {
                    let line = LogLine::control(i, StepStatus::Start, "Build", 1, "make <all>", time);
                    log.push(&line);
                    line.to_json()
                } else {
                    let content = format!("line {i} <\"{}\"> \u{2028} é", "x".repeat((i % 97) as usize));
                    let mut raw = content.clone().into_bytes();
                    if i % 7 == 0 {
                        raw.push(0xff);
                    }
                    log.push_data(i % 5, &raw, time);
                    // Go writes an invalid byte as the escape `\ufffd`.
                    let text = if i % 7 == 0 { format!("{content}\u{fffd}") } else { content };
                    LogLine::data(i % 5, text, time).to_json().replace('\u{fffd}', "\\ufffd")
                };
                want.extend_from_slice(json.as_bytes());
                want.push(b'\n');
                if i % 3 == 0 {
                    log.flush().await.expect("flush");
                }
            }
            let end = log.sync().await.expect("sync");
            let written = std::fs::read(&path).expect("read");
            let case = format!("queue {queue}, encode_here {encode_here}");
            assert_eq!(end, written.len() as u64, "{case}");
            assert!(written == want, "{case}: the file differs from the lines pushed");
        }
    }

    fn harness() -> Harness {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("logs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let store = Store::open(tmp.path().join("spindle.db")).expect("store");
        let settings = LogSettings {
            poll_interval: Duration::from_millis(20),
            idle_timeout: Duration::from_millis(300),
            persist_interval: Duration::ZERO,
            max_line_bytes: 1024,
            ..LogSettings::new(&dir)
        };
        Harness { _tmp: tmp, store, hub: LogHub::new(64), settings, dir }
    }

    fn target(fake: &FakeCluster, uid: &str, steps: &[(&str, &str)]) -> RunTarget {
        let run = workflow_run(&fake.namespace(), uid, steps);
        let plan = crate::plan::plan(&run.spec, &PlanSettings::test()).expect("plan");
        RunTarget::new(&run, &plan, &fake.pipeline_run, "default").expect("target")
    }

    fn add_secret(fake: &FakeCluster, value: &str) {
        use base64::Engine as _;
        let ns = fake.namespace();
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "run-secrets", "namespace": ns},
            "data": {"TOKEN": base64::engine::general_purpose::STANDARD.encode(value)}
        });
        fake.lock().objects.insert(("Secret".into(), "run-secrets".into()), secret);
    }

    async fn follow(h: &Harness, fake: &FakeCluster, target: &RunTarget) -> String {
        let f =
            Follower::new(fake.client(), h.store.clone(), h.hub.clone(), h.settings.clone(), target.clone());
        tokio::time::timeout(Duration::from_secs(20), f.run()).await.expect("follower finishes").expect("ok");
        read(&h.dir, target)
    }

    fn read(dir: &Path, target: &RunTarget) -> String {
        std::fs::read_to_string(dir.join(target.log_file())).expect("log file")
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().expect("timestamp")
    }

    fn ctl(step: &LoggedStep, status: StepStatus, time: &str) -> String {
        LogLine::control(step.log_id, status, &step.name, step.kind, &step.command, ts(time)).to_json() + "\n"
    }

    fn data(step: &LoggedStep, content: &str, time: &str) -> String {
        LogLine::data(step.log_id, content, ts(time)).to_json() + "\n"
    }

    /// What following the recorded per-step-success run must write, with "the repo" as a secret.
    fn expected_success(t: &RunTarget) -> String {
        expected_success_with(t, "2026-11-21T12:02:43.264Z")
    }

    /// The same, for when step 2 was followed live: its start line was written while the
    /// container ran, when only the kubelet's whole-second start time was known (12:02:43),
    /// which is then kept after the previous step's end.
    fn expected_live_success(t: &RunTarget) -> String {
        expected_success_with(t, "2026-11-21T12:02:43.031070242Z")
    }

    fn expected_success_with(t: &RunTarget, test_start: &str) -> String {
        let (clone, build, test) = (&t.steps[0], &t.steps[1], &t.steps[2]);
        [
            ctl(clone, StepStatus::Start, "2026-11-21T12:02:42.724Z"),
            data(clone, "cloning", "2026-11-21T12:02:42.768224119Z"),
            ctl(clone, StepStatus::End, "2026-11-21T12:02:42.768224119Z"),
            ctl(build, StepStatus::Start, "2026-11-21T12:02:42.994Z"),
            data(build, "building", "2026-11-21T12:02:43.029070389Z"),
            data(build, "hello from ***", "2026-11-21T12:02:43.029926321Z"),
            data(build, "README", "2026-11-21T12:02:43.031070242Z"),
            ctl(build, StepStatus::End, "2026-11-21T12:02:43.031070242Z"),
            ctl(test, StepStatus::Start, test_start),
            data(test, "test 1", "2026-11-21T12:02:43.298265327Z"),
            data(test, "test 2", "2026-11-21T12:02:43.599701353Z"),
            data(test, "test 3", "2026-11-21T12:02:43.90089915Z"),
            ctl(test, StepStatus::End, "2026-11-21T12:02:44Z"),
        ]
        .concat()
    }

    #[test]
    fn timestamp_prefixes_parse_exactly_like_jiff() {
        let inputs = [
            "2026-11-21T12:02:43.029070389Z",
            "2026-11-21T12:02:43.1Z",
            "2026-11-21T12:02:43Z",
            "2026-11-21T12:02:43.000000000Z",
            "2026-11-21T12:02:43.0290703891Z",
            "2026-11-21T12:02:43.Z",
            "2026-11-21T12:02:43.12a4Z",
            "2026-11-21T12:02:43,5Z",
            "2026-11-21T12:02:43.5+02:00",
            "2026-11-21T12:02:43.5z",
            "2026-11-21T12:02:44.999999999Z",
            "2016-12-31T23:59:60.5Z",
            "2016-12-31T23:59:60.7Z",
            "1969-12-31T23:59:59.5Z",
            "1969-12-31T23:59:59.25Z",
            "garbage",
            "2026-11-21T12:02:43",
            "",
        ];
        let mut shared = TsParser::default();
        for round in 0..2 {
            for input in inputs {
                let want: Option<jiff::Timestamp> = input.parse().ok();
                assert_eq!(shared.parse(input.as_bytes()), want, "{input} (round {round})");
                assert_eq!(TsParser::default().parse(input.as_bytes()), want, "{input}");
            }
        }
    }

    #[test]
    fn expected_lines_look_like_the_go_fixture() {
        let fake = FakeCluster::scenario("per-step-success");
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        let text = expected_success(&t);
        let first = text.lines().next().expect("line");
        assert!(first.starts_with(r#"{"kind":"control","content":"Clone repository into workspace","time":"2026-11-21T12:02:42.724Z","step_id":0,"step_status":"start","step_command":"git init\ngit remote add origin https://knot1.tangled.sh/"#), "{first}");
    }

    #[tokio::test]
    async fn follows_a_per_step_run_with_chunked_bodies_and_masks_secrets() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        let text = follow(&h, &fake, &t).await;
        assert_eq!(text, expected_success(&t));
        // The image engines' setup step is not logged, so its container is never read.
        assert!(fake.log_requests("wf-8mxlg-setup-pod", "step-setup").is_empty());
        let reqs = fake.log_requests("wf-8mxlg-step-1-build-pod", "step-run");
        assert!(!reqs.is_empty(), "{:#?}", fake.lock().requests);
        assert!(reqs[0].contains("follow=true") && reqs[0].contains("timestamps=true"), "{reqs:?}");
        let pos = h.store.log_position(&t.log_file()).await.expect("pos").expect("some");
        assert!(pos.done);
        assert_eq!(pos.file_offset, text.len() as u64);
        // Following the same finished run again writes nothing new.
        let again = follow(&h, &fake, &t).await;
        assert_eq!(again, text);
    }

    #[tokio::test]
    async fn reconnects_after_a_drop_and_an_idle_stream_without_duplicates() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let pod = "wf-8mxlg-step-2-test-pod";
        let key = (pod.to_owned(), "step-run".to_owned());
        {
            let mut st = fake.lock();
            let done = st.objects[&("Pod".to_owned(), pod.to_owned())].clone();
            let mut running = done.clone();
            running["status"]["phase"] = "Running".into();
            running["status"]["containerStatuses"][0]["state"] =
                serde_json::json!({"running": {"startedAt": "2026-11-21T12:02:43Z"}});
            st.objects.insert(("Pod".to_owned(), pod.to_owned()), running);
            // The container finishes while the second connection is open.
            st.pod_after.insert(key.clone(), (2, done));
            let l1 = "2026-11-21T12:02:43.298265327Z test 1\n".len();
            let l2 = "2026-11-21T12:02:43.599701353Z test 2\n".len();
            st.modes.insert(key.clone(), [LogMode::BreakAfter(l1 + 10), LogMode::StallAfter(l1 + l2)].into());
        }
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        let text = follow(&h, &fake, &t).await;
        assert_eq!(text, expected_live_success(&t));
        let reqs = fake.log_requests(pod, "step-run");
        assert_eq!(reqs.len(), 3, "{reqs:#?}");
        assert_eq!(
            h.hub.metrics().stream_reconnects.get(),
            1,
            "reopened once while running; then the final read"
        );
        assert_eq!(h.hub.metrics().lines_written.get(), text.lines().count() as u64);
        assert!(!reqs[0].contains("sinceTime"), "{}", reqs[0]);
        // The API server takes whole seconds; we floor to the last line's second and skip
        // what we already have.
        assert!(reqs[1].contains("sinceTime=2026-11-21T12%3A02%3A43Z") && reqs[1].contains("follow=true"));
        assert!(reqs[2].contains("sinceTime=2026-11-21T12%3A02%3A43Z") && !reqs[2].contains("follow=true"));
    }

    /// The final (non-follow) read of a terminated container breaks mid-line: that read is
    /// retried, never taken as the end of the log (which would cut the line and lose the rest).
    #[tokio::test]
    async fn a_broken_final_read_is_retried_not_taken_as_the_end() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let pod = "wf-8mxlg-step-2-test-pod";
        let key = (pod.to_owned(), "step-run".to_owned());
        {
            let l1 = "2026-11-21T12:02:43.298265327Z test 1\n".len();
            let l2 = "2026-11-21T12:02:43.599701353Z test 2\n".len();
            // The follow stream breaks inside line 2, the final read inside line 3.
            fake.lock()
                .modes
                .insert(key, [LogMode::BreakAfter(l1 + 5), LogMode::BreakAfter(l1 + l2 + 5)].into());
        }
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        let text = follow(&h, &fake, &t).await;
        assert_eq!(text, expected_success(&t));
        let reqs = fake.log_requests(pod, "step-run");
        assert_eq!(reqs.len(), 4, "follow, broken final read, follow again, final read: {reqs:#?}");
        assert!(!reqs[1].contains("follow=true") && reqs[2].contains("follow=true"), "{reqs:#?}");
    }

    #[tokio::test]
    async fn a_restart_resumes_from_the_persisted_position() {
        let h = harness();
        let pod = "wf-8mxlg-step-2-test-pod";
        let t;
        {
            // First life: step 2 is running and has printed one line.
            let fake = FakeCluster::scenario("per-step-success");
            add_secret(&fake, "the repo");
            {
                let mut st = fake.lock();
                let p = st.objects.get_mut(&("Pod".to_owned(), pod.to_owned())).expect("pod");
                p["status"]["containerStatuses"][0]["state"] =
                    serde_json::json!({"running": {"startedAt": "2026-11-21T12:02:43Z"}});
                st.logs.insert(
                    (pod.to_owned(), "step-run".to_owned()),
                    "2026-11-21T12:02:43.298265327Z test 1\n".into(),
                );
            }
            t = target(&fake, "uid-1", &[BUILD, TEST]);
            let f =
                Follower::new(fake.client(), h.store.clone(), h.hub.clone(), h.settings.clone(), t.clone());
            let task = tokio::spawn(f.run());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let pos = h.store.log_position(&t.log_file()).await.expect("pos");
                if let Some(pos) = pos {
                    let p: Progress = serde_json::from_str(&pos.state).expect("state");
                    if p.step == 2 && p.container_lines == 1 {
                        break;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "first life never got to test 1");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            task.abort();
            let _ = task.await;
        }
        // A line written after the last saved position (the process died before saving) must
        // not survive into the resumed log.
        let path = h.dir.join(t.log_file());
        let mut partial = read(&h.dir, &t);
        partial.push_str("{\"kind\":\"data\",\"content\":\"test 2\"");
        std::fs::write(&path, &partial).expect("write");

        // Second life: the run finished meanwhile.
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let text = follow(&h, &fake, &t).await;
        assert_eq!(text, expected_live_success(&t));
        // Only the unfinished container was read again, from its last second.
        assert!(fake.log_requests("wf-8mxlg-clone-pod", "step-clone").is_empty());
        assert!(fake.log_requests("wf-8mxlg-step-1-build-pod", "step-run").is_empty());
        let reqs = fake.log_requests(pod, "step-run");
        assert!(reqs.iter().all(|r| r.contains("sinceTime=2026-11-21T12%3A02%3A43Z")), "{reqs:#?}");
    }

    #[tokio::test]
    async fn a_pod_deleted_before_it_was_read_says_so() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-timeout");
        let t = target(&fake, "uid-1", &[("Slow", "sleep 60")]);
        let text = follow(&h, &fake, &t).await;
        let (clone, slow) = (&t.steps[0], &t.steps[1]);
        let expected = [
            ctl(clone, StepStatus::Start, "2026-11-21T12:20:03.066Z"),
            data(clone, "cloning", "2026-11-21T12:20:03.103502724Z"),
            ctl(clone, StepStatus::End, "2026-11-21T12:20:03.103502724Z"),
            ctl(slow, StepStatus::Start, "2026-11-21T12:20:03.103502724Z"),
            data(
                slow,
                "log unavailable: pod wf-kkj2v-step-1-slow-pod was deleted before its output could be read",
                "2026-11-21T12:20:03.103502724Z",
            ),
            ctl(slow, StepStatus::End, "2026-11-21T12:20:16Z"),
        ]
        .concat();
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn a_deleted_pod_whose_step_never_started_has_no_log() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-timeout");
        {
            // As if the step's image never pulled: Tekton never saw the container start.
            let mut st = fake.lock();
            let tr =
                st.objects.get_mut(&("TaskRun".to_owned(), "wf-kkj2v-step-1-slow".to_owned())).expect("tr");
            tr["status"]["steps"][0] = serde_json::json!({
                "name": "run", "container": "step-run",
                "waiting": {"reason": "ImagePullBackOff"}
            });
        }
        let t = target(&fake, "uid-1", &[("Slow", "sleep 60")]);
        let text = follow(&h, &fake, &t).await;
        let clone = &t.steps[0];
        let expected = [
            ctl(clone, StepStatus::Start, "2026-11-21T12:20:03.066Z"),
            data(clone, "cloning", "2026-11-21T12:20:03.103502724Z"),
            ctl(clone, StepStatus::End, "2026-11-21T12:20:03.103502724Z"),
        ]
        .concat();
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn follows_the_packed_layout_and_skips_skipped_steps() {
        let h = harness();
        let fake = FakeCluster::scenario("packed-fail");
        let t =
            target(&fake, "uid-1", &[("Build", "echo build"), ("Boom", "exit 4"), ("Never", "echo never")]);
        let text = follow(&h, &fake, &t).await;
        let (clone, build, boom) = (&t.steps[0], &t.steps[1], &t.steps[2]);
        let expected = [
            ctl(clone, StepStatus::Start, "2026-11-21T12:19:55.181Z"),
            data(clone, "cloning", "2026-11-21T12:19:55.236725853Z"),
            ctl(clone, StepStatus::End, "2026-11-21T12:19:55.236725853Z"),
            ctl(build, StepStatus::Start, "2026-11-21T12:19:55.281Z"),
            data(build, "build", "2026-11-21T12:19:55.333113257Z"),
            data(build, "repo", "2026-11-21T12:19:55.333693119Z"),
            ctl(build, StepStatus::End, "2026-11-21T12:19:55.333693119Z"),
            ctl(boom, StepStatus::Start, "2026-11-21T12:19:55.372Z"),
            data(boom, "about-to-fail", "2026-11-21T12:19:55.42502103Z"),
            ctl(boom, StepStatus::End, "2026-11-21T12:19:55.42502103Z"),
        ]
        .concat();
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn packed_steps_after_a_failed_one_are_not_logged_even_before_tekton_marks_them() {
        let h = harness();
        let fake = FakeCluster::scenario("packed-fail");
        {
            // Live: step 3 is still "running" (its entrypoint is about to print "Skipping step…").
            let mut st = fake.lock();
            let tr = st.objects.get_mut(&("TaskRun".to_owned(), "wf-xbq7w-workflow".to_owned())).expect("tr");
            tr["status"]["steps"][4] = serde_json::json!({
                "name": "step-3-never", "container": "step-step-3-never",
                "running": {"startedAt": "2026-11-21T12:19:55Z"}
            });
        }
        let t =
            target(&fake, "uid-1", &[("Build", "echo build"), ("Boom", "exit 4"), ("Never", "echo never")]);
        let text = follow(&h, &fake, &t).await;
        assert!(!text.contains("Skipping") && !text.contains("\"content\":\"Never\""), "{text}");
        assert!(fake.log_requests("wf-xbq7w-workflow-pod", "step-step-3-never").is_empty());
    }

    #[tokio::test]
    async fn a_new_run_of_the_same_workflow_truncates_the_file() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let t = target(&fake, "uid-2", &[BUILD, TEST]);
        std::fs::write(h.dir.join(t.log_file()), "{\"old\":\"run\"}\n").expect("old log");
        h.store
            .save_log_position(LogPosition {
                log_file: t.log_file(),
                run_uid: "uid-1".into(),
                file_offset: 14,
                state: serde_json::to_string(&Progress { done: true, ..Progress::default() }).expect("json"),
                done: true,
            })
            .await
            .expect("save");
        let text = follow(&h, &fake, &t).await;
        assert_eq!(text, expected_success(&t));
    }

    #[tokio::test]
    async fn over_long_lines_are_split_and_bad_utf8_is_replaced() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        let pod = "wf-8mxlg-step-1-build-pod";
        let long = "x".repeat(2500);
        {
            let mut st = fake.lock();
            let mut log = format!("2026-11-21T12:02:43.029070389Z {long}\n").into_bytes();
            log.extend_from_slice(b"2026-11-21T12:02:43.03Z bad \xff byte\n");
            st.logs
                .insert((pod.to_owned(), "step-run".to_owned()), String::from_utf8_lossy(&log).into_owned());
        }
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        let text = follow(&h, &fake, &t).await;
        let build: Vec<LogLine> = text
            .lines()
            .map(|l| serde_json::from_str::<LogLine>(l).expect("line"))
            .filter(|l| l.step_id == 1 && l.step_status.is_none())
            .collect();
        let contents: Vec<&str> = build.iter().map(|l| l.content.as_str()).collect();
        assert_eq!(contents.len(), 4, "{contents:?}");
        assert_eq!(contents[..3].concat(), long);
        assert!(contents[..3].iter().all(|c| c.len() <= 1024));
        assert_eq!(contents[3], "bad \u{fffd} byte");
    }

    #[tokio::test]
    async fn log_service_follows_once_and_resumes_runs_after_a_restart() {
        let h = harness();
        let fake = FakeCluster::scenario("per-step-success");
        add_secret(&fake, "the repo");
        let run = workflow_run(&fake.namespace(), "uid-1", &[BUILD, TEST]);
        let plan = crate::plan::plan(&run.spec, &PlanSettings::test()).expect("plan");
        let service = super::super::LogService::new(fake.client(), h.store.clone(), h.settings.clone());
        let t = target(&fake, "uid-1", &[BUILD, TEST]);
        assert!(service.ensure_following(&run, &plan, &fake.pipeline_run).expect("start"));
        assert!(!service.ensure_following(&run, &plan, &fake.pipeline_run).expect("idempotent"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while service.is_following(&t.log_file()) {
            assert!(tokio::time::Instant::now() < deadline, "follower never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read(&h.dir, &t), expected_success(&t));

        // After a restart, a running WorkflowRun in the cluster is picked up again.
        let other = harness();
        let mut run = run.clone();
        let status = run.status.get_or_insert_with(Default::default);
        status.pipeline_run_name = Some(fake.pipeline_run.clone());
        status.phase = Some(crate::model::StatusKind::Running);
        fake.lock()
            .objects
            .insert(("WorkflowRun".into(), "knot1-run".into()), serde_json::to_value(&run).expect("json"));
        let service =
            super::super::LogService::new(fake.client(), other.store.clone(), other.settings.clone());
        let started = service.resume_all(&fake.namespace(), &PlanSettings::test()).await.expect("resume");
        assert_eq!(started, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while service.is_following(&t.log_file()) {
            assert!(tokio::time::Instant::now() < deadline, "follower never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read(&other.dir, &t), expected_success(&t));
    }
}
