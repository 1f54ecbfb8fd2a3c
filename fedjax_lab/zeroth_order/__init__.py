"""Zeroth-order gradient estimation: random directions, GP and random-Fourier surrogates.

Building blocks of federated zeroth-order optimisation, where a client can only
query values ``f_i(x)`` of its objective:

* ``two_point``: the random-direction finite difference of FedZO (Fang et al.,
  "Communication-Efficient Stochastic Zeroth-Order Optimization for Federated
  Learning", IEEE TSP 2022), ``g = (c/q) sum_j [f(x + mu u_j) - f(x)]/mu u_j``.
* ``gp``: a Gaussian-process surrogate fitted to a client's query history (FZooS: Shu,
  Lin, Dai, Low, "Federated Zeroth-Order Optimization using Trajectory-Informed
  Surrogate Gradients", ICML 2024, arXiv 2308.04077): the posterior mean, its gradient
  (the gradient estimate) and the posterior variance of that gradient (the exploration
  criterion), for the squared-exponential and Matern-5/2 kernels;
* ``rff``: random Fourier features (Rahimi & Recht 2007) drawn from a seed all clients
  share, and the weight-space GP mean ``nu = (Phi^T Phi + s2 I)^{-1} Phi^T y`` that FZooS
  clients upload so that the server can average surrogates;
* ``buffer``: a fixed-capacity query ring buffer, so that everything here is pure JAX
  with static shapes and ``jit``s / ``vmap``s over clients;
* ``oracles`` and ``transforms``: the gradient oracles, the surrogate-correction client
  transform and the projection onto a box that ``algorithms/fedzo.py`` and
  ``algorithms/fzoos.py`` compose;
* ``common``: the objective convention below and the argument checks.

An objective is ``value(x [d], row) -> scalar``; ``row`` is one client's data row (a
dict of arrays without the batch axis), so the round's gather hands every client its
own objective. The optimisation variable ``x`` (the engine's params) is a 1-D array.

Every public name of the modules is re-exported here: ``zeroth_order.gp_fit`` is
``zeroth_order.gp.gp_fit``.
"""
from fedjax_lab.zeroth_order.buffer import (QueryBuffer, buffer_add, buffer_init,
                                            buffer_nearest, buffer_valid)
from fedjax_lab.zeroth_order.common import ObjectiveFn, first_row
# Not public, but algorithms/fzoos.py validates its options with it.
from fedjax_lab.zeroth_order.common import _check_choice  # noqa: F401
from fedjax_lab.zeroth_order.gp import (KERNELS, GPPosterior, fit_best_lengthscale, gp_fit,
                                        gp_grad, gp_grad_variance, gp_grad_variance_trace,
                                        gp_log_marginal_likelihood, gp_mean, kernel_and_slope,
                                        kernel_matrix, normalize_values, select_lengthscale,
                                        sqdist_matrix)
from fedjax_lab.zeroth_order.oracles import (SurrogateConfig, SurrogateState, TwoPointState,
                                             fit_local_gp, most_uncertain, surrogate_oracle,
                                             surrogate_oracle_state, two_point_oracle,
                                             uniform_box)
from fedjax_lab.zeroth_order.rff import (RFF, RIDGE_FORMS, RFFSurrogate, ridge_weights,
                                         rff_features, rff_fit, rff_grad, rff_init, rff_mean)
from fedjax_lab.zeroth_order.transforms import (GAMMAS, CorrectionState, project_to_box,
                                                surrogate_correction)
from fedjax_lab.zeroth_order.two_point import (DIRECTIONS, SCALES, sample_directions,
                                               two_point_estimate)

__all__ = [
    # two_point
    "DIRECTIONS", "SCALES", "sample_directions", "two_point_estimate",
    # buffer
    "QueryBuffer", "buffer_add", "buffer_init", "buffer_nearest", "buffer_valid",
    # gp
    "KERNELS", "GPPosterior", "fit_best_lengthscale", "gp_fit", "gp_grad", "gp_grad_variance",
    "gp_grad_variance_trace", "gp_log_marginal_likelihood", "gp_mean", "kernel_and_slope",
    "kernel_matrix", "normalize_values", "select_lengthscale", "sqdist_matrix",
    # rff
    "RFF", "RIDGE_FORMS", "RFFSurrogate", "ridge_weights", "rff_features", "rff_fit",
    "rff_grad", "rff_init", "rff_mean",
    # oracles
    "SurrogateConfig", "SurrogateState", "TwoPointState", "fit_local_gp", "most_uncertain",
    "surrogate_oracle", "surrogate_oracle_state", "two_point_oracle", "uniform_box",
    # transforms
    "GAMMAS", "CorrectionState", "project_to_box", "surrogate_correction",
    # common
    "ObjectiveFn", "first_row",
]
