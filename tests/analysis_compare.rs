//! `analyze --compare A B --text FILE` (issue 19): the embedded BlackMamba beside the tiny
//! OLMoE/Mixtral fixtures (the CI case), the measures on routes built by hand, and a model
//! compared with itself.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use blackmamba::analysis::study::align::align;
use blackmamba::analysis::study::measures::{depth_drift, domain_nmi, model_study, stickiness, vocab_specialisation};
use blackmamba::analysis::study::{collect_routes, read_sources, ModelRoutes, Source, Study};
use blackmamba::lm::load_any;
use blackmamba::loader::{LoadOpts, ModelSource};
use candle_core::{DType, Device};

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

const PROSE: &str = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, and the cat \
    watched the bird while the dog slept. Then the rain came and the cat ran inside.\n";
const CODE: &str = "fn main() {\n    let mut total = 0;\n    for i in 0..10 {\n        total += i * i;\n    }\n    \
    println!(\"{}\", total);\n}\n";

fn texts(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("prose.txt"), dir.join("code.txt"));
    std::fs::write(&a, PROSE.repeat(2)).unwrap();
    std::fs::write(&b, CODE.repeat(2)).unwrap();
    (a, b)
}

#[test]
fn embedded_blackmamba_beside_the_tiny_transformers_writes_the_report() {
    for fix in ["olmoe-tiny", "mixtral-tiny"] {
        let dir = tempfile::tempdir().unwrap();
        let (prose, code) = texts(dir.path());
        let out = dir.path().join("report");
        let o = bm()
            .args(["analyze", "--compare", "embedded", fixture(fix).to_str().unwrap()])
            .arg("--text")
            .arg(&prose)
            .arg("--text")
            .arg(&code)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{fix}: {}", String::from_utf8_lossy(&o.stderr));
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        for section in [
            "## Load balance",
            "drift to imbalance",
            "## Expert co-activation",
            "## Specialisation",
            "## Stickiness",
            "aligned by character spans",
        ] {
            assert!(md.contains(section), "{fix}: report.md lacks {section}");
        }
        let study: Study = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
        let fam: Vec<&str> = study.models.iter().map(|m| m.family.as_str()).collect();
        assert_eq!(fam, ["blackmamba", &fix[..fix.len() - 5]]);
        assert_eq!(study.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["prose", "code"]);
        let (a, b) = (&study.models[0], &study.models[1]);
        assert_eq!((a.layers.len(), b.layers.len()), (4, 2), "{fix}: MoE layers");
        assert!(a.layers.iter().all(|l| l.k == 1 && l.coactivation.is_none()));
        assert!(b.layers.iter().all(|l| l.k > 1 && l.coactivation.is_some()));
        for m in [a, b] {
            assert_eq!(m.source_tokens.iter().sum::<usize>(), m.tokens);
            for l in &m.layers {
                assert_eq!(l.balance.tokens as usize, m.tokens * l.k, "{fix}: loads count every choice");
            }
        }
        assert!(study.alignment.pairs >= a.tokens.max(b.tokens), "{fix}: every token is in a pair");
        assert_eq!(study.alignment.nmi.len(), 4);
        assert!(study.plots.len() >= 5, "{:?}", study.plots);
        for p in &study.plots {
            let bytes = std::fs::read(out.join(p)).unwrap();
            assert_eq!(&bytes[..4], b"\x89PNG", "{p}");
            assert!(md.contains(p.as_str()), "report.md links {p}");
        }
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "no temp files left: {left:?}");
    }
}

#[test]
fn a_model_compared_with_itself_aligns_exactly() {
    let l = load_any(
        &ModelSource::Dir(fixture("mixtral-tiny")),
        &Device::Cpu,
        DType::F32,
        &LoadOpts::default(),
    )
    .unwrap();
    let sources = vec![
        Source {
            name: "prose".into(),
            text: PROSE.into(),
        },
        Source {
            name: "code".into(),
            text: CODE.into(),
        },
    ];
    let r = collect_routes(&l, &sources, 16, 0, &mut |_| {}).unwrap();
    let whole = collect_routes(&l, &sources, 10_000, 0, &mut |_| {}).unwrap();
    assert_eq!(r.experts, whole.experts, "chunking with the cache changes no route");
    let al = align(&r, &r, 0);
    assert_eq!(al.same_spans, 1.0);
    assert_eq!(al.pairs, r.n_tokens());
    for (i, row) in al.nmi.iter().enumerate() {
        assert!((row[i] - 1.0).abs() < 1e-9, "layer {i} agrees with itself: {row:?}");
    }
    assert!(al.nmi_chance < 0.5, "shuffled pairs share little: {}", al.nmi_chance);
    let spans_ok = r
        .spans
        .iter()
        .zip(&r.source)
        .all(|(&(s, e), &src)| e <= sources[usize::from(src)].text.len() && s <= e);
    assert!(spans_ok, "spans lie inside their source");
}

fn hand_routes(experts: Vec<u32>, source: Vec<u16>, ids: Vec<u32>, e: usize, k: usize) -> ModelRoutes {
    let t = ids.len();
    ModelRoutes {
        num_layers: 2,
        layers: vec![1],
        n_experts: vec![e],
        k: vec![k],
        spans: (0..t).map(|i| (i, i + 1)).collect(),
        entropy: vec![vec![0.5; t]],
        ids,
        source,
        experts: vec![experts],
        ..Default::default()
    }
}

#[test]
fn the_measures_on_routes_built_by_hand() {
    // token id 7 always to expert 0, id 8 to 1 then 2: vocabulary specialisation (3 + 2) / 6
    let sets: Vec<&[u32]> = vec![&[0], &[1], &[0], &[1], &[0], &[2]];
    let ids = [7, 8, 7, 8, 7, 8];
    let v = vocab_specialisation(&ids, &sets, 3).unwrap();
    assert!((v - 5.0 / 6.0).abs() < 1e-12, "{v}");
    assert_eq!(vocab_specialisation(&ids, &sets, 4), None, "no id seen 4 times");
    // experts split exactly by source: NMI 1; the same expert everywhere: 0
    let by_source: Vec<&[u32]> = vec![&[0], &[0], &[1], &[1]];
    assert!((domain_nmi(&by_source, &[0, 0, 1, 1], 2, 2) - 1.0).abs() < 1e-9);
    assert_eq!(domain_nmi(&[&[0u32][..]; 4], &[0, 0, 1, 1], 2, 2), 0.0);
    // stickiness counts only pairs within a source; set overlap is |A ∩ B| / k
    let (s, o) = stickiness(&[&[0, 1], &[0, 2], &[3, 2], &[3, 2]], &[0, 0, 0, 1]);
    assert_eq!((s, o), (Some(0.5), Some(0.5)));
    // top-2 routes with a fixed pair: co-activation concentration 1 (each expert always with one other)
    let r = hand_routes(vec![0, 1, 2, 3, 0, 1, 2, 3], vec![0; 4], vec![1, 2, 3, 4], 4, 2);
    let m = model_study(&r, 1, 1, 0);
    let l = &m.layers[0];
    assert_eq!(l.coactivation, Some(1.0));
    assert_eq!(l.coactivation_uniform, Some(1.0 / 3.0));
    assert_eq!(l.top_pairs[0], (0, 1, 2));
    assert_eq!(l.balance.cv, 0.0);
    assert!((l.depth - 0.75).abs() < 1e-12);
    // drift: CV rising with depth is flagged, falling is not
    let mut layers = vec![l.clone(), l.clone(), l.clone()];
    for (i, x) in layers.iter_mut().enumerate() {
        x.depth = i as f64 / 2.0;
        x.balance.cv = 0.1 + i as f64;
    }
    let d = depth_drift(&layers);
    assert!(d.later_less_balanced && d.cv_slope > 0.0);
    layers.reverse();
    layers.iter_mut().enumerate().for_each(|(i, x)| x.depth = i as f64 / 2.0);
    assert!(!depth_drift(&layers).later_less_balanced);
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let fix = fixture("olmoe-tiny");
    let run = |args: &[&str]| {
        let o = bm().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).trim().to_string()
    };
    let out = dir.path().join("r");
    let out = out.to_str().unwrap();
    let e = run(&["analyze", "--compare", "embedded", fix.to_str().unwrap(), "--out", out]);
    assert!(e.contains("--text"), "{e}");
    let missing = dir.path().join("nope.txt");
    let e = run(&[
        "analyze",
        "--compare",
        "embedded",
        fix.to_str().unwrap(),
        "--text",
        missing.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert!(e.contains("nope.txt"), "{e}");
    let e = run(&["analyze", "--text", missing.to_str().unwrap(), "--out", out]);
    assert!(e.contains("--compare A B"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = read_sources(&[empty]).unwrap_err().to_string();
    assert!(err.contains("no .txt or .md"), "{err}");
}
