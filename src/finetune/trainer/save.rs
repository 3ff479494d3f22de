//! Writing a run's checkpoint: the trained tensors, the optimiser's moments, `adapter.json` and
//! `trainer_state.json` (and, for a full fine-tune, `config.json` and `tokenizer.json`), all
//! renamed into place together ([`checkpoint::write`]).

use std::collections::HashMap;

use candle_core::Tensor;

use super::Trainer;
use crate::error::{Error, Result};
use crate::finetune::adapter::{AdapterMeta, ADAPTER_FILE, FORMAT as ADAPTER_FORMAT, META_FILE, MODEL_FILE};
use crate::finetune::checkpoint::{self, to_json, CheckpointFiles, TrainerState, OPTIMIZER_FILE, STATE_FILE};
use crate::finetune::Method;

impl Trainer {
    /// Writes the checkpoint into `cfg.out` (atomically; see [`checkpoint`]).
    pub fn save(&mut self) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::Invalid(format!("not saving: {why}")));
        }
        if self.group.rank() != 0 {
            // rank 0 writes the run's one checkpoint
            self.last_saved = Some(self.step);
            return Ok(());
        }
        let weights: HashMap<String, Tensor> = self.params.iter().map(|p| (p.name.clone(), p.var.as_tensor().detach())).collect();
        let names: Vec<String> = self.params.iter().map(|p| p.name.clone()).collect();
        let full = self.cfg.method == Method::Full;
        let weights_file = if full { MODEL_FILE } else { ADAPTER_FILE };
        let meta = AdapterMeta {
            format: ADAPTER_FORMAT.into(),
            method: self.cfg.method,
            base_model: self.cfg.base_model.clone(),
            base_config: self.model.cfg.clone(),
            targets: if self.cfg.method == Method::Lora {
                self.cfg.targets.clone()
            } else {
                vec![]
            },
            rank: self.cfg.rank,
            alpha: self.cfg.alpha,
            train_router: self.cfg.train_router || self.cfg.method == Method::Router,
            step: self.step,
            data_hash: self.data_hash.clone(),
            weights: weights_file.into(),
        };
        let state = TrainerState {
            format: checkpoint::FORMAT.into(),
            step: self.step,
            cursor: self.batcher.cursor,
            adam_t: self.opt.t,
            data_hash: self.data_hash.clone(),
            params: names.clone(),
            config: self.cfg.clone(),
            last_loss: self.last_loss,
        };
        let mut blobs = Vec::new();
        if full {
            blobs.push(("config.json".to_string(), self.model.cfg.to_json_string()?.into_bytes()));
            let tok = self.tok.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            blobs.push(("tokenizer.json".to_string(), tok.into_bytes()));
        }
        blobs.push((META_FILE.to_string(), to_json(&meta)?));
        blobs.push((STATE_FILE.to_string(), to_json(&state)?));
        let files = CheckpointFiles {
            tensors: vec![
                (weights_file.to_string(), weights),
                (
                    OPTIMIZER_FILE.to_string(),
                    checkpoint::optimizer_tensors(&names, &self.opt.moments, self.step)?,
                ),
            ],
            blobs,
        };
        checkpoint::write(&self.cfg.out, files)?;
        self.last_saved = Some(self.step);
        Ok(())
    }
}
