//! What autodiff stores for attention, per layer, in the reference body
//! (`ops::attention_reference`) and in the chunked one (`ops::attention`): an **estimate
//! computed from shapes**, not a measurement.
//!
//! `cargo run -p qwen-model --example attention_memory [preset] [batch] [seq]` (defaults: 0.5b,
//! 8, 2048) prints a Markdown table for bf16 and f32 activations.
//!
//! The reference's entries follow what burn 0.21's autodiff keeps for each op of its body:
//! `matmul` keeps both operands (q and the repeated k; the probabilities and the repeated v),
//! `exp` keeps its input (the shifted scores), `div` keeps both operands (the exponent and the
//! row sums), `mask_fill` keeps the mask, and `cast`, `mul_scalar` and the max subtraction keep
//! no tensor. The chunked op keeps exactly its node's state (see `qwen_model::attention`).

use qwen_model::Qwen2Config;
use qwen_model::attention::{AttentionPlan, DEFAULT_CHUNK_MEMORY_BYTES};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// One stored tensor: what it is, its shape, its bytes, and which paths store it.
struct Entry {
    name: &'static str,
    shape: String,
    bytes: usize,
    reference: bool,
    chunked: bool,
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args.first().map_or("0.5b", String::as_str);
    let batch: usize = args.get(1).map_or(8, |a| a.parse().expect("batch"));
    let seq: usize = args.get(2).map_or(2048, |a| a.parse().expect("seq"));
    let config = Qwen2Config::preset(preset).expect("a preset: tiny, 0.5b, 1.5b or 7b");
    let (layers, heads, kv_heads, d) = (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads(),
        config.head_dim(),
    );
    let n_rep = heads / kv_heads;
    let (b, s, t) = (batch, seq, seq);
    let plan = AttentionPlan::new(b, heads, s, t, DEFAULT_CHUNK_MEMORY_BYTES);

    println!("# Attention memory kept by autodiff (estimate from shapes, not measured)");
    println!();
    println!(
        "Preset {preset}: {layers} layers, {heads} heads, {kv_heads} kv heads, head_dim {d}; \
         batch {b}, seq {s}. The chunked op's default budget ({}) gives {} query rows per \
         chunk; its score tiles are transient (freed after each chunk), not stored.",
        human(DEFAULT_CHUNK_MEMORY_BYTES),
        plan.query_rows
    );

    for (dtype, act) in [("bf16", 2usize), ("f32", 4)] {
        let scores = b * heads * s * t;
        let entries = [
            Entry {
                name: "q (matmul operand / node input)",
                shape: format!("[{b}, {heads}, {s}, {d}] {dtype}"),
                bytes: b * heads * s * d * act,
                reference: true,
                chunked: true,
            },
            Entry {
                name: "k, v repeated to every head (matmul operands)",
                shape: format!("2 x [{b}, {heads}, {t}, {d}] {dtype}"),
                bytes: 2 * b * heads * t * d * act,
                reference: true,
                chunked: false,
            },
            Entry {
                name: "k, v (node inputs, not repeated)",
                shape: format!("2 x [{b}, {kv_heads}, {t}, {d}] {dtype}"),
                bytes: 2 * b * kv_heads * t * d * act,
                reference: false,
                chunked: true,
            },
            Entry {
                name: "shifted scores (exp input)",
                shape: format!("[{b}, {heads}, {s}, {t}] f32"),
                bytes: scores * 4,
                reference: true,
                chunked: false,
            },
            Entry {
                name: "exp of the scores (div operand)",
                shape: format!("[{b}, {heads}, {s}, {t}] f32"),
                bytes: scores * 4,
                reference: true,
                chunked: false,
            },
            Entry {
                name: "row sums (div operand)",
                shape: format!("[{b}, {heads}, {s}, 1] f32"),
                bytes: b * heads * s * 4,
                reference: true,
                chunked: false,
            },
            Entry {
                name: "probabilities (matmul operand)",
                shape: format!("[{b}, {heads}, {s}, {t}] {dtype}"),
                bytes: scores * act,
                reference: true,
                chunked: false,
            },
            Entry {
                name: "output o (node state)",
                shape: format!("[{b}, {heads}, {s}, {d}] {dtype}"),
                bytes: b * heads * s * d * act,
                reference: false,
                chunked: true,
            },
            Entry {
                name: "log-sum-exp (node state)",
                shape: format!("[{b}, {heads}, {s}] f32"),
                bytes: b * heads * s * 4,
                reference: false,
                chunked: true,
            },
        ];
        let total = |pick: fn(&Entry) -> bool| -> usize {
            entries.iter().filter(|e| pick(e)).map(|e| e.bytes).sum()
        };
        let reference = total(|e| e.reference);
        let chunked = total(|e| e.chunked);
        let cell = |stored: bool, bytes: usize| if stored { human(bytes) } else { "-".into() };

        println!();
        println!("## {dtype} activations");
        println!();
        println!("| stored per layer | shape | reference | chunked |");
        println!("|---|---|---:|---:|");
        for e in &entries {
            println!(
                "| {} | {} | {} | {} |",
                e.name,
                e.shape,
                cell(e.reference, e.bytes),
                cell(e.chunked, e.bytes)
            );
        }
        println!(
            "| **per layer** | | **{}** | **{}** |",
            human(reference),
            human(chunked)
        );
        println!(
            "| **{layers} layers** | | **{}** | **{}** |",
            human(reference * layers),
            human(chunked * layers)
        );
        println!(
            "| mask, once per forward (reference only; bool, 1 byte assumed) | [{b}, 1, {s}, {t}] | {} | - |",
            human(b * s * t)
        );
        if n_rep == 1 {
            println!();
            println!(
                "(kv_heads = heads: the reference's k and v are not copied, only referenced.)"
            );
        }
    }
}
