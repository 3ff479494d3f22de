#!/usr/bin/env python3
"""Makes assets/prefs/demo.jsonl, the small preference set of the DPO demo and tests, from the
embedded model's chat corpus (PyPI chatterbot-corpus==1.3.3, fetched by scripts/fetch-corpus.sh
and parsed as scripts/prepare_corpus.py parses it).

Each pair is the first exchange of a conversation: the prompt is its first user message, the
chosen response the real reply, the rejected response the reply of another conversation (a
seeded derangement of the replies, so it is never the pair's own). Every 4th pair is written in
the conversational form (message lists), the rest as {"prompt", "chosen", "rejected"} strings.
Only the training conversations are used (prepare_corpus.py holds every 20th out), and replies
longer than 200 characters are skipped to keep the file small.

Usage: scripts/make_prefs.py [RAW] [OUT]  (default: data/corpus/raw assets/prefs/demo.jsonl)
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_corpus import chat  # noqa: E402


def main():
    raw = Path(sys.argv[1] if len(sys.argv) > 1 else "data/corpus/raw")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "assets/prefs/demo.jsonl")
    convs = [c["messages"] for i, c in enumerate(chat(raw)) if i % 20 != 19]
    firsts = [(m[0]["content"], m[1]["content"]) for m in convs if len(m[1]["content"]) <= 200 and len(m[0]["content"]) <= 200]
    rng = random.Random(23)
    rng.shuffle(firsts)
    firsts = firsts[:600]
    n = len(firsts)
    # a derangement: a shuffled order, rotated by one, never maps a pair to itself
    order = list(range(n))
    rng.shuffle(order)
    other = {order[k]: order[(k + 1) % n] for k in range(n)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, (prompt, chosen) in enumerate(firsts):
            rejected = firsts[other[i]][1]
            if rejected.strip() == chosen.strip():
                continue
            if i % 4 == 3:
                user = [{"role": "user", "content": prompt}]
                line = {
                    "chosen": user + [{"role": "assistant", "content": chosen}],
                    "rejected": user + [{"role": "assistant", "content": rejected}],
                }
            else:
                line = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
