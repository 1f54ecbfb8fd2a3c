"""FedZO: FedAvg whose clients estimate gradients from function values only.

Fang, Yu, Jiang, Shi, Jones, Zhou. "Communication-Efficient Stochastic Zeroth-Order
Optimization for Federated Learning", IEEE Trans. Signal Processing 2022 (Algorithm 1):

    client i, local step t:  g = (c/q) sum_j [f_i(x + mu u_j) - f_i(x)] / mu * u_j
                             x <- x - eta g          (client optimiser; Adam in FZooS's code)
    server:                  x_{r+1} = x_r + eta_g * sum_i w_i (x_{i,T} - x_r)

Defaults follow the baseline in FZooS's code (Shu et al., ICML 2024): q = 20
orthonormal directions, mu = 0.01, c = 1, Adam(0.01) on the clients, eta_g = 1. The
paper's own estimator is ``directions='sphere', scale='d'``.

Corrections of the same estimator (FZooS's ``--correction``):
* ``'none'``: FedZO.
* ``'prox'``: FedProx's term, g + mu_prox (x - x_r) (Li et al. 2020, eq. 2; mu_prox = 1).
* ``'scaf'``: SCAFFOLD (Karimireddy et al. 2020, eq. 3) with the control variate
  c_i = the mean of client i's raw estimates of its last round (FZooS's "type II").
* ``'diff'``: SCAFFOLD option I, c_i = the estimate at the broadcast point x_r (the
  first local step's), used in the client's next round as SCAFFOLD does. FZooS's code
  re-estimates at x_{r+1} with extra uncounted queries; this uses the queries made.
  c = sum_i w_i c_i is kept by the server (SCAFFOLD's c += |S|/N mean_S Delta c_i).

Every client state counts its queries (q + 1 per local step) in ``'queries'``.
"""
import jax.numpy as jnp
import optax

from algorithms.scaffold import control_update, global_control
from fedjax_lab import server_rules
from fedjax_lab import zeroth_order as zo
from fedjax_lab.algorithm import FederatedAlgorithm
from fedjax_lab.client import LocalSchedule
from fedjax_lab.transforms import add_control_variate, proximal

CORRECTIONS = ("none", "prox", "scaf", "diff")
CLIENT_OPTIMIZERS = ("adam", "sgd")


def client_optimizer(kind: str, lr: float) -> optax.GradientTransformation:
  if kind == "adam":
    return optax.adam(lr)
  if kind == "sgd":
    return optax.sgd(lr)
  raise ValueError(f"Unknown client optimizer {kind!r}; choose one of "
                   f"{', '.join(CLIENT_OPTIMIZERS)}.")


def local_schedule(local_steps: int) -> LocalSchedule:
  """``local_steps`` steps on the client's single objective row."""
  return LocalSchedule(batch_size=1, steps=local_steps, shuffle=False)


def fedzo(value: zo.ObjectiveFn, client_lr: float = 0.01, local_steps: int = 10,
          num_directions: int = 20, smoothing: float = 0.01, directions: str = "orthonormal",
          scale: str = "1", correction: str = "none", prox_mu: float = 1.0,
          server_lr: float = 1.0, optimizer: str = "adam", bounds=None, name: str = "fedzo"
          ) -> FederatedAlgorithm:
  """FedZO and its corrected variants on objectives ``value(x, row)``.

  Args:
    value: a client's objective, ``(x [d], row) -> scalar``.
    client_lr: client learning rate.
    local_steps: T, local steps per round.
    num_directions, smoothing, directions, scale: the two-point estimator (q, mu, ...).
    correction: one of ``CORRECTIONS``.
    prox_mu: FedProx strength for ``correction='prox'``.
    server_lr: eta_g.
    optimizer: client optimizer, ``'adam'`` or ``'sgd'``.
    bounds: ``(lower, upper)`` to project every local iterate onto that box (None: no
      projection, as in FZooS's code).
    name: registry name.
  """
  if correction not in CORRECTIONS:
    raise ValueError(f"Unknown correction {correction!r}; choose one of {', '.join(CORRECTIONS)}.")
  base_tx = client_optimizer(optimizer, client_lr)
  if bounds is not None:
    base_tx = optax.chain(base_tx, zo.project_to_box(*bounds))
  controlled = correction in ("scaf", "diff")

  def init_client_state(x):
    state = {"queries": jnp.zeros((), jnp.int32)}
    if controlled:
      state["control"] = jnp.zeros_like(x)
    return state

  def broadcast(state):
    down = {"params": state.params}
    if controlled:
      down["control"] = global_control(state)
    return down

  def client_extra_args(down, client_state):
    extra = {"global_params": down["params"]}
    if controlled:
      extra["control"] = down["control"] - client_state["control"]
    return extra

  def client_final(local, down, client_state):
    x = down["params"]
    active = local.num_steps > 0
    up = {"delta": local.params - x}
    new_state = {"queries": client_state["queries"] + local.aux_totals["queries"]}
    if controlled:
      oracle = local.oracle_state
      mean = oracle.grad_sum / jnp.maximum(local.num_steps, 1).astype(x.dtype)
      control = jnp.where(active, mean if correction == "scaf" else oracle.first,
                          client_state["control"])
      up["control_delta"] = control - client_state["control"]
      new_state["control"] = control
    return up, new_state

  if correction == "prox":
    client_tx = optax.chain(proximal(prox_mu), base_tx)
  elif controlled:
    client_tx = optax.chain(add_control_variate(), base_tx)
  else:
    client_tx = base_tx
  return FederatedAlgorithm(
      name=name, oracle=zo.two_point_oracle(value, num_directions, smoothing, directions, scale),
      client_tx=client_tx, server_tx=optax.sgd(server_lr), schedule=local_schedule(local_steps),
      weighting="uniform", init_client_state=init_client_state,
      server_rule=control_update() if controlled else server_rules.identity(),
      broadcast=broadcast, client_extra_args=client_extra_args, client_final=client_final)


def _value_fn(problem):
  value = getattr(problem, "value", problem)
  if not callable(value):
    raise ValueError("Zeroth-order methods need a black-box problem (fedjax_lab.objectives."
                     "Problem) or an objective value(x, row), not a model loss.")
  return value


def problem_bounds(config, problem):
  """The problem's box when ``config.project`` is set, else None."""
  if not config.get("project", False):
    return None
  bounds = getattr(problem, "bounds", None)
  if bounds is None:
    raise ValueError("config.project is set but the problem has no bounds.")
  return bounds


def from_config_for(correction: str):
  """Registry entry ``(config, problem) -> FederatedAlgorithm`` for one correction."""
  name = "fedzo" if correction == "none" else f"fedzo_{correction}"

  def from_config(config, problem):
    return fedzo(_value_fn(problem), client_lr=config.get("client_lr", 0.01),
                 local_steps=config.get("local_steps", 10),
                 num_directions=config.get("num_directions", 20),
                 smoothing=config.get("smoothing", 0.01),
                 directions=config.get("directions", "orthonormal"),
                 scale=str(config.get("scale", "1")), correction=correction,
                 prox_mu=config.get("prox_mu", 1.0), server_lr=config.get("server_lr", 1.0),
                 optimizer=config.get("client_optimizer", "adam"),
                 bounds=problem_bounds(config, problem), name=name)
  return from_config
