"""Cohort sampling, on device and keyed by the round's RNG."""
import jax
import jax.numpy as jnp


def validate_cohort(num_clients: int, clients_per_round: int) -> None:
  """Raises a ValueError naming the problem with a population/cohort pair."""
  if num_clients <= 0:
    raise ValueError(f"The federated dataset has zero clients (num_clients={num_clients}).")
  if clients_per_round <= 0:
    raise ValueError(f"clients_per_round must be positive, got {clients_per_round}.")
  if clients_per_round > num_clients:
    raise ValueError(f"Cohort size clients_per_round={clients_per_round} is larger than "
                     f"the population of num_clients={num_clients} clients.")


def uniform(rng: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
  """``clients_per_round`` distinct client ids drawn uniformly, int32 ``[C]``."""
  return jax.random.choice(rng, num_clients, (clients_per_round,), replace=False).astype(jnp.int32)
