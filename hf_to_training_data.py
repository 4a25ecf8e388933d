"""Convert Hugging Face / BEIR / MS MARCO-style retrieval data to training JSONL.

    python hf_to_training_data.py        # no arguments: the embedded hub-layout sample, offline
    python hf_to_training_data.py --dataset BeastyZ/E5-R --config all --output training_data/e5r
    python hf_to_training_data.py --dataset ../shared/data/scifact --split train \
        --output training_data/scifact

The same command as ``conretriever convert`` (flags and work in ``conretriever/data/convert.py``;
reading sources in ``conretriever/data/sources.py``).
"""

import sys

from conretriever.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["convert", *sys.argv[1:]]))
