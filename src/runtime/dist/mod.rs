//! Data-parallel training: one process per device, each with a copy of the model, a shard of
//! every global batch and the gradients summed across processes before the optimiser step.
//!
//! * [`DistEnv`]: who this process is (rank, world size, local rank) and where rank 0 listens,
//!   from the variables torchrun, Slurm (`srun`) and Open MPI (`mpirun`) set (read at the edge,
//!   `commands::environment::dist_env`, and handed down as this value);
//! * [`Collective`]: the operations training needs (sum of f32 / f64 buffers across ranks,
//!   broadcast from rank 0, barrier); [`tcp::TcpGroup`] implements them over TCP through rank 0,
//!   summing in rank order, so a run is bit-identical from run to run. It is the CPU backend (and
//!   what the GPU path uses until the NCCL backend lands): every rank sends its buffer to rank 0,
//!   which sums and sends the result back.
//!
//! A rank that dies closes its connections: the others fail their next collective within the
//! read timeout with an error naming the rank, instead of hanging.

pub mod tcp;

use std::time::Duration;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// This process's place in a distributed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// 0-based rank in the whole run (`RANK`, `SLURM_PROCID`, `OMPI_COMM_WORLD_RANK`).
    pub rank: usize,
    /// Processes in the run (`WORLD_SIZE`, `SLURM_NTASKS`, `OMPI_COMM_WORLD_SIZE`).
    pub world_size: usize,
    /// Rank on this host: the GPU it uses (`LOCAL_RANK`, `SLURM_LOCALID`,
    /// `OMPI_COMM_WORLD_LOCAL_RANK`; default 0).
    pub local_rank: usize,
    /// Where rank 0 listens for the rendezvous (`MASTER_ADDR`, default 127.0.0.1).
    pub master_addr: String,
    /// (`MASTER_PORT`, default 29500 as torchrun's).
    pub master_port: u16,
}

/// The variable names of each launcher, most specific first: (rank, world size, local rank).
const LAUNCHERS: [(&str, &str, &str); 3] = [
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
];

impl DistEnv {
    /// Reads the run's place from `get` (a variable's value by name): the first launcher's set of
    /// names that has a rank wins; `MASTER_ADDR` and `MASTER_PORT` as torchrun names them. Every
    /// bad value is a one-line error naming the variable.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |name: &str| -> Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| Error::Invalid(format!("--distributed: {name}={v:?} is not a non-negative integer")))
                })
                .transpose()
        };
        let mut found = None;
        for (r, w, l) in LAUNCHERS {
            if let Some(rank) = num(r)? {
                let world = num(w)?.ok_or_else(|| Error::Invalid(format!("--distributed: {r} is set but {w} is not")))?;
                found = Some((rank, world, num(l)?.unwrap_or(0), r, w));
                break;
            }
        }
        let Some((rank, world_size, local_rank, rn, wn)) = found else {
            return Err(Error::Invalid(
                "--distributed: no rank in the environment (RANK/WORLD_SIZE as torchrun sets them, or Slurm's or Open MPI's); start the ranks with `blackmamba launch --gpus N -- finetune ...`".into(),
            ));
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Invalid(format!("--distributed: {rn}={rank} is not below {wn}={world_size}")));
        }
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| Error::Invalid(format!("--distributed: MASTER_PORT={p:?} is not a port number (1-65535)")))?,
            None => 29500,
        };
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }

    /// A run of one process (no rendezvous).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }
}

/// How long collectives wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For every rank to reach rank 0 at the start.
    pub connect: Duration,
    /// For one collective: longer than the slowest rank's step (and rank 0's held-out eval).
    pub op: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(120),
            op: Duration::from_secs(600),
        }
    }
}

/// The collective operations of data-parallel training. Every rank calls the same operations in
/// the same order with buffers of the same length.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` by the element-wise sum of every rank's `buf` (summed in rank order).
    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_f32`] for f64 values (losses, counts).
    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's `bytes` on every rank (others' arguments are ignored).
    fn broadcast(&mut self, bytes: &[u8]) -> Result<Vec<u8>>;
}

/// The collective of a run of one process: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&mut self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
}

/// Errors unless every rank passes the same `value` (e.g. the data's hash): names the first rank
/// that differs from rank 0 and what it has.
pub fn check_same(group: &mut dyn Collective, what: &str, value: &str) -> Result<()> {
    let ours = value.as_bytes();
    let root = group.broadcast(ours)?;
    // every rank says whether it matches; the sum of mismatch flags per rank tells who differs
    let mut bad = vec![0f64; group.world_size()];
    if root != ours {
        bad[group.rank()] = 1.0;
    }
    group.all_reduce_f64(&mut bad)?;
    if let Some(r) = bad.iter().position(|&b| b > 0.0) {
        let root = String::from_utf8_lossy(&root);
        return Err(Error::Invalid(format!(
            "--distributed: rank {r} has another {what} than rank 0 ({root}); every rank must see the same files and options"
        )));
    }
    Ok(())
}

/// The element-wise sums of every rank's `grads` (one reduction over all of them, in f32),
/// back in each tensor's shape, dtype and device.
pub fn all_reduce_tensors(group: &mut dyn Collective, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let mut flat: Vec<f32> = Vec::new();
    for g in &grads {
        flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    group.all_reduce_f32(&mut flat)?;
    let mut off = 0;
    grads
        .iter()
        .map(|g| {
            let n = g.elem_count();
            let t = Tensor::from_slice(&flat[off..off + n], g.shape(), g.device())?.to_dtype(g.dtype())?;
            off += n;
            Ok(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn torchrun_slurm_and_mpi_names() {
        let e = DistEnv::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (3, 8, 1, 1234));
        assert_eq!(e.master_addr, "127.0.0.1");
        let e = DistEnv::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("MASTER_ADDR", "node7"),
        ]))
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_addr.as_str()), (5, 16, 5, "node7"));
        let e = DistEnv::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")])).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (0, 2, 0, 29500));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = |p: &[(&str, &str)]| DistEnv::from_vars(vars(p)).unwrap_err().to_string();
        assert!(err(&[]).contains("blackmamba launch"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("not below WORLD_SIZE=2"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")]).contains("MASTER_PORT"));
    }
}
