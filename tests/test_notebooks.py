"""Every notebook in colabs/ runs at small settings; notebooks are stored without outputs;
the Python examples of README.md and of the concept pages in docs/ run as written.

Each notebook runs in a fresh kernel of this Python (nbclient + ipykernel) with the
values of its cell tagged "parameters" overridden by a cell inserted after it, as
papermill does. The kernel gets this environment without the 8-device XLA flag of
conftest.py, so a notebook sees the devices a user would. The README and docs examples
run in one fresh process with the same environment.
"""
import ast
import glob
import os
import re
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))

# Test settings injected into every notebook that defines the name in its parameters cell.
TEST_PARAMETERS = {"rounds": 3}
# Extra settings for one notebook (file name -> {name: value}).
NOTEBOOK_PARAMETERS: dict[str, dict] = {
    # Fewer compiled programs at test settings (each aggregator/noise level is one).
    "robust.ipynb": {"aggregators": ("mean", "median"), "fractions": (0.0, 0.2),
                     "noise_multipliers": (1.0,)},
    "fot.ipynb": {"num_tasks": 2},
    "fal.ipynb": {"eps_grid": (0.0, 0.2)},
    "communication.ipynb": {"compressors": ("identity", "fedzip")},
    "async.ipynb": {"sync_rounds": 3, "num_clients": 30, "concurrency": 6,
                    "methods": ("fedavg_sync", "fedbuff")},
    "studies.ipynb": {"num_clients": 20, "client_lrs": (0.05, 0.2), "seeds": (0, 1),
                      "tune_rounds": 2, "tune_steps": 1},
    "personalization_and_llm.ipynb": {"methods": ("fedavg", "ditto"), "lm_variants": ("lora",),
                                      "lm_rounds": 2, "lm_pretrain_steps": 20},
}
CELL_TIMEOUT_S = 300
# Plots a notebook must show (image outputs), so a figure that renders as text fails.
MIN_IMAGES = {"getting_started.ipynb": 4, "composing_transforms.ipynb": 1}


def parameters_cell_index(nb) -> int:
  """Index of the code cell tagged "parameters"; ValueError naming the fix if absent."""
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
      return i
  raise ValueError("no code cell tagged 'parameters' (add the tag in the cell's metadata: "
                   "\"tags\": [\"parameters\"])")


def assigned_names(source: str) -> set[str]:
  """Names bound by top-level assignments in ``source``."""
  names = set()
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
    for target in targets:
      names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
  return names


def inject_parameters(nb, overrides: dict) -> dict:
  """Inserts a cell after the parameters cell setting those ``overrides`` it defines.

  Returns the overrides applied.
  """
  index = parameters_cell_index(nb)
  defined = assigned_names(nb.cells[index].source)
  applied = {k: v for k, v in overrides.items() if k in defined}
  source = "# Parameters injected by the test run.\n" + "".join(
      f"{k} = {v!r}\n" for k, v in applied.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, cell)
  return applied


def kernel_env() -> dict:
  """This process's environment without the forced host device count (it keeps
  conftest.py's quick compilation and compilation cache)."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(flags.split())
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  return env


def execute_notebook(path: str, overrides: dict, kernel_dir: str, cwd: str):
  """Runs the notebook at ``path`` in a kernel of this Python; returns the executed notebook.

  Raises:
    AssertionError: naming the notebook, the failing cell and its error.
  """
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  from jupyter_client.utils import run_sync
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError

  spec_dir = os.path.join(kernel_dir, "fedjax_lab_python")
  if not os.path.isdir(spec_dir):
    write_kernel_spec(spec_dir)    # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
  km = AsyncKernelManager(kernel_name="fedjax_lab_python",
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  nb = nbformat.read(path, as_version=4)
  inject_parameters(nb, overrides)
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                          resources={"metadata": {"path": cwd}})
  name = os.path.basename(path)
  try:
    client.execute(env=kernel_env())
  except (CellExecutionError, CellTimeoutError) as e:
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
        o.get("output_type") == "error" for o in c.get("outputs", []))]
    where = f"cell {failed[0]}" if failed else "a cell"
    source = nb.cells[failed[0]].source if failed else ""
    raise AssertionError(f"{name}: {where} failed:\n{source}\n\n{e}") from None
  finally:
    # nbclient leaves a kernel it did not start running: stop it (it holds a JAX process).
    if km.has_kernel:
      run_sync(km.shutdown_kernel)(now=True)
  return nb


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kernels"))


@pytest.mark.parametrize("path", COLABS, ids=[os.path.basename(p) for p in COLABS])
def test_notebook_runs_at_test_settings(path, kernel_dir):
  name = os.path.basename(path)
  overrides = {**TEST_PARAMETERS, **NOTEBOOK_PARAMETERS.get(name, {})}
  nb = execute_notebook(path, overrides, kernel_dir, cwd=REPO)
  injected = nb.cells[parameters_cell_index(nb) + 1]
  assert "injected-parameters" in injected.metadata.tags
  # Every code cell ran (none skipped) and none wrote an error.
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and cell.source.strip():
      assert cell.execution_count is not None, f"{name}: cell {i} did not run"
      assert not [o for o in cell.outputs if o.output_type == "error"], f"{name}: cell {i}"
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)
  assert images >= MIN_IMAGES.get(name, 0), f"{name}: {images} plots shown"


def test_colabs_exist_and_have_a_parameters_cell():
  names = [os.path.basename(p) for p in COLABS]
  assert {"getting_started.ipynb", "composing_transforms.ipynb"} <= set(names), names
  for path in COLABS:
    nb = nbformat.read(path, as_version=4)
    index = parameters_cell_index(nb)
    assert assigned_names(nb.cells[index].source), f"{path}: the parameters cell sets nothing"


def _repo_notebooks():
  found = []
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".egg-info")
               and d not in ("build", "dist", "venv", "env", "node_modules", "__pycache__")]
    found += [os.path.join(root, f) for f in files if f.endswith(".ipynb")]
  return sorted(found)


def test_every_notebook_in_the_repo_has_stripped_outputs():
  notebooks = _repo_notebooks()
  assert notebooks
  stale = []
  for path in notebooks:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
        stale.append(f"{os.path.relpath(path, REPO)} cell {i}")
  assert not stale, ("Notebooks must be committed without outputs; clear them (e.g. "
                     "`jupyter nbconvert --clear-output --inplace`): " + ", ".join(stale))


def test_injection_overrides_only_defined_names_and_reports_a_missing_tag():
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("import os"),
      nbformat.v4.new_code_cell("rounds = 50\nlr: float = 0.1\n", metadata={"tags": ["parameters"]}),
      nbformat.v4.new_code_cell("print(rounds)")])
  applied = inject_parameters(nb, {"rounds": 3, "lr": 0.5, "absent": 1})
  assert applied == {"rounds": 3, "lr": 0.5}
  namespace = {}
  for cell in nb.cells[1:3]:
    exec(cell.source, namespace)  # pylint: disable=exec-used
  assert namespace["rounds"] == 3 and namespace["lr"] == 0.5 and "absent" not in namespace
  with pytest.raises(ValueError, match="tagged 'parameters'"):
    parameters_cell_index(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]))


def test_a_failing_cell_is_reported_with_notebook_and_cell(kernel_dir, tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("rounds = 5", metadata={"tags": ["parameters"]}),
      nbformat.v4.new_code_cell("assert rounds == 3\nraise RuntimeError('boom')")])
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, str(path))
  with pytest.raises(AssertionError, match=r"broken\.ipynb: cell 2 failed(.|\n)*boom"):
    execute_notebook(str(path), {"rounds": 3}, kernel_dir, cwd=str(tmp_path))


# The README example at test size: each pair must occur in README.md.
README_SUBSTITUTIONS = {"rounds=100": "rounds=3"}
# Pages whose ```python blocks are complete programs (run in order, one namespace per page).
EXECUTED_DOCS = ("round.md", "transforms.md", "backends.md", "data.md", "checkpoints.md",
                 "methods.md")


def python_blocks(markdown: str) -> list[str]:
  """Code of the fenced ```python blocks of a markdown text."""
  return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def example_sources() -> dict[str, list[str]]:
  """name -> code blocks of the README example and of the executed docs pages."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = "\n".join(python_blocks(f.read()))
  for old, new in README_SUBSTITUTIONS.items():
    readme = readme.replace(old, new)
  sources = {"README.md": [readme]}
  for name in EXECUTED_DOCS:
    path = os.path.join(REPO, "docs", name)
    if os.path.isfile(path):
      with open(path) as f:
        sources[name] = python_blocks(f.read())
  return sources


def run_examples(out_path: str) -> None:
  """Runs every example; writes {name: None or the error's traceback} as JSON."""
  import json
  import traceback
  results = {}
  for name, blocks in example_sources().items():
    namespace = {"__name__": name}
    try:
      for i, block in enumerate(blocks):
        exec(compile(block, f"{name} block {i}", "exec"), namespace)  # pylint: disable=exec-used
      if name == "README.md":
        assert int(namespace["state"].round) == 3 and len(namespace["history"]) == 3
      results[name] = None
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc()
  with open(out_path, "w") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def example_results(tmp_path_factory):
  """The README and docs examples, run once in a fresh process like the notebooks."""
  import json
  import subprocess
  out = str(tmp_path_factory.mktemp("examples") / "results.json")
  code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
          f"import test_notebooks; test_notebooks.run_examples({out!r})")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=kernel_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_readme_example_runs(example_results):
  with open(os.path.join(REPO, "README.md")) as f:
    code = "\n".join(python_blocks(f.read()))
  assert code, "README.md has no ```python example"
  for old in README_SUBSTITUTIONS:
    assert old in code, f"README example no longer contains {old!r}; update the test"
  assert example_results["README.md"] is None, example_results["README.md"]


@pytest.mark.parametrize("name", EXECUTED_DOCS)
def test_doc_examples_run(name, example_results):
  assert os.path.isfile(os.path.join(REPO, "docs", name)), f"docs/{name} is missing"
  assert example_results[name] is None, f"docs/{name}:\n{example_results[name]}"


def test_doc_pages_are_linked_from_the_index_and_readme():
  with open(os.path.join(REPO, "docs", "index.md")) as f:
    index = f.read()
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert "docs/index.md" in readme
  for path in glob.glob(os.path.join(REPO, "docs", "*.md")):
    name = os.path.basename(path)
    if name != "index.md":
      assert f"({name})" in index, f"docs/index.md does not link {name}"
  for link in re.findall(r"\]\(([^)#]+\.md)\)", index + readme.replace("docs/", "")):
    assert os.path.isfile(os.path.join(REPO, "docs", link)), f"broken link {link}"


def test_methods_page_lists_every_registered_method():
  import algorithms
  with open(os.path.join(REPO, "docs", "methods.md")) as f:
    page = f.read()
  missing = [name for name in algorithms.REGISTRY if f"`{name}`" not in page]
  assert not missing, f"docs/methods.md does not describe: {', '.join(missing)}"
