//! The Raft logs of a node's groups and their small records (votes, commit hints, purge
//! points): files of our own instead of RocksDB column families.
//!
//! Through RocksDB every entry was copied into a write batch and a memtable, about three
//! quarters of the entries reached a table file before their purge, and each WAL fsync of the
//! growing file wrote the inode and the allocation metadata after the data: three device round
//! trips in a row, 0.83 ms per sync on average under W1 here. A segment whose entries are all
//! gone is reused, so a sync there overwrites blocks that are already allocated.
//!
//! Layout: `raftlog/seg-<seq>.log`, each a run of frames, one per writer round:
//! `magic u32 | seq u64 | synced u64 | len u32 | crc32 u32 | payload`, the checksum over all
//! but the magic, `synced` how far the segment was synced when the frame was written, and the
//! payload a run of records `kind u8 | a_len u32 | a | b_len u32 | b`. When the
//! next frame does not fit, the segment is sealed (a frame of one [`SEAL`] record) and synced,
//! and writing moves to a new segment that starts by repeating every record of `CF_META`: older
//! segments are then needed only for their entries. Segments whose entries are all gone
//! (purged, truncated or written again) go oldest first, once a sync has made the records that
//! removed them durable; a few are kept as `free-<seq>.log` to be reused. A group that stops
//! writing would pin its last entries' segment, and with it every later one: the few live
//! entries of a sparse oldest segment are written again at the end, and it goes at the next
//! sync.
//!
//! Replay reads every segment in order and applies every valid frame. A segment other than the
//! last must end with its seal (rotation syncs it), and the segment numbers must have no gap.
//! The last one ends at its first invalid frame: writes after the last completed sync may reach
//! the disk in any order, so a hole there is a torn round that was never acknowledged, and it
//! is dropped with everything after it. But a valid frame after the hole that says the
//! segment had been synced beyond it proves the hole was durable once: damage, which stops the
//! node, as RocksDB's absolute-consistency recovery did, instead of letting it forget entries
//! it acknowledged. (Damage inside the last synced round itself cannot be told from a torn
//! write.)

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::engine::{LogOp, CF_LOG, CF_META};

const MAGIC: u32 = 0x4d52_4c47;
const HEADER: usize = 28;
/// Emptied segments kept for reuse; more are deleted.
const MAX_FREE: usize = 4;

const PUT_LOG: u8 = 1;
const PUT_META: u8 = 2;
const DELETE_LOG: u8 = 3;
const DELETE_META: u8 = 4;
const RANGE_LOG: u8 = 5;
const RANGE_META: u8 = 6;
const SEAL: u8 = 7;

/// A sealing frame: the header and one empty [`SEAL`] record.
const SEAL_FRAME: usize = HEADER + 9;

/// Whether the segments, not RocksDB, hold column family `cf`.
pub fn holds(cf: &str) -> bool {
    cf == CF_LOG || cf == CF_META
}

/// Where an entry's value is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seq: u64,
    off: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Entries of `CF_LOG` whose newest value is here, and their bytes.
    live: usize,
    live_bytes: u64,
}

/// What replay and every write keep current, shared with readers.
#[derive(Default)]
struct Index {
    log: BTreeMap<Vec<u8>, Loc>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    fn forget(&mut self, loc: Loc) {
        if let Some(s) = self.segments.get_mut(&loc.seq) {
            s.live -= 1;
            s.live_bytes -= u64::from(loc.len);
        }
    }

    fn put_log(&mut self, key: &[u8], loc: Loc) {
        if let Some(s) = self.segments.get_mut(&loc.seq) {
            s.live += 1;
            s.live_bytes += u64::from(loc.len);
        }
        if let Some(old) = self.log.insert(key.to_vec(), loc) {
            self.forget(old);
        }
    }

    fn remove_log_range(&mut self, from: &[u8], to: &[u8]) {
        let mut removed = self.log.split_off(from);
        let mut kept = removed.split_off(to);
        self.log.append(&mut kept);
        for loc in removed.into_values() {
            self.forget(loc);
        }
    }

    /// Applies the records of a frame of segment `seq` whose payload starts at `at`.
    fn apply(&mut self, seq: u64, at: u64, payload: &[u8]) -> Result<bool, String> {
        let mut sealed = false;
        for r in Records::new(payload) {
            let (kind, a, b, b_at) = r?;
            match kind {
                PUT_LOG => {
                    let loc = Loc {
                        seq,
                        off: at + b_at as u64,
                        len: b.len() as u32,
                    };
                    self.put_log(a, loc);
                }
                PUT_META => {
                    self.meta.insert(a.to_vec(), b.to_vec());
                }
                DELETE_LOG => {
                    if let Some(old) = self.log.remove(a) {
                        self.forget(old);
                    }
                }
                DELETE_META => {
                    self.meta.remove(a);
                }
                RANGE_LOG => self.remove_log_range(a, b),
                RANGE_META => {
                    let mut removed = self.meta.split_off(a);
                    let mut kept = removed.split_off(b);
                    self.meta.append(&mut kept);
                }
                SEAL => sealed = true,
                other => return Err(format!("unknown record kind {other}")),
            }
        }
        Ok(sealed)
    }
}

/// The records of a payload: kind, a, b and where b starts in the payload.
struct Records<'a> {
    payload: &'a [u8],
    at: usize,
}

impl<'a> Records<'a> {
    fn new(payload: &'a [u8]) -> Self {
        Self { payload, at: 0 }
    }

    fn field(&mut self) -> Option<(&'a [u8], usize)> {
        let len_end = self.at.checked_add(4)?;
        let len = u32::from_le_bytes(self.payload.get(self.at..len_end)?.try_into().ok()?);
        let end = len_end.checked_add(len as usize)?;
        let field = self.payload.get(len_end..end)?;
        self.at = end;
        Some((field, len_end))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(u8, &'a [u8], &'a [u8], usize), String>;

    fn next(&mut self) -> Option<Self::Item> {
        let kind = *self.payload.get(self.at)?;
        self.at += 1;
        let parsed = (|| {
            let (a, _) = self.field()?;
            let (b, b_at) = self.field()?;
            Some((kind, a, b, b_at))
        })();
        Some(parsed.ok_or_else(|| {
            self.at = self.payload.len();
            "a record runs past its frame".to_string()
        }))
    }
}

fn push_record(buf: &mut Vec<u8>, kind: u8, a: &[u8], b: &[u8]) {
    buf.push(kind);
    buf.extend_from_slice(&(a.len() as u32).to_le_bytes());
    buf.extend_from_slice(a);
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

fn encode_ops(buf: &mut Vec<u8>, ops: &[LogOp]) {
    for op in ops {
        let log = op.cf() == CF_LOG;
        match op {
            LogOp::Put { key, value, .. } => {
                push_record(buf, if log { PUT_LOG } else { PUT_META }, key, value)
            }
            LogOp::Delete { key, .. } => {
                push_record(buf, if log { DELETE_LOG } else { DELETE_META }, key, &[])
            }
            LogOp::DeleteRange { from, to, .. } => {
                push_record(buf, if log { RANGE_LOG } else { RANGE_META }, from, to)
            }
        }
    }
}

/// The frame header's bytes after the magic and before the checksum.
fn header_fields(seq: u64, synced: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&synced.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

fn checksum(fields: &[u8; 20], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    h.update(payload);
    h.finalize()
}

/// Fills in the header of the frame in `frame` (its payload from byte [`HEADER`] on): of
/// segment `seq`, written when the segment was synced up to byte `synced`.
fn seal_header(frame: &mut [u8], seq: u64, synced: u64) -> io::Result<()> {
    let len = u32::try_from(frame.len() - HEADER)
        .map_err(|_| io::Error::other("a raft log frame of more than 4 GiB"))?;
    let fields = header_fields(seq, synced, len);
    let crc = checksum(&fields, &frame[HEADER..]);
    frame[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    frame[4..24].copy_from_slice(&fields);
    frame[24..28].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The valid frame of segment `seq` at `at` of `data`, if there is one: its payload, and how
/// far the segment was synced when it was written.
fn frame_at(data: &[u8], at: usize, seq: u64) -> Option<(&[u8], u64)> {
    let h = data.get(at..at.checked_add(HEADER)?)?;
    if h[0..4] != MAGIC.to_le_bytes() || h[4..12] != seq.to_le_bytes() {
        return None;
    }
    let fields: [u8; 20] = h[4..24].try_into().ok()?;
    let synced = u64::from_le_bytes(h[12..20].try_into().ok()?);
    let len = u32::from_le_bytes(h[20..24].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(h[24..28].try_into().ok()?);
    let payload = data.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    (checksum(&fields, payload) == crc).then_some((payload, synced))
}

fn damaged(path: &Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "the raft log segment {} is damaged ({what}). This node's data cannot be trusted: stop \
         it, delete its data directory and start it again to resync from its peers",
        path.display()
    ))
}

/// Passes `r` on; an error makes every later write fail: after a failed write or sync, what
/// the disk holds is unknown.
fn fail_on<T>(a: &mut Active, r: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &r {
        a.failed = Some(format!("a raft log segment write failed earlier: {e}"));
    }
    r
}

/// Checks the tail of the last segment from its first invalid frame at `at`: valid frames may
/// follow only if none says the segment was synced beyond `at`.
fn check_tail(path: &Path, data: &[u8], at: usize, seq: u64) -> io::Result<()> {
    // Zeros (a preallocated tail) hold no frame: look only up to the last byte written.
    let written = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let first = MAGIC.to_le_bytes()[0];
    for i in at + 1..written {
        if data[i] != first {
            continue;
        }
        if let Some((_, synced)) = frame_at(data, i, seq) {
            if synced > at as u64 {
                return Err(damaged(
                    path,
                    &format!(
                        "an invalid frame at byte {at}, though a valid one at {i} says the \
                         segment was synced to byte {synced}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// The segment being written; only the log writer thread touches it.
struct Active {
    seq: u64,
    /// `None` before the first segment exists.
    file: Option<Arc<File>>,
    off: u64,
    /// How far the segment is synced.
    synced: u64,
    size: u64,
    /// Emptied segments waiting for reuse.
    free: Vec<PathBuf>,
    /// Set by a failed write or sync: nothing after it can be trusted to reach the disk.
    failed: Option<String>,
    buf: Vec<u8>,
}

pub struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    index: Mutex<Index>,
    active: Mutex<Active>,
}

impl Segments {
    /// Replays the segments in `dir` (created if missing), then starts a new segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // Every time: a start that made it and died before this sync would otherwise leave
        // its entry unsynced for good.
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut found = BTreeMap::new();
        let mut free = Vec::new();
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let seq = |prefix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
            };
            if let Some(seq) = seq("seg-") {
                found.insert(seq, path);
            } else if seq("free-").is_some() {
                free.push(path);
            }
        }
        // Without segments, a free one could be renamed back to its own number and replayed.
        if found.is_empty() || free.len() > MAX_FREE {
            let keep = if found.is_empty() { 0 } else { MAX_FREE };
            for path in free.split_off(keep) {
                fs::remove_file(&path)?;
            }
            sync_dir(dir)?;
        }
        if let (Some(&first), Some(&last)) = (found.keys().next(), found.keys().next_back()) {
            if last - first + 1 != found.len() as u64 {
                return Err(damaged(
                    dir,
                    "a segment between the first and the last is missing",
                ));
            }
        }
        let mut index = Index::default();
        let last_seq = found.keys().next_back().copied();
        let mut active = None;
        for (&seq, path) in &found {
            let file = Arc::new(open_rw(path)?);
            let data = fs::read(path)?;
            index.segments.insert(
                seq,
                Segment {
                    file: file.clone(),
                    path: path.clone(),
                    live: 0,
                    live_bytes: 0,
                },
            );
            let mut at = 0;
            let mut sealed = false;
            while let Some((payload, _)) = frame_at(&data, at, seq) {
                sealed = index
                    .apply(seq, (at + HEADER) as u64, payload)
                    .map_err(|e| damaged(path, &e))?;
                at += HEADER + payload.len();
                if sealed {
                    break;
                }
            }
            if Some(seq) != last_seq {
                if !sealed {
                    return Err(damaged(path, &format!("no valid frame at byte {at}")));
                }
            } else if !sealed {
                check_tail(path, &data, at, seq)?;
                // The frames below `at` may still be only in the page cache (the last process
                // stopped without a sync): synced before the seal says so.
                file.sync_data()?;
                active = Some((seq, Some(file), at as u64, data.len() as u64));
            }
        }
        // Sealed (or none): the next write starts a segment.
        let (seq, file, off, size) = active.unwrap_or((last_seq.unwrap_or(0), None, 0, 0));
        let segments = Segments {
            dir: dir.to_path_buf(),
            segment_bytes,
            index: Mutex::new(index),
            active: Mutex::new(Active {
                seq,
                file,
                off,
                synced: off,
                size,
                free,
                failed: None,
                buf: Vec::new(),
            }),
        };
        // Always a new segment after a start: it opens with the records of CF_META, whatever
        // the last one held, and a torn tail is sealed over, not written after.
        {
            let mut a = segments.active.lock().expect("segment writer lock");
            segments.rotate(&mut a, 0)?;
            segments.sync(&mut a)?;
        }
        Ok(segments)
    }

    /// [`write_round`](Self::write_round), then, if synced, [`tidy`](Self::tidy).
    pub fn write(&self, ops: &[LogOp], sync: bool) -> io::Result<()> {
        self.write_round(ops, sync)?;
        if sync {
            self.tidy()?;
        }
        Ok(())
    }

    /// Writes `ops` (of [`holds`] column families) as one frame; with `sync`, durable on
    /// return, and so is everything written before.
    pub fn write_round(&self, ops: &[LogOp], sync: bool) -> io::Result<()> {
        let mut a = self.active.lock().expect("segment writer lock");
        if let Some(e) = &a.failed {
            return Err(io::Error::other(e.clone()));
        }
        if !ops.is_empty() {
            let result = self.append(&mut a, ops);
            fail_on(&mut a, result)?;
        }
        if sync {
            let result = self.sync(&mut a);
            fail_on(&mut a, result)?;
        }
        Ok(())
    }

    /// Lets go of segments whose entries are all gone (see `collect`), when everything
    /// written is synced, so that the records which removed those entries are durable. The
    /// writer calls it after a round's completions, not before them.
    pub fn tidy(&self) -> io::Result<()> {
        let mut a = self.active.lock().expect("segment writer lock");
        if a.failed.is_some() || a.synced != a.off {
            return Ok(());
        }
        let result = self.collect(&mut a);
        fail_on(&mut a, result)
    }

    fn sync(&self, a: &mut Active) -> io::Result<()> {
        if let Some(f) = &a.file {
            f.sync_data()?;
        }
        a.synced = a.off;
        Ok(())
    }

    fn append(&self, a: &mut Active, ops: &[LogOp]) -> io::Result<()> {
        let mut buf = std::mem::take(&mut a.buf);
        buf.clear();
        buf.resize(HEADER, 0);
        encode_ops(&mut buf, ops);
        if u32::try_from(buf.len() - HEADER).is_err() {
            a.buf = buf;
            return Err(io::Error::other("a raft log frame of more than 4 GiB"));
        }
        if a.off + (buf.len() + SEAL_FRAME) as u64 > a.size {
            self.rotate(a, buf.len())?;
        }
        let result = self.put_frame(a, &mut buf);
        a.buf = buf;
        result
    }

    /// Writes the frame in `buf` (payload from [`HEADER`] on) at the end of the active
    /// segment, then indexes it.
    fn put_frame(&self, a: &mut Active, buf: &mut [u8]) -> io::Result<()> {
        seal_header(buf, a.seq, a.synced)?;
        let file = a
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("no raft log segment"))?;
        file.write_all_at(buf, a.off)?;
        let payload_at = a.off + HEADER as u64;
        self.index
            .lock()
            .expect("segment index lock")
            .apply(a.seq, payload_at, &buf[HEADER..])
            .map_err(io::Error::other)?;
        a.off += buf.len() as u64;
        Ok(())
    }

    /// Seals the active segment and starts the next, with room for a frame of `need` bytes.
    fn rotate(&self, a: &mut Active, need: usize) -> io::Result<()> {
        if let Some(f) = a.file.clone() {
            // Never left unsealed, or the next start would refuse it; a short file (its
            // preallocation failed) grows to take the seal.
            if a.off + SEAL_FRAME as u64 > a.size {
                a.size = a.off + SEAL_FRAME as u64;
                f.set_len(a.size)?;
            }
            let mut seal = vec![0u8; HEADER];
            push_record(&mut seal, SEAL, &[], &[]);
            seal_header(&mut seal, a.seq, a.synced)?;
            f.write_all_at(&seal, a.off)?;
            f.sync_data()?;
        }
        let mut meta = vec![0u8; HEADER];
        for (k, v) in &self.index.lock().expect("segment index lock").meta {
            push_record(&mut meta, PUT_META, k, v);
        }
        let seq = a.seq + 1;
        let path = self.dir.join(format!("seg-{seq:016x}.log"));
        let size = self
            .segment_bytes
            .max((meta.len() + need + 2 * SEAL_FRAME) as u64);
        let reused = match a.free.pop() {
            Some(p) if fs::metadata(&p).map(|m| m.len() >= size).unwrap_or(false) => {
                fs::rename(&p, &path)?;
                Some(open_rw(&path)?)
            }
            Some(p) => {
                fs::remove_file(&p)?;
                None
            }
            None => None,
        };
        let file = match reused {
            Some(f) => f,
            None => {
                // Not `create_new`: a failed attempt may have left the file.
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                preallocate(&f, size)?;
                f
            }
        };
        let size = file.metadata()?.len();
        sync_dir(&self.dir)?;
        let file = Arc::new(file);
        self.index
            .lock()
            .expect("segment index lock")
            .segments
            .insert(
                seq,
                Segment {
                    file: file.clone(),
                    path,
                    live: 0,
                    live_bytes: 0,
                },
            );
        a.seq = seq;
        a.file = Some(file);
        a.off = 0;
        a.synced = 0;
        a.size = size;
        self.put_frame(a, &mut meta)
    }

    /// After a sync: lets go of the oldest segments whose entries are all gone, one directory
    /// sync each so that no later one can be gone after a crash while an earlier one is back.
    /// A sparse oldest segment's live entries are written again instead (it goes at the next
    /// sync, once the copies are durable).
    fn collect(&self, a: &mut Active) -> io::Result<()> {
        loop {
            let emptied = {
                let mut index = self.index.lock().expect("segment index lock");
                let Some((&seq, s)) = index.segments.first_key_value() else {
                    return Ok(());
                };
                // A reader still holding the file may be reading a value that was there.
                if seq >= a.seq || Arc::strong_count(&s.file) > 1 {
                    return Ok(());
                }
                if s.live > 0 {
                    // Moved when it is sparse, or when the segments hold more than twice as
                    // much dead as live: a group gone idle below its snapshot threshold keeps
                    // all its entries, densely or not, and would pin every later segment.
                    let live: u64 = index.segments.values().map(|s| s.live_bytes).sum();
                    let needed = 2 + 3 * live.div_ceil(self.segment_bytes.max(1));
                    let sparse = s.live_bytes.saturating_mul(4) < self.segment_bytes;
                    let n = index.segments.len() as u64;
                    if n <= 2 || !(sparse || n > needed) {
                        return Ok(());
                    }
                    let moved: Vec<_> = index
                        .log
                        .iter()
                        .filter(|(_, loc)| loc.seq == seq)
                        .map(|(k, &loc)| (k.clone(), loc))
                        .collect();
                    let file = s.file.clone();
                    drop(index);
                    return self.move_forward(a, &file, moved);
                }
                index.segments.remove(&seq).map(|s| (seq, s.path))
            };
            let Some((seq, path)) = emptied else {
                return Ok(());
            };
            if a.free.len() < MAX_FREE {
                let to = self.dir.join(format!("free-{seq:016x}.log"));
                fs::rename(&path, &to)?;
                a.free.push(to);
            } else {
                fs::remove_file(&path)?;
            }
            sync_dir(&self.dir)?;
        }
    }

    /// Writes `entries` (keys and where their values are in `file`) again at the end.
    fn move_forward(
        &self,
        a: &mut Active,
        file: &File,
        entries: Vec<(Vec<u8>, Loc)>,
    ) -> io::Result<()> {
        let mut ops = Vec::with_capacity(entries.len());
        for (key, loc) in entries {
            ops.push(LogOp::Put {
                cf: CF_LOG,
                key,
                value: Self::read(file, loc)?.into(),
            });
        }
        self.append(a, &ops)
    }

    fn read(file: &File, loc: Loc) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut v, loc.off)?;
        Ok(v)
    }

    fn file_of(index: &Index, loc: Loc) -> io::Result<Arc<File>> {
        index
            .segments
            .get(&loc.seq)
            .map(|s| s.file.clone())
            .ok_or_else(|| io::Error::other(format!("raft log segment {} is gone", loc.seq)))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let index = self.index.lock().expect("segment index lock");
        if cf != CF_LOG {
            return Ok(index.meta.get(key).cloned());
        }
        let Some(&loc) = index.log.get(key) else {
            return Ok(None);
        };
        let file = Self::file_of(&index, loc)?;
        drop(index);
        Self::read(&file, loc).map(Some)
    }

    /// Keys in `[from, to)` with their values (left empty where `skip_value` says).
    pub fn scan(
        &self,
        cf: &str,
        from: &[u8],
        to: &[u8],
        skip_value: &dyn Fn(&[u8]) -> bool,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let index = self.index.lock().expect("segment index lock");
        if cf != CF_LOG {
            return Ok(index
                .meta
                .range(from.to_vec()..to.to_vec())
                .map(|(k, v)| {
                    let v = if skip_value(k) { Vec::new() } else { v.clone() };
                    (k.clone(), v)
                })
                .collect());
        }
        let mut found = Vec::new();
        for (k, &loc) in index.log.range(from.to_vec()..to.to_vec()) {
            let file = (!skip_value(k))
                .then(|| Self::file_of(&index, loc))
                .transpose()?;
            found.push((k.clone(), loc, file));
        }
        drop(index);
        found
            .into_iter()
            .map(|(k, loc, file)| {
                let v = match file {
                    Some(f) => Self::read(&f, loc)?,
                    None => Vec::new(),
                };
                Ok((k, v))
            })
            .collect()
    }

    pub fn last_in(
        &self,
        cf: &str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if from >= to {
            return Ok(None);
        }
        let index = self.index.lock().expect("segment index lock");
        if cf != CF_LOG {
            return Ok(index
                .meta
                .range(from.to_vec()..to.to_vec())
                .next_back()
                .map(|(k, v)| (k.clone(), v.clone())));
        }
        let Some((k, &loc)) = index.log.range(from.to_vec()..to.to_vec()).next_back() else {
            return Ok(None);
        };
        let (k, file) = (k.clone(), Self::file_of(&index, loc)?);
        drop(index);
        Ok(Some((k, Self::read(&file, loc)?)))
    }
}

/// Gives `f` its `size` bytes on disk now, so writes into it allocate nothing later.
fn preallocate(f: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: a plain system call on a file descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // File systems without fallocate: a sparse file of the same size.
    f.set_len(size)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    fn put(cf: &'static str, key: &[u8], value: &[u8]) -> LogOp {
        LogOp::put(cf, key, value)
    }

    fn open(dir: &Path, bytes: u64) -> io::Result<Segments> {
        Segments::open(dir, bytes)
    }

    fn everything(s: &Segments, cf: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        s.scan(cf, &[], &[0xff; 16], &|_| false).unwrap()
    }

    fn files(dir: &Path, prefix: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_str().unwrap().starts_with(prefix)
            })
            .count()
    }

    /// Random puts, deletes, range deletes and meta records, synced or not, across reopens
    /// and many small segments: what reads return always matches a model, and emptied
    /// segments are reused instead of piling up.
    #[test]
    fn reads_match_a_model_across_rotations_purges_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut meta: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut s = open(dir.path(), 4096).unwrap();
        let mut next = 0u32;
        let mut purged = 0u32;
        for round in 0..3000 {
            let mut ops = Vec::new();
            for _ in 0..rng.gen_range(1..4) {
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let key = next.to_be_bytes().to_vec();
                        next += 1;
                        let value = vec![round as u8; rng.gen_range(0..300)];
                        model.insert(key.clone(), value.clone());
                        ops.push(put(CF_LOG, &key, &value));
                    }
                    6 => {
                        // A truncation of the newest few.
                        let from = next.saturating_sub(rng.gen_range(0..3)).max(purged);
                        let (a, b) = (from.to_be_bytes().to_vec(), vec![0xff; 4]);
                        model.retain(|k, _| k < &a);
                        next = from;
                        ops.push(LogOp::DeleteRange {
                            cf: CF_LOG,
                            from: a,
                            to: b,
                        });
                    }
                    7 => {
                        // A purge of the oldest.
                        purged = next.saturating_sub(rng.gen_range(0..20)).max(purged);
                        let to = purged.to_be_bytes().to_vec();
                        model.retain(|k, _| k >= &to);
                        ops.push(LogOp::DeleteRange {
                            cf: CF_LOG,
                            from: vec![],
                            to,
                        });
                    }
                    8 => {
                        let key = vec![rng.gen_range(0..4u8)];
                        let value = round.to_string().into_bytes();
                        meta.insert(key.clone(), value.clone());
                        ops.push(put(CF_META, &key, &value));
                    }
                    _ => {
                        let key = vec![rng.gen_range(0..4u8)];
                        meta.remove(&key);
                        ops.push(LogOp::Delete { cf: CF_META, key });
                    }
                }
            }
            s.write(&ops, rng.gen_bool(0.5)).unwrap();
            if rng.gen_range(0..300) == 0 {
                drop(s);
                s = open(dir.path(), 4096).unwrap();
            }
            if round % 97 == 0 {
                let got: BTreeMap<_, _> = everything(&s, CF_LOG).into_iter().collect();
                assert_eq!(got, model, "round {round}");
                let got: BTreeMap<_, _> = everything(&s, CF_META).into_iter().collect();
                assert_eq!(got, meta, "round {round}");
                if let Some((k, v)) = model.iter().next_back() {
                    assert_eq!(
                        s.last_in(CF_LOG, &[], &[0xff; 5]).unwrap(),
                        Some((k.clone(), v.clone()))
                    );
                    assert_eq!(s.get(CF_LOG, k).unwrap().as_ref(), Some(v));
                }
            }
        }
        s.write(&[], true).unwrap();
        drop(s);
        let s = open(dir.path(), 4096).unwrap();
        let got: BTreeMap<_, _> = everything(&s, CF_LOG).into_iter().collect();
        assert_eq!(got, model);
        let got: BTreeMap<_, _> = everything(&s, CF_META).into_iter().collect();
        assert_eq!(got, meta);
        assert!(
            files(dir.path(), "free-") > 0,
            "emptied segments are kept for reuse"
        );
        assert!(
            files(dir.path(), "seg-") < 40,
            "emptied segments were let go: {} left",
            files(dir.path(), "seg-")
        );
    }

    /// The last segment's tail: the newest frame torn (never acknowledged) is dropped and
    /// sealed over; a damaged frame with a valid one after it stops the start.
    #[test]
    fn a_torn_last_frame_is_dropped_and_a_damaged_middle_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).unwrap();
        for i in 0..3u8 {
            s.write(&[put(CF_LOG, &[i], &[i; 100])], true).unwrap();
        }
        drop(s);
        let seg = |n: usize| segs(dir.path())[n].clone();
        // The first segment holds the three frames (after its CF_META frame): tear the last.
        let path = seg(0);
        let meta_frame = HEADER;
        let frame = HEADER + 9 + 1 + 100;
        let third = meta_frame + 2 * frame;
        let f = open_rw(&path).unwrap();
        f.write_all_at(&[0xee; 50], (third + 40) as u64).unwrap();
        drop(f);
        let s = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            everything(&s, CF_LOG)
                .iter()
                .map(|(k, _)| k[0])
                .collect::<Vec<_>>(),
            vec![0, 1],
            "the torn frame is gone, the others stay"
        );
        s.write(&[put(CF_LOG, &[9], b"after")], true).unwrap();
        drop(s);
        let s = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            everything(&s, CF_LOG).len(),
            3,
            "a sealed torn tail reopens"
        );
        // Damage in the middle of the newest segment, a valid frame after it.
        s.write(&[put(CF_LOG, &[10], b"x")], true).unwrap();
        s.write(&[put(CF_LOG, &[11], b"y")], true).unwrap();
        drop(s);
        let last = segs(dir.path()).pop().unwrap();
        let f = open_rw(&last).unwrap();
        f.write_all_at(&[0xee; 4], (HEADER + 5) as u64).unwrap();
        drop(f);
        let e = open(dir.path(), 1 << 20).err().expect("refused");
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    /// Damage anywhere before an older segment's seal stops the start.
    #[test]
    fn a_sealed_segment_damaged_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).unwrap();
        s.write(&[put(CF_LOG, b"k", &[1; 100])], true).unwrap();
        drop(s);
        // Reopened, so the segment written above is sealed and no longer the last.
        drop(open(dir.path(), 1 << 20).unwrap());
        let f = open_rw(&segs(dir.path())[0]).unwrap();
        f.write_all_at(&[0xee; 4], (2 * HEADER + 30) as u64)
            .unwrap();
        drop(f);
        let e = open(dir.path(), 1 << 20).err().expect("refused");
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    fn segs(dir: &Path) -> Vec<PathBuf> {
        let mut segs: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().contains("seg-"))
            .collect();
        segs.sort();
        segs
    }

    /// A group that stops writing keeps its last entries, but they do not pin the segments
    /// after theirs, whether they fill their segment sparsely or densely: the oldest segment's
    /// entries move to the end, and it goes.
    #[test]
    fn an_idle_groups_entries_do_not_pin_the_segments_after_them() {
        for idle_bytes in [100, 1000] {
            let dir = tempfile::tempdir().unwrap();
            let s = open(dir.path(), 4096).unwrap();
            let idle: Vec<_> = (0..3u8).map(|i| vec![b'a', i]).collect();
            for k in &idle {
                s.write(&[put(CF_LOG, k, &vec![1; idle_bytes])], true)
                    .unwrap();
            }
            for i in 0..2000u32 {
                let key = [&b"b"[..], &i.to_be_bytes()].concat();
                s.write(&[put(CF_LOG, &key, &[2; 200])], true).unwrap();
                if i % 10 == 9 {
                    let to = [&b"b"[..], &(i - 5).to_be_bytes()].concat();
                    let purge = LogOp::DeleteRange {
                        cf: CF_LOG,
                        from: b"b".to_vec(),
                        to,
                    };
                    s.write(&[purge], true).unwrap();
                }
            }
            assert!(
                segs(dir.path()).len() < 12,
                "{} segments for a few KiB of live entries ({idle_bytes} B idle ones)",
                segs(dir.path()).len()
            );
            drop(s);
            let s = open(dir.path(), 4096).unwrap();
            for k in &idle {
                assert_eq!(s.get(CF_LOG, k).unwrap(), Some(vec![1; idle_bytes]));
            }
            // The last purge kept b1994 to b1999.
            assert_eq!(everything(&s, CF_LOG).len(), 3 + 6);
        }
    }

    /// Frames written after the last sync may reach the disk in any order: a hole among them
    /// is a torn round, dropped with what follows, not damage.
    #[test]
    fn a_hole_after_the_last_sync_is_a_torn_round() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).unwrap();
        s.write(&[put(CF_LOG, b"1", &[1; 100])], true).unwrap();
        s.write(&[put(CF_LOG, b"2", &[2; 100])], false).unwrap();
        s.write(&[put(CF_LOG, b"3", &[3; 100])], false).unwrap();
        drop(s);
        let path = segs(dir.path())[0].clone();
        let frame = HEADER + 9 + 1 + 100;
        let second = HEADER + frame;
        let f = open_rw(&path).unwrap();
        f.write_all_at(&[0xee; 8], (second + HEADER + 20) as u64)
            .unwrap();
        drop(f);
        let s = open(dir.path(), 1 << 20).unwrap();
        let keys: Vec<_> = everything(&s, CF_LOG).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"1".to_vec()]);
    }

    /// An empty newest segment (made, then its preallocation failed, say) is sealed like any
    /// other, so the start after the next one does not find it unsealed; a missing segment
    /// refuses.
    #[test]
    fn an_empty_newest_segment_is_sealed_and_a_missing_one_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20).unwrap();
        s.write(&[put(CF_LOG, b"k", b"v")], true).unwrap();
        drop(s);
        // The second start seals the first segment and makes the second: empty it.
        drop(open(dir.path(), 1 << 20).unwrap());
        let newest = segs(dir.path()).pop().unwrap();
        open_rw(&newest).unwrap().set_len(0).unwrap();
        for _ in 0..2 {
            let s = open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.get(CF_LOG, b"k").unwrap(), Some(b"v".to_vec()));
        }
        fs::remove_file(&segs(dir.path())[1]).unwrap();
        let e = open(dir.path(), 1 << 20).err().expect("refused");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
