//! The subset of Python's pickle format that PyTorch checkpoints use.
//!
//! PyTorch writes protocol 2 pickles whose objects are dicts, tuples, ints, strings, globals
//! (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`) and persistent ids for storages. We
//! evaluate the opcodes into a small object tree; nothing is ever called or imported.

use std::collections::HashMap;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64` (PyTorch's magic number), kept as little-endian bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A `module.name` reference (`GLOBAL`).
    Global(String, String),
    /// `callable(*args)`, left unevaluated.
    Call(Box<Value>, Box<Value>),
    /// `obj.__setstate__(state)`, left unevaluated.
    Build(Box<Value>, Box<Value>),
    /// A persistent id: in PyTorch files, a reference to a tensor storage.
    Persistent(Box<Value>),
    Mark,
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Tuples and lists both hold sequences (`size` and `stride` come as tuples).
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle ends early at byte {0}")]
    Truncated(usize),
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {offset}")]
    Opcode { opcode: u8, offset: usize },
    #[error("malformed pickle at byte {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
    #[error("pickle nests deeper than {max} levels at byte {offset}")]
    TooDeep { offset: usize, max: usize },
    #[error(
        "pickle at byte {offset} copies its memo past {budget} values, more than its size allows"
    )]
    TooLarge { offset: usize, budget: usize },
}

/// Deepest nesting of containers accepted: a state dict is a handful of levels deep, and the
/// value tree is dropped and compared recursively.
const MAX_DEPTH: usize = 256;

/// Values (each node and each byte of a string counts one) that memo reads and writes may copy,
/// per byte of input. A PyTorch pickle memoizes small objects (globals, keys, argument tuples);
/// without a bound, a few bytes that memoize a tuple of two copies of the previous one double
/// the memory at each step.
const COPIES_PER_BYTE: usize = 32;

/// Reads one pickle starting at `*pos` and advances `*pos` past its STOP opcode.
pub fn read(data: &[u8], pos: &mut usize) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: *pos,
        stack: Vec::new(),
        memo: HashMap::new(),
        budget: data.len().saturating_mul(COPIES_PER_BYTE).max(1 << 16),
    };
    let value = m.run()?;
    *pos = m.pos;
    Ok(value)
}

/// A value on the stack or in the memo, with its nesting depth and size (nodes and bytes).
#[derive(Debug, Clone)]
struct Item {
    value: Value,
    depth: usize,
    size: usize,
}

impl Item {
    fn leaf(value: Value) -> Self {
        let bytes = match &value {
            Value::BigInt(b) | Value::Bytes(b) => b.len(),
            Value::Str(s) => s.len(),
            Value::Global(m, n) => m.len() + n.len(),
            _ => 0,
        };
        Self {
            value,
            depth: 0,
            size: 1 + bytes,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// What memo copies may still cost (see [`COPIES_PER_BYTE`]).
    budget: usize,
}

impl Machine<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn malformed(&self, what: &'static str) -> PickleError {
        PickleError::Malformed {
            offset: self.pos,
            what,
        }
    }

    fn push(&mut self, value: Value) {
        self.stack.push(Item::leaf(value));
    }

    /// Pushes a container made of `items`.
    fn push_node(
        &mut self,
        items: Vec<Item>,
        make: impl FnOnce(Vec<Value>) -> Value,
    ) -> Result<(), PickleError> {
        let (depth, size) = self.measure(&items)?;
        let value = make(items.into_iter().map(|i| i.value).collect());
        self.stack.push(Item { value, depth, size });
        Ok(())
    }

    /// Depth and size of a container of `items`.
    fn measure(&self, items: &[Item]) -> Result<(usize, usize), PickleError> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep {
                offset: self.pos,
                max: MAX_DEPTH,
            });
        }
        let size = items.iter().fold(1usize, |s, i| s.saturating_add(i.size));
        Ok((depth, size))
    }

    /// Charges a copy of `size` values to the budget.
    fn copy(&mut self, size: usize) -> Result<(), PickleError> {
        self.budget = self.budget.checked_sub(size).ok_or(PickleError::TooLarge {
            offset: self.pos,
            budget: self.data.len().saturating_mul(COPIES_PER_BYTE).max(1 << 16),
        })?;
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("pop from empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>, PickleError> {
        let at = self
            .stack
            .iter()
            .rposition(|i| i.value == Value::Mark)
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Item, PickleError> {
        let offset = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            offset,
            what: "empty stack",
        })
    }

    /// Adds `items` to the container on top of the stack, updating its depth and size.
    fn extend_top(&mut self, items: &[Item]) -> Result<(), PickleError> {
        let (depth, size) = self.measure(items)?;
        let top = self.top()?;
        top.depth = top.depth.max(depth);
        top.size = top.size.saturating_add(size - 1);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of dict items"));
        }
        if !matches!(self.top()?.value, Value::Dict(_) | Value::Call(_, _)) {
            return Err(self.malformed("SETITEM(S) on a non-dict"));
        }
        self.extend_top(&items)?;
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter().map(|i| i.value);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        let top = &mut self.top()?.value;
        match top {
            Value::Dict(d) => d.extend(pairs),
            // `OrderedDict()` is a call we leave unevaluated; it behaves like a dict.
            _ => *top = Value::Dict(pairs),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        if !matches!(self.top()?.value, Value::List(_)) {
            return Err(self.malformed("APPEND(S) on a non-list"));
        }
        self.extend_top(&items)?;
        if let Value::List(l) = &mut self.top()?.value {
            l.extend(items.into_iter().map(|i| i.value));
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> Result<(), PickleError> {
        let item = self.top()?.clone();
        self.copy(item.size)?;
        self.memo.insert(id, item);
        Ok(())
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let offset = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                b'.' => return self.pop().map(|i| i.value),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.push(long_from_le(b));
                }
                b'G' => {
                    let b: [u8; 8] = self.bytes(8)?.try_into().unwrap();
                    self.push(Value::Float(f64::from_be_bytes(b)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.bytes(n)?).into_owned();
                    self.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.bytes(n)?).into_owned();
                    self.push(Value::Str(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))
                }
                b'(' => self.push(Value::Mark),
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_node(items, Value::Tuple)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("TUPLEn with a short stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_node(items, Value::Tuple)?
                }
                b']' => self.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_node(items, Value::List)?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'q' => {
                    let id = self.u8()? as u32;
                    self.memo_put(id)?
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?
                }
                b'h' | b'j' => {
                    let id = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let size = self
                        .memo
                        .get(&id)
                        .ok_or_else(|| self.malformed("memo key not found"))?
                        .size;
                    self.copy(size)?;
                    let item = self.memo[&id].clone();
                    self.stack.push(item)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push_node(vec![pid], |mut v| {
                        Value::Persistent(Box::new(v.pop().expect("one item")))
                    })?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push_node(vec![callable, args], |mut v| {
                        let args = v.pop().expect("two items");
                        let callable = v.pop().expect("two items");
                        Value::Call(Box::new(callable), Box::new(args))
                    })?
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    // A dict's state is its attributes (PyTorch's `_metadata`); its items stay.
                    if let Value::Dict(_) = obj.value {
                        self.stack.push(obj)
                    } else {
                        self.push_node(vec![obj, state], |mut v| {
                            let state = v.pop().expect("two items");
                            let obj = v.pop().expect("two items");
                            Value::Build(Box::new(obj), Box::new(state))
                        })?
                    }
                }
                opcode => return Err(PickleError::Opcode { opcode, offset }),
            }
        }
    }
}

fn long_from_le(b: Vec<u8>) -> Value {
    if b.len() <= 8 {
        let mut v: i64 = 0;
        for (i, byte) in b.iter().enumerate() {
            v |= (*byte as i64) << (8 * i);
        }
        // Sign-extend from the top bit of the last byte.
        if let Some(&last) = b.last() {
            if last & 0x80 != 0 && b.len() < 8 {
                v -= 1i64 << (8 * b.len());
            }
        }
        Value::Int(v)
    } else {
        Value::BigInt(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_protocol_2_dict() {
        // pickle.dumps({'a': (1, 300, -2), 'b': [True, None]}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01M,\x01J\xfe\xff\xff\xff\x87q\x02X\x01\x00\x00\x00bq\x03]q\x04(\x88Neu.";
        let mut pos = 0;
        let v = read(data, &mut pos).unwrap();
        assert_eq!(pos, data.len());
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        assert_eq!(d[0].0, Value::Str("a".into()));
        assert_eq!(
            d[0].1,
            Value::Tuple(vec![Value::Int(1), Value::Int(300), Value::Int(-2)])
        );
        assert_eq!(d[1].1, Value::List(vec![Value::Bool(true), Value::None]));
    }

    #[test]
    fn big_long_is_kept() {
        // PyTorch's magic number 0x1950a86a20f9469cfc6c as LONG1.
        let data = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        let mut pos = 0;
        assert!(matches!(read(data, &mut pos).unwrap(), Value::BigInt(b) if b.len() == 10));
    }

    #[test]
    fn truncation_is_an_error() {
        let data = b"\x80\x02}q\x00(X\x05\x00\x00\x00ab";
        let mut pos = 0;
        assert!(matches!(
            read(data, &mut pos),
            Err(PickleError::Truncated(_))
        ));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // An empty tuple wrapped in a million one-element tuples.
        let mut data = b"\x80\x02)".to_vec();
        data.extend(std::iter::repeat_n(0x85, 1_000_000));
        data.push(b'.');
        let err = read(&data, &mut 0).unwrap_err();
        assert!(matches!(err, PickleError::TooDeep { .. }), "{err}");
    }

    #[test]
    fn memo_copies_are_bounded_by_the_input() {
        // x = (); then 60 times x = (x, x) through the memo: 2^60 nodes from 250 bytes.
        let mut data = b"\x80\x02)q\x00".to_vec();
        for _ in 0..60 {
            data.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        data.push(b'.');
        let err = read(&data, &mut 0).unwrap_err();
        assert!(matches!(err, PickleError::TooLarge { .. }), "{err}");
    }
}
