//! The remote store: results shared between machines through object storage (S3 and
//! S3-compatible stores, GCS, Azure, or a local directory `file://`), behind the local
//! [`Store`].
//!
//! # Layout under the URL's prefix
//!
//! ```text
//! <prefix>/mkonnx-remote.json      format marker: {"format":"mkonnx-remote","version":1},
//!                                  written once (create-only), checked by every session
//! <prefix>/blobs/ab/cdef...        artifact bytes, named by their blake3 (as in the local store)
//! <prefix>/records/<key>.json      one RemoteRecord per stage key: its artifacts' names,
//!                                  blob hashes and sizes
//! ```
//!
//! # Protocol
//!
//! - **Read** (a local miss, under the key lock): fetch the record; download each blob the
//!   local store lacks into the store's scratch space, checking its size and blake3 as it
//!   streams in, then commit it with [`Store::commit_blob`] and record the result with
//!   [`Store::commit_result`], the path a built result takes. A missing, truncated or
//!   damaged blob, or a record that does not add up, is a miss: the stage runs, and the
//!   upload that follows repairs the remote.
//! - **Write** (after a build): upload the blobs the remote lacks (a blob found damaged in
//!   this session is uploaded again), then the record, create-only (`PutMode::Create`, on S3
//!   `If-None-Match: *`). A record that already exists means another machine won the race:
//!   its record is fetched and, when its artifacts differ from ours, adopted into the local
//!   store, so every machine builds downstream stages on the same bytes.
//! - **Failures**: a refused write (HTTP 401/403) turns the rest of the session read-only with
//!   one warning. An unreachable remote (after bounded timeouts and retries) turns it off for
//!   the rest of the session with one warning, or, with [`RemoteOptions::required`], fails the
//!   stage that needed it. The format marker is never silently ignored: a mismatch fails.
//!
//! object_store is async; the remote owns one small tokio runtime and blocks on it, so the
//! engine's worker threads stay plain threads.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, GetResultPayload, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::hash::{output_set_hash, Hash};
use super::store::{DirectWriter, RemoveDirOnDrop, Store, StoredResult};
use super::EngineError;

/// Name of the format marker object under the remote's prefix.
pub const FORMAT_MARKER: &str = "mkonnx-remote.json";
/// The `format` field of the marker.
const FORMAT_NAME: &str = "mkonnx-remote";
/// The layout version this build reads and writes (records, blobs, marker).
pub const FORMAT_VERSION: u32 = 1;

/// A `file://` remote's object is read in blocks of this size.
const DOWNLOAD_BLOCK: usize = 4 << 20;

/// Test hook, documented as such: when set, the first record upload of the process is
/// preceded by `exit` (the process exits with status 86, as if killed between its blob and
/// record uploads) or `sleep:<ms>` (every record upload waits, so that concurrent builds of
/// one key both miss and race for the record). tests/remote.rs uses it.
pub const TEST_HOOK_BEFORE_RECORD: &str = "MKONNX_TEST_HOOK_BEFORE_RECORD";

/// Whether a session may write the remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteMode {
    /// Read results, upload new ones.
    ReadWrite,
    /// Read results only.
    ReadOnly,
}

/// How to talk to the remote.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// Read-write or read-only.
    pub mode: RemoteMode,
    /// Fail (the session or the stage) when the remote cannot be reached, instead of
    /// continuing with the local store alone.
    pub required: bool,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for a small request (the marker, a record, a HEAD): what a server that accepts
    /// connections but never answers costs, per attempt.
    pub metadata_timeout: Duration,
    /// Time for a blob's whole transfer.
    pub transfer_timeout: Duration,
    /// Retries of a failed request (with backoff).
    pub max_retries: usize,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            mode: RemoteMode::ReadWrite,
            required: false,
            connect_timeout: Duration::from_secs(5),
            metadata_timeout: Duration::from_secs(10),
            transfer_timeout: Duration::from_secs(300),
            max_retries: 2,
        }
    }
}

/// What the remote did in this session (one build).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteStats {
    /// `read-write`, `read-only` (asked for, or a write was refused) or `unavailable`.
    pub state: &'static str,
    /// Stage results found in the remote and downloaded (or already local).
    pub hits: u64,
    /// Lookups that found no usable record (the stage then ran).
    pub misses: u64,
    /// Records this session published.
    pub uploads: u64,
    /// Blobs uploaded (the others were already there).
    pub blobs_uploaded: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes downloaded.
    pub bytes_downloaded: u64,
    /// Records another machine wrote first while this one was building the same key.
    pub races_lost: u64,
    /// Of those, records whose artifacts differed from ours and were adopted here.
    pub adopted: u64,
    /// Failed requests: unreachable remote, refused writes, damaged blobs or records.
    pub errors: u64,
}

/// Why the remote could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL names no supported store, or its store could not be configured.
    #[error("remote store {url}: {what}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        what: String,
    },
    /// The remote could not be reached or answered with an error (after retries).
    #[error("remote store {url} is unavailable ({op} {path}): {source}")]
    Unavailable {
        /// The remote's URL.
        url: String,
        /// What was being done ("read", "write", "list", "delete").
        op: &'static str,
        /// The object.
        path: String,
        /// object_store's error (boxed: it is large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// A write was refused (401/403): the credentials are read-only.
    #[error("remote store {url} refused to write {path}: {source}")]
    Refused {
        /// The remote's URL.
        url: String,
        /// The object.
        path: String,
        /// object_store's error (boxed: it is large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// The format marker is not this build's.
    #[error(
        "remote store {url}: {FORMAT_MARKER} says {found}, but this mkonnx reads {FORMAT_NAME} version {FORMAT_VERSION}; \
         use a matching mkonnx or another prefix"
    )]
    FormatMismatch {
        /// The remote's URL.
        url: String,
        /// What the marker holds.
        found: String,
    },
    /// A record or blob in the remote is damaged (a miss; the next upload repairs it).
    #[error("remote store {url}: {path} is damaged: {what}")]
    Damaged {
        /// The remote's URL.
        url: String,
        /// The object.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The local store failed while taking in a download.
    #[error(transparent)]
    Local(#[from] EngineError),
}

/// One stage result in the remote: `records/<key>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RemoteRecord {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// The stage key (also the object's name).
    pub key: Hash,
    /// The stage's name (for people reading the bucket).
    pub stage: String,
    /// [`output_set_hash`] of the artifacts.
    pub output_hash: Hash,
    /// How long the stage ran where it was built.
    pub duration_ms: u64,
    /// Artifact name -> blob.
    pub artifacts: BTreeMap<String, RemoteArtifact>,
}

/// One artifact of a [`RemoteRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RemoteArtifact {
    /// blake3 of the bytes.
    pub blob: Hash,
    /// Their length, checked before the hash.
    pub size: u64,
}

impl RemoteRecord {
    fn result(&self) -> StoredResult {
        StoredResult {
            output_hash: self.output_hash,
            artifacts: self.artifacts.iter().map(|(n, a)| (n.clone(), a.blob)).collect(),
            duration_ms: self.duration_ms,
        }
    }
}

/// The session's state: it only ever degrades.
const ACTIVE: u8 = 0;
const DEGRADED_READ_ONLY: u8 = 1;
const UNAVAILABLE: u8 = 2;

/// A remote store over `object_store`, shared by the engine's worker threads.
pub struct RemoteStore {
    url: String,
    /// For small requests (marker, records, HEAD, list, delete): `metadata_timeout`.
    store: Arc<dyn ObjectStore>,
    /// The same store for blob transfers: `transfer_timeout`.
    transfers: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    options: RemoteOptions,
    state: AtomicU8,
    /// Blobs this session found damaged or missing: uploaded again even if present.
    damaged: Mutex<HashSet<Hash>>,
    /// Whether the before-record test hook already fired (`exit` fires once).
    hook_fired: AtomicBool,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    uploads: AtomicU64,
    blobs_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    races_lost: AtomicU64,
    adopted: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// How an object_store error is handled.
enum Failure {
    NotFound,
    Exists,
    Refused,
    Unavailable,
}

fn classify(e: &object_store::Error) -> Failure {
    match e {
        object_store::Error::NotFound { .. } => Failure::NotFound,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => Failure::Exists,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => Failure::Refused,
        _ => Failure::Unavailable,
    }
}

/// Writes a warning line on stderr (never panics on a closed stderr).
fn warn(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "warning: {message}");
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("url", &self.url).finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// Connects to the remote at `url` (`s3://bucket/prefix`, `gs://...`, `az://...`,
    /// `file:///dir`; credentials and endpoints from the standard environment variables,
    /// e.g. `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`) and checks its format
    /// marker, writing it if the remote is new and writable. An unreachable remote is an
    /// error only when `options.required`; otherwise the session goes on without it (one
    /// warning). A marker of another format is always an error.
    pub fn open(url: &str, options: RemoteOptions) -> Result<RemoteStore, RemoteError> {
        let bad = |what: String| RemoteError::BadUrl { url: url.to_string(), what };
        let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL ({e}); use e.g. s3://bucket/prefix or file:///dir")))?;
        let (scheme, prefix) = object_store::ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
        // Two clients of one store: small requests time out soon, blob transfers late.
        let connect = |timeout: Duration| -> Result<Arc<dyn ObjectStore>, RemoteError> {
            let client = ClientOptions::new()
                .with_connect_timeout(options.connect_timeout)
                .with_timeout(timeout)
                .with_allow_http(std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1"));
            let retry = RetryConfig { max_retries: options.max_retries, retry_timeout: timeout, ..RetryConfig::default() };
            let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
                object_store::ObjectStoreScheme::Local => {
                    let dir = PathBuf::from(parsed.path());
                    fs::create_dir_all(&dir).map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                    object_store::local::LocalFileSystem::new_with_prefix(&dir).map(|s| Arc::new(s) as _)
                }
                object_store::ObjectStoreScheme::AmazonS3 => object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map(|s| Arc::new(s) as _),
                object_store::ObjectStoreScheme::GoogleCloudStorage => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map(|s| Arc::new(s) as _),
                object_store::ObjectStoreScheme::MicrosoftAzure => object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map(|s| Arc::new(s) as _),
                ref other => return Err(bad(format!("{other:?} is not supported; use s3://, gs://, az:// or file://"))),
            };
            built.map_err(|e| bad(e.to_string()))
        };
        let store = connect(options.metadata_timeout)?;
        let transfers = connect(options.transfer_timeout)?;
        // A local directory needs no prefix of its own (the path is the store's root).
        let prefix = if matches!(scheme, object_store::ObjectStoreScheme::Local) { ObjectPath::default() } else { prefix };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mkonnx-remote")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start its I/O runtime: {e}")))?;
        let remote = RemoteStore {
            url: url.to_string(),
            store,
            transfers,
            prefix,
            runtime,
            state: AtomicU8::new(if options.mode == RemoteMode::ReadOnly { DEGRADED_READ_ONLY } else { ACTIVE }),
            options,
            damaged: Mutex::new(HashSet::new()),
            hook_fired: AtomicBool::new(false),
            counters: Counters::default(),
        };
        match remote.check_marker() {
            Ok(()) => Ok(remote),
            Err(e @ RemoteError::Unavailable { .. }) => {
                remote.unavailable(e)?;
                Ok(remote)
            }
            Err(e) => Err(e),
        }
    }

    /// The URL the remote was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This session's counters.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            state: match self.state.load(Ordering::Relaxed) {
                ACTIVE => "read-write",
                DEGRADED_READ_ONLY => "read-only",
                _ => "unavailable",
            },
            hits: get(&c.hits),
            misses: get(&c.misses),
            uploads: get(&c.uploads),
            blobs_uploaded: get(&c.blobs_uploaded),
            bytes_uploaded: get(&c.bytes_uploaded),
            bytes_downloaded: get(&c.bytes_downloaded),
            races_lost: get(&c.races_lost),
            adopted: get(&c.adopted),
            errors: get(&c.errors),
        }
    }

    fn available(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNAVAILABLE
    }

    fn writable(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ACTIVE
    }

    fn path(&self, relative: &str) -> ObjectPath {
        self.prefix.parts().chain(ObjectPath::from(relative).parts()).collect()
    }

    fn blob_path(&self, hash: &Hash) -> ObjectPath {
        let hex = hash.to_hex();
        self.path(&format!("blobs/{}/{}", &hex[..2], &hex[2..]))
    }

    fn record_path(&self, key: &Hash) -> ObjectPath {
        self.path(&format!("records/{}.json", key.to_hex()))
    }

    fn unavailable_error(&self, op: &'static str, path: &ObjectPath, source: object_store::Error) -> RemoteError {
        RemoteError::Unavailable { url: self.url.clone(), op, path: path.to_string(), source: Box::new(source) }
    }

    /// An unreachable remote: with `required`, the error; otherwise the session continues
    /// without the remote, and the first time this happens says so once.
    fn unavailable(&self, e: RemoteError) -> Result<(), RemoteError> {
        bump(&self.counters.errors, 1);
        if self.options.required {
            return Err(e);
        }
        if self.state.swap(UNAVAILABLE, Ordering::Relaxed) != UNAVAILABLE {
            warn(&format!("{e}; continuing with the local store only (--remote-required makes this an error)"));
        }
        Ok(())
    }

    /// A refused write: the rest of the session only reads, and says so once.
    fn refused(&self, path: &ObjectPath, source: object_store::Error) {
        bump(&self.counters.errors, 1);
        if self.state.compare_exchange(ACTIVE, DEGRADED_READ_ONLY, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let e = RemoteError::Refused { url: self.url.clone(), path: path.to_string(), source: Box::new(source) };
            warn(&format!("{e}; using the remote read-only for the rest of this session (nothing more is uploaded)"));
        }
    }

    /// A failed write: refused (read-only from now on) or unreachable.
    fn write_failed(&self, path: &ObjectPath, e: object_store::Error) -> Result<(), RemoteError> {
        match classify(&e) {
            Failure::Refused => {
                self.refused(path, e);
                Ok(())
            }
            _ => self.unavailable(self.unavailable_error("write", path, e)),
        }
    }

    fn get_bytes(&self, path: &ObjectPath) -> object_store::Result<bytes::Bytes> {
        self.runtime.block_on(async { self.store.get(path).await?.bytes().await })
    }

    fn put(&self, path: &ObjectPath, payload: PutPayload, mode: PutMode) -> object_store::Result<()> {
        let opts = PutOptions { mode, ..PutOptions::default() };
        self.runtime.block_on(self.store.put_opts(path, payload, opts)).map(|_| ())
    }

    fn put_blob(&self, path: &ObjectPath, payload: PutPayload) -> object_store::Result<()> {
        self.runtime.block_on(self.transfers.put(path, payload)).map(|_| ())
    }

    fn marker_bytes() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "format": FORMAT_NAME, "version": FORMAT_VERSION })).unwrap_or_default()
    }

    /// Reads the format marker (writing it when absent and writable) and checks it.
    fn check_marker(&self) -> Result<(), RemoteError> {
        let path = self.path(FORMAT_MARKER);
        for _ in 0..2 {
            match self.get_bytes(&path) {
                Ok(bytes) => return self.check_marker_bytes(&bytes),
                Err(e) => match classify(&e) {
                    Failure::NotFound if self.writable() => match self.put(&path, Self::marker_bytes().into(), PutMode::Create) {
                        Ok(()) => return Ok(()),
                        // Another machine wrote it first: read theirs.
                        Err(e) if matches!(classify(&e), Failure::Exists) => continue,
                        Err(e) => return self.write_failed(&path, e),
                    },
                    // A read-only session on a new remote: nothing to read yet, all misses.
                    Failure::NotFound => return Ok(()),
                    _ => return Err(self.unavailable_error("read", &path, e)),
                },
            }
        }
        Err(self.unavailable_error("read", &path, object_store::Error::NotFound { path: path.to_string(), source: "vanished".into() }))
    }

    fn check_marker_bytes(&self, bytes: &[u8]) -> Result<(), RemoteError> {
        let marker: serde_json::Value = serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null);
        if marker["format"] == FORMAT_NAME && marker["version"] == FORMAT_VERSION {
            return Ok(());
        }
        let found = match (marker["format"].as_str(), marker["version"].as_u64()) {
            (Some(f), Some(v)) => format!("{f} version {v}"),
            _ => format!("something else ({:?})", String::from_utf8_lossy(&bytes[..bytes.len().min(80)])),
        };
        Err(RemoteError::FormatMismatch { url: self.url.clone(), found })
    }

    /// The record of `key`, if the remote has one that parses and adds up.
    fn get_record(&self, key: &Hash) -> Result<Option<RemoteRecord>, RemoteError> {
        let path = self.record_path(key);
        let bytes = match self.get_bytes(&path) {
            Ok(b) => b,
            Err(e) if matches!(classify(&e), Failure::NotFound) => return Ok(None),
            Err(e) => return Err(self.unavailable_error("read", &path, e)),
        };
        let damaged = |what: String| RemoteError::Damaged { url: self.url.clone(), path: path.to_string(), what };
        let record: RemoteRecord = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        let blobs = record.artifacts.iter().map(|(n, a)| (n.clone(), a.blob)).collect();
        if record.key != *key || record.output_hash != output_set_hash(&blobs) || record.format != FORMAT_VERSION {
            return Err(damaged("its key, format or output hash does not match its content".into()));
        }
        Ok(Some(record))
    }

    /// Downloads blob `artifact` into the local store: streamed into scratch space, size
    /// and blake3 checked, then committed like a built blob.
    fn download_blob(&self, artifact: &RemoteArtifact, local: &Store) -> Result<(), RemoteError> {
        let path = self.blob_path(&artifact.blob);
        let damaged = |what: String| {
            // Uploaded again after the rebuild, even though an object of that name exists.
            self.damaged.lock().unwrap_or_else(PoisonError::into_inner).insert(artifact.blob);
            RemoteError::Damaged { url: self.url.clone(), path: path.to_string(), what }
        };
        let scratch = local.scratch_dir()?;
        let _cleanup = RemoveDirOnDrop(scratch.clone());
        let temp = scratch.join("download");
        // Around the page cache where the filesystem allows it: see DirectWriter.
        let mut file = DirectWriter::create(&temp).map_err(|e| EngineError::io("create", &temp, e))?;
        // Takes a chunk in: written and hashed by `file` in blocks of 4 MiB.
        let take = |chunk: &[u8], file: &mut DirectWriter| -> Result<(), RemoteError> {
            if file.written() + chunk.len() as u64 > artifact.size {
                return Err(damaged(format!("longer than the {} bytes its record says", artifact.size)));
            }
            file.write_all(chunk).map_err(|e| EngineError::io("write", &temp, e).into())
        };
        let streamed: Result<(), RemoteError> = (|| {
            // One streamed GET: measured against moto_server, ranged requests in parallel took
            // twice as long (the server reads the whole object for each range).
            let get = self.runtime.block_on(self.transfers.get(&path)).map_err(|e| match classify(&e) {
                Failure::NotFound => damaged("missing".into()),
                _ => self.unavailable_error("read", &path, e),
            })?;
            if get.meta.size != artifact.size {
                return Err(damaged(format!("{} bytes, its record says {}", get.meta.size, artifact.size)));
            }
            match get.payload {
                // A `file://` remote hands over the open file: read in large blocks here,
                // not in the small chunks (one blocking task each) its stream would make.
                GetResultPayload::File(mut source, source_path) => {
                    let mut chunk = vec![0u8; DOWNLOAD_BLOCK];
                    loop {
                        let n = source.read(&mut chunk).map_err(|e| {
                            let source = format!("{}: {e}", source_path.display()).into();
                            self.unavailable_error("read", &path, object_store::Error::Generic { store: "LocalFileSystem", source })
                        })?;
                        if n == 0 {
                            break;
                        }
                        take(&chunk[..n], &mut file)?;
                    }
                }
                GetResultPayload::Stream(mut chunks) => self.runtime.block_on(async {
                    while let Some(chunk) = chunks.next().await {
                        let chunk = chunk.map_err(|e| self.unavailable_error("read", &path, e))?;
                        take(&chunk, &mut file)?;
                    }
                    Ok::<(), RemoteError>(())
                })?,
            }
            Ok(())
        })();
        let received = file.written();
        bump(&self.counters.bytes_downloaded, received);
        streamed?;
        let hash = file.finish().map_err(|e| EngineError::io("write", &temp, e))?;
        if received != artifact.size {
            return Err(damaged(format!("{received} bytes, its record says {}", artifact.size)));
        }
        if hash != artifact.blob {
            return Err(damaged("its bytes do not hash to its name".into()));
        }
        local.commit_blob(&temp, Some((artifact.blob, artifact.size)))?;
        Ok(())
    }

    /// Takes `record`'s result into the local store: blobs it lacks are downloaded and
    /// verified, then the result is recorded under its key.
    fn adopt(&self, record: &RemoteRecord, local: &Store, now_ns: i64) -> Result<StoredResult, RemoteError> {
        let mut sizes = BTreeMap::new();
        for artifact in record.artifacts.values() {
            if sizes.contains_key(&artifact.blob) {
                continue;
            }
            if local.verify_blob(&artifact.blob).is_err() {
                self.download_blob(artifact, local)?;
            }
            sizes.insert(artifact.blob, artifact.size);
        }
        let result = record.result();
        local.commit_result(&record.key, &record.stage, &result, &sizes, now_ns)?;
        Ok(result)
    }

    /// Looks `key` up in the remote after a local miss: its result, now in the local store,
    /// or `None` (a miss: no record, or a damaged one). An error only when the remote is
    /// required and unreachable, or the local store fails.
    pub(crate) fn fetch(&self, key: &Hash, local: &Store, now_ns: i64) -> Result<Option<StoredResult>, RemoteError> {
        if !self.available() || local.is_read_only() {
            return Ok(None);
        }
        let outcome = self.get_record(key).and_then(|record| record.map(|r| self.adopt(&r, local, now_ns)).transpose());
        match outcome {
            Ok(Some(result)) => {
                bump(&self.counters.hits, 1);
                Ok(Some(result))
            }
            Ok(None) => {
                bump(&self.counters.misses, 1);
                Ok(None)
            }
            Err(RemoteError::Damaged { url, path, what }) => {
                bump(&self.counters.misses, 1);
                bump(&self.counters.errors, 1);
                warn(&format!("remote store {url}: {path} is damaged ({what}); the stage runs here and the upload repairs the remote"));
                Ok(None)
            }
            Err(e @ RemoteError::Unavailable { .. }) => {
                self.unavailable(e)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the remote already has the record of `key` (for `push`, to skip results
    /// already shared without touching their blobs).
    pub(crate) fn has_record(&self, key: &Hash) -> Result<bool, RemoteError> {
        if !self.available() {
            return Ok(false);
        }
        let path = self.record_path(key);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(e) if matches!(classify(&e), Failure::NotFound) => Ok(false),
            Err(e) => {
                self.unavailable(self.unavailable_error("read", &path, e))?;
                Ok(false)
            }
        }
    }

    /// Shares a result of the local store: uploads the blobs the remote lacks, then the
    /// record, create-only. Returns the winner's result when another machine had already
    /// recorded other artifacts for this key (now adopted locally), else `None`. Errors only
    /// when the remote is required and unreachable, or the local store fails.
    pub(crate) fn publish(
        &self,
        key: &Hash,
        stage: &str,
        result: &StoredResult,
        local: &Store,
        now_ns: i64,
    ) -> Result<Option<StoredResult>, RemoteError> {
        if !self.writable() {
            return Ok(None);
        }
        let mut artifacts = BTreeMap::new();
        for (name, blob) in &result.artifacts {
            let path = local.blob_path(blob);
            let size = fs::metadata(&path).map_err(|e| EngineError::io("stat", &path, e))?.len();
            artifacts.insert(name.clone(), RemoteArtifact { blob: *blob, size });
        }
        let mut uploaded = HashSet::new();
        for a in artifacts.values() {
            if !uploaded.insert(a.blob) {
                continue;
            }
            let path = self.blob_path(&a.blob);
            let known_damaged = self.damaged.lock().unwrap_or_else(PoisonError::into_inner).contains(&a.blob);
            if !known_damaged {
                match self.runtime.block_on(self.store.head(&path)) {
                    Ok(meta) if meta.size == a.size => continue,
                    Ok(_) => {}
                    Err(e) if matches!(classify(&e), Failure::NotFound) => {}
                    Err(e) => {
                        self.unavailable(self.unavailable_error("read", &path, e))?;
                        return Ok(None);
                    }
                }
            }
            // The local blob is verified before it is shared: a damaged local copy must not
            // poison the remote.
            local.verify_blob(&a.blob)?;
            let local_path = local.blob_path(&a.blob);
            let bytes = fs::read(&local_path).map_err(|e| EngineError::io("read", &local_path, e))?;
            match self.put_blob(&path, bytes.into()) {
                Ok(()) => {
                    bump(&self.counters.blobs_uploaded, 1);
                    bump(&self.counters.bytes_uploaded, a.size);
                    self.damaged.lock().unwrap_or_else(PoisonError::into_inner).remove(&a.blob);
                }
                Err(e) => {
                    self.write_failed(&path, e)?;
                    return Ok(None);
                }
            }
        }
        self.run_test_hook();
        let record = RemoteRecord {
            format: FORMAT_VERSION,
            key: *key,
            stage: stage.to_string(),
            output_hash: result.output_hash,
            duration_ms: result.duration_ms,
            artifacts,
        };
        let path = self.record_path(key);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| RemoteError::Damaged {
            url: self.url.clone(),
            path: path.to_string(),
            what: format!("cannot encode: {e}"),
        })?;
        match self.put(&path, json.into(), PutMode::Create) {
            Ok(()) => {
                bump(&self.counters.uploads, 1);
                Ok(None)
            }
            Err(e) if matches!(classify(&e), Failure::Exists) => {
                bump(&self.counters.races_lost, 1);
                self.lost_race(&record, local, now_ns)
            }
            Err(e) => {
                self.write_failed(&path, e)?;
                Ok(None)
            }
        }
    }

    /// Another machine recorded `ours.key` first: its record wins. When its artifacts differ
    /// (a stage whose output is not bit-reproducible), they are adopted locally.
    fn lost_race(&self, ours: &RemoteRecord, local: &Store, now_ns: i64) -> Result<Option<StoredResult>, RemoteError> {
        let winner = match self.get_record(&ours.key) {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(None),
            Err(e @ RemoteError::Unavailable { .. }) => {
                self.unavailable(e)?;
                return Ok(None);
            }
            Err(e) => {
                // A damaged winner record: ours stays local; the remote keeps the damage
                // until gc (records are never overwritten, so that machines agree).
                bump(&self.counters.errors, 1);
                warn(&e.to_string());
                return Ok(None);
            }
        };
        if winner.output_hash == ours.output_hash {
            return Ok(None);
        }
        match self.adopt(&winner, local, now_ns) {
            Ok(result) => {
                bump(&self.counters.adopted, 1);
                Ok(Some(result))
            }
            Err(e @ RemoteError::Unavailable { .. }) => {
                self.unavailable(e)?;
                Ok(None)
            }
            Err(RemoteError::Local(e)) => Err(RemoteError::Local(e)),
            Err(e) => {
                bump(&self.counters.errors, 1);
                warn(&format!("{e}; keeping this machine's result for {}", ours.key.short()));
                Ok(None)
            }
        }
    }

    fn run_test_hook(&self) {
        let Ok(hook) = std::env::var(TEST_HOOK_BEFORE_RECORD) else { return };
        if hook == "exit" && !self.hook_fired.swap(true, Ordering::SeqCst) {
            warn(&format!("{TEST_HOOK_BEFORE_RECORD}=exit: exiting between the blob and record uploads"));
            std::process::exit(86);
        }
        if let Some(ms) = hook.strip_prefix("sleep:").and_then(|ms| ms.parse::<u64>().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    /// `mkonnx remote check`: a read, a write and a conditional-put probe, each with its
    /// outcome (`Ok(detail)` or the error), in that order.
    pub fn check(&self) -> Vec<(&'static str, Result<String, String>)> {
        let mut report = Vec::new();
        let marker = self.path(FORMAT_MARKER);
        report.push((
            "read",
            match self.get_bytes(&marker) {
                Ok(b) => self
                    .check_marker_bytes(&b)
                    .map(|()| format!("{marker}: {FORMAT_NAME} version {FORMAT_VERSION}"))
                    .map_err(|e| e.to_string()),
                Err(e) if matches!(classify(&e), Failure::NotFound) => Ok(format!("{marker} absent (a new remote)")),
                Err(e) => Err(self.unavailable_error("read", &marker, e).to_string()),
            },
        ));
        let nonce = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let probe = self.path(&format!("probes/{}-{nonce}", std::process::id()));
        let write = self.put(&probe, b"probe".to_vec().into(), PutMode::Overwrite);
        let wrote = write.is_ok();
        report.push(("write", write.map(|()| format!("{probe} written")).map_err(|e| e.to_string())));
        let conditional = self.put(&probe, b"again".to_vec().into(), PutMode::Create);
        report.push((
            "conditional put",
            match conditional {
                Err(e) if matches!(classify(&e), Failure::Exists) => Ok("a create-only put of an existing object is refused".into()),
                Ok(()) if wrote => Err("a create-only put overwrote an existing object: this store cannot arbitrate races".into()),
                Ok(()) => Ok("create-only put accepted".into()),
                Err(e) => Err(e.to_string()),
            },
        ));
        let _ = self.runtime.block_on(self.store.delete(&probe));
        report
    }

    /// Remote garbage collection, mark and sweep: records at least `max_record_age` old
    /// (when given) are deleted; then every blob that no remaining record names and that is
    /// at least `grace` old (an upload whose record is not written yet is younger) is deleted.
    /// Returns (records deleted, blobs deleted, bytes freed).
    pub fn gc(&self, max_record_age: Option<Duration>, grace: Duration) -> Result<(usize, usize, u64), RemoteError> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let older_than = |meta: &object_store::ObjectMeta, age: Duration| now - meta.last_modified.timestamp() >= age.as_secs() as i64;
        let list = |dir: &str| -> Result<Vec<object_store::ObjectMeta>, RemoteError> {
            let path = self.path(dir);
            self.runtime
                .block_on(self.store.list(Some(&path)).collect::<Vec<_>>())
                .into_iter()
                .collect::<object_store::Result<Vec<_>>>()
                .map_err(|e| self.unavailable_error("list", &path, e))
        };
        let delete =
            |path: &ObjectPath| self.runtime.block_on(self.store.delete(path)).map_err(|e| self.unavailable_error("delete", path, e));
        let mut live = HashSet::new();
        let mut records_deleted = 0;
        for meta in list("records")? {
            if max_record_age.is_some_and(|age| older_than(&meta, age)) {
                delete(&meta.location)?;
                records_deleted += 1;
                continue;
            }
            let record = self.get_bytes(&meta.location).ok().and_then(|b| serde_json::from_slice::<RemoteRecord>(&b).ok());
            match record {
                Some(r) => live.extend(r.artifacts.values().map(|a| a.blob)),
                // A record that cannot be read names nothing: it is removed (a miss anyway).
                None => {
                    delete(&meta.location)?;
                    records_deleted += 1;
                }
            }
        }
        let (mut blobs_deleted, mut bytes_freed) = (0, 0);
        for meta in list("blobs")? {
            let parts: Vec<String> = meta.location.parts().map(|p| p.as_ref().to_string()).collect();
            let hash = parts.len().checked_sub(2).and_then(|i| Hash::from_hex(&format!("{}{}", parts[i], parts[i + 1])));
            if hash.is_some_and(|h| live.contains(&h)) || !older_than(&meta, grace) {
                continue;
            }
            delete(&meta.location)?;
            blobs_deleted += 1;
            bytes_freed += meta.size;
        }
        Ok((records_deleted, blobs_deleted, bytes_freed))
    }
}
