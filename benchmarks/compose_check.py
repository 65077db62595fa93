"""Composition check: the same 16 test requests x 2 samples at T=0.6 for each model dir given.

A quick regression check for a candidate against the shipped model (a few minutes on one CPU
thread; bench_evaluation.py is the full benchmark):
    python benchmarks/compose_check.py data/models/imelodist-tiny runs/knowledge-sft/merged
"""
import sys

import torch

from imelodist_lib import evaluation as ev
from imelodist_lib.inference import Composer
from imelodist_lib.profiles import get_profile
torch.set_num_threads(1)
p = get_profile("cpu")
train, test = ev.load_splits(p, max_train=500)
requests = ev.build_benchmark(test, p, n=16)
systems = {}
for model in sys.argv[1:]:
    systems[model] = ev.collect_answers(Composer(model, profile=p), requests, n=2, temperature=0.6)
results = ev.evaluate_systems(systems, None, music21_sample=0)
print(ev.markdown_table(results, ["valid", "bar_error_rate", "key_match", "meter_match", "chord_adherence", "repeated_bar_share"]))
