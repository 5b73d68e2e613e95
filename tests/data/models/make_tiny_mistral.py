"""Makes tiny-mistral/: a randomly initialised Mistral of about 0.2 M parameters with a byte-level BPE
trained on the bundled DSP sample. The `train/sample` deployment (prefect.yaml) trains it on the CPU, so
the train flow runs end to end from a fresh clone without downloading a model. Its text is noise.

    .venv/bin/python tests/data/models/make_tiny_mistral.py     # writes tests/data/models/tiny-mistral
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for training_fixtures

from training_fixtures import corpus, tiny_mistral  # noqa: E402

if __name__ == "__main__":
    print(tiny_mistral(HERE / "tiny-mistral", corpus()))
