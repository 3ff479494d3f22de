//! The embedded default model: `assets/default/` (config.json, model.safetensors, tokenizer.json),
//! a small BlackMamba trained by this project (see `assets/default/README.md` and
//! `scripts/train-default.sh`). The files are compiled into the binary, so the app works with no
//! network, no GPU and no files beside it.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::weights::{check_and_convert, check_index};
use crate::model::Model;

/// `assets/default/config.json`
pub const CONFIG_JSON: &str = include_str!("../assets/default/config.json");
/// `assets/default/model.safetensors` (bf16 matrices; A_log, D, norms, routers, conv in f32)
pub const WEIGHTS: &[u8] = include_bytes!("../assets/default/model.safetensors");
/// `assets/default/tokenizer.json` (byte-level BPE, 8,192 ids, id 0 = end of text)
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../assets/default/tokenizer.json");

/// The embedded model on `device`, its matrices in `dtype`, and its tokenizer.
pub fn load(device: &Device, dtype: DType) -> Result<(Model, Tokenizer)> {
    let cfg = Config::from_json_str(CONFIG_JSON)?;
    let bad = |e: safetensors::SafeTensorError| Error::Invalid(format!("embedded weights are corrupt ({e}); rebuild the binary"));
    let st = safetensors::SafeTensors::deserialize(WEIGHTS).map_err(bad)?;
    let index: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
    check_index(&cfg, &index)?;
    let mut raw: HashMap<String, Tensor> = HashMap::new();
    for (name, view) in st.tensors() {
        raw.insert(name, candle_core::safetensors::Load::load(&view, device)?);
    }
    let model = Model::from_tensors(&cfg, check_and_convert(&cfg, raw, dtype)?, dtype, device)?;
    let tok = Tokenizer::from_bytes(TOKENIZER_JSON).map_err(|e| Error::Tokenizer(format!("embedded tokenizer: {e}")))?;
    Ok((model, tok))
}
