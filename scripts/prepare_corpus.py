#!/usr/bin/env python3
"""Turns the unpacked corpus (scripts/fetch-corpus.sh) into training files, deterministically:

  DEST/prose.txt       State of the Union addresses, Moby-Dick, the Brown corpus (tags stripped,
                       spacing fixed) and Debian fortunes (no art, ascii-art or ethnic files),
                       documents separated by blank lines
  DEST/prose_eval.txt  every 50th document, held out
  DEST/chat.jsonl      chatterbot-corpus conversations as {"messages": [{"role", "content"}, ...]}
  DEST/chat_eval.jsonl every 20th conversation, held out
  DEST/chat.txt        the training conversations as plain text in the chat template (for the
                       tokenizer trainer)
  DEST/chat_mix.jsonl  the training conversations interleaved with as many short prose passages
                       ({"text": ...}), so that the chat stage does not forget the prose

Only the Python standard library is used (the chatterbot YAML files are simple enough to parse by
hand: lists of lists of strings)."""
import json
import re
import sys
from pathlib import Path


def sotu(raw):
    for p in sorted((raw / "sotu/package/data").glob("*.txt")):
        yield p.read_text(encoding="utf-8").strip()


def moby(raw):
    text = (raw / "moby/package/data/data.txt").read_text(encoding="utf-8")
    for chapter in re.split(r"\n(?=CHAPTER \d+\.)", text):
        chapter = re.sub(r"(?<!\n)\n(?!\n)", " ", chapter.strip())  # unwrap lines
        if chapter:
            yield chapter


BROWN_FIX = [(r" ([,.;:!?)'])", r"\1"), (r"([(]) ", r"\1"), (r"`` ?", '"'), (r" ?''", '"'), (r" n't", "n't"), (r" 's\b", "'s")]


def brown(raw):
    for p in sorted((raw / "brown/package").glob("c[a-r][0-9][0-9]")):
        paras = []
        for para in p.read_text(encoding="utf-8").split("\n\n"):
            words = [w.rsplit("/", 1)[0] for w in para.split() if "/" in w]
            if not words:
                continue
            s = " ".join(words)
            for a, b in BROWN_FIX:
                s = re.sub(a, b, s)
            paras.append(s)
        if paras:
            yield "\n".join(paras)


def fortunes(raw):
    base = raw / "fortunes/usr/share/games/fortunes"
    if not base.is_dir():
        return
    for p in sorted(base.iterdir()):
        if p.suffix or p.name in {"art", "ascii-art", "ethnic"} or not p.is_file():
            continue
        for f in p.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            f = f.strip()
            if 20 < len(f) < 600 and "\ufffd" not in f:
                yield f


def yaml_conversations(text):
    """Parses the `conversations:` list of a chatterbot YAML file."""
    convs, cur, in_convs = [], None, False
    for line in text.splitlines():
        if line.startswith("conversations:"):
            in_convs = True
            continue
        if not in_convs or not line.strip():
            continue
        m = re.match(r"^- - (.*)$", line)
        if m:
            if cur:
                convs.append(cur)
            cur = [m.group(1)]
            continue
        m = re.match(r"^  - (.*)$", line)
        if m and cur is not None:
            cur.append(m.group(1))
        elif line.startswith("    ") and cur:
            cur[-1] += " " + line.strip()  # folded continuation line
    if cur:
        convs.append(cur)
    out = []
    for c in convs:
        c = [unquote(s) for s in c]
        if len(c) >= 2 and all(c):
            out.append(c)
    return out


def unquote(s):
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].replace("''", "'") if s[0] == "'" else bytes(s[1:-1], "utf-8").decode("unicode_escape", errors="ignore")
    return s.strip()


def chat(raw):
    for p in sorted((raw / "chat/chatterbot_corpus/data/english").glob("*.yml")):
        for conv in yaml_conversations(p.read_text(encoding="utf-8")):
            roles = ["user", "assistant"]
            yield {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(conv)]}


def main():
    raw, dest = Path(sys.argv[1]), Path(sys.argv[2])
    docs = [d for src in (sotu, moby, brown, fortunes) for d in src(raw)]
    train = [d for i, d in enumerate(docs) if i % 50 != 49]
    held = [d for i, d in enumerate(docs) if i % 50 == 49]
    (dest / "prose.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (dest / "prose_eval.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    convs = list(chat(raw))
    with open(dest / "chat.jsonl", "w", encoding="utf-8") as f, open(dest / "chat_eval.jsonl", "w", encoding="utf-8") as g, open(
        dest / "chat.txt", "w", encoding="utf-8"
    ) as t:
        for i, c in enumerate(convs):
            (g if i % 20 == 19 else f).write(json.dumps(c, ensure_ascii=False) + "\n")
            if i % 20 != 19:
                t.write("".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in c["messages"]) + "\n")
    # short prose passages (whole paragraphs up to 600 characters) for the chat stage's mix
    paras = [p.strip() for d in train for p in d.split("\n") if 200 <= len(p.strip()) <= 600]
    step = max(1, len(paras) // max(1, len(convs)))
    passages = paras[::step][: len(convs)]
    with open(dest / "chat_mix.jsonl", "w", encoding="utf-8") as f:
        for i, c in enumerate(convs):
            if i % 20 != 19:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
            if i < len(passages):
                f.write(json.dumps({"text": passages[i]}, ensure_ascii=False) + "\n")
    chars = sum(len(d) for d in docs)
    print(f"prepare_corpus: {len(docs)} prose documents ({chars / 1e6:.1f} M chars), {len(convs)} conversations -> {dest}")


if __name__ == "__main__":
    main()
