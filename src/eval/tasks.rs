//! The tasks and their prompt templates, as lm-evaluation-harness defines them (its
//! `lm_eval/tasks/<task>/*.yaml` and `utils.py`): how a dataset row becomes a document, how a
//! document becomes (context, continuation) requests, and how it reads as a few-shot example.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::eval::scorer::py_space;

/// A benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Hellaswag,
    Piqa,
    ArcEasy,
    ArcChallenge,
    Openbookqa,
    Winogrande,
    Lambada,
}

/// Every task, in the order `--task all` runs them.
pub const ALL: [Task; 7] = [
    Task::Hellaswag,
    Task::Piqa,
    Task::ArcEasy,
    Task::ArcChallenge,
    Task::Winogrande,
    Task::Openbookqa,
    Task::Lambada,
];

impl Task {
    /// The name on the command line and in reports (lm-eval's task name; `lambada` is its
    /// `lambada_openai`).
    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Openbookqa => "openbookqa",
            Task::Winogrande => "winogrande",
            Task::Lambada => "lambada",
        }
    }

    /// Parses a task name (`lambada_openai` is accepted for `lambada`).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        ALL.into_iter()
            .find(|k| k.name() == t || (t == "lambada_openai" && *k == Task::Lambada))
            .ok_or_else(|| {
                let names: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
                Error::Invalid(format!("unknown task '{s}'; known: {} (or all)", names.join(", ")))
            })
    }

    /// The split lm-eval scores.
    pub fn eval_split(self) -> &'static str {
        match self {
            Task::ArcEasy | Task::ArcChallenge | Task::Openbookqa | Task::Lambada => "test",
            Task::Hellaswag | Task::Piqa | Task::Winogrande => "validation",
        }
    }

    /// The split lm-eval draws few-shot examples from (LAMBADA has only its test split).
    pub fn fewshot_split(self) -> &'static str {
        match self {
            Task::Lambada => "test",
            _ => "train",
        }
    }

    /// The Hugging Face dataset (id, config) lm-eval reads.
    pub fn hub_dataset(self) -> (&'static str, Option<&'static str>) {
        match self {
            Task::Hellaswag => ("Rowan/hellaswag", None),
            Task::Piqa => ("baber/piqa", None),
            Task::ArcEasy => ("allenai/ai2_arc", Some("ARC-Easy")),
            Task::ArcChallenge => ("allenai/ai2_arc", Some("ARC-Challenge")),
            Task::Openbookqa => ("allenai/openbookqa", Some("main")),
            Task::Winogrande => ("allenai/winogrande", Some("winogrande_xl")),
            Task::Lambada => ("EleutherAI/lambada_openai", Some("default")),
        }
    }

    /// Turns one dataset row into a document; the error names the missing or bad field.
    pub fn doc(self, row: &Value) -> Result<Doc> {
        let doc = self.parse_row(row)?;
        match &doc {
            Doc::Choice { choices, gold, .. }
            | Doc::Partial {
                options: choices, gold, ..
            } if *gold >= choices.len() => Err(Error::Invalid(format!(
                "answer index {gold} is past the document's {} choices",
                choices.len()
            ))),
            _ => Ok(doc),
        }
    }

    fn parse_row(self, row: &Value) -> Result<Doc> {
        match self {
            Task::Hellaswag => {
                let ctx = format!("{} {}", s(row, "ctx_a")?, py_capitalize(s(row, "ctx_b")?));
                let query = hellaswag_preprocess(&format!("{}: {ctx}", s(row, "activity_label")?));
                let choices = list(row, "endings")?.iter().map(|e| hellaswag_preprocess(e)).collect();
                Ok(Doc::Choice {
                    query,
                    choices,
                    gold: index(row, "label")?,
                })
            }
            Task::Piqa => Ok(Doc::Choice {
                query: format!("Question: {}\nAnswer:", s(row, "goal")?),
                choices: vec![s(row, "sol1")?.to_string(), s(row, "sol2")?.to_string()],
                gold: index(row, "label")?,
            }),
            Task::ArcEasy | Task::ArcChallenge | Task::Openbookqa => {
                let query = match self {
                    Task::Openbookqa => s(row, "question_stem")?.to_string(),
                    _ => format!("Question: {}\nAnswer:", s(row, "question")?),
                };
                let choices = row.get("choices").ok_or_else(|| missing("choices"))?;
                let texts = list(choices, "text").map_err(|_| bad("choices.text", "a list of strings"))?;
                let labels = list(choices, "label").map_err(|_| bad("choices.label", "a list of strings"))?;
                let key = s(row, "answerKey")?;
                let key = if self == Task::Openbookqa {
                    key.trim_start_matches(py_space)
                } else {
                    key
                };
                let gold = labels
                    .iter()
                    .position(|l| l == key)
                    .ok_or_else(|| bad("answerKey", &format!("one of choices.label {labels:?}, not {key:?}")))?;
                Ok(Doc::Choice {
                    query,
                    choices: texts,
                    gold,
                })
            }
            Task::Winogrande => {
                let sentence = s(row, "sentence")?;
                let blank = sentence.find('_').ok_or_else(|| bad("sentence", "a sentence with a '_' blank"))?;
                let options = [s(row, "option1")?, s(row, "option2")?]
                    .iter()
                    .map(|o| format!("{}{o}", &sentence[..blank]))
                    .collect();
                let gold = match s(row, "answer")? {
                    "1" => 0,
                    "2" => 1,
                    _ => return Err(bad("answer", "\"1\" or \"2\" (the test split has no answers)")),
                };
                Ok(Doc::Partial {
                    options,
                    target: py_strip(&sentence[blank + 1..]).to_string(),
                    gold,
                })
            }
            Task::Lambada => {
                let text = s(row, "text")?;
                let (context, last) = text.rsplit_once(' ').unwrap_or(("", text));
                Ok(Doc::Cloze {
                    context: context.to_string(),
                    target: format!(" {last}"),
                })
            }
        }
    }
}

/// One document, by how it is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// One context (`query`), one continuation per choice (" " + choice): acc and acc_norm.
    Choice { query: String, choices: Vec<String>, gold: usize },
    /// Partial scoring (WinoGrande): one context per option, one shared continuation (" " +
    /// target): acc.
    Partial { options: Vec<String>, target: String, gold: usize },
    /// One context and its continuation (LAMBADA's last word, with its space): greedy match and
    /// perplexity.
    Cloze { context: String, target: String },
}

/// One (context, continuations) group: the context is read once for all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuations: Vec<String>,
}

impl Doc {
    /// The document as a few-shot example: its text, the target delimiter, its gold target.
    pub fn example(&self) -> String {
        match self {
            Doc::Choice { query, choices, gold } => format!("{query} {}", choices.get(*gold).map(String::as_str).unwrap_or_default()),
            Doc::Partial { options, target, gold } => format!("{} {target}", options.get(*gold).map(String::as_str).unwrap_or_default()),
            Doc::Cloze { context, target } => format!("{context}{target}"),
        }
    }

    /// The requests of the document after the few-shot `prefix` (examples joined and ended with
    /// "\n\n", or empty): one group for a choice or cloze document, one per option for partial
    /// scoring.
    pub fn requests(&self, prefix: &str) -> Vec<Request> {
        match self {
            Doc::Choice { query, choices, .. } => vec![Request {
                context: format!("{prefix}{query}"),
                continuations: choices.iter().map(|c| format!(" {c}")).collect(),
            }],
            Doc::Partial { options, target, .. } => options
                .iter()
                .map(|o| Request {
                    context: format!("{prefix}{o}"),
                    continuations: vec![format!(" {target}")],
                })
                .collect(),
            Doc::Cloze { context, target } => vec![Request {
                context: format!("{prefix}{context}"),
                continuations: vec![target.clone()],
            }],
        }
    }

    /// How many answers the document offers (1 for a cloze document).
    pub fn n_choices(&self) -> usize {
        match self {
            Doc::Choice { choices, .. } => choices.len(),
            Doc::Partial { options, .. } => options.len(),
            Doc::Cloze { .. } => 1,
        }
    }
}

/// The few-shot prefix: examples joined with "\n\n", and "\n\n" before the document (empty for
/// zero-shot).
pub fn fewshot_prefix(examples: &[&Doc]) -> String {
    examples.iter().map(|d| format!("{}\n\n", d.example())).collect()
}

/// HellaSwag's `preprocess` (lm-eval `hellaswag/utils.py`): strip, `" [title]"` -> `". "`, drop
/// every `[...]` (within a line, shortest first, as `re.sub(r"\[.*?\]", "")`), "  " -> " ".
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = py_strip(text).replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(close) if after[close..].starts_with(']') => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Python's `str.capitalize()`: the first character upper-cased, the rest lower-cased.
pub fn py_capitalize(s: &str) -> String {
    let mut it = s.chars();
    match it.next() {
        Some(c) => c.to_uppercase().chain(it.as_str().to_lowercase().chars()).collect(),
        None => String::new(),
    }
}

fn missing(key: &str) -> Error {
    Error::Invalid(format!("missing field '{key}'"))
}

fn bad(key: &str, want: &str) -> Error {
    Error::Invalid(format!("field '{key}' should be {want}"))
}

fn s<'a>(row: &'a Value, key: &str) -> Result<&'a str> {
    row.get(key)
        .ok_or_else(|| missing(key))?
        .as_str()
        .ok_or_else(|| bad(key, "a string"))
}

fn list(row: &Value, key: &str) -> Result<Vec<String>> {
    let v = row.get(key).ok_or_else(|| missing(key))?;
    v.as_array()
        .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad(key, "a list of strings"))
}

/// An answer index given as a number or a numeric string.
fn index(row: &Value, key: &str) -> Result<usize> {
    let v = row.get(key).ok_or_else(|| missing(key))?;
    v.as_u64()
        .map(|n| n as usize)
        .or_else(|| v.as_str().and_then(|t| t.trim().parse().ok()))
        .ok_or_else(|| bad(key, "an answer index (0, 1, ...)"))
}
