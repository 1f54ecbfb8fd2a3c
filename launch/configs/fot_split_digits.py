"""FOT and its baselines on split digits: 5 tasks of 2 classes each.

Task-incremental by default (the task id is known; the shared 10-way output layer
acts as one head per task by masking the logits to the task's classes, and that head
is not projected). ``--config.stream=class`` makes it class-incremental (no task id
at test time; the head is then projected like every other layer).

    python -m launch.continual --config=launch/configs/fot_split_digits.py
    python -m launch.continual --config=launch/configs/fot_split_digits.py:fedavg
"""
from launch.configs import fot_permuted_digits


def get_config(preset: str = "fot"):
  config = fot_permuted_digits.base_config()
  config.stream = "task"
  config.num_tasks = 5
  config.num_clients = 10
  config.clients_per_round = 5
  config.rounds_per_task = 20
  config.fot_eps = 0.97
  config.fot_exclude = ("Dense_2/kernel",)   # the (masked) output head
  return fot_permuted_digits.apply_preset(config, preset or "fot")
