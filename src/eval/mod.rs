//! Zero/few-shot benchmarks scored the way EleutherAI's lm-evaluation-harness scores them
//! (`docs/eval.md`): one primitive, [`scorer::loglikelihood`] of a continuation given a context,
//! the harness's tokenisation of the pair ([`scorer::encode_pair`]), its prompt templates per task
//! ([`tasks`]), task files read offline ([`data`]; JSONL, Arrow and Parquet through [`columnar`])
//! and the metrics it reports ([`run`]).
//!
//! The model side is the small [`scorer::Scorer`] trait (logits of a token batch continuing a
//! cache, and a way to copy a cache for several continuations), implemented for BlackMamba; the
//! recurrent state makes a context's cache cheap to share among its choices.

pub mod columnar;
pub mod data;
pub mod hub_tasks;
pub mod run;
pub mod scorer;
pub mod tasks;
