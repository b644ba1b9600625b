//! A pickle interpreter that builds data and never runs code.
//!
//! `torch.save` writes `data.pkl` with pickle protocol 2 (any protocol up to 5 when the
//! caller passes `pickle_protocol`). Python's unpickler imports and calls whatever globals
//! the stream names; this one only recognizes the handful of globals a checkpoint uses
//! (containers, `torch._utils._rebuild_tensor_v2` and friends, storage classes, numpy
//! scalars) and turns every other global call into an inert [`Object`] that remembers the
//! class name. So a checkpoint whose extras hold a `argparse.Namespace` or some user class
//! still yields its state dict, and nothing in the file can make this process do anything.
//!
//! Objects live in one arena and refer to each other by index. Pickle semantics need
//! that: a memoized container is filled *after* it was first referenced (`BINPUT` then
//! `SETITEMS`), and later `BINGET`s must see the filled object. The arena also makes
//! cycles and deep nesting harmless: nothing here recurses over the object graph.
//! Sharing is what makes a small pickle expensive (a memoized tuple passed to any number
//! of calls, each copying it), so every object is charged, with what it holds, against
//! [`Budget::pickle`] of the pickle's length, and past it unpickling stops with an error.

use std::collections::HashMap;

use super::budget::{Budget, OverBudget};
use super::tensor::DType;

/// Index of an object in [`Pickle::objs`].
pub(crate) type Id = usize;

/// A storage reference, the result of `persistent_load(('storage', cls, key, location, numel))`.
#[derive(Debug, Clone)]
pub(crate) struct StorageRef {
    /// The storage class name (`FloatStorage`, `UntypedStorage`, ...).
    pub class: String,
    /// Element type of the storage; `None` for classes this reader does not decode.
    pub dtype: Option<DType>,
    /// Record key: the storage bytes are in `<archive>/data/<key>`.
    pub key: String,
    /// Declared size in storage elements.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2`/`_v3` describes it: a strided view of a storage.
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    /// Element type of the tensor; for `_v2` that of its storage.
    pub dtype: Option<DType>,
    /// Name to report when `dtype` is `None`.
    pub dtype_name: String,
    /// Offset into the storage, in tensor elements.
    pub offset: i64,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A call to (or instantiation of) a global this reader does not interpret.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    /// Dotted name of the callable (`argparse.Namespace`), or `<call>` when the callable
    /// was not a global.
    pub class: String,
    pub args: Vec<Id>,
    /// What `BUILD` applied (the object's `__dict__` or `__setstate__` argument).
    pub state: Option<Id>,
}

/// One unpickled value.
#[derive(Debug, Clone)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Set(Vec<Id>),
    /// Insertion-ordered; `OrderedDict` is a `Dict` too.
    Dict(Vec<(Id, Id)>),
    /// A reference to a class or function (`torch.float32`, `torch.FloatStorage`).
    Global {
        module: String,
        name: String,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
    Object(Object),
}

/// The result of unpickling: the arena and the id of the top-level object.
#[derive(Debug)]
pub(crate) struct Pickle {
    pub objs: Vec<Obj>,
    pub root: Id,
}

impl Pickle {
    /// The object with id `id` (ids come from this arena, so they are in range).
    pub fn get(&self, id: Id) -> &Obj {
        &self.objs[id]
    }
}

impl Obj {
    /// Bytes the object holds outside itself (string and container buffers), for the budget.
    fn heap_bytes(&self) -> usize {
        let ids = |n: usize| n.saturating_mul(std::mem::size_of::<Id>());
        match self {
            Obj::None | Obj::Bool(_) | Obj::Int(_) | Obj::Float(_) => 0,
            Obj::BigInt(b) | Obj::Bytes(b) => b.len(),
            Obj::Str(s) => s.len(),
            Obj::List(items) | Obj::Tuple(items) | Obj::Set(items) => ids(items.len()),
            Obj::Dict(pairs) => ids(pairs.len()).saturating_mul(2),
            Obj::Global { module, name } => module.len() + name.len(),
            Obj::Storage(s) => s.class.len() + s.key.len(),
            Obj::Tensor(t) => t.storage.class.len() + t.storage.key.len() + t.dtype_name.len() + ids(t.shape.len()) + ids(t.stride.len()),
            Obj::Object(o) => o.class.len() + ids(o.args.len()),
        }
    }
}

/// Why unpickling failed; the caller adds the file path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PickleError {
    UnsupportedOpcode {
        opcode: u8,
        offset: usize,
    },
    Malformed {
        offset: usize,
        detail: String,
    },
    /// The objects built so far plus the next one would pass the budget.
    Budget {
        offset: usize,
        opcode: u8,
        limit: u64,
    },
}

type Result<T> = std::result::Result<T, PickleError>;

/// Unpickle `data` into an arena of inert objects, within [`Budget::pickle`] of its length.
pub(crate) fn parse(data: &[u8]) -> Result<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        op_start: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        budget: Budget::pickle(data.len()),
    };
    let root = m.run()?;
    Ok(Pickle { objs: m.objs, root })
}

/// The pickletools name of an opcode, for error messages.
pub(crate) fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_start: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack heights at each MARK (Python's "metastack").
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// What the objects may hold in total: the arena's objects, every copy of an argument
    /// tuple, and every item added to a container after it was built. The stack, marks and
    /// memo are not charged: each entry costs at least one opcode byte, so they grow only
    /// linearly with `data` (at most about 40 bytes per byte).
    budget: Budget,
}

/// Globals whose calls build plain containers.
const ORDERED_DICT: &[&str] = &["collections.OrderedDict"];
const SET: &[&str] = &["builtins.set", "__builtin__.set", "builtins.frozenset", "__builtin__.frozenset"];
const BYTEARRAY: &[&str] = &["builtins.bytearray", "__builtin__.bytearray"];
const NUMPY_SCALAR: &[&str] = &["numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"];

impl Machine<'_> {
    fn malformed<T>(&self, detail: impl Into<String>) -> Result<T> {
        Err(PickleError::Malformed { offset: self.op_start, detail: detail.into() })
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => end,
            _ => {
                return self.malformed(format!(
                    "{} needs {n} more bytes but data.pkl ends at byte {}",
                    opcode_name(self.data[self.op_start]),
                    self.data.len()
                ))
            }
        };
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn take_u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn take_u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take_array()?) as usize)
    }

    fn take_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.take_array()?);
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.malformed(format!("length {n} does not fit in memory")),
        }
    }

    /// A `\n`-terminated argument of the text opcodes (protocol 0).
    fn take_line(&mut self) -> Result<&[u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = &self.data[self.pos..self.pos + n];
                self.pos += n + 1;
                Ok(line)
            }
            None => self.malformed("text argument has no terminating newline"),
        }
    }

    fn take_line_str(&mut self) -> Result<String> {
        let line = self.take_line()?;
        match std::str::from_utf8(line) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => self.malformed("text argument is not UTF-8"),
        }
    }

    fn take_utf8(&mut self, n: usize) -> Result<String> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => self.malformed("string is not valid UTF-8"),
        }
    }

    /// Account for `bytes` more of objects; past the budget, unpickling stops.
    fn charge(&mut self, bytes: usize) -> Result<()> {
        match self.budget.charge(bytes as u64) {
            Ok(()) => Ok(()),
            Err(OverBudget { limit }) => Err(PickleError::Budget { offset: self.op_start, opcode: self.data[self.op_start], limit }),
        }
    }

    /// Put `obj` in the arena, charged with what it holds: copies of shared objects (a
    /// call's argument tuple, a string) are paid for here, once per copy.
    fn push(&mut self, obj: Obj) -> Result<()> {
        self.charge(std::mem::size_of::<Obj>() + obj.heap_bytes())?;
        self.objs.push(obj);
        self.stack.push(self.objs.len() - 1);
        Ok(())
    }

    fn pop(&mut self) -> Result<Id> {
        // Popping below the innermost MARK would corrupt the mark bookkeeping.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.malformed(format!("{} pops from an empty stack", opcode_name(self.data[self.op_start])));
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    fn top(&self) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(&id) if self.stack.len() > floor => Ok(id),
            _ => self.malformed(format!("{} needs an object on the stack", opcode_name(self.data[self.op_start]))),
        }
    }

    /// Pop everything above the innermost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        match self.marks.pop() {
            Some(height) if height <= self.stack.len() => Ok(self.stack.split_off(height)),
            _ => self.malformed(format!("{} without a matching MARK", opcode_name(self.data[self.op_start]))),
        }
    }

    fn memo_get(&self, index: u64) -> Result<Id> {
        match self.memo.get(&index) {
            Some(&id) => Ok(id),
            None => self.malformed(format!("memo index {index} was never stored")),
        }
    }

    fn memo_put(&mut self, index: u64) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(index, id);
        Ok(())
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            self.op_start = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&op) => op,
                None => return self.malformed("data.pkl ends without a STOP opcode"),
            };
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO: any protocol this interpreter knows the opcodes of.
                    let proto = self.take_u8()?;
                    if proto > 5 {
                        return self.malformed(format!("pickle protocol {proto} is newer than 5"));
                    }
                }
                0x95 => {
                    // FRAME: a framing hint; the data is already all in memory.
                    self.take(8)?;
                }
                b'.' => {
                    let id = self.pop()?;
                    return Ok(id);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(id);
                }

                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Obj::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.take_u8()?;
                    self.push(Obj::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Obj::Int(i64::from(v)))?;
                }
                0x8a => {
                    let n = usize::from(self.take_u8()?);
                    let bytes = self.take(n)?.to_vec();
                    self.push(long_from_bytes(bytes))?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.take_array()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.malformed("LONG4 with a negative length");
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(long_from_bytes(bytes))?;
                }
                b'I' => {
                    let line = self.take_line_str()?;
                    let obj = match line.as_str() {
                        // Protocol 0 spells booleans as INT 01 / 00.
                        "01" => Obj::Bool(true),
                        "00" => Obj::Bool(false),
                        s => match s.parse::<i64>() {
                            Ok(v) => Obj::Int(v),
                            Err(_) => return self.malformed(format!("bad INT argument {s:?}")),
                        },
                    };
                    self.push(obj)?;
                }
                b'L' => {
                    let line = self.take_line_str()?;
                    let digits = line.strip_suffix('L').unwrap_or(&line);
                    match digits.parse::<i64>() {
                        Ok(v) => self.push(Obj::Int(v))?,
                        Err(_) => match digits.parse::<i128>() {
                            Ok(v) => self.push(Obj::BigInt(v.to_le_bytes().to_vec()))?,
                            Err(_) => return self.malformed(format!("bad LONG argument {line:?}")),
                        },
                    }
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push(Obj::Float(v))?;
                }
                b'F' => {
                    let line = self.take_line_str()?;
                    match line.trim().parse::<f64>() {
                        Ok(v) => self.push(Obj::Float(v))?,
                        Err(_) => return self.malformed(format!("bad FLOAT argument {line:?}")),
                    }
                }

                b'X' => {
                    let n = self.take_u32()?;
                    let s = self.take_utf8(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8c => {
                    let n = usize::from(self.take_u8()?);
                    let s = self.take_utf8(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8d => {
                    let n = self.take_u64()?;
                    let s = self.take_utf8(n)?;
                    self.push(Obj::Str(s))?;
                }
                b'V' => {
                    let line = self.take_line()?.to_vec();
                    match decode_raw_unicode_escape(&line) {
                        Some(s) => self.push(Obj::Str(s))?,
                        None => return self.malformed("bad UNICODE argument"),
                    }
                }
                b'T' => {
                    // Python 2 `str`: torch.load decodes these as text (latin-1 is lossless).
                    let n = i32::from_le_bytes(self.take_array()?);
                    let Ok(n) = usize::try_from(n) else {
                        return self.malformed("BINSTRING with a negative length");
                    };
                    let s = latin1(self.take(n)?);
                    self.push(Obj::Str(s))?;
                }
                b'U' => {
                    let n = usize::from(self.take_u8()?);
                    let s = latin1(self.take(n)?);
                    self.push(Obj::Str(s))?;
                }
                b'B' => {
                    let n = self.take_u32()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b))?;
                }
                b'C' => {
                    let n = usize::from(self.take_u8()?);
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b))?;
                }
                0x8e | 0x96 => {
                    let n = self.take_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b))?;
                }

                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b']' => self.push(Obj::List(Vec::new()))?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                0x8f => self.push(Obj::Set(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Obj::Dict(pairs))?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Set(items))?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, items)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.charge(items.len() * std::mem::size_of::<Id>())?;
                    match &mut self.objs[target] {
                        Obj::Set(set) => set.extend(items),
                        _ => return self.malformed("ADDITEMS on something that is not a set"),
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let target = self.top()?;
                    self.set_items(target, pairs)?;
                }

                b'q' => {
                    let i = self.take_u8()?;
                    self.memo_put(u64::from(i))?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    self.memo_put(u64::from(i))?;
                }
                b'p' => {
                    let line = self.take_line_str()?;
                    match line.parse::<u64>() {
                        Ok(i) => self.memo_put(i)?,
                        Err(_) => return self.malformed(format!("bad PUT index {line:?}")),
                    }
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.take_u8()?;
                    let id = self.memo_get(u64::from(i))?;
                    self.stack.push(id);
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    let id = self.memo_get(u64::from(i))?;
                    self.stack.push(id);
                }
                b'g' => {
                    let line = self.take_line_str()?;
                    let Ok(i) = line.parse::<u64>() else {
                        return self.malformed(format!("bad GET index {line:?}"));
                    };
                    let id = self.memo_get(i)?;
                    self.stack.push(id);
                }

                b'c' => {
                    let module = self.take_line_str()?;
                    let name = self.take_line_str()?;
                    self.push(Obj::Global { module, name })?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.objs[module], &self.objs[name]) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (module, name) = (m.clone(), n.clone());
                            self.push(Obj::Global { module, name })?;
                        }
                        _ => return self.malformed("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = self.tuple_items(args, "REDUCE")?;
                    let obj = self.call(callable, args, 0)?;
                    self.push(obj)?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ")?;
                    let obj = self.call(cls, args, 0)?;
                    self.push(obj)?;
                }
                0x92 => {
                    // NEWOBJ_EX: keyword arguments only matter to the class being built.
                    self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ_EX")?;
                    let obj = self.call(cls, args, 0)?;
                    self.push(obj)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // Dicts (OrderedDict `_metadata`), tensors and plain values ignore their
                    // state: it holds nothing a state dict reader needs.
                    if let Obj::Object(object) = &mut self.objs[target] {
                        object.state = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(Obj::Storage(storage))?;
                }

                _ => return Err(PickleError::UnsupportedOpcode { opcode: op, offset: self.op_start }),
            }
        }
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return self.malformed("odd number of items for a dict");
        }
        Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
    }

    fn append(&mut self, target: Id, items: Vec<Id>) -> Result<()> {
        self.charge(items.len() * std::mem::size_of::<Id>())?;
        match &mut self.objs[target] {
            Obj::List(list) => {
                list.extend(items);
                Ok(())
            }
            // A list subclass built by NEWOBJ: keep it inert, drop the items.
            Obj::Object(_) => Ok(()),
            _ => self.malformed("APPEND to something that is not a list"),
        }
    }

    fn set_items(&mut self, target: Id, pairs: Vec<(Id, Id)>) -> Result<()> {
        self.charge(pairs.len() * 2 * std::mem::size_of::<Id>())?;
        match &mut self.objs[target] {
            Obj::Dict(dict) => {
                dict.extend(pairs);
                Ok(())
            }
            // A dict subclass (defaultdict, ...) built by NEWOBJ/REDUCE.
            Obj::Object(_) => Ok(()),
            _ => self.malformed("SETITEM on something that is not a dict"),
        }
    }

    /// A copy of a call's argument tuple, charged: the tuple may be shared by any number
    /// of calls, and the call may not keep the copy (then only this charge bounds the work).
    fn tuple_items(&mut self, id: Id, op: &str) -> Result<Vec<Id>> {
        let len = match &self.objs[id] {
            Obj::Tuple(items) => items.len(),
            _ => return self.malformed(format!("{op} arguments are not a tuple")),
        };
        self.charge(len.saturating_mul(std::mem::size_of::<Id>()))?;
        match &self.objs[id] {
            Obj::Tuple(items) => Ok(items.clone()),
            _ => self.malformed(format!("{op} arguments are not a tuple")),
        }
    }

    fn int(&self, id: Id, what: &str) -> Result<i64> {
        match &self.objs[id] {
            Obj::Int(v) => Ok(*v),
            Obj::Bool(b) => Ok(i64::from(*b)),
            _ => self.malformed(format!("{what} is not an integer")),
        }
    }

    fn int_tuple(&self, id: Id, what: &str) -> Result<Vec<i64>> {
        match &self.objs[id] {
            Obj::Tuple(items) | Obj::List(items) => items.iter().map(|&i| self.int(i, what)).collect(),
            _ => self.malformed(format!("{what} is not a tuple of integers")),
        }
    }

    fn global_name(&self, id: Id) -> Option<String> {
        match &self.objs[id] {
            Obj::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// `persistent_load` of torch.serialization: `('storage', cls, key, location, numel)`.
    fn persistent_load(&self, pid: Id) -> Result<StorageRef> {
        let Obj::Tuple(items) = &self.objs[pid] else {
            return self.malformed("persistent id is not a tuple");
        };
        let [tag, cls, key, _location, numel] = items.as_slice() else {
            return self.malformed(format!("persistent id has {} fields, torch writes 5", items.len()));
        };
        if !matches!(&self.objs[*tag], Obj::Str(s) if s == "storage") {
            return self.malformed("persistent id is not a ('storage', ...) record");
        }
        let (module, class) = match &self.objs[*cls] {
            Obj::Global { module, name } => (module.as_str(), name.clone()),
            _ => return self.malformed("storage type is not a class"),
        };
        let dtype = if module == "torch" { DType::from_storage_class(&class) } else { None };
        let key = match &self.objs[*key] {
            Obj::Str(s) => s.clone(),
            Obj::Int(v) => v.to_string(),
            _ => return self.malformed("storage key is not a string"),
        };
        let numel = self.int(*numel, "storage size")?;
        let Ok(numel) = u64::try_from(numel) else {
            return self.malformed(format!("negative storage size {numel}"));
        };
        Ok(StorageRef { class, dtype, key, numel })
    }

    /// Apply `callable` to `args` for the globals a checkpoint needs; anything else becomes
    /// an inert [`Object`].
    fn call(&mut self, callable: Id, args: Vec<Id>, depth: u32) -> Result<Obj> {
        let Some(name) = self.global_name(callable) else {
            return Ok(Obj::Object(Object { class: "<call>".to_owned(), args, state: None }));
        };
        let opaque = |args: Vec<Id>| Ok(Obj::Object(Object { class: name.clone(), args, state: None }));
        match name.as_str() {
            n if ORDERED_DICT.contains(&n) => {
                // OrderedDict() or OrderedDict([(k, v), ...]).
                let mut pairs = Vec::new();
                if let Some(&first) = args.first() {
                    if let Obj::List(items) | Obj::Tuple(items) = &self.objs[first] {
                        for &item in items {
                            match &self.objs[item] {
                                Obj::Tuple(kv) | Obj::List(kv) if kv.len() == 2 => pairs.push((kv[0], kv[1])),
                                _ => return opaque(args),
                            }
                        }
                    }
                }
                Ok(Obj::Dict(pairs))
            }
            n if SET.contains(&n) => {
                let items = match args.first().map(|&a| &self.objs[a]) {
                    None => Vec::new(),
                    Some(Obj::List(items) | Obj::Tuple(items) | Obj::Set(items)) => items.clone(),
                    Some(_) => return opaque(args),
                };
                Ok(Obj::Set(items))
            }
            n if BYTEARRAY.contains(&n) => match args.first().map(|&a| &self.objs[a]) {
                None => Ok(Obj::Bytes(Vec::new())),
                Some(Obj::Bytes(b)) => Ok(Obj::Bytes(b.clone())),
                Some(Obj::Str(s)) => match encode_latin1(s) {
                    Some(b) => Ok(Obj::Bytes(b)),
                    None => opaque(args),
                },
                Some(_) => opaque(args),
            },
            "_codecs.encode" => {
                // Protocol 2 writes `bytes` as _codecs.encode(latin-1 text, 'latin1').
                match args.as_slice() {
                    [text, encoding] => match (&self.objs[*text], &self.objs[*encoding]) {
                        (Obj::Str(s), Obj::Str(e)) if matches!(e.as_str(), "latin1" | "latin-1" | "iso-8859-1") => match encode_latin1(s) {
                            Some(b) => Ok(Obj::Bytes(b)),
                            None => opaque(args),
                        },
                        (Obj::Str(s), Obj::Str(e)) if matches!(e.as_str(), "utf-8" | "utf8") => Ok(Obj::Bytes(s.as_bytes().to_vec())),
                        _ => opaque(args),
                    },
                    _ => opaque(args),
                }
            }
            "torch._utils._rebuild_tensor" => self.rebuild_tensor(&args, 4, None, &name),
            "torch._utils._rebuild_tensor_v2" => {
                if !self.metadata_is_plain(args.get(6).copied()) {
                    return opaque(args);
                }
                self.rebuild_tensor(&args, 6, None, &name)
            }
            "torch._utils._rebuild_tensor_v3" => {
                if !self.metadata_is_plain(args.get(7).copied()) {
                    return opaque(args);
                }
                let Some(&dtype_id) = args.get(6) else {
                    return self.malformed("_rebuild_tensor_v3 without a dtype");
                };
                let dtype_name = match &self.objs[dtype_id] {
                    Obj::Global { module, name } if module == "torch" => name.clone(),
                    _ => return self.malformed("_rebuild_tensor_v3 dtype is not a torch dtype"),
                };
                self.rebuild_tensor(&args, 7, Some(dtype_name), &name)
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                // Parameter(data, requires_grad): for reading weights, the data tensor.
                match args.first().map(|&a| &self.objs[a]) {
                    Some(Obj::Tensor(t)) => Ok(Obj::Tensor(t.clone())),
                    _ => opaque(args),
                }
            }
            "torch._tensor._rebuild_from_type_v2" => {
                // A tensor carrying a Python __dict__: (func, type, args, state).
                match args.as_slice() {
                    [func, _ty, inner, _state, ..] if depth < 4 => {
                        let inner = self.tuple_items(*inner, "_rebuild_from_type_v2")?;
                        self.call(*func, inner, depth + 1)
                    }
                    _ => opaque(args),
                }
            }
            n if NUMPY_SCALAR.contains(&n) => match self.numpy_scalar(&args) {
                Some(obj) => Ok(obj),
                None => opaque(args),
            },
            _ => opaque(args),
        }
    }

    /// `_rebuild_tensor_v2`'s metadata carries conj/neg bits; a set bit changes the values,
    /// so such tensors are left uninterpreted rather than read wrongly.
    fn metadata_is_plain(&self, metadata: Option<Id>) -> bool {
        match metadata.map(|m| &self.objs[m]) {
            None | Some(Obj::None) => true,
            Some(Obj::Dict(items)) => items.iter().all(|&(_, v)| matches!(self.objs[v], Obj::Bool(false))),
            Some(_) => false,
        }
    }

    /// `(storage, storage_offset, size, stride, ...)` with at least `min_args` arguments.
    fn rebuild_tensor(&self, args: &[Id], min_args: usize, dtype_name: Option<String>, func: &str) -> Result<Obj> {
        if args.len() < min_args {
            return self.malformed(format!("{func} called with {} arguments, expected at least {min_args}", args.len()));
        }
        let storage = match &self.objs[args[0]] {
            Obj::Storage(s) => s.clone(),
            _ => return self.malformed(format!("{func}: first argument is not a storage")),
        };
        let offset = self.int(args[1], "storage offset")?;
        let shape = self.int_tuple(args[2], "tensor size")?;
        let stride = self.int_tuple(args[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return self.malformed(format!("{func}: size has {} dims but stride has {}", shape.len(), stride.len()));
        }
        let (dtype, dtype_name) = match dtype_name {
            Some(n) => (DType::from_torch_name(&n), n),
            None => (storage.dtype, storage.class.clone()),
        };
        Ok(Obj::Tensor(TensorRef { storage, dtype, dtype_name, offset, shape, stride }))
    }

    /// numpy's `scalar(dtype, bytes)`: decode the common numeric kinds to plain values.
    fn numpy_scalar(&self, args: &[Id]) -> Option<Obj> {
        let [dtype, data] = args else { return None };
        let Obj::Object(dtype) = &self.objs[*dtype] else {
            return None;
        };
        if dtype.class != "numpy.dtype" {
            return None;
        }
        let code = match dtype.args.first().map(|&a| &self.objs[a]) {
            Some(Obj::Str(s)) => s.as_str(),
            _ => return None,
        };
        let data = match &self.objs[*data] {
            // Scalars are at most 8 bytes: a larger (possibly shared) payload is not copied.
            Obj::Bytes(b) if b.len() <= 8 => b.as_slice(),
            _ => return None,
        };
        // dtype state: (version, byte order, ...); '>' is the only order that needs a swap.
        let big = match dtype.state.map(|s| &self.objs[s]) {
            Some(Obj::Tuple(items)) => {
                matches!(items.get(1).map(|&i| &self.objs[i]), Some(Obj::Str(s)) if s == ">")
            }
            _ => false,
        };
        let mut bytes = data.to_vec();
        if big {
            bytes.reverse();
        }
        let b = bytes.as_slice();
        let fixed = |n: usize| -> Option<[u8; 8]> {
            if b.len() != n {
                return None;
            }
            let mut out = [0u8; 8];
            out[..n].copy_from_slice(b);
            Some(out)
        };
        let signed = |n: usize| -> Option<i64> {
            let raw = u64::from_le_bytes(fixed(n)?);
            let shift = 64 - 8 * n as u32;
            Some(((raw << shift) as i64) >> shift)
        };
        Some(match code {
            "f8" => Obj::Float(f64::from_le_bytes(fixed(8)?)),
            "f4" => Obj::Float(f64::from(f32::from_le_bytes(b.try_into().ok()?))),
            "f2" => Obj::Float(f64::from(half::f16::from_le_bytes(b.try_into().ok()?).to_f32())),
            "i1" => Obj::Int(signed(1)?),
            "i2" => Obj::Int(signed(2)?),
            "i4" => Obj::Int(signed(4)?),
            "i8" => Obj::Int(signed(8)?),
            "u1" => Obj::Int(u64::from_le_bytes(fixed(1)?) as i64),
            "u2" => Obj::Int(u64::from_le_bytes(fixed(2)?) as i64),
            "u4" => Obj::Int(u64::from_le_bytes(fixed(4)?) as i64),
            "u8" => {
                let v = u64::from_le_bytes(fixed(8)?);
                match i64::try_from(v) {
                    Ok(v) => Obj::Int(v),
                    Err(_) => Obj::BigInt(v.to_le_bytes().iter().copied().chain([0]).collect()),
                }
            }
            "b1" => Obj::Bool(*b.first()? != 0),
            _ => return None,
        })
    }
}

/// LONG1/LONG4 payload: little-endian two's complement of any width.
fn long_from_bytes(bytes: Vec<u8>) -> Obj {
    if bytes.is_empty() {
        return Obj::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(&bytes);
        return Obj::Int(i64::from_le_bytes(buf));
    }
    Obj::BigInt(bytes)
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn encode_latin1(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

/// Python's raw-unicode-escape: latin-1 bytes with `\uXXXX` and `\UXXXXXXXX` escapes.
fn decode_raw_unicode_escape(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' && i + 1 < bytes.len() && matches!(bytes[i + 1], b'u' | b'U') {
            let width = if bytes[i + 1] == b'u' { 4 } else { 8 };
            let hex = bytes.get(i + 2..i + 2 + width)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + width;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(data: &[u8]) -> Pickle {
        match parse(data) {
            Ok(p) => p,
            Err(e) => panic!("parse failed: {e:?}"),
        }
    }

    #[test]
    fn memoized_container_is_shared_after_filling() {
        // d = {}; l = []; d['a'] = l; d['b'] = l; l.append(1) -- written as pickle 2 does:
        // EMPTY_DICT BINPUT0 MARK 'a' EMPTY_LIST BINPUT1 MARK K1 APPENDS 'b' BINGET1 SETITEMS
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01eX\x01\x00\x00\x00bh\x01u.";
        let p = parse_ok(data);
        let Obj::Dict(items) = p.get(p.root) else { panic!("root is not a dict") };
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].1, items[1].1, "both keys refer to one list");
        let Obj::List(list) = p.get(items[1].1) else { panic!("value is not a list") };
        assert!(matches!(p.get(list[0]), Obj::Int(1)));
    }

    #[test]
    fn ints_and_longs() {
        // (BININT -5, BININT2 513, LONG1 -1 (0xff), LONG1 2**64 (9 bytes), INT 01 -> True)
        let data = b"\x80\x02(J\xfb\xff\xff\xffM\x01\x02\x8a\x01\xff\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01I01\nt.";
        let p = parse_ok(data);
        let Obj::Tuple(items) = p.get(p.root) else { panic!("root is not a tuple") };
        assert!(matches!(p.get(items[0]), Obj::Int(-5)));
        assert!(matches!(p.get(items[1]), Obj::Int(513)));
        assert!(matches!(p.get(items[2]), Obj::Int(-1)));
        assert!(matches!(p.get(items[3]), Obj::BigInt(b) if b.len() == 9));
        assert!(matches!(p.get(items[4]), Obj::Bool(true)));
    }

    #[test]
    fn unknown_global_call_is_inert() {
        // os.system('x') must not run anything: it is an Object named os.system.
        let data = b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.";
        let p = parse_ok(data);
        assert!(matches!(p.get(p.root), Obj::Object(o) if o.class == "os.system"));
    }

    #[test]
    fn unsupported_opcode_is_named() {
        let data = b"\x80\x02\x82\x01.";
        let err = parse(data).unwrap_err();
        assert_eq!(err, PickleError::UnsupportedOpcode { opcode: 0x82, offset: 2 });
        assert_eq!(opcode_name(0x82), "EXT1");
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x80\x02",
            b"\x80\x02.",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02h\x05.",
            b"\x80\x02K\x01s.",
            b"\x80\x02(K\x01(t1.",
            b"\x80\x02K\x01u.",
            b"\x80\x02)\x8b\xff\xff\xff\xff.",
            b"\x80\x02N(Q.",
        ];
        for case in cases {
            assert!(parse(case).is_err(), "{case:?} should fail");
        }
    }

    #[test]
    fn shared_call_arguments_are_bounded_in_total() {
        // t = (None,) * 10_000, memoized; then 10_000 calls print(*t): each copies t, 800 MB
        // in all from a 70 KB pickle without the budget.
        let mut data = b"\x80\x02(".to_vec();
        data.extend(std::iter::repeat_n(b'N', 10_000));
        data.extend_from_slice(b"t\x94cbuiltins\nprint\n\x940");
        for _ in 0..10_000 {
            data.extend_from_slice(b"h\x01h\x00R0");
        }
        data.extend_from_slice(b"N.");
        match parse(&data) {
            Err(PickleError::Budget { opcode: b'R', limit, .. }) => assert_eq!(limit, crate::data::checkpoint::budget::PICKLE_FLOOR),
            other => panic!("expected the budget to stop a REDUCE: {other:?}"),
        }
    }

    #[test]
    fn stop_below_mark_is_an_error() {
        // A MARK hides the values below it: STOP must not pop through it.
        assert!(parse(b"\x80\x02N(.").is_err());
    }

    #[test]
    fn raw_unicode_escape() {
        assert_eq!(decode_raw_unicode_escape(b"a\\u00e9\\U0001F600\xe9").as_deref(), Some("a\u{e9}\u{1F600}\u{e9}"));
        assert_eq!(decode_raw_unicode_escape(b"\\u12"), None);
    }
}
