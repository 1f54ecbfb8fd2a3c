"""Builds a run from a config: data, model, method; shared by launch scripts and notebooks."""
import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax

import algorithms
from fedjax_lab import data as data_lib
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import sampling
from fedjax_lab import models as models_lib
from fedjax_lab import training
from fedjax_lab.models import text as text_models
from launch import compression as compression_launch
from launch import robust


@dataclasses.dataclass
class Experiment:
  algorithm: Any
  model: models_lib.Model
  train_data: data_lib.FederatedData
  test_arrays: dict
  init_params: Any
  evaluate: Optional[Callable] = None   # (params, arrays) -> metrics; None: clean accuracy/loss
  attacks: Optional[dict] = None        # robust evaluation's attacks, by name (None: clean only)
  info: Any = None                      # data_lib.DataInfo (per-client test splits, held-out clients)
  example_loss: Optional[Callable] = None   # what the method was built on (studies rebuild it)


def robust_attacks_from_config(config) -> Optional[dict]:
  """FGSM + PGD-k attacks from ``config.robust_eval`` (None when it is absent or empty).

  Keys: eps, norm ('linf'/'l2'), pgd_steps, pgd_step_size (default eps/8), rand_init,
  fgsm (bool), clip_min, clip_max; also batch_size and seed (default config.seed),
  which ``build`` passes to the evaluator.
  """
  cfg = config.get("robust_eval")
  if not cfg:
    return None
  return metrics_lib.robust_attacks(
      eps=cfg.eps, norm=cfg.get("norm", "linf"), pgd_steps=cfg.get("pgd_steps", 20),
      pgd_step_size=cfg.get("pgd_step_size"), rand_init=cfg.get("rand_init", True),
      fgsm=cfg.get("fgsm", True), clip_min=cfg.get("clip_min", 0.0),
      clip_max=cfg.get("clip_max", 1.0))


def check_names(config) -> None:
  """Raises ValueError for an unknown algorithm, partition or model name, before any
  data loads (each message lists the known names)."""
  if config.get("algorithm") not in algorithms.REGISTRY:
    known = ", ".join(sorted(algorithms.REGISTRY))
    raise ValueError(f"Unknown algorithm {config.get('algorithm')!r}; known algorithms: {known}.")
  if "partition" in config and config.partition not in data_lib.PARTITION_NAMES:
    raise ValueError(f"Unknown partition {config.partition!r}; known: "
                     f"{', '.join(data_lib.PARTITION_NAMES)}.")
  known_models = tuple(models_lib.MODELS) + ("mlp_bn",)
  if "model" in config and config.model not in known_models:
    raise ValueError(f"Unknown model {config.model!r}; known: {', '.join(known_models)}.")


def divergence(history, factor: float, summary: Optional[dict] = None) -> dict:
  """``{'diverged', 'diverged_round'}``: the first round whose train_loss is not finite
  or exceeds ``factor`` times the first round's, or else (a run that blew up in its
  first round) a final ``test_loss`` above ``factor`` times the summary's
  ``initial_test_loss`` (the round: the last). ``factor <= 0``: non-finite only."""
  losses = [(h["round"], h.get("train_loss")) for h in history
            if h.get("train_loss") is not None]
  for round_, loss in losses:
    if not math.isfinite(loss) or (factor > 0 and loss > factor * max(losses[0][1], 1e-12)):
      return {"diverged": True, "diverged_round": round_}
  summary = summary or {}
  initial, final = summary.get("initial_test_loss"), summary.get("test_loss")
  if initial is not None and final is not None and (
      not math.isfinite(final) or (factor > 0 and final > factor * max(initial, 1e-12))):
    return {"diverged": True, "diverged_round": summary.get("rounds")}
  return {"diverged": False, "diverged_round": None}


def build(config) -> Experiment:
  """Data, model, initial params and method from a config (raises ValueError on bad keys).

  The partition and the train/test split follow ``config.data_seed`` (default 0); the
  model init, the cohort draws and the client shuffles follow ``config.seed``, so runs
  of different seeds (a study's) share their data.
  """
  if "finetune" in config:   # a pre-trained transformer LM fine-tuned federatedly
    from launch import lm
    return lm.build(config)
  train_data, test_arrays, info = data_lib.load_federated_with_info(
      data=config.data, partition=config.partition, num_clients=config.num_clients,
      alpha=config.get("alpha", 0.5), seed=config.get("data_seed", 0),
      test_fraction=config.get("test_fraction", 0.2),
      num_shards_per_partition=config.get("num_shards_per_partition", 2),
      num_classes_per_partition=config.get("num_classes_per_partition", 2),
      sequence_length=config.get("sequence_length", None),
      vocab_size=config.get("vocab_size", 10000), data_dir=config.get("data_dir", None),
      client_test_fraction=config.get("client_test_fraction", 0.0),
      held_out_clients=config.get("held_out_clients", 0))
  attacks = None
  if info.task == "next_token":
    # Next-token text (Shakespeare, Stack Overflow): a char LM with a per-token masked loss.
    model = text_models.char_lm(info.num_classes)
    example_loss = text_models.sequence_loss(model)
    evaluate = text_models.make_sequence_evaluator(model)
  else:
    if config.model == "mlp":
      model = models_lib.mlp(config.get("hidden", (200,)), info.num_classes)
    elif config.model == "mlp_bn":
      from fedjax_lab.models import batchnorm
      model = batchnorm.mlp_bn(config.get("hidden", (200,)), info.num_classes)
    elif config.model == "cnn":
      model = models_lib.cnn(config.get("cnn_features", (32, 64)), config.get("cnn_dense", 128),
                             info.num_classes)
    else:
      model = models_lib.get(config.model, num_classes=info.num_classes)
    example_loss = models_lib.classification_loss(model)
    attacks = robust_attacks_from_config(config)
    if attacks:
      cfg = config.robust_eval
      evaluate = metrics_lib.make_robust_evaluator(
          model, attacks, batch_size=cfg.get("batch_size", 1024),
          seed=cfg.get("seed", config.seed))
    else:
      evaluate = metrics_lib.make_evaluator(model)
  # One compiled init instead of one small compilation per eager op.
  init_params = jax.jit(model.init)(jax.random.PRNGKey(config.seed + 1),
                                    train_data.arrays["x"][:1])
  method = algorithms.build(config.algorithm, config, example_loss, model=model)
  # Byzantine clients, robust aggregators and DP (config keys absent: unchanged).
  method = robust.apply_robustness(method, config, train_data.num_clients)
  # Compressed uplink / downlink (config.compression, ...; 'none': unchanged).
  method = compression_launch.apply_compression(method, config)
  return Experiment(method, model, train_data, test_arrays, init_params, evaluate, attacks, info,
                    example_loss)


def build_any(config):
  """``(method, init_params, train_data)`` for the config of any registered method.

  Dispatches on the config's keys as ``algorithms.example_config`` documents:
  ``stream`` (continual: the first task's clients), ``problem`` (black-box
  objectives: the problem's clients and x0), else an image or text task.
  """
  if "stream" in config:
    from launch import continual
    stream, _, method, params = continual.build(config)
    return method, params, stream[0].train
  if "problem" in config:
    from launch import zeroth_order
    problem = zeroth_order.make_problem(config)
    return (algorithms.build(config.algorithm, config, problem), jax.numpy.asarray(problem.x0),
            problem.data)
  exp = build(config)
  return exp.algorithm, exp.init_params, exp.train_data


def run(config, workdir: Optional[str] = None, progress: bool = True, writers=()):
  """Trains per ``config``; returns (state, history, summary dict).

  ``writers`` (objects with ``write(record)``, e.g. a TensorBoard writer) get every
  per-round record, as ``training.TrainOptions.writers``.
  """
  start = time.perf_counter()
  exp = build(config)
  cohort_slots, sampler, sampling_info = config.clients_per_round, None, {}
  if robust.dp_sampling(config) == "poisson":
    # DP-FedAvg's sampling: each client joins with q = C / N; the round has slots for
    # the largest cohort but one in 1e9 (a larger one stops the run).
    sampler, cohort_slots = sampling.poisson_sampler(
        exp.train_data.num_clients, config.clients_per_round / exp.train_data.num_clients)
    sampling_info = {"dp_cohort_slots": cohort_slots, "dp_overflow_probability": 1e-9}
  elif robust.dp_sampling(config) == "epochs":
    # DP-FTRL's participation: each epoch a permutation of the population, C per round.
    sampler = sampling.shuffled_epochs_sampler(exp.train_data.num_clients,
                                               config.clients_per_round, config.seed + 104729)
  opts = training.TrainOptions(
      rounds=config.rounds, clients_per_round=cohort_slots, backend=config.backend,
      sampler=sampler,
      chunk_size=config.get("chunk_size") or "auto", donate_state=config.get("donate_state", False),
      client_states=config.get("client_states", "device"),
      client_state_dir=config.get("client_state_dir"),
      seed=config.seed, eval_every=config.eval_every,
      checkpoint_every=config.get("checkpoint_every", 0),
      rounds_per_call=config.get("rounds_per_call", 1), workdir=workdir, progress=progress,
      writers=tuple(writers))
  evaluate = exp.evaluate or metrics_lib.make_evaluator(exp.model)
  # The clean loss only: a robust evaluator would also attack the untrained model.
  clean = metrics_lib.make_evaluator(exp.model) if exp.attacks else evaluate
  initial = metrics_lib.to_python(clean(exp.init_params, exp.test_arrays))
  state, history = training.train(exp.algorithm, exp.init_params, exp.train_data,
                                  evaluate, exp.test_arrays, opts)
  final = metrics_lib.to_python(evaluate(state.params, exp.test_arrays))
  summary = {"algorithm": config.algorithm, "rounds": int(state.round),
             "test_accuracy": final["accuracy"], "test_loss": final["loss"],
             "initial_test_loss": initial["loss"],
             "train_loss": history[-1]["train_loss"] if history else None,
             "backend": config.backend, "num_clients": exp.train_data.num_clients,
             "clients_per_round": config.clients_per_round,
             "wall_s": round(time.perf_counter() - start, 3)}
  summary.update({k: config[k] for k in ("aggregator", "attack", "malicious_fraction") if k in config})
  summary.update(robust.privacy_report(config, exp.train_data.num_clients, int(state.round)))
  summary.update(sampling_info)
  if "finetune" in config:
    from launch import lm
    summary.update(lm.report(config, exp))
  summary.update(compression_launch.report(exp.algorithm, state))
  if "robust_accuracy" in final:
    # Robust evaluation (config.robust_eval): accuracy under each attack at radius eps.
    summary.update({k: v for k, v in final.items() if k not in ("accuracy", "loss")})
    summary["robust_eps"] = float(config.robust_eval.eps)
  if exp.info.client_test is not None:
    from launch import personal   # per-client accuracy on the clients' own test splits
    summary.update(personal.report(exp, state, config.seed))
  return state, history, summary
