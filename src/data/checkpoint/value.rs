//! Plain-data view of the non-tensor parts of a checkpoint (epoch, metrics, args, ...).

use std::fmt;

use super::budget::{Budget, OverBudget};
use super::pickle::{Id, Obj, Pickle};

/// A value from the checkpoint outside the state dict, as plain data.
///
/// Tensors appear as their dtype and shape only (their data is never read), and anything
/// this reader does not interpret is an [`PyValue::Object`] naming its class.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None`
    None,
    /// `bool` (and numpy `bool_`)
    Bool(bool),
    /// `int` within 64 bits (and numpy integer scalars)
    Int(i64),
    /// `int` beyond 64 bits, in decimal (hexadecimal `0x...` past 128 bits)
    BigInt(String),
    /// `float` (and numpy floating scalars)
    Float(f64),
    /// `str`
    Str(String),
    /// `bytes` / `bytearray`
    Bytes(Vec<u8>),
    /// `list`
    List(Vec<PyValue>),
    /// `tuple`
    Tuple(Vec<PyValue>),
    /// `set` / `frozenset`
    Set(Vec<PyValue>),
    /// `dict` / `OrderedDict`, in insertion order
    Dict(Vec<(PyValue, PyValue)>),
    /// A tensor: dtype name (`float32`, or the storage class torch used) and shape.
    Tensor {
        /// dtype name
        dtype: String,
        /// sizes
        shape: Vec<i64>,
    },
    /// An instance of a class this reader leaves uninterpreted (`argparse.Namespace`,
    /// `torch.device`, a numpy array, ...), with its constructor arguments and the state
    /// pickle gave it (for `Namespace`, the dict of its attributes).
    Object {
        /// Dotted class or function name.
        class: String,
        /// Constructor arguments.
        args: Vec<PyValue>,
        /// `__setstate__` / `__dict__` content, if any.
        state: Option<Box<PyValue>>,
    },
    /// A reference to a class or function itself (`torch.float32`).
    Global(String),
    /// Left out: nested too deep, or a reference cycle.
    Elided,
}

/// Nesting depth past which values are elided (checkpoint extras are shallow).
const MAX_DEPTH: usize = 32;

impl PyValue {
    /// The value as f64 for ints, floats and bools.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Float(v) => Some(*v),
            PyValue::Int(v) => Some(*v as f64),
            PyValue::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    /// The value as i64 for ints and bools.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            PyValue::Int(v) => Some(*v),
            PyValue::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The string, for `str` values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// For a dict, the value under string key `key`.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The plain-data view of object `id`, charging every node and string it builds to
    /// `budget`. Shared sub-objects are expanded at each use, so a small pickle can
    /// describe an exponentially large tree: the caller passes one budget for all the
    /// values it converts, which bounds them in total.
    pub(crate) fn from_pickle(pickle: &Pickle, id: Id, budget: &mut Budget) -> Result<PyValue, OverBudget> {
        let mut path = Vec::new();
        convert(pickle, id, &mut path, budget)
    }
}

fn convert(pickle: &Pickle, id: Id, path: &mut Vec<Id>, budget: &mut Budget) -> Result<PyValue, OverBudget> {
    if path.len() >= MAX_DEPTH || path.contains(&id) {
        return Ok(PyValue::Elided);
    }
    // Charged before the children are built, with an upper bound for strings, so that no
    // copy is made past the budget.
    budget.charge((std::mem::size_of::<PyValue>() + text_len(pickle.get(id))) as u64)?;
    path.push(id);
    let mut all = |ids: &[Id], path: &mut Vec<Id>| -> Result<Vec<PyValue>, OverBudget> {
        ids.iter().map(|&i| convert(pickle, i, path, budget)).collect()
    };
    let value = match pickle.get(id) {
        Obj::None => PyValue::None,
        Obj::Bool(b) => PyValue::Bool(*b),
        Obj::Int(v) => PyValue::Int(*v),
        Obj::BigInt(bytes) => PyValue::BigInt(big_int_text(bytes)),
        Obj::Float(v) => PyValue::Float(*v),
        Obj::Str(s) => PyValue::Str(s.clone()),
        Obj::Bytes(b) => PyValue::Bytes(b.clone()),
        Obj::List(items) => PyValue::List(all(items, path)?),
        Obj::Tuple(items) => PyValue::Tuple(all(items, path)?),
        Obj::Set(items) => PyValue::Set(all(items, path)?),
        Obj::Dict(items) => {
            let mut out = Vec::new();
            for &(k, v) in items {
                let k = convert(pickle, k, path, budget)?;
                let v = convert(pickle, v, path, budget)?;
                out.push((k, v));
            }
            PyValue::Dict(out)
        }
        Obj::Global { module, name } => PyValue::Global(format!("{module}.{name}")),
        Obj::Storage(s) => PyValue::Object {
            class: format!("torch.{}", s.class),
            args: vec![PyValue::Int(i64::try_from(s.numel).unwrap_or(i64::MAX))],
            state: None,
        },
        Obj::Tensor(t) => {
            PyValue::Tensor { dtype: t.dtype.map(|d| d.name().to_owned()).unwrap_or_else(|| t.dtype_name.clone()), shape: t.shape.clone() }
        }
        Obj::Object(o) => {
            let args = all(&o.args, path)?;
            let state = match o.state {
                Some(s) => Some(Box::new(convert(pickle, s, path, budget)?)),
                None => None,
            };
            PyValue::Object { class: o.class.clone(), args, state }
        }
    };
    path.pop();
    Ok(value)
}

/// An upper bound of the text and buffer bytes the value of `obj` holds (decimal digits of
/// a big integer included), so that a conversion is charged before it copies them.
fn text_len(obj: &Obj) -> usize {
    match obj {
        // Two hex digits per byte plus the suffix; decimal up to 128 bits is shorter.
        Obj::BigInt(b) => 2 * b.len() + 24,
        Obj::Str(s) => s.len(),
        Obj::Bytes(b) => b.len(),
        Obj::Global { module, name } => module.len() + 1 + name.len(),
        Obj::Storage(s) => s.class.len() + 6 + std::mem::size_of::<PyValue>(),
        Obj::Tensor(t) => t.dtype_name.len().max(8) + std::mem::size_of_val(t.shape.as_slice()),
        Obj::Object(o) => o.class.len() + std::mem::size_of::<PyValue>(),
        _ => 0,
    }
}

/// Decimal text of a little-endian two's complement integer (hex past 128 bits).
fn big_int_text(bytes: &[u8]) -> String {
    if bytes.len() <= 16 {
        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
        buf[..bytes.len()].copy_from_slice(bytes);
        return i128::from_le_bytes(buf).to_string();
    }
    let hex: String = bytes.iter().rev().map(|b| format!("{b:02x}")).collect();
    format!("0x{hex} (two's complement)")
}

fn join(f: &mut fmt::Formatter<'_>, items: &[PyValue]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// Python-like rendering, for summaries and messages.
impl fmt::Display for PyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyValue::None => f.write_str("None"),
            PyValue::Bool(true) => f.write_str("True"),
            PyValue::Bool(false) => f.write_str("False"),
            PyValue::Int(v) => write!(f, "{v}"),
            PyValue::BigInt(s) => f.write_str(s),
            PyValue::Float(v) => write!(f, "{v:?}"),
            PyValue::Str(s) => write!(f, "{s:?}"),
            PyValue::Bytes(b) => write!(f, "b{:?}", String::from_utf8_lossy(b)),
            PyValue::List(items) => {
                f.write_str("[")?;
                join(f, items)?;
                f.write_str("]")
            }
            PyValue::Tuple(items) => {
                f.write_str("(")?;
                join(f, items)?;
                if items.len() == 1 {
                    f.write_str(",")?;
                }
                f.write_str(")")
            }
            PyValue::Set(items) => {
                f.write_str("{")?;
                join(f, items)?;
                f.write_str("}")
            }
            PyValue::Dict(items) => {
                f.write_str("{")?;
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
            PyValue::Tensor { dtype, shape } => write!(f, "tensor({dtype}, {shape:?})"),
            PyValue::Object { class, args, state } => {
                // Namespace-like objects show their attributes, others their arguments.
                match state.as_deref() {
                    Some(PyValue::Dict(items)) if args.is_empty() && items.iter().all(|(k, _)| k.as_str().is_some()) => {
                        write!(f, "{class}(")?;
                        for (i, (k, v)) in items.iter().enumerate() {
                            if i > 0 {
                                f.write_str(", ")?;
                            }
                            write!(f, "{}={v}", k.as_str().unwrap_or_default())?;
                        }
                        f.write_str(")")
                    }
                    _ => {
                        write!(f, "{class}(")?;
                        join(f, args)?;
                        f.write_str(")")
                    }
                }
            }
            PyValue::Global(name) => f.write_str(name),
            PyValue::Elided => f.write_str("..."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::checkpoint::pickle::parse;

    #[test]
    fn cycles_and_shared_objects_are_bounded() {
        // l = []; l.append(l)
        let p = parse(b"\x80\x02]q\x00h\x00a.").unwrap();
        let v = PyValue::from_pickle(&p, p.root, &mut Budget::new(1 << 20)).unwrap();
        assert_eq!(v, PyValue::List(vec![PyValue::Elided]));
    }

    #[test]
    fn shared_references_are_bounded_in_total() {
        // l = [None]; then 30 times l = [l, l]: 2^31 nodes when expanded, from 200 bytes.
        let mut data = b"\x80\x02(Nl".to_vec();
        for _ in 0..30 {
            data.extend_from_slice(b"\x94(h\x00h\x00l");
            let n = data.len();
            // MEMOIZE stores at index memo.len(): rewrite the two gets to that index.
            let i = data.iter().filter(|&&b| b == 0x94).count() - 1;
            data[n - 4] = i as u8;
            data[n - 2] = i as u8;
        }
        data.push(b'.');
        let p = parse(&data).unwrap();
        let mut budget = Budget::new(1 << 20);
        assert_eq!(PyValue::from_pickle(&p, p.root, &mut budget), Err(OverBudget { limit: 1 << 20 }));
        assert!(budget.used() <= 1 << 20);
    }

    #[test]
    fn display_is_python_like() {
        let v = PyValue::Object {
            class: "argparse.Namespace".into(),
            args: vec![],
            state: Some(Box::new(PyValue::Dict(vec![(PyValue::Str("lr".into()), PyValue::Float(0.1))]))),
        };
        assert_eq!(v.to_string(), "argparse.Namespace(lr=0.1)");
        assert_eq!(PyValue::Tuple(vec![PyValue::Int(1)]).to_string(), "(1,)");
        assert_eq!(big_int_text(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), "1208925819614629174706176");
        assert_eq!(big_int_text(&[0xff; 9]), "-1");
    }
}
