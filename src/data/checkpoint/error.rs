//! Errors of the checkpoint reader. Every variant names the checkpoint file.

use std::path::PathBuf;

/// Why a `torch.save` checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The path does not exist.
    #[error("{}: checkpoint file not found", path.display())]
    NotFound {
        /// The checkpoint path.
        path: PathBuf,
    },

    /// The file exists but could not be read.
    #[error("{}: cannot read checkpoint: {source}", path.display())]
    Io {
        /// The checkpoint path.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The file is a pre-1.6 (pickle stream, not zip) `torch.save` file.
    #[error(
        "{}: legacy (non-zip) torch.save format is not supported; re-save with \
         torch.save(..., _use_new_zipfile_serialization=True)",
        path.display()
    )]
    LegacyFormat {
        /// The checkpoint path.
        path: PathBuf,
    },

    /// The file is neither a zip archive nor a legacy `torch.save` pickle.
    #[error("{}: not a torch.save checkpoint (not a zip archive)", path.display())]
    NotZip {
        /// The checkpoint path.
        path: PathBuf,
    },

    /// The zip archive is truncated or damaged (bad directory, bad checksum, ...).
    #[error("{}: truncated or corrupt zip archive: {detail}", path.display())]
    CorruptZip {
        /// The checkpoint path.
        path: PathBuf,
        /// What the zip reader reported.
        detail: String,
    },

    /// The archive holds no `<archive>/data.pkl` record.
    #[error("{}: zip archive has no <archive>/data.pkl record (entries: {})", path.display(), entries.join(", "))]
    MissingDataPkl {
        /// The checkpoint path.
        path: PathBuf,
        /// The first few entry names, to show what the archive is instead.
        entries: Vec<String>,
    },

    /// The `byteorder` record is neither `little` nor `big`.
    #[error("{}: unknown byteorder record {value:?} (expected \"little\" or \"big\")", path.display())]
    BadByteOrder {
        /// The checkpoint path.
        path: PathBuf,
        /// The record's content.
        value: String,
    },

    /// `data.pkl` uses a pickle opcode that a checkpoint never needs.
    #[error("{}: unsupported pickle opcode {name} (0x{opcode:02x}) at byte {offset} of data.pkl", path.display())]
    UnsupportedOpcode {
        /// The checkpoint path.
        path: PathBuf,
        /// The opcode byte.
        opcode: u8,
        /// Its pickletools name, or "unknown".
        name: &'static str,
        /// Byte offset in data.pkl.
        offset: usize,
    },

    /// `data.pkl` is not a well-formed pickle (stack underflow, bad memo index, cut short).
    #[error("{}: malformed data.pkl at byte {offset}: {detail}", path.display())]
    MalformedPickle {
        /// The checkpoint path.
        path: PathBuf,
        /// Byte offset in data.pkl.
        offset: usize,
        /// What is wrong.
        detail: String,
    },

    /// A state-dict entry was built by a torch function this reader does not implement
    /// (a sparse or quantized tensor, for example).
    #[error("{}: state dict entry {key:?} is built by unsupported global {global}", path.display())]
    UnsupportedGlobal {
        /// The checkpoint path.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The dotted name of the global (`torch._utils._rebuild_sparse_tensor`).
        global: String,
    },

    /// A state-dict tensor has a dtype this reader does not decode.
    #[error("{}: tensor {key:?} has unsupported storage type {dtype}", path.display())]
    UnsupportedDtype {
        /// The checkpoint path.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The storage class or dtype name.
        dtype: String,
    },

    /// A tensor's storage record is absent from the archive.
    #[error("{}: tensor {key:?} needs storage record {record} which the archive lacks", path.display())]
    MissingStorage {
        /// The checkpoint path.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The record name (`<archive>/data/<n>`).
        record: String,
    },

    /// A tensor's view reaches past the end of its storage.
    #[error(
        "{}: tensor {key:?} needs {needed} bytes of storage {record} but it has {available}",
        path.display()
    )]
    StorageTooSmall {
        /// The checkpoint path.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The record name.
        record: String,
        /// Bytes the view reaches.
        needed: u64,
        /// Bytes the storage holds.
        available: u64,
    },

    /// A tensor's metadata makes no sense (negative size or stride, sizes that overflow).
    #[error("{}: tensor {key:?} is invalid: {detail}", path.display())]
    InvalidTensor {
        /// The checkpoint path.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// What is wrong.
        detail: String,
    },

    /// Building objects from `data.pkl` would allocate more than its size justifies: a
    /// pickle that size can only get there by expanding shared (memoized) references over
    /// and over, which no `torch.save` does.
    #[error(
        "{}: data.pkl ({pkl_len} bytes) needs more than its limit of {limit} bytes of objects \
         (max({} MiB, {} x its size)) {at}: shared references expanded too often",
        path.display(),
        super::budget::PICKLE_FLOOR >> 20,
        super::budget::PICKLE_BYTES_PER_BYTE
    )]
    PickleBudget {
        /// The checkpoint path.
        path: PathBuf,
        /// Size of `data.pkl`.
        pkl_len: usize,
        /// The limit in bytes.
        limit: u64,
        /// Where it was hit (`at REDUCE, byte 1234 of data.pkl`, `converting top-level entry "x"`).
        at: String,
    },

    /// Reading a tensor would take the checkpoint's tensor data past what its size
    /// justifies: a broadcast (stride 0) or overlapping view naming far more elements than
    /// its storage holds, storages shared by very many tensors, or records that inflate.
    /// (Boxed: the details are many, and every `Result` of the reader carries this type.)
    #[error(transparent)]
    TensorBudget(Box<TensorBudgetError>),

    /// Neither the top level nor any of the wrapper keys holds a mapping of names to tensors.
    #[error(
        "{}: no state dict found (looked for a mapping of names to tensors at the top level \
         or under model_state_dict, state_dict, model); {found}",
        path.display()
    )]
    NoStateDict {
        /// The checkpoint path.
        path: PathBuf,
        /// What the top level is, with its keys when it is a dict.
        found: String,
        /// The top-level keys when the top level is a dict (rendered as text).
        top_level_keys: Vec<String>,
    },
}

impl CheckpointError {
    /// A stable short name for the kind of error, for callers and tests that branch on it.
    pub fn kind(&self) -> &'static str {
        match self {
            CheckpointError::NotFound { .. } => "not_found",
            CheckpointError::Io { .. } => "io",
            CheckpointError::LegacyFormat { .. } => "legacy_format",
            CheckpointError::NotZip { .. } => "not_zip",
            CheckpointError::CorruptZip { .. } => "corrupt_zip",
            CheckpointError::MissingDataPkl { .. } => "missing_data_pkl",
            CheckpointError::BadByteOrder { .. } => "bad_byteorder",
            CheckpointError::UnsupportedOpcode { .. } => "unsupported_opcode",
            CheckpointError::MalformedPickle { .. } => "malformed_pickle",
            CheckpointError::UnsupportedGlobal { .. } => "unsupported_global",
            CheckpointError::UnsupportedDtype { .. } => "unsupported_dtype",
            CheckpointError::MissingStorage { .. } => "missing_storage",
            CheckpointError::StorageTooSmall { .. } => "storage_too_small",
            CheckpointError::InvalidTensor { .. } => "invalid_tensor",
            CheckpointError::NoStateDict { .. } => "no_state_dict",
            CheckpointError::PickleBudget { .. } => "pickle_budget",
            CheckpointError::TensorBudget(_) => "tensor_budget",
        }
    }
}

/// The details of [`CheckpointError::TensorBudget`].
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: tensor {key:?} (size {shape:?}, stride {stride:?}, {numel} elements of {elem} bytes) \
     needs {needed} more bytes {purpose}, past the limit of {limit} bytes of tensor data for a \
     {file_len}-byte file (2 x its size + {} MiB; {used} bytes used before it){}",
    path.display(),
    super::budget::TENSOR_SLACK >> 20,
    match reach {
        Some(reach) => format!(
            "; the view names {numel} elements but reaches only {reach} storage elements: a broadcast \
             (stride 0) or overlapping view, which model weights never are"
        ),
        None => String::new(),
    }
)]
pub struct TensorBudgetError {
    /// The checkpoint path.
    pub path: PathBuf,
    /// The state-dict key (before prefix stripping).
    pub key: String,
    /// The tensor's size as the pickle gives it.
    pub shape: Vec<i64>,
    /// The tensor's stride as the pickle gives it.
    pub stride: Vec<i64>,
    /// Elements the view names.
    pub numel: u128,
    /// Bytes per element.
    pub elem: usize,
    /// Bytes this tensor needs (a storage record read or a gathered copy).
    pub needed: u128,
    /// What for: `to read storage record <archive>/data/<n>`, `for a copy of its view`.
    pub purpose: String,
    /// Bytes charged before it.
    pub used: u64,
    /// The limit in bytes.
    pub limit: u64,
    /// The checkpoint's size.
    pub file_len: u64,
    /// The storage elements the view can reach, when it names more elements than that
    /// (so names some more than once: a broadcast or overlapping view).
    pub reach: Option<u128>,
}
