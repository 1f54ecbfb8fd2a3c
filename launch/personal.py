"""Per-client evaluation of a finished run (configs with ``client_test_fraction > 0``).

``report(exp, state, seed)`` evaluates client i's model (the method's
``personalize``; the global model for FedAvg and other global methods) on client i's
own test split (classification: per example; next-token: per target token) and, with
held-out clients, the global model's participation gap.
"""
import jax

from fedjax_lab import personalization


def report(exp, state, seed: int) -> dict:
  info = exp.info
  per_client = personalization.evaluate_clients(
      exp.model.apply, exp.algorithm.personalize, state.params, state.client_states,
      exp.train_data, info.client_test, jax.random.PRNGKey(seed + 7), task=info.task)
  summary = personalization.summarize(per_client)
  summary["personal_clients"] = int((per_client["num_examples"] > 0).sum())
  if info.held_out_train is not None:
    summary.update(personalization.participation_gap(
        exp.model.apply, state.params, exp.train_data, info.client_test,
        info.held_out_train, info.held_out_test))
  return summary
