//! Task templates against lm-evaluation-harness's definitions (golden strings worked out with its
//! `hellaswag/utils.py`, `winogrande/preprocess_winogrande.py` and the task YAMLs), task files,
//! few-shot prompts and the metrics.

#![allow(clippy::unwrap_used)]

use blackmamba::eval::data::{self, parse_jsonl, TaskData};
use blackmamba::eval::run::{argmax, bootstrap_stderr, draw_fewshot, mean_stderr, perplexity};
use blackmamba::eval::tasks::{fewshot_prefix, hellaswag_preprocess, py_capitalize, Doc, Request, Task};
use serde_json::json;

fn doc(task: Task, row: serde_json::Value) -> Doc {
    task.doc(&row).unwrap()
}

#[test]
fn hellaswag_matches_lm_eval_preprocessing() {
    let d = doc(
        Task::Hellaswag,
        json!({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
               "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
               "label": "3"}),
    );
    let Doc::Choice { query, choices, gold } = &d else {
        panic!("{d:?}")
    };
    assert_eq!(query, "Roof shingle removal: A man is sitting on a roof. He");
    assert_eq!(*gold, 3);
    assert_eq!(choices[3], "starts pulling up roofing on a roof.");
    assert_eq!(
        d.requests("")[0],
        Request {
            context: "Roof shingle removal: A man is sitting on a roof. He".into(),
            continuations: choices.iter().map(|c| format!(" {c}")).collect(),
        }
    );
    // WikiHow rows: [title] becomes ". ", other brackets go (not across a line break), double
    // spaces collapse once, ctx_b is capitalised the Python way (the rest lower-cased).
    let d = doc(
        Task::Hellaswag,
        json!({"activity_label": "Home and Garden",
               "ctx_a": "[header] How to grow basil indoors [title] Pick a sunny window. [step] Basil needs six hours of LIGHT.",
               "ctx_b": "Turn the POT every [substeps] few days",
               "endings": [" [title] Water the soil  when dry. [step] Do not  soak it.", " Keep it [warm\n] and dry.", "Add [ sand ] to [the] soil.", "Nothing [here"],
               "label": 0}),
    );
    let Doc::Choice { query, choices, .. } = &d else { panic!("{d:?}") };
    assert_eq!(
        query,
        "Home and Garden: How to grow basil indoors. Pick a sunny window. Basil needs six hours of LIGHT. Turn the pot every few days"
    );
    assert_eq!(
        choices,
        &[
            " Water the soil when dry. Do not soak it.",
            "Keep it [warm\n] and dry.",
            "Add to soil.",
            "Nothing [here"
        ]
    );
    assert_eq!(hellaswag_preprocess("  a   b  "), "a  b");
    assert_eq!(py_capitalize("hELLO World"), "Hello world");
}

#[test]
fn piqa_arc_and_openbookqa_templates() {
    let d = doc(
        Task::Piqa,
        json!({"goal": "When boiling butter, when it's ready, you can", "sol1": "Pour it onto a plate", "sol2": "Pour it into a jar", "label": 1}),
    );
    assert_eq!(
        d.requests(""),
        vec![Request {
            context: "Question: When boiling butter, when it's ready, you can\nAnswer:".into(),
            continuations: vec![" Pour it onto a plate".into(), " Pour it into a jar".into()],
        }]
    );
    let arc = json!({"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?",
                     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.", "Planetary gravity will become stronger."], "label": ["A", "B", "C", "D"]},
                     "answerKey": "C"});
    for task in [Task::ArcEasy, Task::ArcChallenge] {
        let d = doc(task, arc.clone());
        let Doc::Choice { query, gold, .. } = &d else { panic!() };
        assert_eq!(query, "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:");
        assert_eq!(*gold, 2);
        assert_eq!(d.example(), format!("{query} Planetary days will become shorter."));
    }
    let d = doc(
        Task::Openbookqa,
        json!({"id": "7-980", "question_stem": "The sun is responsible for",
               "choices": {"text": ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase", "plants sprouting, blooming and wilting"], "label": ["A", "B", "C", "D"]},
               "answerKey": " D"}),
    );
    let Doc::Choice { query, gold, .. } = &d else { panic!() };
    assert_eq!((query.as_str(), *gold), ("The sun is responsible for", 3));
}

#[test]
fn winogrande_is_scored_partially() {
    let d = doc(
        Task::Winogrande,
        json!({"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"}),
    );
    let reqs = d.requests("P\n\n");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].context, "P\n\nSarah was a much better surgeon than Maria so Sarah");
    assert_eq!(reqs[1].context, "P\n\nSarah was a much better surgeon than Maria so Maria");
    for r in &reqs {
        assert_eq!(r.continuations, vec![" always got the harder cases.".to_string()]);
    }
    assert_eq!(
        d.example(),
        "Sarah was a much better surgeon than Maria so Sarah always got the harder cases."
    );
    let e = Task::Winogrande
        .doc(&json!({"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("answer"), "{e}");
}

#[test]
fn lambada_splits_off_the_last_word() {
    let d = doc(Task::Lambada, json!({"text": "the cat sat on the  mat"}));
    assert_eq!(
        d.requests(""),
        vec![Request {
            context: "the cat sat on the ".into(),
            continuations: vec![" mat".into()],
        }]
    );
    assert_eq!(d.example(), "the cat sat on the  mat");
}

fn piqa_rows(n: usize) -> String {
    (0..n)
        .map(|i| json!({"goal": format!("goal {i}"), "sol1": "a", "sol2": "b", "label": i % 2}).to_string() + "\n")
        .collect()
}

#[test]
fn few_shot_examples_are_joined_drawn_reproducibly_and_never_the_document() {
    let docs = parse_jsonl(&piqa_rows(20), Task::Piqa).unwrap();
    let data = TaskData {
        task: Task::Piqa,
        split: "validation".into(),
        path: "x".into(),
        docs,
        fewshot: None,
    };
    for i in 0..20 {
        let a = draw_fewshot(&data, i, 5, 7).unwrap();
        assert_eq!(a, draw_fewshot(&data, i, 5, 7).unwrap());
        assert!(!a.contains(&&data.docs[i]), "doc {i} drew itself");
        let mut seen = a.clone();
        seen.dedup();
        assert_eq!(seen.len(), 5);
    }
    assert_ne!(draw_fewshot(&data, 3, 5, 7).unwrap(), draw_fewshot(&data, 3, 5, 8).unwrap());
    assert!(draw_fewshot(&data, 0, 20, 7).is_err(), "19 other documents cannot give 20 examples");
    let ex = draw_fewshot(&data, 0, 2, 1).unwrap();
    let prefix = fewshot_prefix(&ex);
    assert_eq!(prefix, format!("{}\n\n{}\n\n", ex[0].example(), ex[1].example()));
    assert!(prefix.starts_with("Question: goal "), "{prefix}");
    assert_eq!(
        data.docs[0].requests(&prefix)[0].context,
        format!("{prefix}Question: goal 0\nAnswer:")
    );
}

#[test]
fn task_files_are_found_and_bad_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("piqa")).unwrap();
    std::fs::write(dir.path().join("piqa/validation.jsonl"), piqa_rows(3)).unwrap();
    std::fs::write(dir.path().join("piqa/train.jsonl"), piqa_rows(4)).unwrap();
    let d = data::load(dir.path(), Task::Piqa, None).unwrap();
    assert_eq!((d.split.as_str(), d.docs.len()), ("validation", 3));
    assert_eq!(d.fewshot.as_ref().map(|(s, v)| (s.as_str(), v.len())), Some(("train", 4)));
    // ARC's own split is test; the validation file is taken (and labelled) when test is absent.
    std::fs::create_dir_all(dir.path().join("arc_easy")).unwrap();
    let arc = json!({"question": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"});
    std::fs::write(dir.path().join("arc_easy/validation.jsonl"), format!("{arc}\n\n{arc}\n")).unwrap();
    let d = data::load(dir.path(), Task::ArcEasy, None).unwrap();
    assert_eq!((d.split.as_str(), d.docs.len()), ("validation", 2));
    let e = data::load(dir.path(), Task::ArcChallenge, None).unwrap_err().to_string();
    assert!(e.contains("arc_challenge") && e.contains("--split"), "{e}");
    std::fs::write(dir.path().join("arc_easy/test.jsonl"), format!("{arc}\n{{\"question\": \"q\"}}\n")).unwrap();
    let e = data::load(dir.path(), Task::ArcEasy, None).unwrap_err().to_string();
    assert!(e.contains("test.jsonl") && e.contains("line 2") && e.contains("choices"), "{e}");
    std::fs::write(dir.path().join("arc_easy/test.jsonl"), "not json\n").unwrap();
    let e = data::load(dir.path(), Task::ArcEasy, None).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("not JSON") && !e.contains('\n'), "{e}");
    let bad_gold = json!({"question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "B"});
    std::fs::write(dir.path().join("arc_easy/test.jsonl"), format!("{bad_gold}\n")).unwrap();
    let e = data::load(dir.path(), Task::ArcEasy, None).unwrap_err().to_string();
    assert!(e.contains("answerKey"), "{e}");
    assert!(Task::parse("lambada_openai").unwrap() == Task::Lambada && Task::parse("mmlu").is_err());
}

#[test]
fn metrics_follow_lm_eval() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1, "first on ties, as np.argmax");
    // mean_stderr: sample standard deviation (n-1) / sqrt(n)
    let v = [1.0, 0.0, 1.0, 1.0];
    let se = mean_stderr(&v).unwrap();
    let expected = ((3.0 * 0.0625 + 0.5625) / 3.0f64).sqrt() / 2.0;
    assert!((se - expected).abs() < 1e-12, "{se} vs {expected}");
    assert_eq!(mean_stderr(&[1.0]), None);
    assert!((perplexity(&[-1.0, -3.0]) - 2f64.exp()).abs() < 1e-12);
    let a = bootstrap_stderr(&[-1.0, -2.0, -3.0, -4.0], perplexity, 200, 1).unwrap();
    assert!(a > 0.0 && a.is_finite());
    assert!(
        bootstrap_stderr(&[-1.0, -1.0, -1.0], perplexity, 200, 1).unwrap() < 1e-12,
        "constant data"
    );
}
