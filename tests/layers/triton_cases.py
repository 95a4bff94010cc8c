"""What the Triton kernel tests share: the interpreter subprocess and their input cases
(imported by the scripts that run under ``TRITON_INTERPRET=1``)."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE = (torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64),
       torch.tensor([0.7], dtype=torch.float64), torch.zeros(1, dtype=torch.int64))  # fmt: skip
EMPTY = (ONE[0][:0], ONE[1][:0], ONE[2][:0])


def run_interpreted(script: str, timeout: int):
    """Runs ``script`` (argv[1]: the tests folder) in a subprocess with
    ``TRITON_INTERPRET=1``, so that the variable reaches no other test (triton reads it
    when a kernel is defined, at import); returns the JSON of its last output line, also
    printed (the equality numbers, shown with ``pytest -s``)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script, TESTS], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    return results


def scene(n, classes, seed, ties=False, spread=100.0):
    """``n`` random float64 boxes up to 41 px in a ``spread`` square, scores, categories;
    ``ties``: equal scores and exact duplicate boxes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 1], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 4).floor() / 4 + 0.25
        boxes[1::3] = boxes[0::3][: boxes[1::3].shape[0]]
    return boxes, scores, torch.randint(0, classes, (n,), generator=g)


def fuzz(kind, seed, n):
    """``n`` boxes of test_fuzz_postprocess's ``kind``, random scores, 3 categories."""
    from test_fuzz_postprocess import _boxes

    rng = np.random.default_rng(seed)
    boxes = torch.from_numpy(_boxes(rng, n, kind))
    return boxes, torch.from_numpy(rng.random(n)), torch.from_numpy(rng.integers(0, 3, n))
