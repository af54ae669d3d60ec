//! Reader of GGUF files (versions 2 and 3), the container llama.cpp's tools write: a header, typed
//! metadata (architecture hyper-parameters, the tokenizer's vocabulary and merges, the chat
//! template), a table of tensors, and the tensor data, aligned, often block-quantized.
//!
//! The file is memory-mapped and checked once, whole, before anything is handed out: every count,
//! length and offset is checked against what the file can hold before it is used, so a truncated
//! or corrupt file is an error that names what is wrong and where (byte offset), never a panic or
//! an allocation sized by a corrupt number. Tensor data is borrowed from the mapping as it is
//! stored; nothing is expanded here.
//!
//! Layout (little-endian): `GGUF`, version u32, tensor count u64, metadata count u64; each
//! metadata entry is a key (u64 length + UTF-8) , a type u32 and a value (strings as keys, arrays
//! as element type u32 + count u64 + elements); each tensor entry is a name, a dimension count
//! u32, the dimensions u64 (innermost first), a GGML type u32 and an offset u64 from the start
//! of the data section, which begins at the end of the table rounded up to `general.alignment`
//! (default 32).

mod ggml_type;
pub mod tokenizer;
mod value;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use ggml_type::GgmlType;
pub use value::Value;
pub use writer::GgufWriter;

use crate::error::{Error, Result};

/// Data section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in metadata accepted (real files nest none).
const MAX_ARRAY_DEPTH: usize = 4;
/// Most elements of one metadata array. The largest real ones are vocabularies and merge lists
/// (262,144 tokens in Gemma 3); each element is held as a [`Value`] of 32 bytes, so without a
/// cap a file of N bytes could make the reader allocate 32 N for one-byte elements.
pub const MAX_ARRAY_LEN: usize = 1 << 24;

/// One tensor of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (contiguous) first. A PyTorch `[out, in]`
    /// weight is `[in, out]` here.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte range of its data in the file.
    pub range: Range<usize>,
}

impl GgufTensor {
    /// Dimensions outermost first (the row-major shape our tensors use).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A checked GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and checks the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::format(
                path,
                "is not a regular file, expected a GGUF file",
            ));
        }
        if meta.len() < 24 {
            return Err(Error::format(
                path,
                format!("file is {} bytes, too short to be a GGUF file", meta.len()),
            ));
        }
        // SAFETY: the mapping is read-only; as with every memory-mapped model file, the file must
        // not be truncated or rewritten while it is open (that is documented for users).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        GgufFile::parse(path.to_path_buf(), Bytes::Mapped(mmap))
    }

    /// Checks `bytes` as a GGUF file; `name` stands for the file in errors.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile> {
        let (header, tensors_raw, end_of_table) = {
            let mut r = Reader {
                buf: &bytes,
                pos: 0,
                path: &path,
            };
            let header = read_header(&mut r)?;
            let mut tensors = Vec::new();
            for i in 0..header.tensor_count {
                tensors.push(read_tensor_info(&mut r, i)?);
            }
            (header, tensors, r.pos)
        };
        let Header {
            version, metadata, ..
        } = header;
        let mut index = HashMap::with_capacity(metadata.len());
        for (i, (k, _)) in metadata.iter().enumerate() {
            if index.insert(k.clone(), i).is_some() {
                return Err(Error::format(
                    &path,
                    format!("metadata key `{k}` appears twice"),
                ));
            }
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(Error::format(
                    &path,
                    format!("general.alignment is {v:?}; it must be a uint32 power of two",),
                ));
            }
        };
        let len = bytes.len() as u64;
        let data_start = (end_of_table as u64).div_ceil(alignment) * alignment;
        if data_start > len {
            return Err(Error::format(
                &path,
                format!(
                    "the tensor data should start at byte {data_start} (the table ends at \
                     {end_of_table}, aligned to {alignment}), but the file has {len} bytes \
                     (truncated?)"
                ),
            ));
        }
        let data_len = len - data_start;
        let mut tensors = Vec::with_capacity(tensors_raw.len());
        let mut by_name = HashMap::with_capacity(tensors_raw.len());
        for (i, t) in tensors_raw.into_iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::format(
                    &path,
                    format!("tensor `{}` appears twice", t.name),
                ));
            }
            let bad = |reason: String| Error::tensor(&path, t.name.clone(), reason);
            if !t.offset.is_multiple_of(alignment) {
                return Err(bad(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            // Row size times the other dimensions, each step checked (read_tensor_info bounded
            // each dimension, not their product).
            let row = t.ggml_type.row_bytes(t.dims[0]).ok_or_else(|| {
                bad(format!(
                    "its rows have {} values, not a whole number of {} blocks of {}",
                    t.dims[0],
                    t.ggml_type,
                    t.ggml_type.block_elements()
                ))
            })?;
            let size = t.dims[1..]
                .iter()
                .try_fold(row, |acc, &d| acc.checked_mul(d))
                .filter(|&s| s <= data_len)
                .ok_or_else(|| {
                    bad(format!(
                        "its {} data of dimensions {:?} do not fit in the {data_len} bytes of \
                         the data section",
                        t.ggml_type, t.dims
                    ))
                })?;
            if t.offset > data_len - size {
                return Err(bad(format!(
                    "its {size} bytes at data offset {} run past the end of the file ({data_len} \
                     bytes of tensor data; truncated?)",
                    t.offset
                )));
            }
            let start = (data_start + t.offset) as usize;
            tensors.push(GgufTensor {
                name: t.name,
                dims: t.dims,
                ggml_type: t.ggml_type,
                range: start..start + size as usize,
            });
        }
        let mut order: Vec<&GgufTensor> = tensors.iter().collect();
        order.sort_by_key(|t| t.range.start);
        for w in order.windows(2) {
            if w[1].range.start < w[0].range.end {
                return Err(Error::format(
                    &path,
                    format!(
                        "the data of tensors `{}` and `{}` overlap",
                        w[0].name, w[1].name
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path,
            bytes,
            version,
            alignment,
            data_start: data_start as usize,
            metadata,
            index,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte where the tensor data section begins.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Every metadata entry, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture` (`llama`, `gemma3`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// The metadata value `key` as a count, or an error naming the key and what it holds.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "metadata `{key}` is a {}, expected an integer",
                        v.type_name()
                    ),
                )
            }),
            None => Err(Error::format(
                &self.path,
                format!("metadata `{key}` is missing"),
            )),
        }
    }

    /// The metadata value `key` as a number, or an error naming the key.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("metadata `{key}` is a {}, expected a number", v.type_name()),
                )
            }),
            None => Err(Error::format(
                &self.path,
                format!("metadata `{key}` is missing"),
            )),
        }
    }

    /// The tensors, in table order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of `t` (blocks as they are in the file).
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        &self.bytes[t.range.clone()]
    }
}

struct Header {
    version: u32,
    tensor_count: u64,
    metadata: Vec<(String, Value)>,
}

/// A tensor table entry before its data range is checked.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
}

/// A cursor over the file that refuses to read past its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("at byte {}: {what}", self.pos))
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(self.fail(format!(
                "{} needs {n} bytes, but the file ends {} bytes later (truncated?)",
                what(),
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_bytes` each that must all fit in the rest of the file.
    fn count(&mut self, min_bytes: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_bytes.max(1)) as u64;
        if n > fits {
            self.pos = at;
            return Err(self.fail(format!(
                "{} declares {n} items, but the {} bytes left in the file hold at most {fits}",
                what(),
                self.remaining() - 8
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => {
                let pos = at;
                Err(Error::format(
                    self.path,
                    format!("at byte {pos}: {} is not UTF-8 ({e})", what()),
                ))
            }
        }
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.fail(format!("{} is a bool of value {b}", what())));
                }
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.fail(format!(
                        "{} nests arrays deeper than {MAX_ARRAY_DEPTH}",
                        what()
                    )));
                }
                let elem = self.u32(what)?;
                let min = value_min_bytes(elem).ok_or_else(|| {
                    self.fail(format!("{} is an array of unknown type {elem}", what()))
                })?;
                let at = self.pos;
                let n = self.count(min, what)?;
                if n > MAX_ARRAY_LEN {
                    self.pos = at;
                    return Err(self.fail(format!(
                        "{} is an array of {n} elements, more than the {MAX_ARRAY_LEN} accepted",
                        what()
                    )));
                }
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(
                        self.value(elem, depth + 1, &|| format!("element {i} of {}", what()))?,
                    );
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.fail(format!("{} has unknown value type {other}", what())));
            }
        })
    }
}

/// Fewest bytes a value of GGUF type `ty` takes (`None`: unknown type).
fn value_min_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn read_header(r: &mut Reader) -> Result<Header> {
    let magic = r.array::<4>(&|| "the magic".into())?;
    if &magic != b"GGUF" {
        return Err(Error::format(
            r.path,
            format!("not a GGUF file: it starts with {magic:02x?}, not `GGUF`"),
        ));
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::format(
                r.path,
                "GGUF version 1 (before August 2023) is not supported: convert the model again \
                 with a current llama.cpp",
            ));
        }
        v if v.swap_bytes() <= 3 => {
            return Err(Error::format(
                r.path,
                format!(
                    "a big-endian GGUF file (version {}): only little-endian files are supported",
                    v.swap_bytes()
                ),
            ));
        }
        v => {
            return Err(Error::format(
                r.path,
                format!("GGUF version {v} is not supported (2 and 3 are)"),
            ));
        }
    }
    // Every tensor entry takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes, every metadata
    // entry at least 8 (key length) + 4 + 1.
    let tensor_count = r.u64(&|| "the tensor count".into())?;
    let kv_count = r.count(13, &|| "the metadata count".into())?;
    if tensor_count > (r.remaining() / 32) as u64 {
        return Err(Error::format(
            r.path,
            format!(
                "the header declares {tensor_count} tensors, more than the {} bytes of the \
                 file can describe",
                r.buf.len()
            ),
        ));
    }
    let mut metadata = Vec::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("the type of metadata `{key}`"))?;
        let value = r.value(ty, 0, &|| format!("metadata `{key}`"))?;
        metadata.push((key, value));
    }
    Ok(Header {
        version,
        tensor_count,
        metadata,
    })
}

fn read_tensor_info(r: &mut Reader, i: u64) -> Result<RawTensor> {
    let name = r.string(&|| format!("the name of tensor {i}"))?;
    let what = |part: &str| format!("{part} of tensor `{name}`");
    let n_dims = r.u32(&|| what("the dimension count"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        r.pos -= 4;
        return Err(r.fail(format!(
            "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} are valid)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let v = r.u64(&|| what("a dimension"))?;
        // ggml stores dimensions as int64; a dimension past that, or zero, is corrupt.
        if v == 0 || v > i64::MAX as u64 {
            r.pos -= 8;
            return Err(r.fail(format!("tensor `{name}` has dimension {d} of size {v}")));
        }
        dims.push(v);
    }
    let id = r.u32(&|| what("the type"))?;
    let ggml_type = GgmlType::from_id(id).ok_or_else(|| {
        Error::tensor(
            r.path,
            name.clone(),
            format!(
                "GGML type {id} is not one this reader supports (F32, F16, BF16, Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K and the integer types)"
            ),
        )
    })?;
    let offset = r.u64(&|| what("the data offset"))?;
    Ok(RawTensor {
        name,
        dims,
        ggml_type,
        offset,
    })
}

#[cfg(test)]
mod tests;
