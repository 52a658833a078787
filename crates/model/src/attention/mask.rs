//! Who may attend to whom, built block by block from segment ids and row positions.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use super::{AttentionImpl, AttentionParams, DEFAULT_CHUNK_MEMORY_BYTES};

/// Who may attend to whom.
///
/// Query `i` sees key `j` iff `j <= i + query_offset` (absolute positions in the row), both
/// carry the same non-zero segment id, and, for sliding layers, `i + query_offset - j < window`.
/// Segment 0 is padding. Packed rows hold several segments; an unpacked row is a single segment
/// followed by padding.
///
/// Only the segment ids are held: the `[batch, q_len, k_len]` boolean mask is built on demand,
/// whole by [`forbidden`](Self::forbidden) for the reference attention, and one query chunk at a
/// time by the chunked attention.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// `[batch, q_len]`
    pub query_segments: Tensor<B, 2, Int>,
    /// `[batch, k_len]`
    pub key_segments: Tensor<B, 2, Int>,
    /// Absolute index of the first query among the keys (the cached length when decoding).
    pub query_offset: usize,
    pub window: Option<usize>,
    /// Bytes the chunked attention's f32 score tiles may take, see
    /// [`AttentionPlan`](super::AttentionPlan).
    pub chunk_memory_bytes: usize,
    /// Which attention body runs with this mask.
    pub implementation: AttentionImpl,
}

impl<B: Backend> AttentionMask<B> {
    pub fn new(
        query_segments: Tensor<B, 2, Int>,
        key_segments: Tensor<B, 2, Int>,
        query_offset: usize,
        window: Option<usize>,
    ) -> Self {
        Self {
            query_segments,
            key_segments,
            query_offset,
            window,
            chunk_memory_bytes: DEFAULT_CHUNK_MEMORY_BYTES,
            implementation: AttentionImpl::Chunked,
        }
    }

    /// Returns the mask with the attention body set.
    pub fn with_implementation(mut self, implementation: AttentionImpl) -> Self {
        self.implementation = implementation;
        self
    }

    /// Returns the mask with `chunk_memory_bytes` set.
    pub fn with_chunk_memory_bytes(mut self, chunk_memory_bytes: usize) -> Self {
        self.chunk_memory_bytes = chunk_memory_bytes;
        self
    }

    /// The scalar settings of the chunked attention.
    pub fn params(&self) -> AttentionParams {
        AttentionParams {
            query_offset: self.query_offset,
            window: self.window,
            chunk_memory_bytes: self.chunk_memory_bytes,
        }
    }

    /// The whole mask, true where attention is forbidden.
    ///
    /// # Shapes
    /// - output: `[batch, 1, q_len, k_len]`
    pub fn forbidden(&self) -> Tensor<B, 4, Bool> {
        let positions = positions(
            self.query_offset + self.query_segments.dims()[1],
            self.key_segments.dims()[1],
            &self.key_segments.device(),
        );
        forbidden_block(
            self.query_segments.clone(),
            self.key_segments.clone(),
            &positions,
            self.query_offset,
            0,
            self.window,
        )
        .unsqueeze_dim(1)
    }
}

/// `0..max(query_end, k_len)` on the device, for [`forbidden_block`]: made once per attention
/// call (each `arange` is an upload from the host), narrowed per block.
pub(crate) fn positions<B: Backend>(
    query_end: usize,
    k_len: usize,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    Tensor::arange(0..query_end.max(k_len) as i64, device)
}

/// The mask of one block of queries against one block of keys, true where attention is
/// forbidden: a future key, another segment, a padding key, or (with a window) a key at
/// `window` or more positions back.
///
/// # Shapes
/// - query_segments: `[batch, q_rows]`, the rows of the block, whose first row sits at
///   absolute position `query_start` among the keys
/// - key_segments: `[batch, keys]`, the keys of the block, the first at `key_start`
/// - positions: [`positions`], covering both blocks
/// - output: `[batch, q_rows, keys]`
pub(crate) fn forbidden_block<B: Backend>(
    query_segments: Tensor<B, 2, Int>,
    key_segments: Tensor<B, 2, Int>,
    positions: &Tensor<B, 1, Int>,
    query_start: usize,
    key_start: usize,
    window: Option<usize>,
) -> Tensor<B, 3, Bool> {
    let [batch, q_rows] = query_segments.dims();
    let [_, keys] = key_segments.dims();
    let shape = [batch, q_rows, keys];
    // [1, q_rows, 1] and [1, 1, keys], expanded to [batch, q_rows, keys]
    let q_pos = positions
        .clone()
        .narrow(0, query_start, q_rows)
        .reshape([1, q_rows, 1])
        .expand(shape);
    let k_pos = positions
        .clone()
        .narrow(0, key_start, keys)
        .reshape([1, 1, keys])
        .expand(shape);
    let future = k_pos.clone().greater(q_pos.clone());
    // [batch, q_rows, 1] and [batch, 1, keys], expanded to [batch, q_rows, keys]
    let q_seg = query_segments.reshape([batch, q_rows, 1]).expand(shape);
    let k_seg = key_segments.reshape([batch, 1, keys]).expand(shape);
    let other_segment = q_seg.not_equal(k_seg.clone());
    let padding = k_seg.equal_elem(0);
    let mut forbidden = future.bool_or(other_segment).bool_or(padding);
    if let Some(window) = window {
        let too_old = (q_pos - k_pos).greater_equal_elem(window as i64);
        forbidden = forbidden.bool_or(too_old);
    }
    forbidden
}
