"""Personalized FL on digits: pathological 2-classes-per-client partition, per-client test splits.

Each client's examples are split 75/25 within the client; client i is evaluated
with its own model on its own test split (summary: personal_accuracy_mean,
personal_accuracy_p10; for fedavg the global model), and 5 held-out clients that
never train give the global model's participation_gap.
    python -m launch.train --config=launch/configs/personal_digits.py
    python -m launch.train --config=launch/configs/personal_digits.py --config.algorithm=ditto
    (ditto | apfl | fedrep | fedper | fedbn | local_finetune | pfedgate | fedavg)
FedBN needs the BN model: ``--config.algorithm=fedbn --config.model=mlp_bn``
(``get_config('fedbn')``, FedBN's registry example, sets it).
"""
import ml_collections

from launch.configs import fedavg_digits


def get_config(algorithm: str = "fedavg") -> ml_collections.ConfigDict:
  config = fedavg_digits.get_config()
  config.algorithm = algorithm
  config.partition = "pathological"
  config.num_classes_per_partition = 2
  config.num_clients = 50
  config.client_test_fraction = 0.25   # each client's own test split
  config.held_out_clients = 5          # never train: the participation gap
  config.model = "mlp_bn" if algorithm == "fedbn" else "mlp"
  config.rounds = 20
  config.clients_per_round = 10
  config.local_epochs = 1
  config.local_steps = 20
  config.batch_size = 10
  config.client_lr = 0.05
  config.eval_every = 10
  config.checkpoint_every = 0
  # Personalization knobs (each method reads its own).
  config.personal_layers = ()          # FedRep / FedPer head; () = the model's last layer
  config.fedrep_head_steps = 10        # FedRep: head-only steps, then body-only steps
  config.ditto_lambda = 0.1
  config.personal_lr = 0.0             # Ditto: 0 = client_lr
  config.apfl_alpha_lr = 0.1
  config.apfl_alpha_init = 0.5
  config.finetune_epochs = 5           # local_finetune: SGD epochs at evaluation
  config.finetune_lr = 0.0             # 0 = client_lr
  # pFedGate (Chen et al. 2023; the authors' run scripts): sparse factor s, blocks per leaf.
  config.pfedgate_sparsity = 0.5       # fraction of the model's parameters kept
  config.pfedgate_block_split = 5      # each leaf cut into this many sub-blocks
  config.pfedgate_blocks = "units"     # units: groups of output units; flat: of the flat leaf
  config.pfedgate_gate_lr = 0.1        # SGD rate of the personal gating layer
  config.pfedgate_score_levels = 0     # knapsack values g; 10 = the authors' round(10 g)
  config.pfedgate_input_dim = 0        # 0 = the first dense kernel's fan-in
  return config
