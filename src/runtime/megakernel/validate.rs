//! Checks a [`Schedule`] before any kernel runs it: the buffers each instruction reads and
//! writes, static checks (counters' producers against their waiters' targets, no two tiles
//! writing the same rows, nothing read that nobody writes), and simulations of all SMs running
//! their lists under deterministic-random interleavings that must never deadlock and never let
//! a tile read a range before every other tile writing it has finished.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::config::{Config, LayerKind};
use crate::rng::Rng;

use super::isa::{Instr, OpKind, MAX_WAITS};
use super::schedule::Schedule;

/// A buffer in the kernel's global memory (f32 elements; per layer, so nothing is reused
/// within a token and no tile overwrites what another still has to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// (d) the residual entering layer l; `Res(0)` is the token's embedding row (an input).
    Res(u32),
    /// (dt_rank + 2N) the x_proj sums of Mamba layer l.
    Xdbc(u32),
    /// (d_inner) v = SiLU(conv) of Mamba layer l.
    V(u32),
    /// (d_inner) the gate half z of in_proj of Mamba layer l.
    Z(u32),
    /// (d_inner · K) the conv window of Mamba layer l (carried across tokens: an input).
    Conv(u32),
    /// (d_inner · N) the SSM state of Mamba layer l (carried across tokens: an input).
    Ssm(u32),
    /// (1 + E) the chosen expert and the router's sigmoid probabilities of MoE layer l.
    Route(u32),
    /// (vocab) the logits.
    Logits,
}

impl Buf {
    /// Whether the buffer holds values from before the token (no writer needed for a read).
    pub fn is_input(self) -> bool {
        matches!(self, Self::Res(0) | Self::Conv(_) | Self::Ssm(_))
    }
}

/// How an instruction touches a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    /// Plain stores: no other tile may write the same elements.
    Write,
    /// Atomic adds (split-K partial sums): many tiles, any order.
    Add,
}

/// One range of one buffer an instruction touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub buf: Buf,
    pub start: usize,
    pub end: usize,
    pub mode: Mode,
}

/// The ranges `i` reads and writes (what the CPU interpreter and the kernel touch).
pub fn accesses(cfg: &Config, i: &Instr) -> Vec<Access> {
    let (d, n, k) = (cfg.hidden_size, cfg.state_size, cfg.conv_dimension);
    let (a, e) = (i.rows.0 as usize, i.rows.1 as usize);
    let l = i.layer;
    let acc = |buf, start, end, mode| Access { buf, start, end, mode };
    let mut out = Vec::new();
    match i.op {
        OpKind::MambaIn => {
            out.push(acc(Buf::Res(l), 0, d, Mode::Read));
            out.push(acc(Buf::Conv(l), a * k, e * k, Mode::Read));
            out.push(acc(Buf::Conv(l), a * k, e * k, Mode::Write));
            out.push(acc(Buf::V(l), a, e, Mode::Write));
            out.push(acc(Buf::Z(l), a, e, Mode::Write));
            out.push(acc(Buf::Xdbc(l), 0, cfg.x_proj_rows(), Mode::Add));
        }
        OpKind::MambaSsm => {
            out.push(acc(Buf::Xdbc(l), 0, cfg.x_proj_rows(), Mode::Read));
            out.push(acc(Buf::V(l), a, e, Mode::Read));
            out.push(acc(Buf::Z(l), a, e, Mode::Read));
            out.push(acc(Buf::Ssm(l), a * n, e * n, Mode::Read));
            out.push(acc(Buf::Ssm(l), a * n, e * n, Mode::Write));
            if i.tile == 0 {
                out.push(acc(Buf::Res(l), 0, d, Mode::Read));
            }
            out.push(acc(Buf::Res(l + 1), 0, d, Mode::Add));
        }
        OpKind::MoeFfn | OpKind::DenseFfn => {
            out.push(acc(Buf::Res(l), 0, d, Mode::Read));
            if let (0, LayerKind::Moe { experts }) = (i.tile, cfg.layer_kind(l as usize)) {
                out.push(acc(Buf::Route(l), 0, 1 + experts, Mode::Write));
            }
            out.push(acc(Buf::Res(l + 1), 0, d, Mode::Add));
        }
        OpKind::Head => {
            out.push(acc(Buf::Res(l), 0, d, Mode::Read));
            out.push(acc(Buf::Logits, a, e, Mode::Write));
        }
    }
    out
}

/// A write or add of a range: start, end, mode, SM, index in its list.
type Writer = (usize, usize, Mode, usize, usize);

fn at(s: &Schedule, sm: usize, idx: usize) -> String {
    s.lists[sm]
        .get(idx)
        .map_or_else(|| format!("SM {sm} #{idx}"), |i| format!("SM {sm} #{idx} {}", i.describe()))
}

/// The static checks: counters, waits, writes, reads of unwritten ranges.
pub fn check_static(s: &Schedule) -> Result<()> {
    let bad = |why: String| Err(Error::Invalid(format!("megakernel schedule: {why}")));
    let mut producers = vec![0u32; s.counters.len()];
    for (sm, list) in s.lists.iter().enumerate() {
        for (idx, i) in list.iter().enumerate() {
            if i.waits.len() > MAX_WAITS {
                return bad(format!("{} has {} waits; at most {MAX_WAITS}", at(s, sm, idx), i.waits.len()));
            }
            match producers.get_mut(i.signal as usize) {
                Some(p) => *p += 1,
                None => return bad(format!("{} signals {}", at(s, sm, idx), s.counter_name(i.signal))),
            }
        }
    }
    for (c, (counter, &p)) in s.counters.iter().zip(&producers).enumerate() {
        if counter.target != p {
            return bad(format!(
                "{} expects {} signals per token but {p} instructions signal it (a producer missing or extra?)",
                s.counter_name(c as u32),
                counter.target
            ));
        }
    }
    for (sm, list) in s.lists.iter().enumerate() {
        for (idx, i) in list.iter().enumerate() {
            for w in &i.waits {
                let p = producers.get(w.counter as usize).copied();
                if p != Some(w.target) || w.target == 0 {
                    return bad(format!(
                        "{} waits for {} signals on {} but {} instructions signal it per token",
                        at(s, sm, idx),
                        w.target,
                        s.counter_name(w.counter),
                        p.unwrap_or(0)
                    ));
                }
            }
        }
    }
    // writes: plain stores never overlap; every read of a non-input range is written by someone
    let mut writes: HashMap<Buf, Vec<Writer>> = HashMap::new();
    for (sm, list) in s.lists.iter().enumerate() {
        for (idx, i) in list.iter().enumerate() {
            for a in accesses(&s.cfg, i).into_iter().filter(|a| a.mode != Mode::Read) {
                writes.entry(a.buf).or_default().push((a.start, a.end, a.mode, sm, idx));
            }
        }
    }
    for (buf, w) in writes.iter_mut() {
        w.sort_unstable_by_key(|&(a, e, _, sm, idx)| (a, e, sm, idx));
        for (k, &(_, e0, m0, s0, i0)) in w.iter().enumerate() {
            for &(a1, e1, m1, s1, i1) in w[k + 1..].iter().take_while(|x| x.0 < e0) {
                if (m0 == Mode::Write || m1 == Mode::Write) && (s0, i0) != (s1, i1) {
                    return bad(format!(
                        "{} and {} both write {buf:?}[{a1}..{})",
                        at(s, s0, i0),
                        at(s, s1, i1),
                        e0.min(e1)
                    ));
                }
            }
        }
    }
    for (sm, list) in s.lists.iter().enumerate() {
        for (idx, i) in list.iter().enumerate() {
            for a in accesses(&s.cfg, i)
                .into_iter()
                .filter(|a| a.mode == Mode::Read && !a.buf.is_input())
            {
                let mut covered = a.start;
                for &(ws, we, ..) in writes.get(&a.buf).map_or(&[][..], Vec::as_slice) {
                    if ws <= covered && we > covered {
                        covered = we;
                    }
                }
                if covered < a.end {
                    return bad(format!(
                        "{} reads {:?}[{covered}..{}) which no instruction writes",
                        at(s, sm, idx),
                        a.buf,
                        a.end
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs every SM's list once (token number `epoch`, from 0) in an interleaving drawn from
/// `seed`: at each step one SM whose next instruction's waits are met runs it whole, then adds 1
/// to its counter. `count` holds the counters, monotonic across tokens as the kernel's: a wait
/// for `target` signals per token is met at `target · (epoch + 1)`. `exec` sees each instruction
/// as it runs. An error if no SM can proceed before all are done (a deadlock).
pub fn interleave(
    s: &Schedule,
    seed: u64,
    count: &mut [u64],
    epoch: u64,
    mut exec: impl FnMut(usize, usize, &Instr) -> Result<()>,
) -> Result<()> {
    if count.len() != s.counters.len() {
        return Err(Error::Invalid(format!(
            "megakernel: {} counters given for a schedule of {}",
            count.len(),
            s.counters.len()
        )));
    }
    let need = |w: &super::isa::Wait| u64::from(w.target) * (epoch + 1);
    let mut rng = Rng::new(seed);
    let mut pc = vec![0usize; s.lists.len()];
    let policy = seed % 3; // 0: uniform; 1: keep running the last SM; 2: favour the highest SM
    let mut last = 0usize;
    loop {
        let ready = |sm: usize| {
            s.lists[sm]
                .get(pc[sm])
                .is_some_and(|i| i.waits.iter().all(|w| count.get(w.counter as usize).is_some_and(|&c| c >= need(w))))
        };
        let runnable: Vec<usize> = (0..s.lists.len()).filter(|&sm| ready(sm)).collect();
        if runnable.is_empty() {
            if pc.iter().zip(&s.lists).all(|(&p, l)| p == l.len()) {
                return Ok(());
            }
            let blocked: Vec<String> = (0..s.lists.len())
                .filter_map(|sm| {
                    let i = s.lists[sm].get(pc[sm])?;
                    let w = i
                        .waits
                        .iter()
                        .find(|w| count.get(w.counter as usize).is_none_or(|&c| c < need(w)))?;
                    let have = count.get(w.counter as usize).copied().unwrap_or(0);
                    Some(format!(
                        "{} waits on {} at {have}/{}",
                        at(s, sm, pc[sm]),
                        s.counter_name(w.counter),
                        need(w)
                    ))
                })
                .take(4)
                .collect();
            return Err(Error::Invalid(format!(
                "megakernel schedule: deadlock (interleaving seed {seed}): no SM can proceed; {}",
                blocked.join("; ")
            )));
        }
        let pick = match policy {
            1 if runnable.contains(&last) && rng.uniform() < 0.9 => last,
            2 if rng.uniform() < 0.9 => runnable[runnable.len() - 1],
            _ => runnable[rng.below(runnable.len())],
        };
        let i = &s.lists[pick][pc[pick]];
        exec(pick, pc[pick], i)?;
        if let Some(c) = count.get_mut(i.signal as usize) {
            *c += 1;
        }
        pc[pick] += 1;
        last = pick;
    }
}

/// Simulates one interleaving, checking that every range an instruction reads was finished by
/// every other instruction that writes (or adds into) it.
pub fn simulate(s: &Schedule, seed: u64) -> Result<()> {
    let base: Vec<usize> = s
        .lists
        .iter()
        .scan(0, |acc, l| Some(std::mem::replace(acc, *acc + l.len())))
        .collect();
    let mut writers: HashMap<Buf, Vec<Writer>> = HashMap::new();
    for (sm, list) in s.lists.iter().enumerate() {
        for (idx, i) in list.iter().enumerate() {
            for a in accesses(&s.cfg, i).into_iter().filter(|a| a.mode != Mode::Read) {
                writers.entry(a.buf).or_default().push((a.start, a.end, a.mode, sm, idx));
            }
        }
    }
    let mut done = vec![false; base.last().map_or(0, |b| b + s.lists.last().map_or(0, Vec::len))];
    let mut count = vec![0u64; s.counters.len()];
    interleave(s, seed, &mut count, 0, |sm, idx, i| {
        let me = base[sm] + idx;
        for a in accesses(&s.cfg, i).into_iter().filter(|a| a.mode == Mode::Read) {
            for &(ws, we, _, wsm, widx) in writers.get(&a.buf).map_or(&[][..], Vec::as_slice) {
                let g = base[wsm] + widx;
                if g != me && ws < a.end && a.start < we && !done[g] {
                    return Err(Error::Invalid(format!(
                        "megakernel schedule: {} read {:?}[{}..{}) before {} finished writing it (interleaving seed {seed})",
                        at(s, sm, idx),
                        a.buf,
                        ws.max(a.start),
                        we.min(a.end),
                        at(s, wsm, widx)
                    )));
                }
            }
        }
        done[me] = true;
        Ok(())
    })
}

/// The static checks, then one simulation per seed.
pub fn validate(s: &Schedule, seeds: &[u64]) -> Result<()> {
    check_static(s)?;
    seeds.iter().try_for_each(|&seed| simulate(s, seed))
}
