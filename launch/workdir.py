"""A run directory nobody can corrupt: one writer, a config fingerprint, a resume policy.

Every launch script that takes ``--workdir`` opens it with ``open_run``:

* **one writer**: ``WORKDIR/.lock`` holds the owner's pid and host; a second run fails
  at once naming them; a lock left by a process that no longer runs (same host) is
  taken over with a message;
* **fingerprint**: the config minus the keys that may change on resume without
  changing the numbers (``RESUME_SAFE_KEYS``) is stored in ``WORKDIR/fingerprint.json``;
  resuming with a different one stops, listing the differing keys, before anything in
  the directory changes (``config.json`` is written only after the checks);
* **resume policy** (``--resume``): ``auto`` continues a run whose checkpoints match,
  ``never`` refuses a directory that holds checkpoints, ``require`` refuses one that
  holds none.

``exit_on_unknown_override`` turns an unknown ``--config.KEY`` into one line naming the
closest known keys, and ``quiet_logs`` silences orbax's and the TPU probe's INFO lines.
"""
import contextlib
import datetime
import difflib
import json
import os
import socket
import sys
from typing import Iterator, Optional

from absl import flags

RESUME_POLICIES = ("auto", "never", "require")
# Keys that only change how far and how often a run goes, never its numbers.
RESUME_SAFE_KEYS = ("rounds", "rounds_per_call", "eval_every", "checkpoint_every")
LOCK = ".lock"
FINGERPRINT = "fingerprint.json"

RESUME = flags.DEFINE_enum(
    "resume", "auto", RESUME_POLICIES,
    "With --workdir: auto (continue matching checkpoints, else start), never (refuse a "
    "directory with checkpoints), require (refuse one without).")
VERBOSE_LOGS = flags.DEFINE_bool(
    "verbose_logs", False, "Show orbax's and JAX's INFO log lines (off: warnings only).")
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "fedjax_lab", "jax")
COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", DEFAULT_COMPILATION_CACHE,
    "Directory of JAX's persistent compilation cache: the programs a run compiles (its "
    "rounds, the evaluator, the model init) load from here in later runs of the same "
    "shapes, which skips most of a short run's start-up. '' turns it off; a set "
    "JAX_COMPILATION_CACHE_DIR takes precedence. Deleting the directory is always safe.")


class WorkdirError(ValueError):
  """The run directory cannot be used as asked; nothing in it was changed."""


def quiet_logs() -> None:
  """Warnings and errors only from absl logging (orbax's per-save INFO lines, the TPU
  probe), unless ``--verbose_logs``."""
  from absl import logging
  if not (flags.FLAGS.is_parsed() and VERBOSE_LOGS.value):
    logging.set_verbosity(logging.WARNING)


def use_compilation_cache() -> None:
  """Points JAX's persistent compilation cache at ``--compilation_cache`` (before the
  run compiles anything; the cache is read at the first compilation)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return   # JAX read it at import
  path = COMPILATION_CACHE.value if flags.FLAGS.is_parsed() else DEFAULT_COMPILATION_CACHE
  if not path:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX caches only programs that took over 1 s to compile by default; a short run's
  # start-up is many smaller ones (the evaluator, the model init, data staging).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def _jsonable(value):
  """``value`` as it reads back from JSON (tuples become lists), or its repr."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError):
    return repr(value)


def fingerprint(config) -> dict:
  """The config's keys (dotted) and values that fix a run's numbers."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return {k: _jsonable(v) for k, v in sorted(_flat(values).items())
          if k not in RESUME_SAFE_KEYS}


def differences(saved: dict, now: dict) -> list[str]:
  """``'key: saved -> now'`` for every key whose value differs (or exists on one side)."""
  missing = object()
  lines = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key, missing), now.get(key, missing)
    if a != b:
      show = lambda v: "(absent)" if v is missing else json.dumps(v)
      lines.append(f"{key}: {show(a)} -> {show(b)}")
  return lines


def saved_rounds(workdir: str) -> list[int]:
  """Rounds with an orbax checkpoint in ``WORKDIR/checkpoints``."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.isdir(os.path.join(root, d)))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:     # exists, owned by someone else
    return True
  return True


def acquire_lock(workdir: str) -> str:
  """Creates ``WORKDIR/.lock`` for this process; raises WorkdirError if a live run holds it."""
  path = os.path.join(workdir, LOCK)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds")}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
      except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {path} is unreadable; taking the lock over.", file=sys.stderr)
        os.remove(path)
        continue
      if host == me["host"] and not _alive(pid):
        print(f"warning: {path} was left by pid {pid} on {host}, which no longer runs; "
              f"taking the lock over.", file=sys.stderr)
        os.remove(path)
        continue
      raise WorkdirError(
          f"{workdir} is in use by pid {pid} on host {host} (since "
          f"{owner.get('started', '?')}); one run per workdir: wait for it or use another "
          f"--workdir (if that process is gone, remove {path}).")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirError(f"Could not take the lock {path}.")


def release_lock(path: str) -> None:
  try:
    with open(path) as f:
      if int(json.load(f)["pid"]) != os.getpid():
        return
    os.remove(path)
  except (OSError, ValueError, KeyError):
    pass


def check_resume(workdir: str, config, resume: str = "auto") -> Optional[int]:
  """Raises WorkdirError if this config may not run in ``workdir`` under ``resume``.

  Returns the latest saved round (None: a fresh start). Reads only.
  """
  if resume not in RESUME_POLICIES:
    raise WorkdirError(f"Unknown resume policy {resume!r}; choose one of "
                       f"{', '.join(RESUME_POLICIES)}.")
  rounds = saved_rounds(workdir)
  if not rounds:
    if resume == "require":
      raise WorkdirError(f"--resume=require but {workdir} holds no checkpoint.")
    return None
  if resume == "never":
    raise WorkdirError(f"{workdir} holds checkpoints (rounds {', '.join(map(str, rounds))}) "
                       f"and --resume=never; use a new --workdir.")
  path = os.path.join(workdir, FINGERPRINT)
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise WorkdirError(f"{path} is unreadable ({e}); it fingerprints the checkpoints in "
                         f"{workdir}. Use a new --workdir.") from e
    diff = differences(saved, fingerprint(config))
    if diff:
      raise WorkdirError(
          f"{workdir} holds checkpoints of a different run; resuming would mix them. "
          f"Differing config keys (saved -> now): {'; '.join(diff)}. Use the saved values, "
          f"or a new --workdir (only {', '.join(RESUME_SAFE_KEYS)} may change on resume).")
  return rounds[-1]


@contextlib.contextmanager
def locked(workdir: Optional[str]) -> Iterator[None]:
  """Holds ``workdir``'s lock (one writer) for a script without checkpoints to resume;
  no-op without a workdir."""
  if not workdir:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  lock = acquire_lock(workdir)
  try:
    yield
  finally:
    release_lock(lock)


@contextlib.contextmanager
def open_run(workdir: Optional[str], config, resume: Optional[str] = None) -> Iterator[None]:
  """Holds ``workdir`` for one run: lock, fingerprint and resume checks, then
  ``config.json`` and ``fingerprint.json``; the lock is released on exit. No-op
  without a workdir."""
  if not workdir:
    yield
    return
  with locked(workdir):
    if resume is None:
      resume = RESUME.value if flags.FLAGS.is_parsed() else "auto"
    check_resume(workdir, config, resume)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(dict(config), indent=2, default=repr))
    with open(os.path.join(workdir, FINGERPRINT), "w") as f:
      json.dump(fingerprint(config), f, indent=1)
    yield


def _config_keys(config) -> list[str]:
  return sorted(_flat(config.to_dict()))


def unknown_override(argv, config, flag: str = "config") -> Optional[str]:
  """The first ``--config.KEY`` of ``argv`` that ``config`` lacks, as a one-line message
  naming the closest known keys; None if all exist."""
  known = set(_config_keys(config))
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  for arg in argv[1:]:
    if not arg.startswith(f"--{flag}."):
      continue
    key = arg[len(flag) + 3:].split("=", 1)[0]
    if key not in known and key not in prefixes:
      close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
      hint = f"; closest known keys: {', '.join(close)}" if close else ""
      return f"error: unknown config key {key!r}{hint}."
  return None


def load_config_file(argv, default_path: str, flag: str = "config"):
  """The config named by ``--config=PATH[:ARG]`` in ``argv`` (or ``default_path``)."""
  import importlib.util
  spec_arg = default_path
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{flag}="):
      spec_arg = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      spec_arg = argv[i + 1]
  path, _, option = spec_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_launch_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(option) if option else module.get_config()


def exit_on_unknown_override(argv, default_config_path: str, flag: str = "config") -> None:
  """Exits with one line (status 2) if ``argv`` overrides a key the config lacks.

  Call it before ``config_flags.DEFINE_config_file``, which applies the overrides (and
  raises a long traceback for an unknown key) as soon as it is defined.
  """
  if not any(a.startswith(f"--{flag}.") for a in argv[1:]):
    return
  try:
    config = load_config_file(argv, default_config_path, flag)
  except Exception:  # pylint: disable=broad-except (ml_collections reports a bad file)
    return
  message = unknown_override(argv, config, flag)
  if message:
    print(message, file=sys.stderr)
    sys.exit(2)


def define_script_flags(default_config_path: str):
  """``(config, workdir, progress)`` flag holders of a launch script, defined when it
  runs as a script (not at import, so launch modules can be imported side by side)."""
  from ml_collections import config_flags
  exit_on_unknown_override(sys.argv, default_config_path)
  config = config_flags.DEFINE_config_file(
      "config", default_config_path,
      "Path to an ml_collections config file; override fields with --config.KEY=VALUE.")
  workdir = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints (resumes).")
  progress = flags.DEFINE_bool("progress", True, "Show a progress bar.")
  return config, workdir, progress


def run_script(run, config, workdir: Optional[str], progress: bool) -> None:
  """A launch script's main: quiet logs, ``open_run``, ``run(config, workdir, progress)``
  (whose last result is the summary), errors as one ``error:`` line and exit 1, the
  summary as the last line of JSON."""
  from fedjax_lab import checkpoint
  quiet_logs()
  use_compilation_cache()
  try:
    with open_run(workdir, config):
      summary = run(config, workdir, progress)[-1]
  except (ValueError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


def run_as_script(run, default_config_path: str) -> None:
  """``app.run`` of a launch script whose main is ``run_script(run, ...)``, with the
  flags of ``define_script_flags``."""
  from absl import app
  holders = define_script_flags(default_config_path)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    run_script(run, *(holder.value for holder in holders))

  app.run(main)
