//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685):
//! which linears of the model are targets, their checkpoint names, and adapters on and off them.
//!
//! An adapter on W (out, in) adds scale · B·A with A (rank, in), B (out, rank), scale = alpha/rank;
//! A starts kaiming-uniform, B at zero, so a fresh adapter leaves the model unchanged.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::linear::{Linear, Lora};
use crate::model::{Mixer, Model};
use crate::rng::Rng;

/// A family of linears that can carry adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    InProj,
    XProj,
    DtProj,
    OutProj,
    /// fc1 and fc2 of every expert (and of dense MLP layers).
    Experts,
}

impl Target {
    pub const ALL: [Target; 5] = [Self::InProj, Self::XProj, Self::DtProj, Self::OutProj, Self::Experts];

    pub fn name(self) -> &'static str {
        match self {
            Self::InProj => "in_proj",
            Self::XProj => "x_proj",
            Self::DtProj => "dt_proj",
            Self::OutProj => "out_proj",
            Self::Experts => "experts",
        }
    }

    /// Parses one name of `--targets`.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s.trim()).ok_or_else(|| {
            Error::Invalid(format!(
                "--targets: unknown target '{s}'; use in_proj, x_proj, dt_proj, out_proj, experts or all"
            ))
        })
    }

    /// Parses a comma-separated list (`all` = every target).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        if s.trim() == "all" {
            return Ok(Self::ALL.to_vec());
        }
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let t = Self::parse(part)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// What a linear of the model is, for adapters and the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    Target(Target),
    Router,
}

/// Visits every linear with its checkpoint prefix (e.g. `decoder.layers.0.mixer.in_proj`).
pub fn visit_named_linears(model: &mut Model, f: &mut dyn FnMut(&str, LinearKind, &mut Linear) -> Result<()>) -> Result<()> {
    use LinearKind::Target as T;
    for (i, b) in model.layers.iter_mut().enumerate() {
        let p = format!("decoder.layers.{i}.mixer");
        match &mut b.mixer {
            Mixer::Mamba(m) => {
                f(&format!("{p}.in_proj"), T(Target::InProj), &mut m.in_proj)?;
                f(&format!("{p}.x_proj"), T(Target::XProj), &mut m.x_proj)?;
                f(&format!("{p}.dt_proj"), T(Target::DtProj), &mut m.dt_proj)?;
                f(&format!("{p}.out_proj"), T(Target::OutProj), &mut m.out_proj)?;
            }
            Mixer::Moe(m) => {
                f(&format!("{p}.router"), LinearKind::Router, &mut m.router)?;
                for (e, x) in m.experts.iter_mut().enumerate() {
                    f(&format!("{p}.local_experts.{e}.linear_fc1"), T(Target::Experts), &mut x.fc1)?;
                    f(&format!("{p}.local_experts.{e}.linear_fc2"), T(Target::Experts), &mut x.fc2)?;
                }
            }
            Mixer::Dense(m) => {
                f(&format!("{p}.linear_fc1"), T(Target::Experts), &mut m.fc1)?;
                f(&format!("{p}.linear_fc2"), T(Target::Experts), &mut m.fc2)?;
            }
        }
    }
    Ok(())
}

/// Fresh adapter tensors for a (out, in) linear: A kaiming-uniform (bound 1/√in), B zero; f32.
pub fn init_adapter(out: usize, inp: usize, rank: usize, rng: &mut Rng, device: &Device) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (inp as f64).sqrt();
    let a: Vec<f32> = (0..rank * inp).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
    let a = Tensor::from_vec(a, (rank, inp), device)?; // (rank, in)
    let b = Tensor::zeros((out, rank), DType::F32, device)?; // (out, rank)
    Ok((a, b))
}

/// Folds every adapter of the model into its weight (W ← W + scale·B·A) and drops it.
pub fn merge_all(model: &mut Model) -> Result<()> {
    model.visit_linears_mut(&mut |l| {
        if l.lora.is_some() {
            l.weight = l.merged_weight()?;
            l.lora = None;
        }
        Ok(())
    })
}

/// Attaches an adapter; `a` (rank, in) and `b` (out, rank) are checked against the weight.
pub fn attach(name: &str, l: &mut Linear, a: Tensor, b: Tensor, scale: f64) -> Result<()> {
    let (out, inp) = l.weight.dims2()?;
    let (ra, ia) = a.dims2()?;
    let (ob, rb) = b.dims2()?;
    if ia != inp || ob != out || ra != rb {
        return Err(Error::Invalid(format!(
            "adapter for '{name}' has A {:?} and B {:?}, which do not fit its weight ({out}, {inp}); was it trained on another model?",
            a.dims(),
            b.dims()
        )));
    }
    l.lora = Some(Lora { a, b, scale });
    Ok(())
}
