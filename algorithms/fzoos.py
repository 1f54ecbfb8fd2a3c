"""FZooS: federated zeroth-order optimisation with trajectory-informed surrogate gradients.

Shu, Lin, Dai, Low. "Federated Zeroth-Order Optimization using Trajectory-Informed
Surrogate Gradients", ICML 2024 (arXiv 2308.04077), as in the authors' code
(``optimizers.py: fzoos_opt``, ``settings.py: FedZoo``):

    local surrogate:  mu_i = GP posterior mean on client i's query history (its whole
                      trajectory plus active exploration); g = grad mu_i(x_tau)
    shared surrogate: phi(x) = sqrt(2/M) cos(Omega x + b) from a seed all clients share;
                      nu_i = (Phi^T Phi + s2 I)^{-1} Phi^T y_i, f_hat_i = phi^T nu_i,
                      nu_bar = sum_i w_i nu_i, F_hat = phi^T nu_bar
    local step:       x_{tau+1} = x_tau - eta Adam(g + gamma_tau (grad F_hat(x_tau)
                                                     - grad f_hat_i(x_tau))),
                      gamma_tau = 1/(tau+1)
    server:           x_{r+1} = x_r + eta_g sum_i w_i (x_{i,T} - x_r);
                      x_{r+1} <- x_r if F(x_{r+1}) >= F(x_r)             (safeguard)
    round end:        each client queries f_i(x_{r+1}) and 50 of 200 candidates in the
                      box of radius mean|x_{r+1} - x_{i,T}|/2 around x_{r+1} (largest
                      gradient posterior variance), fits nu_i on its 500 queries
                      nearest to x_{r+1}; the server averages them into nu_bar.

The round end is the method's ``round_end`` exchange (after the server step, as the
code's ``run_server``): the surrogates that correct round r+1 are fitted around the
point where round r+1 starts. Round 1 has no correction (no surrogate yet), as in the
code. The safeguard compares the cohort's mean of f_i at x_{r+1} and x_r (F itself
when every client takes part, as in the paper's runs); those two values are
evaluations, not counted as queries, as the code's ``self.F``.

Queries of client i per round (``zeroth_order.surrogate_oracle`` for the local steps):
1 at x_r, 1 at each new iterate x_1..x_T, 5 exploration points at x_1..x_{T-1} (the 5
of 100 box candidates of radius 0.01 with the largest gradient posterior variance),
then at the round end 1 at x_{r+1} and the 50 exploration points:
``2 + T + 5 (T - 1) + 50``, plus 10 initial points on a client's first round.

The authors' behaviour is the default; the project's options, named:
* ``refit_at='client'``: fit nu_i at the end of the client's own round around its own
  x_{i,T} (radius mean|x_r - x_{i,T}|/2) and upload it with the update (one exchange
  per round; the correction is then evaluated away from where it was fitted);
* ``safeguard=False``: accept every server step;
* ``bounds``: project every local iterate onto the problem's box (the code does not;
  its objectives, like these, clip to [0, 1]^d and are flat outside).
Deviations in the estimators (kept): the local GP picks its lengthscale from a grid
by marginal likelihood (the code: L-BFGS with restarts), its noise is 1e-4 instead of
1e-6 (float32), its gradient is analytic (the code: finite differences of the GP
mean), exploration ranks candidates by the trace of the gradient's posterior
covariance (the code: its first coordinate), and the RFF ridge is 1e-4 (the code: 0).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from algorithms.fedzo import _value_fn, client_optimizer, local_schedule, problem_bounds
from fedjax_lab import server_rules
from fedjax_lab import zeroth_order as zo
from fedjax_lab.algorithm import FederatedAlgorithm


def rff_correction_grad(surrogate, x):
  """``grad_x phi(x)^T nu`` for ``surrogate = (rff, nu)``."""
  rff, nu = surrogate
  return zo.rff_grad(rff, nu, x)


class SurrogateConsensusState(NamedTuple):
  """The server's surrogate weights: nu = mean_i nu_i of the last fit (has_nu: any yet)."""
  nu: jax.Array
  has_nu: jax.Array


REFIT_AT = ("global", "client")


def surrogate_consensus(rff_features: int, from_aggregate: bool = False
                        ) -> server_rules.ServerRule:
  """Holds nu_bar, the averaged RFF weights the next round's correction uses.

  ``from_aggregate``: keep ``aggregate['nu']`` (clients upload nu_i with their update,
  ``refit_at='client'``); else the state is written by the round end (``fzoos``).
  """
  def init_fn(x):
    return SurrogateConsensusState(jnp.zeros((rff_features,), x.dtype), jnp.zeros((), bool))

  def update_fn(updates, state, params=None, *, aggregate=None, **extra):
    del params, extra
    if from_aggregate:
      state = SurrogateConsensusState(aggregate["nu"], jnp.ones((), bool))
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masked_mean(values, real):
  w = real.astype(values.dtype).reshape((-1,) + (1,) * (values.ndim - 1))
  return jnp.sum(w * values, 0) / jnp.maximum(jnp.sum(w), 1.0)


def fzoos(value: zo.ObjectiveFn, row_template: dict, dim: int, client_lr: float = 0.01,
          local_steps: int = 10, surrogate: zo.SurrogateConfig = zo.SurrogateConfig(),
          rff_features: int = 10000, rff_lengthscale: float = 1.0, rff_kernel: str = "se",
          rff_noise: float = 1e-4, rff_points: int = 500, rff_explore: int = 50,
          rff_candidates: int = 200, rff_min_radius: float = 1e-3, rff_seed: int = 0,
          gamma: str = "decay", correction: bool = True, server_lr: float = 1.0,
          optimizer: str = "adam", bounds=None, safeguard: bool = True,
          refit_at: str = "global", name: str = "fzoos") -> FederatedAlgorithm:
  """FZooS on objectives ``value(x, row)``.

  Args:
    value: a client's objective, ``(x [d], row) -> scalar``.
    row_template: one client's row (shapes and dtypes; e.g. ``Problem.row_template()``),
      kept in the oracle state so that the round-end queries can reach the objective.
    dim: d, the size of x.
    client_lr, local_steps, optimizer: the client's base optimiser (Adam(0.01)) and T.
    surrogate: the local GP and its exploration (``zeroth_order.SurrogateConfig``).
    rff_features: M (10000); rff_lengthscale: l of the shared features (1.0, fixed);
    rff_kernel: ``'se'`` (the code) or ``'matern52'``;
    rff_noise: ridge s2 on min-max normalised values (the code: 0, minimum norm);
    rff_points: the surrogate is fitted on this many queries nearest to its centre (500);
    rff_explore, rff_candidates: round-end exploration (50 of 200);
    rff_min_radius: floor of the round-end box radius;
    rff_seed: the seed all clients draw Omega and b from.
    gamma: ``'decay'`` (1/(tau+1)) or ``'constant'``.
    correction: False drops the surrogate correction and the round-end fit (local GP
      gradients only; the code's ``--correction none``).
    server_lr: eta_g.
    bounds: ``(lower, upper)`` to project every local iterate onto that box (None: no
      projection, as in FZooS's code).
    safeguard: keep x_r when the cohort's mean value does not decrease (the code).
    refit_at: ``'global'``: the round end fits the surrogates around x_{r+1} (the
      code); ``'client'``: each client fits its own around x_{i,T} (one exchange).
    name: registry name.
  """
  surrogate.validate()
  zo._check_choice("gamma", gamma, zo.GAMMAS)
  zo._check_choice("refit_at", refit_at, REFIT_AT)
  for key, val in (("rff_features", rff_features), ("rff_points", rff_points),
                   ("rff_candidates", rff_candidates)):
    if val < 1:
      raise ValueError(f"{key} must be >= 1, got {val}.")
  if not 0 <= rff_explore <= rff_candidates:
    raise ValueError(f"rff_explore must be in [0, rff_candidates={rff_candidates}], "
                     f"got {rff_explore}.")
  if surrogate.buffer_size < max(surrogate.num_init, surrogate.num_explore, rff_explore) + 1:
    raise ValueError(f"buffer_size={surrogate.buffer_size} is smaller than one step's queries.")
  rff_key = jax.random.PRNGKey(rff_seed)
  at_client = refit_at == "client"
  values_at = jax.vmap(value, in_axes=(0, None))

  def features():
    return zo.rff_init(rff_key, dim, rff_features, rff_lengthscale, rff_kernel)

  def init_client_state(x):
    if jnp.ndim(x) != 1 or x.shape[0] != dim:
      raise ValueError(f"FZooS optimises a vector of size dim={dim}, got params of shape "
                       f"{jnp.shape(x)}.")
    return {"buffer": zo.buffer_init(surrogate.buffer_size, dim, x.dtype),
            "nu": jnp.zeros((rff_features,), x.dtype),
            "has_nu": jnp.zeros((), bool),
            "lengthscale": jnp.ones((), x.dtype),
            "last": jnp.zeros_like(x),
            "queries": jnp.zeros((), jnp.int32)}

  def broadcast(state):
    consensus = server_rules.require_state(state.rule_state, SurrogateConsensusState,
                                           "surrogate_consensus")
    return {"params": state.params, "nu": consensus.nu, "has_nu": consensus.has_nu,
            "rff": features()}

  def init_oracle_state(down, client_state):
    return zo.surrogate_oracle_state(client_state["buffer"], row_template,
                                     client_state["lengthscale"])

  def client_extra_args(down, client_state):
    on = down["has_nu"] & client_state["has_nu"] & correction
    return {"global_params": down["params"],
            "global_surrogate": (down["rff"], down["nu"]),
            "local_surrogate": (down["rff"], client_state["nu"]),
            "correction_scale": on.astype(down["params"].dtype)}

  def fit_surrogate(rff, buffer, center, f_center, row, key, radius, lengthscale):
    """Queries f at ``center`` and the round-end exploration points, fits nu there."""
    buffer = zo.buffer_add(buffer, center[None, :], f_center[None])
    radius = jnp.maximum(radius, rff_min_radius)
    points = zo.most_uncertain(buffer, center, key, radius, rff_candidates, rff_explore,
                               surrogate, lengthscale)
    buffer = zo.buffer_add(buffer, points, values_at(points, row))
    xs, ys, mask = zo.buffer_nearest(buffer, center, rff_points)
    nu = zo.rff_fit(rff, xs, ys, mask, rff_noise).nu
    return buffer, jnp.where(jnp.all(jnp.isfinite(nu)), nu, 0.0)

  def client_final(local, down, client_state):
    x_r, x_t = down["params"], local.params
    oracle = local.oracle_state
    active = local.num_steps > 0
    f_t = value(x_t, oracle.row)                       # the query at the last iterate
    buffer = zo.buffer_add(oracle.buffer, x_t[None, :], f_t[None])
    new_state = dict(client_state, buffer=buffer, lengthscale=oracle.lengthscale, last=x_t,
                     queries=client_state["queries"] + oracle.queries + 1)
    up = {"delta": x_t - x_r}
    if at_client and correction:
      key = jax.random.fold_in(oracle.key, local_steps + 1)
      buffer, nu = fit_surrogate(down["rff"], oracle.buffer, x_t, f_t, oracle.row, key,
                                 jnp.mean(jnp.abs(x_r - x_t)) / 2, oracle.lengthscale)
      new_state.update(buffer=buffer, nu=nu, has_nu=jnp.ones((), bool),
                       queries=new_state["queries"] + rff_explore)
      up["nu"] = jnp.where(active, nu, 0.0)
    new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state,
                             client_state)
    return up, new_state

  def round_end(before, after, cohort, rows, keys, real):
    """The safeguard, then each cohort client's surrogate fit around the new x."""
    data = {k: v[:, 0] for k, v in cohort.items() if k != "mask"}
    x_r, x_new = before.params, after.params
    values = jax.vmap(value, in_axes=(None, 0))
    f_new = values(x_new, data)
    x, f_x = x_new, f_new
    if safeguard:
      f_old = values(x_r, data)                        # the round's first queries
      reject = _masked_mean(f_new, real) >= _masked_mean(f_old, real)
      x = jnp.where(reject, x_r, x_new)
      f_x = jnp.where(reject, f_old, f_new)
      after = after._replace(params=x)
    if not correction or at_client:
      return after, rows
    rff = features()

    def one(row_state, row, key, f_center):
      key = jax.random.fold_in(key, local_steps + 1)
      radius = jnp.mean(jnp.abs(x - row_state["last"])) / 2
      buffer, nu = fit_surrogate(rff, row_state["buffer"], x, f_center, row, key, radius,
                                 row_state["lengthscale"])
      return dict(row_state, buffer=buffer, nu=nu, has_nu=jnp.ones((), bool),
                  queries=row_state["queries"] + 1 + rff_explore)

    fitted = jax.vmap(one)(rows, data, keys, f_x)
    rows = jax.tree.map(lambda new, old: jnp.where(
        real.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), fitted, rows)
    consensus = SurrogateConsensusState(_masked_mean(fitted["nu"], real), jnp.ones((), bool))
    return after._replace(rule_state=server_rules.replace_state(after.rule_state,
                                                                consensus)), rows

  client_tx = optax.chain(zo.surrogate_correction(rff_correction_grad, gamma),
                          client_optimizer(optimizer, client_lr))
  if bounds is not None:
    client_tx = optax.chain(client_tx, zo.project_to_box(*bounds))
  needs_round_end = safeguard or (correction and not at_client)
  return FederatedAlgorithm(
      name=name, oracle=zo.surrogate_oracle(value, surrogate), client_tx=client_tx,
      server_tx=optax.sgd(server_lr), schedule=local_schedule(local_steps), weighting="uniform",
      server_rule=surrogate_consensus(rff_features, at_client and correction),
      init_client_state=init_client_state, broadcast=broadcast,
      client_extra_args=client_extra_args, client_final=client_final,
      init_oracle_state=init_oracle_state, round_end=round_end if needs_round_end else None)


def queries_per_round(local_steps: int, num_explore: int = 5, rff_explore: int = 50,
                      correction: bool = True) -> int:
  """Queries of one client in a round after its first: ``2 + T + e (T - 1) + E`` (the
  round end's query at x_{r+1} and its E exploration points; ``1 + T + e (T - 1)``
  without the correction)."""
  local = 1 + local_steps + num_explore * (local_steps - 1)
  return local + (1 + rff_explore if correction else 0)


def surrogate_from_config(config) -> zo.SurrogateConfig:
  lengthscale = config.get("lengthscale", 0.0)
  grid = config.get("lengthscale_grid", None)
  defaults = zo.SurrogateConfig()
  return zo.SurrogateConfig(
      kernel=config.get("kernel", defaults.kernel),
      lengthscale=None if not lengthscale else float(lengthscale),
      lengthscale_grid=tuple(grid) if grid else defaults.lengthscale_grid,
      noise=config.get("gp_noise", defaults.noise),
      num_points=config.get("gp_points", defaults.num_points),
      num_init=config.get("num_init", defaults.num_init),
      init_radius=config.get("init_radius", defaults.init_radius),
      num_explore=config.get("num_explore", defaults.num_explore),
      num_candidates=config.get("num_candidates", defaults.num_candidates),
      explore_radius=config.get("explore_radius", defaults.explore_radius),
      buffer_size=config.get("buffer_size", defaults.buffer_size))


def from_config(config, problem):
  """Registry entry: ``problem`` is a ``fedjax_lab.objectives.Problem``."""
  if not hasattr(problem, "row_template"):
    raise ValueError("fzoos needs a black-box problem (fedjax_lab.objectives.Problem) with "
                     "row_template(), not a model loss.")
  return fzoos(
      _value_fn(problem), problem.row_template(), problem.dim,
      client_lr=config.get("client_lr", 0.01), local_steps=config.get("local_steps", 10),
      surrogate=surrogate_from_config(config),
      rff_features=config.get("rff_features", 10000),
      rff_lengthscale=config.get("rff_lengthscale", 1.0),
      rff_kernel=config.get("rff_kernel", "se"), rff_noise=config.get("rff_noise", 1e-4),
      rff_points=config.get("rff_points", 500), rff_explore=config.get("rff_explore", 50),
      rff_candidates=config.get("rff_candidates", 200),
      rff_seed=config.get("rff_seed", 0), gamma=config.get("gamma", "decay"),
      correction=config.get("correction", True), server_lr=config.get("server_lr", 1.0),
      optimizer=config.get("client_optimizer", "adam"), bounds=problem_bounds(config, problem),
      safeguard=config.get("safeguard", True), refit_at=config.get("refit_at", "global"))
