//! How the kernels of `adamw.cu` cut a list of tensors into launches and blocks.

use std::ops::Range;

/// Values per block (`QO_CHUNK` in `adamw.cu`).
pub const CHUNK: usize = 16384;
/// Tensors per launch at most (`QO_MAX_TENSORS`).
pub const MAX_TENSORS: usize = 64;

/// One launch: its tensors (a range of the list), the first block of each relative to the
/// launch, then the launch's block count, and where its blocks start among all launches'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub tensors: Range<usize>,
    /// `tensors.len() + 1` entries; block `b` of the launch belongs to tensor
    /// `tensors.start + i` when `first_block[i] <= b < first_block[i + 1]`.
    pub first_block: Vec<i32>,
    pub block_offset: usize,
}

impl Launch {
    pub fn blocks(&self) -> usize {
        *self.first_block.last().expect("never empty") as usize
    }
}

/// The launches covering tensors of `numels` values, at most `max_tensors` per launch and
/// `chunk` values per block: every value in exactly one block, blocks of one tensor only.
/// Launches without blocks (only empty tensors) are left out.
pub fn launches(numels: &[usize], max_tensors: usize, chunk: usize) -> Vec<Launch> {
    let mut launches = Vec::new();
    let mut block_offset = 0;
    for (index, tensors) in numels.chunks(max_tensors).enumerate() {
        let mut first_block = Vec::with_capacity(tensors.len() + 1);
        let mut blocks = 0usize;
        for &n in tensors {
            first_block.push(i32::try_from(blocks).expect("under 2^31 blocks a launch"));
            blocks += n.div_ceil(chunk);
        }
        first_block.push(i32::try_from(blocks).expect("under 2^31 blocks a launch"));
        if blocks == 0 {
            continue;
        }
        let start = index * max_tensors;
        launches.push(Launch {
            tensors: start..start + tensors.len(),
            first_block,
            block_offset,
        });
        block_offset += blocks;
    }
    launches
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor `adamw.cu`'s `qo_tensor_of` finds for block `b`: the last with a first block
    /// at or before it.
    fn tensor_of(first_block: &[i32], b: i32) -> usize {
        let tensors = first_block.len() - 1;
        (0..tensors).rev().find(|&i| first_block[i] <= b).unwrap()
    }

    /// Every value of every tensor lies in exactly one block, and a block's values are one
    /// tensor's, at most `chunk` of them; launches hold at most `max` tensors and their blocks
    /// follow each other.
    #[test]
    fn every_value_in_one_block() {
        let numels = [5, 0, 16, 17, 1, 0, 0, 40, 3, 0];
        for max in [1, 2, 3, 64] {
            let chunk = 8;
            let launches = launches(&numels, max, chunk);
            let mut seen = vec![Vec::new(); numels.len()];
            let mut next_offset = 0;
            for launch in &launches {
                assert!(launch.tensors.len() <= max);
                assert_eq!(launch.block_offset, next_offset);
                next_offset += launch.blocks();
                for b in 0..launch.blocks() as i32 {
                    let i = tensor_of(&launch.first_block, b);
                    let tensor = launch.tensors.start + i;
                    let start = (b - launch.first_block[i]) as usize * chunk;
                    let end = (start + chunk).min(numels[tensor]);
                    assert!(start < end, "block {b} has no values");
                    seen[tensor].extend(start..end);
                }
            }
            for (tensor, values) in seen.iter().enumerate() {
                assert_eq!(
                    *values,
                    (0..numels[tensor]).collect::<Vec<_>>(),
                    "max {max}"
                );
            }
        }
    }

    #[test]
    fn only_empty_tensors_need_no_launch() {
        assert!(launches(&[0, 0], 64, 8).is_empty());
        let launches = launches(&[0, 0, 9], 2, 8);
        assert_eq!(launches.len(), 1);
        assert_eq!(launches[0].tensors, 2..3);
        assert_eq!(launches[0].first_block, vec![0, 2]);
    }
}
