"""Self-speculative decoding timed on a bigger model with a trained model's acceptance: the
drafter runs for real (the drafting layers and head of ARTIFACT, e.g. the Qwen2-0.5B-shaped
benchmark model), verification and rollback run for real, and only the drafted token is chosen
by the agreement pattern that ``scripts/speculative_acceptance.py`` measured on a trained deep
student: where the pattern says the head agreed, the draft is the token plain decoding gives
there; elsewhere another token. The answers are plain decoding's by construction (checked), and
the speedup is measured side by side with plain decoding, alternating on the same prompts.

    python scripts/speculative_replay.py runs/bench/nbits-draft --acceptance runs/acceptance/acceptance.json \\
        --layer 6 --tokens 4 --threads 2

The same on a GGUF artifact exported with ``--draft-layer 6``: ``--drafter verbalizer`` (the
layer-6 head, replaying the own-head pattern) or ``--drafter model --heads lens`` (the draft
model's own norm and head, llama.cpp's usual drafter, replaying the logit lens's pattern).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--acceptance", required=True, help="acceptance.json of scripts/speculative_acceptance.py")
    p.add_argument("--heads", default="final", choices=["final", "labels", "lens"],
                   help="whose pattern: heads fitted to the final head, to the labels, or the logit lens")
    p.add_argument("--drafter", default="verbalizer", choices=["verbalizer", "model"])
    p.add_argument("--pattern-layer", type=int, default=None,
                   help="the trained student's layer whose pattern is replayed (default: --layer)")
    p.add_argument("--layer", type=int, default=6, help="drafting layer of ARTIFACT (a kept head)")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import vlsi_runtimes
    from vlsi_runtimes.bench import SPEC_PROMPTS

    patterns = json.loads(open(a.acceptance).read())["patterns"][a.heads][str(a.pattern_layer or a.layer)]
    stream = np.array([c == "1" for pat in patterns for c in pat])  # one long agreement sequence
    rt = vlsi_runtimes.load(a.artifact, threads=a.threads)
    spec = {"layer": a.layer, "tokens": a.tokens, "drafter": a.drafter}
    rt._speculation_check(vlsi_runtimes.Speculative(**spec))

    real_feed, real_logits = rt._draft_feed, rt._draft_logits
    where = {}

    def feed(state, token):
        where["next"] = rt._fed(state) + state.get("drafted", 0) + 1  # the position the head's draft will take
        return real_feed(state, token)

    def logits(hidden):
        out = real_logits(hidden)  # the drafter's real compute
        t = where["next"] - where["prompt"]  # index in the answer of the token being drafted
        want = where["plain"][t] if t < len(where["plain"]) else int(np.argmax(out))
        agree = bool(stream[(where["offset"] + t) % len(stream)])
        choice = want if agree else (want + 1) % len(out)
        forced = np.full_like(out, -1e9)
        forced[choice] = 0.0
        return forced

    rt._draft_feed, rt._draft_logits = feed, logits
    rates = {"plain": [], "replayed": []}
    same, totals = [], {"cycles": 0, "drafted": 0, "accepted": 0}
    for r in range(a.runs + 1):
        for i, prompt in enumerate(SPEC_PROMPTS):
            encoded = rt.encode([], prompt)
            it = rt.stream_tokens([], encoded, a.new_tokens, ignore_eos=True, reuse=False)
            toks = [next(it)]
            t0 = time.perf_counter()
            toks += list(it)
            plain_rate = (len(toks) - 1) / (time.perf_counter() - t0)
            where.update(plain=toks, prompt=len(encoded.ids), offset=97 * i + 13 * r)
            stats: dict = {}
            it = rt.stream_tokens([], encoded, a.new_tokens, ignore_eos=True, reuse=False, stats=stats,
                                  speculative=spec)
            got = [next(it)]
            t0 = time.perf_counter()
            got += list(it)
            spec_rate = (len(got) - 1) / (time.perf_counter() - t0)
            if r:
                rates["plain"].append(plain_rate)
                rates["replayed"].append(spec_rate)
                same.append(got == toks)
                for k in totals:
                    totals[k] += stats[k]
    plain, replayed = statistics.median(rates["plain"]), statistics.median(rates["replayed"])
    row = {"artifact": a.artifact, "drafter": a.drafter, "layer": a.layer, "tokens": a.tokens, "pattern_layer": a.pattern_layer or a.layer,
           "heads": a.heads, "pattern_agreement": float(stream.mean()), "plain_tok_s": plain,
           "speculative_tok_s": replayed, "speedup": replayed / plain, "identical_rate": sum(same) / len(same), **totals,
           "tokens_per_cycle": (totals["accepted"] + totals["cycles"]) / max(totals["cycles"], 1)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
