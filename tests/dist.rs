#![allow(clippy::unwrap_used)]
//! Data-parallel training on the CPU (issue 20): the TCP collectives, a rank that dies, and
//! training: two ranks with batch b follow one process with batch 2b; a run is bit-identical from
//! run to run; rank 0 alone writes; `blackmamba launch` runs real ranks and stops them all when
//! one dies.

mod ft_common;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blackmamba::finetune::{Method, Trainer};
use blackmamba::runtime::dist::tcp::TcpGroup;
use blackmamba::runtime::dist::{check_same, Collective, DistEnv, Timeouts};
use ft_common::{byte_tokenizer, config, model, run_config, write};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world_size: world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn quick() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(30),
        op: Duration::from_secs(30),
    }
}

/// Runs `f(rank, group)` on `world` threads joined into one group; the results by rank.
fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(usize, TcpGroup) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || f(r, TcpGroup::join(&env(r, world, port), quick()).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn sums_broadcasts_and_checks_across_three_ranks() {
    let out = on_ranks(3, |r, mut g| {
        assert_eq!((g.rank(), g.world_size()), (r, 3));
        let mut a = vec![r as f32, 1.0, 0.5 * r as f32];
        g.all_reduce_f32(&mut a).unwrap();
        let mut b = [1e-12 * (r + 1) as f64];
        g.all_reduce_f64(&mut b).unwrap();
        let root = g.broadcast(format!("from {r}").as_bytes()).unwrap();
        check_same(&mut g, "value", "same").unwrap();
        let differs = check_same(&mut g, "data", if r == 2 { "b" } else { "a" }).unwrap_err().to_string();
        (a, b[0], root, differs)
    });
    for (a, b, root, differs) in out {
        assert_eq!(a, vec![3.0, 3.0, 1.5]);
        assert!((b - 6e-12).abs() < 1e-24);
        assert_eq!(root, b"from 0");
        assert!(differs.contains("rank 2 has another data than rank 0"), "{differs}");
    }
}

#[test]
fn a_rank_that_dies_is_named_and_the_others_stop() {
    let (tx, rx) = mpsc::channel();
    let out = on_ranks(3, move |r, mut g| {
        if r == 2 {
            // joined, then gone (as a killed process: its sockets close)
            drop(g);
            return String::new();
        }
        let t0 = Instant::now();
        let mut a = [1.0f32];
        let e = match g.all_reduce_f32(&mut a) {
            Ok(()) => g.all_reduce_f32(&mut a).unwrap_err(),
            Err(e) => e,
        };
        tx.send(t0.elapsed()).unwrap();
        e.to_string()
    });
    assert!(out[0].contains("rank 2 closed its connection"), "{}", out[0]);
    assert!(out[1].contains("rank 0"), "rank 1 learns that rank 0 stopped: {}", out[1]);
    for d in rx.try_iter() {
        assert!(d < Duration::from_secs(10), "the others stopped within seconds, not {d:?}");
    }
}

#[test]
fn a_wrong_world_size_or_no_rank_0_is_a_clear_error() {
    let port = free_port();
    let short = Timeouts {
        connect: Duration::from_secs(1),
        op: Duration::from_secs(5),
    };
    let e = TcpGroup::join(&env(1, 2, port), short).err().unwrap().to_string();
    assert!(
        e.contains("rank 1 cannot reach rank 0 at 127.0.0.1") && e.contains("within 1 s"),
        "{e}"
    );
    let e = TcpGroup::join(&env(0, 2, port), short).err().unwrap().to_string();
    assert!(e.contains("ranks 1 did not join rank 0"), "{e}");
}

/// Trains `steps` steps as `world` ranks (threads) with `batch` sequences each; rank 0's loss
/// curve and final trainable tensors.
fn train(dir: &Path, out: &str, layers: &'static [&'static str], world: usize, batch: usize, steps: usize) -> (Vec<f64>, Vec<Vec<f32>>) {
    let data = write(dir, "chat.jsonl", &ft_common::chat_jsonl());
    let out = dir.join(out);
    let results = on_ranks(world, move |_, g| {
        let base = model(&config(layers, 16), 7, true);
        let mut cfg = run_config(data.clone(), out.clone(), Method::Lora, steps);
        cfg.batch = batch;
        cfg.eval_fraction = 0.0;
        cfg.train_router = true;
        let mut t = Trainer::new_in(&base, &byte_tokenizer(), cfg, Box::new(g)).unwrap();
        let losses: Vec<f64> = (0..steps).map(|_| t.step().unwrap().loss).collect();
        t.save().unwrap();
        let m = t.model().unwrap();
        // the model as trained (the adapter merged in)
        let w: Vec<Vec<f32>> = m
            .named_tensors()
            .unwrap()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (losses, w)
    });
    results.into_iter().next().unwrap()
}

#[test]
fn two_ranks_follow_one_process_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    // dense layers: no Sinkhorn balancing over a micro-batch, so the two runs compute the same
    // sums in another order
    const DENSE: &[&str] = &["r", "1", "r", "1"];
    let (one, w1) = train(dir.path(), "one", DENSE, 1, 4, 4);
    let (two, w2) = train(dir.path(), "two", DENSE, 2, 2, 4);
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "losses {one:?} vs {two:?}");
    }
    assert_eq!(w1.len(), w2.len());
    for (a, b) in w1.iter().zip(&w2) {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "trained tensors differ by {d}");
    }
    // rank 0 alone wrote the checkpoint and the metrics
    assert!(dir.path().join("two/adapter.safetensors").is_file());
    let lines = std::fs::read_to_string(dir.path().join("two/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "one metrics line a step, from rank 0 only:\n{lines}");
}

#[test]
fn a_data_parallel_run_is_bit_identical_from_run_to_run() {
    let dir = tempfile::tempdir().unwrap();
    const MOE: &[&str] = &["r", "4", "r", "4"];
    let a = train(dir.path(), "a", MOE, 2, 2, 3);
    let b = train(dir.path(), "b", MOE, 2, 2, 3);
    assert_eq!(a, b);
}

/// A tiny model folder with the byte tokenizer, and the chat data beside it.
fn model_and_data(dir: &Path) -> (String, String) {
    let m = model(&config(&["r", "4", "r", "4"], 16), 1, true);
    let d = dir.join("base");
    m.save_dir(&d, candle_core::DType::F32).unwrap();
    byte_tokenizer().save(d.join("tokenizer.json"), false).unwrap();
    let data = write(dir, "chat.jsonl", &ft_common::chat_jsonl());
    (d.display().to_string(), data.display().to_string())
}

fn launch(dir: &Path, steps: &str) -> std::process::Command {
    let (base, data) = model_and_data(dir);
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_blackmamba"));
    c.args([
        "launch", "--gpus", "2", "--", "finetune", "--device", "cpu", "--model", &base, "--data", &data,
    ])
    .args(["--seq-len", "32", "--batch", "2", "--steps", steps, "--out"])
    .arg(dir.join("out"))
    .env_remove("RANK")
    .env_remove("WORLD_SIZE");
    c
}

#[test]
fn launch_runs_two_ranks_and_rank_0_saves() {
    let dir = tempfile::tempdir().unwrap();
    let out = launch(dir.path(), "3").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ranks 0..1 of 2 started"), "{err}");
    // rank 0 reports, once
    assert_eq!(err.matches("eval before").count(), 1, "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 3);
}

#[test]
fn launch_stops_every_rank_when_one_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = launch(dir.path(), "100000").stderr(std::process::Stdio::piped()).spawn().unwrap();
    // wait for training to run (rank 0 writes metrics), then kill rank 1 the hard way
    wait_for_training(dir.path());
    let rank1 = ranks_of(child.id()).into_iter().find(|(_, r)| *r == 1).map(|(pid, _)| pid).unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status()
        .unwrap()
        .success());
    let (status, err) = exit_of(&mut child, 30, "the run did not stop after rank 1 died");
    assert!(!status.success());
    assert!(err.contains("rank 1 failed (killed by signal 9)"), "{err}");
    assert!(ranks_of(child.id()).is_empty(), "no rank is left running");
}

/// Waits until rank 0 has written two metrics lines under `dir/out` (training runs).
fn wait_for_training(dir: &Path) {
    let metrics = dir.join("out/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The launcher's exit status and all it wrote to stderr; fails with `what` after `secs`.
fn exit_of(child: &mut std::process::Child, secs: u64, what: &str) -> (std::process::ExitStatus, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

/// The launcher's children with their RANK (from /proc).
fn ranks_of(parent: u32) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // the parent pid is the 2nd field after the ")" that closes the command name
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) || stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("Z") {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("RANK=").and_then(|r| r.parse().ok()));
        if let Some(r) = rank {
            out.push((pid, r));
        }
    }
    out
}

#[test]
fn sigterm_to_the_launcher_saves_the_run_once_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = launch(dir.path(), "100000").stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for_training(dir.path());
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let (status, err) = exit_of(&mut child, 60, "the run did not stop after SIGTERM");
    assert_eq!(status.code(), Some(143), "{err}");
    // every rank stopped after the same step; rank 0 saved it
    assert_eq!(err.matches("checkpoint saved to").count(), 1, "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/trainer_state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!((2..100000).contains(&step), "saved at step {step}");
    assert!(ranks_of(child.id()).is_empty());
}
