//! Padding and packing invariants, deterministic order, and exact resume from a cursor.

mod common;

use common::tok;
use qwen_chat::{
    Batch, ChatError, DatasetOptions, Example, Loader, LoaderConfig, Source, synthetic_chats,
};

/// A few hundred real examples of varied length.
fn examples(n: usize) -> Vec<Example> {
    let chats = synthetic_chats(n, 11);
    let opts = DatasetOptions {
        max_len: 512,
        ..DatasetOptions::default()
    };
    tok().dataset_from_chats(&chats, &opts).unwrap().examples
}

fn config(packing: bool) -> LoaderConfig {
    LoaderConfig {
        batch_rows: 4,
        max_len: 512,
        packing,
        seed: 3,
        epochs: 2,
        pad_id: tok().pad_id(),
        ..LoaderConfig::default()
    }
}

/// The sequences of row `r`: (segment, start, end) in the row.
fn sequences(b: &Batch, r: usize) -> Vec<(i32, usize, usize)> {
    let seg = &b.segment_ids[r * b.len..(r + 1) * b.len];
    let mut out: Vec<(i32, usize, usize)> = Vec::new();
    for (i, &s) in seg.iter().enumerate() {
        if s == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 == s && last.2 == i => last.2 = i + 1,
            _ => out.push((s, i, i + 1)),
        }
    }
    out
}

/// The invariants every batch keeps, padded or packed.
fn check_batch(b: &Batch, examples: &[Example], pad_id: u32) {
    let n = b.rows * b.len;
    for v in [
        b.input_ids.len(),
        b.labels.len(),
        b.position_ids.len(),
        b.segment_ids.len(),
        b.attention_mask.len(),
    ] {
        assert_eq!(v, n);
    }
    for r in 0..b.rows {
        let row = r * b.len..(r + 1) * b.len;
        let seqs = sequences(b, r);
        for (k, &(seg, start, end)) in seqs.iter().enumerate() {
            assert_eq!(seg, k as i32 + 1, "segments count 1..=k in order");
            let at = |i: usize| row.start + i;
            // Positions restart at 0 at every sequence.
            for i in start..end {
                assert_eq!(b.position_ids[at(i)], (i - start) as i64);
                assert_eq!(b.attention_mask[at(i)], 1);
            }
            // No label across a boundary: each sequence's first label is -100.
            assert_eq!(b.labels[at(start)], -100);
            // Each sequence is one whole example, labels unshifted.
            let ids = &b.input_ids[at(start)..at(end)];
            let e = examples
                .iter()
                .find(|e| e.input_ids == ids)
                .expect("a sequence is an example");
            assert_eq!(&b.labels[at(start) + 1..at(end)], &e.labels[1..]);
        }
        let used: usize = seqs.iter().map(|s| s.2 - s.1).sum();
        let last_end = seqs.last().map_or(0, |s| s.2);
        assert_eq!(
            used, last_end,
            "sequences are contiguous from the row start"
        );
        for i in last_end..b.len {
            assert_eq!(b.input_ids[row.start + i], pad_id);
            assert_eq!(b.labels[row.start + i], -100);
            assert_eq!(b.segment_ids[row.start + i], 0);
            assert_eq!(b.attention_mask[row.start + i], 0);
        }
    }
}

fn epoch_of(loader: &mut Loader) -> Vec<Batch> {
    (0..loader.batches_per_epoch())
        .map(|_| loader.next_batch().unwrap())
        .collect()
}

#[test]
fn padded_batches_keep_the_invariants_and_cover_every_example_once() {
    let ex = examples(101);
    let mut loader = Loader::new(ex.clone(), config(false)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 26);
    let batches = epoch_of(&mut loader);
    let mut seen = 0;
    for b in &batches {
        check_batch(b, &ex, tok().pad_id());
        assert!(b.rows <= 4);
        for r in 0..b.rows {
            assert_eq!(sequences(b, r).len(), 1, "one example per padded row");
        }
        seen += b.rows;
        let longest = (0..b.rows).map(|r| sequences(b, r)[0].2).max().unwrap();
        assert_eq!(b.len, longest, "padded to the longest row");
    }
    assert_eq!(seen, ex.len());
    let supervised: usize = batches.iter().map(Batch::supervised_tokens).sum();
    assert_eq!(
        supervised,
        ex.iter().map(Example::supervised_tokens).sum::<usize>()
    );
}

#[test]
fn packed_batches_keep_the_invariants_and_fill_rows() {
    let ex = examples(300);
    let mut loader = Loader::new(ex.clone(), config(true)).unwrap();
    let batches = epoch_of(&mut loader);
    let mut sequences_seen = 0;
    let mut real = 0;
    let mut rows = 0;
    for b in &batches {
        assert_eq!(b.len, 512);
        check_batch(b, &ex, tok().pad_id());
        rows += b.rows;
        real += b.real_tokens();
        sequences_seen += (0..b.rows).map(|r| sequences(b, r).len()).sum::<usize>();
    }
    assert_eq!(
        sequences_seen,
        ex.len(),
        "every example packed exactly once"
    );
    let total: usize = ex.iter().map(Example::len).sum();
    assert_eq!(real, total);
    assert!(
        rows > 1 && rows * 512 < total * 12 / 10,
        "best-fit decreasing wastes little: {rows} rows for {total} tokens"
    );
    let supervised: usize = batches.iter().map(Batch::supervised_tokens).sum();
    assert_eq!(
        supervised,
        ex.iter().map(Example::supervised_tokens).sum::<usize>()
    );
    assert!(
        batches
            .iter()
            .any(|b| (0..b.rows).any(|r| sequences(b, r).len() > 1))
    );
}

#[test]
fn order_is_seeded_and_changes_per_epoch() {
    let ex = examples(60);
    for packing in [false, true] {
        let mut a = Loader::new(ex.clone(), config(packing)).unwrap();
        let mut b = Loader::new(ex.clone(), config(packing)).unwrap();
        let (a0, a1) = (epoch_of(&mut a), epoch_of(&mut a));
        let (b0, b1) = (epoch_of(&mut b), epoch_of(&mut b));
        assert_eq!(a0, b0);
        assert_eq!(a1, b1);
        assert_ne!(a0, a1, "a new epoch is a new order");
        assert!(a.next_batch().is_none(), "two epochs, then done");
        let mut other_seed = Loader::new(
            ex.clone(),
            LoaderConfig {
                seed: 4,
                ..config(packing)
            },
        )
        .unwrap();
        assert_ne!(epoch_of(&mut other_seed), a0);
    }
    let mut plain = Loader::new(
        ex.clone(),
        LoaderConfig {
            shuffle: false,
            ..config(false)
        },
    )
    .unwrap();
    let first = plain.next_batch().unwrap();
    assert_eq!(&first.input_ids[..ex[0].len()], &ex[0].input_ids[..]);
}

#[test]
fn cursor_resumes_exactly_mid_epoch_and_across_epochs() {
    let ex = examples(50);
    for packing in [false, true] {
        let cfg = config(packing);
        let mut full = Loader::new(ex.clone(), cfg.clone()).unwrap();
        let all: Vec<Batch> = full.by_ref().collect();
        assert_eq!(all.len(), full.total_batches());
        for stop in [0, 3, full.batches_per_epoch(), full.batches_per_epoch() + 2] {
            let mut first = Loader::new(ex.clone(), cfg.clone()).unwrap();
            for _ in 0..stop {
                first.next_batch().unwrap();
            }
            let saved = serde_json::to_string(&first.cursor()).unwrap();
            let cursor = serde_json::from_str(&saved).unwrap();
            let resumed = Loader::resume(ex.clone(), cfg.clone(), &cursor).unwrap();
            let rest: Vec<Batch> = resumed.collect();
            assert_eq!(rest, all[stop..], "packing={packing} stop={stop}");
        }
    }
}

#[test]
fn resume_refuses_other_data_or_config() {
    let ex = examples(20);
    let mut loader = Loader::new(ex.clone(), config(false)).unwrap();
    loader.next_batch();
    let cursor = loader.cursor();
    let err = Loader::resume(ex[1..].to_vec(), config(false), &cursor).unwrap_err();
    assert!(matches!(err, ChatError::Cursor { .. }), "{err}");
    let err = Loader::resume(
        ex.clone(),
        LoaderConfig {
            seed: 9,
            ..config(false)
        },
        &cursor,
    )
    .unwrap_err();
    assert!(matches!(err, ChatError::Cursor { .. }), "{err}");
    // More epochs is fine: training longer on the same data.
    Loader::resume(
        ex,
        LoaderConfig {
            epochs: 5,
            ..config(false)
        },
        &cursor,
    )
    .unwrap();
}

#[test]
fn length_grouping_reduces_padding() {
    let ex = examples(400);
    let pad = |group_by_length| {
        let mut l = Loader::new(
            ex.clone(),
            LoaderConfig {
                group_by_length,
                epochs: 1,
                ..config(false)
            },
        )
        .unwrap();
        let batches: Vec<Batch> = l.by_ref().collect();
        for b in &batches {
            check_batch(b, &ex, tok().pad_id());
        }
        assert_eq!(batches.iter().map(|b| b.rows).sum::<usize>(), ex.len());
        batches
            .iter()
            .map(|b| b.rows * b.len - b.real_tokens())
            .sum::<usize>()
    };
    let (grouped, random) = (pad(true), pad(false));
    assert!(grouped * 2 < random, "grouped {grouped} vs random {random}");
}

#[test]
fn pad_to_multiple_and_drop_last() {
    let ex = examples(10);
    let cfg = LoaderConfig {
        pad_to_multiple: 64,
        drop_last: true,
        epochs: 1,
        ..config(false)
    };
    let batches: Vec<Batch> = Loader::new(ex.clone(), cfg).unwrap().collect();
    assert_eq!(
        batches.len(),
        2,
        "10 examples, rows of 4, last partial batch dropped"
    );
    for b in &batches {
        assert_eq!(b.len % 64, 0);
        assert_eq!(b.rows, 4);
        check_batch(b, &ex, tok().pad_id());
    }
}

#[test]
fn examples_longer_than_max_len_are_refused() {
    let long = Example {
        input_ids: vec![1; 600],
        labels: vec![-100; 600],
        source: Source::new("big.jsonl", 7),
        truncated: false,
    };
    let err = Loader::new(vec![long], config(true)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "big.jsonl:7: example of 600 tokens does not fit max_len 512"
    );
}
