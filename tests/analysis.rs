//! Routing analysis on tiny random models: streaming is exact, metrics stay in range, the trace,
//! the report (JSON = Markdown) and the figures come out right, and the CLI reports bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use blackmamba::analysis::collect::RouteTable;
use blackmamba::analysis::input::{Input, StreamOpts};
use blackmamba::analysis::report::{Report, ReportOpts, RunInfo};
use blackmamba::analysis::trace::{TokenRecord, TraceWriter};
use blackmamba::analysis::{self, markdown, metrics, plots, CollectOpts};
use blackmamba::model::Model;
use common::{random_ids, tiny_config, tiny_model};

const VOCAB: usize = 50304;
const TEXT: &str = "The cat sat on the mat. The dog sat on the log.\nA cat and a dog met.\n  The end of the story, the end of the day.\nThe cat slept; the dog barked at the cat.\n";

fn model(seed: u64) -> Model {
    tiny_model(&tiny_config(&["r", "4", "r", "8", "r", "4"], 16, VOCAB), seed)
}

fn opts(chunk: usize, reset_every: usize, window: usize) -> CollectOpts {
    CollectOpts {
        stream: StreamOpts {
            chunk,
            reset_every,
            max_tokens: 0,
        },
        window,
        max_iters: 200,
    }
}

fn no_progress(_: usize) {}

#[test]
fn chunked_streaming_is_exact_and_resets_split_sequences() {
    let m = model(1);
    let ids = random_ids(53, 1000, 7);
    let whole = analysis::routes_of(&m, &ids, opts(1000, 0, 8).stream, &mut no_progress).unwrap();
    let chunked = analysis::routes_of(&m, &ids, opts(7, 0, 8).stream, &mut no_progress).unwrap();
    assert_eq!(whole.n_tokens(), 53);
    assert_eq!(whole.routes, chunked.routes);
    assert_eq!(whole.layers, vec![1, 3, 5]);
    assert_eq!(whole.n_experts, vec![4, 8, 4]);

    // Resetting every 20 tokens = running each 20-token piece from a fresh state.
    let reset = analysis::routes_of(&m, &ids, opts(6, 20, 8).stream, &mut no_progress).unwrap();
    let mut pieces = RouteTable::default();
    for p in ids.chunks(20) {
        let rt = analysis::routes_of(&m, p, opts(1000, 0, 8).stream, &mut no_progress).unwrap();
        pieces.layers = rt.layers.clone();
        pieces.routes.resize(rt.routes.len(), Vec::new());
        for (a, b) in pieces.routes.iter_mut().zip(&rt.routes) {
            a.extend_from_slice(b);
        }
    }
    assert_eq!(reset.routes, pieces.routes);
    assert_ne!(reset.routes, whole.routes, "the state matters, so a reset must change some route");

    let capped = StreamOpts {
        chunk: 5,
        reset_every: 0,
        max_tokens: 11,
    };
    assert_eq!(analysis::routes_of(&m, &ids, capped, &mut no_progress).unwrap().n_tokens(), 11);
}

fn collect(m: &Model, o: CollectOpts) -> analysis::collect::Collected {
    let tok = blackmamba::tokenizer::neox().unwrap();
    analysis::collect(m, &tok, &Input::Prompt(TEXT.into()), o, &mut no_progress).unwrap()
}

#[test]
fn metrics_of_a_real_run_stay_in_range() {
    let m = model(2);
    let c = collect(&m, opts(16, 0, 16));
    let t = c.routes.n_tokens();
    let tok = blackmamba::tokenizer::neox().unwrap();
    assert_eq!(t, blackmamba::tokenizer::encode(&tok, TEXT).unwrap().len());
    let info = RunInfo {
        model: "tiny".into(),
        untrained: true,
        input: "text".into(),
        num_layers: 6,
        chunk: 16,
        reset_every: 0,
    };
    let r = Report::build(
        &info,
        &c,
        None,
        &tok,
        ReportOpts {
            top: 5,
            min_count: 2,
            seed: 3,
        },
    )
    .unwrap();
    for l in &r.layers {
        let e = l.balance.loads.len();
        assert_eq!(l.balance.loads.iter().sum::<u64>(), t as u64, "layer {}", l.layer);
        assert!(l.balance.entropy >= 0.0 && l.balance.entropy <= (e as f64).ln() + 1e-12);
        assert!((0.0..=1.0 + 1e-12).contains(&l.balance.norm_entropy));
        assert!(l.balance.busiest_share >= 1.0 / e as f64 - 1e-12 && l.balance.busiest_share <= 1.0);
        let s = l.stickiness.unwrap();
        assert!((0.0..=1.0).contains(&s));
        let d = l.determinism.share.unwrap();
        assert!((0.0..=1.0).contains(&d));
        for (g, &n) in l.mean_gate.iter().zip(&l.balance.loads) {
            assert!(if n > 0 { *g > 0.0 && *g < 1.0 } else { *g == 0.0 });
        }
    }
    for le in &r.experts {
        let total: u64 = le.experts.iter().map(|x| x.load).sum();
        assert_eq!(total, t as u64);
        for x in &le.experts {
            for tc in x.frequent.iter().chain(&x.overrepresented) {
                assert!(tc.pmi.is_finite(), "PMI of {} on e{}", tc.id, x.expert);
                assert!(tc.count <= tc.total && tc.count >= 1);
            }
            assert!(x.overrepresented.iter().all(|tc| tc.count >= 2));
        }
    }
    for co in &r.coactivation {
        assert_eq!(co.counts.iter().flatten().sum::<u64>(), t as u64);
        assert!(co.mutual_info >= 0.0 && (0.0..=1.0).contains(&co.nmi));
    }
    // Windows of 16 tokens: ⌈T/16⌉ windows (a last one of 1 token is skipped).
    for v in &r.sinkhorn.variants {
        for l in &v.layers {
            let full = (t / 16) as u64;
            let expect = full + u64::from(t % 16 >= 2);
            assert_eq!(l.windows, expect);
            assert_eq!(l.tokens, full * 16 + if t % 16 >= 2 { (t % 16) as u64 } else { 0 });
            assert!((0.0..=1.0).contains(&l.disagreement));
            assert!(l.mean_iters >= 1.0 && l.max_iters <= 200);
            assert!(l.first_trace.len() as u64 <= l.max_iters);
        }
    }
    assert_eq!(r.mamba.len(), 3);
    assert!(r.mamba.iter().all(|m| m.mean_ssm_norm > 0.0 && m.mean_delta > 0.0));
}

#[test]
fn report_json_and_markdown_agree() {
    let m = model(3);
    let c = collect(&m, opts(32, 0, 24));
    let other = analysis::routes_of(&model(4), &c.routes.ids, opts(32, 0, 24).stream, &mut no_progress).unwrap();
    let tok = blackmamba::tokenizer::neox().unwrap();
    let info = RunInfo {
        model: "tiny-a".into(),
        untrained: true,
        input: "text".into(),
        num_layers: 6,
        chunk: 32,
        reset_every: 0,
    };
    let mut r = Report::build(
        &info,
        &c,
        Some(("tiny-b", &other)),
        &tok,
        ReportOpts {
            top: 4,
            min_count: 2,
            seed: 0,
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = analysis::write_plots(&mut r, &c.routes, &tok, 40, dir.path()).unwrap();
    assert_eq!(written.len(), 5);
    r.write(dir.path()).unwrap();

    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    let back = Report::read_json(&dir.path().join("report.json")).unwrap();
    assert_eq!(markdown::render(&back), md, "report.md must be the rendering of report.json");
    // Spot checks: numbers from the JSON appear in the Markdown rows of their layer.
    for l in &back.layers {
        let row = md
            .lines()
            .find(|x| x.starts_with(&format!("| {} |", l.layer)) && x.contains(&format!("{:.3}", l.balance.cv)))
            .unwrap_or_else(|| panic!("no balance row for layer {}", l.layer));
        assert!(row.contains(&format!("{:.3}", l.balance.entropy)), "{row}");
        assert!(
            row.contains(&format!("e{} ({:.1}%)", l.balance.busiest, 100.0 * l.balance.busiest_share)),
            "{row}"
        );
    }
    let d = back.drift.as_ref().unwrap();
    for l in &d.layers {
        assert!(md.contains(&format!("| {} | {}/{} | {:.1}% |", l.layer, l.changed, l.tokens, 100.0 * l.share)));
    }
    for x in &back.experts[0].experts {
        if let Some(t) = x.frequent.first() {
            assert!(md.contains(&format!("`{}` {}", markdown::show_token(&t.text).replace('|', "\\|"), t.count)));
        }
    }
    for p in &written {
        assert!(md.contains(&format!("]({p})")), "figure {p} is linked");
    }
    assert!(md.contains("untrained random weights"));
}

#[test]
fn drift_is_zero_against_itself_and_layouts_must_match() {
    let m = model(5);
    let ids = random_ids(40, 500, 1);
    let so = opts(16, 0, 8).stream;
    let a = analysis::routes_of(&m, &ids, so, &mut no_progress).unwrap();
    let d = analysis::report::drift("same", &a, &a).unwrap();
    assert!(d.layers.iter().all(|l| l.changed == 0 && l.share == 0.0 && l.tokens == 40));
    let b = analysis::routes_of(&model(6), &ids, so, &mut no_progress).unwrap();
    let d = analysis::report::drift("other", &a, &b).unwrap();
    for (l, m) in d.layers.iter().zip(0..) {
        assert_eq!(l.changed, metrics::changed(&a.routes[m], &b.routes[m]));
    }
    assert!(d.layers.iter().any(|l| l.changed > 0));
    let other_layout = tiny_model(&tiny_config(&["r", "8", "r", "8"], 16, VOCAB), 1);
    let c = analysis::routes_of(&other_layout, &ids, so, &mut no_progress).unwrap();
    let err = analysis::report::drift("x", &a, &c).unwrap_err().to_string();
    assert!(err.contains("--compare") && err.contains("same layout"), "{err}");
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    // Something was drawn: not every pixel is white.
    assert!(buf[..info.buffer_size()].iter().any(|&b| b < 200), "{} is blank", path.display());
    (info.width, info.height)
}

#[test]
fn plots_decode_with_the_requested_size() {
    let m = model(7);
    let c = collect(&m, opts(64, 0, 32));
    let tok = blackmamba::tokenizer::neox().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<String> = c
        .routes
        .ids
        .iter()
        .map(|&i| blackmamba::tokenizer::decode(&tok, &[i]).unwrap())
        .collect();
    let p = dir.path().join("heat.png");
    plots::route_heatmap(&c.routes, 0, 30, Some(&labels), (640, 360), &p).unwrap();
    assert_eq!(png_size(&p), (640, 360));
    let p = dir.path().join("heat_long.png");
    plots::route_heatmap(&c.routes, 5, 1000, None, (900, 300), &p).unwrap();
    assert_eq!(png_size(&p), (900, 300));
    let r = analysis::report::layer_reports(&c.routes, 0);
    let layers: Vec<usize> = r.iter().map(|l| l.layer).collect();
    let bal: Vec<metrics::Balance> = r.iter().map(|l| l.balance.clone()).collect();
    let p = dir.path().join("bars.png");
    plots::load_bars(&layers, &bal, (500, 400), &p).unwrap();
    assert_eq!(png_size(&p), (500, 400));
    let p = dir.path().join("depth.png");
    plots::balance_by_depth(&layers, &bal, (800, 600), &p).unwrap();
    assert_eq!(png_size(&p), (800, 600));
    let series: Vec<plots::ConvergenceSeries> = c
        .sinkhorn
        .opts
        .iter()
        .zip(&c.sinkhorn.layers)
        .map(|(o, ls)| plots::ConvergenceSeries {
            variant: o.variant.name().into(),
            tol: o.tol,
            traces: ls.iter().map(|l| (l.layer, l.first_trace.clone())).collect(),
        })
        .collect();
    let p = dir.path().join("sk.png");
    plots::sinkhorn_convergence(&series, (1000, 700), &p).unwrap();
    assert_eq!(png_size(&p), (1000, 700));

    // Bad requests are errors, not panics.
    assert!(plots::route_heatmap(&c.routes, 10_000, 5, None, (640, 360), &p).is_err());
    assert!(plots::load_bars(&layers[..1], &bal, (500, 400), &p).is_err());
    let err = plots::load_bars(&layers, &bal, (10, 10), &p).unwrap_err().to_string();
    assert!(err.contains("plot size 10x10"), "{err}");
}

#[test]
fn trace_records_match_the_routes() {
    let m = model(8);
    let tok = blackmamba::tokenizer::neox().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = Input::Prompt(TEXT.into());
    let so = opts(13, 0, 8).stream;
    let rt = analysis::collect(&m, &tok, &input, opts(13, 0, 8), &mut no_progress)
        .unwrap()
        .routes;
    for format in [analysis::trace::Format::Jsonl, analysis::trace::Format::Csv] {
        let path = dir.path().join(format!("t.{format:?}"));
        let mut w = TraceWriter::create(&path, format).unwrap();
        analysis::input::run_input(&m, &tok, &input, so, &mut |c| w.write_chunk(c.start, c.ids, c.probe, &tok)).unwrap();
        assert_eq!(w.finish().unwrap(), rt.n_tokens());
        let text = std::fs::read_to_string(&path).unwrap();
        match format {
            analysis::trace::Format::Jsonl => {
                let recs: Vec<TokenRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
                assert_eq!(recs.len(), rt.n_tokens());
                for (t, r) in recs.iter().enumerate() {
                    assert_eq!((r.pos, r.id), (t, rt.ids[t]));
                    assert_eq!(r.moe.len(), 3);
                    assert_eq!(r.mamba.len(), 3);
                    for (m, e) in r.moe.iter().enumerate() {
                        assert_eq!(e.expert as u8, rt.routes[m][t]);
                        assert_eq!(e.logits.len(), rt.n_experts[m]);
                        let best = e.logits.iter().cloned().fold(f32::MIN, f32::max);
                        assert_eq!(e.logits[e.expert as usize], best);
                        assert!((e.prob - 1.0 / (1.0 + (-best).exp())).abs() < 1e-6);
                    }
                    assert!(r.mamba.iter().all(|x| x.ssm_norm > 0.0 && x.conv_norm > 0.0));
                }
            }
            analysis::trace::Format::Csv => {
                let header = text.lines().next().unwrap();
                let cols = header.split(',').count();
                // pos,id,text + (expert, prob, E logits) per MoE layer + 3 per Mamba layer
                assert_eq!(cols, 3 + (2 + 4) + (2 + 8) + (2 + 4) + 3 * 3);
                assert!(header.starts_with("pos,id,text,L1_expert,L1_prob,L1_logit0"));
                assert!(header.ends_with("L4_mean_delta"));
            }
        }
    }
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blackmamba")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn cli_analyze_and_trace_end_to_end_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, TEXT.repeat(3)).unwrap();
    let out = dir.path().join("rep");
    let (ok, err) = cli(&[
        "--model",
        "random:tiny",
        "analyze",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--plot",
        "--window",
        "32",
        "--compare",
        "random:tiny@1",
    ]);
    assert!(ok, "{err}");
    for f in ["report.md", "report.json"].iter().chain(analysis::PLOT_FILES.iter()) {
        assert!(out.join(f).is_file(), "{f} missing; stderr: {err}");
    }
    let trace = dir.path().join("t.csv");
    let (ok, err) = cli(&[
        "--model",
        "random:tiny",
        "trace",
        "--prompt",
        "Hello, world",
        "--out",
        trace.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let csv = std::fs::read_to_string(&trace).unwrap();
    let n = blackmamba::tokenizer::encode(&blackmamba::tokenizer::neox().unwrap(), "Hello, world")
        .unwrap()
        .len();
    assert_eq!(csv.lines().count(), 1 + n, "a header and one row per token");

    let (ok, err) = cli(&["--model", "random:tiny", "analyze", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--prompt TEXT or --input FILE"), "{err}");
    let missing = dir.path().join("nope.txt");
    let (ok, err) = cli(&[
        "--model",
        "random:tiny",
        "analyze",
        "--input",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("nope.txt"), "{err}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (ok, err) = cli(&[
        "--model",
        "random:tiny",
        "trace",
        "--input",
        empty.to_str().unwrap(),
        "--out",
        trace.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("no tokens"), "{err}");
    let (ok, err) = cli(&[
        "--model",
        "random:tiny",
        "analyze",
        "--prompt",
        "hi there",
        "--window",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--window 1"), "{err}");
}

#[test]
fn plots_of_one_layer_and_one_token_draw() {
    let rt = RouteTable {
        layers: vec![1],
        n_experts: vec![2],
        ids: vec![5],
        routes: vec![vec![1]],
        gate_sums: vec![vec![0.0, 0.7]],
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.png");
    plots::route_heatmap(&rt, 0, 1, Some(&["x".to_string()]), (400, 300), &p).unwrap();
    assert_eq!(png_size(&p), (400, 300));
    plots::route_heatmap(&rt, 0, 1, None, (400, 300), &p).unwrap();
    let bal = vec![metrics::balance(&[0, 1])];
    plots::load_bars(&[1], &bal, (400, 300), &p).unwrap();
    plots::balance_by_depth(&[1], &bal, (400, 300), &p).unwrap();
    let d = analysis::report::drift("same", &rt, &rt).unwrap();
    plots::drift_by_layer(&d.layers, "same", (400, 300), &p).unwrap();
    assert_eq!(png_size(&p), (400, 300));
    let one = vec![plots::ConvergenceSeries {
        variant: "zyphra".into(),
        tol: 1e-4,
        traces: vec![(1, vec![])],
    }];
    let err = plots::sinkhorn_convergence(&one, (400, 300), &p).unwrap_err().to_string();
    assert!(err.contains("no traces"), "{err}");
}

#[test]
fn a_model_without_moe_layers_still_gets_a_report() {
    let m = tiny_model(&tiny_config(&["r", "1"], 16, VOCAB), 2);
    let c = collect(&m, opts(64, 0, 32));
    let tok = blackmamba::tokenizer::neox().unwrap();
    let info = RunInfo {
        model: "dense".into(),
        untrained: true,
        input: "text".into(),
        num_layers: 2,
        chunk: 64,
        reset_every: 0,
    };
    let mut r = Report::build(&info, &c, Some(("same", &c.routes)), &tok, ReportOpts::default()).unwrap();
    assert!(r.layers.is_empty() && r.mamba.len() == 1);
    let dir = tempfile::tempdir().unwrap();
    assert!(analysis::write_plots(&mut r, &c.routes, &tok, 10, dir.path()).unwrap().is_empty());
    r.write(dir.path()).unwrap();
    assert!(std::fs::read_to_string(dir.path().join("report.md"))
        .unwrap()
        .contains("no MoE layers"));
}
