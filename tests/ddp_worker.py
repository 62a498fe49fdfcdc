"""Run by tests/test_ddp.py under torchrun: a short TG-DP run on synthetic clips."""
import json
import sys

import torch

import tgdp_core as tg
from conftest import SyntheticAV

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = tg.Config.from_dict(json.loads(sys.argv[1]))
    result = tg.train(cfg, sys.argv[2], dataset=SyntheticAV(cfg))
