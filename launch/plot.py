"""Turns run directories written by the launch scripts into PNGs.

    python -m launch.plot --workdir=/tmp/run                        # -> /tmp/run/plots/*.png
    python -m launch.plot --workdir=/tmp/fedavg --compare=/tmp/scaffold,/tmp/fedprox

Writes ``metrics.png`` (the run's curves from metrics.jsonl), ``clients.png`` (examples
per client and label mix, rebuilt from the run's config.json when its data is a
built-in source) and, with --compare, ``comparison.png`` (all runs on shared panels).
Prints the path of every file written.
"""
import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
_OUT = flags.DEFINE_string("out", None, "Folder for the PNGs (default: WORKDIR/plots).")
_COMPARE = flags.DEFINE_list("compare", [], "Other run directories to draw next to WORKDIR.")
_METRICS = flags.DEFINE_list("metrics", [], "Metrics to draw (default: losses and accuracy).")
_CLIENTS = flags.DEFINE_bool("clients", True, "Also draw the client statistics of the run's data.")


def client_data_from_config(workdir: str):
  """The run's federated training data, rebuilt from WORKDIR/config.json (or None)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  from fedjax_lab import data as data_lib
  with open(path) as f:
    config = json.load(f)
  if config.get("data") not in data_lib.DATA_NAMES:
    return None
  train, _ = data_lib.load_federated(
      data=config["data"], partition=config.get("partition", "dirichlet"),
      num_clients=config.get("num_clients", 100), alpha=config.get("alpha", 0.5),
      seed=config.get("data_seed", 0), test_fraction=config.get("test_fraction", 0.2))
  return train


def make_plots(workdir: str, out: str, compare=(), metrics=None, clients: bool = True
               ) -> list[str]:
  """Writes the PNGs of ``workdir`` (and the comparison with ``compare``) into ``out``."""
  from fedjax_lab import plotting
  keys = list(metrics or ()) or None
  name = os.path.basename(os.path.normpath(workdir))
  written = [plotting.save_figure(plotting.plot_metrics(workdir, keys, title=name),
                                  os.path.join(out, "metrics.png"))]
  if compare:
    runs = {os.path.basename(os.path.normpath(d)): d for d in [workdir, *compare]}
    if len(runs) < len(compare) + 1:   # same folder names in different places
      runs = {d: d for d in [workdir, *compare]}
    written.append(plotting.save_figure(plotting.plot_comparison(runs, keys),
                                        os.path.join(out, "comparison.png")))
  if clients:
    data = client_data_from_config(workdir)
    if data is not None:
      written.append(plotting.save_figure(plotting.plot_client_statistics(data),
                                          os.path.join(out, "clients.png")))
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a directory written by launch.train --workdir).")
  out = _OUT.value or os.path.join(_WORKDIR.value, "plots")
  try:
    written = make_plots(_WORKDIR.value, out, _COMPARE.value, _METRICS.value, _CLIENTS.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for path in written:
    print(path)


if __name__ == "__main__":
  app.run(main)
