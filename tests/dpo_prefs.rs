//! Preference JSONL: both forms tokenised through the chat template, the response mask on the
//! final assistant message only, bad lines skipped with their number and reason.

#![allow(clippy::unwrap_used)]

use blackmamba::chat_template::{render, Message, Role};
use blackmamba::finetune::prefs::{load, parse};
use blackmamba::tokenizer::{decode, neox};

fn masked_text(tok: &tokenizers::Tokenizer, ids: &[u32], mask: &[bool]) -> String {
    let sel: Vec<u32> = ids.iter().zip(mask).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
    decode(tok, &sel).unwrap()
}

#[test]
fn both_forms_render_the_same_pair_and_mask_only_the_answer() {
    let tok = neox().unwrap();
    let flat = r#"{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A potato."}"#;
    let conv = r#"{"chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                  "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "A potato."}]}"#;
    let conv = conv.replace('\n', " ");
    let split = r#"{"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "A potato."}]}"#;
    let set = parse(&format!("{flat}\n\n{conv}\n{split}\n"), &tok, 512).unwrap();
    assert!(set.bad.is_empty(), "{:?}", set.bad);
    assert_eq!(set.pairs.len(), 3);
    assert_eq!(set.pairs[0], set.pairs[1]);
    assert_eq!(set.pairs[0], set.pairs[2]);
    let p = &set.pairs[0];
    let (ids, _) = render(
        &tok,
        &[
            Message {
                role: Role::User,
                content: "Name a colour.".into(),
            },
            Message {
                role: Role::Assistant,
                content: "Blue.".into(),
            },
        ],
    )
    .unwrap();
    assert_eq!(p.chosen.ids, ids);
    assert_eq!(masked_text(&tok, &p.chosen.ids, &p.chosen.mask), " Blue.");
    assert_eq!(masked_text(&tok, &p.rejected.ids, &p.rejected.mask), " A potato.");
    assert!(!*p.chosen.mask.last().unwrap(), "the newline after end-of-text is not learnt");
    assert!(
        p.chosen.ids.contains(&0) && p.chosen.mask[p.chosen.ids.iter().position(|&i| i == 0).unwrap()],
        "end-of-text is learnt"
    );
}

#[test]
fn a_multi_turn_prompt_masks_only_the_last_answer() {
    let tok = neox().unwrap();
    let line = r#"{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to two."}], "chosen": [{"role": "assistant", "content": "One, two."}], "rejected": [{"role": "assistant", "content": "Three."}]}"#;
    let set = parse(line, &tok, 512).unwrap();
    let p = &set.pairs[0];
    assert_eq!(masked_text(&tok, &p.chosen.ids, &p.chosen.mask), " One, two.");
    assert_eq!(masked_text(&tok, &p.rejected.ids, &p.rejected.mask), " Three.");
}

#[test]
fn bad_lines_are_skipped_with_their_number_and_reason() {
    let tok = neox().unwrap();
    let good = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
    let lines = [
        good,
        "not json",
        r#"{"prompt": "p", "chosen": "a"}"#,
        r#"{"prompt": "p", "chosen": "", "rejected": "b"}"#,
        r#"{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}"#,
        r#"{"chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
    ];
    let set = parse(&lines.join("\n"), &tok, 512).unwrap();
    assert_eq!(set.pairs.len(), 1);
    let reasons: Vec<(usize, &str)> = set.bad.iter().map(|b| (b.line, b.reason.as_str())).collect();
    assert_eq!(reasons.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3, 4, 5, 6]);
    assert!(reasons[0].1.contains("not JSON"));
    assert!(reasons[1].1.contains("rejected"));
    assert!(reasons[2].1.contains("empty"));
    assert!(reasons[3].1.contains("prompt must be the same"));
    assert!(reasons[4].1.contains("assistant"));
    // a prompt longer than --seq-len leaves no response token
    let long = format!(r#"{{"prompt": "{}", "chosen": "a", "rejected": "b"}}"#, "word ".repeat(50));
    let set = parse(&long, &tok, 8).unwrap();
    assert!(set.pairs.is_empty() && set.bad[0].reason.contains("--seq-len"), "{:?}", set.bad);
    // a file with no usable pair is one error naming the file and the first bad line
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    std::fs::write(&path, "{}\n").unwrap();
    let e = load(&path, &tok, 64).unwrap_err().to_string();
    assert!(e.contains("prefs.jsonl") && e.contains("line 1") && !e.contains('\n'), "{e}");
}
