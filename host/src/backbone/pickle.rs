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
}

/// Reads one pickle starting at `*pos` and advances `*pos` past its STOP opcode.
pub fn read(data: &[u8], pos: &mut usize) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: *pos,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let value = m.run()?;
    *pos = m.pos;
    Ok(value)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
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

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("pop from empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let offset = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            offset,
            what: "empty stack",
        })
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of dict items"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match self.top()? {
            Value::Dict(d) => d.extend(pairs),
            // `OrderedDict()` is a call we leave unevaluated; it behaves like a dict.
            Value::Call(_, _) => {
                let top = self.stack.last_mut().unwrap();
                *top = Value::Dict(pairs);
            }
            _ => return Err(self.malformed("SETITEM(S) on a non-dict")),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        match self.top()? {
            Value::List(l) => l.extend(items),
            _ => return Err(self.malformed("APPEND(S) on a non-list")),
        }
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
                b'.' => return self.pop(),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.stack.push(long_from_le(b));
                }
                b'G' => {
                    let b: [u8; 8] = self.bytes(8)?.try_into().unwrap();
                    self.stack.push(Value::Float(f64::from_be_bytes(b)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.bytes(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.bytes(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                b'(' => self.stack.push(Value::Mark),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("TUPLEn with a short stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
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
                    let v = self.top()?.clone();
                    self.memo.insert(id, v);
                }
                b'r' => {
                    let id = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(id, v);
                }
                b'h' | b'j' => {
                    let id = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| self.malformed("memo key not found"))?;
                    self.stack.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Value::Persistent(Box::new(pid)))
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack
                        .push(Value::Call(Box::new(callable), Box::new(args)))
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    // A dict's state is its attributes (PyTorch's `_metadata`); its items stay.
                    let built = match obj {
                        Value::Dict(_) => obj,
                        obj => Value::Build(Box::new(obj), Box::new(state)),
                    };
                    self.stack.push(built)
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
}
