"""Convert Hugging Face / BEIR / MS MARCO-style retrieval data to training JSONL.

    python hf_to_training_data.py        # no arguments: the embedded hub-layout sample, offline
    python hf_to_training_data.py --dataset BeastyZ/E5-R --config all --out training_data/e5r
    python hf_to_training_data.py --dataset ../shared/data/scifact --split train \
        --out training_data/scifact

Thin driver: the flags and the work live in ``conretriever/convert.py`` (also reachable as
``conretriever convert``); reading the sources lives in ``conretriever/sources.py``.
"""

from conretriever.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
