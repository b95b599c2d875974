"""Generate the embedded model's self-written text and ship it as ``peft_persedit/data/default_model_selftext.json``.

The editor needs, per model, a neutral corpus (for C = E[kkᵀ], μ and the gates' negatives) and context prefixes
(for keys), both written by the model itself. Generating them takes ~40 s on 2 CPU cores; shipping them for the
embedded SmolLM2-135M-Instruct makes a first edit on a fresh machine skip that. They are used only when the
loaded model's fingerprint (:func:`peft_persedit.editing.selftext.model_fingerprint`: config, weights,
tokenizer) equals the one recorded here; any other model, dtype or tokenizer generates its own.

    python scripts/build_default_selftext.py            # rewrite the file
    python scripts/build_default_selftext.py --check    # regenerate and compare with the shipped file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.default_model import DEFAULT_MODEL_NAME, GGUF_FILE, gguf_path, gguf_sha256
from peft_persedit.editing import selftext

OUT = Path(selftext.__file__).resolve().parent.parent / "data" / selftext.SHIPPED_FILE
CONTEXT_LENGTH = 10  # context_prefixes' default length
CORPUS_LENGTH = 48  # neutral_corpus' default length


def build() -> dict:
    """The shipped record: model identity, fingerprint and the generated texts."""
    model, tokenizer = load_default_model()
    n_contexts = PersonalizationEditConfig().contexts
    start = time.perf_counter()
    with torch.no_grad():
        texts = {
            f"contexts_{n_contexts}_{CONTEXT_LENGTH}": selftext.build_context_prefixes(
                model, tokenizer, n_contexts, CONTEXT_LENGTH),
            selftext.corpus_name(CORPUS_LENGTH): selftext.build_neutral_corpus(model, tokenizer, CORPUS_LENGTH),
        }
    print(f"generated in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return {"model": DEFAULT_MODEL_NAME, "gguf": GGUF_FILE, "gguf_sha256": gguf_sha256(gguf_path()),
            "fingerprint": selftext.model_fingerprint(model, tokenizer), "made_by": "scripts/build_default_selftext.py",
            "torch": torch.__version__, "transformers": transformers.__version__, "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = parser.parse_args()
    record = build()
    if args.check:
        shipped = json.loads(OUT.read_text())
        same = {k: shipped.get(k) == v for k, v in record.items() if k not in ("torch", "transformers")}
        print(json.dumps(same, indent=1))
        return 0 if all(same.values()) else 1
    OUT.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} (fingerprint {record['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
