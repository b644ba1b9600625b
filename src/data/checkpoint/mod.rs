//! Reading `torch.save` checkpoints without Python.
//!
//! A checkpoint is a zip archive (torch >= 1.6): `<archive>/data.pkl` is a pickle of the
//! saved object in which every tensor is a call of `torch._utils._rebuild_tensor_v2` on a
//! storage that pickle's persistent-id mechanism names by key, and `<archive>/data/<key>`
//! holds that storage's raw bytes. This module
//!
//! 1. opens the zip and checks its `byteorder` record (`archive.rs`),
//! 2. interprets `data.pkl` with an opcode interpreter that builds inert data and never
//!    imports or calls anything (`pickle.rs`): unknown globals become named opaque values,
//! 3. finds the state dict as docs/DESIGN.md section 1 describes (bare, or under
//!    `model_state_dict` / `state_dict` / `model`; `module.` / `model.` prefixes stripped
//!    when every key has one) and
//! 4. reads only the storages that state dict uses, gathering each tensor's strided view
//!    into contiguous row-major little-endian bytes (`tensor.rs`).
//!
//! Storage records are read whole with their CRC checked, so a damaged file is an error,
//! never silently wrong weights; no input makes this module panic.
//!
//! # Hostile inputs
//!
//! No input makes the reader allocate much more than the file's size justifies
//! (`budget.rs` has the numbers and why): every size, element count, byte count and
//! offset is computed with checked arithmetic, and
//!
//! * building objects from `data.pkl` is bounded in total, per stage, by
//!   `max(32 MiB, 96 x its size)`: shared (memoized) references that would be copied or
//!   walked once per use (a 100k-item tuple passed to 100k calls, one big list under 200k
//!   keys of the extras) run into that budget and make a [`CheckpointError::PickleBudget`];
//! * a tensor's bytes come from its storage record, whose size the zip directory declares
//!   and which is checked against the file's size before anything is allocated;
//! * every storage record read and every tensor gathered out of one is charged against
//!   `2 x file size + 64 MiB` of tensor data before it is allocated. A view that names
//!   storage elements more than once (stride 0, overlapping strides) is not refused as
//!   such: torch saves an expanded tensor that way and loads it back, and a small one (a
//!   broadcast bias, say) is materialized like any other tensor. But the weights of a
//!   model are never broadcast views, so a view that would materialize more than the file
//!   can justify is a [`CheckpointError::TensorBudget`] naming the tensor's key, size and
//!   stride, checked before its storage is even read.
//!
//! ```no_run
//! use mkonnx::data::checkpoint::load_state_dict;
//! let sd = load_state_dict(std::path::Path::new("outputs/run/best_model.pth"))?;
//! let w = sd.get("backbone.body.conv1.weight").map(|t| t.to_f32());
//! # Ok::<(), mkonnx::data::checkpoint::CheckpointError>(())
//! ```

mod archive;
mod budget;
mod error;
mod pickle;
mod state_dict;
mod tensor;
mod value;

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

pub use error::{CheckpointError, TensorBudgetError};
pub use state_dict::{StateDict, STRIP_PREFIXES, WRAPPER_KEYS};
pub use tensor::{DType, Tensor};
pub use value::PyValue;

/// Read the state dict of the `torch.save` checkpoint at `path`.
pub fn load_state_dict(path: &Path) -> Result<StateDict, CheckpointError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::NotFound { path: path.to_path_buf() }
        } else {
            CheckpointError::Io { path: path.to_path_buf(), source }
        }
    })?;
    // Large buffer: the central directory and data.pkl are read in small pieces; storage
    // records bypass the buffer since they are read in one large call each.
    read_state_dict(BufReader::with_capacity(1 << 16, file), path)
}

/// Read the state dict of a checkpoint held in memory; `path` only names it in errors.
pub fn load_state_dict_from_bytes(bytes: &[u8], path: &Path) -> Result<StateDict, CheckpointError> {
    read_state_dict(Cursor::new(bytes), path)
}

fn read_state_dict<R: Read + Seek>(reader: R, path: &Path) -> Result<StateDict, CheckpointError> {
    let mut archive = archive::Archive::open(reader, path)?;
    let pkl = archive.data_pkl()?;
    let pickle = pickle::parse(&pkl).map_err(|e| match e {
        pickle::PickleError::UnsupportedOpcode { opcode, offset } => {
            CheckpointError::UnsupportedOpcode { path: path.to_path_buf(), opcode, name: pickle::opcode_name(opcode), offset }
        }
        pickle::PickleError::Malformed { offset, detail } => CheckpointError::MalformedPickle { path: path.to_path_buf(), offset, detail },
        pickle::PickleError::Budget { offset, opcode, limit } => CheckpointError::PickleBudget {
            path: path.to_path_buf(),
            pkl_len: pkl.len(),
            limit,
            at: format!("at {} (byte {offset} of data.pkl)", pickle::opcode_name(opcode)),
        },
    })?;
    state_dict::extract(&pickle, pkl.len(), &mut archive, path)
}
