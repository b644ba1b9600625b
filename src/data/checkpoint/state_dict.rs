//! Finding the state dict inside an unpickled checkpoint (docs/DESIGN.md section 1) and
//! reading its tensors.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use super::archive::Archive;
use super::budget::{Budget, OverBudget};
use super::pickle::{Id, Obj, Pickle, TensorRef};
use super::tensor::{swap_bytes, DType, Tensor, View};
use super::value::PyValue;
use super::{CheckpointError, TensorBudgetError};

/// Keys under which trainers nest the state dict, in the order they are tried.
pub const WRAPPER_KEYS: [&str; 3] = ["model_state_dict", "state_dict", "model"];

/// Key prefixes that wrappers add to every parameter name: `module.` from
/// `nn.DataParallel`/`DistributedDataParallel`, `model.` from Lightning-style modules.
pub const STRIP_PREFIXES: [&str; 2] = ["module.", "model."];

/// The model weights of a checkpoint: an ordered map of parameter/buffer name to tensor,
/// plus how they were found.
#[derive(Debug, Clone)]
pub struct StateDict {
    tensors: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
    /// The top-level key the state dict was found under (`model_state_dict`, `state_dict`,
    /// `model`), or `None` for a bare state dict.
    pub wrapper: Option<String>,
    /// The prefix removed from every key (`module.`, `model.`, or both as
    /// `module.model.`), or `None`.
    pub stripped_prefix: Option<String>,
    /// The other top-level entries next to the wrapper key (epoch, optimizer state,
    /// metrics, ...), in file order; empty for a bare state dict.
    pub other_top_level: Vec<(String, PyValue)>,
    /// State-dict entries that are not tensors and were left out (original keys).
    pub skipped_keys: Vec<String>,
}

impl StateDict {
    /// A state dict from named tensors (later duplicates replace earlier ones in place).
    pub fn new(tensors: Vec<(String, Tensor)>) -> StateDict {
        let mut sd = StateDict {
            tensors: Vec::with_capacity(tensors.len()),
            index: HashMap::with_capacity(tensors.len()),
            wrapper: None,
            stripped_prefix: None,
            other_top_level: Vec::new(),
            skipped_keys: Vec::new(),
        };
        for (name, tensor) in tensors {
            sd.insert(name, tensor);
        }
        sd
    }

    fn insert(&mut self, name: String, tensor: Tensor) {
        match self.index.get(&name) {
            Some(&i) => self.tensors[i].1 = tensor,
            None => {
                self.index.insert(name.clone(), self.tensors.len());
                self.tensors.push((name, tensor));
            }
        }
    }

    /// The tensor named `name` (after prefix stripping).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names and tensors in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// The names and tensors, consuming the state dict.
    pub fn into_tensors(self) -> Vec<(String, Tensor)> {
        self.tensors
    }

    /// The keys of [`StateDict::other_top_level`].
    pub fn other_top_level_keys(&self) -> Vec<&str> {
        self.other_top_level.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The top-level entry `key` next to the wrapper (`epoch`, ...).
    pub fn other(&self, key: &str) -> Option<&PyValue> {
        self.other_top_level.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// A state-dict entry as found in the pickle.
enum Entry<'a> {
    Tensor(&'a TensorRef),
    /// Built by a torch rebuild function this reader does not implement.
    Unsupported(&'a str),
    Other,
}

fn entry(pickle: &Pickle, id: Id) -> Entry<'_> {
    match pickle.get(id) {
        Obj::Tensor(t) => Entry::Tensor(t),
        Obj::Object(o) if is_torch_rebuild(&o.class) => Entry::Unsupported(&o.class),
        _ => Entry::Other,
    }
}

/// torch's reduce functions for tensor kinds (sparse, quantized, nested, subclass wrappers,
/// tensors with conj/neg bits) all live in `torch._utils` / `torch._tensor` as `_rebuild_*`.
fn is_torch_rebuild(class: &str) -> bool {
    class.starts_with("torch.") && class.rsplit('.').next().is_some_and(|n| n.starts_with("_rebuild"))
}

fn dict_items(pickle: &Pickle, id: Id) -> Option<&[(Id, Id)]> {
    match pickle.get(id) {
        Obj::Dict(items) => Some(items),
        _ => None,
    }
}

fn str_key(pickle: &Pickle, id: Id) -> Option<&str> {
    match pickle.get(id) {
        Obj::Str(s) => Some(s),
        _ => None,
    }
}

/// A mapping of string keys with at least one tensor(-like) value.
fn is_state_dict(pickle: &Pickle, id: Id) -> bool {
    let Some(items) = dict_items(pickle, id) else {
        return false;
    };
    items.iter().all(|&(k, _)| str_key(pickle, k).is_some()) && items.iter().any(|&(_, v)| !matches!(entry(pickle, v), Entry::Other))
}

/// A dict key as text: the string, or the plain-data rendering of another key (charged).
fn key_text(pickle: &Pickle, id: Id, budget: &mut Budget) -> Result<String, OverBudget> {
    let text = match str_key(pickle, id) {
        Some(s) => {
            // Charged before the copy: one string may be the key of every entry.
            budget.charge(s.len() as u64)?;
            s.to_owned()
        }
        None => PyValue::from_pickle(pickle, id, budget)?.to_string(),
    };
    Ok(text)
}

/// How many top-level keys a [`CheckpointError::NoStateDict`] message lists (all of them
/// are in its `top_level_keys`).
const KEYS_SHOWN: usize = 40;

fn describe_top(pickle: &Pickle, id: Id, budget: &mut Budget) -> Result<(String, Vec<String>), OverBudget> {
    let kind = match pickle.get(id) {
        Obj::Dict(items) => {
            let keys = items.iter().map(|&(k, _)| key_text(pickle, k, budget)).collect::<Result<Vec<String>, _>>()?;
            let mut found = if keys.is_empty() {
                "the top level is an empty dict".to_owned()
            } else {
                let mut shown = keys.iter().take(KEYS_SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
                if keys.len() > KEYS_SHOWN {
                    shown.push_str(&format!(", ... ({} more)", keys.len() - KEYS_SHOWN));
                }
                format!("top-level keys: {shown}")
            };
            // `torch.save({"model": model})` pickles the module object itself.
            for &(k, v) in items.iter() {
                if let (Some(key), Obj::Object(o)) = (str_key(pickle, k), pickle.get(v)) {
                    if WRAPPER_KEYS.contains(&key) {
                        found.push_str(&format!(
                            "; {key:?} holds a pickled {} object, not a state dict \
                             (save model.state_dict() instead)",
                            o.class
                        ));
                    }
                }
            }
            return Ok((found, keys));
        }
        Obj::List(_) => "a list",
        Obj::Tuple(_) => "a tuple",
        Obj::Set(_) => "a set",
        Obj::Tensor(_) => "a single tensor",
        Obj::Object(o) => return Ok((format!("the top level is a {} object", o.class), Vec::new())),
        Obj::None => "None",
        Obj::Bool(_) | Obj::Int(_) | Obj::BigInt(_) | Obj::Float(_) => "a number",
        Obj::Str(_) | Obj::Bytes(_) => "a string",
        Obj::Global { .. } | Obj::Storage(_) => "a class or storage",
    };
    Ok((format!("the top level is {kind}, not a dict"), Vec::new()))
}

/// Remove `module.` / `model.` while every key carries one; returns the removed prefix.
pub(crate) fn strip_common_prefixes(keys: &mut [String]) -> Option<String> {
    let mut stripped = String::new();
    // Each pass removes one prefix; a key can only lose so many before it runs out.
    'pass: loop {
        if keys.is_empty() {
            break;
        }
        for prefix in STRIP_PREFIXES {
            if keys.iter().all(|k| k.len() > prefix.len() && k.starts_with(prefix)) {
                for k in keys.iter_mut() {
                    k.drain(..prefix.len());
                }
                stripped.push_str(prefix);
                continue 'pass;
            }
        }
        break;
    }
    (!stripped.is_empty()).then_some(stripped)
}

/// Locate the state dict in `pickle` (unpickled from a `data.pkl` of `pkl_len` bytes) and
/// read its tensors from `archive`.
pub(crate) fn extract<R: Read + Seek>(
    pickle: &Pickle,
    pkl_len: usize,
    archive: &mut Archive<R>,
    path: &Path,
) -> Result<StateDict, CheckpointError> {
    let root = pickle.root;
    let mut wrapper = None;
    let mut sd_id = None;
    if let Some(items) = dict_items(pickle, root) {
        for key in WRAPPER_KEYS {
            let found = items.iter().find(|&&(k, v)| str_key(pickle, k) == Some(key) && is_state_dict(pickle, v));
            if let Some(&(_, v)) = found {
                wrapper = Some(key.to_owned());
                sd_id = Some(v);
                break;
            }
        }
        if sd_id.is_none() && is_state_dict(pickle, root) {
            sd_id = Some(root);
        }
    }
    // Keys and the extras are copied out of the pickle, where one string or one big list
    // can be shared by every entry: all of it is charged to one budget.
    let mut budget = Budget::pickle(pkl_len);
    let over = |at: String| move |OverBudget { limit }| CheckpointError::PickleBudget { path: path.to_path_buf(), pkl_len, limit, at };
    let Some(sd_id) = sd_id else {
        let (found, top_level_keys) = describe_top(pickle, root, &mut budget).map_err(over("listing the top-level keys".to_owned()))?;
        return Err(CheckpointError::NoStateDict { path: path.to_path_buf(), found, top_level_keys });
    };

    let mut other_top_level = Vec::new();
    if let (Some(w), Some(items)) = (&wrapper, dict_items(pickle, root)) {
        for &(k, v) in items {
            let key = key_text(pickle, k, &mut budget).map_err(over("listing the top-level keys".to_owned()))?;
            if key != *w {
                let value = PyValue::from_pickle(pickle, v, &mut budget).map_err(over(format!("converting top-level entry {key:?}")))?;
                other_top_level.push((key, value));
            }
        }
    }

    let items = dict_items(pickle, sd_id).unwrap_or_default();
    let mut keys = Vec::new();
    let mut refs = Vec::new();
    let mut skipped_keys = Vec::new();
    for &(k, v) in items {
        let key = str_key(pickle, k).unwrap_or_default();
        budget.charge(key.len() as u64).map_err(over("listing the state-dict keys".to_owned()))?;
        let key = key.to_owned();
        match entry(pickle, v) {
            Entry::Tensor(t) => {
                keys.push(key);
                refs.push(t);
            }
            Entry::Unsupported(global) => {
                return Err(CheckpointError::UnsupportedGlobal { path: path.to_path_buf(), key, global: global.to_owned() })
            }
            Entry::Other => skipped_keys.push(key),
        }
    }
    let stripped_prefix = strip_common_prefixes(&mut keys);

    let tensors = read_tensors(&keys, stripped_prefix.as_deref().unwrap_or_default(), &refs, archive, path)?;
    let mut sd = StateDict::new(keys.into_iter().zip(tensors).collect());
    sd.wrapper = wrapper;
    sd.stripped_prefix = stripped_prefix;
    sd.other_top_level = other_top_level;
    sd.skipped_keys = skipped_keys;
    Ok(sd)
}

/// Elements a view names, as a wide integer (no overflow whatever the shape).
fn numel_wide(shape: &[i64]) -> u128 {
    shape.iter().try_fold(1u128, |acc, &d| acc.checked_mul(u128::try_from(d).ok()?)).unwrap_or(u128::MAX)
}

/// Read the tensors' storages and gather each view. A storage shared by several tensors
/// is read once and kept only until its last user; a storage used by one tensor that
/// covers it from the start is handed over without a copy. Every record read and every
/// gathered copy is charged to [`Budget::tensors`] before it is allocated.
///
/// `keys` are the stripped names; errors name the original key (`prefix` + name).
fn read_tensors<R: Read + Seek>(
    keys: &[String],
    prefix: &str,
    refs: &[&TensorRef],
    archive: &mut Archive<R>,
    path: &Path,
) -> Result<Vec<Tensor>, CheckpointError> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for t in refs {
        *uses.entry(t.storage.key.as_str()).or_default() += 1;
    }
    let file_len = archive.file_len();
    let mut budget = Budget::tensors(file_len);
    let mut cache: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (key, t) in keys.iter().zip(refs) {
        let key = || format!("{prefix}{key}");
        let invalid = |detail: String| CheckpointError::InvalidTensor { path: path.to_path_buf(), key: key(), detail };
        let Some(dtype) = t.dtype else {
            return Err(CheckpointError::UnsupportedDtype { path: path.to_path_buf(), key: key(), dtype: t.dtype_name.clone() });
        };
        let view = View::new(t.offset, &t.shape, &t.stride).map_err(invalid)?;
        let elem = dtype.size();
        // Charge `needed` bytes for this tensor, or say which tensor, view and limit.
        let charge = |budget: &mut Budget, needed: u128, purpose: &dyn Fn() -> String| {
            let used = budget.used();
            budget.charge(u64::try_from(needed).unwrap_or(u64::MAX)).map_err(|OverBudget { limit }| {
                let numel = numel_wide(&t.shape);
                // Elements the view can reach, from its offset on: naming more than that
                // means naming some more than once.
                let reach = view.extent.saturating_sub(view.offset) as u128;
                CheckpointError::TensorBudget(Box::new(TensorBudgetError {
                    path: path.to_path_buf(),
                    key: key(),
                    shape: t.shape.clone(),
                    stride: t.stride.clone(),
                    numel,
                    elem,
                    needed,
                    purpose: purpose(),
                    used,
                    limit,
                    file_len,
                    reach: (numel > reach).then_some(reach),
                }))
            })
        };
        // A gathered copy's size; exact, even where it would not fit in 64 bits.
        let copy_bytes = numel_wide(&t.shape).saturating_mul(elem as u128);
        let storage_key = t.storage.key.as_str();
        let record = archive.record_name(&format!("data/{storage_key}"));
        let read_record = || format!("to read its storage record {record}");
        let missing = || CheckpointError::MissingStorage { path: path.to_path_buf(), key: key(), record: record.clone() };
        let too_small = |needed: u64, available: u64| CheckpointError::StorageTooSmall {
            path: path.to_path_buf(),
            key: key(),
            record: record.clone(),
            needed,
            available,
        };
        // The usual weight: a float32 tensor alone on its storage, contiguous. Read straight
        // into float32 values (no byte buffer to convert), when byte orders agree.
        let storage_elem = t.storage.dtype.map_or(1, |d| d.size()) as u64;
        let declared = t.storage.numel.saturating_mul(storage_elem);
        if dtype == DType::F32
            && t.storage.dtype == Some(DType::F32)
            && uses.get(storage_key) == Some(&1)
            && view.numel > 0
            && view.is_contiguous()
            && !archive.big_endian
            && cfg!(target_endian = "little")
        {
            let mut values = archive
                .record_f32(&format!("data/{storage_key}"), |size| charge(&mut budget, size.into(), &read_record))?
                .ok_or_else(missing)?;
            let available = declared.min(values.len() as u64 * 4);
            if view.extent as u64 * 4 > available {
                return Err(too_small(view.extent as u64 * 4, available));
            }
            uses.insert(storage_key, 0);
            values.truncate(view.offset + view.numel);
            values.drain(..view.offset);
            out.push(
                Tensor::from_f32_values(view.shape, values).ok_or_else(|| invalid("element count does not match its data".to_owned()))?,
            );
            continue;
        }
        let remaining = uses.get(storage_key).copied().unwrap_or(1).saturating_sub(1);
        let handed_over = remaining == 0 && view.is_contiguous();
        // A copy is charged before its storage is even read: a broadcast view of a tiny
        // storage fails here, whatever the storage.
        if view.numel > 0 && !handed_over {
            charge(&mut budget, copy_bytes, &|| "for a copy of its view".to_owned())?;
        }
        let mut data = match cache.remove(storage_key) {
            Some(d) => d,
            None => archive
                .record(&format!("data/{storage_key}"), |size| charge(&mut budget, size.into(), &read_record))?
                .ok_or_else(missing)?,
        };
        // The storage is as large as torch declared it, and no larger than its record.
        let available = declared.min(data.len() as u64);
        let needed = (view.extent as u64).checked_mul(elem as u64);
        if needed.is_none_or(|n| n > available) {
            return Err(too_small(needed.unwrap_or(u64::MAX), available));
        }
        uses.insert(storage_key, remaining);
        // An empty view reads nothing, wherever its (unchecked) offset points.
        let mut bytes = if view.numel == 0 {
            if remaining > 0 {
                cache.insert(storage_key, data);
            }
            Vec::new()
        } else if handed_over {
            // In bounds: extent * elem <= available (checked above) and a contiguous view
            // ends at offset + numel = extent.
            let start = view.offset * elem;
            data.truncate(start + view.numel * elem);
            data.drain(..start);
            data
        } else {
            let bytes = view.gather(&data, elem);
            if remaining > 0 {
                cache.insert(storage_key, data);
            }
            bytes
        };
        if archive.big_endian {
            swap_bytes(&mut bytes, elem);
        }
        let tensor =
            Tensor::from_parts(dtype, view.shape, bytes).ok_or_else(|| invalid("element count does not match its data".to_owned()))?;
        out.push(tensor);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(keys: &[&str]) -> (Option<String>, Vec<String>) {
        let mut keys: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
        let p = strip_common_prefixes(&mut keys);
        (p, keys)
    }

    #[test]
    fn prefixes() {
        assert_eq!(strip(&["module.a", "module.b.c"]), (Some("module.".into()), vec!["a".into(), "b.c".into()]));
        assert_eq!(strip(&["module.model.a", "module.model.b"]), (Some("module.model.".into()), vec!["a".into(), "b".into()]));
        assert_eq!(strip(&["module.a", "b"]).0, None);
        // A key that is only the prefix would become empty: leave everything alone.
        assert_eq!(strip(&["model.", "model.a"]).0, None);
        assert_eq!(strip(&["modules.a"]).0, None);
        assert_eq!(strip(&[]).0, None);
    }

    #[test]
    fn rebuild_names() {
        assert!(is_torch_rebuild("torch._utils._rebuild_sparse_tensor"));
        assert!(is_torch_rebuild("torch._utils._rebuild_qtensor"));
        assert!(!is_torch_rebuild("torch.device"));
        assert!(!is_torch_rebuild("argparse.Namespace"));
    }
}
