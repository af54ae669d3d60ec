//! The ops of a decoder language model (LLaMA family), on top of [`Backend`]: block-quantized
//! weights kept as blocks ([`DecoderBackend::QTensor`]), RMSNorm, rotary embeddings,
//! grouped-query attention over a paged key/value cache, the SwiGLU product, row selection and
//! greedy sampling.
//!
//! As with [`Backend`], every op is a provided method that checks its arguments here, once for
//! every backend, and hands them to the backend's `run_*` method; a backend implements only
//! those. The attention of a step is described by a [`KvPlan`]: for every row of the step (a
//! token of some sequence) its position, the cache slot its key and value go to, and its
//! sequence's block table. The plan is checked when it is built and uploaded once per step
//! ([`DecoderBackend::upload_plan`]); the rotary and attention ops of every block reuse it.

use crate::error::{Error, Result};
use crate::gguf::GgmlType;

use super::Backend;

/// What a quantized weight is: `rows` x `cols` values stored as `ty` blocks, row by row (a
/// GGUF `[cols, rows]` tensor: rows are outputs).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QInfo {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl QInfo {
    /// Checks that `ty` has kernels and that `bytes` holds exactly `rows` x `cols` of it.
    pub fn checked(ty: GgmlType, rows: usize, cols: usize, bytes: usize) -> Result<QInfo> {
        if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
            return Err(Error::Input(format!(
                "quantized weights of type {ty} have no kernels (Q4_1 and Q8_0 do)"
            )));
        }
        let need = ty
            .row_bytes(cols as u64)
            .filter(|_| cols > 0)
            .ok_or_else(|| {
                Error::Input(format!("a row of {cols} values is not whole {ty} blocks"))
            })?
            .checked_mul(rows as u64);
        if need != Some(bytes as u64) {
            return Err(Error::Input(format!(
                "{rows} rows of {cols} {ty} values need {need:?} bytes, got {bytes}"
            )));
        }
        Ok(QInfo { ty, rows, cols })
    }

    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols as u64).unwrap_or(0) as usize
    }
}

/// The head layout of a fused query/key/value row: `heads` query heads, then `kv_heads` key
/// heads, then `kv_heads` value heads, each `head_dim` wide.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Width of a fused query/key/value row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Width of one cache slot (the keys, or the values, of one position).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn check(&self, op: &'static str) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
        {
            return Err(Error::shape(
                op,
                "heads",
                "query heads a multiple of the key/value heads, an even head dimension",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
}

/// One layer's key/value cache: `k` and `v` each `[slots, kv_width]`, slot `b * block_size + i`
/// holding position `i` of the block `b` of whichever sequence's table names `b`.
pub struct KvLayer<T> {
    pub k: T,
    pub v: T,
}

/// Where the rows of one step read and write the cache (see the module docs). Built with
/// [`KvPlan::push`], which checks every index against the cache, so a kernel that trusts the
/// plan stays inside the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvPlan {
    block_size: usize,
    cache_blocks: usize,
    /// Per row: its position in its sequence (it attends to positions `0..=pos`).
    pub(crate) positions: Vec<u32>,
    /// Per row: the cache slot its key and value are written to.
    pub(crate) slots: Vec<u32>,
    /// Per row: where its sequence's block table starts in `tables`.
    pub(crate) starts: Vec<u32>,
    /// The block tables of the step's sequences, one after another.
    pub(crate) tables: Vec<u32>,
    /// Blocks in the longest table: `widest * block_size` bounds the keys any row attends over.
    widest: usize,
}

impl KvPlan {
    /// A plan over a cache of `cache_blocks` blocks of `block_size` positions.
    pub fn new(block_size: usize, cache_blocks: usize) -> KvPlan {
        KvPlan {
            block_size,
            cache_blocks,
            ..KvPlan::default()
        }
    }

    /// Adds `count` rows of one sequence, at positions `first..first + count`, whose blocks
    /// are `table` (block `j` of the table holds positions `j * block_size ..`).
    pub fn push(&mut self, table: &[u32], first: usize, count: usize) -> Result<()> {
        let end = first + count;
        let blocks_needed = end.div_ceil(self.block_size.max(1));
        if self.block_size == 0 || table.len() < blocks_needed {
            return Err(Error::shape(
                "kv plan",
                "block table",
                format!("at least {blocks_needed} blocks for positions up to {end}"),
                table.len(),
            ));
        }
        if let Some(&b) = table.iter().find(|&&b| b as usize >= self.cache_blocks) {
            return Err(Error::shape(
                "kv plan",
                "block id",
                format!("below {}", self.cache_blocks),
                b,
            ));
        }
        let too_big = |v: usize| {
            u32::try_from(v).map_err(|_| Error::shape("kv plan", "index", "a 32-bit value", v))
        };
        too_big(self.cache_blocks * self.block_size)?;
        let start = too_big(self.tables.len())?;
        self.tables.extend_from_slice(table);
        self.widest = self.widest.max(table.len());
        too_big(self.tables.len())?;
        for p in first..end {
            let slot = table[p / self.block_size] as usize * self.block_size + p % self.block_size;
            self.positions.push(too_big(p)?);
            self.slots.push(slot as u32);
            self.starts.push(start);
        }
        Ok(())
    }

    /// Rows of the step.
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Slots of the cache the plan was made for.
    pub fn cache_slots(&self) -> usize {
        self.cache_blocks * self.block_size
    }

    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// The most keys a row of the step may attend over: the longest block table's positions.
    /// Unlike the longest row it stays put while sequences grow inside their tables, so
    /// what a kernel derives from it (the flash kernel's chunks) keeps a step's launches the
    /// same from step to step, as graph replays need.
    pub fn keys_bound(&self) -> usize {
        self.widest * self.block_size
    }
}

/// What [`DecoderBackend::rms_norm`] returns: the residual sum (when a residual was given) and
/// the normalised rows.
pub type NormOut<T> = (Option<T>, T);

/// What every backend's uploaded plan says of itself, so the ops can check it against the
/// tensors they are handed.
pub trait PlanInfo {
    fn rows(&self) -> usize;
    fn cache_slots(&self) -> usize;
}

/// The ops of a decoder, on a backend. Callers use the provided methods; a backend implements
/// the `run_*` ones, which get checked arguments.
pub trait DecoderBackend: Backend {
    /// A block-quantized weight resident on this backend, kept as blocks.
    type QTensor: Send + Sync + 'static;
    /// A [`KvPlan`] resident on this backend.
    type Plan: PlanInfo + Send + Sync;

    fn qinfo(&self, w: &Self::QTensor) -> QInfo;

    /// Bytes of one stored activation value (what a cache slot's values take).
    fn value_bytes(&self) -> usize;

    fn run_load_quantized(&self, info: QInfo, bytes: &[u8]) -> Result<Self::QTensor>;
    fn run_upload_plan(&self, plan: &KvPlan) -> Result<Self::Plan>;
    fn run_embed_quantized(&self, ids: &[u32], table: &Self::QTensor) -> Result<Self::Tensor>;
    fn run_qlinear(&self, x: &Self::Tensor, w: &Self::QTensor) -> Result<Self::Tensor>;
    fn run_rms_norm(
        &self,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        gamma: &Self::Tensor,
        eps: f32,
    ) -> Result<NormOut<Self::Tensor>>;
    fn run_rope(
        &self,
        x: &mut Self::Tensor,
        plan: &Self::Plan,
        rotated_heads: usize,
        head_dim: usize,
        base: f32,
    ) -> Result<()>;
    fn run_kv_attention(
        &self,
        qkv: &Self::Tensor,
        cache: &mut KvLayer<Self::Tensor>,
        plan: &Self::Plan,
        heads: Heads,
    ) -> Result<Self::Tensor>;
    fn run_silu_mul(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn run_select_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor>;
    fn run_argmax(&self, x: &Self::Tensor) -> Result<Vec<u32>>;

    // ---- what callers use ------------------------------------------------------------------

    /// Keeps `bytes` (`rows` rows of `cols` values stored as `ty` blocks) on the backend as
    /// blocks. Q4_1 and Q8_0 have kernels.
    fn load_quantized(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self::QTensor> {
        self.run_load_quantized(QInfo::checked(ty, rows, cols, bytes.len())?, bytes)
    }

    /// Puts a step's plan on the backend, for the rotary and attention ops of every block.
    fn upload_plan(&self, plan: &KvPlan) -> Result<Self::Plan> {
        self.run_upload_plan(plan)
    }

    /// A zeroed key/value cache layer of `slots` positions of `kv_width` values each.
    fn alloc_kv_layer(&self, slots: usize, kv_width: usize) -> Result<KvLayer<Self::Tensor>> {
        let zeros = zeroed_f32(slots, kv_width)?;
        Ok(KvLayer {
            k: self.upload(&zeros, &[slots, kv_width])?,
            v: self.upload(&zeros, &[slots, kv_width])?,
        })
    }

    /// The rows `ids` of a quantized table (a token embedding), decoded: `[ids.len(), cols]`.
    fn embed_quantized(&self, ids: &[u32], table: &Self::QTensor) -> Result<Self::Tensor> {
        let info = self.qinfo(table);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= info.rows) {
            return Err(Error::shape(
                "embed_quantized",
                "token id",
                format!("below the {} rows of the table", info.rows),
                bad,
            ));
        }
        if ids.is_empty() {
            return Err(Error::shape("embed_quantized", "ids", "at least one", 0));
        }
        self.run_embed_quantized(ids, table)
    }

    /// `x W^T`: `x` [m, cols], `W` quantized [rows, cols] -> [m, rows].
    fn qlinear(&self, x: &Self::Tensor, w: &Self::QTensor) -> Result<Self::Tensor> {
        let info = self.qinfo(w);
        let s = self.shape(x);
        if s.len() != 2 || s[1] != info.cols || s[0] == 0 {
            return Err(Error::shape(
                "qlinear",
                "input shape",
                format!("[m >= 1, {}]", info.cols),
                format!("{s:?}"),
            ));
        }
        self.run_qlinear(x, w)
    }

    /// RMSNorm of rows: `h = x + residual` (when given), then `h / sqrt(mean(h^2) + eps) *
    /// gamma`. Returns `h` (when a residual was given) and the normalised rows.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        gamma: &Self::Tensor,
        eps: f32,
    ) -> Result<NormOut<Self::Tensor>> {
        check_rms_norm(self, x, residual, gamma, eps)?;
        self.run_rms_norm(x, residual, gamma, eps)
    }

    /// Rotates, in place, the first `rotated_heads` heads of every row of `x` (`[plan rows,
    /// width]`, heads `head_dim` wide): each adjacent pair `(2i, 2i + 1)` by the row's position
    /// times `base^(-2i / head_dim)` (GGUF's pairing; see docs/format.md).
    fn rope(
        &self,
        x: &mut Self::Tensor,
        plan: &Self::Plan,
        rotated_heads: usize,
        head_dim: usize,
        base: f32,
    ) -> Result<()> {
        let s = self.shape(x).to_vec();
        if s.len() != 2
            || s[0] != plan.rows()
            || head_dim == 0
            || !head_dim.is_multiple_of(2)
            || rotated_heads * head_dim > s[1]
        {
            return Err(Error::shape(
                "rope",
                "input shape",
                format!(
                    "[{} plan rows, >= {rotated_heads} heads of an even {head_dim}]",
                    plan.rows()
                ),
                format!("{s:?}"),
            ));
        }
        if !(base > 1.0 && base.is_finite()) {
            return Err(Error::shape("rope", "base", "a number above 1", base));
        }
        self.run_rope(x, plan, rotated_heads, head_dim, base)
    }

    /// Causal attention of a step: writes the keys and values of `qkv` (`[plan rows,
    /// heads.qkv_width()]`, already rotated) into the cache at the plan's slots, then for every
    /// row attends over its sequence's positions `0..=pos` (query head `h` reads key/value head
    /// `h / (heads / kv_heads)`), scaled by `1 / sqrt(head_dim)`. -> `[rows, heads * head_dim]`.
    fn kv_attention(
        &self,
        qkv: &Self::Tensor,
        cache: &mut KvLayer<Self::Tensor>,
        plan: &Self::Plan,
        heads: Heads,
    ) -> Result<Self::Tensor> {
        heads.check("kv_attention")?;
        let s = self.shape(qkv);
        if s != [plan.rows(), heads.qkv_width()] || plan.rows() == 0 {
            return Err(Error::shape(
                "kv_attention",
                "qkv shape",
                format!("[{} plan rows, {}]", plan.rows(), heads.qkv_width()),
                format!("{s:?}"),
            ));
        }
        let want = [plan.cache_slots(), heads.kv_width()];
        for (name, t) in [("key cache", &cache.k), ("value cache", &cache.v)] {
            if self.shape(t) != want {
                return Err(Error::shape(
                    "kv_attention",
                    format!("{name} shape"),
                    format!("{want:?}"),
                    format!("{:?}", self.shape(t)),
                ));
            }
        }
        self.run_kv_attention(qkv, cache, plan, heads)
    }

    /// SwiGLU: `x` [m, 2f] (gate | up) -> `silu(gate) * up` [m, f].
    fn silu_mul(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let s = self.shape(x);
        if s.len() != 2 || s[1] == 0 || !s[1].is_multiple_of(2) {
            return Err(Error::shape(
                "silu_mul",
                "input shape",
                "[m, 2f]",
                format!("{s:?}"),
            ));
        }
        self.run_silu_mul(x)
    }

    /// The rows `rows` of a 2-D tensor, in that order.
    fn select_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor> {
        let s = self.shape(x);
        if s.len() != 2 {
            return Err(Error::shape(
                "select_rows",
                "input shape",
                "2-D",
                format!("{s:?}"),
            ));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= s[0]) {
            return Err(Error::shape(
                "select_rows",
                "row",
                format!("below {}", s[0]),
                bad,
            ));
        }
        if rows.is_empty() {
            return Err(Error::shape("select_rows", "rows", "at least one", 0));
        }
        self.run_select_rows(x, rows)
    }

    /// The index of the largest value of every row (the lowest index among equals): greedy
    /// sampling on the backend, so only one id per row crosses to the host.
    fn argmax(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        let s = self.shape(x);
        if s.len() != 2 || s[1] == 0 {
            return Err(Error::shape(
                "argmax",
                "input shape",
                "[rows, cols >= 1]",
                format!("{s:?}"),
            ));
        }
        self.run_argmax(x)
    }
}

/// `rows * cols` zeros on the host, or an error naming the size when it cannot be allocated
/// (a cache budget larger than the machine's memory must not abort the process). Zeroed pages
/// come from the allocator as they are, so nothing is touched before use.
pub(crate) fn zeroed_f32(rows: usize, cols: usize) -> Result<Vec<f32>> {
    let fail = || {
        Error::device(
            "host",
            "alloc_kv_layer",
            format!("cannot allocate {rows} x {cols} f32 values for a key/value cache layer"),
        )
    };
    let n = rows.checked_mul(cols).ok_or_else(fail)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).map_err(|_| fail())?;
    // SAFETY: `layout` has a non-zero size; a non-null result is `n` zeroed, aligned f32
    // values (all-zero bits are 0.0) owned by the returned Vec, allocated by the global
    // allocator with exactly the layout `Vec<f32>` of capacity `n` frees with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(fail());
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

/// The checks of [`DecoderBackend::rms_norm`]: x `[rows, cols >= 1]`, the residual shaped like
/// it, gamma `[cols]`, eps positive.
pub(crate) fn check_rms_norm<B: DecoderBackend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    residual: Option<&B::Tensor>,
    gamma: &B::Tensor,
    eps: f32,
) -> Result<()> {
    let s = be.shape(x);
    let cols = s.last().copied().unwrap_or(0);
    if s.len() != 2 || cols == 0 {
        return Err(Error::shape(
            "rms_norm",
            "input shape",
            "[rows, cols >= 1]",
            format!("{s:?}"),
        ));
    }
    if let Some(r) = residual.filter(|r| be.shape(r) != s) {
        return Err(Error::shape(
            "rms_norm",
            "residual shape",
            format!("{s:?}"),
            format!("{:?}", be.shape(r)),
        ));
    }
    if be.shape(gamma) != [cols] {
        return Err(Error::shape(
            "rms_norm",
            "gamma shape",
            format!("[{cols}]"),
            format!("{:?}", be.shape(gamma)),
        ));
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::shape("rms_norm", "eps", "a positive number", eps));
    }
    Ok(())
}
