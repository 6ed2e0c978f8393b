"""One "node" of a multi-node training run, for tests: the train stage on a committed dataset.

usage: python tests/helpers/node_worker.py SPEC_JSON
SPEC_JSON: {"acts": DatasetRef fields, "sae": SAEConfig fields, "train": TrainConfig fields}.
Prints the trained SAE's dataset path once the stage returns (on every node, after node 0's
commit).
"""

from __future__ import annotations

import json
import sys

from sae_core.config import SAEConfig, TrainConfig
from sae_core.stages import train as train_stage
from sae_core.storage.refs import DatasetRef


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    acts = DatasetRef.model_validate(spec["acts"])
    point = (SAEConfig.model_validate(spec["sae"]), TrainConfig.model_validate(spec["train"]))
    [ref] = train_stage.train_sae_group(acts, [point], progress=False)
    print(f"node_worker: trained {ref.path}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
