"""The README's research-code example runs as written (with fewer rounds)."""
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_composition_example_runs():
  text = open(os.path.join(REPO, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  assert "rounds=100" in code
  namespace = {}
  exec(code.replace("rounds=100", "rounds=4").replace("rounds_per_call=10", "rounds_per_call=2"),
       namespace)
  state, history = namespace["state"], namespace["history"]
  assert int(state.round) == 4 and [h["round"] for h in history] == [1, 2, 3, 4]
  assert all(np.isfinite(h["train_loss"]) for h in history)
