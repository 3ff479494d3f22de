//! `blackmamba bench --context`: decode speed against context length on the CPU, for the embedded
//! BlackMamba (constant state) and the tiny OLMoE fixture (a key/value cache growing with the
//! context), the sizes checked against the configs; bad lists refused with one line.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

const OLMOE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/olmoe-tiny");
const EMBEDDED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/default/config.json");

fn config(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bench(extra: &[&str]) -> serde_json::Value {
    let o = bm()
        .args(["bench", "--gen-len", "4", "--json", "--seed", "3"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn rows(rep: &serde_json::Value) -> Vec<(u64, u64, f64)> {
    rep["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["context"].as_u64().unwrap(),
                r["memory_bytes"].as_u64().unwrap(),
                r["tok_s"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The OLMoE fixture's key/value cache at `ctx` tokens, f32: keys and values of every layer.
fn olmoe_kv_bytes(ctx: u64) -> u64 {
    let c = config(&format!("{OLMOE}/config.json"));
    let n = |k: &str| c[k].as_u64().unwrap();
    let head_dim = n("hidden_size") / n("num_attention_heads");
    2 * n("num_hidden_layers") * n("num_key_value_heads") * head_dim * ctx * 4
}

#[test]
fn transformer_kv_cache_grows_with_the_context() {
    for fill in ["prefill", "synthetic"] {
        let rep = bench(&["--model", OLMOE, "--context", "16,64", "--context-fill", fill, "--fill-chunk", "10"]);
        assert_eq!(rep["family"], "olmoe");
        assert_eq!(rep["memory"], "kv-cache");
        let r = rows(&rep);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [16, 64], "{rep}");
        for &(ctx, bytes, tok_s) in &r {
            assert_eq!(bytes, olmoe_kv_bytes(ctx), "{fill} fill at {ctx}: {rep}");
            assert!(tok_s > 0.0, "{rep}");
        }
        assert_eq!(r[1].1, 4 * r[0].1, "linear in the context: {rep}");
    }
}

#[test]
fn blackmamba_state_is_constant_and_the_plot_is_written() {
    let c = config(EMBEDDED_CONFIG);
    let n = |k: &str| c[k].as_u64().unwrap();
    let mamba = c["mamba_moe_layers"].as_array().unwrap().iter().filter(|x| *x == "r").count() as u64;
    // per Mamba layer: conv window and SSM state over d_inner channels, f32
    let want = mamba * n("expansion_factor") * n("hidden_size") * (n("conv_dimension") + n("state_size")) * 4;
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("ctx.png");
    let rep = bench(&[
        "--context",
        "16,64,1k",
        "--context-fill",
        "synthetic",
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert_eq!(rep["family"], "blackmamba");
    assert_eq!(rep["memory"], "state");
    let r = rows(&rep);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [16, 64, 1024], "{rep}");
    assert!(
        r.iter().all(|x| x.1 == want && x.2 > 0.0),
        "want {want} state bytes at every context: {rep}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // a real prefill gives the same state size, and the plot takes the earlier report as a second line
    let json = dir.path().join("bm.json");
    std::fs::write(&json, serde_json::to_string(&rep).unwrap()).unwrap();
    let png2 = dir.path().join("both.png");
    let rep2 = bench(&[
        "--context",
        "16",
        "--plot",
        png2.to_str().unwrap(),
        "--plot-with",
        json.to_str().unwrap(),
    ]);
    assert_eq!(rows(&rep2)[0].1, want);
    assert!(png2.is_file());
}

#[test]
fn bad_context_lists_give_one_line_errors() {
    for (model, list, needle) in [
        (None, "0", "--context 0"),
        (None, "abc", "--context 'abc'"),
        (None, "16,,64", "--context ''"),
        (Some(OLMOE), "16,2048", "--context 2048"),
    ] {
        let mut cmd = bm();
        cmd.args(["bench", "--gen-len", "4", "--context", list]);
        if let Some(m) = model {
            cmd.args(["--model", m]);
        }
        let o = cmd.output().unwrap();
        assert!(!o.status.success(), "{list} accepted");
        let err = String::from_utf8(o.stderr).unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{list}: {err}");
        assert!(lines[0].contains(needle), "{list}: {err}");
    }
}
