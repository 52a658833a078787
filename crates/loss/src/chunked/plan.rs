//! How the chunked path tiles `[rows, vocab]` under a memory budget.

use serde::Serialize;

/// How many `[rows, cols]` f32 buffers one tile keeps alive at its peak: the logits, their
/// exponent/gradient (computed in place where the backend allows), the cast or transposed copy
/// that a matmul may take, and one spare for temporaries.
pub const LIVE_TILE_BUFFERS: usize = 4;

/// Fewest vocabulary columns in a backward tile: narrower tiles make the weight-gradient
/// matmuls too thin to run well on a GPU.
pub const MIN_TILE_COLS: usize = 128;

/// Backward tiles are a multiple of this many columns (but the vocabulary's last slab), so
/// that the rows of a tile's bf16 logits start on 16-byte boundaries: cuBLASLt picks its
/// fast kernels only for such leading dimensions. Tiles of 8,375 columns ran the loss's three
/// products at 250-420 TFLOP/s on the H200 (docs/BENCHMARKS.md, session 14).
pub const TILE_COL_MULTIPLE: usize = 64;

/// The tiling of one chunked lm_head + loss call.
///
/// The forward pass runs over row chunks of `forward_rows` rows against the whole vocabulary,
/// since the log-sum-exp needs every column of a row. The backward pass runs over tiles of
/// `backward_rows x backward_cols`: for each vocabulary slab it recomputes the logits of every
/// row chunk, so the slab's weight gradient is finished in one place and written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkPlan {
    /// Rows per forward chunk.
    pub forward_rows: usize,
    /// Rows per backward tile.
    pub backward_rows: usize,
    /// Vocabulary columns per backward tile.
    pub backward_cols: usize,
}

impl ChunkPlan {
    /// The plan for `rows` supervised rows, a vocabulary of `vocab` and `budget_bytes` for a
    /// tile's f32 buffers. Every count is at least 1, so a budget that is too small still runs
    /// (one row or [`MIN_TILE_COLS`] columns at a time), just over the budget.
    pub fn new(rows: usize, vocab: usize, budget_bytes: usize) -> Self {
        let bytes_per_element = 4 * LIVE_TILE_BUFFERS;
        let elements = (budget_bytes / bytes_per_element).max(1);
        let rows = rows.max(1);
        let vocab = vocab.max(1);

        let forward_rows = (elements / vocab).clamp(1, rows);
        let backward_cols = (elements / rows).clamp(MIN_TILE_COLS.min(vocab), vocab);
        let backward_cols = match backward_cols < vocab {
            true => (backward_cols / TILE_COL_MULTIPLE * TILE_COL_MULTIPLE).max(MIN_TILE_COLS),
            false => vocab,
        }
        .min(vocab);
        let backward_rows = (elements / backward_cols).clamp(1, rows);
        Self {
            forward_rows,
            backward_rows,
            backward_cols,
        }
    }
}

/// Start and length of each chunk of `step` over `0..len`.
pub(crate) fn chunks(len: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(step.max(1))
        .map(move |start| (start, step.min(len - start)))
}
