"""Federated fine-tuning of a pre-trained char transformer LM on the clients' own text.

A 2-layer transformer (d = 32, context 32) is pre-trained with Adam on a generated
public text, then fine-tuned on 20 clients whose text has its own word skew and
per-client styles (``fedjax_lab/data/corpus.py``); the test set is every client's
held-out texts. Summary: ``initial_test_loss`` (the pre-trained model), ``test_loss``,
``uplink_bytes_per_client_round`` next to ``full_finetune_uplink_bytes``.
    python -m launch.train --config=launch/configs/fedkseed_text.py          # FedKSeed
    python -m launch.train --config=launch/configs/fedkseed_text.py:pro      # FedKSeed-Pro
    python -m launch.train --config=launch/configs/fedkseed_text.py:fedavg   # full fine-tuning
    python -m launch.train --config=launch/configs/fedkseed_text.py:lora     # LoRA rank 4 (FedAvg)
    python -m launch.train --config=launch/configs/fedkseed_text.py:prompt   # prompt tuning
    python -m launch.train --config=launch/configs/fedkseed_text.py:pfedpg   # pFedPG prompts
Every run also reports each client's loss on its own held-out text (personal_loss_*):
the global model's, or the method's personal one (pFedPG's generated prompt adapted on
the client's train split; ``--config.algorithm=local_finetune`` on ``:prompt`` gives the
FedAvg prompt the same adaptation).
LEAF Shakespeare json instead: ``--config.data=leaf:PATH``.
"""
import ml_collections

from launch.configs import fedavg_digits

VARIANTS = ("fedkseed", "pro", "fedavg", "lora", "prompt", "pfedpg", "tiny", "pfedpg_tiny")


def get_config(variant: str = "fedkseed") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  config = fedavg_digits.get_config()
  for key in ("partition", "alpha", "model", "hidden"):
    del config[key]
  config.algorithm = ("fedavg" if variant in ("fedavg", "lora", "prompt") else
                      "pfedpg" if variant.startswith("pfedpg") else "fedkseed")
  # Text: 'corpus' (generated) or 'leaf:PATH' (LEAF Shakespeare json).
  config.data = "corpus"
  config.num_clients = 20
  config.texts_per_client = 40
  config.test_fraction = 0.25          # each client's last texts, pooled: the test set
  config.corpus_style = 0.3            # weight of a client's own word preferences
  config.public_texts = 600            # pre-training sentences (uniform words)
  config.sequence_length = 32
  # Model and pre-training.
  config.lm_layers = 2
  config.lm_d_model = 32
  config.lm_heads = 2
  config.pretrain_steps = 400
  config.pretrain_batch_size = 32
  config.pretrain_lr = 3e-3
  # Fine-tuning: full | lora | prompt (trainable = every weight / adapters / prompt).
  prompt = variant in ("prompt", "pfedpg", "pfedpg_tiny")
  config.finetune = "lora" if variant == "lora" else "prompt" if prompt else "full"
  config.lora_rank = 4
  config.lora_alpha = 0.0              # 0: alpha = rank (scale 1)
  config.prompt_length = 4              # prompt embeddings, pre-trained; 'prompt' tunes only them
  # FedKSeed (Qin et al. 2024): K shared seeds, two-point eps, one pair a local step.
  config.kseed_num_seeds = 4096
  config.kseed_eps = 5e-4
  config.kseed_seed = 0
  config.kseed_sampling = "pro" if variant == "pro" else "uniform"   # pro: FedKSeed-Pro
  config.kseed_clip = 1000.0           # FedKSeed-Pro: |g| clip of the seed histories
  # pFedPG (Yang et al. 2023): server_lr is the generator's rate beta.
  config.pfedpg_attn_dim = 0           # the generator's attention width; 0 = d_model
  config.pfedpg_eval_adapt = True      # evaluate client n with G(d_n) adapted on its data
  # Evaluation-time adaptation (pfedpg, local_finetune): SGD epochs on the client's train split.
  config.finetune_epochs = 1
  config.finetune_lr = 0.0             # 0 = client_lr
  # Rounds and local work.
  config.rounds = 20
  config.clients_per_round = 5
  config.local_epochs = 1
  zeroth_order = config.algorithm == "fedkseed"
  config.local_steps = 200 if zeroth_order else 10
  config.batch_size = 4 if zeroth_order else 8
  # Client rates (seed 0, shared 2-core CPU; docs/methods.md): ZO steps need a far smaller one.
  config.client_lr = {"fedavg": 0.01, "lora": 0.2, "prompt": 0.1, "pfedpg": 0.1,
                      "pfedpg_tiny": 0.1}.get(variant, 5e-5)
  config.server_lr = 1.0
  config.rounds_per_call = 10
  config.eval_every = 10
  config.checkpoint_every = 0
  if variant in ("tiny", "pfedpg_tiny"):   # the registry's examples: seconds, no pre-training
    config.num_clients, config.texts_per_client, config.public_texts = 6, 6, 40
    config.sequence_length, config.lm_d_model, config.pretrain_steps = 8, 8, 0
    config.lm_layers, config.lm_heads, config.prompt_length = 1, 1, 0
    config.rounds, config.clients_per_round, config.local_steps = 2, 3, 4
    config.kseed_num_seeds, config.eval_every = 64, 0
    if prompt:
      config.prompt_length = 2
  return config
