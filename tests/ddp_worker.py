"""Run by tests/test_ddp.py under torchrun: a short TG-DP run on synthetic clips; each process
also leaves OUT/rank{RANK}.json with the place torchrun gave it."""
import json
import os
import sys
from pathlib import Path

import torch

import tgdp_core as tg
from conftest import SyntheticAV

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = tg.Config.from_dict(json.loads(sys.argv[1]))
    result = tg.train(cfg, sys.argv[2], dataset=SyntheticAV(cfg))
    place = {k.lower(): int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")}
    (Path(sys.argv[2]) / f"rank{place['rank']}.json").write_text(json.dumps(place))
