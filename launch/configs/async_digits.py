"""Asynchronous methods on the digits clients under a simulated clock (launch.async_train).

100 clients (Dirichlet 0.5), 20 in flight, lognormal compute times (sigma 1).
    python -m launch.async_train --config=launch/configs/async_digits.py
    python -m launch.async_train --config=launch/configs/async_digits.py --config.algorithm=fedavg_sync
algorithm: fedavg_sync | fedasync | fedbuff | fedfix | fedcompass | fedau | fedau_sync |
fedamd | afa_cd.
base_algorithm is the engine method whose client update, aggregator and server step
run under the clock (fedavg, fedprox, fedadam, ...; robustness keys of shared.py apply).
"""
from launch.configs import fedavg_digits


def get_config():
  config = fedavg_digits.get_config()
  config.algorithm = "fedbuff"
  config.base_algorithm = "fedavg"
  config.local_epochs = 2
  config.client_lr = 0.05
  config.server_lr = 1.0
  config.weighting = "uniform"       # FedBuff / FedAU divide by the buffer, as the papers
  config.concurrency = 20
  config.buffer_size = 10
  config.updates = 0                 # server updates; 0: sync_rounds * concurrency / arrivals per update
  config.sync_rounds = 60
  config.eval_every = 0              # 0: about every `concurrency` arrivals
  config.rounds_per_call = 20
  config.checkpoint_every = 0
  config.target_accuracy = 0.90
  # FedAsync.
  config.fedasync_alpha = 0.6        # mixing weight a: server SGD(a)
  config.fedasync_rho = 0.005        # proximal term of the clients' objective
  config.staleness = "polynomial"    # FedAsync: constant | polynomial | hinge
  config.staleness_a = 0.5
  config.staleness_b = 4
  # Synchronous FedAvg / FedFix / FedCompass / FedAU.
  config.deadline_s = 0.0            # fedavg_sync: > 0 drops clients later than this
  config.window_s = 2.0              # fedfix
  config.compass_min_steps = 2
  config.compass_max_steps = 0       # 0: the schedule's steps of the largest client
  config.fedau_cutoff = 50
  # FedAMD (synchronous rounds): probability of a sampled client being an anchor.
  config.fedamd_anchor_prob = 0.2    # the authors' default --pr
  # AFA-CD: each job's local steps K ~ uniform{afa_min_steps..afa_max_steps}, update Delta/K.
  config.afa_min_steps = 1
  config.afa_max_steps = 0           # 0: the schedule's steps of the largest client
  config.afa_server_lr = 1.0         # eta on the mean of Delta_i / K_i
  # The system model.
  config.compute = "lognormal"       # constant | lognormal | pareto
  config.compute_scale = 0.1         # seconds per local step (median)
  config.compute_sigma = 1.0
  config.compute_shape = 1.5         # pareto
  config.comm = "constant"
  config.comm_scale = 0.2            # seconds of link per job
  config.comm_sigma = 1.0
  config.trace = ""                  # CSV client_id, compute_s_per_step, comm_s (replaces the above)
  config.jitter = 0.0                # sigma of a per-job lognormal factor
  config.availability = "always"     # always | diurnal | markov | windows
  config.availability_bins = 24
  config.availability_bin_s = 10.0
  config.diurnal_duty = 0.5
  config.markov_p_off = 0.1
  config.markov_p_on = 0.3
  config.windows_trace = ""          # CSV client_id, start_s, end_s
  # Data-correlated speeds (FedAU's setting): clients whose most common label is below
  # 5 are this many times slower (1: none).
  config.slow_label_factor = 1.0
  return config
