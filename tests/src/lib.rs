//! End-to-end tests of qwen-sft live in `tests/`; the fixtures they and the crates' tests share
//! live in `fixtures/`, each beside the script that generated it.
