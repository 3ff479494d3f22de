//! A safe, iterative unpickler for the pickles inside torch checkpoints (`data.pkl`).
//!
//! It only builds data: nothing from a checkpoint is ever executed, and every global it names must
//! be one a tensor state dict needs (tensor rebuild, typed storages, `OrderedDict`); any other global
//! is refused with an error naming it. A checkpoint is untrusted input, so:
//!
//! * objects live in one flat arena and refer to each other by index, as Python's own unpickler
//!   shares them: a memo fetch copies an index, never an object, so a small pickle that fetches the
//!   same entry over and over cannot grow exponentially, and a deeply nested object is a chain of
//!   indices (nothing here recurses: no stack overflow, however deep);
//! * the arena, the memo and every length are bounded ([`Limits`]), and lengths are checked against
//!   the bytes that remain, so a corrupt or truncated pickle is an error, never a panic or a huge
//!   allocation.

use std::collections::HashMap;

/// Globals a torch state dict may name, and nothing else.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "HalfStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// The index of an object in the [`Pickle`] arena.
pub type Id = u32;

/// A pickled value. Calls are kept as data (`Call`), never performed; children are arena indices.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    Global(String, String),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Bool(bool),
    None,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `callable(args)`, not performed.
    Call(Id, Id),
    /// A persistent id (torch: a storage reference).
    PersId(Id),
}

/// Bounds on what one pickle may build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Objects in the arena.
    pub max_objects: usize,
    /// Memo entries.
    pub max_memo: usize,
}

impl Limits {
    /// The limits for a pickle of `len` bytes: a torch state dict builds about one object per 6
    /// bytes of pickle, so one per 2 bytes plus a million leaves ample room for real files while a
    /// hostile one stays within a few hundred MB.
    pub fn for_len(len: usize) -> Self {
        Self {
            max_objects: (1 << 20) + len / 2,
            max_memo: (1 << 20) + len / 4,
        }
    }
}

/// The result of unpickling: the arena and the root object.
#[derive(Debug, Clone)]
pub struct Pickle {
    objs: Vec<Obj>,
    /// The object STOP returned.
    pub root: Id,
}

impl Pickle {
    /// The object at `id` (`None` for an index outside the arena, which the unpickler never makes).
    pub fn get(&self, id: Id) -> Option<&Obj> {
        self.objs.get(id as usize)
    }

    /// Objects in the arena.
    pub fn len(&self) -> usize {
        self.objs.len()
    }

    /// Whether the arena is empty (never, for a pickle that parsed).
    pub fn is_empty(&self) -> bool {
        self.objs.is_empty()
    }
}

type PResult<T> = std::result::Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack heights at each MARK (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    limits: Limits,
}

/// Runs the pickle `data` to its STOP opcode.
pub fn unpickle(data: &[u8], limits: Limits) -> PResult<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        limits,
    };
    let root = m.run()?;
    Ok(Pickle { objs: m.objs, root })
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("the pickle ends early (truncated file?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("the pickle ends inside a global name")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn new_obj(&mut self, o: Obj) -> PResult<Id> {
        if self.objs.len() >= self.limits.max_objects {
            return Err(format!(
                "the pickle builds more than {} objects, far more than a state dict needs (hostile or corrupt file?)",
                self.limits.max_objects
            ));
        }
        let id = Id::try_from(self.objs.len()).map_err(|_| "the pickle builds too many objects")?;
        self.objs.push(o);
        Ok(id)
    }
    fn push(&mut self, o: Obj) -> PResult<()> {
        let id = self.new_obj(o)?;
        self.stack.push(id);
        Ok(())
    }
    fn pop(&mut self) -> PResult<Id> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return Err("pickle stack underflow (corrupt file?)".into());
        }
        self.stack.pop().ok_or_else(|| "pickle stack underflow (corrupt file?)".to_string())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Id>> {
        let at = self.marks.pop().ok_or("pickle mark missing (corrupt file?)")?;
        Ok(self.stack.split_off(at))
    }
    fn top(&self) -> PResult<Id> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => Ok(id),
            _ => Err("pickle stack underflow (corrupt file?)".into()),
        }
    }
    fn obj_mut(&mut self, id: Id) -> PResult<&mut Obj> {
        self.objs.get_mut(id as usize).ok_or_else(|| "pickle object missing".to_string())
    }
    fn memo_put(&mut self, k: u32) -> PResult<()> {
        let v = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&k) {
            return Err(format!(
                "the pickle stores more than {} memo entries (hostile or corrupt file?)",
                self.limits.max_memo
            ));
        }
        self.memo.insert(k, v);
        Ok(())
    }
    fn global(&mut self, module: String, name: String) -> PResult<()> {
        if !ALLOWED_GLOBALS.iter().any(|(m, n)| *m == module && *n == name) {
            return Err(format!(
                "refusing pickle global '{module}.{name}': a weights file may only name tensor, storage and OrderedDict globals (nothing from a checkpoint is executed)"
            ));
        }
        self.push(Obj::Global(module, name))
    }
    fn set_items(&mut self, items: Vec<Id>) -> PResult<()> {
        if items.len() % 2 != 0 {
            return Err("odd number of dict items (corrupt file?)".into());
        }
        let top = self.top()?;
        match self.obj_mut(top)? {
            Obj::Dict(d) => {
                d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            _ => Err("dict items set on a non-dict (corrupt file?)".into()),
        }
    }
    fn is_global(&self, id: Id, module: &str, name: &str) -> bool {
        matches!(self.objs.get(id as usize), Some(Obj::Global(m, n)) if m == module && n == name)
    }

    /// Runs to STOP and returns the top of the stack.
    fn run(&mut self) -> PResult<Id> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    self.global(m, n)?;
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    match (self.objs.get(m as usize), self.objs.get(n as usize)) {
                        (Some(Obj::Str(m)), Some(Obj::Str(n))) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(m, n)?;
                        }
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                    self.memo_put(k)?;
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let v = *self
                        .memo
                        .get(&k)
                        .ok_or_else(|| format!("pickle memo {k} missing (corrupt file?)"))?;
                    self.stack.push(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.push(Obj::Tuple(vec![]))?,
                b'}' => self.push(Obj::Dict(vec![]))?,
                b']' => self.push(Obj::List(vec![]))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Dict(vec![]))?;
                    self.set_items(items)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err("pickle stack underflow (corrupt file?)".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items))?;
                }
                b'X' | 0x8c | b'B' | b'C' => {
                    let n = match op {
                        b'X' | b'B' => usize::try_from(self.u32()?).map_err(|_| "pickle string too long")?,
                        _ => usize::from(self.u8()?),
                    };
                    let bytes = self.take(n)?;
                    if op == b'X' || op == 0x8c {
                        let s = std::str::from_utf8(bytes).map_err(|_| "a pickle string is not UTF-8 (corrupt file?)")?;
                        self.push(Obj::Str(s.to_string()))?;
                    } else {
                        self.push(Obj::Bytes(bytes.to_vec()))?;
                    }
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.u32()?.to_le_bytes());
                    self.push(Obj::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(i64::from(v)))?;
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err("integer too large in pickle".into());
                    }
                    let b = self.take(n)?;
                    let mut le = [0u8; 8];
                    le[..n].copy_from_slice(b);
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        le[n..].fill(0xff); // sign-extend a negative number
                    }
                    self.push(Obj::Int(i64::from_le_bytes(le)))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Obj::Float(f64::from_be_bytes(a)))?;
                }
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'N' => self.push(Obj::None)?,
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    // OrderedDict() is the one call we "perform": it is an empty dict.
                    if self.is_global(f, "collections", "OrderedDict") {
                        self.push(Obj::Dict(vec![]))?;
                    } else {
                        self.push(Obj::Call(f, args))?;
                    }
                }
                b'b' => {
                    // BUILD sets an object's attributes (a state dict's `_metadata`), never its
                    // items: Python's semantics, and nothing for a state dict reader to keep.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Obj::PersId(id))?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let top = self.top()?;
                    match self.obj_mut(top)? {
                        Obj::List(l) => l.extend(items),
                        _ => return Err("append to a non-list (corrupt file?)".into()),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'.' => return self.pop(),
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} (not a torch weights file?)")),
            }
        }
    }
}
