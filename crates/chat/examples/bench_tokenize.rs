//! Prints `bench_tokenize(n)` as JSON: `cargo run -p qwen-chat --example bench_tokenize -- 100000`.
//! (`cargo xtask bench-tokenize` is the supported entry point; this one needs no xtask.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 100_000,
    };
    let report = qwen_chat::bench_tokenize(n)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
