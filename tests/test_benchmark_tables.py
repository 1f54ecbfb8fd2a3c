"""launch.benchmark's reporting: a timed cell's median and spread (against numpy) and the
markdown cells and study table built from them."""
import numpy as np

from launch import benchmark


def test_spread_is_the_median_min_and_max_of_the_repetitions():
  times = [0.31, 0.12, 0.27, 0.2]
  cell = benchmark.spread(times)
  assert cell["median"] == np.median(times)
  assert (cell["min"], cell["max"]) == (np.min(times), np.max(times))
  assert cell["all"] == times


def test_markdown_cells_show_median_and_range():
  row = {"ours_vmap_s_per_round": 0.0109, "ours_vmap_s_per_round_min": 0.0105,
         "ours_vmap_s_per_round_max": 0.0113, "limit_s_per_round": 0.25}
  assert benchmark._cell(row, "ours_vmap_s_per_round") == "10.9 [10.5–11.3]"
  assert benchmark._cell(row, "limit_s_per_round") == "250"     # no spread recorded
  assert benchmark._cell(row, "flower_s_per_round") == "–"
  vmapped, sequential, processes = [30.0, 29.0, 33.0], [90.0, 95.0, 87.0], [150.0, 160.0, 140.0]
  study = {"workload": "study16", "runs": 16, "rounds": 20, "repeats": 3,
           "vmapped_compiles": [1, 1, 1]}
  for name, times in (("vmapped", vmapped), ("sequential", sequential),
                      ("processes", processes)):
    cell = benchmark.spread(times)
    study.update({f"{name}_s": cell["median"], f"{name}_s_min": cell["min"],
                  f"{name}_s_max": cell["max"]})
  ratios = np.array(sequential) / np.array(vmapped)
  study.update(sequential_over_vmapped=90.0 / 30.0, sequential_over_vmapped_min=ratios.min(),
               sequential_over_vmapped_max=ratios.max())
  line = benchmark.study_table([study]).splitlines()[-1]
  assert line.startswith("| 16 | 20 | 3 | 30.0 [29.0–33.0] | 90.0 [87.0–95.0] | "
                         "150.0 [140.0–160.0] | 3.00 [2.64–3.28] | – | 1, 1, 1 |"), line
