"""Decentralized learning on the embedded digits set: 16 nodes, no server.

Each node is one client of a Dirichlet(0.5) label-skewed split; every round each node
runs its local steps and averages with its neighbours (launch/decentralized.py).
    python -m launch.decentralized --config=launch/configs/gossip_digits.py
    python -m launch.decentralized --config.topology=torus --config.algorithm=dfedsam
    python -m launch.decentralized --config.topology=modest --config.sample_size=4
Algorithms: dpsgd, dfedavg, dfedavgm, dfedsam. Topologies: ring, torus, exponential,
erdos_renyi, fully_connected, random_matching, one_peer_exponential, modest.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.algorithm = "dfedavgm"
  config.topology = "ring"
  config.edge_probability = 0.3      # erdos_renyi
  config.sample_size = 0             # modest: nodes per round (0: num_nodes // 10, at least 1)
  config.topology_seed = 0           # erdos_renyi's graph, modest's samples
  config.gossip_steps = 1            # dfedsam: Q > 1 is DFedSAM-MGS
  config.variance_correction = False # Tian et al. 2024's variance-corrected averaging
  config.independent_init = False    # True: each node its own initialisation (seed + 1 + i)
  # Data: one node per client.
  config.data = "digits"
  config.partition = "dirichlet"
  config.alpha = 0.5
  config.num_clients = 16
  config.test_fraction = 0.2
  # Model.
  config.model = "mlp"
  config.hidden = (200,)
  # Rounds and local work.
  config.rounds = 60
  config.local_epochs = 1
  config.local_steps = 5             # > 0 replaces epochs by a fixed step count
  config.batch_size = 16
  config.shuffle = True
  config.client_lr = 0.05
  config.momentum = 0.9              # dfedavgm's local heavy-ball momentum (dfedsam: 0)
  config.sam_rho = 0.05              # dfedsam
  # Execution.
  config.backend = "vmap"
  config.rounds_per_call = 10
  config.seed = 0
  config.eval_every = 20
  config.checkpoint_every = 0
  return config
